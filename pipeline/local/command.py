"""``dogbreed local-run``: synthesize the definition and execute its JSON on this machine."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.commands import UsageError, add_settings_arguments, parse_parameters, positive_int, settings_from_args
from pipeline.local.sample import make_sample, split_sizes_of
from pipeline.local.state import RunOptions
from pipeline.dag import strings_in
from pipeline.definition import load_contract, synth
from pipeline.local.errors import LocalRunError
from pipeline.parameters import ParameterError, check_run_values

DATA_PARAMETER = "InputDataUrl"
WEIGHTS_PARAMETER = "PretrainedWeightsS3Uri"
DEFAULT_WORKDIRS = Path("build") / "local-run"
WEIGHTS_PREFIX = ("local-run", "pretrained")  # where in local S3 a local weights file is put
# name: (value, why). Without a weights file nothing is downloaded, so the backbone is random and trains whole
# (train.py's frozen-backbone rule); the rest keeps that affordable on a laptop's CPU.
NO_WEIGHTS_DEFAULTS = {
    "PretrainedWeights": ("none", "nothing is downloaded; the whole network trains from random weights "
                                  f"(--param {WEIGHTS_PARAMETER}=<file.pth> for transfer learning)"),
}
REAL_DATA_DEFAULTS = {
    "Backbone": ("resnet18", "the smallest ResNet: a whole-network epoch on CPU takes seconds, not minutes"),
    "ImageSize": (64, "enough pixels for real photos at a twelfth of 224's compute"),
}
# Small and fast on the generated sample (a few minutes on two cores, the 7-instance training included).
SAMPLE_DEFAULTS = {
    "Backbone": ("resnet18", "the generated sample is tiny"),
    "ImageSize": (32, "the sample's shapes need no more"),
}
# The trials local-run runs when --max-tuning-jobs is not given (the definition's TuningMaxJobs setting is for AWS).
SAMPLE_TRIALS = (4, "trials on features take seconds")
REAL_DATA_TRIALS = (2, "two trials keep the search short; the final trainings are the costly part")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 3600 seconds")
    return value


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "local-run",
        help="run the synthesized pipeline definition on this machine, without AWS or Docker",
        description="Synthesize the pipeline definition and execute its JSON here: processing and training jobs "
                    "as local processes under the SageMaker container contract (an N-instance training job as N "
                    "processes in one torch.distributed group), tuning as a few seeded trials, the model registry "
                    "and endpoint control plane in an embedded moto, the Lambda steps' real handlers in-process, "
                    "and the endpoints' data plane on 127.0.0.1. Without --data it generates a small sample.",
    )
    parser.add_argument("--data", type=Path, default=None,
                        help="image folders (dogImages layout, or one folder per class) used as the InputDataUrl "
                             "location; default: a generated sample")
    parser.add_argument("--workdir", type=Path, default=None,
                        help=f"where the run keeps its local S3, jobs and logs (default {DEFAULT_WORKDIRS}/<execution id>)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a pipeline parameter's value for this run; repeatable; wins over local-run's defaults. "
                             f"{WEIGHTS_PARAMETER} may name a local .pth file (a backbone state dict)")
    parser.add_argument("--pretrained-weights", type=Path, default=None, metavar="FILE",
                        help=f"a local state dict of the backbone (e.g. resnet50.pth): the same as --param {WEIGHTS_PARAMETER}=FILE")
    parser.add_argument("--max-tuning-jobs", type=positive_int, default=None, metavar="N",
                        help=f"run at most N tuning trials (default: {SAMPLE_TRIALS[0]} on the generated sample, "
                             f"{REAL_DATA_TRIALS[0]} on --data, the definition's MaxNumberOfTrainingJobs with a weights file)")
    parser.add_argument("--parallel", type=positive_int, default=max(1, min(2, os.cpu_count() or 1)), metavar="N",
                        help="steps (and tuning trials) run at once; an N-instance job counts as one (default %(default)s)")
    parser.add_argument("--endpoint-delay", type=_seconds, default=0.0, metavar="SECONDS",
                        help="an endpoint a Deploy step creates or updates stays Creating/Updating this long, "
                             "so the WaitFor steps poll it as on SageMaker (default 0)")
    parser.add_argument("--definition", type=Path, default=None,
                        help="run this definition JSON instead of synthesizing one (its assets must be this tree's)")
    parser.add_argument("--no-progress", dest="plain", action="store_const", const=True, default=None,
                        help="print a line per step status change instead of the live table")
    add_settings_arguments(parser)
    parser.set_defaults(handler=run_command)


def check_run_parameters(values: dict[str, Any], document: dict) -> None:
    """The run's values, local-run's own defaults included, within their ranges and order (a UsageError if not)."""

    try:
        check_run_values(values, document)
    except ParameterError as error:
        raise UsageError(str(error)) from None


def local_choices(document: dict, given: dict[str, Any], sample: bool) -> dict[str, tuple[Any, str]]:
    """local-run's own defaults, with why, for the parameters the user did not set (those the definition has).

    With a weights file the definition's own defaults stand (PretrainedWeights=imagenet reads the file).
    """
    names = {item["Name"] for item in document.get("Parameters", [])}
    weights = WEIGHTS_PARAMETER in given
    defaults = {**({} if weights else NO_WEIGHTS_DEFAULTS),
                **(SAMPLE_DEFAULTS if sample else {} if weights else REAL_DATA_DEFAULTS)}
    return {name: choice for name, choice in defaults.items() if name in names and name not in given}


def local_trials(given: dict[str, Any], sample: bool, flag: int | None) -> tuple[int, str] | None:
    """How many tuning trials local-run runs, with why, when ``--max-tuning-jobs`` (``flag``) is not given;
    None keeps the definition's MaxNumberOfTrainingJobs (with a weights file, as the parameters do)."""
    if flag is not None or (WEIGHTS_PARAMETER in given and not sample):
        return None
    return SAMPLE_TRIALS if sample else REAL_DATA_TRIALS


def local_overrides(document: dict, given: dict[str, Any], sample: bool) -> dict[str, Any]:
    """The values of ``local_choices``."""
    return {name: value for name, (value, _) in local_choices(document, given, sample).items()}


def local_weights_file(given: dict[str, Any], flag: Path | None) -> Path | None:
    """The local weights file named by --pretrained-weights or by a PretrainedWeightsS3Uri that is not an S3 URI."""

    value = given.get(WEIGHTS_PARAMETER)
    if flag is not None:
        if value is not None and str(value) != str(flag):
            raise UsageError(f"--pretrained-weights {flag} and --param {WEIGHTS_PARAMETER}={value} disagree: give one")
        value = str(flag)
    if value is None or str(value).startswith("s3://"):
        return None
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise UsageError(f"{WEIGHTS_PARAMETER}={value}: no such file; give a .pth state dict of the backbone "
                         "(torch.save(model.state_dict(), path)) or an s3:// URI")
    return path


def weights_uri(settings: Any, path: Path) -> str:
    """Where local-run puts a local weights file in its local S3."""
    return settings.s3_uri(*WEIGHTS_PREFIX, path.name)


def load_document(args: argparse.Namespace, synthesized: dict) -> dict:
    """The definition to run: the one synth built (already parsed), or the --definition file."""
    if args.definition is None:
        return synthesized
    try:
        return json.loads(args.definition.read_text())
    except OSError as error:
        raise UsageError(f"--definition {args.definition}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"--definition {args.definition} is not JSON: {error}") from None


def check_assets(document: dict, settings: Any, assets: Any) -> None:
    """Every asset the definition names must be one this tree builds (else its jobs would find no code)."""

    prefix = settings.s3_uri("assets") + "/"
    published = {asset.s3_uri for asset in assets}
    for text in strings_in(document):
        for uri in re.findall(r"s3://[^\s\"']+", text):
            if uri.startswith(prefix) and uri not in published:
                raise UsageError(f"the definition names the asset {uri}, which this source tree does not build "
                                 f"(it has {', '.join(sorted(published))}): synthesize the definition from this tree")


def link_data(run: Any, data: Path) -> None:
    """Make ``data`` the content of the InputDataUrl location in local S3."""

    uri = run.parameters.get(DATA_PARAMETER)
    if uri is None:
        raise UsageError(f"--data needs a {DATA_PARAMETER} parameter in the definition")
    try:
        target = run.s3.path(uri)
    except Exception as error:
        raise UsageError(f"{DATA_PARAMETER}={uri!r}: {error}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink():  # the data of an earlier run in this work dir
        target.unlink()
    elif target.exists():
        raise UsageError(f"{target} ({uri} in local S3) exists and is not a link made by local-run: "
                         "remove it or give another --workdir")
    target.symlink_to(data.resolve(), target_is_directory=True)


def sample_data(folder: Path, contract: ModuleType) -> dict[str, str]:
    """The generated sample in ``folder``: written on first use, reused by later runs in the same work dir."""
    if (folder / contract.TRAIN_CHANNEL).is_dir():
        images = sum(1 for path in folder.rglob("*.jpg"))
        return {"path": str(folder), "description": f"generated sample (from an earlier run), {images} files"}
    sample = make_sample(folder, split_sizes=split_sizes_of(contract.SPLITS))  # Pillow, a dev dependency
    return {"path": str(sample.root), "description": f"generated sample: {len(sample.classes)} classes, {sample.images} images"}


def run_command(args: argparse.Namespace) -> int:
    # the runner brings moto, werkzeug and the toolkits (dev dependencies): not imported for the other commands
    from pipeline.local.scheduler import LocalRun, new_execution_id
    from pipeline.local.summary import summary_document, summary_lines, write_summary

    if args.data is not None and not args.data.is_dir():
        raise UsageError(f"--data {args.data} is not a folder of images")
    settings = settings_from_args(args)
    contract = load_contract(settings.source_dir)
    synthesized = synth(settings, contract)
    document = load_document(args, synthesized.document)
    check_assets(document, settings, synthesized.assets)
    given = parse_parameters(args.param, document)
    weights_file = local_weights_file(given, args.pretrained_weights)
    if weights_file is not None:
        given[WEIGHTS_PARAMETER] = weights_uri(settings, weights_file)
    choices = local_choices(document, given, sample=args.data is None)
    applied = {name: value for name, (value, _) in choices.items()}
    check_run_parameters({**applied, **given}, document)
    execution_id = new_execution_id()
    workdir = args.workdir or DEFAULT_WORKDIRS / execution_id
    trials = local_trials(given, args.data is None, args.max_tuning_jobs)
    options = RunOptions(parameters={**applied, **given}, max_tuning_jobs=trials[0] if trials else args.max_tuning_jobs,
                         parallel=args.parallel, plain=args.plain, endpoint_delay_seconds=args.endpoint_delay)
    try:
        run = LocalRun(document, settings, synthesized.assets, workdir, contract, options, execution_id)
        run.prepare()
        if args.data is not None:
            data = {"path": str(args.data.resolve()), "description": "data"}
        else:
            data = sample_data(run.workdir / "sample-data", contract)
        link_data(run, Path(data["path"]))
        if weights_file is not None:
            run.s3.put(given[WEIGHTS_PARAMETER], weights_file.read_bytes())
    except LocalRunError as error:
        raise UsageError(str(error)) from None
    if weights_file is not None:
        print(f"pretrained weights: {weights_file} as {WEIGHTS_PARAMETER}={given[WEIGHTS_PARAMETER]} "
              f"(the '{contract.PRETRAINED_CHANNEL}' channel; PretrainedWeights=imagenet reads it, the backbone stays frozen)")
    if applied or trials:
        why = "local-run defaults" + (" for the generated sample" if args.data is None else "")
        print(f"{why} (--param NAME=VALUE or --max-tuning-jobs N to choose otherwise):")
        for name, (value, reason) in choices.items():
            print(f"  {name}={value}: {reason}")
        if trials:
            print(f"  --max-tuning-jobs {trials[0]}: {trials[1]}")
    print(f"data: {data['description']} at {os.path.relpath(data['path'])}; work dir {os.path.relpath(run.workdir)}")
    sys.stdout.flush()
    result = run.execute()
    document_out = summary_document(result, {k: str(v) for k, v in applied.items()}, data, contract.ACCURACY_JSON_PATH,
                                    features_header=contract.FEATURES_HEADER_FILE)
    write_summary(document_out, run.workdir / "summary.json")
    print()
    print("\n".join(summary_lines(result, document_out)))
    return 0 if result.succeeded else 1

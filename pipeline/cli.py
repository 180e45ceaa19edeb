"""The ``dogbreed`` command line.

Every command reads the same settings flags (which override environment
variables, which override defaults). Errors that the user can fix print one
line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from pipeline.assets import ArtifactError
from pipeline.dag import DefinitionError
from pipeline.settings import ENVIRONMENT, Settings, SettingsError, load_settings, parse_tags

DEFAULT_OUT = Path("build") / "pipeline.json"
SETTING_FLAGS = (
    "region", "account", "project_name", "project_id", "pipeline_role_arn", "job_role_arn", "model_role_arn",
    "bucket", "prefix", "model_package_group", "kms_key_id", "processing_instance_type",
    "training_instance_type", "endpoint_instance_type",
    "deploy_lambda_role_arn", "check_lambda_role_arn", "invoke_lambda_role_arn", "invoke_endpoint_name", "allowed_origin",
    "invoke_provisioned_concurrency",
)


class UsageError(Exception):
    """A mistake in what the user asked for; printed as one line."""


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings", "flags override environment variables, which override defaults")
    for name in SETTING_FLAGS:
        env = ENVIRONMENT.get(name)
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                           help=f"(env {env})" if env else None)
    group.add_argument("--spot-training", dest="spot_training", action="store_true", default=None,
                       help="train on managed spot instances, resuming from checkpoints (env SPOT_TRAINING)")
    group.add_argument("--source-dir", dest="source_dir", type=Path, default=None,
                       help="project checkout holding code/ and lambda/ (default: the working directory)")
    group.add_argument("--tag", dest="tags", action="append", default=[], metavar="KEY=VALUE",
                       help="tag for the pipeline and its resources; repeatable")


def settings_from_args(args: argparse.Namespace) -> Settings:
    flags = {name: getattr(args, name, None) for name in (*SETTING_FLAGS, "spot_training", "source_dir")}
    if getattr(args, "tags", None):
        flags["tags"] = parse_tags(args.tags)
    return load_settings(flags)


def _synth(args: argparse.Namespace) -> int:
    from pipeline.dag import steps_of
    from pipeline.definition import synth

    result = synth(settings_from_args(args))
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_text(result.definition)
    temporary.replace(out)
    manifest = result.assets.write(out.parent)
    steps = len(steps_of(result.document))
    print(f"wrote {out} ({steps} steps) and {manifest}")
    return 0


def _graph(args: argparse.Namespace) -> int:
    from pipeline.definition import synth
    from pipeline.graph import render_graph

    sys.stdout.write(render_graph(synth(settings_from_args(args)).document, args.format))
    return 0


def _validate(args: argparse.Namespace) -> int:
    """Synth's checks on a definition file; exit 1 with one line per finding."""
    from pipeline.artifact import read_definition
    from pipeline.dag import steps_of
    from pipeline.validate import iter_problems

    _, document = read_definition(args.file)
    problems = list(iter_problems(document))
    if problems:
        print(f"{args.file}: {len(problems)} problem{'s' if len(problems) > 1 else ''}", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"{args.file}: valid ({len(steps_of(document))} steps, {len(document.get('Parameters', []))} parameters)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dogbreed", description="Build, publish and run the dog-breed SageMaker pipeline.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser("synth", help="write the pipeline definition JSON and its asset manifest, offline")
    synth.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"definition path (default {DEFAULT_OUT})")
    add_settings_arguments(synth)
    synth.set_defaults(handler=_synth)

    validate = commands.add_parser("validate", help="run synth's checks on a definition file; exit 1 with the findings")
    validate.add_argument("file", type=Path, help="a pipeline definition JSON, e.g. build/pipeline.json")
    validate.set_defaults(handler=_validate)

    graph = commands.add_parser("graph", help="print the pipeline's DAG")
    graph.add_argument("--format", choices=("mermaid", "dot"), default="mermaid")
    add_settings_arguments(graph)
    graph.set_defaults(handler=_graph)

    for register in extra_commands():
        register(commands)
    return parser


def extra_commands() -> list[Callable]:
    """Commands defined in their own modules: each module's ``register(subparsers)``."""
    from pipeline import publish
    from pipeline.local import command as local_run

    return [publish.register, local_run.register]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (SettingsError, UsageError, DefinitionError, ArtifactError) as error:
        print(f"dogbreed {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dogbreed {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

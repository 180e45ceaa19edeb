"""A training job as local processes: CreateTrainingJob's request in, DescribeTrainingJob's answer out.

Training runs through the real training toolkit wherever it can (the "toolkit"
runner): each host runs ``sagemaker-training``'s entry point, what the PyTorch
image's ``train`` command runs, with ``SAGEMAKER_BASE_DIR`` at the host's
``opt/ml`` and ``sagemaker-pytorch-training`` as the framework module; the toolkit
reads ``input/config/*.json``, decodes the hyperparameters, sets ``SM_*``, installs
``requirements.txt`` and starts the script, and writes the failure file when the
script did not. One host skips the toolkit's wait for host names
(``SM_STUDIO_LOCAL_MODE``). N hosts need ``algo-1..N`` to resolve and the toolkit's
fixed master port 7777: they run in one private network namespace whose
``/etc/hosts`` maps those names to its own loopback (``HostNetwork``), where the
system allows one (``unshare``/``nsenter``). Where it does not, or without the
toolkits installed, the "launcher" runner does the toolkit's work itself: the
``sagemaker_*`` hyperparameters dropped, the rest JSON-decoded and passed as
``--name value``, ``SM_*`` set as the toolkit sets them, and the master on
127.0.0.1 at a free port. Either way the ``sagemaker_submit_directory`` tarball
is unpacked into ``/opt/ml/code`` first, the model folder becomes
``<S3OutputPath>/<job>/output/model.tar.gz``, and the job's log is searched with
the definition's ``MetricDefinitions``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pipeline.files import write_json
from pipeline.local.errors import LocalRunError
from pipeline.local.jobs import (
    OPT_ML,
    HostProcess,
    JobContext,
    JobResult,
    ProcessRegistry,
    check_usable_root,
    download_input,
    free_port,
    host_names,
    rewrite_opt_ml,
    run_hosts,
    s3_part,
    stop_processes,
    thread_limits,
    timestamp,
    write_tar,
)
from pipeline.local.s3 import LocalS3
from pipeline.progress import utc_now

TOOLKIT = "toolkit"
LAUNCHER = "launcher"
TOOLKIT_ENTRY_POINT = ("-m", "sagemaker_training.cli.train")  # the training image's `train` command
TOOLKIT_FRAMEWORK_MODULE = "sagemaker_pytorch_container.training:main"  # SAGEMAKER_TRAINING_MODULE of the PyTorch image
NAMESPACE_READY_SECONDS = 10.0


def decoded_hyperparameters(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Each value JSON-decoded, as the training toolkit does; the raw string when it is not JSON."""
    decoded = {}
    for name, value in raw.items():
        if isinstance(value, str):
            try:
                decoded[name] = json.loads(value)
            except json.JSONDecodeError:
                decoded[name] = value
        else:
            decoded[name] = value
    return decoded


def _argument_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return ",".join(f"{key}={item}" for key, item in sorted(value.items()))
    return str(value)


def user_arguments(hyperparameters: Mapping[str, Any]) -> list[str]:
    """``--name value`` for each hyperparameter but the toolkit's own ``sagemaker_*`` ones, sorted by name."""
    arguments: list[str] = []
    for name in sorted(hyperparameters):
        if name.startswith("sagemaker_"):
            continue
        arguments += [f"--{name}" if len(name) > 1 else f"-{name}", _argument_value(hyperparameters[name])]
    return arguments


def _env_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def parse_metrics(log_text: str, definitions: Sequence[Mapping[str, str]]) -> dict[str, list[float]]:
    """Every value each MetricDefinitions regex captures in the log, in order."""
    metrics: dict[str, list[float]] = {}
    compiled = [(item["Name"], re.compile(item["Regex"])) for item in definitions]
    for line in log_text.splitlines():
        for metric, pattern in compiled:
            match = pattern.search(line)
            if match:
                try:
                    metrics.setdefault(metric, []).append(float(match.group(1)))
                except (IndexError, ValueError):
                    continue
    return metrics


@dataclass
class TrainingSpec:
    """What a training job needs, from a CreateTrainingJob request or a tuning trial."""

    name: str
    arguments: dict[str, Any]  # CreateTrainingJob arguments, resolved

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return dict(self.arguments.get("HyperParameters") or {})

    @property
    def instance_count(self) -> int:
        config = self.arguments.get("ResourceConfig") or {}
        return config.get("InstanceCount", 1)

    @property
    def metric_definitions(self) -> list[dict[str, str]]:
        return list(self.arguments.get("AlgorithmSpecification", {}).get("MetricDefinitions") or [])


def run_training_job(ctx: JobContext, spec: TrainingSpec, threads: int | None = None,
                     on_started: Callable[[list[Path]], None] | None = None) -> JobResult:
    """A CreateTrainingJob request run locally; returns DescribeTrainingJob-shaped properties.

    ``threads`` is the CPU threads the job may use (default: the context's
    share of a job); each of its N processes gets 1/N of them, so that
    processes sharing the cores do not oversubscribe them.
    """
    created = utc_now()
    job_dir = ctx.jobs_dir / spec.name
    hosts = host_names(spec.instance_count)
    decoded = decoded_hyperparameters(spec.hyperparameters)
    program = decoded.get("sagemaker_program")
    submit = decoded.get("sagemaker_submit_directory")
    if not program or not submit:
        raise LocalRunError(f"training job {spec.name}: hyperparameters sagemaker_program and sagemaker_submit_directory "
                            "are needed to run a framework script (the toolkit's contract)")
    per_process = max(1, (threads or ctx.cpus_per_job) // len(hosts))
    network = HostNetwork(hosts, job_dir, ctx.processes) if len(hosts) > 1 and toolkit_installed() else None
    try:
        runner, why = training_runner(hosts, network)
        distributed = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo"} \
            if len(hosts) > 1 and runner == LAUNCHER else {}
        launch = _Launch(runner, network.prefix if network else [], per_process, distributed)
        processes = [_training_host(ctx, spec, decoded, job_dir, hosts, host, launch) for host in hosts]
        for process in processes:
            process.log.parent.mkdir(parents=True, exist_ok=True)
            with open(process.log, "a") as log:
                log.write(f"{timestamp(utc_now())} local-run: {process.host} runs through the {runner}: {why}\n")
        if runner == LAUNCHER:
            _install_requirements(ctx, processes[0])  # the toolkit installs them itself
        started = utc_now()
        if on_started:
            on_started([process.log for process in processes])
        run_hosts(ctx, processes, spec.arguments.get("StoppingCondition", {}).get("MaxRuntimeInSeconds"))
    finally:
        if network is not None:
            network.stop()
    _save_checkpoints(ctx.s3, spec.arguments.get("CheckpointConfig"), [job_dir / host for host in hosts])
    artifact_uri = _upload_model(ctx.s3, spec, [job_dir / host / "opt/ml/model" for host in hosts])
    for host in hosts:  # the instances' disks go with them; the model lives on in model.tar.gz
        shutil.rmtree(job_dir / host / "opt/ml/model", ignore_errors=True)
    _upload_output_data(ctx.s3, spec, job_dir / hosts[0] / "opt/ml/output/data")
    ended = utc_now()
    primary_log = processes[0].log
    metrics = parse_metrics(primary_log.read_text(errors="replace"), spec.metric_definitions)
    seconds = int((ended - started).total_seconds())
    properties = {
        **spec.arguments,
        "TrainingJobName": spec.name,
        "TrainingJobArn": ctx.arn("training-job", spec.name),
        "TrainingJobStatus": "Completed",
        "SecondaryStatus": "Completed",
        "ModelArtifacts": {"S3ModelArtifacts": artifact_uri},
        "FinalMetricDataList": [
            {"MetricName": metric, "Value": values[-1], "Timestamp": timestamp(ended)}
            for metric, values in metrics.items()
        ],
        "CreationTime": timestamp(created),
        "TrainingStartTime": timestamp(started),
        "TrainingEndTime": timestamp(ended),
        "LastModifiedTime": timestamp(ended),
        "TrainingTimeInSeconds": seconds,
        "BillableTimeInSeconds": seconds * len(hosts),
    }
    return JobResult(properties, [process.log for process in processes], metrics, ctx.s3.path(artifact_uri), f"{runner}: {why}")


@dataclass(frozen=True)
class _Launch:
    """How each host process of a training job starts."""

    runner: str  # TOOLKIT or LAUNCHER
    prefix: list[str]  # enters the job's private network (multi-host toolkit runs)
    threads: int  # CPU threads of each process
    distributed: dict[str, str]  # the launcher's MASTER_* variables


def _training_host(ctx: JobContext, spec: TrainingSpec, decoded: Mapping[str, Any], job_dir: Path,
                   hosts: list[str], host: str, launch: _Launch) -> HostProcess:
    """One instance of a training job laid out as SageMaker lays out /opt/ml, and the process that runs it."""
    root = job_dir / host
    check_usable_root(root)
    opt_ml = root / "opt" / "ml"
    channels = _training_channels(ctx, spec, opt_ml, hosts, host)
    code_dir = opt_ml / "code"
    _unpack_sources(ctx.s3, str(decoded["sagemaker_submit_directory"]), code_dir)
    _prepare_checkpoints(ctx.s3, spec.arguments.get("CheckpointConfig"), root)
    for folder in ("model", "output/data", "output/intermediate"):
        (opt_ml / folder).mkdir(parents=True, exist_ok=True)
    write_json(opt_ml / "input/config/hyperparameters.json", spec.hyperparameters)
    write_json(opt_ml / "input/config/resourceconfig.json",
               {"current_host": host, "hosts": hosts, "network_interface_name": "lo"})
    write_json(opt_ml / "input/config/inputdataconfig.json", {
        channel["ChannelName"]: {k: v for k, v in channel.items() if k not in ("ChannelName", "DataSource")}
        for channel in spec.arguments.get("InputDataConfig", [])
    })
    environment = {**ctx.environment, **rewrite_opt_ml(dict(spec.arguments.get("Environment") or {}), root)}
    if launch.runner == TOOLKIT:
        environment.update(_platform_environment(ctx, spec, opt_ml, len(hosts)))
        command, cwd = [*launch.prefix, ctx.python, *TOOLKIT_ENTRY_POINT], root
    else:
        environment.update(_toolkit_environment(ctx, spec, decoded, opt_ml, channels, hosts, host, launch.threads))
        environment.update(launch.distributed)
        command, cwd = [ctx.python, str(decoded["sagemaker_program"]), *user_arguments(decoded)], code_dir
    environment.update(thread_limits(launch.threads))
    return HostProcess(host, command, environment, cwd, job_dir / "logs" / f"{host}.log", root)


def toolkit_installed() -> bool:
    """Whether the training toolkits the PyTorch image runs are importable by this interpreter."""
    return all(importlib.util.find_spec(name) is not None for name in ("sagemaker_training", "sagemaker_pytorch_container"))


def training_runner(hosts: list[str], network: "HostNetwork | None") -> tuple[str, str]:
    """(TOOLKIT or LAUNCHER, why) for a job on ``hosts``; starts the private network of a multi-host job."""
    if not toolkit_installed():
        return LAUNCHER, "sagemaker-training and sagemaker-pytorch-training are not installed (pip install -e '.[dev]')"
    if len(hosts) == 1:
        return TOOLKIT, "sagemaker-training's entry point, one host (SM_STUDIO_LOCAL_MODE=true: no host-name wait)"
    problem = network.start() if network is not None else "no private network"
    if problem:
        return LAUNCHER, (f"{len(hosts)} hosts need algo-1..{len(hosts)} to resolve and port 7777 free, "
                          f"which needs a private network namespace: {problem}")
    return TOOLKIT, (f"sagemaker-training's entry point, {len(hosts)} hosts in a private network namespace "
                     f"where algo-1..{len(hosts)} resolve to its loopback (MASTER_ADDR=algo-1, MASTER_PORT=7777)")


class HostNetwork:
    """A network namespace of its own loopback only, with an /etc/hosts in which every host name is that loopback.

    SageMaker's instances of one job find each other as ``algo-1..N`` and the PyTorch
    toolkit makes ``algo-1:7777`` the master; here the N processes of a job share one
    such namespace, so the names resolve and the fixed port cannot collide with anything
    else on this machine. A holder process (``unshare``) keeps the namespace alive and
    every host process enters it (``nsenter``). Needs root, or unprivileged user
    namespaces; ``start`` says why not when it cannot.
    """

    def __init__(self, hosts: list[str], folder: Path, registry: ProcessRegistry) -> None:
        self.hosts = hosts
        self.folder = folder
        self.registry = registry
        self.holder: subprocess.Popen | None = None
        self.prefix: list[str] = []

    def start(self) -> str:
        """Create the namespace; returns "" when it is ready, else why it could not be made."""
        tools = {name: shutil.which(name) for name in ("unshare", "nsenter", "ip", "mount")}
        missing = [name for name, path in tools.items() if path is None]
        if missing:
            return f"{', '.join(missing)} not found"
        hosts_file = self.folder / "etc-hosts"
        hosts_file.parent.mkdir(parents=True, exist_ok=True)
        hosts_file.write_text("127.0.0.1 localhost\n::1 localhost\n" + "".join(f"127.0.0.1 {host}\n" for host in self.hosts))
        as_user = os.geteuid() != 0
        script = f"mount --bind {hosts_file} /etc/hosts && ip link set lo up && echo ready && exec sleep infinity"
        command = [tools["unshare"], *(["--map-root-user"] if as_user else []), "--mount", "--net", "sh", "-c", script]
        self.holder = self.registry.start(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        ready = self._wait_ready()
        if ready:
            self.stop()
            return ready
        entered = ["--user", "--preserve-credentials"] if as_user else []
        self.prefix = [tools["nsenter"], "--target", str(self.holder.pid), *entered, "--mount", "--net", "--"]
        return ""

    def _wait_ready(self) -> str:
        """Empty once the holder says ready, else what it printed before it failed."""
        lines: list[bytes] = []
        reader = threading.Thread(target=lambda: lines.append(self.holder.stdout.readline()), daemon=True)
        reader.start()
        reader.join(NAMESPACE_READY_SECONDS)
        first = b"".join(lines).decode(errors="replace").strip()
        if first == "ready":
            return ""
        if self.holder.poll() is None and reader.is_alive():
            return f"the namespace did not get ready within {NAMESPACE_READY_SECONDS:.0f} s"
        rest = self.holder.stdout.read().decode(errors="replace").strip() if self.holder.poll() is not None else ""
        return " ".join(part for part in (first, rest) if part) or f"unshare exited with status {self.holder.returncode}"

    def stop(self) -> None:
        if self.holder is not None:
            stop_processes([self.holder])
            self.registry.forget(self.holder)
            self.holder.stdout.close()
            self.holder = None


def _platform_environment(ctx: JobContext, spec: TrainingSpec, opt_ml: Path, host_count: int) -> dict[str, str]:
    """What the SageMaker platform and the PyTorch training image set before the toolkit starts; it sets SM_* itself."""
    environment = {
        "SAGEMAKER_BASE_DIR": str(opt_ml),
        "SAGEMAKER_TRAINING_MODULE": TOOLKIT_FRAMEWORK_MODULE,
        "TRAINING_JOB_NAME": spec.name,
        "TRAINING_JOB_ARN": ctx.arn("training-job", spec.name),
        "AWS_REGION": ctx.region,
    }
    if host_count == 1:
        environment["SM_STUDIO_LOCAL_MODE"] = "true"
    return environment


def _training_channels(ctx: JobContext, spec: TrainingSpec, opt_ml: Path, hosts: list[str], host: str) -> dict[str, Path]:
    channels = {}
    for channel in spec.arguments.get("InputDataConfig", []):
        name = channel["ChannelName"]
        source = s3_part(channel.get("DataSource", {}), "S3DataSource", f"training job {spec.name}, channel {name}")
        channels[name] = opt_ml / "input" / "data" / name
        download_input(ctx.s3, source, channels[name], hosts, host)
    return channels


def _unpack_sources(s3: LocalS3, uri: str, code_dir: Path) -> None:
    archive = s3.path(uri)
    if not archive.is_file():
        raise LocalRunError(f"sagemaker_submit_directory {uri} does not exist (local file {archive}); "
                            "the code asset is published before the run starts")
    code_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(code_dir, filter="data")


def _install_requirements(ctx: JobContext, host: HostProcess) -> None:
    """The toolkit installs requirements.txt; with no package index only what is installed already passes."""
    requirements = host.cwd / "requirements.txt"
    if requirements.is_file():
        run_hosts(ctx, [HostProcess(host.host, [ctx.python, "-m", "pip", "install", "--quiet", "-r", str(requirements)],
                                    host.environment, host.cwd, host.log, host.root)], 600)


def _toolkit_environment(ctx: JobContext, spec: TrainingSpec, decoded: Mapping[str, Any], opt_ml: Path,
                         channels: Mapping[str, Path], hosts: list[str], host: str, cpus: int) -> dict[str, str]:
    """The SM_* variables the SageMaker training toolkit sets for a framework script."""
    user = {name: value for name, value in decoded.items() if not name.startswith("sagemaker_")}
    program = str(decoded["sagemaker_program"])
    environment = {
        "TRAINING_JOB_NAME": spec.name,
        "TRAINING_JOB_ARN": ctx.arn("training-job", spec.name),
        "SM_MODEL_DIR": str(opt_ml / "model"),
        "SM_INPUT_DIR": str(opt_ml / "input"),
        "SM_INPUT_DATA_DIR": str(opt_ml / "input" / "data"),
        "SM_INPUT_CONFIG_DIR": str(opt_ml / "input" / "config"),
        "SM_OUTPUT_DIR": str(opt_ml / "output"),
        "SM_OUTPUT_DATA_DIR": str(opt_ml / "output" / "data"),
        "SM_OUTPUT_INTERMEDIATE_DIR": str(opt_ml / "output" / "intermediate"),
        "SM_CHANNELS": json.dumps(sorted(channels)),
        "SM_HOSTS": json.dumps(hosts),
        "SM_CURRENT_HOST": host,
        "SM_NUM_GPUS": "0",
        "SM_NUM_CPUS": str(cpus),
        "SM_HPS": json.dumps(user, sort_keys=True),
        "SM_USER_ARGS": json.dumps(user_arguments(decoded)),
        "SM_USER_ENTRY_POINT": program,
        "SM_MODULE_NAME": program[:-3] if program.endswith(".py") else program,
        "SM_MODULE_DIR": str(decoded["sagemaker_submit_directory"]),
        "SM_LOG_LEVEL": str(decoded.get("sagemaker_container_log_level", 20)),
        "SM_FRAMEWORK_MODULE": TOOLKIT_FRAMEWORK_MODULE,
        "SM_CURRENT_INSTANCE_TYPE": str((spec.arguments.get("ResourceConfig") or {}).get("InstanceType", "local")),
    }
    for name, folder in channels.items():
        environment[f"SM_CHANNEL_{_env_name(name)}"] = str(folder)
    for name, value in user.items():
        environment[f"SM_HP_{_env_name(name)}"] = value if isinstance(value, str) else json.dumps(value)
    environment["SM_TRAINING_ENV"] = json.dumps({
        "job_name": spec.name, "hosts": hosts, "current_host": host, "hyperparameters": user,
        "channel_input_dirs": {name: str(folder) for name, folder in channels.items()},
        "model_dir": environment["SM_MODEL_DIR"], "output_data_dir": environment["SM_OUTPUT_DATA_DIR"],
        "module_dir": environment["SM_MODULE_DIR"], "user_entry_point": program, "num_gpus": 0, "num_cpus": cpus,
        "network_interface_name": "lo",
    }, sort_keys=True)
    return environment


def _checkpoint_dirs(config: Mapping[str, Any] | None, root: Path) -> tuple[str, Path] | None:
    if not config or not config.get("S3Uri"):
        return None
    local = rewrite_opt_ml(config.get("LocalPath") or f"{OPT_ML}/checkpoints", root)
    return config["S3Uri"], Path(local)


def _prepare_checkpoints(s3: LocalS3, config: Mapping[str, Any] | None, root: Path) -> None:
    """SageMaker copies what is at CheckpointConfig.S3Uri into the checkpoint folder before the job starts."""
    dirs = _checkpoint_dirs(config, root)
    if dirs is None:
        return
    uri, local = dirs
    local.mkdir(parents=True, exist_ok=True)
    if s3.path(uri).is_dir() and any(s3.path(uri).iterdir()):
        s3.download(uri, local)


def _save_checkpoints(s3: LocalS3, config: Mapping[str, Any] | None, roots: list[Path]) -> None:
    for root in roots:
        dirs = _checkpoint_dirs(config, root)
        if dirs is not None and dirs[1].is_dir():
            s3.upload(dirs[1], dirs[0])


def _output_path(spec: TrainingSpec) -> str:
    output_path = str((spec.arguments.get("OutputDataConfig") or {}).get("S3OutputPath", "")).rstrip("/")
    if not output_path:
        raise LocalRunError(f"training job {spec.name}: OutputDataConfig.S3OutputPath is missing")
    return f"{output_path}/{spec.name}/output"


def _upload_model(s3: LocalS3, spec: TrainingSpec, model_dirs: list[Path]) -> str:
    """The hosts' model folders, merged (the first host's files win), as model.tar.gz."""
    uri = f"{_output_path(spec)}/model.tar.gz"
    write_tar(s3.path(uri), model_dirs)
    return uri


def _upload_output_data(s3: LocalS3, spec: TrainingSpec, data_dir: Path) -> None:
    """SageMaker packs /opt/ml/output/data of the first host as output.tar.gz beside the model."""
    if data_dir.is_dir() and any(data_dir.iterdir()):
        write_tar(s3.path(f"{_output_path(spec)}/output.tar.gz"), [data_dir])

"""What processing and training jobs share when they run as local processes under the SageMaker container contract.

Each instance ("host") of a job gets its own container root under the job's
folder; every ``/opt/ml`` path in the job's entrypoint, arguments and
environment is rewritten to ``<host root>/opt/ml``. Inputs are copied from
local S3 into the places SageMaker would download them to (``download_input``),
one process per host runs (``run_hosts``), and a host that fails gives the
job's FailureReason (``failure_reason``): the failure file the job left, else
its script's one-line error. ``processing_job`` and ``training_job`` build on this.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.files import replacing
from pipeline.local.errors import LocalRunError
from pipeline.local.s3 import LocalS3
from pipeline.progress import utc_now

OPT_ML = "/opt/ml"
_OPT_ML_PATH = re.compile(r"(?<![\w.-])/opt/ml(?=/|\b|$)")
FAILURE_REASON_LIMIT = 1024
LOG_TAIL_LINES = 6
KILL_GRACE_SECONDS = 10.0
POLL_SECONDS = 0.2
PASSED_THROUGH = ("HOME", "LANG", "LC_ALL", "TZ", "LD_LIBRARY_PATH", "PYTHONPATH", "TORCH_HOME", "XDG_CACHE_HOME")
SCRIPT_ERROR_LINE = re.compile(r"^[\w.-]+\.py: error: .+$", re.MULTILINE)


class JobFailed(LocalRunError):
    """A job ended without success; the message is its FailureReason."""


@dataclass
class JobContext:
    """What every job of one run shares."""

    s3: LocalS3
    jobs_dir: Path
    region: str
    account: str
    environment: dict[str, str]  # the base environment of every container process
    # The /opt/ml paths of the files a failing script leaves its one-line reason in (contract.py's
    # TRAINING_FAILURE_FILE, PROCESSING_FAILURE_FILE); when none has text, the reason comes from the log.
    failure_files: tuple[str, ...]
    python: str = field(default_factory=lambda: sys.executable)
    cpus_per_job: int = field(default_factory=lambda: os.cpu_count() or 1)  # the cores one job may use while others run
    processes: "ProcessRegistry" = field(default_factory=lambda: ProcessRegistry())

    def arn(self, kind: str, name: str) -> str:
        return f"arn:aws:sagemaker:{self.region}:{self.account}:{kind}/{name.lower()}"


@dataclass
class JobResult:
    properties: dict[str, Any]
    logs: list[Path]
    metrics: dict[str, list[float]] = field(default_factory=dict)
    model_artifact: Path | None = None
    runner: str = ""  # how a training job ran: TOOLKIT or LAUNCHER, and why


class ProcessRegistry:
    """The container processes now running, so that an interrupted run can stop them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self.stopping = threading.Event()

    def start(self, command: Sequence[str], **options: Any) -> subprocess.Popen:
        with self._lock:
            if self.stopping.is_set():
                raise JobFailed("the run is stopping; the job was not started")
            process = subprocess.Popen(command, start_new_session=True, **options)
            self._running.add(process)
            return process

    def forget(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._running.discard(process)

    def stop_all(self) -> None:
        self.stopping.set()
        with self._lock:
            running = list(self._running)
        stop_processes(running)


def stop_processes(processes: Sequence[subprocess.Popen]) -> None:
    """SIGTERM each process group, then SIGKILL what is left after a grace period."""
    for process in processes:
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()


def _signal_group(process: subprocess.Popen, number: int) -> None:
    try:
        os.killpg(process.pid, number)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- paths and environment

def rewrite_opt_ml(value: Any, root: Path) -> Any:
    """``value`` with every ``/opt/ml`` path inside its strings moved under ``root``."""
    if isinstance(value, str):
        return _OPT_ML_PATH.sub(lambda _: f"{root}{OPT_ML}", value)
    if isinstance(value, list):
        return [rewrite_opt_ml(item, root) for item in value]
    if isinstance(value, dict):
        return {key: rewrite_opt_ml(item, root) for key, item in value.items()}
    return value


def check_usable_root(path: Path) -> None:
    """Container scripts use /opt/ml paths unquoted in shell commands: the replacement must be as plain."""
    if not re.fullmatch(r"[A-Za-z0-9_./+-]+", str(path)):
        raise LocalRunError(f"the work dir {path} has spaces or shell characters in its path; "
                            "container scripts use /opt/ml paths unquoted: choose a plain path with --workdir")


def container_environment(python_dir: str, extra: Mapping[str, str]) -> dict[str, str]:
    """The environment every container process starts from: this interpreter first on PATH, nothing of AWS but ``extra``."""
    environment = {name: os.environ[name] for name in PASSED_THROUGH if name in os.environ}
    environment.update({
        "PATH": os.pathsep.join([python_dir, os.environ.get("PATH", "/usr/bin:/bin")]),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PIP_NO_INDEX": "1",  # a requirements.txt may only name what is installed: nothing is downloaded
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    })
    environment.update(extra)
    return environment


def thread_limits(threads: int) -> dict[str, str]:
    """Cap the math libraries' threads: processes that share the cores must not spin against each other."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def timestamp(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


# ---------------------------------------------------------------- running hosts

@dataclass
class HostProcess:
    host: str
    command: list[str]
    environment: dict[str, str]
    cwd: Path
    log: Path
    root: Path  # the host's container root, holding opt/ml


def run_hosts(ctx: JobContext, hosts: list[HostProcess], max_seconds: float | None) -> None:
    """Start one process per host and wait for all; raise JobFailed when one fails (the others are stopped)."""
    started: list[tuple[HostProcess, subprocess.Popen]] = []
    handles = []
    try:
        for host in hosts:
            host.log.parent.mkdir(parents=True, exist_ok=True)
            handle = open(host.log, "ab")
            handles.append(handle)
            handle.write(f"{timestamp(utc_now())} local-run: {host.host} starts {' '.join(host.command)}\n".encode())
            handle.flush()
            process = ctx.processes.start(host.command, cwd=host.cwd, env=host.environment,
                                          stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            started.append((host, process))
        _wait_for_hosts(ctx, started, max_seconds)
    finally:
        stop_processes([process for _, process in started])
        for (host, process), handle in zip(started, handles):
            ctx.processes.forget(process)
            handle.write(f"{timestamp(utc_now())} local-run: {host.host} exited with status {process.returncode}\n".encode())
        for handle in handles:
            handle.close()


def _wait_for_hosts(ctx: JobContext, started: list[tuple[HostProcess, subprocess.Popen]], max_seconds: float | None) -> None:
    deadline = time.monotonic() + max_seconds if max_seconds else None
    while True:
        codes = [(host, process.poll()) for host, process in started]
        failed = [(host, code) for host, code in codes if code not in (None, 0)]
        if failed:
            host, code = failed[0]
            raise JobFailed(failure_reason(host, code, ctx.failure_files))
        if all(code == 0 for _, code in codes):
            return
        if ctx.processes.stopping.is_set():
            raise JobFailed("Stopped: the run was interrupted")
        if deadline is not None and time.monotonic() > deadline:
            raise JobFailed(f"MaxRuntimeExceeded: the job ran longer than its StoppingCondition ({max_seconds:.0f} s)")
        time.sleep(POLL_SECONDS)


def _log_text(path: Path) -> str:
    """A job log's text; empty when it cannot be read."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def log_tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def script_error_line(text: str) -> str:
    """The last ``<script>.py: error: ...`` line of a log's text: the one-line error every container script ends with."""
    lines = SCRIPT_ERROR_LINE.findall(text)
    return lines[-1].strip() if lines else ""


def failure_file_text(host: HostProcess, failure_files: Sequence[str]) -> str:
    """The text of the first of ``failure_files`` the host left with text ('' when none has).

    Training scripts and the training toolkit write the training failure file (under SAGEMAKER_BASE_DIR),
    a processing script or its bootstrap the processing one; a script that died before writing leaves
    its error line in the log.
    """
    for path in failure_files:
        written = Path(rewrite_opt_ml(path, host.root))
        if written.is_file():
            text = written.read_text(errors="replace").strip()
            if text:
                return text
    return ""


def failure_reason(host: HostProcess, code: int, failure_files: Sequence[str]) -> str:
    """``AlgorithmError: <what the job left>``, as DescribeTrainingJob's FailureReason reads: the first of its
    ``failure_files`` with text, else the script's error line, else how the host ended and its log's tail."""
    written = failure_file_text(host, failure_files)
    log = "" if written else _log_text(host.log)  # read once, only when no failure file says why
    written = written or script_error_line(log)
    if written:
        text = f"AlgorithmError: {written}"
    else:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        tail = log_tail(log)
        text = f"AlgorithmError: {host.host} {how} (log {host.log})" + (f": {tail}" if tail else "")
    return text if len(text) <= FAILURE_REASON_LIMIT else text[: FAILURE_REASON_LIMIT - 3] + "..."


def host_names(count: int) -> list[str]:
    if not isinstance(count, int) or count < 1:
        raise LocalRunError(f"InstanceCount must be a whole number of 1 or more, got {count!r}")
    return [f"algo-{index}" for index in range(1, count + 1)]


def s3_part(item: Mapping[str, Any], key: str, what: str) -> Mapping[str, Any]:
    """``item[key]`` (an S3Input, S3Output or S3DataSource): the only kind of input and output local-run has."""
    part = item.get(key)
    if part is None:
        raise LocalRunError(f"{what}: only {key} is supported by local-run")
    return part


def download_input(s3: LocalS3, source: Mapping[str, Any], destination: Path, hosts: list[str], host: str) -> None:
    """An S3 input (a processing S3Input, a channel's S3DataSource) where SageMaker puts it for ``host``:
    all of it, or with ShardedByS3Key on several hosts every ``len(hosts)``-th object, in key order."""
    if source.get("S3DataDistributionType") != "ShardedByS3Key" or len(hosts) == 1:
        s3.download(source["S3Uri"], destination)
        return
    root = s3.path(source["S3Uri"])
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    destination.mkdir(parents=True, exist_ok=True)
    for file in files[hosts.index(host)::len(hosts)]:
        target = destination / (file.relative_to(root) if root.is_dir() else file.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target)


def write_tar(target: Path, folders: Sequence[Path]) -> None:
    """The files under ``folders`` as one gzipped tarball at ``target``, written whole or not at all;
    a path in more than one folder comes from the first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    added: set[str] = set()
    with replacing(target) as temporary, tarfile.open(temporary, "w:gz", compresslevel=1) as tar:
        for folder in folders:
            for file in sorted(folder.rglob("*")):
                relative = file.relative_to(folder).as_posix()
                if file.is_file() and relative not in added:
                    tar.add(file, arcname=relative)
                    added.add(relative)

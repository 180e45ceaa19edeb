"""Run a pipeline definition on this machine: its steps in threads, as the schedule allows, and the state of each.

The schedule (``schedule``: SageMaker's rules, with no I/O) says which steps
are ready; they run at the same time up to ``parallel`` at once. A step's
arguments are resolved when it starts, and its runner (``runners``, one per
step type) does the work against the services of ``environment``. A condition
step decides which of its branches runs; steps of the other branch, and steps
that depend on them, are skipped. When a step fails (a Fail step included) no
further step starts, the running ones finish, and the run ends Failed naming
every failed step, as on SageMaker. Retry policies are not applied and step
caching is off: every step runs.
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import sys
import threading
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

from pipeline.assets import Assets
from pipeline.dag import DefinitionError, StepNode, render
from pipeline.files import write_atomically
from pipeline.local.environment import LocalServices, job_context, lambda_functions, local_services
from pipeline.local.errors import LocalRunError
from pipeline.local.jobs import check_usable_root
from pipeline.local.lambdas import routed_stdout
from pipeline.local.references import Resolver, Scope, UnresolvableReference
from pipeline.local.results import ConditionResult, Manifest, ProcessingResult
from pipeline.local.runners import RUNNERS, StepContext
from pipeline.local.s3 import LocalS3
from pipeline.local.schedule import NeverRun, Schedule
from pipeline.local.state import RunOptions, StepFailure, StepState
from pipeline.progress import ProgressView, StepRow, utc_now
from pipeline.settings import Settings
from pipeline.status import Status
from pipeline.validate import check_references

SUPPORTED_TYPES = tuple(RUNNERS)
REFRESH_SECONDS = 0.5


@dataclass
class RunResult:
    execution_id: str
    pipeline_name: str
    workdir: Path
    status: Status
    failure_reason: str
    started: datetime
    ended: datetime
    steps: dict[str, StepState]
    scope: Scope
    invocations: list[dict[str, Any]] = field(default_factory=list)  # the endpoints' data plane's, in order

    @property
    def succeeded(self) -> bool:
        return self.status == Status.SUCCEEDED

    @property
    def manifest(self) -> Manifest | None:
        """The data manifest a processing step found, the last in the steps' order."""
        found = [state.result.manifest for state in self.steps.values()
                 if isinstance(state.result, ProcessingResult) and state.result.manifest]
        return found[-1] if found else None

    def properties(self, step: str) -> Any:
        return self.scope.properties.get(step)


def new_execution_id(moment: datetime | None = None) -> str:
    moment = moment or utc_now()
    return f"local-{moment:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def typed_parameters(document: dict, overrides: dict[str, Any]) -> dict[str, Any]:
    """Every parameter's value for this run: its default, or the override."""
    values = {}
    for parameter in document.get("Parameters", []):
        name = parameter["Name"]
        if name in overrides:
            values[name] = overrides[name]
        elif "DefaultValue" in parameter:
            values[name] = parameter["DefaultValue"]
        else:
            raise LocalRunError(f"parameter {name} has no default value; give one with --param {name}=VALUE")
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise LocalRunError(f"unknown parameter(s) {', '.join(unknown)}; the definition has {', '.join(sorted(values))}")
    return values


def static_check(document: dict) -> dict[str, StepNode]:
    """The steps, once every reference has been checked against what SageMaker would accept."""

    try:
        nodes = check_references(document)
    except DefinitionError as error:
        raise UnresolvableReference(str(error)) from None
    for node in nodes.values():
        if node.type not in SUPPORTED_TYPES:
            raise LocalRunError(f"step {node.name}: local-run cannot run a {node.type} step (it runs {', '.join(SUPPORTED_TYPES)})")
    return nodes


class LocalRun:
    """One execution of a definition in a work dir: ``prepare`` it once, then ``execute`` it."""

    def __init__(self, document: dict, settings: Settings, assets: Assets, workdir: Path, contract: ModuleType,
                 options: RunOptions | None = None, execution_id: str | None = None) -> None:
        self.document = document
        self.settings = settings
        self.assets = assets
        self.contract = contract
        self.options = options or RunOptions()
        self.workdir = Path(workdir).resolve()
        check_usable_root(self.workdir)
        self.nodes = static_check(document)
        self.schedule = Schedule(self.nodes)
        self.started = utc_now()
        self.execution_id = execution_id or new_execution_id(self.started)
        self.parameters = typed_parameters(document, self.options.parameters)
        self.s3 = LocalS3(self.workdir / "s3")
        self.scope = Scope(parameters=self.parameters, execution=self._execution_variables())
        self.states = {name: StepState.pending(self.nodes[name]) for name in self.schedule.order}
        self.prepared = False
        self._lock = threading.Lock()
        self.ctx: StepContext | None = None

    def _execution_variables(self) -> dict[str, str]:
        name = self.settings.pipeline_name
        arn = f"arn:aws:sagemaker:{self.settings.region}:{self.settings.account}:pipeline/{name}"
        moment = self.started.isoformat(timespec="seconds")
        return {
            "PipelineExecutionId": self.execution_id,
            "PipelineExecutionArn": f"{arn}/execution/{self.execution_id}",
            "PipelineName": name,
            "PipelineArn": arn,
            "PipelineExecutionDisplayName": self.execution_id,
            "StartDateTime": moment,
            "CurrentDateTime": moment,
        }

    def prepare(self) -> None:
        """Create the work dir, write the definition run, and publish the assets to local S3."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_atomically(self.workdir / "definition.json", render(self.document))
        for asset in self.assets:
            self.s3.put(asset.s3_uri, asset.data)
        self.prepared = True

    def execute(self) -> RunResult:
        """Run every step of the prepared work dir; returns the result, also when a step failed."""
        if not self.prepared:
            raise LocalRunError(f"the work dir {self.workdir} is not prepared: call prepare() before execute()")
        output = self.options.output or sys.stdout
        view = ProgressView(f"{self.settings.pipeline_name} {self.execution_id} (local)", plain=self.options.plain, file=output)
        with local_services(self.settings.region, self.s3, self.workdir) as services, terminate_as_interrupt(), view, \
                routed_stdout() as router:
            self.ctx = self._step_context(services, router)
            status, reason = self._run_steps(view)
        return RunResult(self.execution_id, self.settings.pipeline_name, self.workdir, status, reason, self.started,
                         utc_now(), self.states, self.scope, list(services.runtime.invocations))

    def _step_context(self, services: LocalServices, router: Any) -> StepContext:
        return StepContext(
            settings=self.settings, scope=self.scope, s3=self.s3,
            jobs=job_context(self.settings, self.s3, self.workdir, services, self.contract, self.options.parallel),
            sagemaker=services.sagemaker, sqs=services.sqs, callbacks=services.moto.callbacks,
            functions=lambda_functions(self.settings, self.assets.lambdas.data, self.workdir),
            runtime=services.runtime, router=router, workdir=self.workdir, execution_id=self.execution_id,
            manifest_file=self.contract.MANIFEST_FILE, model_info_file=self.contract.MODEL_INFO_FILE,
            options=self.options, lock=self._lock,
        )

    def _rows(self) -> list[StepRow]:
        return [self.states[name].table_row() for name in self.schedule.order]

    def _run_steps(self, view: ProgressView) -> tuple[Status, str]:
        """Start what the schedule says is ready, up to ``parallel`` at once, and tell it how each step ended."""
        running: dict[Future, str] = {}
        view.update(self._rows(), status=Status.EXECUTING)
        pool = ThreadPoolExecutor(max_workers=max(1, self.options.parallel), thread_name_prefix="step")
        try:
            while True:
                for name in self.schedule.ready()[: max(0, self.options.parallel - len(running))]:
                    self.schedule.start(name)
                    self.states[name].start()
                    running[pool.submit(self._run_step, name)] = name
                if not running:
                    break
                done, _ = wait(list(running), timeout=REFRESH_SECONDS, return_when=FIRST_COMPLETED)
                for future in done:
                    self._ended(running.pop(future), *future.result())
                self._refresh_notes()
                view.update(self._rows())
        except KeyboardInterrupt:
            self.ctx.jobs.processes.stop_all()
            for future in running:
                future.cancel()
            wait(list(running), timeout=30)
            stopped, never_run = self.schedule.interrupt()
            for name in stopped:
                self._finish(name, Status.STOPPED, reason="the run was interrupted")
            self._never_run(never_run)
            view.update(self._rows(), status=Status.STOPPED)
            raise
        finally:
            pool.shutdown(wait=True)
        ending = self.schedule.end()
        self._never_run(ending.never_run)
        view.update(self._rows(), status=ending.status)
        return ending.status, ending.reason

    def _ended(self, name: str, status: Status, reason: str) -> None:
        """Step ``name`` ended: its row, its properties' absence when it failed, and the schedule."""
        if status == Status.FAILED:
            self._finish(name, status, reason=reason)
            self.schedule.fail(name, reason)
            return
        result = self.states[name].result
        self._finish(name, status, note=result.note)
        self._never_run(self.schedule.succeed(name, result.outcome if isinstance(result, ConditionResult) else None))

    def _never_run(self, changes: list[NeverRun]) -> None:
        for change in changes:
            self.states[change.step].never_run(change.status, change.reason)
            why = f"skipped: {change.reason}" if change.status == Status.SKIPPED else change.reason
            self.scope.mark_not_run(change.step, why)

    def _finish(self, name: str, status: Status, reason: str = "", note: str | None = None) -> None:
        state = self.states[name]
        state.finish(status, reason)
        if note is not None:
            state.note = note
        if status != Status.SUCCEEDED:
            self.scope.mark_not_run(name, f"it ended {status}")

    def _run_step(self, name: str) -> tuple[Status, str]:
        """Run the step (in a thread of the pool); returns how it ended and why it failed. Its result is in its state."""
        state = self.states[name]
        try:
            state.result = RUNNERS[state.node.type](state, Resolver(self.scope, name), self.ctx)
        except StepFailure as error:  # what the step found out before it failed stays for the summary
            state.result = error.result
            return Status.FAILED, str(error)
        except LocalRunError as error:  # JobFailed, an unresolvable reference...
            return Status.FAILED, str(error)
        except Exception as error:  # a defect of local-run itself: keep the traceback
            self._write_traceback(name)
            return Status.FAILED, f"local-run error: {type(error).__name__}: {error} (traceback in {self.workdir / 'run.log'})"
        return Status.SUCCEEDED, ""

    def _write_traceback(self, step: str) -> None:
        with self._lock, open(self.workdir / "run.log", "a") as log:
            log.write(f"step {step}:\n{traceback.format_exc()}\n")

    def _refresh_notes(self) -> None:
        """A running training step's note is the last metric line of its log."""
        for state in self.states.values():
            if state.status == Status.EXECUTING and state.node.type == "Training" and state.logs:
                line = last_matching_line(state.logs[0], state.metric_patterns)
                if line:
                    state.note = line


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the run like Ctrl-C does, so that the job processes are stopped too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def last_matching_line(log: Path, patterns: list[str], window: int = 8192) -> str:
    """The last line of ``log`` that one of ``patterns`` matches, from its last ``window`` bytes."""

    try:
        with open(log, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - window))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    compiled = [re.compile(pattern) for pattern in patterns]
    for line in reversed(text.splitlines()):
        if any(pattern.search(line) for pattern in compiled):
            return line.strip()[:100]
    return ""

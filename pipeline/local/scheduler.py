"""Run a pipeline definition on this machine: which step runs when, and the state of each.

Steps run in dependency order (``pipeline.dag``), independent ready steps at
the same time up to ``parallel`` at once. A step's arguments are resolved when
it starts, and its runner (``runners``, one per step type) does the work. A
condition step decides which of its branches runs; steps of the other branch,
and steps that depend on them, are skipped. When a step fails (a Fail step
included) no further step starts, the running ones finish, and the run ends
Failed naming every failed step: SageMaker does the same ("When a Fail step and
other pipeline steps execute at the same time, the pipeline does not terminate
until all concurrent steps are completed"). Retry policies are not applied and
step caching is off: every step runs.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import sys
import threading
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

from pipeline.assets import Assets
from pipeline.dag import DefinitionError, StepNode, topological_order
from pipeline.local import aws
from pipeline.local.errors import LocalRunError
from pipeline.local.jobs import JobContext, check_usable_root, container_environment
from pipeline.local.lambdas import LambdaFunctions, routed_stdout
from pipeline.local.references import Resolver, Scope, UnresolvableReference
from pipeline.local.runners import RUNNERS, WAIT_FUNCTION, StepContext
from pipeline.local.runtime import RuntimeServer
from pipeline.local.s3 import LocalS3
from pipeline.local.state import EXECUTING, FAILED, NOT_RUN, SKIPPED, STOPPED, SUCCEEDED, RunOptions, StepState
from pipeline.progress import PENDING, ProgressView, StepRow, utc_now
from pipeline.settings import Settings
from pipeline.validate import check_references

SUPPORTED_TYPES = tuple(RUNNERS)
# Locally the wait function looks every second or two instead of SageMaker-scale intervals.
WAIT_FUNCTION_ENVIRONMENT = {"INITIAL_POLL_SECONDS": "1", "MAX_POLL_SECONDS": "2"}
REFRESH_SECONDS = 0.5
LOG = logging.getLogger("dogbreed.local")


@dataclass
class RunResult:
    execution_id: str
    pipeline_name: str
    workdir: Path
    status: str
    failure_reason: str
    started: datetime
    ended: datetime
    steps: dict[str, StepState]
    scope: Scope
    facts: dict[str, Any]

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED

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
        self.order = topological_order(self.nodes)
        self.started = utc_now()
        self.execution_id = execution_id or new_execution_id(self.started)
        self.parameters = typed_parameters(document, self.options.parameters)
        self.s3 = LocalS3(self.workdir / "s3")
        self.scope = Scope(parameters=self.parameters, execution=self._execution_variables())
        self.states = {name: StepState.pending(self.nodes[name]) for name in self.order}
        self.facts: dict[str, Any] = {}
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
        (self.workdir / "definition.json").write_text(json.dumps(self.document, indent=2, sort_keys=True) + "\n")
        for asset in self.assets:
            self.s3.put(asset.s3_uri, asset.data)
        self.prepared = True

    def execute(self) -> RunResult:
        """Run every step of the prepared work dir; returns the result, also when a step failed."""
        if not self.prepared:
            raise LocalRunError(f"the work dir {self.workdir} is not prepared: call prepare() before execute()")
        output = self.options.output or sys.stdout
        view = ProgressView(f"{self.settings.pipeline_name} {self.execution_id} (local)", plain=self.options.plain, file=output)
        with aws.EmbeddedMoto() as moto:
            sagemaker = aws.client("sagemaker", moto.url, self.settings.region)
            with RuntimeServer(sagemaker, self.s3, self.workdir / "endpoints", self.workdir / "endpoints" / "invocations.log") as runtime:
                environment = aws.run_environment(self.settings.region, moto.url, runtime.url, str(self.workdir))
                with aws.aws_environment(environment), terminate_as_interrupt(), view, routed_stdout() as router:
                    self.ctx = self._step_context(moto, sagemaker, runtime, environment, router)
                    status, reason = self._schedule(view)
                self.facts["invocations"] = list(runtime.invocations)
        return RunResult(self.execution_id, self.settings.pipeline_name, self.workdir, status, reason, self.started,
                         utc_now(), self.states, self.scope, self.facts)

    def _step_context(self, moto: aws.EmbeddedMoto, sagemaker: Any, runtime: RuntimeServer,
                      environment: dict[str, str], router: Any) -> StepContext:
        jobs = JobContext(self.s3, self.workdir / "jobs", self.settings.region, self.settings.account,
                          container_environment(os.path.dirname(sys.executable), environment),
                          failure_files=(self.contract.TRAINING_FAILURE_FILE, self.contract.PROCESSING_FAILURE_FILE),
                          cpus_per_job=max(1, (os.cpu_count() or 1) // max(1, self.options.parallel)))
        wait_function = self.settings.lambda_function_name(WAIT_FUNCTION)
        functions = LambdaFunctions(self.settings, self.assets.lambdas.data, self.workdir / "lambda",
                                    lambda name: WAIT_FUNCTION_ENVIRONMENT if name == wait_function else {})
        return StepContext(
            settings=self.settings, scope=self.scope, s3=self.s3, jobs=jobs, sagemaker=sagemaker,
            sqs=aws.client("sqs", moto.url, self.settings.region), callbacks=moto.callbacks, functions=functions,
            runtime=runtime, router=router, workdir=self.workdir, execution_id=self.execution_id,
            manifest_file=self.contract.MANIFEST_FILE, model_info_file=self.contract.MODEL_INFO_FILE, options=self.options, facts=self.facts, lock=self._lock,
        )

    def _rows(self) -> list[StepRow]:
        return [self.states[name].table_row() for name in self.order]

    def _schedule(self, view: ProgressView) -> tuple[str, str]:
        running: dict[Future, str] = {}
        failures: list[str] = []
        view.update(self._rows(), status=EXECUTING)
        pool = ThreadPoolExecutor(max_workers=max(1, self.options.parallel), thread_name_prefix="step")
        try:
            while True:
                self._skip_unreachable()
                if not failures:
                    for name in self._ready(exclude=set(running.values())):
                        if len(running) >= self.options.parallel:
                            break
                        self.states[name].start()
                        running[pool.submit(self._run_step, name)] = name
                if not running:
                    break
                done, _ = wait(list(running), timeout=REFRESH_SECONDS, return_when=FIRST_COMPLETED)
                for future in done:
                    name = running.pop(future)
                    if self.states[name].status == FAILED:
                        failures.append(name)
                self._refresh_notes()
                view.update(self._rows())
        except KeyboardInterrupt:
            self.ctx.jobs.processes.stop_all()
            for future in running:
                future.cancel()
            wait(list(running), timeout=30)
            for name in running.values():
                self._finish(name, STOPPED, reason="the run was interrupted")
            self._mark_not_run("the run was interrupted")
            view.update(self._rows(), status=STOPPED)
            raise
        finally:
            pool.shutdown(wait=True)
        if failures:
            self._mark_not_run(f"the run failed at {failures[0]}")
            status, reason = FAILED, "; ".join(f"step {name} failed: {self.states[name].reason}" for name in failures)
        else:
            self._mark_not_run("its dependencies did not run")
            status, reason = SUCCEEDED, ""
        view.update(self._rows(), status=status)
        return status, reason

    def _ready(self, exclude: set[str]) -> list[str]:
        ready = []
        for name in self.order:
            state = self.states[name]
            if state.status != PENDING or name in exclude:
                continue
            if all(self.states[dep].status == SUCCEEDED for dep in state.node.depends_on) and self._branch_taken(state.node):
                ready.append(name)
        return ready

    def _branch_taken(self, node: StepNode) -> bool:
        if node.branch_of is None:
            return True
        condition, branch = node.branch_of
        outcome = self.scope.properties.get(condition, {}).get("Outcome")
        return outcome is (branch == "if")

    def _skip_unreachable(self) -> None:
        """Pending steps on the untaken side of a condition, or after a skipped step, will never run."""
        changed = True
        while changed:
            changed = False
            for name in self.order:
                state = self.states[name]
                if state.status != PENDING:
                    continue
                why = ""
                if state.node.branch_of and self.states[state.node.branch_of[0]].status == SUCCEEDED and not self._branch_taken(state.node):
                    condition, branch = state.node.branch_of
                    why = f"{condition} chose the {'else' if branch == 'if' else 'if'} branch"
                else:
                    skipped = sorted(dep for dep in state.node.depends_on if self.states[dep].status == SKIPPED)
                    if skipped:
                        why = f"{skipped[0]} was skipped"
                if why:
                    state.never_run(SKIPPED, why)
                    self.scope.mark_not_run(name, f"skipped: {why}")
                    changed = True

    def _mark_not_run(self, why: str) -> None:
        for state in self.states.values():
            if state.status == PENDING:
                state.never_run(NOT_RUN, why)
                self.scope.mark_not_run(state.name, why)

    def _finish(self, name: str, status: str, reason: str = "", note: str | None = None) -> None:
        state = self.states[name]
        state.finish(status, reason)
        if note is not None:
            state.note = note
        if status != SUCCEEDED:
            self.scope.mark_not_run(name, f"it ended {status}")

    def _run_step(self, name: str) -> None:
        state = self.states[name]
        try:
            note = RUNNERS[state.node.type](state, Resolver(self.scope, name), self.ctx)
        except LocalRunError as error:  # StepFailure, JobFailed, an unresolvable reference...
            self._finish(name, FAILED, reason=str(error))
        except Exception as error:  # a defect of local-run itself: keep the traceback
            self._write_traceback(name)
            self._finish(name, FAILED, reason=f"local-run error: {type(error).__name__}: {error} (traceback in {self.workdir / 'run.log'})")
        else:
            self._finish(name, SUCCEEDED, note=note)

    def _write_traceback(self, step: str) -> None:
        with self._lock, open(self.workdir / "run.log", "a") as log:
            log.write(f"step {step}:\n{traceback.format_exc()}\n")

    def _refresh_notes(self) -> None:
        """A running training step's note is the last metric line of its log."""
        for state in self.states.values():
            if state.status == EXECUTING and state.node.type == "Training" and state.logs:
                line = last_matching_line(state.logs[0], state.details.get("metric_patterns", []))
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

"""Run a pipeline definition on this machine: scheduling, step state, and what each step type does.

Steps run in dependency order (``pipeline.dag``), independent ready steps at
the same time up to ``parallel`` at once. A step's arguments are resolved when
it starts; its properties, shaped like its Describe* API's answer, are what
later steps' references read. A condition step decides which of its branches
runs; steps of the other branch, and steps that depend on them, are skipped.
When a step fails (a Fail step included) no further step starts, the running
ones finish, and the run ends Failed naming every failed step: SageMaker does
the same ("When a Fail step and other pipeline steps execute at the same time,
the pipeline does not terminate until all concurrent steps are completed").

Local stand-ins: S3 is a folder, jobs are processes (``containers``), tuning
is a few seeded random trials (``tuning``), the model registry and the
endpoints' control plane are an embedded moto server, Lambda functions are
the project's handlers called in this process (``lambdas``), and the
endpoints' data plane is a local server (``endpoint``). A Callback step sends
SageMaker's message to its queue in moto's SQS, and the project's wait-endpoint
function receives it as Lambda's SQS event source mapping would deliver it,
until it answers the token (``callbacks``). Retry policies are not applied and
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
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from pipeline.assets import Assets
from pipeline.dag import DefinitionError, StepNode, topological_order
from pipeline.local import aws
from pipeline.local.callbacks import callback_message, deliver
from pipeline.local.conditions import evaluate_all
from pipeline.local.jobs import JobContext, JobFailed, check_usable_root, container_environment
from pipeline.local.processing_job import run_processing_job
from pipeline.local.runtime import RuntimeServer
from pipeline.local.training_job import TrainingSpec, run_training_job
from pipeline.local.lambdas import LambdaFunctions, ThreadOutput, output_parameters, register_model_package, routed_stdout
from pipeline.local.errors import LocalRunError
from pipeline.local.references import PropertyFile, Resolver, Scope, UnresolvableReference, as_text
from pipeline.local.s3 import LocalS3
from pipeline.local.tuning import Trial, run_tuning_job
from pipeline.progress import PENDING, ProgressView, StepRow, utc_now
from pipeline.settings import Settings
from pipeline.validate import check_references

SUCCEEDED, FAILED, EXECUTING, STOPPED = "Succeeded", "Failed", "Executing", "Stopped"
SKIPPED, NOT_RUN = "Skipped", "Not run"
SUPPORTED_TYPES = ("Processing", "Training", "Tuning", "RegisterModel", "Lambda", "Callback", "Condition", "Fail")
WAIT_FUNCTION = "wait-endpoint"  # the function the endpoint-wait queue triggers (infra/template.yaml)
# Locally the wait function looks every second or two instead of SageMaker-scale intervals.
WAIT_FUNCTION_ENVIRONMENT = {"INITIAL_POLL_SECONDS": "1", "MAX_POLL_SECONDS": "2"}
CALLBACK_GRACE_SECONDS = 120  # beyond the step's max_wait_minutes, before local-run gives up on an unanswered token
REFRESH_SECONDS = 0.5
NOTE_WIDTH = 90  # a step's remark in the table; the summary has it whole
LOG = logging.getLogger("dogbreed.local")


class StepFailure(LocalRunError):
    """A step ended Failed; the message is its FailureReason."""


@dataclass
class RunOptions:
    parameters: dict[str, Any] = field(default_factory=dict)  # typed values that replace the defaults
    max_tuning_jobs: int | None = None
    parallel: int = 2
    plain: bool | None = None
    seed: int = 0
    output: TextIO | None = None
    endpoint_delay_seconds: float = 0.0  # an endpoint a Deploy step creates or updates stays Creating/Updating this long


@dataclass
class StepState:
    node: StepNode
    status: str = PENDING
    started: datetime | None = None
    ended: datetime | None = None
    reason: str = ""
    note: str = ""  # a short live or final remark shown in the table
    job_name: str = ""
    logs: list[Path] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def seconds(self) -> float | None:
        return self.row().seconds(utc_now())

    def row(self) -> StepRow:
        note = self.note if len(self.note) <= NOTE_WIDTH else self.note[: NOTE_WIDTH - 3] + "..."
        return StepRow(self.name, self.status, self.started, self.ended, self.reason or note)


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
    """One execution of a definition in a work dir."""

    def __init__(self, document: dict, settings: Settings, assets: Assets, workdir: Path,
                 options: RunOptions | None = None, execution_id: str | None = None) -> None:
        self.document = document
        self.settings = settings
        self.assets = assets
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
        self.states = {name: StepState(self.nodes[name]) for name in self.order}
        self.facts: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._router: ThreadOutput | None = None
        self.ctx: JobContext | None = None
        self.sagemaker: Any = None
        self.sqs: Any = None
        self.moto: aws.EmbeddedMoto | None = None
        self.functions: LambdaFunctions | None = None
        self.runtime: RuntimeServer | None = None

    # ------------------------------------------------------------ set-up

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

    def job_name(self, step: str) -> str:
        return f"{self.execution_id}-{step}"[:63]

    # ------------------------------------------------------------ the run

    def execute(self) -> RunResult:
        """Run every step; returns the result, also when a step failed."""
        self.prepare()
        output = self.options.output or sys.stdout
        view = ProgressView(f"{self.settings.pipeline_name} {self.execution_id} (local)", plain=self.options.plain, file=output)
        with aws.EmbeddedMoto() as moto:
            self.moto = moto
            self.sqs = aws.client("sqs", moto.url, self.settings.region)
            self.sagemaker = aws.client("sagemaker", moto.url, self.settings.region)
            with RuntimeServer(self.sagemaker, self.s3, self.workdir / "endpoints", self.workdir / "endpoints" / "invocations.log") as runtime:
                self.runtime = runtime
                environment = aws.run_environment(self.settings.region, moto.url, runtime.url, str(self.workdir))
                self.ctx = JobContext(self.s3, self.workdir / "jobs", self.settings.region, self.settings.account,
                                      container_environment(os.path.dirname(sys.executable), environment),
                                      cpus_per_job=max(1, (os.cpu_count() or 1) // max(1, self.options.parallel)))
                wait_function = self.settings.lambda_function_name(WAIT_FUNCTION)
                self.functions = LambdaFunctions(self.settings, self.assets.lambdas.data, self.workdir / "lambda",
                                                 lambda name: WAIT_FUNCTION_ENVIRONMENT if name == wait_function else {})
                with aws.aws_environment(environment), terminate_as_interrupt(), view, \
                        routed_stdout() as router:
                    self._router = router
                    status, reason = self._schedule(view)
                self.facts["invocations"] = list(runtime.invocations)
        return RunResult(self.execution_id, self.settings.pipeline_name, self.workdir, status, reason, self.started,
                         utc_now(), self.states, self.scope, self.facts)

    def _rows(self) -> list[StepRow]:
        return [self.states[name].row() for name in self.order]

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
                        self._start(name)
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
            self.ctx.processes.stop_all()
            for future, name in running.items():
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
            first = self.states[failures[0]]
            self._mark_not_run(f"the run failed at {first.name}")
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
                    state.status, state.reason = SKIPPED, why
                    self.scope.mark_not_run(name, f"skipped: {why}")
                    changed = True

    def _mark_not_run(self, why: str) -> None:
        for state in self.states.values():
            if state.status == PENDING:
                state.status, state.reason = NOT_RUN, why
                self.scope.mark_not_run(state.name, why)

    def _start(self, name: str) -> None:
        state = self.states[name]
        state.status, state.started = EXECUTING, utc_now()

    def _finish(self, name: str, status: str, reason: str = "", note: str | None = None) -> None:
        state = self.states[name]
        state.status, state.ended, state.reason = status, utc_now(), reason
        if note is not None:
            state.note = note
        if status != SUCCEEDED:
            self.scope.mark_not_run(name, f"it ended {status}")

    def _run_step(self, name: str) -> None:
        state = self.states[name]
        try:
            note = self._dispatch(state)
        except (StepFailure, JobFailed, LocalRunError) as error:
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
        for state in self.states.values():
            if state.status == EXECUTING and state.node.type == "Training" and state.logs:
                patterns = state.details.get("metric_patterns", [])
                line = last_matching_line(state.logs[0], patterns)
                if line:
                    state.note = line

    # ------------------------------------------------------------ step types

    def _dispatch(self, state: StepState) -> str:
        handler: Callable[[StepState, Resolver], str] = {
            "Processing": self._processing,
            "Training": self._training,
            "Tuning": self._tuning,
            "RegisterModel": self._register,
            "Lambda": self._lambda,
            "Condition": self._condition,
            "Callback": self._callback,
            "Fail": self._fail,
        }[state.node.type]
        return handler(state, Resolver(self.scope, state.name))

    def _processing(self, state: StepState, resolver: Resolver) -> str:
        arguments = resolver.resolve(state.node.document["Arguments"])
        state.job_name = self.job_name(state.name)
        state.logs = [self.ctx.jobs_dir / state.job_name / "logs" / "algo-1.log"]
        result = run_processing_job(self.ctx, state.job_name, arguments)
        state.logs = result.logs
        self.scope.set_properties(state.name, result.properties)
        outputs = {item["OutputName"]: item["S3Output"]["S3Uri"]
                   for item in arguments.get("ProcessingOutputConfig", {}).get("Outputs", [])}
        state.details["outputs"] = {name: str(self.s3.path(uri)) for name, uri in outputs.items()}
        for item in state.node.document.get("PropertyFiles", []):
            self.scope.add_property_file(self._property_file(state.name, item, outputs))
        self._note_manifest(state, outputs)
        return ""

    def _property_file(self, step: str, item: dict, outputs: dict[str, str]) -> PropertyFile:
        name, output, path = item["PropertyFileName"], item["OutputName"], item["FilePath"]
        if output not in outputs:
            raise StepFailure(f"property file {name} reads output {output!r}, which the step does not have")
        uri = f"{outputs[output].rstrip('/')}/{path}"
        local = self.s3.path(uri)
        try:
            document = json.loads(local.read_text())
        except FileNotFoundError:
            raise StepFailure(f"property file {name}: the job wrote no {path} in output {output!r} ({local})") from None
        except json.JSONDecodeError as error:
            raise StepFailure(f"property file {name}: {local} is not JSON ({error})") from None
        return PropertyFile(step, name, uri, document)

    def _note_manifest(self, state: StepState, outputs: dict[str, str]) -> None:
        """Remember a data manifest (classes, dropped files) for the summary and the check function."""
        for uri in outputs.values():
            manifest = self.s3.path(uri) / "manifest.json"
            if manifest.is_file():
                try:
                    document = json.loads(manifest.read_text())
                except json.JSONDecodeError:
                    continue
                if isinstance(document, dict) and isinstance(document.get("classes"), list):
                    self.facts["manifest"] = {"path": str(manifest), "step": state.name, "document": document}

    def _training(self, state: StepState, resolver: Resolver) -> str:
        arguments = resolver.resolve(state.node.document["Arguments"])
        state.job_name = self.job_name(state.name)
        spec = TrainingSpec(state.job_name, arguments)
        state.details["metric_patterns"] = [item["Regex"] for item in spec.metric_definitions]
        state.details["instances"] = spec.instance_count

        def started(logs: list[Path]) -> None:
            state.logs = logs

        result = run_training_job(self.ctx, spec, on_started=started)
        state.logs = result.logs
        self.scope.set_properties(state.name, result.properties)
        state.details["model"] = str(result.model_artifact)
        state.details["runner"] = result.runner
        final = {item["MetricName"]: item["Value"] for item in result.properties["FinalMetricDataList"]}
        state.details["final_metrics"] = final
        return " ".join(f"{name}={value:.4g}" for name, value in final.items())

    def _tuning(self, state: StepState, resolver: Resolver) -> str:
        arguments = resolver.resolve(state.node.document["Arguments"])
        state.job_name = self.job_name(state.name)
        done: list[Trial] = []

        def finished(trial: Trial) -> None:
            with self._lock:
                done.append(trial)
                state.note = f"{len(done)} trial(s) done"

        properties, trials = run_tuning_job(self.ctx, state.job_name, arguments, max_jobs=self.options.max_tuning_jobs,
                                            seed=f"{state.name}:{self.options.seed}", parallel_limit=self.options.parallel, on_trial=finished)
        state.logs = [log for trial in trials if trial.result for log in trial.result.logs]
        self.scope.set_properties(state.name, properties)
        best = properties["BestTrainingJob"]
        metric = best["FinalHyperParameterTuningJobObjectiveMetric"]
        state.details["trials"] = [{"name": t.spec.name, "tuned": t.tuned, "failure": t.failure,
                                    "objective": t.objective(metric["MetricName"]),
                                    "seconds": t.result.properties["TrainingTimeInSeconds"] if t.result else None,
                                    "runner": t.result.runner if t.result else None}
                                   for t in trials]
        channels = {item["ChannelName"]: item.get("DataSource", {}).get("S3DataSource", {}).get("S3Uri")
                    for item in arguments["TrainingJobDefinition"].get("InputDataConfig", [])}
        state.details["channels"] = {name: str(self.s3.path(uri)) for name, uri in channels.items() if uri}
        return f"{len(trials)} trial{'s' if len(trials) != 1 else ''}; winner {metric['MetricName']}={metric['Value']:.4g}"

    def _register(self, state: StepState, resolver: Resolver) -> str:
        arguments = resolver.resolve(state.node.document["Arguments"])
        properties = register_model_package(self.sagemaker, arguments)
        self.scope.set_properties(state.name, properties)
        return f"{properties.get('ModelPackageArn', '').split('/', 1)[-1]} {properties.get('ModelApprovalStatus', '')}"

    def _lambda(self, state: StepState, resolver: Resolver) -> str:
        event = resolver.resolve(state.node.document.get("Arguments", {}))
        arn = state.node.document["FunctionArn"]
        log = self.workdir / "lambda" / f"{state.name}.log"
        state.logs = [log]
        answer = self.functions.invoke(arn, event, log, self._router)
        self.runtime.start_containers()  # an endpoint the function created or updated loads its model now
        outputs = output_parameters(answer, state.node.document.get("OutputParameters", []), arn.split(":")[6])
        self._delay_endpoint(outputs)
        self.scope.set_properties(state.name, {"OutputParameters": outputs})
        state.details["outputs"] = outputs
        return " ".join(f"{name}={value}" for name, value in outputs.items())

    def _delay_endpoint(self, outputs: dict[str, Any]) -> None:
        """With --endpoint-delay, an endpoint just created or updated is Creating or Updating for that long, as on SageMaker."""
        action, name = outputs.get("action"), outputs.get("endpoint_name")
        delay = self.options.endpoint_delay_seconds
        if delay <= 0 or not name or action not in ("created", "updated"):
            return
        aws.set_endpoint_status(self.settings.region, name, "Creating" if action == "created" else "Updating")
        timer = threading.Timer(delay, aws.set_endpoint_status, (self.settings.region, name, "InService"))
        timer.daemon = True
        timer.start()

    def _queue_url(self, sqs_queue_url: str) -> str:
        """The embedded SQS queue named by a Callback step's SqsQueueUrl, created on first use."""
        name = sqs_queue_url.rstrip("/").rsplit("/", 1)[-1]
        with self._lock:
            return self.sqs.create_queue(QueueName=name)["QueueUrl"]

    def _callback(self, state: StepState, resolver: Resolver) -> str:
        """Send SageMaker's callback message and let the wait function answer it, delivered as Lambda's SQS mapping does."""
        document = state.node.document
        arguments = resolver.resolve(document.get("Arguments", {}))
        queue_url = self._queue_url(document["SqsQueueUrl"])
        execution_arn = self.scope.execution["PipelineExecutionArn"]
        token = self.moto.callbacks.issue(state.name, execution_arn)
        callback = self.moto.callbacks.callbacks[token]
        self.sqs.send_message(QueueUrl=queue_url, MessageBody=callback_message(token, execution_arn, arguments))
        arn = self.settings.lambda_arn(WAIT_FUNCTION)
        log = self.workdir / "lambda" / f"{state.name}.log"
        state.logs = [log]
        limit = float(arguments.get("max_wait_minutes") or 60) * 60 + CALLBACK_GRACE_SECONDS
        started, looks = utc_now(), 0
        while not callback.answered.is_set():
            if (utc_now() - started).total_seconds() > limit:
                raise StepFailure(f"no answer to the callback token within {limit:.0f} s: see {log}")
            looks += deliver(self.sqs, queue_url, self.settings.region,
                             lambda event: self.functions.invoke(arn, event, log, self._router))
            state.note = f"{looks} message deliveries to {self.settings.lambda_function_name(WAIT_FUNCTION)}"
        state.details["callback"] = {"token": token, "deliveries": looks, "outcome": callback.outcome}
        if callback.outcome != "Succeeded":
            raise StepFailure(callback.failure_reason or "the callback step was answered with a failure")
        outputs = output_parameters(callback.outputs, document.get("OutputParameters", []), "the callback answer")
        self.scope.set_properties(state.name, {"OutputParameters": outputs})
        state.details["outputs"] = outputs
        return " ".join(f"{name}={value}" for name, value in outputs.items())

    def _condition(self, state: StepState, resolver: Resolver) -> str:
        conditions = state.node.document.get("Arguments", {}).get("Conditions", [])
        outcome, notes = evaluate_all(conditions, resolver.resolve)
        self.scope.set_properties(state.name, {"Outcome": outcome})
        state.details["notes"] = notes
        return f"{'; '.join(notes)} -> {'if' if outcome else 'else'} branch"

    def _fail(self, state: StepState, resolver: Resolver) -> str:
        message = as_text(resolver.resolve(state.node.document.get("Arguments", {}).get("ErrorMessage", "")))
        state.details["message"] = message
        raise StepFailure(message or "the pipeline reached a Fail step")


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

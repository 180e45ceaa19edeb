"""One runner per step type: what a step of the definition becomes on this machine.

A runner takes the step's state, a resolver for its arguments and the run's
``StepContext``; it sets the step's properties in the scope (shaped like its
Describe* API's answer, which later steps' references read), keeps the step's
job name and logs in the state, and returns what it found out (``results``:
the table's remark, what the summary shows). It raises ``StepFailure`` (or
another ``LocalRunError``) when the step fails.

Local stand-ins: S3 is a folder, jobs are processes (``processing_job``,
``training_job``), tuning is a few seeded random trials (``tuning``), the model
registry and the endpoints' control plane are an embedded moto server, Lambda
functions are the project's handlers called in this process (``lambdas``), and
the endpoints' data plane is a local server (``runtime``). A Callback step sends
SageMaker's message to its queue in moto's SQS, and the project's wait-endpoint
function receives it as Lambda's SQS event source mapping would deliver it,
until it answers the token (``callbacks``).
"""
from __future__ import annotations

import json
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.local import aws
from pipeline.local.callbacks import CallbackApi, callback_message, deliver
from pipeline.local.conditions import evaluate_all
from pipeline.local.jobs import JobContext
from pipeline.local.lambdas import LambdaFunctions, ThreadOutput, function_name_of, output_parameters, register_model_package
from pipeline.local.processing_job import run_processing_job
from pipeline.local.references import PropertyFile, Resolver, Scope, as_text
from pipeline.local.results import (
    CallbackRecord,
    CallbackResult,
    ConditionResult,
    FailResult,
    Manifest,
    OutputsResult,
    ProcessingResult,
    RegisterResult,
    StepResult,
    TrainingResult,
    TrialRecord,
    TuningResult,
)
from pipeline.local.runtime import RuntimeServer
from pipeline.local.s3 import LocalS3
from pipeline.local.state import RunOptions, StepFailure, StepState, failing_with
from pipeline.local.training_job import TrainingSpec, run_training_job
from pipeline.local.tuning import Trial, run_tuning_job
from pipeline.progress import utc_now
from pipeline.settings import Settings
from pipeline.status import Status

WAIT_FUNCTION = "wait-endpoint"  # the function the endpoint-wait queue triggers (infra/template.yaml)
CALLBACK_GRACE_SECONDS = 120  # beyond the step's max_wait_minutes, before local-run gives up on an unanswered token


@dataclass
class StepContext:
    """What the runners of one run share."""

    settings: Settings
    scope: Scope
    s3: LocalS3
    jobs: JobContext
    sagemaker: Any  # boto3 clients of the embedded moto
    sqs: Any
    callbacks: CallbackApi
    functions: LambdaFunctions
    runtime: RuntimeServer
    router: ThreadOutput | None
    workdir: Path
    execution_id: str
    manifest_file: str  # contract.py's MANIFEST_FILE: the data manifest a processing output may hold
    model_info_file: str  # contract.py's MODEL_INFO_FILE: what a model.tar.gz says about its training
    options: RunOptions = field(default_factory=RunOptions)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def job_name(self, step: str) -> str:
        return f"{self.execution_id}-{step}"[:63]

    def lambda_log(self, step: str) -> Path:
        return self.workdir / "lambda" / f"{step}.log"


Runner = Callable[[StepState, Resolver, StepContext], StepResult]


def run_processing(state: StepState, resolver: Resolver, ctx: StepContext) -> ProcessingResult:
    arguments = resolver.resolve(state.node.document["Arguments"])
    state.job_name = ctx.job_name(state.name)
    state.logs = [ctx.jobs.jobs_dir / state.job_name / "logs" / "algo-1.log"]
    job = run_processing_job(ctx.jobs, state.job_name, arguments)
    state.logs = job.logs
    ctx.scope.set_properties(state.name, job.properties)
    outputs = {item["OutputName"]: item["S3Output"]["S3Uri"]
               for item in arguments.get("ProcessingOutputConfig", {}).get("Outputs", [])}
    result = ProcessingResult({name: str(ctx.s3.path(uri)) for name, uri in outputs.items()})
    with failing_with(result):
        for item in state.node.document.get("PropertyFiles", []):
            ctx.scope.add_property_file(property_file(ctx.s3, state.name, item, outputs))
    result.manifest = manifest_in(ctx, outputs)
    return result


def property_file(s3: LocalS3, step: str, item: dict, outputs: dict[str, str]) -> PropertyFile:
    """A step's PropertyFiles entry, read from the output it names."""
    name, output, path = item["PropertyFileName"], item["OutputName"], item["FilePath"]
    if output not in outputs:
        raise StepFailure(f"property file {name} reads output {output!r}, which the step does not have")
    uri = f"{outputs[output].rstrip('/')}/{path}"
    local = s3.path(uri)
    try:
        document = json.loads(local.read_text())
    except FileNotFoundError:
        raise StepFailure(f"property file {name}: the job wrote no {path} in output {output!r} ({local})") from None
    except json.JSONDecodeError as error:
        raise StepFailure(f"property file {name}: {local} is not JSON ({error})") from None
    return PropertyFile(step, name, uri, document)


def manifest_in(ctx: StepContext, outputs: dict[str, str]) -> Manifest | None:
    """The data manifest (classes, dropped files) in one of the outputs, for the summary; the last one found."""
    found = None
    for uri in outputs.values():
        manifest = ctx.s3.path(uri) / ctx.manifest_file
        if manifest.is_file():
            try:
                document = json.loads(manifest.read_text())
            except json.JSONDecodeError:
                continue
            if isinstance(document, dict) and isinstance(document.get("classes"), list):
                found = Manifest(manifest, document)
    return found


def run_training(state: StepState, resolver: Resolver, ctx: StepContext) -> TrainingResult:
    arguments = resolver.resolve(state.node.document["Arguments"])
    state.job_name = ctx.job_name(state.name)
    spec = TrainingSpec(state.job_name, arguments)
    state.metric_patterns = [item["Regex"] for item in spec.metric_definitions]

    def started(logs: list[Path]) -> None:
        state.logs = logs

    with failing_with(TrainingResult(spec.instance_count)):
        job = run_training_job(ctx.jobs, spec, on_started=started)
    state.logs = job.logs
    ctx.scope.set_properties(state.name, job.properties)
    final = {item["MetricName"]: item["Value"] for item in job.properties["FinalMetricDataList"]}
    return TrainingResult(spec.instance_count, str(job.model_artifact), job.runner, final)


def trained_on(model_artifact: Path | None, model_info_file: str) -> str | None:
    """What a trial trained, as train.py records it in its model: "features" (the head only) or "images" (the
    whole network, or the head on images); None when the archive says nothing."""
    if model_artifact is None or not model_artifact.is_file():
        return None
    with tarfile.open(model_artifact, "r:gz") as tar:
        try:
            member = tar.extractfile(model_info_file)
        except KeyError:
            return None
        return json.load(member).get("trained_on") if member else None


def run_tuning(state: StepState, resolver: Resolver, ctx: StepContext) -> TuningResult:
    arguments = resolver.resolve(state.node.document["Arguments"])
    state.job_name = ctx.job_name(state.name)
    done: list[Trial] = []

    def finished(trial: Trial) -> None:
        with ctx.lock:
            done.append(trial)
            state.note = f"{len(done)} trial(s) done"

    properties, trials = run_tuning_job(ctx.jobs, state.job_name, arguments, max_jobs=ctx.options.max_tuning_jobs,
                                        seed=f"{state.name}:{ctx.options.seed}", parallel_limit=ctx.options.parallel, on_trial=finished)
    state.logs = [log for trial in trials if trial.result for log in trial.result.logs]
    ctx.scope.set_properties(state.name, properties)
    metric = properties["BestTrainingJob"]["FinalHyperParameterTuningJobObjectiveMetric"]
    channels = {item["ChannelName"]: item.get("DataSource", {}).get("S3DataSource", {}).get("S3Uri")
                for item in arguments["TrainingJobDefinition"].get("InputDataConfig", [])}
    return TuningResult([trial_record(trial, metric["MetricName"], ctx.model_info_file) for trial in trials],
                        {name: str(ctx.s3.path(uri)) for name, uri in channels.items() if uri}, metric)


def trial_record(trial: Trial, metric: str, model_info_file: str) -> TrialRecord:
    job = trial.result
    return TrialRecord(trial.spec.name, trial.tuned, trial.failure, trial.objective(metric),
                       job.properties["TrainingTimeInSeconds"] if job else None, job.runner if job else None,
                       trained_on(job.model_artifact, model_info_file) if job else None)


def run_register_model(state: StepState, resolver: Resolver, ctx: StepContext) -> RegisterResult:
    properties = register_model_package(ctx.sagemaker, resolver.resolve(state.node.document["Arguments"]))
    ctx.scope.set_properties(state.name, properties)
    return RegisterResult(properties.get("ModelPackageArn", ""), properties.get("ModelApprovalStatus", ""))


def run_lambda(state: StepState, resolver: Resolver, ctx: StepContext) -> OutputsResult:
    event = resolver.resolve(state.node.document.get("Arguments", {}))
    arn = state.node.document["FunctionArn"]
    state.logs = [ctx.lambda_log(state.name)]
    answer = ctx.functions.invoke(arn, event, state.logs[0], ctx.router)
    ctx.runtime.start_containers()  # an endpoint the function created or updated loads its model now
    outputs = output_parameters(answer, state.node.document.get("OutputParameters", []), function_name_of(arn))
    delay_endpoint(ctx, outputs)
    set_outputs(state, ctx, outputs)
    return OutputsResult(outputs)


def set_outputs(state: StepState, ctx: StepContext, outputs: dict[str, Any]) -> None:
    """A Lambda or Callback step's OutputParameters as its properties."""
    ctx.scope.set_properties(state.name, {"OutputParameters": outputs})


def delay_endpoint(ctx: StepContext, outputs: dict[str, Any]) -> None:
    """With --endpoint-delay, an endpoint just created or updated is Creating or Updating for that long, as on SageMaker."""
    action, name = outputs.get("action"), outputs.get("endpoint_name")
    delay = ctx.options.endpoint_delay_seconds
    if delay <= 0 or not name or action not in ("created", "updated"):
        return
    region = ctx.settings.region
    aws.set_endpoint_status(region, name, "Creating" if action == "created" else "Updating")
    timer = threading.Timer(delay, aws.set_endpoint_status, (region, name, "InService"))
    timer.daemon = True
    timer.start()


def queue_url(ctx: StepContext, sqs_queue_url: str) -> str:
    """The embedded SQS queue named by a Callback step's SqsQueueUrl, created on first use."""
    name = sqs_queue_url.rstrip("/").rsplit("/", 1)[-1]
    with ctx.lock:
        return ctx.sqs.create_queue(QueueName=name)["QueueUrl"]


def run_callback(state: StepState, resolver: Resolver, ctx: StepContext) -> CallbackResult:
    """Send SageMaker's callback message and let the wait function answer it, delivered as Lambda's SQS mapping does."""
    document = state.node.document
    arguments = resolver.resolve(document.get("Arguments", {}))
    queue = queue_url(ctx, document["SqsQueueUrl"])
    execution_arn = ctx.scope.execution["PipelineExecutionArn"]
    token = ctx.callbacks.issue(state.name, execution_arn)
    callback = ctx.callbacks.callbacks[token]
    ctx.sqs.send_message(QueueUrl=queue, MessageBody=callback_message(token, execution_arn, arguments))
    arn = ctx.settings.lambda_arn(WAIT_FUNCTION)
    log = ctx.lambda_log(state.name)
    state.logs = [log]
    limit = float(arguments.get("max_wait_minutes") or 60) * 60 + CALLBACK_GRACE_SECONDS
    started, looks = utc_now(), 0
    while not callback.answered.is_set():
        if (utc_now() - started).total_seconds() > limit:
            raise StepFailure(f"no answer to the callback token within {limit:.0f} s: see {log}")
        looks += deliver(ctx.sqs, queue, ctx.settings.region, lambda event: ctx.functions.invoke(arn, event, log, ctx.router))
        state.note = f"{looks} message deliveries to {ctx.settings.lambda_function_name(WAIT_FUNCTION)}"
    answer = CallbackRecord(token, looks, callback.outcome)
    with failing_with(CallbackResult(None, answer)):
        if callback.outcome != Status.SUCCEEDED:
            raise StepFailure(callback.failure_reason or "the callback step was answered with a failure")
        outputs = output_parameters(callback.outputs, document.get("OutputParameters", []), "the callback answer")
    set_outputs(state, ctx, outputs)
    return CallbackResult(outputs, answer)


def run_condition(state: StepState, resolver: Resolver, ctx: StepContext) -> ConditionResult:
    outcome, notes = evaluate_all(state.node.document.get("Arguments", {}).get("Conditions", []), resolver.resolve)
    ctx.scope.set_properties(state.name, {"Outcome": outcome})
    return ConditionResult(outcome, notes)


def run_fail(state: StepState, resolver: Resolver, ctx: StepContext) -> StepResult:
    message = as_text(resolver.resolve(state.node.document.get("Arguments", {}).get("ErrorMessage", "")))
    raise StepFailure(message or "the pipeline reached a Fail step", FailResult(message))


RUNNERS: dict[str, Runner] = {
    "Processing": run_processing,
    "Training": run_training,
    "Tuning": run_tuning,
    "RegisterModel": run_register_model,
    "Lambda": run_lambda,
    "Callback": run_callback,
    "Condition": run_condition,
    "Fail": run_fail,
}

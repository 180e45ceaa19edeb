"""Tell the team why a pipeline execution failed (the notify-failure function).

The EventBridge rule of infra/template.yaml sends SageMaker's "Model Building
Pipeline Execution Status Change" event here when an execution of one of the
project's pipelines fails. The function finds the first step that failed
(ListPipelineExecutionSteps, oldest first), asks its job why
(DescribeTrainingJob, DescribeProcessingJob, DescribeHyperParameterTuningJob and
its first failed trial), or takes a Fail step's ErrorMessage or a Lambda or callback step's
FailureReason, and publishes one plain-text message to the project's topic
(TOPIC_ARN): pipeline, execution, step, reason, console links, and the
commands that diagnose and retry the execution.

A job that cannot be read does not stop the message: it then carries the
step's own failure reason and says what could not be read.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import quote

from events import EventError, annotate, client, error_message, read_str, request_handler

DETAIL_TYPE = "SageMaker Model Building Pipeline Execution Status Change"
NOTIFIED_STATUSES = ("Failed", "Stopped")
EXECUTION_ARN = re.compile(
    r"^arn:aws[a-z-]*:sagemaker:(?P<region>[a-z0-9-]+):[0-9]{12}:pipeline/(?P<pipeline>[a-zA-Z0-9-]+)/execution/(?P<id>[a-zA-Z0-9]+)$")
EXECUTION_HINT = "a pipeline execution ARN (arn:aws:sagemaker:<region>:<account>:pipeline/<name>/execution/<id>)"
MAX_SUBJECT = 100  # SNS Publish: at most 100 printable ASCII characters, no line break
# Metadata key of a job step -> (what to call the job, console page, its CloudWatch log group)
JOB_STEPS = {
    "TrainingJob": ("training job", "jobs", "/aws/sagemaker/TrainingJobs"),
    "ProcessingJob": ("processing job", "processing-jobs", "/aws/sagemaker/ProcessingJobs"),
    "TuningJob": ("tuning job", "hyper-tuning-jobs", "/aws/sagemaker/TrainingJobs"),
}


class NotifyError(RuntimeError):
    """The function cannot send the message; the text says what to set up."""


@dataclass(frozen=True)
class ExecutionEvent:
    execution_arn: str
    pipeline_name: str
    execution_id: str
    region: str
    status: str
    started: str
    ended: str


@dataclass(frozen=True)
class FailedStep:
    name: str
    reason: str
    job_kind: str = ""  # "training job", ... or "" for a step without a job
    job_name: str = ""
    links: tuple[tuple[str, str], ...] = ()


def parse_event(event: Any) -> ExecutionEvent:
    """The execution in an EventBridge event of SageMaker's; raises EventError naming what is wrong."""
    source = read_str(event, "source")
    detail_type = read_str(event, "detail-type")
    if source != "aws.sagemaker" or detail_type != DETAIL_TYPE:
        raise EventError(f"the event is {source!r} / {detail_type!r}, not 'aws.sagemaker' / {DETAIL_TYPE!r}: "
                         "this function is the target of the rule on failed pipeline executions")
    detail = event.get("detail")
    if not isinstance(detail, Mapping):
        raise EventError("event field 'detail' must be an object with the execution's ARN and status")
    arn = read_str(detail, "pipelineExecutionArn", pattern=EXECUTION_ARN, hint=EXECUTION_HINT)
    status = read_str(detail, "currentPipelineExecutionStatus")
    if status not in NOTIFIED_STATUSES:
        raise EventError(f"event field 'currentPipelineExecutionStatus' = {status!r}: this function tells of "
                         f"{' and '.join(NOTIFIED_STATUSES)} executions only (see the rule's event pattern)")
    match = EXECUTION_ARN.match(arn)
    return ExecutionEvent(
        execution_arn=arn, pipeline_name=match.group("pipeline"), execution_id=match.group("id"),
        region=match.group("region"), status=status,
        started=read_str(detail, "executionStartTime", default="?"), ended=read_str(detail, "executionEndTime", default="?"),
    )


def execution_steps(sagemaker: Any, arn: str) -> list[Mapping[str, Any]]:
    """Every step of the execution, the first started first."""
    steps: list[Mapping[str, Any]] = []
    more: dict[str, str] = {}
    while True:
        page = sagemaker.list_pipeline_execution_steps(PipelineExecutionArn=arn, SortOrder="Ascending", **more)
        steps.extend(page.get("PipelineExecutionSteps", []))
        if not page.get("NextToken"):
            return steps
        more = {"NextToken": page["NextToken"]}


def console(region: str, page: str) -> str:
    return f"https://{region}.console.aws.amazon.com/{page}"


def logs_link(region: str, group: str, stream_prefix: str = "") -> str:
    """The CloudWatch console's page of a log group, filtered to streams starting with ``stream_prefix`` when given."""
    def escaped(text: str) -> str:  # the console's fragment: URL-encoded twice, with $ for %
        return quote(quote(text, safe=""), safe="").replace("%", "$")
    page = f"cloudwatch/home?region={region}#logsV2:log-groups/log-group/{escaped(group)}"
    return console(region, f"{page}$3FlogStreamNameFilter$3D{escaped(stream_prefix)}" if stream_prefix else page)


def job_reason(sagemaker: Any, kind: str, name: str) -> tuple[str, str]:
    """The job's own FailureReason (a processing job's ExitMessage when it has none), and the job whose log
    streams hold the error: the job itself, or a tuning job's first failed trial."""
    if kind == "TrainingJob":
        return sagemaker.describe_training_job(TrainingJobName=name).get("FailureReason", ""), name
    if kind == "ProcessingJob":
        job = sagemaker.describe_processing_job(ProcessingJobName=name)
        return job.get("FailureReason") or job.get("ExitMessage", ""), name
    reason = sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name).get("FailureReason", "")
    trials = sagemaker.list_training_jobs_for_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=name, StatusEquals="Failed", SortBy="CreationTime", SortOrder="Ascending", MaxResults=1,
    ).get("TrainingJobSummaries", [])
    if not trials:
        return reason, name
    trial = trials[0]["TrainingJobName"]
    return f"{reason}; first failed trial {trial}: {trials[0].get('FailureReason') or 'no reason given'}", trial


def failed_step(sagemaker: Any, execution: ExecutionEvent, step: Mapping[str, Any]) -> FailedStep:
    """What one failed step says about its failure, asking its job where it ran one."""
    name = str(step.get("StepName", "?"))
    metadata = step.get("Metadata") or {}
    reason = str(step.get("FailureReason") or "")
    if "Fail" in metadata:
        return FailedStep(name, str(metadata["Fail"].get("ErrorMessage") or reason or "the Fail step gave no message"))
    for kind, (label, page, group) in JOB_STEPS.items():
        if kind in metadata:
            job = str(metadata[kind].get("Arn", "")).rsplit("/", 1)[-1]
            logged = job
            try:
                told, logged = job_reason(sagemaker, kind, job)
                reason = told or reason
            except Exception as error:  # botocore ClientError, no connection: the step's own reason still goes out
                reason = f"{reason or 'no reason given'} (cannot read {label} {job}: {error_message(error)})"
            links = ((label.capitalize(), console(execution.region, f"sagemaker/home?region={execution.region}#/{page}/{job}")),
                     ("Logs", logs_link(execution.region, group, logged)))
            return FailedStep(name, reason or "no reason given", label, job, links)
    if "Lambda" in metadata:
        function = str(metadata["Lambda"].get("Arn", "")).split(":function:")[-1].split(":")[0]
        links = (("Logs", logs_link(execution.region, f"/aws/lambda/{function}")),) if function else ()
        return FailedStep(name, reason or "no reason given", "Lambda function", function, links)
    return FailedStep(name, reason or "no reason given")


def first_failure(sagemaker: Any, execution: ExecutionEvent) -> FailedStep | None:
    """The earliest failed step of the execution, or None when no step failed (e.g. a stopped execution)."""
    for step in execution_steps(sagemaker, execution.execution_arn):
        if step.get("StepStatus") == "Failed":
            return failed_step(sagemaker, execution, step)
    return None


def execution_reason(sagemaker: Any, arn: str) -> str:
    try:
        return sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn).get("FailureReason") or "no reason given"
    except Exception as error:
        return f"no step failed, and the execution cannot be read: {error_message(error)}"


def subject(execution: ExecutionEvent, step: FailedStep | None) -> str:
    """The message's subject: within SNS's limits (printable ASCII, one line, 100 characters)."""
    where = f" at {step.name}" if step else ""
    text = f"{execution.pipeline_name} execution {execution.execution_id} {execution.status.lower()}{where}"
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:MAX_SUBJECT]


def message(execution: ExecutionEvent, step: FailedStep | None, reason: str) -> str:
    """The plain-text message: what failed, why, where to look, and what to run next."""
    arn = execution.execution_arn
    lines = [
        f"Pipeline:   {execution.pipeline_name}",
        f"Execution:  {arn}",
        f"Status:     {execution.status} (started {execution.started}, ended {execution.ended})",
    ]
    if step is not None:
        job = f" ({step.job_kind} {step.job_name})" if step.job_name else ""
        lines.append(f"Step:       {step.name}{job}")
    lines.append(f"Reason:     {reason}")
    if step is not None and step.links:
        lines += ["", "Console:"] + [f"  {label}: {url}" for label, url in step.links]
    lines += [
        "",
        "Next:",
        f"  dogbreed diagnose {arn}",
        "      the failed step, its job's last log lines and what to do",
        f"  dogbreed retry {arn}",
        "      after a fix, runs the failed steps of this execution again",
    ]
    return "\n".join(lines) + "\n"


def topic_arn() -> str:
    arn = os.environ.get("TOPIC_ARN", "").strip()
    if not arn.startswith("arn:") or ":sns:" not in arn:
        raise NotifyError(f"TOPIC_ARN={arn!r} is not an SNS topic ARN: `dogbreed upsert` sets it to the stack's "
                          "failure topic; publish the function with upsert")
    return arn


def notify(execution: ExecutionEvent) -> dict[str, str]:
    """Publish the message for ``execution``; returns what was sent."""
    topic = topic_arn()
    sagemaker = client("sagemaker")
    step = first_failure(sagemaker, execution)
    reason = step.reason if step else execution_reason(sagemaker, execution.execution_arn)
    sns = client("sns")
    answer = sns.publish(TopicArn=topic, Subject=subject(execution, step), Message=message(execution, step, reason))
    return {"execution": execution.execution_arn, "status": execution.status, "step": step.name if step else "",
            "reason": reason, "message_id": str(answer.get("MessageId", ""))}


@request_handler("notify-failure", expected=(EventError, NotifyError))
def handler(event: Mapping[str, Any], context: Any) -> dict[str, str]:
    result = notify(parse_event(event))
    annotate(**result)
    return result


__all__ = ["handler", "parse_event", "EventError", "NotifyError"]

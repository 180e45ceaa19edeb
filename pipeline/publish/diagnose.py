"""``dogbreed diagnose [EXECUTION]`` on SageMaker: the execution, its first failed step, that step's job and
reason, the tail of the job's CloudWatch log, a Fail step's message, and the command to run next.

The clicks it saves: execution -> step (ListPipelineExecutionSteps) -> job (Describe*Job; for a tuning step
its first failed trial, ListTrainingJobsForHyperParameterTuningJob) -> log stream (the job's ``<job>/algo-1-...``
stream in ``/aws/sagemaker/TrainingJobs`` or ``/aws/sagemaker/ProcessingJobs``) -> its last lines.
"""
from __future__ import annotations

from botocore.exceptions import ClientError

from pipeline.aws import Clients, explained, is_not_found
from pipeline.diagnosis import LOG_LINES, Diagnosis, FailedStep, last_lines
from pipeline.publish.executions import execution_steps, start_time_of
from pipeline.status import RUNNING, Status

LOG_GROUPS = {"Training": "/aws/sagemaker/TrainingJobs", "Processing": "/aws/sagemaker/ProcessingJobs"}
# ListPipelineExecutionSteps' Metadata member for each kind of step, and the step type it stands for
METADATA_TYPES = {"TrainingJob": "Training", "ProcessingJob": "Processing", "TuningJob": "Tuning", "Fail": "Fail",
                  "Lambda": "Lambda", "Callback": "Callback", "Condition": "Condition", "RegisterModel": "RegisterModel"}


def job_name_of(arn: str) -> str:
    """A SageMaker job's name: the last part of its ARN."""
    return arn.rsplit("/", 1)[-1]


def first_failed(summaries: list[dict]) -> dict | None:
    """The step that failed first (by start time); None when no step failed."""
    failed = [summary for summary in summaries if summary.get("StepStatus") == Status.FAILED]
    return min(failed, key=start_time_of, default=None)


def step_type(summary: dict) -> str:
    metadata = summary.get("Metadata") or {}
    return next((METADATA_TYPES[key] for key in metadata if key in METADATA_TYPES), "Unknown")


def failed_step(clients: Clients, summary: dict) -> tuple[FailedStep, str]:
    """The failed step with its job, and the job type whose log explains it ('' when no job log does)."""
    metadata = summary.get("Metadata") or {}
    step = FailedStep(summary["StepName"], step_type(summary), (summary.get("FailureReason") or "").strip())
    if "Fail" in metadata:
        step.fail_message = metadata["Fail"].get("ErrorMessage", "")
    elif "TrainingJob" in metadata:
        # the ARN spells the name in lower case; the log streams use the name as the job was created
        job = clients.sagemaker.describe_training_job(TrainingJobName=job_name_of(metadata["TrainingJob"]["Arn"]))
        step.job_name, step.job_reason = job["TrainingJobName"], job.get("FailureReason", "")
        return step, "Training"
    elif "ProcessingJob" in metadata:
        job = clients.sagemaker.describe_processing_job(ProcessingJobName=job_name_of(metadata["ProcessingJob"]["Arn"]))
        step.job_name, step.job_reason = job["ProcessingJobName"], job.get("FailureReason", "")
        return step, "Processing"
    elif "TuningJob" in metadata:
        trial = failed_trial(clients, job_name_of(metadata["TuningJob"]["Arn"]))
        if trial:
            step.job_name, step.job_reason = trial["TrainingJobName"], trial.get("FailureReason", "")
            return step, "Training"
    return step, ""


def failed_trial(clients: Clients, tuning_job: str) -> dict | None:
    """The tuning job's first failed training job (its trial), or None."""
    page = clients.sagemaker.list_training_jobs_for_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=tuning_job, StatusEquals="Failed", SortBy="CreationTime", SortOrder="Ascending")
    trials = page.get("TrainingJobSummaries", [])
    return trials[0] if trials else None


def log_stream(clients: Clients, group: str, job: str) -> str:
    """The job's first host's stream (``<job>/algo-1-<epoch>``), else any stream of the job, else ''."""
    for prefix in (f"{job}/algo-1-", f"{job}/"):
        try:
            streams = clients.logs.describe_log_streams(logGroupName=group, logStreamNamePrefix=prefix).get("logStreams", [])
        except ClientError as error:
            if is_not_found(error):  # no log group: the job never logged
                return ""
            raise
        if streams:
            return sorted(stream["logStreamName"] for stream in streams)[0]
    return ""


def log_tail(clients: Clients, group: str, stream: str, count: int = LOG_LINES) -> list[str]:
    events = clients.logs.get_log_events(logGroupName=group, logStreamName=stream, startFromHead=False,
                                         limit=count).get("events", [])
    return last_lines("\n".join(event.get("message", "").rstrip("\n") for event in events), count)


def next_commands(arn: str, status: str, step: FailedStep | None) -> list[str]:
    """What to run after reading the diagnosis."""
    if status in RUNNING:
        return [f"dogbreed diagnose {arn}   # again once it has ended"]
    if status == Status.SUCCEEDED:
        return []
    if step is not None and step.type == "Fail":
        return ["dogbreed start   # a new execution, after changing what the gate judged (data, parameters, threshold)"]
    retry = f"dogbreed retry {arn}   # a passing failure: reruns the failed steps, same definition and parameters"
    if step is None:
        return [retry, "dogbreed start   # a new execution"]
    return [retry, f"dogbreed upsert && dogbreed start --from {step.name} --reference {arn}   # after a fix: reruns "
                   f"{step.name} and what follows it, the rest taken from this execution"]


def diagnose_execution(clients: Clients, pipeline: str, arn: str) -> Diagnosis:
    with explained(f"reading execution {arn}"):
        execution = clients.sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)
        status = execution.get("PipelineExecutionStatus", "Unknown")
        diagnosis = Diagnosis(pipeline, arn, status, (execution.get("FailureReason") or "").strip())
        summary = first_failed(execution_steps(clients, arn))
        job_type = ""
        if summary is not None:
            diagnosis.step, job_type = failed_step(clients, summary)
    if job_type and diagnosis.step is not None:
        group = LOG_GROUPS[job_type]
        with explained(f"reading the CloudWatch log of job {diagnosis.step.job_name}"):
            stream = log_stream(clients, group, diagnosis.step.job_name)
            if stream:
                diagnosis.log_source = f"{group}/{stream}"
                diagnosis.log_lines = log_tail(clients, group, stream)
    diagnosis.next_commands = next_commands(arn, status, diagnosis.step)
    return diagnosis

"""Why an execution failed, in one shape for SageMaker and for a local run: ``dogbreed diagnose``.

``pipeline.publish.diagnose`` fills a ``Diagnosis`` from the SageMaker API and CloudWatch Logs,
``pipeline.local.diagnose`` from the files a local-run work folder keeps; ``diagnosis_lines`` prints either.
"""
from __future__ import annotations

from dataclasses import dataclass, field

LOG_LINES = 20  # the log tail shown: enough for a Python traceback's last frames and the error
# Step types whose failure is a job's, with its log
JOB_STEP_TYPES = ("Training", "Processing", "Tuning")


@dataclass
class FailedStep:
    name: str
    type: str
    reason: str = ""
    job_name: str = ""  # the job that failed: for a tuning step, its failed trial
    job_reason: str = ""  # the job's own FailureReason, when it says more than the step's
    fail_message: str = ""  # a Fail step's ErrorMessage (a gate that failed the run)


@dataclass
class Diagnosis:
    pipeline: str
    execution: str  # an execution ARN, or a local run's id
    status: str
    failure_reason: str = ""
    step: FailedStep | None = None
    log_source: str = ""  # a CloudWatch log stream (group/stream) or a local log file
    log_lines: list[str] = field(default_factory=list)
    next_commands: list[str] = field(default_factory=list)


def last_lines(text: str, count: int = LOG_LINES) -> list[str]:
    """The last ``count`` non-empty lines of a log's text."""
    return [line for line in text.splitlines() if line.strip()][-count:]


def diagnosis_lines(diagnosis: Diagnosis) -> list[str]:
    """What ``dogbreed diagnose`` prints, the same for SageMaker and local runs."""
    lines = [f"pipeline:  {diagnosis.pipeline}", f"execution: {diagnosis.execution}", f"status:    {diagnosis.status}"]
    if diagnosis.failure_reason:
        lines.append(f"reason:    {diagnosis.failure_reason}")
    step = diagnosis.step
    if step is not None:
        lines.append(f"failed step: {step.name} ({step.type})")
        if step.reason:
            lines.append(f"  reason:  {step.reason}")
        if step.job_name:
            lines.append(f"  job:     {step.job_name}")
        if step.job_reason and step.job_reason not in step.reason:
            lines.append(f"  job failure reason: {step.job_reason}")
        if step.fail_message:
            lines.append(f"  gate message: {step.fail_message}")
    if diagnosis.log_source:
        lines.append(f"log: {diagnosis.log_source} (last {len(diagnosis.log_lines)} lines)")
        lines.extend(f"  | {line}" for line in diagnosis.log_lines)
    if diagnosis.next_commands:
        lines.append("next:")
        lines.extend(f"  {command}" for command in diagnosis.next_commands)
    return lines

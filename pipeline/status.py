"""The status of a pipeline execution or of one of its steps: one type for ``start --wait``, ``diagnose``,
``retry``, the progress table and local-run.

The SageMaker members are spelled as the service returns them (botocore's ``StepStatus`` and
``PipelineExecutionStatus`` enums), so that a status read from the API compares equal to a member; a
status is a ``str``, and prints, formats and serializes to JSON as its value.
"""
from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    # SageMaker's
    STARTING = "Starting"
    EXECUTING = "Executing"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    FAILED = "Failed"
    SUCCEEDED = "Succeeded"
    COMPLETED_WITH_FAILURES = "CompletedWithFailures"  # an execution's only
    # shown for steps SageMaker has no status for
    PENDING = "Pending"  # not started yet
    SKIPPED = "Skipped"  # local-run: on the branch a condition did not take, or after such a step
    NOT_RUN = "Not run"  # never started, and the execution has ended

    def __str__(self) -> str:
        return self.value


LOCAL_ONLY = frozenset({Status.PENDING, Status.SKIPPED, Status.NOT_RUN})
# a step or execution that has ended (an execution can also end CompletedWithFailures)
FINISHED = frozenset({Status.SUCCEEDED, Status.FAILED, Status.STOPPED, Status.COMPLETED_WITH_FAILURES})
RUNNING = frozenset({Status.EXECUTING, Status.STOPPING})  # an execution that has not ended yet

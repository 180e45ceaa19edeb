"""A local run's options, and a step's state in it: the progress table's row of the step, and what its runner found out."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, TextIO

from pipeline.dag import StepNode
from pipeline.local.errors import LocalRunError
from pipeline.local.results import StepResult
from pipeline.progress import StepRow, utc_now
from pipeline.status import Status

NOTE_WIDTH = 90  # a step's remark in the table; the summary has it whole


class StepFailure(LocalRunError):
    """A step ended Failed; the message is its FailureReason, ``result`` what the step had found out until then."""

    def __init__(self, message: str, result: StepResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@contextmanager
def failing_with(result: StepResult) -> Iterator[None]:
    """A step that fails in the block fails with ``result``: what it had found out until then, which the summary keeps."""
    try:
        yield
    except LocalRunError as error:
        raise StepFailure(str(error), result) from None


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
    row: StepRow  # name, status, start, end and failure reason, as the progress table shows them
    note: str = ""  # a short live or final remark, shown in the table while the row has no reason
    job_name: str = ""
    logs: list[Path] = field(default_factory=list)
    metric_patterns: list[str] = field(default_factory=list)  # a training job's, for its live note
    result: StepResult | None = None  # what the runner found out

    @classmethod
    def pending(cls, node: StepNode) -> "StepState":
        return cls(node, StepRow(node.name))

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def status(self) -> str:
        return self.row.status

    @property
    def reason(self) -> str:
        return self.row.reason

    @property
    def seconds(self) -> float | None:
        return self.row.seconds(utc_now())

    def start(self) -> None:
        self.row = replace(self.row, status=Status.EXECUTING, started=utc_now())

    def finish(self, status: Status, reason: str = "") -> None:
        self.row = replace(self.row, status=status, ended=utc_now(), reason=reason)

    def never_run(self, status: Status, reason: str) -> None:
        """Skipped or Not run, with why."""
        self.row = replace(self.row, status=status, reason=reason)

    def table_row(self) -> StepRow:
        """The row with the note in place of a missing reason, cut to the table's width."""
        if self.row.reason or not self.note:
            return self.row
        note = self.note if len(self.note) <= NOTE_WIDTH else self.note[: NOTE_WIDTH - 3] + "..."
        return replace(self.row, reason=note)

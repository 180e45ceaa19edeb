"""What each runner found out about its step: the table's remark, what the summary prints, and the step's
``details`` in ``summary.json`` (which ``dogbreed diagnose --local`` reads back).

A runner returns its result; a step that fails after learning something raises ``StepFailure`` with the
result so far (a Fail step's message, a callback's deliveries), which the summary keeps as well.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SUMMARY_ONLY = {"details": False}  # a field the summary reads but that is not one of the step's details


def name_value_pairs(values: dict[str, Any] | None, spec: str = "") -> str:
    """``name=value`` for each item, each value formatted with ``spec``: a step's remark in the table."""
    return " ".join(f"{name}={format(value, spec)}" for name, value in (values or {}).items())


@dataclass
class StepResult:
    @property
    def note(self) -> str:
        """The step's remark in the table, once it has succeeded."""
        return ""

    def details(self) -> dict[str, Any]:
        """The step's ``details`` in summary.json: every field but the summary-only ones and those not known."""
        document = asdict(self)
        return {item.name: document[item.name] for item in fields(self)
                if item.metadata.get("details", True) and document[item.name] is not None}


@dataclass
class Manifest:
    """The data manifest a processing output holds: the classes and the files dropped."""

    path: Path
    document: dict[str, Any]


@dataclass
class ProcessingResult(StepResult):
    outputs: dict[str, str]  # output name: its local folder
    manifest: Manifest | None = field(default=None, metadata=SUMMARY_ONLY)


@dataclass
class TrainingResult(StepResult):
    instances: int
    model: str | None = None  # the local model.tar.gz
    runner: str | None = None  # how the job ran: through the training toolkit or its launcher, and why
    final_metrics: dict[str, float] | None = None

    @property
    def note(self) -> str:
        return name_value_pairs(self.final_metrics, ".4g")


@dataclass
class TrialRecord:
    """One training job of a tuning step, as the summary lists it."""

    name: str
    tuned: dict[str, str]
    failure: str | None
    objective: float | None
    seconds: float | None
    runner: str | None
    trained_on: str | None  # "features" or "images", as train.py records it in its model; None when unknown

    @classmethod
    def from_details(cls, item: dict[str, Any]) -> "TrialRecord":
        """A trial as summary.json has it."""
        return cls(**{name: item.get(name) for name in (entry.name for entry in fields(cls))})


@dataclass
class TuningResult(StepResult):
    trials: list[TrialRecord]
    channels: dict[str, str]  # channel name: its local folder
    metric: dict[str, Any] = field(default_factory=dict, metadata=SUMMARY_ONLY)  # the winner's objective metric

    @property
    def note(self) -> str:
        count = len(self.trials)
        return f"{count} trial{'s' if count != 1 else ''}; winner {self.metric['MetricName']}={self.metric['Value']:.4g}"

    @classmethod
    def trials_in(cls, details: dict[str, Any]) -> list[TrialRecord]:
        """The trials of a tuning step's details in summary.json."""
        return [TrialRecord.from_details(item) for item in details.get("trials", [])]


@dataclass
class RegisterResult(StepResult):
    model_package_arn: str = field(metadata=SUMMARY_ONLY)
    approval_status: str = field(metadata=SUMMARY_ONLY)

    @property
    def note(self) -> str:
        return f"{self.model_package_arn.split('/', 1)[-1]} {self.approval_status}"


@dataclass
class OutputsResult(StepResult):
    """A Lambda step's, or an answered Callback step's, OutputParameters."""

    outputs: dict[str, Any] | None

    @property
    def note(self) -> str:
        return name_value_pairs(self.outputs)


@dataclass
class CallbackRecord:
    """How a callback step's token was answered."""

    token: str
    deliveries: int  # messages delivered to the wait function until it answered
    outcome: str  # the step's status the answer gives: Succeeded or Failed


@dataclass
class CallbackResult(OutputsResult):
    callback: CallbackRecord | None = None


@dataclass
class ConditionResult(StepResult):
    outcome: bool = field(metadata=SUMMARY_ONLY)
    notes: list[str]  # each condition, evaluated

    @property
    def note(self) -> str:
        return f"{'; '.join(self.notes)} -> {'if' if self.outcome else 'else'} branch"


@dataclass
class FailResult(StepResult):
    message: str

"""Which step may run when, and how the run ends: SageMaker's rules for a pipeline's steps, with no I/O.

A ``Schedule`` is told what happens (a step started, succeeded, with a condition's outcome, failed, or the
run was interrupted) and answers what follows:

- a step is ready when every step it depends on has succeeded and, on a condition's branch, the condition
  chose that branch;
- a condition's outcome skips the steps of the other branch, and a step that depends on a skipped step is
  skipped too;
- after a failure (a Fail step's included) no step starts; the running ones finish, and the run ends
  Failed naming every failed step: SageMaker does the same ("When a Fail step and other pipeline steps
  execute at the same time, the pipeline does not terminate until all concurrent steps are completed");
- when nothing runs and nothing is ready, the steps that never started are Not run, and the run ends.

Threads, processes, times and the progress table are the caller's (``scheduler.LocalRun``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from pipeline.dag import StepNode, topological_order
from pipeline.status import Status

INTERRUPTED = "the run was interrupted"


class ScheduleError(RuntimeError):
    """A caller told the schedule something that cannot happen (a defect of the caller)."""


@dataclass(frozen=True)
class NeverRun:
    """A step that will not run (Skipped or Not run), and why."""

    step: str
    status: Status
    reason: str


@dataclass(frozen=True)
class Ending:
    """How the run ended: its status, its failure reason, and the steps that never ran."""

    status: Status
    reason: str
    never_run: list[NeverRun]


class Schedule:
    def __init__(self, nodes: Mapping[str, StepNode]) -> None:
        self.nodes = nodes
        self.order = topological_order(dict(nodes))
        self.status: dict[str, Status] = {name: Status.PENDING for name in self.order}
        self.outcomes: dict[str, bool] = {}  # a condition step's: True for its if branch
        self.failures: list[tuple[str, str]] = []  # (step, reason), in the order the steps ended

    @property
    def running(self) -> list[str]:
        return [name for name in self.order if self.status[name] == Status.EXECUTING]

    @property
    def finished(self) -> bool:
        """Nothing runs and nothing more can start."""
        return not self.running and not self.ready()

    def ready(self) -> list[str]:
        """The pending steps that may start now, in the definition's order; none once a step has failed."""
        if self.failures:
            return []
        return [name for name in self.order if self.status[name] == Status.PENDING
                and all(self.status[dependency] == Status.SUCCEEDED for dependency in self.nodes[name].depends_on)
                and self._on_taken_branch(self.nodes[name])]

    def start(self, name: str) -> None:
        if name not in self.ready():
            raise ScheduleError(f"step {name} is {self.status[name]} and cannot start now")
        self.status[name] = Status.EXECUTING

    def succeed(self, name: str, outcome: bool | None = None) -> list[NeverRun]:
        """Step ``name`` succeeded (a condition with its ``outcome``); returns the steps this skips."""
        is_condition = self.nodes[name].type == "Condition"
        if is_condition != (outcome is not None):
            raise ScheduleError(f"step {name}: an outcome is given for a condition step, and only for one")
        self._end(name, Status.SUCCEEDED)
        if is_condition:
            self.outcomes[name] = outcome
        return self._skip_unreachable()

    def fail(self, name: str, reason: str) -> None:
        """Step ``name`` failed: no step starts from now on."""
        self._end(name, Status.FAILED)
        self.failures.append((name, reason))

    def interrupt(self) -> tuple[list[str], list[NeverRun]]:
        """The run was stopped: returns the running steps, now Stopped, and the pending ones, now Not run."""
        stopped = self.running
        for name in stopped:
            self.status[name] = Status.STOPPED
        return stopped, self._not_run(INTERRUPTED)

    def end(self) -> Ending:
        """The run's status once ``finished``: Failed naming every failed step, else Succeeded."""
        if not self.finished:
            raise ScheduleError(f"the run has not finished: {', '.join(self.running or self.ready())} still to run")
        if self.failures:
            reason = "; ".join(f"step {name} failed: {why}" for name, why in self.failures)
            return Ending(Status.FAILED, reason, self._not_run(f"the run failed at {self.failures[0][0]}"))
        return Ending(Status.SUCCEEDED, "", self._not_run("its dependencies did not run"))

    def _end(self, name: str, status: Status) -> None:
        if self.status[name] != Status.EXECUTING:
            raise ScheduleError(f"step {name} is {self.status[name]}: only a running step can end")
        self.status[name] = status

    def _on_taken_branch(self, node: StepNode) -> bool:
        if node.branch_of is None:
            return True
        condition, branch = node.branch_of
        return self.outcomes.get(condition) is (branch == "if")

    def _skip_unreachable(self) -> list[NeverRun]:
        """Pending steps on the untaken side of a decided condition, or after a skipped step, will never run."""
        skipped: list[NeverRun] = []
        changed = True
        while changed:
            changed = False
            for name in self.order:
                why = self._why_unreachable(name) if self.status[name] == Status.PENDING else ""
                if why:
                    self.status[name] = Status.SKIPPED
                    skipped.append(NeverRun(name, Status.SKIPPED, why))
                    changed = True
        return skipped

    def _why_unreachable(self, name: str) -> str:
        node = self.nodes[name]
        if node.branch_of and node.branch_of[0] in self.outcomes and not self._on_taken_branch(node):
            condition, branch = node.branch_of
            return f"{condition} chose the {'else' if branch == 'if' else 'if'} branch"
        skipped = sorted(dependency for dependency in node.depends_on if self.status[dependency] == Status.SKIPPED)
        return f"{skipped[0]} was skipped" if skipped else ""

    def _not_run(self, why: str) -> list[NeverRun]:
        changes = [NeverRun(name, Status.NOT_RUN, why) for name in self.order if self.status[name] == Status.PENDING]
        for change in changes:
            self.status[change.step] = Status.NOT_RUN
        return changes

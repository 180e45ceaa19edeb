"""A live table of pipeline steps: name, status, duration, failure reason.

Independent of AWS, so that anything that runs steps can show them the same
way: ``dogbreed start --wait`` feeds it from ``ListPipelineExecutionSteps``,
the local runner from its scheduler.

API::

    from pipeline.progress import ProgressView, StepRow

    with ProgressView("dogbreed-pipeline", plain=None) as view:
        view.update([
            StepRow("PrepareData", "Succeeded", started=t0, ended=t1),
            StepRow("TuneHyperparameters", "Executing", started=t1),
            StepRow("TrainSingleInstance"),                     # status "Pending"
        ])
        ...
        view.update(rows, status="Failed")                     # the execution's own status

- ``StepRow(name, status="Pending", started=None, ended=None, reason="")``:
  one step. ``status`` is a ``pipeline.status.Status`` (SageMaker's step
  statuses ``Starting``, ``Executing``, ``Stopping``, ``Stopped``, ``Failed``,
  ``Succeeded``, or ``Pending`` for a step that has not started, ``Skipped``,
  ``Not run``) or the same word as a string; other words are shown as given.
  ``started``/``ended`` are timezone-aware datetimes; a step without ``ended``
  counts its duration up to now.
- ``ProgressView(title, *, plain=None, file=None, clock=None, console=None)``: a context
  manager. ``update(rows, status=None)`` replaces all rows (their order is the
  display order). With ``plain=False`` it redraws a ``rich`` live table in
  place; with ``plain=True`` it prints one line per step whose status changed
  (and one per change of the overall status), which suits logs and CI.
  ``plain=None`` picks plain when ``file`` (default stdout) is not a terminal.
  ``clock`` returns the current aware datetime; ``console`` is a ``rich``
  console to draw on instead of one made for ``file``. The live table is
  drawn only inside the ``with`` block.
- ``render_table(title, rows, now, status=None)`` returns the ``rich`` table
  on its own, e.g. to print a final summary.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterable, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pipeline.status import FINISHED, Status

STYLES = {
    Status.PENDING: "dim",
    Status.STARTING: "cyan",
    Status.EXECUTING: "yellow",
    Status.STOPPING: "magenta",
    Status.STOPPED: "magenta",
    Status.FAILED: "bold red",
    Status.SUCCEEDED: "green",
}


@dataclass(frozen=True)
class StepRow:
    name: str
    status: str = Status.PENDING
    started: datetime | None = None
    ended: datetime | None = None
    reason: str = ""

    def seconds(self, now: datetime) -> float | None:
        """Seconds the step has run: until it ended, or until ``now`` while it runs."""
        if self.started is None:
            return None
        end = self.ended or now
        return max(0.0, (end - self.started).total_seconds())


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def render_table(title: str, rows: Iterable[StepRow], now: datetime, status: str | None = None) -> Table:
    heading = f"{title} - {status}" if status else title
    table = Table(title=heading, title_justify="left", expand=False)
    table.add_column("Step", no_wrap=True)
    table.add_column("Status", no_wrap=True)
    table.add_column("Duration", justify="right", no_wrap=True)
    table.add_column("Reason", overflow="fold")
    for row in rows:
        table.add_row(
            row.name,
            Text(row.status, style=STYLES.get(row.status, "")),
            format_duration(row.seconds(now)),
            Text(row.reason, style="red" if row.status == Status.FAILED else ""),
        )
    return table


def plain_line(row: StepRow, now: datetime) -> str:
    """One log line for a step's current status."""
    parts = [f"{row.name}: {row.status}"]
    duration = format_duration(row.seconds(now))
    if duration and row.status in FINISHED:
        parts.append(f"after {duration}")
    line = " ".join(parts)
    return f"{line} - {row.reason}" if row.reason else line


class _LiveTable:
    """Renders the current rows each time ``rich`` refreshes, so running durations tick."""

    def __init__(self, view: "ProgressView") -> None:
        self.view = view

    def __rich__(self) -> Table:
        return render_table(self.view.title, self.view.rows, self.view.clock(), self.view.status)


class ProgressView:
    def __init__(self, title: str, *, plain: bool | None = None, file: TextIO | None = None,
                 clock: Callable[[], datetime] | None = None, console: Console | None = None) -> None:
        self.title = title
        self.file = file if file is not None else (console.file if console is not None else sys.stdout)
        self.console = console or Console(file=self.file, highlight=False, soft_wrap=False)
        self.plain = (not self.console.is_terminal) if plain is None else plain
        self.clock = clock or utc_now
        self.rows: list[StepRow] = []
        self.status: str | None = None
        self._printed: dict[str, str] = {}
        self._printed_status: str | None = None
        self._live: Live | None = None

    def __enter__(self) -> "ProgressView":
        if not self.plain:
            self._live = Live(_LiveTable(self), console=self.console, refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(*exc_info)
            self._live = None

    def update(self, rows: Iterable[StepRow], status: str | None = None) -> None:
        """Show ``rows`` (all steps, in display order) and, if given, the overall status."""
        self.rows = list(rows)
        if status is not None:
            self.status = status
        if self._live is not None:
            self._live.refresh()
        elif self.plain:
            self._print_changes()

    def _print_changes(self) -> None:
        now = self.clock()
        for row in self.rows:
            if self._printed.get(row.name) != row.status and row.status != Status.PENDING:
                self._printed[row.name] = row.status
                self._write(plain_line(row, now))
        if self.status and self.status != self._printed_status:
            self._printed_status = self.status
            self._write(f"{self.title}: {self.status}")

    def _write(self, line: str) -> None:
        self.file.write(line + "\n")
        self.file.flush()

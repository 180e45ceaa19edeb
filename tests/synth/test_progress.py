"""The step progress view: plain status-change lines and the rich live table."""
from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone

import pytest
from rich.console import Console

from pipeline.progress import ProgressView, StepRow, format_duration, render_table

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.mark.parametrize("seconds, text", [
    (None, ""), (0, "0s"), (59.9, "59s"), (60, "1m 00s"), (252, "4m 12s"), (3700, "1h 01m 40s"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_running_step_counts_up_to_now_and_finished_step_stops():
    running = StepRow("PrepareData", "Executing", started=at(0))
    finished = StepRow("PrepareData", "Succeeded", started=at(0), ended=at(30))
    assert running.seconds(at(90)) == 90
    assert finished.seconds(at(90)) == 30
    assert StepRow("PrepareData").seconds(at(90)) is None


def test_plain_mode_prints_one_line_per_status_change():
    out = io.StringIO()
    now = [at(0)]
    first = [StepRow("PrepareData", "Executing", started=at(0)), StepRow("TuneHyperparameters")]
    second = [StepRow("PrepareData", "Succeeded", started=at(0), ended=at(252)),
              StepRow("TuneHyperparameters", "Executing", started=at(252))]
    third = [second[0], StepRow("TuneHyperparameters", "Failed", started=at(252), ended=at(400),
                                reason="ClientError: no capacity")]
    with ProgressView("dogbreed-pipeline", plain=True, file=out, clock=lambda: now[0]) as view:
        view.update(first, status="Executing")
        view.update(first)  # nothing changed, nothing printed
        now[0] = at(300)
        view.update(second)
        view.update(third, status="Failed")
    assert out.getvalue().splitlines() == [
        "PrepareData: Executing",
        "dogbreed-pipeline: Executing",
        "PrepareData: Succeeded after 4m 12s",
        "TuneHyperparameters: Executing",
        "TuneHyperparameters: Failed after 2m 28s - ClientError: no capacity",
        "dogbreed-pipeline: Failed",
    ]


def test_non_terminal_output_chooses_plain_mode():
    assert ProgressView("p", file=io.StringIO()).plain is True
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert ProgressView("p", console=terminal).plain is False


def test_live_mode_draws_the_table_with_every_step():
    console = Console(file=io.StringIO(), force_terminal=True, width=100, record=True)
    rows = [
        StepRow("PrepareData", "Succeeded", started=at(0), ended=at(252)),
        StepRow("TrainSingleInstance", "Failed", started=at(252), ended=at(3952), reason="AlgorithmError: out of memory"),
        StepRow("TrainMultiInstance", "Executing", started=at(252)),
        StepRow("EvaluateSingleInstance"),
    ]
    with ProgressView("dogbreed-pipeline", console=console, clock=lambda: at(4000)) as view:
        view.update(rows, status="Failed")
    last_frame = console.export_text().split("dogbreed-pipeline - Failed")[-1]
    lines = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
             for line in last_frame.splitlines() if line.startswith("│")}
    assert lines == {
        "PrepareData": ["Succeeded", "4m 12s", ""],
        "TrainSingleInstance": ["Failed", "1h 01m 40s", "AlgorithmError: out of memory"],
        "TrainMultiInstance": ["Executing", "1h 02m 28s", ""],
        "EvaluateSingleInstance": ["Pending", "", ""],
    }


def test_render_table_alone_has_one_row_per_step():
    table = render_table("p", [StepRow("A"), StepRow("B", "Executing", started=at(0))], at(5))
    assert table.row_count == 2
    assert [column.header for column in table.columns] == ["Step", "Status", "Duration", "Reason"]


def test_the_status_type_spells_sagemakers_statuses_as_the_service_returns_them():
    """start --wait, diagnose and retry compare the API's strings with ``Status``: botocore's enums pin its words."""
    import json

    import botocore.session

    from pipeline.status import LOCAL_ONLY, Status

    model = botocore.session.get_session().get_service_model("sagemaker")
    sagemaker = set(model.shape_for("StepStatus").enum) | set(model.shape_for("PipelineExecutionStatus").enum)
    assert {status.value for status in Status if status not in LOCAL_ONLY} == sagemaker
    assert not {status.value for status in LOCAL_ONLY} & sagemaker
    assert Status("Not run") is Status.NOT_RUN and Status.FAILED == "Failed"
    assert (f"{Status.NOT_RUN:<9}|", str(Status.SKIPPED), json.dumps([Status.SUCCEEDED])) == ("Not run  |", "Skipped", '["Succeeded"]')

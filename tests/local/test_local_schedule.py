"""local-run's schedule on small hand-written definitions: which steps are ready, what a condition's outcome
skips, what a failure stops, and how the run ends. No process, thread or server: each test takes milliseconds."""
from __future__ import annotations

import pytest

from pipeline.dag import steps_of
from pipeline.local.schedule import NeverRun, Schedule, ScheduleError
from pipeline.status import Status


def step(name: str, *after: str) -> dict:
    """A plain step that depends on ``after``, one through a property reference as SageMaker derives it."""
    arguments = {"Input": {"Get": f"Steps.{after[0]}.ProcessingOutputConfig.Outputs['data'].S3Output.S3Uri"}} if after else {}
    return {"Name": name, "Type": "Processing", "Arguments": arguments, **({"DependsOn": list(after[1:])} if after[1:] else {})}


def condition(name: str, if_steps: list[dict], else_steps: list[dict], *after: str) -> dict:
    return {"Name": name, "Type": "Condition", "DependsOn": list(after),
            "Arguments": {"Conditions": [], "IfSteps": if_steps, "ElseSteps": else_steps}}


def fail(name: str) -> dict:
    return {"Name": name, "Type": "Fail", "Arguments": {"ErrorMessage": f"{name} was reached"}}


def schedule_of(*steps: dict) -> Schedule:
    return Schedule(steps_of({"Steps": list(steps)}))


def run(schedule: Schedule, name: str, outcome: bool | None = None) -> list[NeverRun]:
    schedule.start(name)
    return schedule.succeed(name, outcome)


def statuses(schedule: Schedule) -> dict[str, str]:
    return {name: str(status) for name, status in schedule.status.items()}


def test_independent_steps_are_ready_together_and_a_dependant_after_its_dependency():
    schedule = schedule_of(step("Prepare"), step("Train", "Prepare"), step("Download"), step("Evaluate", "Train", "Download"))
    assert schedule.ready() == ["Prepare", "Download"]
    schedule.start("Prepare")
    assert schedule.ready() == ["Download"] and schedule.running == ["Prepare"]
    schedule.succeed("Prepare")
    assert schedule.ready() == ["Train", "Download"]
    run(schedule, "Train")
    assert schedule.ready() == ["Download"]  # Evaluate also waits for its DependsOn
    run(schedule, "Download")
    run(schedule, "Evaluate")
    assert schedule.finished
    ending = schedule.end()
    assert (ending.status, ending.reason, ending.never_run) == (Status.SUCCEEDED, "", [])


def gate() -> Schedule:
    """Evaluate -> Gate: if Register -> Deploy, else TooLow (a Fail step)."""
    return schedule_of(step("Evaluate"),
                       condition("Gate", [step("Register"), step("Deploy", "Register")], [fail("TooLow")], "Evaluate"))


def test_the_if_branch_runs_and_the_else_branch_is_skipped():
    schedule = gate()
    run(schedule, "Evaluate")
    assert schedule.ready() == ["Gate"]
    skipped = run(schedule, "Gate", outcome=True)
    assert skipped == [NeverRun("TooLow", Status.SKIPPED, "Gate chose the if branch")]
    assert schedule.ready() == ["Register"]
    run(schedule, "Register")
    run(schedule, "Deploy")
    ending = schedule.end()
    assert (ending.status, ending.never_run) == (Status.SUCCEEDED, [])
    assert statuses(schedule) == {"Evaluate": "Succeeded", "Gate": "Succeeded", "Register": "Succeeded",
                                  "Deploy": "Succeeded", "TooLow": "Skipped"}


def test_the_else_branch_runs_its_fail_step_and_the_run_fails_with_its_message():
    schedule = gate()
    run(schedule, "Evaluate")
    skipped = run(schedule, "Gate", outcome=False)
    assert skipped == [NeverRun("Register", Status.SKIPPED, "Gate chose the else branch"),
                       NeverRun("Deploy", Status.SKIPPED, "Gate chose the else branch")]
    assert schedule.ready() == ["TooLow"]
    schedule.start("TooLow")
    schedule.fail("TooLow", "TooLow was reached")
    assert schedule.finished
    ending = schedule.end()
    assert (ending.status, ending.reason, ending.never_run) == (Status.FAILED, "step TooLow failed: TooLow was reached", [])


def test_a_step_after_a_skipped_step_is_skipped_in_turn():
    schedule = schedule_of(step("Evaluate"), condition("Gate", [step("Register")], [], "Evaluate"),
                           step("Deploy", "Register"), step("Check", "Deploy", "Evaluate"), step("Report", "Evaluate"))
    run(schedule, "Evaluate")
    skipped = run(schedule, "Gate", outcome=False)
    assert skipped == [NeverRun("Register", Status.SKIPPED, "Gate chose the else branch"),
                       NeverRun("Deploy", Status.SKIPPED, "Register was skipped"),
                       NeverRun("Check", Status.SKIPPED, "Deploy was skipped")]
    assert schedule.ready() == ["Report"]  # outside the branch, it does not care
    run(schedule, "Report")
    assert schedule.end().status == Status.SUCCEEDED


def nested() -> Schedule:
    """Outer: if Inner (if X, else Y), else Z; After depends on X."""
    inner = condition("Inner", [step("X")], [step("Y")])
    return schedule_of(condition("Outer", [inner], [step("Z")]), step("After", "X"))


def test_nested_conditions_decide_in_turn():
    schedule = nested()
    assert run(schedule, "Outer", outcome=True) == [NeverRun("Z", Status.SKIPPED, "Outer chose the if branch")]
    assert schedule.ready() == ["Inner"]
    assert run(schedule, "Inner", outcome=False) == [NeverRun("X", Status.SKIPPED, "Inner chose the else branch"),
                                                     NeverRun("After", Status.SKIPPED, "X was skipped")]
    run(schedule, "Y")
    assert schedule.end().status == Status.SUCCEEDED
    assert statuses(schedule) == {"Outer": "Succeeded", "Inner": "Succeeded", "X": "Skipped", "Y": "Succeeded",
                                  "Z": "Skipped", "After": "Skipped"}


def test_an_outer_condition_skips_the_inner_one_and_both_its_branches():
    schedule = nested()
    skipped = run(schedule, "Outer", outcome=False)
    assert skipped == [NeverRun("Inner", Status.SKIPPED, "Outer chose the else branch"),
                       NeverRun("X", Status.SKIPPED, "Inner was skipped"),
                       NeverRun("Y", Status.SKIPPED, "Inner was skipped"),
                       NeverRun("After", Status.SKIPPED, "X was skipped")]
    assert schedule.ready() == ["Z"]


def test_after_a_failure_the_running_steps_finish_nothing_new_starts_and_every_failure_is_named():
    schedule = schedule_of(step("Prepare"), step("TrainA", "Prepare"), step("TrainB", "Prepare"), step("TrainC", "Prepare"),
                           step("EvaluateA", "TrainA"), step("EvaluateB", "TrainB"))
    run(schedule, "Prepare")
    for name in ("TrainA", "TrainB", "TrainC"):
        schedule.start(name)
    schedule.fail("TrainA", "AlgorithmError: out of memory")
    assert schedule.ready() == [] and not schedule.finished  # TrainB and TrainC still run
    with pytest.raises(ScheduleError, match="has not finished: TrainB, TrainC"):
        schedule.end()
    schedule.succeed("TrainB")
    assert schedule.ready() == []  # EvaluateB could run, but the run has failed
    schedule.fail("TrainC", "ClientError: no capacity")
    assert schedule.finished
    ending = schedule.end()
    assert ending.status == Status.FAILED
    assert ending.reason == "step TrainA failed: AlgorithmError: out of memory; step TrainC failed: ClientError: no capacity"
    assert ending.never_run == [NeverRun("EvaluateA", Status.NOT_RUN, "the run failed at TrainA"),
                                NeverRun("EvaluateB", Status.NOT_RUN, "the run failed at TrainA")]


def test_a_fail_step_waits_for_its_twin_running_deployment_as_on_sagemaker():
    """The twin rule: a model below the threshold fails the run after its twin's deployment has ended."""
    schedule = schedule_of(step("EvaluateA"), step("EvaluateB"),
                           condition("GateA", [step("DeployA")], [fail("TooLowA")], "EvaluateA"),
                           condition("GateB", [step("DeployB"), step("CheckB", "DeployB")], [fail("TooLowB")], "EvaluateB"))
    run(schedule, "EvaluateA")
    run(schedule, "EvaluateB")
    run(schedule, "GateA", outcome=False)
    run(schedule, "GateB", outcome=True)
    assert schedule.ready() == ["TooLowA", "DeployB"]
    schedule.start("TooLowA")
    schedule.start("DeployB")
    schedule.fail("TooLowA", "A's accuracy is too low")
    schedule.succeed("DeployB")
    assert schedule.finished  # CheckB does not start after the Fail step
    ending = schedule.end()
    assert (ending.status, ending.reason) == (Status.FAILED, "step TooLowA failed: A's accuracy is too low")
    assert ending.never_run == [NeverRun("CheckB", Status.NOT_RUN, "the run failed at TooLowA")]
    assert statuses(schedule)["DeployA"] == statuses(schedule)["TooLowB"] == "Skipped"


def test_a_failed_condition_runs_neither_branch():
    schedule = gate()
    run(schedule, "Evaluate")
    schedule.start("Gate")
    schedule.fail("Gate", "Std:JsonGet: no such path")
    ending = schedule.end()
    assert [(change.step, change.status) for change in ending.never_run] == [
        ("Register", Status.NOT_RUN), ("Deploy", Status.NOT_RUN), ("TooLow", Status.NOT_RUN)]


def test_an_interrupt_stops_the_running_steps_and_runs_no_other():
    schedule = schedule_of(step("Prepare"), step("TrainA", "Prepare"), step("TrainB", "Prepare"), step("Evaluate", "TrainA"))
    run(schedule, "Prepare")
    schedule.start("TrainA")
    schedule.start("TrainB")
    stopped, never_run = schedule.interrupt()
    assert stopped == ["TrainA", "TrainB"]
    assert never_run == [NeverRun("Evaluate", Status.NOT_RUN, "the run was interrupted")]
    assert statuses(schedule) == {"Prepare": "Succeeded", "TrainA": "Stopped", "TrainB": "Stopped", "Evaluate": "Not run"}


def test_what_cannot_happen_is_refused():
    schedule = gate()
    with pytest.raises(ScheduleError, match="step Gate is Pending and cannot start now"):
        schedule.start("Gate")
    with pytest.raises(ScheduleError, match="only a running step can end"):
        schedule.succeed("Evaluate")
    run(schedule, "Evaluate")
    schedule.start("Gate")
    with pytest.raises(ScheduleError, match="an outcome is given for a condition step, and only for one"):
        schedule.succeed("Gate")

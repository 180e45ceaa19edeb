"""``dogbreed local-run`` on edited definitions and bad input: the Fail steps and the twin rule, a failing script,
references that cannot resolve, parameters and definitions that are refused. Each is a small run of its own (one
trial, one instance, a few images), apart from the full run of ``test_local_run.py`` so that the two files run side
by side.
"""
from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from local_runs import SMALL_MODEL, local_run, run_edited, steps_by_name, summary_of
from pipeline import cli
from sources import ROOT

pytestmark = pytest.mark.slow


def test_a_failing_script_gives_its_error_line_as_the_reason(tmp_path: Path):
    document = _definition(tmp_path)
    _step(document, "PrepareData")["Arguments"]["AppSpecification"]["ContainerArguments"] += ["--resize", "tiny"]
    status, out, err, workdir = run_edited(tmp_path, document)
    assert status == 1, out[-2000:] + err
    reason = steps_by_name(summary_of(workdir))["PrepareData"]["reason"]
    assert reason == "AlgorithmError: preprocess.py: error: argument --resize: invalid int value: 'tiny'", reason


def test_raised_threshold_ends_in_the_fail_step(tmp_path: Path):
    # A threshold no accuracy reaches; the AccuracyThreshold parameter itself is refused above 1.0.
    document = _definition(tmp_path)
    for suffix in ("SingleInstance", "MultiInstance"):
        gate_model_at(document, suffix, 1.5)
    status, out, err, workdir = run_edited(tmp_path, document, "--max-tuning-jobs", "1", "--param", "MultiInstanceCount=1",
                                           *SMALL_MODEL, split_sizes={"train": 8, "valid": 2, "test": 2})
    assert status == 1, out[-3000:] + err
    summary = summary_of(workdir)
    assert summary["status"] == "Failed"
    steps = steps_by_name(summary)
    failed = [name for name, step in steps.items() if step["status"] == "Failed"]
    # Both models failed and neither deploys: each gate may fail the run at once, and whichever fails first names both.
    assert 1 <= len(failed) <= 2 and all(name in ("AccuracyTooLowSingleInstance", "AccuracyTooLowMultiInstance") for name in failed)
    variant = failed[0].removeprefix("AccuracyTooLow")
    message = steps[failed[0]]["reason"]
    accuracy = summary["test_accuracy"][f"Evaluate{variant}"]
    twin = "MultiInstance" if variant == "SingleInstance" else "SingleInstance"
    assert re.fullmatch(rf"The (single|multi) instance model's test accuracy {accuracy} is below AccuracyThreshold 1.5; "
                        rf"it was not registered or deployed \(the (single|multi) instance model's is "
                        rf"{summary['test_accuracy'][f'Evaluate{twin}']}\)\.", message)
    assert message in summary["failure_reason"] and message in out
    for skipped in (f"Register{variant}", f"CheckApproval{variant}", f"Deploy{variant}", f"Check{variant}"):
        assert steps[skipped]["status"] == "Skipped"


def gate_model_at(document: dict, suffix: str, threshold: float) -> None:
    """Compare one model's test accuracy with ``threshold`` instead of AccuracyThreshold, wherever the definition does."""
    accuracy = {"Std:JsonGet": {"Path": "multiclass_classification_metrics.accuracy.value",
                                "PropertyFile": {"Get": f"Steps.Evaluate{suffix}.PropertyFiles.Evaluation{suffix}"}}}

    def walk(value):
        if isinstance(value, dict):
            if value.get("Type") == "GreaterThanOrEqualTo" and value.get("LeftValue") == accuracy:
                value["RightValue"] = threshold
            values = value.get("Std:Join", {}).get("Values", [])
            for index in range(len(values) - 2):
                if values[index] == accuracy and values[index + 2] == {"Get": "Parameters.AccuracyThreshold"}:
                    values[index + 2] = threshold
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(document)


def test_a_twin_below_the_threshold_does_not_stop_the_other_and_fails_the_run_after_its_deployment(tmp_path: Path):
    document = _definition(tmp_path)
    gate_model_at(document, "MultiInstance", 1.5)  # out of reach; the single-instance model faces AccuracyThreshold=0.0
    status, out, err, workdir = run_edited(tmp_path, document, "--max-tuning-jobs", "1", "--endpoint-delay", "3",
                                           "--param", "MultiInstanceCount=1", "--param", "AccuracyThreshold=0.0",
                                           *SMALL_MODEL, split_sizes={"train": 8, "valid": 2, "test": 2})
    assert status == 1, out[-3000:] + err
    summary = summary_of(workdir)
    steps = steps_by_name(summary)
    status_of = {name: step["status"] for name, step in steps.items()}
    for name in ("EvaluateSingleInstance", "RegisterSingleInstance", "DeploySingleInstance",
                 "WaitForSingleInstance", "CheckSingleInstance", "EvaluateMultiInstance", "CheckTwinDeploymentMultiInstance"):
        assert status_of[name] == "Succeeded", (name, steps[name])
    assert steps["DeploySingleInstance"]["details"]["outputs"]["action"] == "created"
    assert steps["WaitForSingleInstance"]["details"]["callback"]["deliveries"] >= 2  # the endpoint was Creating at first
    assert steps["CheckSingleInstance"]["details"]["outputs"]["status"] == "InService"
    for name in ("RegisterMultiInstance", "DeployMultiInstance", "AccuracyTooLowMultiInstance"):
        assert status_of[name] == "Skipped", (name, steps[name])
    assert [name for name, value in status_of.items() if value == "Failed"] == ["AccuracyTooLowMultiInstanceAfterSingleInstance"]
    accuracy = summary["test_accuracy"]["EvaluateMultiInstance"]
    message = steps["AccuracyTooLowMultiInstanceAfterSingleInstance"]["reason"]
    assert message == (f"The multi instance model's test accuracy {accuracy} is below AccuracyThreshold 1.5; it was not "
                       "registered or deployed; the single instance model passed and was deployed.")
    assert summary["status"] == "Failed" and message in summary["failure_reason"] and message in out


def _definition(tmp_path: Path) -> dict:
    status, out, err = _synth(tmp_path / "pipeline.json")
    assert status == 0, err
    return json.loads((tmp_path / "pipeline.json").read_text())


def _synth(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = cli.main(["synth", "--out", str(path), "--source-dir", str(ROOT)])
    return status, out.getvalue(), err.getvalue()


def _step(document: dict, name: str) -> dict:
    for step in document["Steps"]:
        if step["Name"] == name:
            return step
        for branch in ("IfSteps", "ElseSteps"):
            for child in step.get("Arguments", {}).get(branch, []):
                if child["Name"] == name:
                    return child
    raise KeyError(name)


def test_reference_to_a_missing_property_fails_before_anything_runs(tmp_path: Path):
    document = _definition(tmp_path)
    evaluate = _step(document, "EvaluateSingleInstance")
    model_input = next(item for item in evaluate["Arguments"]["ProcessingInputs"] if item["InputName"] == "model")
    model_input["S3Input"]["S3Uri"] = {"Get": "Steps.TrainSingleInstance.ModelArtifacts.S3ModelArtifactz"}
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(document))
    status, out, err = local_run("--definition", str(edited), "--workdir", str(tmp_path / "work"))
    assert status == 2
    assert "EvaluateSingleInstance" in err and "Steps.TrainSingleInstance.ModelArtifacts.S3ModelArtifactz" in err
    assert not (tmp_path / "work" / "jobs").exists()


def test_reference_that_fails_at_run_time_names_step_and_path(tmp_path: Path):
    document = _definition(tmp_path)
    tune = _step(document, "TuneHyperparameters")
    missing = "Steps.PrepareData.ProcessingOutputConfig.Outputs[9].S3Output.S3Uri"
    tune["Arguments"]["TrainingJobDefinition"]["StaticHyperParameters"]["data_hint"] = {"Get": missing}
    status, out, err, workdir = run_edited(tmp_path, document)
    assert status == 1, out[-2000:] + err
    steps = steps_by_name(summary_of(workdir))
    assert steps["PrepareData"]["status"] == "Succeeded"
    assert steps["TuneHyperparameters"]["status"] == "Failed"
    reason = steps["TuneHyperparameters"]["reason"]
    assert reason.startswith(f"step TuneHyperparameters: cannot resolve {missing}")
    assert "no item [9]" in reason
    assert steps["TrainSingleInstance"]["status"] == "Not run"


@pytest.mark.parametrize("param, message", [
    ("Nonexistent=1", "the definition has no such parameter"),
    ("ImageSize=large", "ImageSize is of type Integer"),
    ("Backbone=vgg16", "Backbone takes one of resnet18, resnet34, resnet50"),
    ("AccuracyThreshold", "is not NAME=VALUE"),
])
def test_bad_parameters_are_refused_before_the_run(tmp_path: Path, param: str, message: str):
    status, out, err = local_run("--param", param, "--workdir", str(tmp_path / "work"))
    assert status == 2
    assert message in err
    assert not (tmp_path / "work").exists()


def test_definition_from_another_tree_is_refused(tmp_path: Path):
    document = _definition(tmp_path)
    text = json.dumps(document)
    stale = re.sub(r"/assets/code/[0-9a-f]{16}/", "/assets/code/0123456789abcdef/", text)
    assert stale != text
    edited = tmp_path / "stale.json"
    edited.write_text(stale)
    status, out, err = local_run("--definition", str(edited), "--workdir", str(tmp_path / "work"))
    assert status == 2
    assert "assets/code/0123456789abcdef/sourcedir.tar.gz" in err and "synthesize the definition from this tree" in err

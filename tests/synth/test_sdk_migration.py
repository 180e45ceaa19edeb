"""The definition SDK v3 builds means what SDK v2's meant: compared with the stored v2 definition
(tests/fixtures/definition-v2.json, built with the default settings, archive hashes masked), every difference
must be in ALLOWED, a written list of form-only differences, each with its reason and a check of the values.

Core install only (no torch), like tests/test_definition.py.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, NamedTuple

import pytest

from definition_forms import masked
from pipeline.constraints import input_member, named_shape
from pipeline.definition import synth
from pipeline.settings import load_settings
from sources import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "definition-v2.json"
RENAMED_STEPS = {  # v2's RegisterModel collection suffixed the step's name; v3's ModelStep keeps the name given
    f"Register{suffix}-RegisterModel": f"Register{suffix}" for suffix in ("SingleInstance", "MultiInstance")}
TUNING_SETTINGS = {"TuningMaxJobs": 8, "TuningMaxParallelJobs": 2}  # the settings' defaults, the parameters' were the same
TRAININGS = r"Train(Single|Multi)Instance"
STATIC = r"TuneHyperparameters\.Arguments\.TrainingJobDefinition\.StaticHyperParameters"


class Difference(NamedTuple):
    path: str
    old: Any  # MISSING where v3 added it
    new: Any  # MISSING where v3 left it out


MISSING = "<missing>"


class Allowed(NamedTuple):
    path: str  # a regular expression over Difference.path
    accepts: Callable[[Difference], bool]
    reason: str


def was_parameter(difference: Difference) -> bool:
    name = difference.old.get("Get", "").removeprefix("Parameters.") if isinstance(difference.old, dict) else None
    return TUNING_SETTINGS.get(name) == difference.new


ALLOWED = [
    Allowed(r"Parameters\.(TuningMaxJobs|TuningMaxParallelJobs)", lambda d: d.new == MISSING,
            "ResourceLimits is typed int in sagemaker-core's shapes (ResourceLimits.max_parallel_training_jobs: int): "
            "the limits are settings (--tuning-max-jobs, --tuning-max-parallel-jobs), no longer parameters"),
    Allowed(r"TuneHyperparameters\.Arguments\.HyperParameterTuningJobConfig\.ResourceLimits\.Max\w+", was_parameter,
            "the same limits, as the settings' values (equal to the former parameters' defaults)"),
    Allowed(rf"{TRAININGS}\.Arguments\.ProfilerConfig", lambda d: d.old == {"DisableProfiler": True} and d.new == MISSING,
            "ModelTrainer sets no ProfilerConfig; CreateTrainingJob takes none (optional), and without one the job "
            "runs no Debugger profiling, as DisableProfiler said"),
    Allowed(r"TuneHyperparameters\.Arguments\.TrainingJobDefinition\.(HyperParameterTuningResourceConfig|ResourceConfig)",
            lambda d: True,  # the two sides are compared as one below (test_the_tuning_resources_only_moved)
            "ModelTrainer's tuner writes the trials' instances as ResourceConfig, v2 as HyperParameterTuningResourceConfig: "
            "HyperParameterTrainingJobDefinition has both members, each a complete instance configuration"),
    Allowed(r"TuneHyperparameters\.Arguments\.HyperParameterTuningJobConfig\.ParameterRanges\.CategoricalParameterRanges"
            r"\[0\]\.Values\[\d\]", lambda d: json.loads(d.old) == d.new,
            "categorical values are no longer JSON-quoted: the trial gets \"16\" instead of '\"16\"', which the container's "
            "toolkit decodes to the number 16 instead of the text 16; train.py's argparse reads either as --batch_size 16"),
    Allowed(rf"{STATIC}\.sagemaker_(estimator_class_name|estimator_module)", lambda d: d.new == MISSING,
            "v2's record of its own estimator class, for HyperparameterTuner.attach; no container reads it"),
    Allowed(r"Register(Single|Multi)Instance\.Arguments\.InferenceSpecification\.Containers\[0\]\.Framework(Version)?",
            lambda d: d.new == MISSING,
            "ModelBuilder.register writes Framework/FrameworkVersion only for a builder whose framework it detected, and "
            "setting one sends register() through its code upload (an S3 call at build time); both are optional labels "
            "of ModelPackageContainerDefinition: the image, model data and environment that serve the model are unchanged"),
    Allowed(rf"{STATIC}\.sagemaker_job_name", lambda d: d.new == MISSING,
            "v2 wrote the tuning job's base name, which is not any trial's name; train.py does not read it"),
    # Changed in the definition since the migration, not differences of the SDK: each names the docs section.
    Allowed(r"Parameters\.Deployment(Strategy|StepPercent|BakeSeconds)", lambda d: d.old == MISSING,
            "the gradual traffic shifting parameters (docs/day-two.md: Gradual traffic shifting), added after the migration"),
    Allowed(r"Deploy(Single|Multi)Instance\.Arguments\.(deployment_strategy|deployment_step_percent|deployment_bake_seconds"
            r"|max_wait_minutes)", lambda d: d.old == MISSING and str(d.new.get("Get", "")).startswith("Parameters."),
            "the Deploy steps pass those parameters and EndpointWaitMinutes to the deploy function, added after the migration"),
    Allowed(r"Deploy(Single|Multi)Instance\.Arguments\.threads_per_worker", lambda d: d.old == MISSING and d.new == 1,
            "the deploy function sizes TorchServe's workers from it (benchmarks/README.md: Serving under load)"),
    Allowed(r"Evaluate(Single|Multi)Instance\.(Arguments\.AppSpecification\.(ContainerArguments|ImageUri)"
            r"|Arguments\.ProcessingOutputConfig\.Outputs|Description)", lambda d: d.old != MISSING and d.new != MISSING,
            "the Evaluate steps build the serving artifact on the inference image and write the model archive as a second "
            "output (docs/scripts.md: The serving artifact)"),
    Allowed(r"Register(Single|Multi)Instance\.Arguments\.InferenceSpecification\.Containers\[0\]\.ModelDataUrl\.(Get|Std:Join)",
            lambda d: (d.new == MISSING and "ModelArtifacts" in d.old) or (d.old == MISSING and "model.tar.gz" in d.new["Values"]),
            "the package holds the evaluation's archive (the measured serving artifact), not the training job's"),
    Allowed(r"Parameters\.HorizontalFlip|(Train(Single|Multi)Instance\.Arguments\.HyperParameters"
            rf"|{STATIC})\.flip", lambda d: d.old == MISSING,
            "the training recipe's flip switch (docs/scripts.md: The training recipe)"),
    Allowed(r"TuneHyperparameters\.Arguments\.HyperParameterTuningJobConfig\.ParameterRanges\.(Continuous|Integer)"
            r"ParameterRanges\[0\]\.(MinValue|MaxValue)", lambda d: d.old != MISSING and d.new != MISSING,
            "the search ranges follow the recipe (learning rate 0.001-0.05 on a log scale, epochs 4-15)"),
    Allowed(r"TuneHyperparameters\.(Arguments\.TrainingJobDefinition\.(InputDataConfig|StaticHyperParameters\.augment)|Description)",
            lambda d: d.old != MISSING and d.new != MISSING,
            "the trials get the images too and train what the final trainings train (docs/scripts.md: Tuning trains what the final "
            "trainings train)"),
]


def difference_list(old: Any, new: Any, path: str = "") -> list[Difference]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            where = f"{path}.{key}" if path else key
            found += difference_list(old.get(key, MISSING), new.get(key, MISSING), where)
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in difference_list(a, b, f"{path}[{i}]")]
    return [] if old == new else [Difference(path, old, new)]


def comparable(document: dict) -> dict:
    """Steps by name (a condition's branches by the names of their steps), parameters by name."""
    steps: dict[str, dict] = {}

    def collect(items: list[dict]) -> None:
        for step in items:
            step = json.loads(json.dumps(step))
            if step["Type"] == "Condition":
                for branch in ("IfSteps", "ElseSteps"):
                    collect(step["Arguments"][branch])
                    step["Arguments"][branch] = [s["Name"] for s in step["Arguments"][branch]]
            steps[step["Name"]] = step

    collect(document["Steps"])
    return {**{k: v for k, v in document.items() if k not in ("Steps", "Parameters")},
            "Parameters": {p["Name"]: p for p in document["Parameters"]}, **steps}


def renamed(text: str) -> str:
    for old, new in RENAMED_STEPS.items():
        text = re.sub(rf"\b{re.escape(old)}\b", new, text)
    return text


@pytest.fixture(scope="module")
def documents() -> tuple[dict, dict]:
    """The stored v2 definition (register steps renamed) and the v3 one, both masked, as ``comparable`` gives them."""
    v3 = synth(load_settings({}, environ={})).definition
    return comparable(json.loads(renamed(FIXTURE.read_text()))), comparable(json.loads(masked(v3)))


@pytest.fixture(scope="module")
def differences(documents) -> list[Difference]:
    return difference_list(*documents)


def allowance(difference: Difference) -> Allowed | None:
    return next((a for a in ALLOWED if re.fullmatch(a.path, difference.path) and a.accepts(difference)), None)


def test_every_difference_from_the_v2_definition_is_an_allowed_form_difference(differences):
    unexplained = [d for d in differences if allowance(d) is None]
    assert unexplained == []
    assert all(allowance.reason for allowance in ALLOWED)
    unused = [a.path for a in ALLOWED if not any(re.fullmatch(a.path, d.path) for d in differences)]
    assert unused == []  # the allow-list says only what differs


def test_the_comparison_catches_a_change_of_meaning(documents):
    old, new = documents
    changed = json.loads(json.dumps(new))
    changed["TrainSingleInstance"]["Arguments"]["StoppingCondition"]["MaxRuntimeInSeconds"] = 60
    changed["TrainMultiInstance"]["Arguments"]["HyperParameters"]["seed"] = "7"
    del changed["EvaluateSingleInstance"]["RetryPolicies"]
    unexplained = {d.path for d in difference_list(old, changed) if allowance(d) is None}
    assert unexplained == {"TrainSingleInstance.Arguments.StoppingCondition.MaxRuntimeInSeconds",
                           "TrainMultiInstance.Arguments.HyperParameters.seed", "EvaluateSingleInstance.RetryPolicies"}


def test_the_register_steps_keep_their_meaning_under_their_new_names(documents):
    old, new = documents
    for name in RENAMED_STEPS.values():
        assert old[name]["Type"] == new[name]["Type"] == "RegisterModel"
        assert {d.path for d in difference_list(old[name], new[name])} == {
            "Arguments.InferenceSpecification.Containers[0].Framework",
            "Arguments.InferenceSpecification.Containers[0].FrameworkVersion",
            # the evaluation's archive since the migration (docs/scripts.md: The serving artifact)
            "Arguments.InferenceSpecification.Containers[0].ModelDataUrl.Get",
            "Arguments.InferenceSpecification.Containers[0].ModelDataUrl.Std:Join"}
    assert not any("-RegisterModel" in json.dumps(step) for step in new.values())


def test_the_tuning_resources_only_moved(documents):
    old, new = (d["TuneHyperparameters"]["Arguments"]["TrainingJobDefinition"] for d in documents)
    assert new["ResourceConfig"] == old["HyperParameterTuningResourceConfig"]
    definition = named_shape("sagemaker", "HyperParameterTrainingJobDefinition")
    assert {"ResourceConfig", "HyperParameterTuningResourceConfig"} <= set(definition.members)
    assert "ResourceConfig" not in definition.required_members


def test_botocore_takes_each_new_form(documents):
    """The service's own shapes: a categorical value is any string, the limits are integers, ProfilerConfig is optional."""
    _, new = documents
    values = named_shape("sagemaker", "CategoricalParameterRange").members["Values"].member
    assert values.type_name == "string" and values.metadata.get("min", 0) <= 2
    config = new["TuneHyperparameters"]["Arguments"]["HyperParameterTuningJobConfig"]
    assert config["ParameterRanges"]["CategoricalParameterRanges"][0]["Values"] == ["16", "32", "64"]
    limits = input_member("sagemaker", "CreateHyperParameterTuningJob", "HyperParameterTuningJobConfig", "ResourceLimits")
    assert {limits.members[name].type_name for name in config["ResourceLimits"]} == {"integer"}
    assert "ProfilerConfig" not in input_member("sagemaker", "CreateTrainingJob").required_members

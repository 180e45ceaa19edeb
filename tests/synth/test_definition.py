"""The pipeline definition JSON: shape, references, API arguments, service limits, contract, determinism.

These tests need only the core install (no torch), as CodeBuild runs them. With
``DOGBREED_DEFINITION=build/pipeline.json`` they test that file (and the assets
its ``assets.json`` lists) instead of a fresh synth, with the settings of the
environment, as ``dogbreed synth`` in the buildspec built it: CodeBuild tests
the very artifact it then publishes.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jsonschema
import pytest

from pipeline.cli import main
from pipeline.dag import DefinitionError, steps_of, topological_order
from pipeline.definition import load_contract, synth
from pipeline.settings import Settings, SettingsError, load_settings
from pipeline.artifact import load_artifact, read_definition
from pipeline.validate import check_references, findings_of, iter_problems
from sources import ROOT
from steps import filter_sdk_warnings

SCHEMA = json.loads((ROOT / "pipeline" / "definition.schema.json").read_text())
EXPECTED_STEPS = {
    "PrepareData", "ExtractFeatures", "TuneHyperparameters",
    *(f"{verb}{suffix}" for suffix in ("SingleInstance", "MultiInstance") for verb in (
        "Train", "Evaluate", "CheckAccuracy", "CheckApproval", "Deploy", "WaitFor", "Check", "AccuracyTooLow",
        "CheckTwinDeployment", "CheckTwinAccuracy")),
    "RegisterSingleInstance", "RegisterMultiInstance",
    "AccuracyTooLowSingleInstanceAfterMultiInstance", "AccuracyTooLowMultiInstanceAfterSingleInstance",
}
CONTRACT = load_contract(ROOT)
DEFINITION_VARIABLE = "DOGBREED_DEFINITION"
ARTIFACT = os.environ.get(DEFINITION_VARIABLE)


@pytest.fixture(scope="module")
def built_settings() -> Settings:
    """The settings the tested definition was built with."""
    return load_settings(environ=os.environ) if ARTIFACT else load_settings({}, environ={})


@pytest.fixture(scope="module")
def document(request) -> dict:
    if ARTIFACT:
        return read_definition(Path(ARTIFACT))[1]
    return request.getfixturevalue("default_synth").document


@pytest.fixture
def nodes(document):
    return steps_of(document)


def parameter_default(document: dict, name: str):
    return next(p["DefaultValue"] for p in document["Parameters"] if p["Name"] == name)


def resolve_default(document: dict, value):
    """A value with parameter references replaced by the parameters' defaults."""
    if isinstance(value, dict) and "Get" in value and value["Get"].startswith("Parameters."):
        return parameter_default(document, value["Get"].split(".", 1)[1])
    return value


def all_messages(errors):
    for error in errors:
        yield error.message
        yield from all_messages(error.context or [])


# --- shape -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_definition_validates_against_the_project_schema(document):
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    errors = [e.message for e in jsonschema.Draft202012Validator(SCHEMA).iter_errors(document)]
    assert errors == []


@pytest.mark.parametrize("breakage, expected", [
    (lambda d: d["Steps"][0].update(Type="Shell"), "'Shell' is not one of"),
    (lambda d: d["Steps"][0]["Arguments"]["ProcessingInputs"][0]["S3Input"].update(S3Uri={"Get": "Nowhere.X"}), "does not match"),
    (lambda d: d["Parameters"].append({"Name": "Bad", "Type": "Integer", "DefaultValue": "seven"}), "is not of type 'integer'"),
    (lambda d: d["Steps"][0].update(CacheConfig={"Enabled": "yes"}), "is not of type 'boolean'"),
])
def test_schema_rejects_broken_definitions(document, breakage, expected):
    broken = copy.deepcopy(document)
    breakage(broken)
    messages = list(all_messages(jsonschema.Draft202012Validator(SCHEMA).iter_errors(broken)))
    assert any(expected in m for m in messages), messages


def test_every_step_has_a_readable_name_display_name_and_description(nodes):
    assert set(nodes) == EXPECTED_STEPS
    for node in nodes.values():
        assert node.document.get("DisplayName"), node.name
        assert len(node.document.get("Description", "")) > 20, node.name


# --- references and graph ----------------------------------------------------------------

def test_job_step_arguments_are_valid_botocore_input(document):
    assert list(iter_problems(document)) == []


def test_no_value_is_beyond_the_service_limits(document):
    assert [str(finding) for finding in findings_of(document)] == []
    for node in steps_of(document).values():
        for text in node.document.get("Arguments", {}).get("AppSpecification", {}).get("ContainerEntrypoint", []):
            assert len(text) <= 256, node.name


@pytest.mark.slow
def test_the_tested_definition_is_publishable_as_it_is(built_settings, tmp_path):
    """The artifact's archives match its manifest and the source tree, and it targets the settings' account."""
    path = Path(ARTIFACT) if ARTIFACT else tmp_path / "pipeline.json"
    if not ARTIFACT:
        assert main(["synth", "--out", str(path)]) == 0
    loaded = load_artifact(path, built_settings)
    assert loaded.definition == path.read_text()
    assert {asset.name for asset in loaded.assets} == {"code", "lambda"}


def test_botocore_validation_catches_a_wrong_type_and_an_unknown_field(document):
    broken = copy.deepcopy(document)
    training = next(s for s in broken["Steps"] if s["Name"] == "TrainSingleInstance")
    training["Arguments"]["ResourceConfig"]["InstanceCount"] = "one"
    training["Arguments"]["StoppingCondition"]["MaxRuntimeInHours"] = 2
    problems = "\n".join(iter_problems(broken))
    assert "TrainSingleInstance (CreateTrainingJob)" in problems
    assert "ResourceConfig.InstanceCount" in problems
    assert "MaxRuntimeInHours" in problems


@pytest.mark.parametrize("reference, message", [
    ("Parameters.NoSuchParameter", "unknown parameter 'NoSuchParameter'"),
    ("Steps.NoSuchStep.ModelArtifacts.S3ModelArtifacts", "unknown step 'NoSuchStep'"),
    ("Steps.TrainSingleInstance.ModelArtifacts.S3ModelArtefacts", "has no member 'S3ModelArtefacts'"),
    ("Steps.PrepareData.ProcessingOutputConfig.Outputs['nope'].S3Output.S3Uri", "has no output 'nope'"),
    ("Steps.DeploySingleInstance.OutputParameters['url']", "Lambda step DeploySingleInstance has outputs"),
    ("Steps.EvaluateSingleInstance.PropertyFiles.Missing", "has no property file"),
    ("Execution.Tomorrow", "unknown execution variable"),
])
def test_a_broken_reference_is_reported_with_step_and_path(document, reference, message):
    broken = copy.deepcopy(document)
    evaluate = next(s for s in broken["Steps"] if s["Name"] == "EvaluateMultiInstance")
    evaluate["Arguments"]["Environment"]["BROKEN"] = {"Get": reference}
    with pytest.raises(DefinitionError) as error:
        check_references(broken)
    assert "step EvaluateMultiInstance" in str(error.value)
    assert message in str(error.value)


def test_every_reference_resolves_and_the_graph_has_no_cycle(document, nodes):
    check_references(document)
    order = topological_order(nodes)
    assert order.index("PrepareData") < order.index("TuneHyperparameters") < order.index("TrainMultiInstance")
    assert order.index("DeploySingleInstance") < order.index("CheckSingleInstance")


def test_a_cycle_is_reported(document):
    broken = copy.deepcopy(document)
    prepare = next(s for s in broken["Steps"] if s["Name"] == "PrepareData")
    prepare["DependsOn"] = ["TrainSingleInstance"]
    with pytest.raises(DefinitionError, match="cycle: PrepareData -> TrainSingleInstance -> PrepareData"):
        topological_order(steps_of(broken))


def test_branches_hang_off_the_accuracy_condition(nodes):
    for suffix in ("SingleInstance", "MultiInstance"):
        gate = f"CheckAccuracy{suffix}"
        assert nodes[f"Register{suffix}"].branch_of == (gate, "if")
        assert nodes[f"CheckApproval{suffix}"].branch_of == (gate, "if")
        assert nodes[f"Deploy{suffix}"].branch_of == (f"CheckApproval{suffix}", "if")
        assert nodes[f"Check{suffix}"].branch_of == (f"CheckApproval{suffix}", "if")
        assert nodes[f"CheckTwinDeployment{suffix}"].branch_of == (gate, "else")
        assert nodes[f"AccuracyTooLow{suffix}"].branch_of == (f"CheckTwinDeployment{suffix}", "else")


def test_only_an_approved_package_is_deployed(nodes):
    for suffix in ("SingleInstance", "MultiInstance"):
        arguments = nodes[f"CheckApproval{suffix}"].document["Arguments"]
        assert arguments["Conditions"] == [{"Type": "Equals", "LeftValue": {"Get": "Parameters.ModelApprovalStatus"},
                                            "RightValue": "Approved"}]
        assert [s["Name"] for s in arguments["IfSteps"]] == [f"Deploy{suffix}", f"WaitFor{suffix}", f"Check{suffix}",
                                                              f"CheckTwinAccuracy{suffix}"]
        assert arguments["ElseSteps"] == []


def accuracy_condition(suffix: str) -> dict:
    return {"Type": "GreaterThanOrEqualTo", "RightValue": {"Get": "Parameters.AccuracyThreshold"}, "LeftValue": {
        "Std:JsonGet": {"Path": CONTRACT.ACCURACY_JSON_PATH, "PropertyFile": {"Get": f"Steps.Evaluate{suffix}.PropertyFiles.Evaluation{suffix}"}}}}


def test_twins_are_independent_and_a_failure_waits_for_the_twin_deployment(nodes):
    """No Fail step can be reached while the other model's deployment runs: SageMaker would start none of its later steps."""
    for suffix, twin in (("SingleInstance", "MultiInstance"), ("MultiInstance", "SingleInstance")):
        assert nodes[f"CheckAccuracy{suffix}"].document["Arguments"]["Conditions"] == [accuracy_condition(suffix)]
        hold = nodes[f"CheckTwinDeployment{suffix}"].document["Arguments"]
        assert hold["Conditions"] == [accuracy_condition(twin), {
            "Type": "Equals", "LeftValue": {"Get": "Parameters.ModelApprovalStatus"}, "RightValue": "Approved"}]
        assert hold["IfSteps"] == [] and [s["Name"] for s in hold["ElseSteps"]] == [f"AccuracyTooLow{suffix}"]
        report = nodes[f"CheckTwinAccuracy{suffix}"]
        assert report.document["DependsOn"] == [f"Check{suffix}"]
        assert report.document["Arguments"]["Conditions"] == [accuracy_condition(twin)]
        late = nodes[f"AccuracyTooLow{twin}After{suffix}"]
        assert late.branch_of == (f"CheckTwinAccuracy{suffix}", "else") and late.type == "Fail"
        message = json.dumps(late.document["Arguments"]["ErrorMessage"])
        assert f"Steps.Evaluate{twin}.PropertyFiles" in message and "was deployed" in message
        # nothing of one model's deployment depends on the other model's gate
        chain = {f"Register{suffix}", f"CheckApproval{suffix}", f"Deploy{suffix}", f"WaitFor{suffix}", f"Check{suffix}"}
        for name in chain:
            assert not any(twin in dependency for dependency in nodes[name].depends_on), name


def test_a_callback_step_waits_for_each_endpoint_between_deploy_and_check(nodes, built_settings):
    for suffix in ("SingleInstance", "MultiInstance"):
        wait = nodes[f"WaitFor{suffix}"].document
        assert wait["Type"] == "Callback"
        assert wait["SqsQueueUrl"] == built_settings.endpoint_wait_queue_url
        assert wait["Arguments"] == {
            "endpoint_name": {"Get": f"Steps.Deploy{suffix}.OutputParameters['endpoint_name']"},
            "endpoint_config_name": {"Get": f"Steps.Deploy{suffix}.OutputParameters['endpoint_config_name']"},
            "max_wait_minutes": {"Get": "Parameters.EndpointWaitMinutes"},
        }
        assert [o["OutputName"] for o in wait["OutputParameters"]] == ["endpoint_name", "endpoint_config_name", "status"]
        check = nodes[f"Check{suffix}"].document
        assert check["Arguments"]["endpoint_config_name"] == {"Get": f"Steps.WaitFor{suffix}.OutputParameters['endpoint_config_name']"}
        assert check["Arguments"]["wait_seconds"] <= 60  # Check only verifies; the wait is the callback's


def test_the_maximum_wait_is_a_parameter_and_the_queue_a_setting(document):
    assert {"Name": "EndpointWaitMinutes", "Type": "Integer", "DefaultValue": 60} in document["Parameters"]
    settings = load_settings({}, environ={"ENDPOINT_WAIT_QUEUE_URL": "https://sqs.eu-west-1.amazonaws.com/123456789012/waits"})
    assert settings.endpoint_wait_queue_url == "https://sqs.eu-west-1.amazonaws.com/123456789012/waits"
    with pytest.raises(SettingsError, match="endpoint_wait_queue_url='http://example.com/q' is not an SQS queue URL"):
        load_settings({}, environ={"ENDPOINT_WAIT_QUEUE_URL": "http://example.com/q"})


# --- what the steps do ------------------------------------------------------------------------

def test_instance_counts_are_1_and_7_by_default(document, nodes):
    single = nodes["TrainSingleInstance"].document["Arguments"]["ResourceConfig"]["InstanceCount"]
    multi = nodes["TrainMultiInstance"].document["Arguments"]["ResourceConfig"]["InstanceCount"]
    assert resolve_default(document, single) == 1
    assert multi == {"Get": "Parameters.MultiInstanceCount"}
    assert resolve_default(document, multi) == 7


def test_both_training_steps_take_the_best_hyperparameters_and_never_the_test_split(nodes):
    for name in ("TrainSingleInstance", "TrainMultiInstance"):
        arguments = nodes[name].document["Arguments"]
        for hyperparameter in ("learning_rate", "batch_size", "epochs"):
            value = json.dumps(arguments["HyperParameters"][hyperparameter])
            assert f"Steps.TuneHyperparameters.BestTrainingJob.TunedHyperParameters['{hyperparameter}']" in value
        channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in arguments["InputDataConfig"]}
        assert set(channels) == {CONTRACT.TRAIN_CHANNEL, CONTRACT.VALID_CHANNEL, CONTRACT.PRETRAINED_CHANNEL}
        assert "'test'" not in json.dumps(channels)


def test_tuning_is_bayesian_over_log_learning_rate_batch_size_and_epochs(nodes):
    config = nodes["TuneHyperparameters"].document["Arguments"]["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Bayesian"
    assert config["HyperParameterTuningJobObjective"] == {"MetricName": CONTRACT.OBJECTIVE_METRIC, "Type": "Minimize"}
    ranges = config["ParameterRanges"]
    assert ranges["ContinuousParameterRanges"][0]["Name"] == "learning_rate"
    assert ranges["ContinuousParameterRanges"][0]["ScalingType"] == "Logarithmic"
    assert ranges["CategoricalParameterRanges"][0]["Name"] == "batch_size"
    assert ranges["IntegerParameterRanges"][0]["Name"] == "epochs"
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 8, "MaxParallelTrainingJobs": 2}


@pytest.mark.slow
def test_tuning_limits_are_settings_from_flags_or_environment_within_the_tuning_quotas():
    """ResourceLimits is typed int in sagemaker-core's shapes: the limits are fixed when the definition is built."""
    from pipeline.cli import build_parser
    from pipeline.commands import settings_from_args

    args = build_parser().parse_args(["synth", "--tuning-max-jobs", "20", "--tuning-max-parallel-jobs", "4"])
    assert (settings_from_args(args).tuning_max_jobs, settings_from_args(args).tuning_max_parallel_jobs) == (20, 4)
    environ = {"TUNING_MAX_JOBS": "12", "TUNING_MAX_PARALLEL_JOBS": "3"}
    assert (load_settings({}, environ=environ).tuning_max_jobs, load_settings({}, environ=environ).tuning_max_parallel_jobs) == (12, 3)
    limits = steps_of(synth(load_settings({"tuning_max_jobs": 5, "tuning_max_parallel_jobs": 5}, environ={})).document)
    assert limits["TuneHyperparameters"].document["Arguments"]["HyperParameterTuningJobConfig"]["ResourceLimits"] == {
        "MaxNumberOfTrainingJobs": 5, "MaxParallelTrainingJobs": 5}
    for flags, message in (({"tuning_max_jobs": "751"}, "tuning_max_jobs=751 is not an integer from 1 to 750: a Bayesian"),
                           ({"tuning_max_parallel_jobs": 0}, "tuning_max_parallel_jobs=0 is not an integer from 1 to 100"),
                           ({"tuning_max_jobs": 2, "tuning_max_parallel_jobs": 3},
                            "tuning_max_parallel_jobs=3 exceeds tuning_max_jobs=2: a tuning job cannot run more trials"),
                           ({"tuning_max_jobs": "many"}, "tuning_max_jobs='many' is not an integer")):
        with pytest.raises(SettingsError, match=message):
            load_settings(flags, environ={})


def test_metric_definitions_are_the_contract_of_the_training_script(nodes):
    expected = CONTRACT.metric_definitions()
    tuning = nodes["TuneHyperparameters"].document["Arguments"]["TrainingJobDefinition"]
    assert tuning["AlgorithmSpecification"]["MetricDefinitions"] == expected
    for name in ("TrainSingleInstance", "TrainMultiInstance"):
        assert nodes[name].document["Arguments"]["AlgorithmSpecification"]["MetricDefinitions"] == expected


def test_the_accuracy_gate_reads_the_evaluation_file_the_evaluate_script_writes(nodes, document):
    for suffix in ("SingleInstance", "MultiInstance"):
        evaluate = nodes[f"Evaluate{suffix}"].document
        (property_file,) = evaluate["PropertyFiles"]
        assert property_file["FilePath"] == CONTRACT.EVALUATION_FILE
        outputs = {o["OutputName"] for o in evaluate["Arguments"]["ProcessingOutputConfig"]["Outputs"]}
        assert property_file["OutputName"] in outputs
        (condition,) = nodes[f"CheckAccuracy{suffix}"].document["Arguments"]["Conditions"]
        assert condition["Type"] == "GreaterThanOrEqualTo"
        assert condition["LeftValue"]["Std:JsonGet"]["Path"] == CONTRACT.ACCURACY_JSON_PATH
        assert condition["RightValue"] == {"Get": "Parameters.AccuracyThreshold"}
        message = json.dumps(nodes[f"AccuracyTooLow{suffix}"].document["Arguments"]["ErrorMessage"])
        assert CONTRACT.ACCURACY_JSON_PATH in message and "Parameters.AccuracyThreshold" in message


def test_expensive_steps_are_cached_and_retried_on_throttling_and_capacity(nodes):
    for name in ("PrepareData", "TuneHyperparameters", "TrainSingleInstance", "TrainMultiInstance",
                 "EvaluateSingleInstance", "EvaluateMultiInstance"):
        step = nodes[name].document
        assert step["CacheConfig"]["Enabled"] is True, name
        exceptions = {e for policy in step["RetryPolicies"] for e in policy["ExceptionType"]}
        assert {"Step.THROTTLING", "SageMaker.CAPACITY_ERROR", "SageMaker.RESOURCE_LIMIT"} <= exceptions, name


def test_evaluation_builds_on_the_inference_image_and_its_archive_is_registered(nodes):
    """The Evaluate steps run on the image the endpoint runs (its torch builds the serving artifact), and the model
    package points at the archive they write, not at the training job's."""
    training_image = nodes["TrainSingleInstance"].document["Arguments"]["AlgorithmSpecification"]["TrainingImage"]
    assert training_image.endswith(":2.8-cpu-py312") and "pytorch-training" in training_image
    assert nodes["PrepareData"].document["Arguments"]["AppSpecification"]["ImageUri"] == training_image
    for suffix in ("SingleInstance", "MultiInstance"):
        evaluation = nodes[f"Evaluate{suffix}"].document["Arguments"]
        (container,) = nodes[f"Register{suffix}"].document["Arguments"]["InferenceSpecification"]["Containers"]
        assert container["Image"].endswith(":2.6-cpu-py312") and "pytorch-inference" in container["Image"]
        assert evaluation["AppSpecification"]["ImageUri"] == container["Image"]
        assert container["Environment"]["SAGEMAKER_PROGRAM"] == CONTRACT.INFERENCE_SCRIPT
        assert container["ModelDataUrl"] == {"Std:Join": {"On": "/", "Values": [
            {"Get": f"Steps.Evaluate{suffix}.ProcessingOutputConfig.Outputs['model'].S3Output.S3Uri"}, CONTRACT.MODEL_ARCHIVE]}}
        (output,) = [o for o in evaluation["ProcessingOutputConfig"]["Outputs"] if o["OutputName"] == "model"]
        arguments = evaluation["AppSpecification"]["ContainerArguments"]
        assert arguments[arguments.index("--archive-output") + 1] == output["S3Output"]["LocalPath"]


def test_registration_carries_the_evaluation_as_model_metrics(nodes, built_settings):
    arguments = nodes["RegisterMultiInstance"].document["Arguments"]
    statistics = arguments["ModelMetrics"]["ModelQuality"]["Statistics"]
    assert statistics["ContentType"] == "application/json"
    assert CONTRACT.EVALUATION_FILE in json.dumps(statistics["S3Uri"])
    assert arguments["ModelApprovalStatus"] == {"Get": "Parameters.ModelApprovalStatus"}
    assert arguments["ModelPackageGroupName"] == built_settings.model_package_group
    serving = arguments["InferenceSpecification"]["SupportedRealtimeInferenceInstanceTypes"]
    assert "ml.m5.large" in serving and not any(t.startswith(("ml.g", "ml.p")) for t in serving)


def test_no_experiment_is_created_per_execution(document):
    assert document["PipelineExperimentConfig"] is None


def test_lambda_steps_call_the_published_aliases_with_their_inputs(nodes, built_settings):
    settings = built_settings
    deploy = nodes["DeployMultiInstance"].document
    assert deploy["FunctionArn"] == settings.lambda_arn("deploy-endpoint")
    assert deploy["Arguments"]["model_package_arn"] == {"Get": "Steps.RegisterMultiInstance.ModelPackageArn"}
    assert deploy["Arguments"]["endpoint_name"] == f"{settings.project_name}-multi-instance"
    check = nodes["CheckMultiInstance"].document
    assert check["FunctionArn"] == settings.lambda_arn("check-endpoint")
    assert check["Arguments"]["endpoint_name"] == {"Get": "Steps.WaitForMultiInstance.OutputParameters['endpoint_name']"}
    assert check["Arguments"]["endpoint_config_name"] == {
        "Get": "Steps.WaitForMultiInstance.OutputParameters['endpoint_config_name']"}
    assert check["Arguments"]["num_classes"] == {"Std:JsonGet": {
        "Path": CONTRACT.CLASS_COUNT_JSON_PATH, "PropertyFile": {"Get": "Steps.PrepareData.PropertyFiles.Manifest"}}}


def test_the_deploy_steps_shift_traffic_as_the_deployment_parameters_say(nodes, document):
    for suffix in ("SingleInstance", "MultiInstance"):
        arguments = nodes[f"Deploy{suffix}"].document["Arguments"]
        for name, parameter in (("deployment_strategy", "DeploymentStrategy"), ("deployment_step_percent", "DeploymentStepPercent"),
                                ("deployment_bake_seconds", "DeploymentBakeSeconds"), ("max_wait_minutes", "EndpointWaitMinutes")):
            assert arguments[name] == {"Get": f"Parameters.{parameter}"}, (suffix, name)
    assert parameter_default(document, "DeploymentStrategy") == "all-at-once"


@pytest.mark.slow
def test_multi_instance_traffic_is_encrypted_and_kms_applies_when_set(nodes):
    assert nodes["TrainMultiInstance"].document["Arguments"]["EnableInterContainerTrafficEncryption"] is True
    assert "EnableInterContainerTrafficEncryption" not in nodes["TrainSingleInstance"].document["Arguments"] or \
        nodes["TrainSingleInstance"].document["Arguments"]["EnableInterContainerTrafficEncryption"] is False
    key = "arn:aws:kms:us-east-1:111122223333:key/0f1e2d3c-aaaa-bbbb-cccc-1234567890ab"
    encrypted = steps_of(synth(load_settings({"kms_key_id": key}, environ={})).document)
    training = encrypted["TrainMultiInstance"].document["Arguments"]
    assert training["ResourceConfig"]["VolumeKmsKeyId"] == key
    assert training["OutputDataConfig"]["KmsKeyId"] == key
    assert encrypted["PrepareData"].document["Arguments"]["ProcessingOutputConfig"]["KmsKeyId"] == key


@pytest.mark.slow
def test_spot_training_is_a_setting_that_keeps_checkpoints(nodes):
    # SageMaker's cache key includes CheckpointConfig, whose URI is unique to an execution:
    # on-demand training goes without, so that an unchanged step can be a cache hit.
    on_demand = nodes["TrainSingleInstance"].document["Arguments"]
    assert "CheckpointConfig" not in on_demand and not on_demand.get("EnableManagedSpotTraining")
    spot = steps_of(synth(load_settings({"spot_training": True}, environ={})).document)
    arguments = spot["TrainMultiInstance"].document["Arguments"]
    assert arguments["EnableManagedSpotTraining"] is True
    assert "checkpoints" in json.dumps(arguments["CheckpointConfig"]["S3Uri"])
    assert arguments["StoppingCondition"]["MaxWaitTimeInSeconds"] >= arguments["StoppingCondition"]["MaxRuntimeInSeconds"]


# --- settings -------------------------------------------------------------------------------

def test_settings_come_from_flags_then_environment_then_defaults():
    environ = {"AWS_REGION": "eu-west-1", "ARTIFACT_BUCKET": "env-bucket", "SAGEMAKER_PROJECT_NAME": "dogs",
               "SAGEMAKER_PROJECT_ID": "p-abc123"}
    settings = load_settings({"bucket": "flag-bucket"}, environ=environ)
    assert (settings.region, settings.bucket, settings.project_name) == ("eu-west-1", "flag-bucket", "dogs")
    assert settings.pipeline_role_arn == f"arn:aws:iam::{settings.account}:role/dogs-pipeline"
    assert {"Key": "sagemaker:project-id", "Value": "p-abc123"} in settings.all_tags()
    assert load_settings({}, environ={}) == Settings()


def test_every_instance_type_parameter_defaults_to_its_setting_flag():
    from pipeline.cli import build_parser
    from pipeline.commands import settings_from_args
    from steps.parameters import define_parameters

    chosen = {"ProcessingInstanceType": "ml.c5.xlarge", "TrainingInstanceType": "ml.g5.xlarge",
              "TuningInstanceType": "ml.c5.2xlarge", "EndpointInstanceType": "ml.g4dn.xlarge"}
    flags = [f"--{name.removesuffix('InstanceType').lower()}-instance-type" for name in chosen]
    args = build_parser().parse_args(["synth", *(item for pair in zip(flags, chosen.values()) for item in pair)])
    parameters = define_parameters(settings_from_args(args), no_weights_uri="s3://bucket/code/sourcedir.tar.gz")
    assert {p.name: p.default_value for p in parameters.as_list() if p.name in chosen} == chosen
    assert Settings().tuning_instance_type == "ml.m5.large"


@pytest.mark.parametrize("flags, message", [
    ({"region": "mars-1"}, "region='mars-1' is not an AWS region"),
    ({"account": "12"}, "account='12' is not a 12-digit AWS account id"),
    ({"pipeline_role_arn": "admin"}, "pipeline_role_arn='admin' is not an IAM role ARN"),
    ({"bucket": "Bad_Bucket"}, "bucket='Bad_Bucket' is not an S3 bucket name"),
    ({"source_dir": "/"}, "has no code/ folder"),
])
def test_bad_settings_are_refused_with_the_setting_named(flags, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        load_settings(flags, environ={})


# --- command line, offline and deterministic ------------------------------------------------

SOCKET_GUARD = """
import socket, os
_log = os.environ["SOCKET_LOG"]
def _refuse(self, address, *args):
    with open(_log, "a") as handle:
        handle.write(repr(address) + "\\n")
    raise OSError("network is blocked in this test")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
"""


def offline_synth(tmp_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run ``dogbreed synth`` in a fresh interpreter with no AWS settings and every socket refused."""
    guard = tmp_path / "guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(SOCKET_GUARD)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SAGEMAKER_", "ARTIFACT_"))}
    env.update(HOME=str(home), PYTHONPATH=str(guard), SOCKET_LOG=str(tmp_path / "sockets.log"))
    command = [sys.executable, "-m", "pipeline.cli", "synth", "--out", str(out), *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_synth_is_offline_and_byte_for_byte_deterministic(tmp_path):
    first = offline_synth(tmp_path, tmp_path / "a" / "pipeline.json")
    second = offline_synth(tmp_path, tmp_path / "b" / "pipeline.json")
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert first.stderr == "", "synth prints no warning"
    assert not (tmp_path / "sockets.log").exists(), (tmp_path / "sockets.log").read_text()
    for name in ("pipeline.json", "assets.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    text = (tmp_path / "a" / "pipeline.json").read_text()
    assert json.loads(text) and text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    manifest = json.loads((tmp_path / "a" / "assets.json").read_text())
    for asset in manifest["assets"]:
        archive = tmp_path / "a" / "assets" / asset["sha256"][:16] / asset["filename"]
        assert archive.is_file() and asset["s3_uri"] in text + json.dumps(manifest)


def test_the_sdk_notices_are_silenced_by_category_message_and_module_and_nothing_else():
    moved = "sagemaker.train.configs has been moved to sagemaker.core.training.configs. Please update your imports."
    raised = [(moved, DeprecationWarning, "sagemaker.train.model_trainer"),  # the SDK's own import: silenced
              (moved, DeprecationWarning, "pipeline.definition"),  # the same shim imported here: shown
              (moved, FutureWarning, "sagemaker.train.model_trainer"),
              ("ModelTrainer(source_code=...) is deprecated", DeprecationWarning, "sagemaker.train.model_trainer"),
              ("Running within a PipelineSession, there will be No Wait, No Logs, and No Job being started.",
               UserWarning, "sagemaker.core.workflow.pipeline_context")]  # silenced
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_sdk_warnings()
        for message, category, module in raised:
            warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)
    assert [(str(w.message), w.category) for w in caught] == [(m, c) for m, c, _ in raised[1:4]]


@pytest.mark.slow
def test_a_change_in_code_changes_only_the_code_asset_key(tmp_path):
    tree = tmp_path / "tree"
    for folder in ("code", "lambda"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    before = synth(load_settings({"source_dir": str(tree)}, environ={}))
    with open(tree / "code" / "train.py", "a") as handle:
        handle.write("\n# a change\n")
    after = synth(load_settings({"source_dir": str(tree)}, environ={}))
    assert after.assets.lambdas.s3_uri == before.assets.lambdas.s3_uri
    assert after.assets.code.s3_uri != before.assets.code.s3_uri
    assert after.definition != before.definition
    assert after.definition.replace(after.assets.code.s3_uri, before.assets.code.s3_uri) == before.definition


@pytest.mark.slow
def test_synth_command_writes_definition_and_manifest(tmp_path, capsys):
    out = tmp_path / "out" / "pipeline.json"
    assert main(["synth", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    manifest = json.loads((out.parent / "assets.json").read_text())
    assert {a["name"] for a in manifest["assets"]} == {"code", "lambda"}
    code = next(a for a in manifest["assets"] if a["name"] == "code")
    assert "train.py" in code["files"] and "contract.py" in code["files"]


@pytest.mark.slow
def test_graph_command_draws_every_step_in_mermaid_and_dot(capsys):
    assert main(["graph"]) == 0
    mermaid = capsys.readouterr().out
    assert mermaid.startswith("flowchart TD")
    assert "TuneHyperparameters --> TrainMultiInstance" in mermaid
    assert "CheckTwinDeploymentSingleInstance -- else --> AccuracyTooLowSingleInstance" in mermaid
    assert "DeploySingleInstance --> WaitForSingleInstance" in mermaid and "WaitForSingleInstance --> CheckSingleInstance" in mermaid
    assert main(["graph", "--format", "dot"]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith("digraph pipeline {")
    for name in EXPECTED_STEPS:
        assert f'"{name}"' in dot


def test_a_bad_flag_is_one_line_and_exit_status_2(capsys):
    assert main(["synth", "--region", "nowhere"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "region='nowhere'" in error


# --- CodeBuild: the account and region of the build, offline ---------------------------------

BUILD_ARN = "arn:aws:codebuild:eu-west-1:444455556666:build/dogbreed-build:0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e"


def test_codebuild_build_arn_gives_account_and_region_after_flags_and_environment():
    settings = load_settings({}, environ={"CODEBUILD_BUILD_ARN": BUILD_ARN})
    assert (settings.account, settings.region) == ("444455556666", "eu-west-1")
    assert settings.bucket == "dogbreed-artifacts-444455556666-eu-west-1"
    environ = {"CODEBUILD_BUILD_ARN": BUILD_ARN, "AWS_ACCOUNT_ID": "777788889999", "AWS_REGION": "us-west-2"}
    assert (load_settings({}, environ=environ).account, load_settings({}, environ=environ).region) == ("777788889999", "us-west-2")
    flagged = load_settings({"account": "123456789012", "region": "ap-south-1"}, environ={"CODEBUILD_BUILD_ARN": BUILD_ARN})
    assert (flagged.account, flagged.region) == ("123456789012", "ap-south-1")


def test_an_artifact_for_another_account_or_region_is_refused(document, built_settings):
    from pipeline.artifact import target_mismatches

    assert target_mismatches(Path("p.json"), document, built_settings) == []
    other = load_settings({"account": "999988887777", "region": "eu-central-1"}, environ={})
    problems = target_mismatches(Path("p.json"), document, other)
    assert any(p.startswith(f"p.json was built for account {built_settings.account} (e.g. arn:aws:") for p in problems)
    assert any(p.startswith(f"p.json was built for region {built_settings.region} (e.g. ") for p in problems)
    shared_key = copy.deepcopy(document)  # a KMS key of another account is allowed: only what the pipeline creates or calls counts
    shared_key["Steps"][0]["Arguments"]["ProcessingOutputConfig"]["KmsKeyId"] = \
        f"arn:aws:kms:{built_settings.region}:555566667777:key/0f1e2d3c-aaaa-bbbb-cccc-1234567890ab"
    assert target_mismatches(Path("p.json"), shared_key, built_settings) == []


def test_a_malformed_codebuild_build_arn_is_refused():
    with pytest.raises(SettingsError, match=r"CODEBUILD_BUILD_ARN='arn:aws:codebuild:nowhere' is not a CodeBuild build ARN"):
        load_settings({}, environ={"CODEBUILD_BUILD_ARN": "arn:aws:codebuild:nowhere"})


# --- dogbreed validate ------------------------------------------------------------------------

OLD_BOOTSTRAP = (  # the processing entrypoint before it was made to fit CreateProcessingJob's 256 characters
    "set -euo pipefail; mkdir -p /opt/ml/processing/code; "
    "tar -xzf /opt/ml/processing/input/code/sourcedir.tar.gz -C /opt/ml/processing/code; cd /opt/ml/processing/code; "
    "if [ -f requirements.txt ]; then python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt; fi; "
    'script="$1"; shift; exec python3 "$script" "$@"'
)


def test_validate_reports_the_old_entrypoint_and_passes_the_new_one(document, tmp_path, capsys):
    good = tmp_path / "pipeline.json"
    good.write_text(json.dumps(document))
    assert main(["validate", str(good)]) == 0
    assert capsys.readouterr().out.startswith(f"{good}: valid (")
    assert len(OLD_BOOTSTRAP) == 329
    broken = copy.deepcopy(document)
    processing = [s for s in broken["Steps"] if s["Type"] == "Processing"]
    for step in processing:
        step["Arguments"]["AppSpecification"]["ContainerEntrypoint"][2] = OLD_BOOTSTRAP
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps(broken))
    assert main(["validate", str(bad)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"{bad}: {len(processing)} problems"
    for step in processing:
        assert (f"  step {step['Name']}, Arguments.AppSpecification.ContainerEntrypoint[2]: 329 characters; "
                "allowed: at most 256 characters (ContainerEntrypointString)") in lines


@pytest.mark.parametrize("breakage, expected", [
    (lambda d: next(p for p in d["Parameters"] if p["Name"] == "ImageSize").update(DefaultValue=16),
     "parameter ImageSize, DefaultValue: 16 is outside; allowed: 32 to 1024, since train.py refuses"),
    (lambda d: next(s for s in d["Steps"] if s["Name"] == "TuneHyperparameters")["Arguments"][
        "HyperParameterTuningJobConfig"]["ResourceLimits"].update(MaxParallelTrainingJobs=9),
     "step TuneHyperparameters, Arguments.HyperParameterTuningJobConfig.ResourceLimits.MaxParallelTrainingJobs: "
     "9 parallel of 8; allowed: no more parallel training jobs than training jobs in all"),
    (lambda d: next(p for p in d["Parameters"] if p["Name"] == "TrainingInstanceType").update(DefaultValue="ml.m5.huge"),
     "step TrainSingleInstance, Arguments.ResourceConfig.InstanceType: parameter TrainingInstanceType's default "
     "'ml.m5.huge': \"ml.m5.huge\" is not among them; allowed: one of"),
    (lambda d: next(s for s in d["Steps"] if s["Name"] == "TrainSingleInstance")["Arguments"]["ResourceConfig"].update(
        InstanceCount={"Get": "Steps.PrepareData.ProcessingOutputConfig.Outputs['train'].S3Output.S3Uri"}),
     "step TrainSingleInstance, Arguments.ResourceConfig.InstanceCount: Steps.PrepareData.ProcessingOutputConfig."
     "Outputs['train'].S3Output.S3Uri gives a string; allowed: an integer (TrainingInstanceCount)"),
    (lambda d: d["Steps"][0].update(DisplayName="Prepare " * 40),
     "step PrepareData, DisplayName: 320 characters; allowed: at most 256 characters (StepDisplayName)"),
])
def test_synth_checks_find_parameter_defaults_and_names_beyond_the_rules(document, breakage, expected):
    broken = copy.deepcopy(document)
    breakage(broken)
    problems = "\n".join(str(f) for f in findings_of(broken))
    assert expected in problems, problems


def test_validate_refuses_a_file_that_is_not_a_definition(tmp_path, capsys):
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    assert main(["validate", str(path)]) == 2
    assert "is not a pipeline definition" in capsys.readouterr().err

"""The parts of local-run on their own: references, the container contract, tuning draws, conditions, the data plane."""
from __future__ import annotations

import json
import math
import random
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from colour_images import write_images
from sources import CODE_DIR
from pipeline.local import aws
from pipeline.local.conditions import evaluate_all
from pipeline.local.errors import LocalRunError
from pipeline.local.jobs import rewrite_opt_ml
from pipeline.local.model_container import ModelContainer
from pipeline.local.runtime import RuntimeServer
from pipeline.local.training_job import decoded_hyperparameters, parse_metrics, user_arguments
from pipeline.files import replacing, write_atomically, write_json
from pipeline.local.references import PropertyFile, Resolver, Scope, UnresolvableReference
from pipeline.local.results import (
    CallbackRecord,
    CallbackResult,
    ConditionResult,
    RegisterResult,
    TrainingResult,
    TrialRecord,
    TuningResult,
)
from pipeline.local.s3 import LocalS3
from pipeline.local.state import StepFailure, failing_with
from pipeline.local.tuning import draw
from pipeline.status import Status

import contract

BOOTSTRAP = ("set -euo pipefail; mkdir -p /opt/ml/processing/code; "
             "tar -xzf /opt/ml/processing/input/code/sourcedir.tar.gz -C /opt/ml/processing/code")


# ---------------------------------------------------------------- references

def scope() -> Scope:
    state = Scope(parameters={"ImageSize": 64, "AccuracyThreshold": 0.7, "Flag": True},
                  execution={"PipelineExecutionId": "local-1"})
    state.set_properties("PrepareData", {"ProcessingOutputConfig": {"Outputs": [
        {"OutputName": "train", "S3Output": {"S3Uri": "s3://b/x/train"}},
        {"OutputName": "test", "S3Output": {"S3Uri": "s3://b/x/test"}},
    ]}})
    state.set_properties("Tune", {"BestTrainingJob": {"TunedHyperParameters": {"batch_size": '"32"'}}})
    state.add_property_file(PropertyFile("Evaluate", "Evaluation", "s3://b/x/evaluation.json",
                                         {"metrics": {"accuracy": {"value": 0.91}}, "list": [{"v": 1}, {"v": 2}]}))
    state.mark_not_run("Register", "skipped: the else branch ran")
    return state


def test_gets_joins_and_json_gets_resolve_as_sagemaker_does():
    resolver = Resolver(scope(), "Train")
    value = resolver.resolve({
        "uri": {"Get": "Steps.PrepareData.ProcessingOutputConfig.Outputs['test'].S3Output.S3Uri"},
        "size": {"Std:Join": {"On": "", "Values": [{"Get": "Parameters.ImageSize"}]}},
        "path": {"Std:Join": {"On": "/", "Values": ["s3://b", {"Get": "Execution.PipelineExecutionId"}, {"Get": "Parameters.Flag"}]}},
        "batch": {"Get": "Steps.Tune.BestTrainingJob.TunedHyperParameters['batch_size']"},
        "accuracy": {"Std:JsonGet": {"PropertyFile": {"Get": "Steps.Evaluate.PropertyFiles.Evaluation"}, "Path": "metrics.accuracy.value"}},
        "second": {"Std:JsonGet": {"PropertyFile": {"Get": "Steps.Evaluate.PropertyFiles.Evaluation"}, "Path": "list[1].v"}},
        "plain": ["kept", 3],
    })
    assert value == {"uri": "s3://b/x/test", "size": "64", "path": "s3://b/local-1/true", "batch": '"32"',
                     "accuracy": 0.91, "second": 2, "plain": ["kept", 3]}


@pytest.mark.parametrize("reference, detail", [
    ({"Get": "Parameters.Missing"}, "no parameter 'Missing'"),
    ({"Get": "Steps.PrepareData.ProcessingOutputConfig.Outputs['valid'].S3Output.S3Uri"}, "no item named 'valid' (names: train, test)"),
    ({"Get": "Steps.PrepareData.ProcessingOutputConfig.Outputz"}, "has no 'Outputz'"),
    ({"Get": "Steps.Register.ModelPackageArn"}, "step Register did not run (skipped: the else branch ran)"),
    ({"Get": "Steps.Later.ModelArtifacts.S3ModelArtifacts"}, "step Later has not finished"),
    ({"Std:JsonGet": {"PropertyFile": {"Get": "Steps.Evaluate.PropertyFiles.Evaluation"}, "Path": "metrics.acuracy.value"}},
     "has no 'acuracy'"),
])
def test_unresolvable_references_name_the_step_and_the_reference(reference, detail):
    with pytest.raises(UnresolvableReference) as error:
        Resolver(scope(), "EvaluateSingleInstance").resolve({"field": reference})
    message = str(error.value)
    assert message.startswith("step EvaluateSingleInstance: cannot resolve ")
    if "Get" in reference:
        assert reference["Get"] in message
    assert detail in message


# ---------------------------------------------------------------- the container contract

def test_opt_ml_paths_move_under_the_container_root(tmp_path: Path):
    root = tmp_path / "job" / "algo-1"
    rewritten = rewrite_opt_ml(["/bin/bash", "-c", BOOTSTRAP, "bootstrap", "preprocess.py", "--output", "/opt/ml/processing/output",
                                "/opt/mlx", "data/opt/ml/x", "/opt/ml"], root)
    assert rewritten[2] == BOOTSTRAP.replace("/opt/ml/", f"{root}/opt/ml/")
    assert rewritten[6] == f"{root}/opt/ml/processing/output"
    assert rewritten[7:] == ["/opt/mlx", "data/opt/ml/x", f"{root}/opt/ml"]
    assert rewrite_opt_ml({"SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code", "N": 1}, root) == \
        {"SAGEMAKER_SUBMIT_DIRECTORY": f"{root}/opt/ml/model/code", "N": 1}


def test_hyperparameters_reach_the_script_as_the_training_toolkit_passes_them():
    raw = {"batch_size": '"64"', "learning_rate": "0.0123", "epochs": "7", "augment": '"true"', "backbone": "resnet18",
           "sagemaker_program": '"train.py"', "sagemaker_submit_directory": '"s3://b/code.tar.gz"',
           "_tuning_objective_metric": "best_val_loss", "options": '{"b": 2, "a": 1}'}
    decoded = decoded_hyperparameters(raw)
    assert decoded["batch_size"] == "64" and decoded["learning_rate"] == 0.0123 and decoded["backbone"] == "resnet18"
    assert user_arguments(decoded) == [
        "--_tuning_objective_metric", "best_val_loss", "--augment", "true", "--backbone", "resnet18", "--batch_size", "64",
        "--epochs", "7", "--learning_rate", "0.0123", "--options", "a=1,b=2",
    ]


def test_metric_definitions_read_the_training_log():
    definitions = contract.metric_definitions()
    log = "\n".join([
        "2026-01-01 INFO [rank 0/7] device cpu",
        contract.format_metric_line(1, {"train_loss": 1.5, "val_loss": 1.25, "val_accuracy": 0.5, "best_val_loss": 1.25}),
        "noise val_loss=9",
        contract.format_metric_line(2, {"train_loss": 0.75, "val_loss": 0.625, "val_accuracy": 0.875,
                                        "best_val_loss": 0.625}),
    ])
    assert parse_metrics(log, definitions) == {"train_loss": [1.5, 0.75], "val_loss": [1.25, 0.625],
                                               "val_accuracy": [0.5, 0.875], "best_val_loss": [1.25, 0.625]}


# ---------------------------------------------------------------- tuning draws and conditions

RANGES = {
    "ContinuousParameterRanges": [{"Name": "learning_rate", "MinValue": "0.0001", "MaxValue": "0.1", "ScalingType": "Logarithmic"}],
    "IntegerParameterRanges": [{"Name": "epochs", "MinValue": "3", "MaxValue": "15", "ScalingType": "Auto"}],
    "CategoricalParameterRanges": [{"Name": "batch_size", "Values": ['"16"', '"32"', '"64"']}],
}


def test_draws_follow_the_ranges_and_their_scaling():
    rng = random.Random("test")
    draws = [draw(RANGES, rng) for _ in range(600)]
    rates = [float(d["learning_rate"]) for d in draws]
    assert all(1e-4 <= rate <= 0.1 for rate in rates)
    below_geometric_mean = sum(rate < math.sqrt(1e-4 * 0.1) for rate in rates) / len(rates)
    assert 0.42 < below_geometric_mean < 0.58  # log-uniform: half below the geometric mean (uniform: 3%)
    assert {d["epochs"] for d in draws} == {str(n) for n in range(3, 16)}
    assert {d["batch_size"] for d in draws} == {'"16"', '"32"', '"64"'}  # as the range lists them
    assert [draw(RANGES, random.Random("same")) for _ in range(2)][0] == draw(RANGES, random.Random("same"))


def test_conditions_compare_numbers_and_combine():
    resolve = Resolver(scope(), "Gate").resolve
    accuracy = {"Std:JsonGet": {"PropertyFile": {"Get": "Steps.Evaluate.PropertyFiles.Evaluation"}, "Path": "metrics.accuracy.value"}}
    threshold = {"Get": "Parameters.AccuracyThreshold"}
    outcome, notes = evaluate_all([{"Type": "GreaterThanOrEqualTo", "LeftValue": accuracy, "RightValue": threshold}], resolve)
    assert outcome is True and notes == ["0.91 >= 0.7: True"]
    outcome, _ = evaluate_all([
        {"Type": "GreaterThanOrEqualTo", "LeftValue": accuracy, "RightValue": threshold},
        {"Type": "LessThan", "LeftValue": "0.95", "RightValue": accuracy},
    ], resolve)
    assert outcome is False  # all conditions must hold; a numeric string compares as a number
    outcome, _ = evaluate_all([{"Type": "Or", "Conditions": [
        {"Type": "Equals", "LeftValue": 1, "RightValue": 2},
        {"Type": "Not", "Condition": {"Type": "In", "QueryValue": '"32"',
                                      "Values": [{"Get": "Steps.Tune.BestTrainingJob.TunedHyperParameters['batch_size']"}]}},
    ]}], resolve)
    assert outcome is False


# ---------------------------------------------------------------- step results and whole files

def test_step_results_are_the_summarys_details_and_the_tables_remarks():
    with pytest.raises(StepFailure, match="^AlgorithmError: out of memory$") as failure:
        with failing_with(TrainingResult(7)):  # what a training step knows before its job fails
            raise LocalRunError("AlgorithmError: out of memory")
    assert failure.value.result.details() == {"instances": 7} and failure.value.result.note == ""
    training = TrainingResult(1, "/w/model.tar.gz", "toolkit: sagemaker-training is installed", {"val_accuracy": 0.93751})
    assert set(training.details()) == {"instances", "model", "runner", "final_metrics"} and training.note == "val_accuracy=0.9375"
    gate = ConditionResult(False, ["0.5 >= 0.7: False"])
    assert gate.details() == {"notes": ["0.5 >= 0.7: False"]} and gate.note == "0.5 >= 0.7: False -> else branch"
    registered = RegisterResult("arn:aws:sagemaker:us-east-1:111122223333:model-package/dogbreed-models/1", "Approved")
    assert registered.details() == {} and registered.note == "dogbreed-models/1 Approved"
    refused = CallbackResult(None, CallbackRecord("token1", 3, Status.FAILED))
    assert json.loads(json.dumps(refused.details())) == {"callback": {"token": "token1", "deliveries": 3, "outcome": "Failed"}}
    answered = CallbackResult({"status": "InService"}, CallbackRecord("token2", 1, Status.SUCCEEDED))
    assert answered.note == "status=InService" and set(answered.details()) == {"outputs", "callback"}
    trials = [TrialRecord("job-001", {"lr": "0.1"}, None, 0.25, 40.0, "toolkit", "images"),
              TrialRecord("job-002", {"lr": "9"}, "AlgorithmError: nan loss", None, None, None, None)]
    tuning = TuningResult(trials, {"train": "/w/train"}, {"MetricName": "best_val_loss", "Value": 0.25})
    assert set(tuning.details()) == {"trials", "channels"} and tuning.note == "2 trials; winner best_val_loss=0.25"
    assert TuningResult.trials_in(json.loads(json.dumps(tuning.details()))) == trials  # as diagnose --local reads them


def test_a_file_is_written_whole_or_left_as_it_was(tmp_path: Path):
    target = tmp_path / "summary.json"
    write_atomically(target, "before")
    with pytest.raises(RuntimeError, match="interrupted"):
        with replacing(target) as temporary:
            temporary.write_text("half of it")
            raise RuntimeError("interrupted")
    assert target.read_text() == "before" and list(tmp_path.iterdir()) == [target]
    write_json(tmp_path / "new" / "a.json", {"b": 1, "a": Status.SKIPPED})
    assert (tmp_path / "new" / "a.json").read_text() == '{\n  "a": "Skipped",\n  "b": 1\n}\n'


# ---------------------------------------------------------------- the endpoint data plane

@pytest.fixture(scope="module")
def model_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model.tar.gz laid out as train.py writes it: random resnet18 weights for two classes, and the inference code."""
    import torch

    import common

    folder = tmp_path_factory.mktemp("model")
    model_dir = folder / "model"
    (model_dir / contract.MODEL_CODE_DIR).mkdir(parents=True)
    torch.save(common.build_model("resnet18", 2).state_dict(), model_dir / contract.MODEL_FILE)
    (model_dir / contract.CLASSES_FILE).write_text(json.dumps(["001.Red", "002.Green"]))
    (model_dir / contract.MODEL_INFO_FILE).write_text(json.dumps({"backbone": "resnet18", "image_size": 32}))
    for name in ("inference.py", "common.py", "contract.py"):
        shutil.copy2(CODE_DIR / name, model_dir / contract.MODEL_CODE_DIR / name)
    archive = folder / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(model_dir.rglob("*")):
            tar.add(path, arcname=path.relative_to(model_dir).as_posix())
    return archive


def _jpeg(tmp_path: Path) -> bytes:
    return write_images(tmp_path / "img", 1, (200, 30, 30), size=(40, 30))[0].read_bytes()


@pytest.mark.slow
def test_model_container_answers_ping_and_invocations(tmp_path: Path, model_archive: Path):
    environment = {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code"}
    container = ModelContainer(tmp_path / "container", model_archive, environment)
    url = container.serve()
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=10) as response:
            assert response.status == 200
        request = urllib.request.Request(f"{url}/invocations", data=_jpeg(tmp_path), method="POST",
                                         headers={"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Custom-Attributes": "top_k=1"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        assert len(answer["predictions"][0]["top_k"]) == 1
        assert answer["predictions"][0]["top_k"][0]["label"] in ("001.Red", "002.Green")
        refused = urllib.request.Request(f"{url}/invocations", data=b"hello", method="POST", headers={"Content-Type": "text/plain"})
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(refused, timeout=30)
        assert error.value.code == 415 and "Content-Type" in json.loads(error.value.read())["error"]
    finally:
        container.stop()
    assert not container.model_dir.exists()


@pytest.mark.slow
def test_runtime_api_finds_the_model_through_the_registry(tmp_path: Path, model_archive: Path):
    s3 = LocalS3(tmp_path / "s3")
    s3.put("s3://bucket/models/model.tar.gz", model_archive.read_bytes())
    region = "us-east-1"
    with aws.EmbeddedMoto() as moto:
        sagemaker = aws.client("sagemaker", moto.url, region)
        sagemaker.create_model_package_group(ModelPackageGroupName="group")
        package = sagemaker.create_model_package(
            ModelPackageGroupName="group", ModelApprovalStatus="Approved",
            InferenceSpecification={"Containers": [{
                "Image": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6-cpu-py312",
                "ModelDataUrl": "s3://bucket/models/model.tar.gz",
                "Environment": {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code"}}],
                "SupportedContentTypes": ["image/jpeg"], "SupportedResponseMIMETypes": ["application/json"]},
        )["ModelPackageArn"]
        sagemaker.create_model(ModelName="m", ExecutionRoleArn="arn:aws:iam::123456789012:role/r",
                               Containers=[{"ModelPackageName": package}])
        sagemaker.create_endpoint_config(EndpointConfigName="c", ProductionVariants=[
            {"VariantName": "AllTraffic", "ModelName": "m", "InstanceType": "ml.m5.large", "InitialInstanceCount": 1}])
        sagemaker.create_endpoint(EndpointName="e", EndpointConfigName="c")
        with RuntimeServer(sagemaker, s3, tmp_path / "endpoints", tmp_path / "invocations.log") as runtime:
            client = aws.client("sagemaker-runtime", runtime.url, region)
            answer = client.invoke_endpoint(EndpointName="e", ContentType="image/jpeg", Accept="application/json",
                                            CustomAttributes="top_k=2;return_logits=true", Body=_jpeg(tmp_path))
            assert answer["ContentType"] == "application/json" and answer["InvokedProductionVariant"] == "AllTraffic"
            prediction = json.loads(answer["Body"].read())["predictions"][0]
            assert len(prediction["top_k"]) == 2 and len(prediction["logits"]) == 2
            with pytest.raises(client.exceptions.ModelError) as error:
                client.invoke_endpoint(EndpointName="e", ContentType="text/plain", Body=b"hello")
            assert error.value.response["OriginalStatusCode"] == 415
            with pytest.raises(client.exceptions.ClientError) as missing:
                client.invoke_endpoint(EndpointName="nowhere", ContentType="image/jpeg", Body=b"x")
            assert missing.value.response["Error"]["Code"] == "ValidationError"
            assert "nowhere" in missing.value.response["Error"]["Message"]
    log = [json.loads(line) for line in (tmp_path / "invocations.log").read_text().splitlines() if line.startswith("{")]
    assert [(entry["endpoint"], entry["status"]) for entry in log] == [("e", 200), ("e", 415), ("nowhere", 400)]

"""Day two against moto's server on 127.0.0.1: ``diagnose``, ``retry``, ``start --from`` and ``approve``.

moto starts executions but keeps no steps and cannot retry or run selectively; ``moto_pipeline_executions``
answers those operations (checked against botocore's shapes) and holds what SageMaker would report about an
execution. The training log a diagnosis reads is the real output of code/train.py refusing a hyperparameter.
``diagnose --local`` reads the work folder of a real local run whose TrainMultiInstance failed.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import boto3
import pytest

from sources import ROOT
from pipeline.cli import main
from pipeline.dag import steps_of
from pipeline.local.jobs import script_error_line
from pipeline.local.sample import make_sample

pytest.importorskip("moto.server")
from moto_pipeline_executions import PipelineExecutions, Server  # noqa: E402  (needs moto)

pytestmark = pytest.mark.slow

REGION = "us-east-1"
PIPELINE = "dogbreed-pipeline"
GROUP = "dogbreed-models"


@pytest.fixture(scope="module")
def server(aws_environment):  # noqa: F811
    with Server(0) as server:
        yield server


@pytest.fixture(scope="module")
def layer(server) -> PipelineExecutions:
    return server.app


@pytest.fixture(scope="module")
def sagemaker(server):
    return boto3.client("sagemaker", region_name=REGION, endpoint_url=server.url)


@pytest.fixture(scope="module")
def account(server) -> str:
    return boto3.client("sts", region_name=REGION, endpoint_url=server.url).get_caller_identity()["Account"]


@pytest.fixture(scope="module")
def definition(server, sagemaker, account, tmp_path_factory) -> dict:
    """The synthesized definition, published to moto as the project's pipeline."""
    out = tmp_path_factory.mktemp("synth") / "pipeline.json"
    assert main(["synth", "--out", str(out), "--source-dir", str(ROOT), "--account", account]) == 0
    sagemaker.create_pipeline(PipelineName=PIPELINE, PipelineDefinition=out.read_text(),
                              RoleArn=f"arn:aws:iam::{account}:role/dogbreed-pipeline")
    return json.loads(out.read_text())


def dogbreed(server, capsys, command: str, *arguments: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([command, *arguments, "--endpoint-url", server.url, "--source-dir", str(ROOT)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def started(sagemaker) -> str:
    return sagemaker.start_pipeline_execution(PipelineName=PIPELINE)["PipelineExecutionArn"]


def step(name: str, status: str, start: float, **extra) -> dict:
    return {"StepName": name, "StepStatus": status, "StartTime": start, "EndTime": start + 60, **extra}


def succeeded_run(layer, sagemaker, definition) -> str:
    """An execution in which every step ran and succeeded."""
    arn = started(sagemaker)
    layer.record(arn, "Succeeded", [step(name, "Succeeded", 1000 + index)
                                    for index, name in enumerate(steps_of(definition))])
    return arn


@pytest.fixture(scope="module")
def refused_epochs() -> str:
    """What code/train.py prints when it refuses --epochs 0: the real end of a training job's log."""
    result = subprocess.run([sys.executable, str(ROOT / "code" / "train.py"), "--epochs", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and script_error_line(result.stderr), result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def failed_training(layer, sagemaker, definition, account, refused_epochs, server) -> dict:
    """An execution whose TrainSingleInstance failed: its job's CloudWatch streams hold train.py's refusal."""
    arn = started(sagemaker)
    job = "pipelines-abc123def456-TrainSingleInstance-Xy12AbCd9z"
    job_arn = sagemaker.create_training_job(
        TrainingJobName=job, RoleArn=f"arn:aws:iam::{account}:role/dogbreed-sagemaker-jobs",
        AlgorithmSpecification={"TrainingImage": "pytorch-training:2.5", "TrainingInputMode": "File"},
        OutputDataConfig={"S3OutputPath": "s3://bucket/out"},
        ResourceConfig={"InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        StoppingCondition={"MaxRuntimeInSeconds": 3600})["TrainingJobArn"]
    error_line = script_error_line(refused_epochs)
    reason = f"AlgorithmError: {error_line}"
    layer.record_job(job, "Failed", reason)
    logs = boto3.client("logs", region_name=REGION, endpoint_url=server.url)
    group = "/aws/sagemaker/TrainingJobs"
    logs.create_log_group(logGroupName=group)
    now = int(time.time() * 1000)
    for stream, text in ((f"{job}/algo-1-1765150000", refused_epochs), (f"{job}/algo-2-1765150000", "algo-2 waiting\n")):
        logs.create_log_stream(logGroupName=group, logStreamName=stream)
        logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=[
            {"timestamp": now + index, "message": line} for index, line in enumerate(text.splitlines())])
    layer.record(arn, "Failed", [
        step("PrepareData", "Succeeded", 100),
        step("ExtractFeatures", "Succeeded", 200),
        step("TuneHyperparameters", "Succeeded", 300),
        step("TrainMultiInstance", "Succeeded", 401),
        step("TrainSingleInstance", "Failed", 400, FailureReason=f"ClientError: {reason}",
             Metadata={"TrainingJob": {"Arn": job_arn}}),
    ], failure_reason="Step failure: One or multiple steps failed.")
    return {"arn": arn, "job": job, "error_line": error_line}


def test_diagnose_names_the_failed_training_its_reason_and_its_log(server, capsys, failed_training):
    arn, job, error_line = failed_training["arn"], failed_training["job"], failed_training["error_line"]
    code, out, err = dogbreed(server, capsys, "diagnose", arn)
    print(out)
    assert code == 1, err
    lines = out.splitlines()
    assert lines[:3] == [f"pipeline:  {PIPELINE}", f"execution: {arn}", "status:    Failed"]
    assert "failed step: TrainSingleInstance (Training)" in lines
    assert f"  reason:  ClientError: AlgorithmError: {error_line}" in lines
    assert f"  job:     {job}" in lines
    log_header = next(line for line in lines if line.startswith("log: "))
    assert log_header.startswith(f"log: /aws/sagemaker/TrainingJobs/{job}/algo-1-1765150000 (last ")
    tail = [line.removeprefix("  | ") for line in lines if line.startswith("  | ")]
    assert tail[-1] == error_line and "algo-2 waiting" not in tail
    assert f"  dogbreed retry {arn}" in out
    assert f"dogbreed start --from TrainSingleInstance --reference {arn}" in out


def test_diagnose_without_an_execution_reads_the_latest(server, capsys, failed_training, sagemaker):
    code, out, _ = dogbreed(server, capsys, "diagnose")
    latest = sagemaker.list_pipeline_executions(PipelineName=PIPELINE)["PipelineExecutionSummaries"][-1]
    assert f"execution: {latest['PipelineExecutionArn']}" in out.splitlines()


def test_diagnose_of_a_gate_gives_the_fail_message(server, capsys, layer, sagemaker, definition):
    arn = started(sagemaker)
    message = ("The single instance model's test accuracy 0.41 is below AccuracyThreshold 0.7; it was not "
               "registered or deployed (the multi instance model's is 0.83).")
    layer.record(arn, "Failed", [step("EvaluateSingleInstance", "Succeeded", 10),
                                 step("AccuracyTooLowSingleInstance", "Failed", 20, FailureReason=message,
                                      Metadata={"Fail": {"ErrorMessage": message}})], failure_reason=message)
    code, out, _ = dogbreed(server, capsys, "diagnose", arn.rsplit("/", 1)[-1])
    assert code == 1
    assert "failed step: AccuracyTooLowSingleInstance (Fail)" in out and f"  gate message: {message}" in out
    assert "log: " not in out and "dogbreed retry" not in out


def test_retry_sends_the_request_and_refuses_a_running_or_succeeded_execution(server, capsys, layer, sagemaker,
                                                                              definition, failed_training):
    arn = failed_training["arn"]
    layer.record(arn, "Failed", layer.runs[arn].steps, "Step failure")
    code, out, err = dogbreed(server, capsys, "retry", arn)
    assert code == 0, err
    assert out.splitlines() == [f"retrying the failed steps of {arn}"]
    operation, request = layer.requests[-1]
    assert operation == "RetryPipelineExecution" and request["PipelineExecutionArn"] == arn
    assert set(request) == {"PipelineExecutionArn", "ClientRequestToken"}
    assert layer.runs[arn].status == "Executing"

    code, _, err = dogbreed(server, capsys, "retry", arn)
    assert code == 2 and f"execution {arn} is Executing: only an execution that has ended can be retried" in err
    done = succeeded_run(layer, sagemaker, definition)
    code, _, err = dogbreed(server, capsys, "retry", done)
    assert code == 2 and "Succeeded: nothing to retry" in err
    code, _, err = dogbreed(server, capsys, "retry", arn.replace(PIPELINE, "other-pipeline"))
    assert code == 2 and "is one of pipeline other-pipeline, not of dogbreed-pipeline" in err
    assert [operation for operation, _ in layer.requests].count("RetryPipelineExecution") == 1
    layer.record(arn, "Failed", layer.runs[arn].steps, "Step failure")


def test_start_from_selects_the_step_and_everything_after_it(server, capsys, layer, sagemaker, definition):
    reference = succeeded_run(layer, sagemaker, definition)
    code, out, err = dogbreed(server, capsys, "start", "--from", "TrainSingleInstance", "--param", "AccuracyThreshold=0.8")
    assert code == 0, err
    operation, request = layer.requests[-1]
    assert operation == "StartPipelineExecution"
    config = request["SelectiveExecutionConfig"]
    assert config["SourcePipelineExecutionArn"] == reference
    selected = [item["StepName"] for item in config["SelectedSteps"]]
    assert selected[0] == "TrainSingleInstance"
    for name in ("EvaluateSingleInstance", "CheckAccuracySingleInstance", "RegisterSingleInstance",
                 "DeploySingleInstance", "WaitForSingleInstance", "CheckSingleInstance", "AccuracyTooLowSingleInstance"):
        assert name in selected
    for name in ("PrepareData", "ExtractFeatures", "TuneHyperparameters", "TrainMultiInstance", "EvaluateMultiInstance"):
        assert name not in selected
    nodes = steps_of(definition)
    needed = {dependency for name in selected for dependency in nodes[name].depends_on} - set(selected)
    assert {"PrepareData", "TuneHyperparameters", "EvaluateMultiInstance"} <= needed
    said = next(line for line in out.splitlines() if line.startswith(f"running {len(selected)} steps from TrainSingleInstance"))
    assert all(name in said for name in needed), said
    assert request["PipelineParameters"] == [{"Name": "AccuracyThreshold", "Value": "0.8"}]
    new = out.splitlines()[-1]
    assert sagemaker.describe_pipeline_execution(PipelineExecutionArn=new)["SelectiveExecutionConfig"] == config
    assert f"come from {reference}" in out


def test_start_from_refuses_what_the_service_would(server, capsys, layer, sagemaker, definition, account):
    before = len(layer.requests)
    code, _, err = dogbreed(server, capsys, "start", "--from", "TrainEverything")
    assert code == 2 and "--from TrainEverything: the deployed pipeline has no such step; it has PrepareData, " in err

    other = f"arn:aws:sagemaker:{REGION}:{account}:pipeline/other-pipeline/execution/abc123"
    code, _, err = dogbreed(server, capsys, "start", "--from", "TrainSingleInstance", "--reference", other)
    assert code == 2 and "is one of pipeline other-pipeline, not of dogbreed-pipeline" in err

    running = started(sagemaker)
    layer.record(running, "Executing")
    code, _, err = dogbreed(server, capsys, "start", "--from", "TrainSingleInstance", "--reference", running)
    assert code == 2 and f"--reference {running} is Executing: a reference execution must have ended" in err

    failed_early = started(sagemaker)
    layer.record(failed_early, "Failed", [step("PrepareData", "Succeeded", 1), step("ExtractFeatures", "Failed", 2)])
    code, _, err = dogbreed(server, capsys, "start", "--from", "TrainSingleInstance", "--reference", failed_early)
    assert code == 2 and "has no outputs of TuneHyperparameters (not run), " in err and "PrepareData" not in err
    assert "which the selection needs: choose a reference in which they succeeded" in err

    older = dict(definition, Steps=[item for item in definition["Steps"] if item["Name"] == "PrepareData"])  # a first version
    sagemaker.update_pipeline(PipelineName=PIPELINE, PipelineDefinition=json.dumps(older))
    old_version = started(sagemaker)
    sagemaker.update_pipeline(PipelineName=PIPELINE, PipelineDefinition=json.dumps(definition))
    layer.record(old_version, "Succeeded", [step(name, "Succeeded", 1) for name in steps_of(definition)])
    code, _, err = dogbreed(server, capsys, "start", "--from", "TrainSingleInstance", "--reference", old_version)
    assert code == 2 and "ran another version of the pipeline" in err and "Tuning step TuneHyperparameters, and that version has no such step" in err

    code, _, err = dogbreed(server, capsys, "start", "--reference", old_version)
    assert code == 2 and "give --from STEP too" in err
    assert not [request for _, request in layer.requests[before:] if "SelectiveExecutionConfig" in request]


@pytest.fixture
def waiting_package(server, sagemaker) -> str:
    """A version registered PendingManualApproval in the project's group."""
    try:
        sagemaker.create_model_package_group(ModelPackageGroupName=GROUP)
    except sagemaker.exceptions.ClientError:
        pass  # made by an earlier test
    return sagemaker.create_model_package(
        ModelPackageGroupName=GROUP, ModelApprovalStatus="PendingManualApproval",
        InferenceSpecification={"Containers": [{"Image": "pytorch-inference:2.5", "ModelDataUrl": "s3://bucket/model.tar.gz"}],
                                "SupportedContentTypes": ["image/jpeg"], "SupportedResponseMIMETypes": ["application/json"]},
    )["ModelPackageArn"]


def test_approve_approves_once_and_by_version_number(server, capsys, sagemaker, waiting_package):
    version = waiting_package.rsplit("/", 1)[-1]
    code, out, err = dogbreed(server, capsys, "approve", version, "--description", "reviewed the confusion matrix")
    assert code == 0, err
    assert out.strip() == (f"model package {waiting_package}: PendingManualApproval -> Approved; the registry's "
                           "state-change event starts pipeline dogbreed-deploy, which deploys it")
    package = sagemaker.describe_model_package(ModelPackageName=waiting_package)
    assert package["ModelApprovalStatus"] == "Approved" and package["ApprovalDescription"] == "reviewed the confusion matrix"
    code, out, err = dogbreed(server, capsys, "approve", waiting_package)
    assert code == 0 and out.strip() == f"model package {waiting_package} is already Approved: nothing changed"
    code, _, err = dogbreed(server, capsys, "approve", waiting_package.replace(GROUP, "someone-elses-models"))
    assert code == 2 and "not of this project's dogbreed-models" in err
    code, _, err = dogbreed(server, capsys, "approve", "latest")
    assert code == 2 and "neither a model package version number nor a versioned model package ARN" in err


def test_diagnose_local_names_the_failed_multi_instance_training_and_the_scripts_error(tmp_path, capsys):
    """A local run of PrepareData and a TrainMultiInstance (two hosts) given fixed hyperparameters instead of the
    tuning's, one of which train.py refuses: the run stops a few seconds after PrepareData."""
    document_path = tmp_path / "pipeline.json"
    assert main(["synth", "--out", str(document_path), "--source-dir", str(ROOT)]) == 0
    document = json.loads(document_path.read_text())
    training = next(item for item in document["Steps"] if item["Name"] == "TrainMultiInstance")
    training["Arguments"]["HyperParameters"].update(epochs='"0"', batch_size='"8"', learning_rate='"0.01"')
    document["Steps"] = [item for item in document["Steps"] if item["Name"] in ("PrepareData", "TrainMultiInstance")]
    document_path.write_text(json.dumps(document))
    sample = make_sample(tmp_path / "data", classes=2, split_sizes={"train": 4, "valid": 2, "test": 2})
    workdir = tmp_path / "work"
    capsys.readouterr()
    status = main(["local-run", "--no-progress", "--source-dir", str(ROOT), "--definition", str(document_path),
                   "--data", str(sample.root), "--workdir", str(workdir), "--param", "MultiInstanceCount=2",
                   "--param", "Backbone=resnet18", "--param", "ImageSize=32"])
    run_out = capsys.readouterr().out
    assert status == 1, run_out[-3000:]
    assert main(["diagnose", "--local", str(workdir)]) == 1
    out = capsys.readouterr().out
    print(out)
    lines = out.splitlines()
    assert lines[0].startswith("pipeline:  ") and lines[2] == "status:    Failed"
    assert "failed step: TrainMultiInstance (Training)" in lines
    error_line = next(line for line in lines if line.startswith("  reason:  "))
    assert "train.py: error: argument --epochs" in error_line
    tail = [line.removeprefix("  | ") for line in lines if line.startswith("  | ")]
    assert any("train.py: error: argument --epochs" in line for line in tail)
    assert next(line for line in lines if line.startswith("log: ")).split()[1].endswith(".log")
    assert any(line.startswith("  job:     ") for line in lines)
    rerun = next(line for line in lines if "dogbreed local-run --workdir" in line)
    assert "work" in rerun and "--data" in rerun

"""lambda/notify_failure.py against moto: the message for a failed training job, a Fail step, a Lambda step,
and the refusal of events that are not a failed execution.

The events are shaped as EventBridge delivers SageMaker's "Model Building
Pipeline Execution Status Change" (the SageMaker developer guide's sample).
moto lacks ListPipelineExecutionSteps: ``execution_steps_in_moto`` answers it
with steps checked against botocore's shape. The message is read where a
subscriber reads it: from an SQS queue subscribed to the topic.
"""
from __future__ import annotations

import json
import traceback
from datetime import datetime, timedelta, timezone

import boto3
import pytest

from lambda_harness import ACCOUNT, REGION, LambdaContext, load_handler, log_lines, sagemaker_backend

PIPELINE = "dogbreed-pipeline"
TRAINING_REASON = "AlgorithmError: train.py: error: --image-size must be at least 32 pixels for a ResNet, got 16"
STARTED = datetime(2026, 12, 7, 21, 4, 10, tzinfo=timezone.utc)


def status_change(execution_arn: str, status: str = "Failed") -> dict:
    """The event EventBridge delivers for a pipeline execution's status change."""
    pipeline_arn = execution_arn.split("/execution/")[0]
    return {
        "version": "0",
        "id": "a1b2c3d4-1234-5678-9abc-12345678abcd",
        "detail-type": "SageMaker Model Building Pipeline Execution Status Change",
        "source": "aws.sagemaker",
        "account": ACCOUNT,
        "time": "2026-12-07T21:31:42Z",
        "region": REGION,
        "resources": [pipeline_arn, execution_arn],
        "detail": {
            "pipelineExecutionDisplayName": "execution-1765143850",
            "currentPipelineExecutionStatus": status,
            "previousPipelineExecutionStatus": "Executing",
            "executionStartTime": "2026-12-07T21:04:10Z",
            "executionEndTime": "2026-12-07T21:31:40Z",
            "pipelineArn": pipeline_arn,
            "pipelineExecutionArn": execution_arn,
        },
    }


@pytest.fixture
def topic(aws, monkeypatch) -> str:
    """The failure topic, with a queue subscribed to it; returns the queue URL the messages arrive at."""
    sns, sqs = boto3.client("sns", region_name=REGION), boto3.client("sqs", region_name=REGION)
    topic_arn = sns.create_topic(Name="dogbreed-pipeline-failures")["TopicArn"]
    queue_url = sqs.create_queue(QueueName="failure-inbox")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)
    monkeypatch.setenv("TOPIC_ARN", topic_arn)
    return queue_url


def received(queue_url: str) -> list[dict]:
    """The SNS notifications (Subject, Message) that reached the subscribed queue."""
    answer = boto3.client("sqs", region_name=REGION).receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)
    return [json.loads(message["Body"]) for message in answer.get("Messages", [])]


def execution() -> str:
    sagemaker = boto3.client("sagemaker", region_name=REGION)
    sagemaker.create_pipeline(PipelineName=PIPELINE, PipelineDefinition=json.dumps({"Version": "2020-12-01", "Steps": []}),
                              RoleArn=f"arn:aws:iam::{ACCOUNT}:role/dogbreed-pipeline")
    return sagemaker.start_pipeline_execution(PipelineName=PIPELINE)["PipelineExecutionArn"]


JOB_ROLE = f"arn:aws:iam::{ACCOUNT}:role/dogbreed-sagemaker-jobs"
ALGORITHM = {"TrainingImage": f"763104351884.dkr.ecr.{REGION}.amazonaws.com/pytorch-training:2.8-cpu-py312", "TrainingInputMode": "File"}


def training_job(name: str, status: str = "Failed", reason: str = "", minutes: int = 0, **hyperparameters: str) -> str:
    """A training job in moto that ended with ``status`` (and ``reason``), as SageMaker describes one; returns its ARN."""
    arn = boto3.client("sagemaker", region_name=REGION).create_training_job(
        TrainingJobName=name, AlgorithmSpecification=ALGORITHM, RoleArn=JOB_ROLE, HyperParameters=hyperparameters,
        OutputDataConfig={"S3OutputPath": "s3://dogbreed-artifacts/dogbreed/jobs"},
        ResourceConfig={"InstanceType": "ml.m5.2xlarge", "InstanceCount": 7, "VolumeSizeInGB": 30},
        StoppingCondition={"MaxRuntimeInSeconds": 86400},
    )["TrainingJobArn"]
    job = sagemaker_backend().training_jobs[name]
    job.training_job_status, job.creation_time = status, STARTED + timedelta(minutes=minutes)
    if reason:
        job.failure_reason = reason
    return arn


def failed_training_job(name: str, reason: str) -> str:
    return training_job(name, "Failed", reason)


def step(name: str, status: str, minutes: int, **extra) -> dict:
    return {"StepName": name, "StepStatus": status, "StartTime": STARTED + timedelta(minutes=minutes),
            "EndTime": STARTED + timedelta(minutes=minutes + 1), "AttemptCount": 1, **extra}


def job_name(execution_arn: str, step_name: str) -> str:
    """A job's name as SageMaker Pipelines makes it: pipelines-<execution id>-<step>-<suffix>."""
    return f"pipelines-{execution_arn.rsplit('/', 1)[1]}-{step_name}-Qz3fR8wLpK"


def training_failure_steps(execution_arn: str, job_arn: str) -> list[dict]:
    """PrepareData succeeded, TrainMultiInstance failed, TrainSingleInstance was stopped when it did."""
    prefix = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}"
    return [
        step("PrepareData", "Succeeded", 0, Metadata={"ProcessingJob": {"Arn": f"{prefix}:processing-job/{job_name(execution_arn, 'PrepareData').lower()}"}}),
        step("TrainSingleInstance", "Stopped", 6, Metadata={"TrainingJob": {"Arn": f"{prefix}:training-job/{job_name(execution_arn, 'TrainSingleInstance').lower()}"}}),
        step("TrainMultiInstance", "Failed", 5, Metadata={"TrainingJob": {"Arn": job_arn}},
             FailureReason="ClientError: AlgorithmError: see the job's FailureReason"),
    ]


def test_a_failed_training_job_is_told_with_the_jobs_reason_links_and_next_commands(aws, topic, execution_steps_in_moto, capsys):
    notify = load_handler("notify_failure")
    arn = execution()
    training_job = job_name(arn, "TrainMultiInstance")
    execution_steps_in_moto[arn] = training_failure_steps(arn, failed_training_job(training_job, TRAINING_REASON))
    result = notify.handler(status_change(arn), LambdaContext())

    (notification,) = received(topic)
    execution_id = arn.rsplit("/", 1)[1]
    assert notification["Subject"] == f"{PIPELINE} execution {execution_id} failed at TrainMultiInstance"
    text = notification["Message"]
    assert f"Execution:  {arn}\n" in text
    assert f"Step:       TrainMultiInstance (training job {training_job})\n" in text
    assert f"Reason:     {TRAINING_REASON}\n" in text  # the job's own reason, not the step's summary
    assert f"https://{REGION}.console.aws.amazon.com/sagemaker/home?region={REGION}#/jobs/{training_job}" in text
    assert f"log-group/$252Faws$252Fsagemaker$252FTrainingJobs$3FlogStreamNameFilter$3D{training_job}" in text
    assert f"  dogbreed diagnose {arn}\n" in text and f"  dogbreed retry {arn}\n" in text
    assert result["step"] == "TrainMultiInstance" and result["message_id"]
    (line,) = log_lines(capsys)
    assert line["function"] == "notify-failure" and line["step"] == "TrainMultiInstance" and "latency_ms" in line


def test_the_first_failed_step_is_found_on_a_later_page_of_steps(aws, topic, execution_steps_in_moto):
    notify = load_handler("notify_failure")
    arn = execution()
    succeeded = [step(f"Step{index:02d}", "Succeeded", index) for index in range(24)]  # pages of 10: the failure is on the third
    failed = [step("CheckMultiInstance", "Failed", 25, FailureReason="endpoint dogbreed-multi-instance answered 500"),
              step("CheckSingleInstance", "Failed", 26, FailureReason="a later failure")]
    execution_steps_in_moto[arn] = [*failed, *succeeded]
    notify.handler(status_change(arn), None)

    assert received(topic)[0]["Subject"].endswith("failed at CheckMultiInstance")


def test_a_fail_step_is_told_with_its_error_message(aws, topic, execution_steps_in_moto):
    notify = load_handler("notify_failure")
    arn = execution()
    message = ("The MultiInstance model's test accuracy 0.6412 is below AccuracyThreshold 0.7; it was not registered or "
               "deployed; the SingleInstance model passed and was deployed.")
    execution_steps_in_moto[arn] = [
        step("CheckSingleInstance", "Succeeded", 30, Metadata={"Lambda": {"Arn": f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:dogbreed-check-endpoint:live"}}),
        step("AccuracyTooLowMultiInstanceAfterSingleInstance", "Failed", 31, Metadata={"Fail": {"ErrorMessage": message}}),
    ]
    notify.handler(status_change(arn), None)

    (notification,) = received(topic)
    assert notification["Subject"].endswith("failed at AccuracyTooLowMultiInstanceAfterSingleInstance")
    assert f"Reason:     {message}\n" in notification["Message"]
    assert "Console:" not in notification["Message"]  # a Fail step runs no job


@pytest.mark.slow
def test_a_failed_lambda_step_links_its_functions_log_group(aws, topic, execution_steps_in_moto):
    notify = load_handler("notify_failure")
    arn = execution()
    reason = "the model package arn:aws:sagemaker:us-east-1:123456789012:model-package/dogbreed-models/3 has approval status 'Rejected'"
    execution_steps_in_moto[arn] = [step("DeploySingleInstance", "Failed", 20, FailureReason=reason,
                                         Metadata={"Lambda": {"Arn": f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:dogbreed-deploy-endpoint:live"}})]
    notify.handler(status_change(arn), None)

    text = received(topic)[0]["Message"]
    assert f"Step:       DeploySingleInstance (Lambda function dogbreed-deploy-endpoint)\nReason:     {reason}\n" in text
    assert text.count("log-group/$252Faws$252Flambda$252Fdogbreed-deploy-endpoint\n") == 1


def test_a_failed_tuning_job_is_told_with_its_first_failed_trial(aws, topic, execution_steps_in_moto, tuning_trials_in_moto):
    notify = load_handler("notify_failure")
    arn = execution()
    tuning = f"{arn.rsplit('/', 1)[1]}-TuneHyp-a1b2c3d4"  # SageMaker's 32-character tuning job names
    boto3.client("sagemaker", region_name=REGION).create_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=tuning,
        HyperParameterTuningJobConfig={"Strategy": "Bayesian", "ResourceLimits": {"MaxNumberOfTrainingJobs": 8, "MaxParallelTrainingJobs": 2}},
        TrainingJobDefinition={"AlgorithmSpecification": ALGORITHM, "RoleArn": JOB_ROLE, "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
                               "OutputDataConfig": {"S3OutputPath": "s3://dogbreed-artifacts/dogbreed/tuning"}})
    job = sagemaker_backend().hyper_parameter_tuning_jobs[tuning]
    job.hyper_parameter_tuning_job_status = "Failed"
    job.failure_reason = ("No training job succeeded after 5 attempts. For additional details, please take a look at the "
                          "training job failures by listing training jobs for the hyperparameter tuning job.")
    trial_reason = "AlgorithmError: train.py: error: --lr must be a positive number, got -0.0031"
    training_job(f"{tuning}-002-9c0d1e2f", "Failed", "AlgorithmError: a later trial", minutes=4, lr="-0.5")
    training_job(f"{tuning}-001-5a6b7c8d", "Failed", trial_reason, minutes=2, lr="-0.0031")
    training_job(f"{tuning}-000-1a2b3c4d", "Completed", minutes=1, lr="0.001")
    execution_steps_in_moto[arn] = [step("TuneHyperparameters", "Failed", 2, FailureReason="ClientError: see the tuning job",
                                         Metadata={"TuningJob": {"Arn": job.arn}})]
    notify.handler(status_change(arn), None)

    text = received(topic)[0]["Message"]
    assert f"Step:       TuneHyperparameters (tuning job {tuning})\n" in text
    assert f"Reason:     {job.failure_reason}; first failed trial {tuning}-001-5a6b7c8d: {trial_reason}\n" in text
    assert f"#/hyper-tuning-jobs/{tuning}" in text
    assert f"TrainingJobs$3FlogStreamNameFilter$3D{tuning}-001-5a6b7c8d" in text  # the trial's log streams


def test_an_unreadable_job_still_sends_the_steps_reason_and_says_why(aws, topic, execution_steps_in_moto):
    notify = load_handler("notify_failure")
    arn = execution()
    missing = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/pipelines-gone-TrainSingleInstance-x"
    execution_steps_in_moto[arn] = [step("TrainSingleInstance", "Failed", 3, Metadata={"TrainingJob": {"Arn": missing}},
                                         FailureReason="ClientError: out of capacity")]
    notify.handler(status_change(arn), None)

    text = received(topic)[0]["Message"]
    assert "Reason:     ClientError: out of capacity (cannot read training job pipelines-gone-TrainSingleInstance-x: " in text


def test_a_stopped_execution_without_a_failed_step_is_told_with_the_executions_reason(aws, topic, execution_steps_in_moto):
    notify = load_handler("notify_failure")
    arn = execution()
    execution_steps_in_moto[arn] = [step("PrepareData", "Stopped", 0)]
    result = notify.handler(status_change(arn, "Stopped"), None)

    (notification,) = received(topic)
    assert notification["Subject"] == f"{PIPELINE} execution {arn.rsplit('/', 1)[1]} stopped"
    assert "Step:" not in notification["Message"] and result["step"] == ""


@pytest.mark.slow
@pytest.mark.parametrize(("change", "error"), [
    (lambda event: {**event, "detail-type": "SageMaker Training Job State Change"}, "not 'aws.sagemaker' / 'SageMaker Model Building"),
    (lambda event: {**event, "detail": {**event["detail"], "currentPipelineExecutionStatus": "Succeeded"}},
     "'currentPipelineExecutionStatus' = 'Succeeded': this function tells of Failed and Stopped executions only"),
    (lambda event: {**event, "detail": {**event["detail"], "pipelineExecutionArn": "exec-1"}}, "'pipelineExecutionArn' = 'exec-1' is not a pipeline execution ARN"),
    (lambda event: {**event, "detail": "Failed"}, "event field 'detail' must be an object"),
    (lambda event: [event], "the event must be a JSON object, got list"),
])
def test_a_bad_event_is_refused_naming_what_is_wrong_without_a_traceback(aws, topic, capsys, change, error):
    notify = load_handler("notify_failure")
    event = change(status_change(f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:pipeline/{PIPELINE}/execution/abc123"))
    with pytest.raises(notify.EventError) as refusal:
        notify.handler(event, None)
    assert error in str(refusal.value)
    assert traceback.extract_tb(refusal.value.__traceback__)[-1].name == "handler"  # nothing below the handler
    (line,) = log_lines(capsys)
    assert line["status"] == "failed" and line["error_type"] == "EventError" and "traceback" not in line
    assert received(topic) == []


def test_a_function_without_its_topic_says_what_sets_it(aws, monkeypatch, execution_steps_in_moto):
    notify = load_handler("notify_failure")
    monkeypatch.delenv("TOPIC_ARN", raising=False)
    with pytest.raises(notify.NotifyError, match="TOPIC_ARN='' is not an SNS topic ARN: `dogbreed upsert` sets it"):
        notify.handler(status_change(execution()), None)

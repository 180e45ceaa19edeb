"""lambda/wait_endpoint.py against moto's server on 127.0.0.1, fed by a real SQS queue.

The callback API moto lacks (SendPipelineExecutionStepSuccess/Failure) is the
layer local-run uses too (pipeline/local/callbacks.py); messages go through
moto's SQS and reach the handler in the event shape Lambda's event source
mapping sends.
"""
from __future__ import annotations

import io
import json
import time
from contextlib import redirect_stdout

import boto3
import pytest

from lambda_harness import ACCOUNT, REGION, load_handler, model_package, sagemaker_backend, use_test_credentials
from pipeline.local.callbacks import MotoWithCallbacks, callback_message, deliver, queue_arn, sqs_event

ENDPOINT = "dogbreed-single-instance"
EXECUTION = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:pipeline/dogbreed-pipeline/execution/abc123"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch):
    """moto plus the callback API on 127.0.0.1, as every boto3 client's endpoint, with a fresh backend."""
    moto = MotoWithCallbacks()
    moto.start()
    moto.reset()
    use_test_credentials(monkeypatch, endpoint_url=moto.url)
    monkeypatch.setenv("INITIAL_POLL_SECONDS", "1")
    try:
        yield moto
    finally:
        moto.stop()


@pytest.fixture
def queue(server):
    sqs = boto3.client("sqs", region_name=REGION)
    return sqs, sqs.create_queue(QueueName="dogbreed-endpoint-wait")["QueueUrl"]


def deployed(**traffic) -> dict:
    deploy = load_handler("deploy_endpoint")
    with redirect_stdout(io.StringIO()):
        return deploy.handler({
            "model_package_arn": model_package(), "endpoint_name": ENDPOINT, "instance_type": "ml.m5.large",
            "initial_instance_count": 1, "model_role_arn": f"arn:aws:iam::{ACCOUNT}:role/dogbreed-sagemaker-model",
            "data_capture_s3_uri": "", "kms_key_id": "", **traffic,
        }, None)


def set_endpoint(status: str, reason: str = "", config: str | None = None) -> None:
    endpoint = sagemaker_backend().endpoints[ENDPOINT]
    endpoint.endpoint_status = status
    if reason:
        endpoint.failure_reason = reason
    if config:
        endpoint.endpoint_config_name = config


def wait_for(server, queue, config_name: str, **arguments) -> str:
    """Issue a token as the CallbackStep does and put SageMaker's message on the queue; returns the token."""
    sqs, url = queue
    token = server.api.issue("WaitForSingleInstance", EXECUTION)
    body = {"endpoint_name": ENDPOINT, "endpoint_config_name": config_name, "max_wait_minutes": 60, **arguments}
    sqs.send_message(QueueUrl=url, MessageBody=callback_message(token, EXECUTION, body))
    return token


def run_handler(handler, event) -> tuple[dict, list[dict]]:
    out = io.StringIO()
    with redirect_stdout(out):
        answer = handler.handler(event, None)
    return answer, [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


def deliver_once(queue, handler) -> tuple[int, list[dict]]:
    sqs, url = queue
    logs: list[dict] = []

    def invoke(event):
        answer, lines = run_handler(handler, event)
        logs.extend(lines)
        return answer

    return deliver(sqs, url, REGION, invoke), logs


def visible(queue) -> int:
    sqs, url = queue
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"])


def test_in_service_on_the_deployed_config_sends_success_with_the_outputs(server, queue):
    names = deployed()
    token = wait_for(server, queue, names["endpoint_config_name"])
    count, logs = deliver_once(queue, load_handler("wait_endpoint"))
    callback = server.api.callbacks[token]
    assert count == 1 and callback.outcome == "Succeeded"
    assert callback.outputs == {"endpoint_name": ENDPOINT, "endpoint_config_name": names["endpoint_config_name"], "status": "InService"}
    assert logs[-1]["status"] == "success" and logs[-1]["endpoint_name"] == ENDPOINT
    assert visible(queue) == 0  # answered messages are deleted


def test_failed_endpoint_sends_failure_with_the_reason(server, queue):
    names = deployed()
    set_endpoint("Failed", reason="CannotStartContainerError: the container exited with 1")
    token = wait_for(server, queue, names["endpoint_config_name"])
    deliver_once(queue, load_handler("wait_endpoint"))
    callback = server.api.callbacks[token]
    assert callback.outcome == "Failed"
    assert callback.failure_reason == f"endpoint {ENDPOINT} is Failed: CannotStartContainerError: the container exited with 1"


def test_rolled_back_update_fails_naming_both_configs(server, queue):
    names = deployed()
    set_endpoint("InService", config="dogbreed-single-instance-0000000000")
    token = wait_for(server, queue, names["endpoint_config_name"])
    deliver_once(queue, load_handler("wait_endpoint"))
    reason = server.api.callbacks[token].failure_reason
    assert "rolled back" in reason and "dogbreed-single-instance-0000000000" in reason and names["endpoint_config_name"] in reason


ALARM = f"{ENDPOINT}-5xx-errors"
ALARM_REASON = "Threshold Crossed: 2 datapoints [4.0 (07/12/26 21:40:00), 3.0 (07/12/26 21:39:00)] were greater than or equal to the threshold (1.0)."


def canary_update_rolled_back_by_its_alarm() -> tuple[dict, dict]:
    """A canary update guarded by the stack's 5xx alarm, which fires while the canary bakes; SageMaker then
    routes all traffic back to the old config. Returns the two deployments."""
    cloudwatch = boto3.client("cloudwatch", region_name=REGION)
    cloudwatch.put_metric_alarm(
        AlarmName=ALARM, Namespace="AWS/SageMaker", MetricName="Invocation5XXErrors", Statistic="Sum", Period=60,
        Dimensions=[{"Name": "EndpointName", "Value": ENDPOINT}, {"Name": "VariantName", "Value": "AllTraffic"}],
        EvaluationPeriods=2, Threshold=1, ComparisonOperator="GreaterThanOrEqualToThreshold")
    canary = {"deployment_strategy": "canary", "deployment_step_percent": 25, "deployment_bake_seconds": 600, "initial_instance_count": 4}
    old, new = deployed(**canary), deployed(**canary)
    assert new["action"] == "updated"
    cloudwatch.set_alarm_state(AlarmName=ALARM, StateValue="ALARM", StateReason=ALARM_REASON)
    set_endpoint("InService", config=old["endpoint_config_name"])
    return old, new


def test_a_rollback_fails_the_wait_naming_the_alarm_that_fired(server, queue, update_endpoint_in_moto):
    old, new = canary_update_rolled_back_by_its_alarm()
    (update,) = update_endpoint_in_moto
    assert update["DeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]["Type"] == "CANARY"
    token = wait_for(server, queue, new["endpoint_config_name"])
    deliver_once(queue, load_handler("wait_endpoint"))

    callback = server.api.callbacks[token]
    assert callback.outcome == "Failed"
    assert callback.failure_reason.startswith(
        f"endpoint {ENDPOINT} rolled back to config {old['endpoint_config_name']}, not the deployed {new['endpoint_config_name']}: "
        f"alarm {ALARM} ALARM (Threshold Crossed: 2 datapoints")
    assert len(callback.failure_reason) <= 256


def test_a_failed_rollback_names_the_alarm_and_the_reason(server, queue, update_endpoint_in_moto):
    old, new = canary_update_rolled_back_by_its_alarm()
    set_endpoint("UpdateRollbackFailed", reason="Rollback could not restore the old fleet.", config=new["endpoint_config_name"])
    token = wait_for(server, queue, new["endpoint_config_name"])
    deliver_once(queue, load_handler("wait_endpoint"))

    reason = server.api.callbacks[token].failure_reason
    assert reason.startswith(f"endpoint {ENDPOINT} is UpdateRollbackFailed: alarm {ALARM} ALARM (Threshold Crossed")
    assert reason.endswith("): Rollback could not restore the old fleet.") or len(reason) == 256


@pytest.mark.slow
def test_creating_endpoint_leaves_the_message_for_a_later_look(server, queue):
    names = deployed()
    set_endpoint("Creating")
    token = wait_for(server, queue, names["endpoint_config_name"])
    handler = load_handler("wait_endpoint")
    count, logs = deliver_once(queue, handler)
    assert count == 1 and server.api.callbacks[token].outcome == ""
    assert logs[-1]["status"] == "waiting" and logs[-1]["next_look_seconds"] == 1
    sqs, url = queue
    assert sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages", []) == []  # hidden for the poll interval
    set_endpoint("InService")
    deadline = time.monotonic() + 10
    while server.api.callbacks[token].outcome == "" and time.monotonic() < deadline:
        count, logs = deliver_once(queue, handler)
    assert server.api.callbacks[token].outcome == "Succeeded"
    assert logs[-1]["receive_count"] >= 2


def test_poll_interval_doubles_up_to_its_ceiling(server):
    handler = load_handler("wait_endpoint")
    assert [handler.poll_seconds(count, 10_000) for count in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert handler.poll_seconds(20, 10_000) == handler.DEFAULT_MAX_POLL_SECONDS
    assert handler.poll_seconds(20, 5) == 6  # never much past the end of the maximum wait


def test_past_the_maximum_wait_fails_naming_it(server, queue):
    names = deployed()
    set_endpoint("Creating")
    token = wait_for(server, queue, names["endpoint_config_name"], max_wait_minutes=30)
    sqs, url = queue
    messages = sqs.receive_message(QueueUrl=url, AttributeNames=["All"]).get("Messages", [])
    messages[0]["Attributes"]["SentTimestamp"] = str(int((time.time() - 31 * 60) * 1000))  # sent 31 minutes ago
    answer, logs = run_handler(load_handler("wait_endpoint"), sqs_event(messages, queue_arn(sqs, url), REGION))
    assert answer == {"batchItemFailures": []}
    reason = server.api.callbacks[token].failure_reason
    assert server.api.callbacks[token].outcome == "Failed"
    assert reason.startswith(f"endpoint {ENDPOINT} is still Creating after 31 minutes, past EndpointWaitMinutes=30")


@pytest.mark.slow
@pytest.mark.parametrize("body, error", [
    ("not json", "the message body is not JSON"),
    (json.dumps({"arguments": {"endpoint_name": ENDPOINT}}), "the message has no callback token"),
    (json.dumps({"token": "abc-!", "arguments": {}}), "the message has no callback token"),
])
def test_bad_message_is_dropped_with_a_clear_error_and_nothing_sent(server, queue, body, error):
    token = server.api.issue("WaitForSingleInstance", EXECUTION)
    sqs, url = queue
    sqs.send_message(QueueUrl=url, MessageBody=body)
    count, logs = deliver_once(queue, load_handler("wait_endpoint"))
    assert count == 1
    assert logs[-1]["status"] == "dropped" and logs[-1]["error"].startswith(error)
    assert server.api.callbacks[token].outcome == ""  # nothing was sent to the pipeline
    assert visible(queue) == 0


def test_bad_arguments_with_a_token_fail_the_step_naming_the_field(server, queue):
    token = wait_for(server, queue, "Not A Name!")
    deliver_once(queue, load_handler("wait_endpoint"))
    callback = server.api.callbacks[token]
    assert callback.outcome == "Failed"
    assert callback.failure_reason.startswith("bad CallbackStep input: event field 'endpoint_config_name' = 'Not A Name!' is not")


def test_a_stopping_execution_ends_the_wait(server, queue):
    names = deployed()
    set_endpoint("Creating")
    sqs, url = queue
    token = server.api.issue("WaitForSingleInstance", EXECUTION)
    arguments = {"endpoint_name": ENDPOINT, "endpoint_config_name": names["endpoint_config_name"]}
    sqs.send_message(QueueUrl=url, MessageBody=callback_message(token, EXECUTION, arguments, status="Stopping"))
    deliver_once(queue, load_handler("wait_endpoint"))
    assert server.api.callbacks[token].failure_reason == f"the execution is stopping; stopped waiting for endpoint {ENDPOINT}"


@pytest.mark.slow
def test_callback_api_applies_the_limits_of_botocores_model(server):
    """What the stand-in refuses is what SageMaker's API model says SageMaker refuses (lengths the client does not check)."""
    sagemaker = boto3.client("sagemaker", region_name=REGION)
    token = server.api.issue("WaitForSingleInstance", EXECUTION)
    with pytest.raises(sagemaker.exceptions.ClientError, match="FailureReason: length 257 is above 256"):
        sagemaker.send_pipeline_execution_step_failure(CallbackToken=token, FailureReason="x" * 257)
    with pytest.raises(sagemaker.exceptions.ClientError, match="does not match"):
        sagemaker.send_pipeline_execution_step_failure(CallbackToken="abcdefghi-", FailureReason="bad token")
    assert server.api.callbacks[token].outcome == ""
    handler = load_handler("wait_endpoint")
    assert handler.MAX_FAILURE_REASON == 256 and handler.TOKEN_PATTERN.match(token)


def test_callback_api_refuses_a_second_answer_and_unknown_tokens(server):
    sagemaker = boto3.client("sagemaker", region_name=REGION)
    token = server.api.issue("WaitForSingleInstance", EXECUTION)
    answer = sagemaker.send_pipeline_execution_step_success(CallbackToken=token, OutputParameters=[{"Name": "a", "Value": "b"}])
    assert answer["PipelineExecutionArn"] == EXECUTION
    for unknown in (token, "ZZZZZZZZZZ"):
        with pytest.raises(sagemaker.exceptions.ResourceNotFound):
            sagemaker.send_pipeline_execution_step_failure(CallbackToken=unknown, FailureReason="late")
    assert server.api.callbacks[token].outputs == {"a": "b"}

"""Wait for a deployed endpoint without a time limit of its own (the WaitFor... CallbackSteps).

A pipeline CallbackStep puts one message on an SQS queue and waits, for as long
as it takes, until someone calls SendPipelineExecutionStepSuccess or
SendPipelineExecutionStepFailure with the message's token. This function is
triggered by that queue (an event source mapping with ReportBatchItemFailures).
Each delivery looks at the endpoint once:

- InService on the config just deployed: success, with the endpoint's outputs;
- Failed, UpdateRollbackFailed, OutOfService, or InService on another config
  (the update was rolled back): failure with the reason, naming the rollback
  alarms of the update (DescribeEndpoint's LastDeploymentConfig) that fired;
- still Creating, Updating, SystemUpdating or RollingBack: the message is made
  invisible for the next poll interval (doubling from INITIAL_POLL_SECONDS up to
  MAX_POLL_SECONDS) and reported as a batch item failure, so SQS delivers it
  again; once ``max_wait_minutes`` have passed since SageMaker sent it, failure
  naming the wait.

The message body is what SageMaker sends: ``{"token", "pipelineExecutionArn",
"arguments": {"endpoint_name", "endpoint_config_name", "max_wait_minutes"},
"status": "Executing" | "Stopping"}``. A message without a usable token is
logged and dropped (nothing can be told to the pipeline); a token with bad
arguments fails the step with the field that was wrong.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import traceback
from dataclasses import dataclass
from typing import Any, Mapping

from events import (
    WAITING_STATUSES,
    EventError,
    client,
    env_int,
    error_code,
    error_message,
    is_not_found,
    log,
    read_int,
    read_name,
    request_handler,
)

TOKEN_PATTERN = re.compile(r"^[a-zA-Z0-9]{10}$")  # SageMaker's CallbackToken: 10 letters and digits
DEFAULT_MAX_WAIT_MINUTES = 60
MAX_WAIT_MINUTES_LIMIT = 720  # the queue keeps a message 14 days; a day of polling stays far inside it
DEFAULT_INITIAL_POLL_SECONDS = 30
DEFAULT_MAX_POLL_SECONDS = 300
MAX_VISIBILITY_SECONDS = 43200  # SQS's limit for ChangeMessageVisibility
MAX_FAILURE_REASON = 256  # SendPipelineExecutionStepFailure's FailureReason limit
DROPPED_SEND_ERRORS = ("ResourceNotFound", "ValidationException")  # the step is no longer waiting for this token


class BadMessage(ValueError):
    """The SQS message is not a callback message with a token; nothing can be sent for it."""


@dataclass(frozen=True)
class WaitRequest:
    endpoint_name: str
    endpoint_config_name: str
    max_wait_minutes: int


@dataclass(frozen=True)
class Delivery:
    """One SQS record of the event: the callback message and what SQS says about it."""

    message_id: str
    receipt_handle: str
    queue_url: str
    token: str
    execution_arn: str
    stopping: bool
    arguments: Any
    sent_at: float  # seconds since the epoch, when SageMaker sent the message
    receive_count: int


@dataclass(frozen=True)
class Outcome:
    kind: str  # "success", "failure" or "wait"
    detail: str = ""
    outputs: tuple[tuple[str, str], ...] = ()


def parse_arguments(arguments: Any) -> WaitRequest:
    """The CallbackStep's inputs; raises EventError naming the first bad field."""
    return WaitRequest(
        endpoint_name=read_name(arguments, "endpoint_name"),
        endpoint_config_name=read_name(arguments, "endpoint_config_name"),
        max_wait_minutes=read_int(arguments, "max_wait_minutes", default=DEFAULT_MAX_WAIT_MINUTES,
                                  minimum=1, maximum=MAX_WAIT_MINUTES_LIMIT),
    )


def queue_url_of(arn: str) -> str:
    """``arn:aws:sqs:<region>:<account>:<name>`` -> the queue URL the SQS API takes."""
    parts = arn.split(":")
    if len(parts) != 6 or parts[2] != "sqs":
        raise BadMessage(f"eventSourceARN {arn!r} is not an SQS queue ARN")
    return f"https://sqs.{parts[3]}.amazonaws.com/{parts[4]}/{parts[5]}"


def parse_record(record: Any) -> Delivery:
    """One record of an SQS event as Lambda's event source mapping sends it; BadMessage when it is unusable."""
    if not isinstance(record, Mapping) or record.get("eventSource") != "aws:sqs":
        raise BadMessage("the record is not an SQS message (eventSource is not 'aws:sqs')")
    try:
        body = json.loads(record.get("body") or "")
    except (TypeError, json.JSONDecodeError) as error:
        raise BadMessage(f"the message body is not JSON ({error}); expected SageMaker's callback message") from None
    if not isinstance(body, Mapping):
        raise BadMessage("the message body is not a JSON object; expected SageMaker's callback message")
    token = body.get("token")
    if not isinstance(token, str) or not TOKEN_PATTERN.match(token):
        raise BadMessage(f"the message has no callback token (field 'token' = {token!r}); it did not come from a CallbackStep")
    attributes = record.get("attributes") or {}
    try:
        sent_at = int(attributes["SentTimestamp"]) / 1000.0
        receive_count = int(attributes.get("ApproximateReceiveCount", 1))
    except (KeyError, TypeError, ValueError):
        raise BadMessage("the record's attributes lack SentTimestamp or ApproximateReceiveCount") from None
    return Delivery(
        message_id=str(record.get("messageId", "")),
        receipt_handle=str(record.get("receiptHandle", "")),
        queue_url=queue_url_of(str(record.get("eventSourceARN", ""))),
        token=token,
        execution_arn=str(body.get("pipelineExecutionArn", "")),
        stopping=body.get("status") == "Stopping",
        arguments=body.get("arguments"),
        sent_at=sent_at,
        receive_count=max(1, receive_count),
    )


def fired_alarms(endpoint: Mapping[str, Any], since: float) -> str:
    """The last update's rollback alarms that are in ALARM or changed state since ``since`` (epoch seconds),
    as 'alarm NAME ALARM (its reason)'; '' when the update had no alarms or none of them moved."""
    rollback = (endpoint.get("LastDeploymentConfig") or {}).get("AutoRollbackConfiguration") or {}
    names = [alarm["AlarmName"] for alarm in rollback.get("Alarms", []) if alarm.get("AlarmName")]
    if not names:
        return ""
    cloudwatch = client("cloudwatch")
    try:
        answer = cloudwatch.describe_alarms(AlarmNames=names, AlarmTypes=["MetricAlarm", "CompositeAlarm"])
    except Exception as error:  # the failure still goes out, saying why the alarms are not named
        return f"rollback alarms {', '.join(names)} cannot be read ({error_message(error)})"
    fired = []
    for alarm in [*answer.get("MetricAlarms", []), *answer.get("CompositeAlarms", [])]:
        changed = alarm.get("StateUpdatedTimestamp")
        moved = changed is not None and changed.timestamp() >= since
        if alarm.get("StateValue") == "ALARM" or moved:
            fired.append(f"alarm {alarm['AlarmName']} {alarm.get('StateValue')} ({alarm.get('StateReason') or 'no reason given'})")
    return "; ".join(fired)


def with_alarms(text: str, endpoint: Mapping[str, Any], waited_seconds: float) -> str:
    alarms = fired_alarms(endpoint, time.time() - waited_seconds)
    return f"{text}: {alarms}" if alarms else text


def endpoint_outcome(sagemaker: Any, request: WaitRequest, waited_seconds: float) -> Outcome:
    """What one look at the endpoint says: success, failure, or wait some more."""
    name = request.endpoint_name
    try:
        endpoint = sagemaker.describe_endpoint(EndpointName=name)
    except Exception as error:
        if is_not_found(error):
            return Outcome("failure", f"endpoint {name} does not exist; the Deploy step creates it")
        return Outcome("wait", f"cannot describe endpoint {name} yet: {error_message(error)}")
    status = endpoint.get("EndpointStatus", "")
    config = endpoint.get("EndpointConfigName", "")
    reason = endpoint.get("FailureReason") or "no reason given"
    if status == "InService" and config == request.endpoint_config_name:
        return Outcome("success", outputs=(("endpoint_name", name), ("endpoint_config_name", config), ("status", status)))
    if status == "InService":
        rolled_back = with_alarms(f"endpoint {name} rolled back to config {config}, not the deployed "
                                  f"{request.endpoint_config_name}", endpoint, waited_seconds)
        return Outcome("failure", f"{rolled_back}; {endpoint['FailureReason']}" if endpoint.get("FailureReason") else rolled_back)
    if status in WAITING_STATUSES:
        if waited_seconds >= request.max_wait_minutes * 60:
            return Outcome("failure", f"endpoint {name} is still {status} after {waited_seconds / 60:.0f} minutes, "
                                      f"past EndpointWaitMinutes={request.max_wait_minutes}; SageMaker goes on with it: "
                                      "retry the execution once it is InService, or run with a longer EndpointWaitMinutes")
        return Outcome("wait", f"endpoint {name} is {status}")
    ended = with_alarms(f"endpoint {name} is {status or 'in no status'}", endpoint, waited_seconds)
    return Outcome("failure", f"{ended}: {reason}")


def poll_seconds(receive_count: int, remaining_seconds: float) -> int:
    """The visibility timeout before the next look: doubling per delivery, capped, never past the maximum wait."""
    initial = env_int("INITIAL_POLL_SECONDS", DEFAULT_INITIAL_POLL_SECONDS, minimum=1)
    ceiling = env_int("MAX_POLL_SECONDS", DEFAULT_MAX_POLL_SECONDS, minimum=1)
    interval = min(initial * 2 ** min(receive_count - 1, 16), ceiling, MAX_VISIBILITY_SECONDS)
    return int(max(1, min(interval, remaining_seconds + 1)))


def decide(delivery: Delivery) -> tuple[Outcome, WaitRequest | None]:
    """The outcome for one delivery, and its parsed arguments when they were valid."""
    try:
        request = parse_arguments(delivery.arguments if isinstance(delivery.arguments, Mapping) else {})
    except EventError as error:
        return Outcome("failure", f"bad CallbackStep input: {error}"), None
    if delivery.stopping:
        return Outcome("failure", f"the execution is stopping; stopped waiting for endpoint {request.endpoint_name}"), request
    waited = max(0.0, time.time() - delivery.sent_at)
    return endpoint_outcome(client("sagemaker"), request, waited), request


def client_request_token(delivery: Delivery, outcome: Outcome) -> str:
    """The same answer to a message delivered twice is one answer (32 to 128 characters)."""
    return hashlib.sha256(f"{delivery.token}:{outcome.kind}:{outcome.detail}".encode()).hexdigest()


def send(delivery: Delivery, outcome: Outcome) -> None:
    sagemaker = client("sagemaker")
    if outcome.kind == "success":
        sagemaker.send_pipeline_execution_step_success(
            CallbackToken=delivery.token,
            OutputParameters=[{"Name": name, "Value": value} for name, value in outcome.outputs],
            ClientRequestToken=client_request_token(delivery, outcome),
        )
    else:
        sagemaker.send_pipeline_execution_step_failure(
            CallbackToken=delivery.token,
            FailureReason=outcome.detail[:MAX_FAILURE_REASON],
            ClientRequestToken=client_request_token(delivery, outcome),
        )


def postpone(delivery: Delivery, request: WaitRequest) -> int:
    """Hide the message until the next look; returns the seconds chosen."""
    remaining = request.max_wait_minutes * 60 - (time.time() - delivery.sent_at)
    seconds = poll_seconds(delivery.receive_count, remaining)
    sqs = client("sqs")
    sqs.change_message_visibility(QueueUrl=delivery.queue_url, ReceiptHandle=delivery.receipt_handle, VisibilityTimeout=seconds)
    return seconds


def handle_record(record: Any) -> bool:
    """Process one record; True when SQS should deliver it again."""
    try:
        delivery = parse_record(record)
    except BadMessage as error:
        message_id = record.get("messageId", "") if isinstance(record, Mapping) else ""
        log(status="dropped", message_id=message_id, error=str(error))
        return False
    outcome, request = decide(delivery)
    fields = {"message_id": delivery.message_id,
              "execution": delivery.execution_arn, "receive_count": delivery.receive_count,
              "endpoint_name": request.endpoint_name if request else None}
    if outcome.kind == "wait" and request is not None:
        try:
            seconds = postpone(delivery, request)
        except Exception as error:  # the message comes back after the queue's own visibility timeout
            log(**fields, status="waiting", detail=outcome.detail, error=f"cannot change visibility: {error_message(error)}")
            return True
        log(**fields, status="waiting", detail=outcome.detail, next_look_seconds=seconds)
        return True
    try:
        send(delivery, outcome)
    except Exception as error:
        code = error_code(error)
        retry = code not in DROPPED_SEND_ERRORS
        log(**fields, status="send-failed", outcome=outcome.kind, error=f"{code or type(error).__name__}: {error_message(error)}",
            retry=retry)
        return retry
    log(**fields, status=outcome.kind, detail=outcome.detail or None, outputs=dict(outcome.outputs) or None)
    return False


@request_handler("wait-endpoint", summary_line=False)
def handler(event: Mapping[str, Any], context: Any) -> dict[str, list[dict[str, str]]]:
    """SQS batch in, the records to deliver again out (ReportBatchItemFailures); a line per record."""
    records = event.get("Records") if isinstance(event, Mapping) else None
    if not isinstance(records, list):
        log(status="dropped",
            error="the event has no 'Records' list: this function is triggered by the endpoint-wait SQS queue")
        return {"batchItemFailures": []}
    failures = []
    for record in records:
        try:
            retry = handle_record(record)
        except Exception as error:  # a fault here: this record comes back, the others of the batch are unaffected
            log(status="error", error=f"{type(error).__name__}: {error}",
                traceback=traceback.format_exc(limit=20))
            retry = True
        if retry:
            failures.append({"itemIdentifier": str(record.get("messageId", "")) if isinstance(record, Mapping) else ""})
    return {"batchItemFailures": failures}

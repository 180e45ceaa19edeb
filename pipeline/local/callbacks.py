"""Callback steps on this machine: the SageMaker callback API moto lacks, and SQS delivery as Lambda does it.

moto 5.2.5 has no SendPipelineExecutionStepSuccess or SendPipelineExecutionStepFailure
(its server answers them with an error for an unknown action). ``CallbackApi`` is a
WSGI layer in front of moto that answers those two calls as the SageMaker API
reference describes them and passes every other request to moto:

- ``issue(step, execution_arn)`` makes a token (10 letters and digits, as
  SageMaker's are) for a waiting step;
- a request is checked against botocore's shape of the operation (required
  members, types, and the lengths and patterns in its metadata: a 10-character
  token, a FailureReason of at most 256 characters, at most 50 outputs), and
  refused with ValidationException as SageMaker refuses it;
- Success records the step's ``OutputParameters``, Failure its ``FailureReason``;
  either answers ``{"PipelineExecutionArn"}``;
- a token that no step waits for, or one already answered, is refused with
  ResourceNotFound (400), so a second answer cannot change an outcome.

``sqs_event`` turns messages received from moto's SQS into the event Lambda's
event source mapping hands a function, and ``deliver`` does what the mapping
does with the answer: messages the function reports in ``batchItemFailures``
stay in the queue (to come back after their visibility timeout), the others
are deleted.
"""
from __future__ import annotations

import json
import re
import secrets
import string
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from botocore.validate import ParamValidator

from pipeline.constraints import input_member
from pipeline.local.moto_server import StartResponse, ThreadedMotoServer, WsgiApp
from pipeline.status import Status

TARGET_PREFIX = "SageMaker."
OPERATIONS = ("SendPipelineExecutionStepSuccess", "SendPipelineExecutionStepFailure")
TOKEN_ALPHABET = string.ascii_letters + string.digits


@dataclass
class Callback:
    step: str
    execution_arn: str
    outcome: str = ""  # "" while waiting, then Status.SUCCEEDED or Status.FAILED: the step's status
    outputs: dict[str, str] = field(default_factory=dict)
    failure_reason: str = ""
    answered: threading.Event = field(default_factory=threading.Event)


class CallbackApi:
    """WSGI application: the two callback operations here, everything else to ``moto``."""

    def __init__(self, moto: WsgiApp) -> None:
        self.moto = moto
        self.callbacks: dict[str, Callback] = {}
        self._lock = threading.Lock()

    def issue(self, step: str, execution_arn: str) -> str:
        token = "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(10))
        with self._lock:
            self.callbacks[token] = Callback(step, execution_arn)
        return token

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        operation = target[len(TARGET_PREFIX):] if target.startswith(TARGET_PREFIX) else ""
        if operation not in OPERATIONS:
            return self.moto(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        try:
            request = json.loads(environ["wsgi.input"].read(length) or b"{}")
        except ValueError:
            request = None
        status, body = self._answer(operation, request)
        payload = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/x-amz-json-1.1"), ("Content-Length", str(len(payload)))])
        return [payload]

    def _answer(self, operation: str, request: Any) -> tuple[str, dict[str, Any]]:
        problem = shape_problem(operation, request)
        if problem:
            return _error("ValidationException", problem)
        token = request["CallbackToken"]
        with self._lock:
            callback = self.callbacks.get(token)
            if callback is None or callback.outcome:
                return _error("ResourceNotFound", f"no callback step is waiting for token {token}")
            if operation == "SendPipelineExecutionStepSuccess":
                callback.outputs = {item["Name"]: item["Value"] for item in request.get("OutputParameters", [])}
                callback.outcome = Status.SUCCEEDED
            else:
                callback.failure_reason = request.get("FailureReason", "")
                callback.outcome = Status.FAILED
            callback.answered.set()
        return "200 OK", {"PipelineExecutionArn": callback.execution_arn}


def shape_problem(operation: str, request: Any) -> str:
    """Why ``request`` is not valid input of the SageMaker ``operation`` by botocore's model ('' when it is)."""
    shape = input_member("sagemaker", operation)
    if not isinstance(request, dict):
        return "the request body is not a JSON object"
    report = ParamValidator().validate(request, shape)
    if report.has_errors():
        return report.generate_report()
    return _limits_problem(request, shape, "")


def _limits_problem(value: Any, shape: Any, where: str) -> str:
    """The length and pattern rules of the shape metadata, which botocore's validator leaves to the service."""
    metadata = shape.metadata
    if shape.type_name in ("string", "list") and "max" in metadata and len(value) > metadata["max"]:
        return f"{where or 'value'}: length {len(value)} is above {metadata['max']}"
    if shape.type_name == "string" and "pattern" in metadata and not re.fullmatch(metadata["pattern"], value):
        return f"{where or 'value'}: {value!r} does not match {metadata['pattern']}"
    if shape.type_name == "structure":
        for name, member in shape.members.items():
            if name in value:
                problem = _limits_problem(value[name], member, f"{where}.{name}".lstrip("."))
                if problem:
                    return problem
    if shape.type_name == "list":
        for index, item in enumerate(value):
            problem = _limits_problem(item, shape.member, f"{where}[{index}]")
            if problem:
                return problem
    return ""


def _error(code: str, message: str) -> tuple[str, dict[str, Any]]:
    return "400 Bad Request", {"__type": code, "message": message}


class MotoWithCallbacks(ThreadedMotoServer):
    """moto's server app behind ``CallbackApi``, on a 127.0.0.1 port (0: a free one), from a thread."""

    def __init__(self, port: int = 0) -> None:
        super().__init__(CallbackApi, port)

    @property
    def api(self) -> CallbackApi:
        return self.app


def queue_arn(sqs: Any, queue_url: str) -> str:
    return sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def sqs_event(messages: list[dict[str, Any]], arn: str, region: str) -> dict[str, Any]:
    """The event an SQS event source mapping sends for ``messages`` (ReceiveMessage's answer, all attributes)."""
    return {"Records": [{
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": dict(message.get("Attributes", {})),
        "messageAttributes": dict(message.get("MessageAttributes", {})),
        "md5OfBody": message.get("MD5OfBody", ""),
        "eventSource": "aws:sqs",
        "eventSourceARN": arn,
        "awsRegion": region,
    } for message in messages]}


def deliver(sqs: Any, queue_url: str, region: str, invoke: Callable[[dict[str, Any]], Any], wait_seconds: int = 1) -> int:
    """Receive what is visible, hand it to ``invoke`` as Lambda would, delete what it did not report; returns the count."""
    messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_seconds,
                                   AttributeNames=["All"], MessageAttributeNames=["All"]).get("Messages", [])
    if not messages:
        return 0
    answer = invoke(sqs_event(messages, queue_arn(sqs, queue_url), region))
    retry = {item.get("itemIdentifier") for item in (answer or {}).get("batchItemFailures", [])} if isinstance(answer, dict) else set()
    for message in messages:
        if message["MessageId"] not in retry:
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return len(messages)


def callback_message(token: str, execution_arn: str, arguments: dict[str, Any], status: str = Status.EXECUTING) -> str:
    """The body SageMaker puts on a CallbackStep's queue."""
    return json.dumps({"token": token, "pipelineExecutionArn": execution_arn, "arguments": arguments, "status": status})

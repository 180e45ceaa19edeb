"""AWS clients for the publishing commands, and AWS errors as one clear line.

Every client uses botocore's standard retry mode (throttling and transient
errors are retried with backoff), the region/profile/endpoint the command was
given, and nothing else. ``explained(...)`` turns a failed call into an
``AwsError`` whose message says what was being done and what to fix: access
denied names the IAM action, a missing bucket or role names it.
"""
from __future__ import annotations

import argparse
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
    WaiterError,
)

from pipeline.commands import UsageError

ACCESS_DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthorizationError", "403"}
NOT_AUTHENTICATED = {"UnrecognizedClientException", "InvalidClientTokenId", "SignatureDoesNotMatch",
                     "ExpiredToken", "ExpiredTokenException"}
# Operations whose IAM action has another name than the operation.
IAM_ACTIONS = {
    ("s3", "HeadObject"): "s3:GetObject",
    ("s3", "HeadBucket"): "s3:ListBucket",
    ("s3", "ListObjectsV2"): "s3:ListBucket",
}
SERVICE_PREFIX = {"lambda": "lambda", "s3": "s3", "sagemaker": "sagemaker", "iam": "iam", "sts": "sts",
                  "cloudformation": "cloudformation", "codebuild": "codebuild", "logs": "logs"}
_PERFORM = re.compile(r"perform:? ([a-z0-9-]+:[A-Za-z0-9]+)")
_XML_CODE = re.compile(r"<Code>([^<]+)</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")
MAX_MESSAGE = 400
_ROLE_HINT = re.compile(r"\brole\b", re.IGNORECASE)


class AwsError(UsageError):
    """An AWS call failed in a way the user can fix; the message is one line."""


@dataclass(frozen=True)
class Target:
    """Where the commands send their calls: a region, an optional profile, an optional endpoint (e.g. moto)."""
    region: str
    profile: str | None = None
    endpoint_url: str | None = None


def add_aws_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("AWS connection")
    group.add_argument("--profile", default=None, help="named profile from ~/.aws/config (default: the usual credential chain)")
    group.add_argument("--endpoint-url", dest="endpoint_url", default=None,
                       help="send every AWS call to this URL, e.g. a local emulator such as http://127.0.0.1:5000")


def client_config() -> Config:
    return Config(retries={"mode": "standard", "max_attempts": 8}, user_agent_extra="dogbreed-pipeline")


class Clients:
    """One boto3 session and lazily created clients for the services the commands use."""

    def __init__(self, target: Target) -> None:
        self.target = target
        try:
            self.session = boto3.Session(profile_name=target.profile, region_name=target.region)
        except ProfileNotFound:
            raise AwsError(f"AWS profile {target.profile!r} is not in ~/.aws/config or ~/.aws/credentials") from None
        self._clients: dict[str, Any] = {}

    def client(self, service: str) -> Any:
        if service not in self._clients:
            client = self.session.client(
                service, region_name=self.target.region, endpoint_url=self.target.endpoint_url, config=client_config(),
            )
            self._clients[service] = _ServiceClient(client, service)
        return self._clients[service]

    s3 = property(lambda self: self.client("s3"))
    lambda_ = property(lambda self: self.client("lambda"))
    sagemaker = property(lambda self: self.client("sagemaker"))
    sts = property(lambda self: self.client("sts"))
    logs = property(lambda self: self.client("logs"))


class _ServiceClient:
    """A boto3 client whose errors remember the service, so a message can name the IAM action."""

    def __init__(self, client: Any, service: str) -> None:
        self._client = client
        self._service = service

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if name.startswith("_") or not callable(attribute) or name in ("get_paginator", "get_waiter", "can_paginate"):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attribute(*args, **kwargs)
            except ClientError as error:
                error.service = self._service  # type: ignore[attr-defined]
                raise

        return call


def error_code(error: ClientError) -> str:
    return _code_and_message(error)[0]


def error_message(error: ClientError) -> str:
    return _code_and_message(error)[1]


def _code_and_message(error: ClientError) -> tuple[str, str]:
    """Code and message, also when the body was an XML error document botocore left unparsed
    (an emulator or a proxy answering a JSON-protocol service)."""
    details = error.response.get("Error", {})
    code, message = str(details.get("Code", "")), str(details.get("Message", "")).strip()
    if message.startswith("<"):
        xml_code, xml_message = _XML_CODE.search(message), _XML_MESSAGE.search(message)
        code = xml_code.group(1) if xml_code else code
        message = xml_message.group(1) if xml_message else ""
    return code, " ".join(message.split())[:MAX_MESSAGE]


def http_status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def iam_action(error: ClientError) -> str:
    """The IAM action a denied call needed: from AWS's message when it says, else from the operation."""
    match = _PERFORM.search(error_message(error))
    if match:
        return match.group(1)
    service = _service_of(error)
    return IAM_ACTIONS.get((service, error.operation_name), f"{service}:{error.operation_name}")


def _service_of(error: ClientError) -> str:
    return SERVICE_PREFIX.get(getattr(error, "service", ""), "aws")


def describe_client_error(error: ClientError, doing: str, *, bucket: str | None = None, role: str | None = None) -> str:
    code, message = error_code(error), error_message(error)
    if code in NOT_AUTHENTICATED:
        return (f"AWS did not accept the credentials while {doing} ({code}): set AWS_PROFILE/--profile or "
                f"fresh AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    if code in ACCESS_DENIED:
        return f"access denied to {iam_action(error)} while {doing}: grant it to the caller's role or policy"
    if code == "NoSuchBucket" or (bucket and "NoSuchBucket" in message):
        return f"bucket {bucket or error.response.get('Error', {}).get('BucketName', '?')} does not exist (while {doing}): create it (infra/template.yaml) or set --bucket / ARTIFACT_BUCKET"
    if role and (code in ("NoSuchEntity", "InvalidParameterValueException", "ValidationException") and _ROLE_HINT.search(message)):
        return (f"role {role} cannot be used (while {doing}): {message.rstrip('.')} - create it (infra/template.yaml) "
                f"or pass its ARN in the matching --*-role-arn flag")
    detail = f"{code}: {message}" if message else code or str(error)
    return f"{doing} failed: {detail}"


@contextmanager
def explained(doing: str, *, bucket: str | None = None, role: str | None = None) -> Iterator[None]:
    """Run AWS calls; a failure becomes an AwsError that says what was being done and what to fix.

    ``doing`` reads after "while", e.g. "uploading s3://bucket/key".
    """
    try:
        yield
    except ClientError as error:
        raise AwsError(describe_client_error(error, doing, bucket=bucket, role=role)) from None
    except (NoCredentialsError, PartialCredentialsError):
        raise AwsError(f"no AWS credentials found while {doing}: set AWS_PROFILE/--profile, or "
                       f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
    except NoRegionError:
        raise AwsError(f"no AWS region while {doing}: pass --region or set AWS_REGION") from None
    except EndpointConnectionError as error:
        raise AwsError(f"cannot reach {error.kwargs.get('endpoint_url', 'the AWS endpoint')} while {doing}: check the network, --region and --endpoint-url") from None
    except WaiterError as error:
        raise AwsError(f"gave up waiting while {doing}: {error.last_response.get('Error', {}).get('Message') or error}") from None
    except BotoCoreError as error:
        raise AwsError(f"{doing} failed: {error}") from None


def is_not_found(error: ClientError) -> bool:
    return error_code(error) in {"404", "NoSuchKey", "NotFound", "ResourceNotFound", "ResourceNotFoundException"} \
        or http_status(error) == 404

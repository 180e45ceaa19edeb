"""The events the invoke function is called with, one class per integration, and the answers each expects back.

API Gateway REST APIs send payload 1.0 (both header maps), HTTP APIs and
function URLs payload 2.0 (a repeated query parameter's values joined with
commas), an Application Load Balancer its own shape (the query as the client
encoded it; ``statusDescription`` in the answer, and only ``multiValueHeaders``
read back in multi-value mode), and a direct invocation the JSON request
itself. Each integration parses its event into a ``Request`` (a malformed
field is an ``HttpError`` 400 naming it) and shapes the response.
"""
from __future__ import annotations

import abc
import base64
import binascii
import http
import urllib.parse
from dataclasses import dataclass
from typing import Any, Mapping


class HttpError(Exception):
    """An answer other than 200: the status, a short message for the caller, and details for the log only."""

    def __init__(self, status: int, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail


def short_repr(value: Any) -> str:
    """``repr(value)``, cut to 40 characters for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def base64_length(byte_count: int) -> int:
    """The longest base64 text of ``byte_count`` bytes, with a little slack for a trailing newline."""
    return 4 * ((byte_count + 2) // 3) + 4


def decoded_base64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, f"{what} is not valid base64") from None


@dataclass(frozen=True)
class Request:
    method: str
    headers: Mapping[str, str]  # lower-case names, the last value of a repeated header
    query: Mapping[str, str]  # the last value of a repeated parameter
    body: bytes | None
    body_was_base64: bool
    payload: Mapping[str, Any] | None  # a direct invocation's event
    integration: Integration

    @property
    def is_proxy(self) -> bool:
        return self.integration.is_proxy


class Integration(abc.ABC):
    """What every integration shares: the answer as API Gateway's payload 1.0 reads it."""

    is_proxy = True

    @abc.abstractmethod
    def request(self, event: Mapping[str, Any], max_body_bytes: int) -> Request:
        """The event parsed into a Request; an HttpError (400/413) names what is malformed."""

    def response(self, status: int, body: str, headers: Mapping[str, str]) -> dict[str, Any]:
        return {"statusCode": status, "body": body, "isBase64Encoded": False, **self.headers_field(headers)}

    def headers_field(self, headers: Mapping[str, str]) -> dict[str, Any]:
        return {"headers": dict(headers)}


class DirectInvocation(Integration):
    """The console, the CLI or an SDK calling the function: the event is the JSON request itself."""

    is_proxy = False

    def request(self, event: Mapping[str, Any], max_body_bytes: int) -> Request:
        return Request("POST", {}, {}, None, False, event, self)


class RestApi(Integration):
    """API Gateway REST API, Lambda proxy integration (payload 1.0): single- and multi-value maps, the last value wins."""

    def request(self, event: Mapping[str, Any], max_body_bytes: int) -> Request:
        headers = {name.lower(): value for name, value in _last_values(event, "headers", "multiValueHeaders", "header").items()}
        query = self.query(_last_values(event, "queryStringParameters", "multiValueQueryStringParameters", "query parameter"))
        method = _method(event)
        body, encoded = _body(event, max_body_bytes) if method == "POST" else (None, False)
        return Request(method, headers, query, body, encoded, None, self)

    def query(self, values: dict[str, str]) -> dict[str, str]:
        return values


class HttpApi(RestApi):
    """API Gateway HTTP API and Lambda function URLs (payload 2.0): a repeated parameter's values arrive joined with commas."""

    def query(self, values: dict[str, str]) -> dict[str, str]:
        return {name: value.rsplit(",", 1)[-1] for name, value in values.items()}


class LoadBalancer(RestApi):
    """An Application Load Balancer target group: the query as the client encoded it; the answer has a status description."""

    def query(self, values: dict[str, str]) -> dict[str, str]:
        return {urllib.parse.unquote_plus(name): urllib.parse.unquote_plus(value) for name, value in values.items()}

    def response(self, status: int, body: str, headers: Mapping[str, str]) -> dict[str, Any]:
        return {**super().response(status, body, headers), "statusDescription": f"{status} {http.HTTPStatus(status).phrase}"}


class LoadBalancerMultiValue(LoadBalancer):
    """An Application Load Balancer with multi-value headers on: it reads only ``multiValueHeaders`` back."""

    def headers_field(self, headers: Mapping[str, str]) -> dict[str, Any]:
        return {"multiValueHeaders": {name: [value] for name, value in headers.items()}}


def is_proxy_event(event: Mapping[str, Any]) -> bool:
    return "httpMethod" in event or "requestContext" in event or "routeKey" in event


def integration_of(event: Mapping[str, Any]) -> Integration:
    """The integration that sent ``event``, told by the fields each one sets."""
    if not is_proxy_event(event):
        return DirectInvocation()
    if "elb" in _mapping_field(event, "requestContext"):
        return LoadBalancerMultiValue() if "multiValueHeaders" in event else LoadBalancer()
    if event.get("version") == "2.0":
        return HttpApi()
    return RestApi()


def parse_request(event: Any, max_body_bytes: int) -> Request:
    """The request in ``event``, whichever integration sent it; a body over ``max_body_bytes`` is a 413."""
    if not isinstance(event, Mapping):
        raise HttpError(400, "the event must be a JSON object")
    return integration_of(event).request(event, max_body_bytes)


def proxy_response(status: int, body: str, headers: Mapping[str, str], request: Request | None) -> dict[str, Any]:
    """The answer in the shape ``request``'s integration reads; an event that could not be parsed gets payload 1.0's."""
    integration = request.integration if request is not None else RestApi()
    return integration.response(status, body, headers)


# --- the fields of a proxy event -------------------------------------------

def _mapping_field(event: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = event.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise HttpError(400, f"{name} must be an object in the proxy event")
    return value


def _last_values(event: Mapping[str, Any], single: str, multi: str, what: str) -> dict[str, str]:
    """Name -> last value from the single-value map and the multi-value map of an event (either may be absent)."""
    values: dict[str, str] = {}
    for name, value in _mapping_field(event, single).items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise HttpError(400, f"{what} {short_repr(name)} must have a string value, got {type(value).__name__}")
        values[name] = value
    for name, items in _mapping_field(event, multi).items():
        if not isinstance(name, str) or not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise HttpError(400, f"{what} {short_repr(name)} in {multi} must be a list of strings")
        if items:
            values[name] = items[-1]
    return values


def _method(event: Mapping[str, Any]) -> str:
    context = _mapping_field(event, "requestContext")
    http_context = context.get("http")
    if http_context is not None and not isinstance(http_context, Mapping):
        raise HttpError(400, "requestContext.http must be an object in the proxy event")
    method = event.get("httpMethod") or (http_context or {}).get("method") or "POST"
    if not isinstance(method, str):
        raise HttpError(400, "the proxy event's HTTP method must be a string")
    return method.upper()


def _body(event: Mapping[str, Any], max_bytes: int) -> tuple[bytes | None, bool]:
    """The raw body bytes of a proxy event and whether they arrived base64-encoded; the size is checked first."""
    encoded = event.get("isBase64Encoded")
    if encoded is not None and not isinstance(encoded, bool):
        raise HttpError(400, "isBase64Encoded must be true or false in the proxy event")
    body = event.get("body")
    if body is None or body == "":
        return None, bool(encoded)
    if not isinstance(body, str):
        raise HttpError(400, "the request body must be a string in the proxy event")
    if len(body) > base64_length(max_bytes):
        raise HttpError(413, f"the request body is larger than {max_bytes} bytes")
    if encoded:
        return decoded_base64(body, "the request body"), True
    return body.encode("utf-8", "surrogatepass"), False

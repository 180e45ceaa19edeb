"""The public inference function: an image in, the endpoint's top-k dog breeds out, as JSON.

Accepts API Gateway (REST and HTTP API) and Lambda function URL proxy events,
and direct invocations. The image arrives as the binary body (base64-encoded by
the proxy), or as JSON with ``image_base64`` or an https ``url``. Every answer
is a proxy response whose body is JSON: ``{"top_k": [...]}`` on success, or
``{"error": "..."}`` with 400, 405, 413, 415, 500 or 502. No stack trace ever
reaches the caller; one JSON log line per request records what happened,
never the image.

Environment: ENDPOINT_NAME (required), ALLOWED_ORIGIN (comma-separated
origins for CORS; none by default), TOP_K (default 5), MAX_IMAGE_BYTES
(default 4 MiB), URL_TIMEOUT_SECONDS (default 5).
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Mapping

from botocore.exceptions import BotoCoreError, ClientError

from events import NAME_PATTERN, client, error_code, error_message, log, request_id

IMAGE_SIGNATURES = {"image/jpeg": b"\xff\xd8\xff", "image/png": b"\x89PNG\r\n\x1a\n"}
IMAGE_TYPE_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg"}
JSON_TYPES = ("application/json", "text/json")
DEFAULT_TOP_K = 5
MAX_TOP_K = 20
DEFAULT_MAX_IMAGE_BYTES = 4 * 1024 * 1024  # a base64 body of this size stays under Lambda's 6 MB payload limit
DEFAULT_URL_TIMEOUT_SECONDS = 5.0
MAX_REDIRECTS = 3
CHUNK_BYTES = 64 * 1024
ENDPOINT_READ_TIMEOUT_SECONDS = 12.0  # two tries stay inside API Gateway's 29 s
PASSED_THROUGH_MODEL_STATUSES = (400, 413, 415)  # the container refused the image itself


class HttpError(Exception):
    """An answer other than 200: the status and a short message for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ConfigurationError(RuntimeError):
    """An environment variable of the function has a value that cannot work."""


@dataclass(frozen=True)
class Settings:
    endpoint_name: str
    allowed_origins: tuple[str, ...]
    top_k: int
    max_image_bytes: int
    url_timeout_seconds: float


def _env_number(environ: Mapping[str, str], name: str, default: float, minimum: float, kind: type) -> Any:
    raw = environ.get(name, "").strip()
    if not raw:
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigurationError(f"environment variable {name}={raw!r} is not a {kind.__name__}") from None
    if value < minimum:
        raise ConfigurationError(f"environment variable {name}={raw!r} is below {minimum}")
    return value


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Settings from the function's environment; raises ConfigurationError naming the variable."""
    endpoint_name = environ.get("ENDPOINT_NAME", "").strip()
    if not NAME_PATTERN.match(endpoint_name):
        raise ConfigurationError(f"environment variable ENDPOINT_NAME={endpoint_name!r} is not a SageMaker endpoint name")
    origins = tuple(origin.strip().rstrip("/") for origin in environ.get("ALLOWED_ORIGIN", "").split(",") if origin.strip())
    top_k = _env_number(environ, "TOP_K", DEFAULT_TOP_K, 1, int)
    if top_k > MAX_TOP_K:
        raise ConfigurationError(f"environment variable TOP_K={top_k} is above {MAX_TOP_K}")
    return Settings(
        endpoint_name=endpoint_name,
        allowed_origins=origins,
        top_k=top_k,
        max_image_bytes=_env_number(environ, "MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES, 1, int),
        url_timeout_seconds=_env_number(environ, "URL_TIMEOUT_SECONDS", DEFAULT_URL_TIMEOUT_SECONDS, 0.1, float),
    )


# --- the request -----------------------------------------------------------

@dataclass(frozen=True)
class Request:
    method: str
    headers: Mapping[str, str]  # lower-case names
    query: Mapping[str, str]
    body: bytes | None
    body_was_base64: bool
    is_proxy: bool
    payload: Mapping[str, Any] | None  # a direct invocation's event


def is_proxy_event(event: Mapping[str, Any]) -> bool:
    return "httpMethod" in event or "requestContext" in event or "routeKey" in event


def proxy_method(event: Mapping[str, Any]) -> str:
    http = (event.get("requestContext") or {}).get("http") or {}
    return str(event.get("httpMethod") or http.get("method") or "POST").upper()


def proxy_body(event: Mapping[str, Any], max_bytes: int) -> bytes | None:
    """The raw body bytes of a proxy event; the size is checked before decoding."""
    body = event.get("body")
    if body is None or body == "":
        return None
    if not isinstance(body, str):
        raise HttpError(400, "the request body must be a string in the proxy event")
    if event.get("isBase64Encoded"):
        if len(body) > _base64_length(max_bytes):
            raise HttpError(413, f"the request body is larger than {max_bytes} bytes")
        return _b64decode(body, "the request body")
    return body.encode("utf-8")


def parse_request(event: Any, settings: Settings) -> Request:
    if not isinstance(event, Mapping):
        raise HttpError(400, "the event must be a JSON object")
    if not is_proxy_event(event):
        return Request("POST", {}, {}, None, False, False, event)
    headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    query = {str(k): str(v) for k, v in (event.get("queryStringParameters") or {}).items()}
    method = proxy_method(event)
    body = proxy_body(event, settings.max_image_bytes) if method == "POST" else None
    return Request(method, headers, query, body, bool(event.get("isBase64Encoded")), True, None)


def media_type(headers: Mapping[str, str]) -> str:
    value = headers.get("content-type", "").split(";")[0].strip().lower()
    return IMAGE_TYPE_ALIASES.get(value, value)


def _base64_length(byte_count: int) -> int:
    return 4 * ((byte_count + 2) // 3) + 4  # a little slack for a trailing newline


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, f"{what} is not valid base64") from None


def requested_top_k(value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())):
        raise HttpError(400, f"top_k must be a whole number from 1 to {MAX_TOP_K}, got {value!r}")
    top_k = int(value)
    if not 1 <= top_k <= MAX_TOP_K:
        raise HttpError(400, f"top_k must be from 1 to {MAX_TOP_K}, got {top_k}")
    return top_k


@dataclass(frozen=True)
class Image:
    data: bytes
    content_type: str
    source: str  # body, image_base64 or url
    url_host: str = ""


def image_type(data: bytes) -> str:
    """image/jpeg or image/png from the leading bytes; refuses anything else with 415."""
    for content_type, signature in IMAGE_SIGNATURES.items():
        if data.startswith(signature):
            return content_type
    raise HttpError(415, "the image is neither JPEG nor PNG")


def checked_image(data: bytes, source: str, max_bytes: int, url_host: str = "") -> Image:
    if not data:
        raise HttpError(400, "the image is empty")
    if len(data) > max_bytes:
        raise HttpError(413, f"the image is larger than {max_bytes} bytes")
    return Image(data, image_type(data), source, url_host)


def image_from_json(payload: Any, settings: Settings) -> tuple[Image, int]:
    """The image and top_k named by a JSON request: exactly one of image_base64 and url."""
    if not isinstance(payload, Mapping):
        raise HttpError(400, "the JSON body must be an object with image_base64 or url")
    top_k = requested_top_k(payload.get("top_k"), settings.top_k)
    has_data, has_url = payload.get("image_base64") is not None, payload.get("url") is not None
    if has_data == has_url:
        raise HttpError(400, "send exactly one of image_base64 and url")
    if has_data:
        text = payload["image_base64"]
        if not isinstance(text, str):
            raise HttpError(400, "image_base64 must be a string")
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]  # a data URL: keep the base64 part
        if len(text) > _base64_length(settings.max_image_bytes):
            raise HttpError(413, f"the image is larger than {settings.max_image_bytes} bytes")
        return checked_image(_b64decode(text, "image_base64"), "image_base64", settings.max_image_bytes), top_k
    url = payload["url"]
    if not isinstance(url, str):
        raise HttpError(400, "url must be a string")
    data, _ = fetch_image(url, max_bytes=settings.max_image_bytes, timeout=settings.url_timeout_seconds)
    return checked_image(data, "url", settings.max_image_bytes, urllib.parse.urlsplit(url).hostname or ""), top_k


def image_from_request(request: Request, settings: Settings) -> tuple[Image, int]:
    if request.payload is not None:
        return image_from_json(request.payload, settings)
    if request.body is None:
        raise HttpError(400, "the request has no body: send a JPEG or PNG image, or JSON with image_base64 or url")
    kind = media_type(request.headers)
    if kind in IMAGE_SIGNATURES:
        if not request.body_was_base64:
            raise HttpError(400, "binary image bodies must arrive base64-encoded: configure the API's binary media types for image/*")
        top_k = requested_top_k(request.query.get("top_k"), settings.top_k)
        return checked_image(request.body, "body", settings.max_image_bytes), top_k
    if kind in JSON_TYPES or (not kind and request.body.lstrip().startswith(b"{")):
        try:
            payload = json.loads(request.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise HttpError(400, f"the JSON body cannot be parsed: {error}") from None
        return image_from_json(payload, settings)
    raise HttpError(415, f"unsupported content type {kind or '(none)'!r}: send image/jpeg, image/png or application/json")


# --- fetching an image URL -------------------------------------------------

def check_public_https(url: str, allow_private_addresses: bool = False) -> str:
    """The URL's host name; refuses anything but https to a host with only public addresses."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "https":
        raise HttpError(400, "url must start with https://")
    if not parts.hostname:
        raise HttpError(400, "url has no host")
    if parts.username or parts.password:
        raise HttpError(400, "url must not carry a user name or password")
    if not allow_private_addresses:
        for address in resolved_addresses(parts.hostname, parts.port or 443):
            if not address.is_global:
                raise HttpError(400, "url points to a private or local address; send a public https URL")
    return parts.hostname


def resolved_addresses(host: str, port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise HttpError(400, f"the host {host!r} of url cannot be resolved") from None
    return {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow at most MAX_REDIRECTS redirects, each to a public https URL."""

    max_redirections = MAX_REDIRECTS

    def __init__(self, allow_private_addresses: bool) -> None:
        super().__init__()
        self.allow_private_addresses = allow_private_addresses

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        check_public_https(newurl, self.allow_private_addresses)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_image(
    url: str,
    *,
    max_bytes: int,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    allow_private_addresses: bool = False,
) -> tuple[bytes, str]:
    """The bytes and content type behind an https image URL.

    Refuses (as HttpError) other schemes, private addresses (unless allowed),
    content types other than JPEG and PNG (415), bodies over ``max_bytes``
    (413, before reading them when the server declares their length), and
    downloads that take longer than ``timeout`` seconds in all. Addresses are
    checked when the URL is resolved, not again at connect time.
    """
    check_public_https(url, allow_private_addresses)
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=ssl_context or ssl.create_default_context()),
        _CheckedRedirects(allow_private_addresses),
    )
    request = urllib.request.Request(url, headers={"Accept": "image/jpeg, image/png", "User-Agent": "dogbreed-invoke/1"})
    deadline = time.monotonic() + timeout
    try:
        with opener.open(request, timeout=timeout) as response:
            content_type = IMAGE_TYPE_ALIASES.get(response.headers.get_content_type(), response.headers.get_content_type())
            if content_type not in IMAGE_SIGNATURES:
                raise HttpError(415, f"url answered with content type {content_type!r}, not image/jpeg or image/png")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise HttpError(413, f"the image at url is larger than {max_bytes} bytes")
            return _read_capped(response, max_bytes, deadline, timeout), content_type
    except HttpError:
        raise
    except urllib.error.HTTPError as error:
        raise HttpError(400, f"url answered HTTP {error.code}") from None
    except (TimeoutError, socket.timeout):
        raise HttpError(400, f"url did not answer within {timeout:g} s") from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise HttpError(400, f"url did not answer within {timeout:g} s") from None
        raise HttpError(400, f"url cannot be fetched: {reason}") from None
    except (ssl.SSLError, OSError) as error:
        raise HttpError(400, f"url cannot be fetched: {error.__class__.__name__}") from None


def _read_capped(response: Any, max_bytes: int, deadline: float, timeout: float) -> bytes:
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise HttpError(400, f"url did not deliver the image within {timeout:g} s")
        chunk = response.read(CHUNK_BYTES)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise HttpError(413, f"the image at url is larger than {max_bytes} bytes")
        chunks.append(chunk)


# --- the endpoint ----------------------------------------------------------

def top_predictions(body: bytes, top_k: int) -> list[dict[str, Any]]:
    """The first ``top_k`` (label, probability) pairs of the endpoint's answer for one image."""
    try:
        answer = json.loads(body)
        ranked = answer["predictions"][0]["top_k"]
        predictions = [{"label": str(item["label"]), "probability": float(item["probability"])} for item in ranked]
    except (ValueError, KeyError, IndexError, TypeError):
        raise HttpError(502, "the model endpoint gave an answer this function cannot read") from None
    if not predictions:
        raise HttpError(502, "the model endpoint returned no predictions")
    return sorted(predictions, key=lambda item: -item["probability"])[:top_k]


def model_error_status(error: ClientError) -> tuple[int, str] | None:
    """The container's own 4xx refusal of the image, passed on to the caller; None for failures."""
    if error_code(error) != "ModelError":
        return None
    details = error.response
    status = int(details.get("OriginalStatusCode") or 0)
    if status not in PASSED_THROUGH_MODEL_STATUSES:
        return None
    message = str(details.get("OriginalMessage") or "")
    try:
        message = str(json.loads(message).get("error", message))
    except (ValueError, AttributeError):
        pass
    return status, (message or "the model refused the image")[:300]


def classify(image: Image, settings: Settings, top_k: int) -> list[dict[str, Any]]:
    try:
        response = client("sagemaker-runtime", read_timeout=ENDPOINT_READ_TIMEOUT_SECONDS, max_attempts=2).invoke_endpoint(
            EndpointName=settings.endpoint_name,
            ContentType=image.content_type,
            Accept="application/json",
            CustomAttributes=f"top_k={top_k}",
            Body=image.data,
        )
        body = response["Body"].read()
    except ClientError as error:
        passed = model_error_status(error)
        if passed:
            raise HttpError(*passed) from None
        log(function="invoke-endpoint", event="endpoint-error", code=error_code(error), detail=error_message(error)[:500])
        raise HttpError(502, "the model endpoint failed to answer; try again later") from None
    except BotoCoreError as error:
        log(function="invoke-endpoint", event="endpoint-error", code=error.__class__.__name__, detail=str(error)[:500])
        raise HttpError(502, "the model endpoint cannot be reached; try again later") from None
    if not str(response.get("ContentType", "")).lower().startswith("application/json"):
        raise HttpError(502, "the model endpoint answered with a content type other than JSON")
    return top_predictions(body, top_k)


# --- the response ----------------------------------------------------------

def cors_headers(settings: Settings | None, request: Request | None, preflight: bool = False) -> dict[str, str]:
    """CORS headers for an allowed Origin; none when no origin is configured or the caller's is not allowed."""
    if settings is None or request is None or not settings.allowed_origins:
        return {}
    origin = request.headers.get("origin", "").rstrip("/")
    if "*" in settings.allowed_origins:
        allowed = "*"
    elif origin in settings.allowed_origins:
        allowed = origin
    else:
        return {"Vary": "Origin"}
    headers = {"Access-Control-Allow-Origin": allowed, "Vary": "Origin"}
    if preflight:
        headers.update({
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": "content-type",
            "Access-Control-Max-Age": "600",
        })
    return headers


def response(status: int, body: Mapping[str, Any] | None, extra_headers: Mapping[str, str]) -> dict[str, Any]:
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store", **extra_headers}
    return {"statusCode": status, "headers": headers, "body": json.dumps(body) if body is not None else "", "isBase64Encoded": False}


def handler(event: Any, context: Any) -> dict[str, Any]:
    started = time.perf_counter()
    settings: Settings | None = None
    request: Request | None = None
    image: Image | None = None
    status, body, preflight = 200, None, False
    try:
        settings = load_settings(os.environ)
        request = parse_request(event, settings)
        if request.is_proxy and request.method == "OPTIONS":
            status, preflight = 204, True
        elif request.method != "POST":
            raise HttpError(405, "use POST")
        else:
            image, top_k = image_from_request(request, settings)
            body = {"top_k": classify(image, settings, top_k)}
    except HttpError as error:
        status, body = error.status, {"error": error.message}
    except ConfigurationError as error:
        log(function="invoke-endpoint", event="configuration-error", detail=str(error))
        status, body = 500, {"error": "the function is not configured correctly"}
    except Exception as error:  # never a stack trace to the caller; the type is logged
        log(function="invoke-endpoint", event="unexpected-error", error_type=error.__class__.__name__, detail=str(error)[:500])
        status, body = 500, {"error": "internal error"}
    log(
        function="invoke-endpoint",
        request_id=request_id(context),
        status=status,
        latency_ms=round((time.perf_counter() - started) * 1000, 1),
        source=image.source if image else None,
        image_bytes=len(image.data) if image else None,
        url_host=image.url_host if image and image.url_host else None,
        error=body.get("error") if body and status >= 400 else None,
    )
    headers = cors_headers(settings, request, preflight) if request is None or request.is_proxy else {}
    return response(status, body, headers)

"""The public inference function: an image in, the endpoint's top-k dog breeds out, as JSON.

Accepts the proxy events of API Gateway REST APIs (v1), HTTP APIs (v2),
Lambda function URLs and Application Load Balancers (single- and multi-value
headers), and direct invocations. The image arrives as the binary body
(base64-encoded by the integration; without a Content-Type, JPEG and PNG are
recognised by their signature), or as JSON with ``image_base64`` or an https
``url``. Every answer is JSON: ``{"top_k": [...]}`` on success, or
``{"error": "..."}`` with 400 (the caller's input, including an unusable URL),
405, 413, 415, 500 (only a misconfigured function) or 502 (only a failing
endpoint). No stack trace ever reaches the caller; one JSON log line per
request records what happened (with the details of a refused URL), never the
image.

Environment: ENDPOINT_NAME (required), ALLOWED_ORIGIN (comma-separated
origins for CORS; none by default), TOP_K (default 5), MAX_IMAGE_BYTES
(default 4 MiB), URL_TIMEOUT_SECONDS (default 5, one deadline over the whole
download). The URL fetcher trusts the system's CA store; OpenSSL's
SSL_CERT_FILE replaces it (the tests point it at their own CA).

This module holds the handler, the settings, the image intake, the endpoint
call and the answer; ``proxy_events`` reads each integration's event and
shapes its response, ``url_fetch`` holds the URL rules and the download.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from botocore.exceptions import BotoCoreError, ClientError

from events import NAME_PATTERN, annotate, client, error_code, error_message, request_handler
from proxy_events import HttpError, Request, base64_length, decoded_base64, parse_request, proxy_response, short_repr
from url_fetch import IMAGE_SIGNATURES, UNTYPED, fetch_image, image_too_large, media_type, parse_image_url

JSON_TYPES = ("application/json", "text/json")
DEFAULT_TOP_K = 5
MAX_TOP_K = 20
MAX_JSON_DEPTH = 16
DEFAULT_MAX_IMAGE_BYTES = 4 * 1024 * 1024  # a base64 body of this size stays under Lambda's 6 MB payload limit
DEFAULT_URL_TIMEOUT_SECONDS = 5.0
ENDPOINT_READ_TIMEOUT_SECONDS = 12.0  # two tries stay inside API Gateway's 29 s
PASSED_THROUGH_MODEL_STATUSES = (400, 413, 415)  # the container refused the image itself


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
    if not value >= minimum:  # also refuses nan
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
    timeout = _env_number(environ, "URL_TIMEOUT_SECONDS", DEFAULT_URL_TIMEOUT_SECONDS, 0.1, float)
    if timeout > 25:
        raise ConfigurationError(f"environment variable URL_TIMEOUT_SECONDS={timeout:g} leaves no time for the endpoint within API Gateway's 29 s")
    return Settings(
        endpoint_name=endpoint_name,
        allowed_origins=origins,
        top_k=top_k,
        max_image_bytes=_env_number(environ, "MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES, 1, int),
        url_timeout_seconds=timeout,
    )


_ASCII_WHOLE_NUMBER = re.compile(r"[0-9]{1,6}")  # str.isdigit() also takes '²' and other digits int() refuses


def requested_top_k(value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        top_k = None
    elif isinstance(value, int):
        top_k = value
    elif isinstance(value, float) and value.is_integer():
        top_k = int(value)
    elif isinstance(value, str) and _ASCII_WHOLE_NUMBER.fullmatch(value.strip()):
        top_k = int(value.strip())
    else:
        top_k = None
    if top_k is None:
        raise HttpError(400, f"top_k must be a whole number from 1 to {MAX_TOP_K}, got {short_repr(value)}")
    if not 1 <= top_k <= MAX_TOP_K:
        raise HttpError(400, f"top_k must be from 1 to {MAX_TOP_K}, got {short_repr(top_k)}")
    return top_k


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def json_nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in a JSON text, counted without parsing it (strings skipped)."""
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parsed_json_body(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(400, "the JSON body is not UTF-8") from None
    if json_nesting_depth(text) > MAX_JSON_DEPTH:
        raise HttpError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise HttpError(400, f"the JSON body cannot be parsed: {str(error)[:120]}") from None


@dataclass(frozen=True)
class Image:
    data: bytes
    content_type: str
    source: str  # body, image_base64 or url
    url_host: str = ""


def sniffed_image_type(data: bytes) -> str:
    """image/jpeg or image/png from the leading bytes; '' for anything else."""
    for content_type, signature in IMAGE_SIGNATURES.items():
        if data.startswith(signature):
            return content_type
    return ""


def image_type(data: bytes) -> str:
    """image/jpeg or image/png from the leading bytes; refuses anything else with 415."""
    kind = sniffed_image_type(data)
    if not kind:
        raise HttpError(415, "the image is neither JPEG nor PNG")
    return kind


def checked_image(data: bytes, source: str, max_bytes: int, url_host: str = "") -> Image:
    if not data:
        raise HttpError(400, "the image is empty")
    if len(data) > max_bytes:
        raise HttpError(413, image_too_large(max_bytes))
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
        if len(text) > base64_length(settings.max_image_bytes):
            raise HttpError(413, image_too_large(settings.max_image_bytes))
        return checked_image(decoded_base64(text, "image_base64"), "image_base64", settings.max_image_bytes), top_k
    url = payload["url"]
    if not isinstance(url, str):
        raise HttpError(400, "url must be a string")
    host = parse_image_url(url).host
    data, _ = fetch_image(url, max_bytes=settings.max_image_bytes, timeout=settings.url_timeout_seconds)
    return checked_image(data, "url", settings.max_image_bytes, host), top_k


def image_from_request(request: Request, settings: Settings) -> tuple[Image, int]:
    if request.payload is not None:
        return image_from_json(request.payload, settings)
    if request.body is None:
        raise HttpError(400, "the request has no body: send a JPEG or PNG image, or JSON with image_base64 or url")
    kind = media_type(request.headers.get("content-type", ""))
    if kind in UNTYPED:
        kind = sniffed_image_type(request.body) or ("application/json" if request.body.lstrip().startswith(b"{") else kind)
    if kind in IMAGE_SIGNATURES:
        if not request.body_was_base64:
            raise HttpError(400, "binary image bodies must arrive base64-encoded: configure the API's binary media types for image/*")
        top_k = requested_top_k(request.query.get("top_k"), settings.top_k)
        return checked_image(request.body, "body", settings.max_image_bytes), top_k
    if kind in JSON_TYPES:
        return image_from_json(parsed_json_body(request.body), settings)
    if not kind:
        raise HttpError(415, "the request has no Content-Type and its body is neither JPEG, PNG nor JSON")
    raise HttpError(415, f"unsupported content type {short_repr(kind)}: send image/jpeg, image/png or application/json")


# --- the endpoint ----------------------------------------------------------

def top_predictions(body: bytes, top_k: int) -> list[dict[str, Any]]:
    """The first ``top_k`` (label, probability) pairs of the endpoint's answer for one image."""
    try:
        answer = json.loads(body)
        ranked = answer["predictions"][0]["top_k"]
        predictions = [{"label": str(item["label"]), "probability": float(item["probability"])} for item in ranked]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        raise HttpError(502, "the model endpoint gave an answer this function cannot read") from None
    if not predictions:
        raise HttpError(502, "the model endpoint returned no predictions")
    return sorted(predictions, key=lambda item: -item["probability"])[:top_k]


def model_error_status(error: ClientError) -> tuple[int, str] | None:
    """The container's own 4xx refusal of the image, passed on to the caller; None for failures."""
    if error_code(error) != "ModelError":
        return None
    details = error.response
    try:
        status = int(details.get("OriginalStatusCode") or 0)
    except (TypeError, ValueError):
        return None
    if status not in PASSED_THROUGH_MODEL_STATUSES:
        return None
    message = str(details.get("OriginalMessage") or "")
    try:
        message = str(json.loads(message).get("error", message))
    except (ValueError, AttributeError, RecursionError):
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
        raise HttpError(502, "the model endpoint failed to answer; try again later",
                        f"{error_code(error)}: {error_message(error)[:500]}") from None
    except BotoCoreError as error:
        raise HttpError(502, "the model endpoint cannot be reached; try again later",
                        f"{error.__class__.__name__}: {str(error)[:500]}") from None
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


def answer(status: int, body: Mapping[str, Any] | None, extra_headers: Mapping[str, str], request: Request | None) -> dict[str, Any]:
    """The function's answer, JSON and never cached, in the shape the request's integration reads."""
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store", **extra_headers}
    return proxy_response(status, json.dumps(body) if body is not None else "", headers, request)


@request_handler("invoke-endpoint")
def handler(event: Any, context: Any) -> dict[str, Any]:
    settings: Settings | None = None
    request: Request | None = None
    image: Image | None = None
    status, body, preflight, detail = 200, None, False, ""
    try:
        settings = load_settings(os.environ)
        request = parse_request(event, settings.max_image_bytes)
        if request.is_proxy and request.method == "OPTIONS":
            status, preflight = 204, True
        elif request.method != "POST":
            raise HttpError(405, "use POST")
        else:
            image, top_k = image_from_request(request, settings)
            body = {"top_k": classify(image, settings, top_k)}
    except HttpError as error:
        status, body, detail = error.status, {"error": error.message}, error.detail
    except ConfigurationError as error:
        status, body, detail = 500, {"error": "the function is not configured correctly"}, str(error)
    except Exception as error:  # never a stack trace to the caller; the type is logged
        status, body = 500, {"error": "internal error"}
        detail = f"unexpected {error.__class__.__name__}: {str(error)[:500]}"
    annotate(
        status=status,
        source=image.source if image else None,
        image_bytes=len(image.data) if image else None,
        url_host=image.url_host if image and image.url_host else None,
        error=body.get("error") if body and status >= 400 else None,
        detail=detail or None,
    )
    headers = cors_headers(settings, request, preflight) if request is None or request.is_proxy else {}
    return answer(status, body, headers, request)

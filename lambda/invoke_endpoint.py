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
"""
from __future__ import annotations

import base64
import binascii
import functools
import http
import ipaddress
import json
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from botocore.exceptions import BotoCoreError, ClientError

from events import NAME_PATTERN, annotate, client, error_code, error_message, request_handler

IMAGE_SIGNATURES = {"image/jpeg": b"\xff\xd8\xff", "image/png": b"\x89PNG\r\n\x1a\n"}
IMAGE_TYPE_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg"}
UNTYPED = ("", "application/octet-stream", "binary/octet-stream")  # the signature decides
JSON_TYPES = ("application/json", "text/json")
DEFAULT_TOP_K = 5
MAX_TOP_K = 20
MAX_JSON_DEPTH = 16
DEFAULT_MAX_IMAGE_BYTES = 4 * 1024 * 1024  # a base64 body of this size stays under Lambda's 6 MB payload limit
DEFAULT_URL_TIMEOUT_SECONDS = 5.0
ENDPOINT_READ_TIMEOUT_SECONDS = 12.0  # two tries stay inside API Gateway's 29 s
PASSED_THROUGH_MODEL_STATUSES = (400, 413, 415)  # the container refused the image itself

# URL fetching: every limit holds for the whole download, redirects included.
MAX_URL_LENGTH = 2048
MAX_REDIRECTS = 3
MAX_RESPONSE_HEADERS = 64
MAX_HEADER_BYTES = 16 * 1024  # status line and headers of one response
RECV_BYTES = 64 * 1024
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
URL_UNFETCHABLE = "the URL could not be fetched"
URL_NOT_ALLOWED = "the URL points to an address that is not allowed"
URL_NOT_AN_IMAGE = "the URL did not answer with a JPEG or PNG image"


def download_too_slow(seconds: float) -> str:
    return f"the download took longer than {seconds:g} s"


def image_too_large(max_bytes: int) -> str:
    return f"the image is larger than {max_bytes} bytes"


class HttpError(Exception):
    """An answer other than 200: the status, a short message for the caller, and details for the log only."""

    def __init__(self, status: int, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail


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


# --- the request -----------------------------------------------------------

@dataclass(frozen=True)
class Request:
    method: str
    headers: Mapping[str, str]  # lower-case names, the last value of a repeated header
    query: Mapping[str, str]  # the last value of a repeated parameter
    body: bytes | None
    body_was_base64: bool
    is_proxy: bool
    payload: Mapping[str, Any] | None  # a direct invocation's event
    multi_value_response: bool = False  # an ALB in multi-value mode reads only multiValueHeaders back
    from_load_balancer: bool = False


def is_proxy_event(event: Mapping[str, Any]) -> bool:
    return "httpMethod" in event or "requestContext" in event or "routeKey" in event


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
            raise HttpError(400, f"{what} {_short(name)} must have a string value, got {type(value).__name__}")
        values[name] = value
    for name, items in _mapping_field(event, multi).items():
        if not isinstance(name, str) or not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise HttpError(400, f"{what} {_short(name)} in {multi} must be a list of strings")
        if items:
            values[name] = items[-1]
    return values


def proxy_method(event: Mapping[str, Any]) -> str:
    context = _mapping_field(event, "requestContext")
    http_context = context.get("http")
    if http_context is not None and not isinstance(http_context, Mapping):
        raise HttpError(400, "requestContext.http must be an object in the proxy event")
    method = event.get("httpMethod") or (http_context or {}).get("method") or "POST"
    if not isinstance(method, str):
        raise HttpError(400, "the proxy event's HTTP method must be a string")
    return method.upper()


def proxy_body(event: Mapping[str, Any], max_bytes: int) -> tuple[bytes | None, bool]:
    """The raw body bytes of a proxy event and whether they arrived base64-encoded; the size is checked first."""
    encoded = event.get("isBase64Encoded")
    if encoded is not None and not isinstance(encoded, bool):
        raise HttpError(400, "isBase64Encoded must be true or false in the proxy event")
    body = event.get("body")
    if body is None or body == "":
        return None, bool(encoded)
    if not isinstance(body, str):
        raise HttpError(400, "the request body must be a string in the proxy event")
    if len(body) > _base64_length(max_bytes):
        raise HttpError(413, f"the request body is larger than {max_bytes} bytes")
    if encoded:
        return _b64decode(body, "the request body"), True
    return body.encode("utf-8", "surrogatepass"), False


def parse_request(event: Any, settings: Settings) -> Request:
    if not isinstance(event, Mapping):
        raise HttpError(400, "the event must be a JSON object")
    if not is_proxy_event(event):
        return Request("POST", {}, {}, None, False, False, event)
    from_load_balancer = "elb" in _mapping_field(event, "requestContext")
    headers = {name.lower(): value for name, value in _last_values(event, "headers", "multiValueHeaders", "header").items()}
    query = _last_values(event, "queryStringParameters", "multiValueQueryStringParameters", "query parameter")
    if from_load_balancer:  # an ALB passes query parameters on as the client encoded them
        query = {urllib.parse.unquote_plus(name): urllib.parse.unquote_plus(value) for name, value in query.items()}
    elif event.get("version") == "2.0":  # payload 2.0 joins a repeated parameter's values with commas
        query = {name: value.rsplit(",", 1)[-1] for name, value in query.items()}
    method = proxy_method(event)
    body, encoded = proxy_body(event, settings.max_image_bytes) if method == "POST" else (None, False)
    return Request(method, headers, query, body, encoded, True, None,
                   multi_value_response=from_load_balancer and "multiValueHeaders" in event,
                   from_load_balancer=from_load_balancer)


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
        raise HttpError(400, f"top_k must be a whole number from 1 to {MAX_TOP_K}, got {_short(value)}")
    if not 1 <= top_k <= MAX_TOP_K:
        raise HttpError(400, f"top_k must be from 1 to {MAX_TOP_K}, got {_short(top_k)}")
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
        if len(text) > _base64_length(settings.max_image_bytes):
            raise HttpError(413, image_too_large(settings.max_image_bytes))
        return checked_image(_b64decode(text, "image_base64"), "image_base64", settings.max_image_bytes), top_k
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
    kind = media_type(request.headers)
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
    raise HttpError(415, f"unsupported content type {_short(kind)}: send image/jpeg, image/png or application/json")


# --- fetching an image URL -------------------------------------------------
#
# The name is resolved once, every address it resolves to is vetted, and the
# connection goes to a vetted address itself (never resolved again), with TLS
# verified for the URL's host name. Each redirect hop takes the same path.

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4_NOT_ALLOWED = tuple(ipaddress.ip_network(net) for net in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
))
_V6_NOT_ALLOWED = tuple(ipaddress.ip_network(net) for net in (
    "::/128", "::1/128", "64:ff9b:1::/48", "100::/64", "2001:db8::/32", "2001:10::/28", "2001:20::/28",
    "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
))
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_EMBEDDING_LOW_32_BITS = tuple(ipaddress.ip_network(net) for net in (
    "::/96",            # IPv4-compatible (deprecated, still routed by some stacks)
    "::ffff:0:0/96",    # IPv4-mapped
    "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
    "64:ff9b::/96",     # NAT64 well-known prefix
))
_TEREDO = ipaddress.ip_network("2001::/32")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, SIIT, NAT64, 6to4, Teredo); () for none."""
    if any(address in net for net in _EMBEDDING_LOW_32_BITS):
        return (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),)
    if address in _SIX_TO_FOUR:
        return (address.sixtofour,)
    if address in _TEREDO:
        server, client_address = address.teredo
        return (server, client_address)
    return ()


def is_allowed_address(address: Address) -> bool:
    """True only for a globally routable unicast address that carries no internal IPv4 address."""
    if isinstance(address, ipaddress.IPv4Address):
        return address.is_global and not any(address in net for net in _V4_NOT_ALLOWED)
    if any(address in net for net in _V6_NOT_ALLOWED):
        return False
    embedded = embedded_ipv4(address)
    if embedded:
        return all(is_allowed_address(inner) for inner in embedded)
    return address in _GLOBAL_UNICAST and address.is_global


def resolve_addresses(host: str, port: int) -> list[Address]:
    """Every address the system resolver gives for ``host`` (the seam the tests replace with a fixed answer)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))


@dataclass(frozen=True)
class Target:
    """One URL to fetch, parsed: the ASCII host, the port, the request target, and the host as an IP if literal."""

    url: str
    host: str
    port: int
    path: str
    literal: Address | None = None

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if isinstance(self.literal, ipaddress.IPv6Address) else self.host
        return host if self.port == 443 else f"{host}:{self.port}"


_HOST_NAME = re.compile(r"^(?=.{1,253}\.?$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.?$")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f\s]")


def parse_image_url(url: str, field_name: str = "url") -> Target:
    """The fetch target of an https URL; refuses (400, naming the field) anything that is not a usable one."""
    if len(url) > MAX_URL_LENGTH:
        raise HttpError(400, f"{field_name} is longer than {MAX_URL_LENGTH} characters")
    if _CONTROL_OR_SPACE.search(url):
        raise HttpError(400, f"{field_name} must not contain spaces or control characters (percent-encode them)")
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as error:
        raise HttpError(400, f"{field_name} is not a valid URL: {error}") from None
    if parts.scheme.lower() != "https":
        raise HttpError(400, f"{field_name} must start with https://")
    if "@" in parts.netloc:
        raise HttpError(400, f"{field_name} must not carry a user name or password")
    if not host:
        raise HttpError(400, f"{field_name} has no host")
    if port == 0 or (port is None and parts.netloc.endswith(":")):
        raise HttpError(400, f"{field_name} has an empty or zero port")
    literal = _ip_literal(host, field_name)
    if literal is None:
        host = _ascii_host_name(host, field_name)
    path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return Target(url, str(literal) if literal else host, port or 443, path, literal)


def _ip_literal(host: str, field_name: str) -> Address | None:
    if "%" in host:
        raise HttpError(400, f"{field_name} must not name a scoped (zone) address")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _ascii_host_name(host: str, field_name: str) -> str:
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise HttpError(400, f"{field_name} has a host name that is not valid") from None
    if not _HOST_NAME.match(ascii_host):
        raise HttpError(400, f"{field_name} has a host name that is not valid")
    return ascii_host


class _DeadlinePassed(Exception):
    """The fetch's one deadline passed; the stage goes to the log."""


class _Clock:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def remaining(self, stage: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _DeadlinePassed(stage)
        return left


def _resolved_within(host: str, port: int, clock: _Clock) -> list[Address]:
    """The resolver's answer, waited for no longer than the fetch's deadline (getaddrinfo has no timeout)."""
    answer: dict[str, Any] = {}

    def resolve() -> None:
        try:
            answer["addresses"] = resolve_addresses(host, port)
        except Exception as error:  # noqa: BLE001 - any resolver failure is reported the same way
            answer["error"] = error

    worker = threading.Thread(target=resolve, name="resolve-image-host", daemon=True)
    worker.start()
    worker.join(clock.remaining("resolving the host"))
    if worker.is_alive():
        raise _DeadlinePassed("resolving the host")
    if "error" in answer:
        raise HttpError(400, URL_UNFETCHABLE, f"{host} cannot be resolved: {answer['error']}")
    if not answer.get("addresses"):
        raise HttpError(400, URL_UNFETCHABLE, f"{host} resolves to no address")
    return answer["addresses"]


def vetted_addresses(target: Target, clock: _Clock, allow_private_addresses: bool) -> list[Address]:
    """The addresses to connect to for ``target``: all of them allowed, or a refusal naming none of them."""
    addresses = [target.literal] if target.literal else _resolved_within(target.host, target.port, clock)
    refused = [str(address) for address in addresses if not is_allowed_address(address)]
    if refused and not allow_private_addresses:
        raise HttpError(400, URL_NOT_ALLOWED, f"{target.host} has addresses that are not allowed: {', '.join(refused)}")
    return addresses


def _connected(addresses: Sequence[Address], port: int, clock: _Clock) -> socket.socket:
    failures = []
    for address in addresses:
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(clock.remaining("connecting"))
            sock.connect((str(address), port))
            return sock
        except (socket.timeout, TimeoutError):
            sock.close()
            raise _DeadlinePassed("connecting") from None
        except OSError as error:
            sock.close()
            failures.append(f"{address}: {error}")
    raise HttpError(400, URL_UNFETCHABLE, "cannot connect: " + "; ".join(failures))


def _tls(sock: socket.socket, target: Target, context: ssl.SSLContext, clock: _Clock) -> ssl.SSLSocket:
    wrapped = context.wrap_socket(sock, server_hostname=target.host, do_handshake_on_connect=False)
    wrapped.settimeout(clock.remaining("the TLS handshake"))
    try:
        wrapped.do_handshake()
    except (socket.timeout, TimeoutError):
        wrapped.close()
        raise _DeadlinePassed("the TLS handshake") from None
    except (ssl.SSLError, OSError) as error:
        wrapped.close()
        raise HttpError(400, URL_UNFETCHABLE, f"TLS with {target.host} failed: {error}") from None
    return wrapped


class _Stream:
    """Buffered reads from a socket in which every wait is cut to what is left of the deadline."""

    def __init__(self, sock: socket.socket, clock: _Clock) -> None:
        self.sock, self.clock, self.buffer = sock, clock, bytearray()

    def _fill(self, stage: str) -> bool:
        self.sock.settimeout(self.clock.remaining(stage))
        try:
            chunk = self.sock.recv(RECV_BYTES)
        except (socket.timeout, TimeoutError):
            raise _DeadlinePassed(stage) from None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            chunk = b""  # many servers close without TLS close_notify
        except OSError as error:
            raise HttpError(400, URL_UNFETCHABLE, f"reading {stage} failed: {error}") from None
        self.buffer += chunk
        return bool(chunk)

    def line(self, limit: int, stage: str) -> bytes:
        while True:
            end = self.buffer.find(b"\n", 0, limit)
            if end >= 0:
                line, self.buffer = bytes(self.buffer[:end + 1]), self.buffer[end + 1:]
                return line
            if len(self.buffer) >= limit:
                raise HttpError(400, URL_UNFETCHABLE, f"{stage} is longer than {limit} bytes")
            if not self._fill(stage):
                raise HttpError(400, URL_UNFETCHABLE, f"the connection closed during {stage}")

    def exactly(self, count: int, stage: str) -> bytes:
        while len(self.buffer) < count:
            if not self._fill(stage):
                raise HttpError(400, URL_UNFETCHABLE, f"the connection closed during {stage}")
        data, self.buffer = bytes(self.buffer[:count]), self.buffer[count:]
        return data

    def until_closed(self, limit: int, stage: str) -> bytes:
        while len(self.buffer) <= limit and self._fill(stage):
            pass
        if len(self.buffer) > limit:
            raise _TooLarge()
        data, self.buffer = bytes(self.buffer), bytearray()
        return data


class _TooLarge(Exception):
    """The body passed the image size cap."""


@dataclass
class _Head:
    status: int
    headers: dict[str, list[str]] = field(default_factory=dict)

    def one(self, name: str) -> str:
        values = self.headers.get(name, [])
        if len(set(values)) > 1:
            raise HttpError(400, URL_UNFETCHABLE, f"the response has conflicting {name} headers")
        return values[0].strip() if values else ""


_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] ([1-5][0-9]{2})(?: [^\r\n]*)?\r?\n$")
_HEADER_LINE = re.compile(rb"^([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*?)[ \t]*\r?\n$")


def _response_head(stream: _Stream) -> _Head:
    """The status and headers of the final (non-1xx) response, within MAX_HEADER_BYTES and MAX_RESPONSE_HEADERS."""
    budget = MAX_HEADER_BYTES
    while True:
        line = stream.line(budget, "the status line")
        budget -= len(line)
        match = _STATUS_LINE.match(line)
        if not match:
            raise HttpError(400, URL_UNFETCHABLE, f"the status line {line[:60]!r} is not HTTP/1.x")
        head = _Head(int(match.group(1)))
        count = 0
        while True:
            line = stream.line(max(budget, 1), "the headers")
            budget -= len(line)
            if budget <= 0:
                raise HttpError(400, URL_UNFETCHABLE, f"the response headers are longer than {MAX_HEADER_BYTES} bytes")
            if line in (b"\r\n", b"\n"):
                break
            count += 1
            if count > MAX_RESPONSE_HEADERS:
                raise HttpError(400, URL_UNFETCHABLE, f"the response has more than {MAX_RESPONSE_HEADERS} headers")
            header = _HEADER_LINE.match(line)
            if not header:
                raise HttpError(400, URL_UNFETCHABLE, f"the header line {line[:60]!r} is malformed")
            head.headers.setdefault(header.group(1).decode("ascii").lower(), []).append(header.group(2).decode("latin-1"))
        if head.status >= 200:
            return head


def _body(stream: _Stream, head: _Head, max_bytes: int) -> bytes:
    encoding = head.one("transfer-encoding").lower()
    if encoding and encoding != "chunked":
        raise HttpError(400, URL_UNFETCHABLE, f"the response uses Transfer-Encoding {encoding!r}")
    content_encoding = head.one("content-encoding").lower()
    if content_encoding not in ("", "identity"):
        raise HttpError(400, URL_UNFETCHABLE, f"the response uses Content-Encoding {content_encoding!r}")
    if encoding == "chunked":
        return _chunked_body(stream, max_bytes)
    declared = head.one("content-length")
    if declared:
        if not re.fullmatch(r"[0-9]{1,15}", declared):
            raise HttpError(400, URL_UNFETCHABLE, f"the response has Content-Length {declared[:30]!r}")
        if int(declared) > max_bytes:
            raise _TooLarge()
        return stream.exactly(int(declared), "the body")
    return stream.until_closed(max_bytes, "the body")


def _chunked_body(stream: _Stream, max_bytes: int) -> bytes:
    chunks, size = [], 0
    while True:
        line = stream.line(1024, "a chunk size")
        size_text = line.split(b";", 1)[0].strip()
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,8}", size_text):
            raise HttpError(400, URL_UNFETCHABLE, f"the chunk size {line[:30]!r} is malformed")
        chunk_size = int(size_text, 16)
        if chunk_size == 0:
            for _ in range(MAX_RESPONSE_HEADERS):  # trailers, until the empty line
                if stream.line(1024, "the trailers") in (b"\r\n", b"\n"):
                    return b"".join(chunks)
            raise HttpError(400, URL_UNFETCHABLE, "the response has too many trailers")
        size += chunk_size
        if size > max_bytes:
            raise _TooLarge()
        chunks.append(stream.exactly(chunk_size, "the body"))
        if stream.exactly(2, "the body") != b"\r\n":
            raise HttpError(400, URL_UNFETCHABLE, "a chunk does not end with CRLF")


@dataclass(frozen=True)
class _Answer:
    status: int
    content_type: str
    location: str
    body: bytes


def _get(target: Target, addresses: Sequence[Address], context: ssl.SSLContext, clock: _Clock, max_bytes: int) -> _Answer:
    """One GET over one verified TLS connection to a vetted address; the body only for a 200."""
    sock = _tls(_connected(addresses, target.port, clock), target, context, clock)
    try:
        request = (
            f"GET {target.path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
            "Accept: image/jpeg, image/png\r\nAccept-Encoding: identity\r\n"
            "User-Agent: dogbreed-invoke/2\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
        sock.settimeout(clock.remaining("sending the request"))
        try:
            sock.sendall(request)
        except (socket.timeout, TimeoutError):
            raise _DeadlinePassed("sending the request") from None
        except OSError as error:
            raise HttpError(400, URL_UNFETCHABLE, f"sending the request failed: {error}") from None
        stream = _Stream(sock, clock)
        head = _response_head(stream)
        content_type = head.one("content-type").split(";")[0].strip().lower()
        if head.status != 200:
            return _Answer(head.status, content_type, head.one("location"), b"")
        content_type = IMAGE_TYPE_ALIASES.get(content_type, content_type)
        if content_type not in IMAGE_SIGNATURES and content_type not in UNTYPED:
            raise HttpError(415, URL_NOT_AN_IMAGE, f"content type {content_type!r}")
        return _Answer(200, content_type, "", _body(stream, head, max_bytes))
    finally:
        sock.close()


@functools.lru_cache(maxsize=None)
def default_ssl_context() -> ssl.SSLContext:
    """The fetcher's verifying TLS context, made on the first URL fetch and kept while the function is warm
    (loading the CA store takes tens of milliseconds)."""
    return ssl.create_default_context()


def fetch_image(
    url: str,
    *,
    max_bytes: int,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    allow_private_addresses: bool = False,
) -> tuple[bytes, str]:
    """The bytes and declared content type behind an https image URL, all within ``timeout`` seconds.

    Refuses, as HttpError with one generic message per kind (details in
    ``.detail`` for the log): URLs that do not parse (naming ``url``), names
    whose addresses are not all public (unless ``allow_private_addresses``,
    for tests), connection, TLS and HTTP failures, redirects past
    MAX_REDIRECTS, answers other than JPEG/PNG (415), bodies over
    ``max_bytes`` (413) and any download not done when ``timeout`` runs out,
    however slowly the server sends.
    """
    clock = _Clock(timeout)
    target = parse_image_url(url)
    context = ssl_context or default_ssl_context()
    try:
        for _hop in range(MAX_REDIRECTS + 1):
            answer = _get(target, vetted_addresses(target, clock, allow_private_addresses), context, clock, max_bytes)
            if answer.status == 200:
                return answer.body, answer.content_type
            if answer.status not in REDIRECT_STATUSES or not answer.location:
                raise HttpError(400, f"the URL answered HTTP {answer.status}", f"{target.host} answered {answer.status}")
            target = _redirect_target(target, answer.location)
        raise HttpError(400, URL_UNFETCHABLE, f"more than {MAX_REDIRECTS} redirects")
    except _DeadlinePassed as passed:
        raise HttpError(400, download_too_slow(timeout), f"the deadline passed while {passed} ({target.host})") from None
    except _TooLarge:
        raise HttpError(413, image_too_large(max_bytes), f"{target.host} sent more than {max_bytes} bytes") from None


def _redirect_target(current: Target, location: str) -> Target:
    try:
        return parse_image_url(urllib.parse.urljoin(current.url, location), "the redirect target")
    except (HttpError, ValueError) as refusal:
        reason = refusal.message if isinstance(refusal, HttpError) else f"not a valid URL: {refusal}"
        raise HttpError(400, URL_UNFETCHABLE, f"{current.host} redirects to {location[:200]!r}: {reason}") from None


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


def response(status: int, body: Mapping[str, Any] | None, extra_headers: Mapping[str, str],
             request: Request | None = None) -> dict[str, Any]:
    """The proxy response; an ALB also gets statusDescription, and multiValueHeaders in multi-value mode."""
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store", **extra_headers}
    answer: dict[str, Any] = {"statusCode": status, "body": json.dumps(body) if body is not None else "", "isBase64Encoded": False}
    if request is not None and request.multi_value_response:
        answer["multiValueHeaders"] = {name: [value] for name, value in headers.items()}
    else:
        answer["headers"] = headers
    if request is not None and request.from_load_balancer:
        answer["statusDescription"] = f"{status} {http.HTTPStatus(status).phrase}"
    return answer


@request_handler("invoke-endpoint")
def handler(event: Any, context: Any) -> dict[str, Any]:
    settings: Settings | None = None
    request: Request | None = None
    image: Image | None = None
    status, body, preflight, detail = 200, None, False, ""
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
    return response(status, body, headers, request)

"""Fetching the image behind an https URL a caller names, without letting the caller reach inside.

The URL rules: only https; the name is resolved once (``resolve_addresses``,
the one seam the tests replace), every address it resolves to must be public
(IPv6 forms that carry an internal IPv4 included), and the connection goes to
a vetted address itself, never resolved again, with TLS verified for the URL's
host name. Each redirect hop (at most MAX_REDIRECTS) takes the same path.

The standard library's ``http.client`` sends the request and parses the
answer. ``VettedConnection`` gives it what it lacks: the connection to the
vetted address, and one deadline over connect, TLS, request, status line,
headers and body, which holds however slowly a server trickles bytes because
every wait on the socket is cut to the time left. The reader it hands
``http.client`` also holds the head to MAX_HEADER_BYTES and refuses any read
without a bound; the rest of what ``http.client`` lets through (more than
MAX_RESPONSE_HEADERS headers, folded or malformed header lines, conflicting
duplicates, a content encoding, a transfer encoding other than chunked, a
malformed Content-Length, a body over the cap) is refused here.
"""
from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import re
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from email.message import Message
from typing import Any, Sequence

from proxy_events import HttpError

IMAGE_SIGNATURES = {"image/jpeg": b"\xff\xd8\xff", "image/png": b"\x89PNG\r\n\x1a\n"}
IMAGE_TYPE_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg"}
UNTYPED = ("", "application/octet-stream", "binary/octet-stream")  # the signature decides

# Every limit holds for the whole download, redirects included.
MAX_URL_LENGTH = 2048
MAX_REDIRECTS = 3
MAX_RESPONSE_HEADERS = 64
MAX_HEADER_BYTES = 16 * 1024  # status lines and headers of the answer, interim responses included
RECV_BYTES = 64 * 1024
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
REQUEST_HEADERS = {"Accept": "image/jpeg, image/png", "User-Agent": "dogbreed-invoke/2", "Connection": "close"}
URL_UNFETCHABLE = "the URL could not be fetched"
URL_NOT_ALLOWED = "the URL points to an address that is not allowed"
URL_NOT_AN_IMAGE = "the URL did not answer with a JPEG or PNG image"


def download_too_slow(seconds: float) -> str:
    return f"the download took longer than {seconds:g} s"


def image_too_large(max_bytes: int) -> str:
    return f"the image is larger than {max_bytes} bytes"


def media_type(content_type: str) -> str:
    """The media type of a Content-Type value, lower case, without parameters, a JPEG alias named image/jpeg."""
    value = content_type.split(";")[0].strip().lower()
    return IMAGE_TYPE_ALIASES.get(value, value)


# --- the URL and its addresses ----------------------------------------------

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


# --- the one deadline ---------------------------------------------------------

class _DeadlinePassed(Exception):
    """The fetch's one deadline passed; the stage goes to the log."""


class _TooLarge(Exception):
    """The body passed the image size cap."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self, stage: str) -> float:
        """The seconds left; raises _DeadlinePassed naming ``stage`` when there are none."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise _DeadlinePassed(stage)
        return left


def _resolved_within(host: str, port: int, deadline: Deadline) -> list[Address]:
    """The resolver's answer, waited for no longer than the fetch's deadline (getaddrinfo has no timeout)."""
    answer: dict[str, Any] = {}

    def resolve() -> None:
        try:
            answer["addresses"] = resolve_addresses(host, port)
        except Exception as error:  # noqa: BLE001 - any resolver failure is reported the same way
            answer["error"] = error

    worker = threading.Thread(target=resolve, name="resolve-image-host", daemon=True)
    worker.start()
    worker.join(deadline.remaining("resolving the host"))
    if worker.is_alive():
        raise _DeadlinePassed("resolving the host")
    if "error" in answer:
        raise HttpError(400, URL_UNFETCHABLE, f"{host} cannot be resolved: {answer['error']}")
    if not answer.get("addresses"):
        raise HttpError(400, URL_UNFETCHABLE, f"{host} resolves to no address")
    return answer["addresses"]


def vetted_addresses(target: Target, deadline: Deadline, allow_private_addresses: bool) -> list[Address]:
    """The addresses to connect to for ``target``: all of them allowed, or a refusal naming none of them."""
    addresses = [target.literal] if target.literal else _resolved_within(target.host, target.port, deadline)
    refused = [str(address) for address in addresses if not is_allowed_address(address)]
    if refused and not allow_private_addresses:
        raise HttpError(400, URL_NOT_ALLOWED, f"{target.host} has addresses that are not allowed: {', '.join(refused)}")
    return addresses


def _connected(addresses: Sequence[Address], port: int, deadline: Deadline) -> socket.socket:
    failures = []
    for address in addresses:
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(deadline.remaining("connecting"))
            sock.connect((str(address), port))
            return sock
        except (socket.timeout, TimeoutError):
            sock.close()
            raise _DeadlinePassed("connecting") from None
        except OSError as error:
            sock.close()
            failures.append(f"{address}: {error}")
    raise HttpError(400, URL_UNFETCHABLE, "cannot connect: " + "; ".join(failures))


def _tls(sock: socket.socket, host: str, context: ssl.SSLContext, deadline: Deadline) -> ssl.SSLSocket:
    wrapped = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    wrapped.settimeout(deadline.remaining("the TLS handshake"))
    try:
        wrapped.do_handshake()
    except (socket.timeout, TimeoutError):
        wrapped.close()
        raise _DeadlinePassed("the TLS handshake") from None
    except (ssl.SSLError, OSError) as error:
        wrapped.close()
        raise HttpError(400, URL_UNFETCHABLE, f"TLS with {host} failed: {error}") from None
    return wrapped


# --- the connection http.client talks through ---------------------------------

class _DeadlineReader(io.RawIOBase):
    """The raw side of the response reader: each receive waits no longer than what is left of the deadline."""

    def __init__(self, sock: ssl.SSLSocket, deadline: Deadline) -> None:
        super().__init__()
        self.sock, self.deadline = sock, deadline
        self.stage = "the response head"

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.sock.settimeout(self.deadline.remaining(self.stage))
        try:
            return self.sock.recv_into(buffer)
        except (socket.timeout, TimeoutError):
            raise _DeadlinePassed(self.stage) from None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return 0  # many servers close without TLS close_notify
        except OSError as error:
            raise HttpError(400, URL_UNFETCHABLE, f"reading {self.stage} failed: {error}") from None


class _ResponseReader(io.BufferedReader):
    """What http.client reads the answer from: the head within MAX_HEADER_BYTES, and never a read without a bound."""

    def __init__(self, raw: _DeadlineReader) -> None:
        super().__init__(raw, RECV_BYTES)
        self.head_bytes_left: int | None = MAX_HEADER_BYTES

    def readline(self, size: int | None = -1) -> bytes:
        if self.head_bytes_left is None:
            return super().readline(size)
        limit = self.head_bytes_left + 1
        line = super().readline(limit if size is None or size < 0 else min(size, limit))
        self.head_bytes_left -= len(line)
        if self.head_bytes_left < 0:
            raise HttpError(400, URL_UNFETCHABLE, f"the response head is longer than {MAX_HEADER_BYTES} bytes")
        return line

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:  # http.client asks for one on a negative chunk size
            raise HttpError(400, URL_UNFETCHABLE, "the response's framing asks for a read without a bound")
        return super().read(size)

    def head_read(self) -> None:
        """The head is done: lines from here on are the body's (chunk sizes, trailers)."""
        self.head_bytes_left = None
        self.raw.stage = "the body"


class _DeadlineSocket:
    """The socket as http.client sees it: sends wait no longer than the deadline allows; its one file is the reader.

    http.client closes its socket as soon as a head says the connection will
    close, before it reads the body, so ``close`` leaves the TLS socket open:
    ``VettedConnection.disconnect`` closes it when the fetch is done.
    """

    def __init__(self, sock: ssl.SSLSocket, deadline: Deadline) -> None:
        self.sock, self.deadline = sock, deadline
        self.reader = _ResponseReader(_DeadlineReader(sock, deadline))

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(self.deadline.remaining("sending the request"))
        try:
            self.sock.sendall(data)
        except (socket.timeout, TimeoutError):
            raise _DeadlinePassed("sending the request") from None
        except OSError as error:
            raise HttpError(400, URL_UNFETCHABLE, f"sending the request failed: {error}") from None

    def makefile(self, mode: str) -> _ResponseReader:
        return self.reader

    def close(self) -> None:
        pass


class _FinalResponse(http.client.HTTPResponse):
    """http.client's response, past every interim (1xx) one (http.client itself skips only 100 Continue),
    and with a status from 200 to 599 (http.client takes any three digits). ``begin`` reads each status line
    through ``_read_status``, in every Python from 3.9 to 3.13."""

    def _read_status(self) -> tuple[str, int, str]:
        while True:
            version, status, reason = super()._read_status()
            if status >= 600:
                raise http.client.BadStatusLine(f"{version} {status} {reason.strip()}")
            if status >= 200:
                return version, status, reason
            http.client.parse_headers(self.fp)  # the interim response's headers, dropped

    def begin(self) -> None:
        super().begin()
        self.fp.head_read()


class VettedConnection(http.client.HTTPSConnection):
    """An HTTPS connection to one of the vetted addresses, never resolving the name again, with TLS verified for the
    URL's host name (SNI, certificate) and every wait within the fetch's deadline."""

    response_class = _FinalResponse

    def __init__(self, target: Target, addresses: Sequence[Address], context: ssl.SSLContext, deadline: Deadline) -> None:
        super().__init__(target.host, target.port, context=context)
        self.addresses, self.tls_context, self.deadline = addresses, context, deadline
        self.tls: ssl.SSLSocket | None = None

    def connect(self) -> None:
        self.tls = _tls(_connected(self.addresses, self.port, self.deadline), self.host, self.tls_context, self.deadline)
        self.sock = _DeadlineSocket(self.tls, self.deadline)

    def disconnect(self) -> None:
        """http.client's close, and the TLS socket's, which http.client's leaves open (see _DeadlineSocket)."""
        self.close()
        if self.tls is not None:
            self.tls.close()


# --- the download -------------------------------------------------------------

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True)
class _Answer:
    status: int
    content_type: str
    location: str
    body: bytes


def _checked_head(headers: Message) -> Message:
    """The headers http.client parsed, refused where it is lenient: too many, malformed or folded lines."""
    if len(headers) > MAX_RESPONSE_HEADERS:
        raise HttpError(400, URL_UNFETCHABLE, f"the response has more than {MAX_RESPONSE_HEADERS} headers")
    malformed = headers.defects or not all(_HEADER_NAME.fullmatch(name) for name in headers.keys())
    if malformed or any("\n" in value or "\r" in value for value in headers.values()):
        raise HttpError(400, URL_UNFETCHABLE, "the response has a malformed or folded header line")
    return headers


def _one(headers: Message, name: str) -> str:
    values = {value.strip() for value in headers.get_all(name, [])}
    if len(values) > 1:
        raise HttpError(400, URL_UNFETCHABLE, f"the response has conflicting {name} headers")
    return values.pop() if values else ""


def _body(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    """The body, never read past ``max_bytes``: as declared, in chunks, or until the connection closes."""
    encoding = _one(response.headers, "transfer-encoding").lower()
    if encoding and encoding != "chunked":
        raise HttpError(400, URL_UNFETCHABLE, f"the response uses Transfer-Encoding {encoding!r}")
    content_encoding = _one(response.headers, "content-encoding").lower()
    if content_encoding not in ("", "identity"):
        raise HttpError(400, URL_UNFETCHABLE, f"the response uses Content-Encoding {content_encoding!r}")
    declared = "" if encoding else _one(response.headers, "content-length")
    if declared:
        if not re.fullmatch(r"[0-9]{1,15}", declared):
            raise HttpError(400, URL_UNFETCHABLE, f"the response has Content-Length {declared[:30]!r}")
        if int(declared) > max_bytes:
            raise _TooLarge()
        return response.read()  # exactly the declared length, or IncompleteRead
    body = response.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise _TooLarge()
    return body


def _get(target: Target, addresses: Sequence[Address], context: ssl.SSLContext, deadline: Deadline, max_bytes: int) -> _Answer:
    """One GET over one verified TLS connection to a vetted address; the body only for a 200."""
    connection = VettedConnection(target, addresses, context, deadline)
    try:
        connection.request("GET", target.path, headers=REQUEST_HEADERS)
        response = connection.getresponse()
        headers = _checked_head(response.headers)
        content_type = media_type(_one(headers, "content-type"))
        if response.status != 200:
            return _Answer(response.status, content_type, _one(headers, "location"), b"")
        if content_type not in IMAGE_SIGNATURES and content_type not in UNTYPED:
            raise HttpError(415, URL_NOT_AN_IMAGE, f"content type {content_type!r}")
        return _Answer(200, content_type, "", _body(response, max_bytes))
    except http.client.HTTPException as error:
        raise HttpError(400, URL_UNFETCHABLE, _refused_by_http_client(error)) from None
    finally:
        connection.disconnect()


def _refused_by_http_client(error: http.client.HTTPException) -> str:
    """What went wrong, for the log, when http.client gave up on the answer."""
    if isinstance(error, http.client.RemoteDisconnected):
        return "the connection closed before the status line"
    if isinstance(error, http.client.IncompleteRead):
        return f"the body is incomplete or its chunks are malformed ({len(error.partial)} bytes read)"
    return f"the answer is not valid HTTP/1.x ({error.__class__.__name__}: {str(error)[:80]})"


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
    deadline = Deadline(timeout)
    target = parse_image_url(url)
    context = ssl_context or default_ssl_context()
    try:
        for _hop in range(MAX_REDIRECTS + 1):
            answer = _get(target, vetted_addresses(target, deadline, allow_private_addresses), context, deadline, max_bytes)
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

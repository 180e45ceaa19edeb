"""The invoke function's URL fetch against hostile servers and names, on a network that is only loopback.

The resolver is stubbed (``url_fetch.resolve_addresses``, the fetcher's one seam),
so names answer whatever a test needs, including a different address on the
second question (DNS rebinding). ``network`` replaces socket connect: public
addresses a test routes go to TLS servers on 127.0.0.1 (with certificates
from a CA made here, trusted through OpenSSL's SSL_CERT_FILE), loopback goes
through, and anything else is refused before it leaves the machine; every
test asserts nothing else was tried. Deadlines are 1 s, so each hostile
server must be cut off within 1 s plus a small margin.
"""
from __future__ import annotations

import io
import ipaddress
import json
import socket
import sys
import time

import pytest
from PIL import Image

from lambda_harness import Behaviour, LambdaContext, Site, load_handler, make_certificates

PUBLIC = "93.184.215.14"  # routed by the test network to the local TLS site
OTHER_PUBLIC = "151.101.1.1"
DEADLINE = 1.0
MARGIN = 0.6  # two shared cores: thread start-up and TLS set-up


def jpeg(size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 80, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


JPEG = jpeg()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("pki"), ("dogs.test", "rebind.test", "hop.test"))


@pytest.fixture
def invoke(monkeypatch, certificates, tmp_path):
    ca, _, _ = certificates
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the fetcher's only trust store in these tests
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    monkeypatch.setenv("ENDPOINT_NAME", "dogbreed-single-instance")
    for name in ("ALLOWED_ORIGIN", "TOP_K", "MAX_IMAGE_BYTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("URL_TIMEOUT_SECONDS", str(DEADLINE))
    return load_handler("invoke_endpoint")


class Names:
    """The stub resolver: name -> list of answers, the last one repeated; records every question."""

    def __init__(self) -> None:
        self.answers: dict[str, list[list[str]]] = {}
        self.questions: list[str] = []

    def set(self, name: str, *answers: list[str]) -> None:
        self.answers[name] = list(answers)

    def __call__(self, host: str, port: int):
        self.questions.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        queue = self.answers[host]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        return [ipaddress.ip_address(address) for address in answer]


@pytest.fixture
def fetcher(invoke):
    """The URL fetcher the handler loaded with it (``lambda/url_fetch.py``)."""
    return sys.modules["url_fetch"]


@pytest.fixture
def names(fetcher, monkeypatch):
    resolver = Names()
    monkeypatch.setattr(fetcher, "resolve_addresses", resolver)
    return resolver


@pytest.fixture
def sites():
    made: list[Site] = []
    yield made
    for site in made:
        site.close()


def answer(status: int = 200, headers: dict[str, str] | None = None, body: bytes = b"") -> Behaviour:
    def send(connection: socket.socket, _head: str) -> None:
        lines = [f"HTTP/1.1 {status} X"] + [f"{name}: {value}" for name, value in (headers or {}).items()]
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    return send


IMAGE = answer(200, {"Content-Type": "image/jpeg", "Content-Length": str(len(JPEG))}, JPEG)


def site(sites, certificates, network, behaviour: Behaviour, public: str = PUBLIC, **options) -> Site:
    made = Site(behaviour, certificates, **options)
    sites.append(made)
    network.route(public, 443, made.port)
    return made


def fetch(invoke, url: str, **options):
    arguments = {"max_bytes": 50_000, "timeout": DEADLINE, **options}
    return invoke.fetch_image(url, **arguments)


def refusal(invoke, url: str, **options):
    started = time.monotonic()
    with pytest.raises(invoke.HttpError) as caught:
        fetch(invoke, url, **options)
    return caught.value, time.monotonic() - started


# --- the path that works --------------------------------------------------

def test_a_public_name_is_fetched_from_its_vetted_address_with_sni_and_host(invoke, names, network, sites, certificates):
    served = site(sites, certificates, network, IMAGE)
    names.set("dogs.test", [PUBLIC])

    assert fetch(invoke, "https://dogs.test/dog.jpg?size=small") == (JPEG, "image/jpeg")
    assert served.server_names == ["dogs.test"]
    (head,) = served.requests
    assert head.startswith("GET /dog.jpg?size=small HTTP/1.1\r\n") and "\r\nHost: dogs.test\r\n" in head
    assert network.connections == [(PUBLIC, 443)] and network.outside_attempts == []


def test_a_chunked_answer_and_a_relative_redirect_are_followed(invoke, names, network, sites, certificates):
    def behaviour(connection, head):
        if head.startswith("GET /start "):
            answer(302, {"Location": "/chunked", "Content-Length": "0"})(connection, head)
        else:
            half = len(JPEG) // 2
            body = b"%x\r\n%s\r\n%x;ext=1\r\n%s\r\n0\r\nX-Trailer: y\r\n\r\n" % (half, JPEG[:half], len(JPEG) - half, JPEG[half:])
            answer(200, {"Content-Type": "image/jpeg", "Transfer-Encoding": "chunked"}, body)(connection, head)

    site(sites, certificates, network, behaviour)
    names.set("dogs.test", [PUBLIC])
    assert fetch(invoke, "https://dogs.test/start") == (JPEG, "image/jpeg")
    assert names.questions == ["dogs.test", "dogs.test"]  # once per hop, each hop vetted again


def test_a_certificate_for_another_name_is_refused(invoke, names, network, sites, certificates):
    site(sites, certificates, network, IMAGE)
    names.set("elsewhere.test", [PUBLIC])  # the site's certificate does not name it
    error, _ = refusal(invoke, "https://elsewhere.test/dog.jpg")
    assert (error.status, error.message) == (400, "the URL could not be fetched")
    assert "certificate" in error.detail.lower()


# --- addresses that are not allowed ---------------------------------------

INTERNAL_ADDRESSES = [
    "127.0.0.1", "127.1.2.3", "10.1.2.3", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "100.127.255.254",
    "0.0.0.0", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "198.18.0.1", "192.0.0.8", "192.0.2.1",
    "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254", "ff02::1", "fec0::1", "100::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:0:a00:1",  # IPv4-mapped and -translated
    "::7f00:1", "::a9fe:a9fe",  # IPv4-compatible
    "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1", "64:ff9b::a00:1",  # NAT64 to the metadata service, loopback, 10/8
    "64:ff9b:1::1", "64:ff9b:1:ffff::a9fe:a9fe",  # local-use NAT64
    "2002:7f00:1::1", "2002:a9fe:a9fe::1", "2002:a00:1::",  # 6to4 around 127.0.0.1, 169.254.169.254, 10.0.0.1
    "2001:0:a00:1::1",  # Teredo with the server 10.0.0.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo whose client is 192.0.2.45
]


@pytest.mark.parametrize("address", INTERNAL_ADDRESSES)
def test_every_internal_address_form_is_refused_before_connecting(invoke, names, network, address):
    names.set("sneaky.test", [address])
    literal = f"[{address}]" if ":" in address else address
    for url in ("https://sneaky.test/dog.jpg", f"https://{literal}/dog.jpg"):
        error, _ = refusal(invoke, url)
        assert (error.status, error.message) == (400, "the URL points to an address that is not allowed"), url
    assert network.connections == []


def test_one_internal_address_among_public_ones_refuses_the_name(invoke, names, network):
    names.set("mixed.test", [PUBLIC, "2606:4700::1111", "10.0.0.7"])
    error, _ = refusal(invoke, "https://mixed.test/dog.jpg")
    assert error.message == "the URL points to an address that is not allowed" and "10.0.0.7" in error.detail
    assert network.connections == []


@pytest.mark.parametrize("address", [PUBLIC, "8.8.8.8", "2606:4700::1111", "64:ff9b::5db8:d70e", "2002:5db8:d70e::1", "::ffff:8.8.8.8"])
def test_public_addresses_and_forms_that_carry_one_are_allowed(fetcher, address):
    assert fetcher.is_allowed_address(ipaddress.ip_address(address))


def test_a_name_that_rebinds_after_the_check_is_still_fetched_from_the_checked_address(invoke, names, network, sites, certificates):
    public = site(sites, certificates, network, IMAGE)
    internal = Site(IMAGE, certificates)  # what the rebound name would reach
    sites.append(internal)
    network.route("127.0.0.1", 443, internal.port)
    names.set("rebind.test", [PUBLIC], ["127.0.0.1"])

    assert fetch(invoke, "https://rebind.test/dog.jpg")[0] == JPEG
    assert names.questions == ["rebind.test"]  # asked once; the connection went to that answer
    assert network.connections == [(PUBLIC, 443)]
    assert len(public.requests) == 1 and internal.requests == []


@pytest.mark.parametrize("location", [
    "https://127.0.0.1/admin", "https://[::ffff:7f00:1]/", "https://[64:ff9b::a9fe:a9fe]/latest/meta-data",
    "https://internal.test/secret", "https://rebind.test/dog.jpg",
])
def test_a_redirect_to_an_internal_address_is_refused(invoke, names, network, sites, certificates, location):
    site(sites, certificates, network, answer(302, {"Location": location, "Content-Length": "0"}))
    names.set("dogs.test", [PUBLIC])
    names.set("internal.test", ["10.20.30.40"])
    names.set("rebind.test", ["169.254.169.254"])
    error, _ = refusal(invoke, "https://dogs.test/start")
    assert (error.status, error.message) == (400, "the URL points to an address that is not allowed")
    assert network.connections == [(PUBLIC, 443)]


@pytest.mark.parametrize("location", ["http://dogs.test/dog.jpg", "https://[::1/", "https://dogs.test:99999/", "file:///etc/passwd"])
def test_a_redirect_to_an_unusable_url_is_refused(invoke, names, network, sites, certificates, location):
    site(sites, certificates, network, answer(301, {"Location": location, "Content-Length": "0"}))
    names.set("dogs.test", [PUBLIC])
    error, _ = refusal(invoke, "https://dogs.test/start")
    assert (error.status, error.message) == (400, "the URL could not be fetched")
    assert network.outside_attempts == []


def test_redirects_stop_after_the_hop_limit(invoke, fetcher, names, network, sites, certificates):
    served = site(sites, certificates, network, answer(307, {"Location": "https://hop.test/again", "Content-Length": "0"}))
    names.set("hop.test", [PUBLIC])
    error, _ = refusal(invoke, "https://hop.test/first")
    assert error.message == "the URL could not be fetched" and "redirects" in error.detail
    assert len(served.requests) == fetcher.MAX_REDIRECTS + 1


# --- the one deadline -----------------------------------------------------

def trickle(prefix: bytes, drip: bytes, every: float = 0.1) -> Behaviour:
    def send(connection, _head):
        connection.sendall(prefix)
        for _ in range(200):
            connection.sendall(drip)
            time.sleep(every)
    return send


@pytest.mark.slow
@pytest.mark.parametrize(("name", "behaviour", "options"), [
    ("a trickled body", trickle(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 40000\r\n\r\n" + JPEG[:50], b"\x00"), {}),
    ("trickled headers", trickle(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n", b"X"), {}),
    ("a trickled status line", trickle(b"HTT", b"P"), {}),
    ("trickled chunks", trickle(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\nA\r\n"), {}),
    ("headers, then silence", trickle(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 9000\r\n\r\n", b"", 5), {}),
    ("a TLS server that never answers", None, {}),
    ("a port that never starts TLS", None, {"handshake": False}),
])
def test_a_slow_server_is_cut_off_at_the_deadline(invoke, names, network, sites, certificates, name, behaviour, options):
    if behaviour is None:
        def behaviour(connection, _head):
            time.sleep(5)
    site(sites, certificates, network, behaviour, **options)
    names.set("dogs.test", [PUBLIC])
    error, took = refusal(invoke, "https://dogs.test/dog.jpg")
    assert (error.status, error.message) == (400, "the download took longer than 1 s"), name
    assert DEADLINE - 0.05 <= took < DEADLINE + MARGIN, (name, took)


def test_a_resolver_that_hangs_is_cut_off_at_the_deadline(invoke, fetcher, monkeypatch, network):
    monkeypatch.setattr(fetcher, "resolve_addresses", lambda host, port: time.sleep(5))
    error, took = refusal(invoke, "https://slow-dns.test/dog.jpg")
    assert error.message == "the download took longer than 1 s" and took < DEADLINE + MARGIN


# --- caps on what a server may send ----------------------------------------

@pytest.mark.parametrize(("name", "behaviour", "status", "message"), [
    ("too many headers", answer(200, {f"X-{i}": "y" for i in range(200)}), 400, "the URL could not be fetched"),
    ("a huge header", answer(200, {"X-Big": "y" * 40_000}), 400, "the URL could not be fetched"),
    ("a folded header", lambda c, h: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n  folded\r\n\r\n"), 400, "the URL could not be fetched"),
    ("not HTTP", lambda c, h: c.sendall(b"SSH-2.0-OpenSSH_9.6\r\n"), 400, "the URL could not be fetched"),
    ("gzip", answer(200, {"Content-Type": "image/jpeg", "Content-Encoding": "gzip", "Content-Length": "3"}, b"abc"), 400, "the URL could not be fetched"),
    ("two lengths", answer(200, {"Content-Type": "image/jpeg", "Content-Length": "3", "content-length": "4"}, b"abcd"), 400, "the URL could not be fetched"),
    ("a declared length over the cap", answer(200, {"Content-Type": "image/jpeg", "Content-Length": "999999"}), 413, "the image is larger than 50000 bytes"),
    ("chunks over the cap", trickle(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n", b"4000\r\n" + bytes(0x4000) + b"\r\n", 0), 413, "the image is larger than 50000 bytes"),
    ("html", answer(200, {"Content-Type": "text/html", "Content-Length": "2"}, b"hi"), 415, "the URL did not answer with a JPEG or PNG image"),
    ("a 404", answer(404, {"Content-Length": "0"}), 400, "the URL answered HTTP 404"),
])
def test_what_a_server_sends_is_capped(invoke, names, network, sites, certificates, name, behaviour, status, message):
    site(sites, certificates, network, behaviour)
    names.set("dogs.test", [PUBLIC])
    error, took = refusal(invoke, "https://dogs.test/dog.jpg")
    assert (error.status, error.message) == (status, message), (name, error.detail)
    assert took < DEADLINE, name


def then_silence(behaviour: Behaviour) -> Behaviour:
    """``behaviour``, then the connection held open: a read until close would wait for the deadline."""
    def send(connection, head):
        behaviour(connection, head)
        time.sleep(3)
    return send


CHUNKED_JPEG = {"Content-Type": "image/jpeg", "Transfer-Encoding": "chunked"}


@pytest.mark.parametrize(("name", "behaviour", "detail"), [
    ("65 headers", answer(200, {f"X-{i}": "y" for i in range(65)}), "more than 64 headers"),
    ("a header line without a colon", lambda c, h: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nBad line\r\nContent-Length: 3\r\n\r\nabc"), "malformed"),
    ("a transfer encoding besides chunked", answer(200, {**CHUNKED_JPEG, "Transfer-Encoding": "gzip, chunked"}, b"3\r\nabc\r\n0\r\n\r\n"), "Transfer-Encoding 'gzip, chunked'"),
    ("a signed Content-Length", answer(200, {"Content-Type": "image/jpeg", "Content-Length": "+3"}, b"abc"), "Content-Length '+3'"),
    ("a negative chunk size", then_silence(answer(200, CHUNKED_JPEG, b"-5\r\n" + JPEG)), "without a bound"),
    ("a body shorter than declared", answer(200, {"Content-Type": "image/jpeg", "Content-Length": str(len(JPEG) + 10)}, JPEG), "incomplete"),
    ("chunks cut off", answer(200, CHUNKED_JPEG, b"%x\r\n%s" % (len(JPEG), JPEG[:100])), "incomplete"),
    ("a status past 599", answer(600), "not valid HTTP/1.x"),
])
def test_what_http_client_would_take_is_refused(invoke, names, network, sites, certificates, name, behaviour, detail):
    site(sites, certificates, network, behaviour)
    names.set("dogs.test", [PUBLIC])
    error, took = refusal(invoke, "https://dogs.test/dog.jpg")
    assert (error.status, error.message) == (400, "the URL could not be fetched"), (name, error.detail)
    assert detail in error.detail, name
    assert took < DEADLINE, name


def test_interim_responses_before_the_answer_are_skipped(invoke, names, network, sites, certificates):
    early_hints = b"HTTP/1.1 103 Early Hints\r\nLink: </dog.css>; rel=preload\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"
    site(sites, certificates, network, lambda connection, head: (connection.sendall(early_hints), IMAGE(connection, head)))
    names.set("dogs.test", [PUBLIC])
    assert fetch(invoke, "https://dogs.test/dog.jpg") == (JPEG, "image/jpeg")


# --- what the caller learns: one message per kind, whatever the port does ------

def test_closed_plain_and_untrusted_ports_look_the_same_to_the_caller(invoke, names, network, sites, certificates, capsys, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    plain = Site(answer(200, {"Content-Type": "image/jpeg", "Content-Length": "2"}, b"hi"), tls=False)
    sites.append(plain)
    (tmp_path / "other").mkdir()
    untrusted = Site(IMAGE, make_certificates(tmp_path / "other", ("untrusted.test",)))  # signed by a CA nobody trusts
    sites.append(untrusted)
    network.route("203.0.114.1", 443, closed_port)
    network.route("203.0.114.2", 443, plain.port)
    names.set("closed.test", ["203.0.114.1"])
    names.set("plain.test", ["203.0.114.2"])
    names.set("untrusted.test", [PUBLIC])
    network.route(PUBLIC, 443, untrusted.port)

    bodies, details = [], []
    for host in ("closed.test", "plain.test", "untrusted.test"):
        response = invoke.handler({"url": f"https://{host}/dog.jpg"}, LambdaContext())
        assert response["statusCode"] == 400
        bodies.append(response["body"])
        details.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["detail"])
    assert bodies == [json.dumps({"error": "the URL could not be fetched"})] * 3
    assert "refused" in details[0].lower() and "tls" in details[1].lower()
    assert "certificate" in details[2].lower()
    assert network.outside_attempts == []


@pytest.mark.parametrize(("url", "message"), [
    ("https://[::1", "url is not a valid URL"),
    ("https://dogs.test:99999/dog.jpg", "url is not a valid URL"),
    ("https://dogs.test:http/dog.jpg", "url is not a valid URL"),
    ("https://dogs.test:/dog.jpg", "url has an empty or zero port"),
    ("https://dogs.test:0/dog.jpg", "url has an empty or zero port"),
    ("https://dogs.test/a dog.jpg", "url must not contain spaces or control characters"),
    ("https://dogs.test/dog.jpg\r\nX-Injected: 1", "url must not contain spaces or control characters"),
    ("https://dogs.test/\ndog.jpg", "url must not contain spaces or control characters"),
    ("https://dogs.test/\x00", "url must not contain spaces or control characters"),
    ("https://user@dogs.test/dog.jpg", "url must not carry a user name or password"),
    ("https:///dog.jpg", "url has no host"),
    ("https://dogs..test/dog.jpg", "url has a host name that is not valid"),
    ("https://do<g>s.test/", "url has a host name that is not valid"),
    ("https://[fe80::1%25eth0]/", "url must not name a scoped (zone) address"),
    ("ftp://dogs.test/dog.jpg", "url must start with https://"),
    ("https://dogs.test/" + "a" * 3000, "url is longer than 2048 characters"),
])
def test_a_malformed_url_is_a_400_naming_the_field(invoke, network, url, message):
    response = invoke.handler({"url": url}, LambdaContext())
    assert response["statusCode"] == 400
    assert json.loads(response["body"])["error"].startswith(message)
    assert network.connections == []

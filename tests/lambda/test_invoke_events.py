"""The invoke function under the events the real integrations send, and under arbitrary ones.

The events follow AWS's documented shapes (the Lambda developer guide's
samples, which ``sam local generate-event`` renders): an API Gateway REST API
proxy event (v1, with both header maps), an HTTP API event (v2, lower-case
headers, the method under requestContext.http), a function URL event (v2 with
the lambda-url domain), and Application Load Balancer events with single- and
multi-value headers (an ALB passes query strings on still URL-encoded). Each
carries a binary image, base64-encoded JSON, or JSON naming an image URL
served by a TLS site on 127.0.0.1. Then hypothesis throws arbitrary events and
bodies at the handler: none may produce a 500 or a traceback.
"""
from __future__ import annotations

import base64
import io
import ipaddress
import json
import socket
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lambda_harness import QuietHandler, Site, endpoint_answers, load_handler, local_runtime, make_certificates
from lambda_harness import INTEGRATIONS, alb_multi, http_api_v2, rest_v1

ENDPOINT = "dogbreed-single-instance"
PUBLIC = "93.184.215.14"


def image(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 14), (90, 140, 60)).save(buffer, fmt)
    return buffer.getvalue()


JPEG, PNG = image("JPEG"), image("PNG")
RANKED = {"predictions": [{"top_k": [{"label": f"{i + 1:03d}.Breed", "index": i, "probability": 0.5 ** (i + 1)} for i in range(8)]}]}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# (name, body, isBase64Encoded, headers, query, what the endpoint must receive)
BODIES = [
    ("binary jpeg", b64(JPEG), True, {"Content-Type": "image/jpeg"}, {"top_k": ["9", "2"]}, (JPEG, "image/jpeg", 2)),
    ("binary png, no content type", b64(PNG), True, {}, {"top_k": ["2"]}, (PNG, "image/png", 2)),
    ("binary jpeg as octet-stream", b64(JPEG), True, {"Content-Type": "application/octet-stream"}, None, (JPEG, "image/jpeg", 5)),
    ("json", json.dumps({"image_base64": b64(PNG), "top_k": 2}), False, {"Content-Type": "application/json"}, None, (PNG, "image/png", 2)),
    ("base64 json", b64(json.dumps({"image_base64": b64(JPEG), "top_k": 2}).encode()), True,
     {"Content-Type": "application/json; charset=utf-8"}, None, (JPEG, "image/jpeg", 2)),
    ("json, no content type", json.dumps({"image_base64": b64(JPEG)}), False, {}, None, (JPEG, "image/jpeg", 5)),
    ("url", json.dumps({"url": "https://dogs.test/dog.jpg", "top_k": "2"}), False, {"Content-Type": "application/json"}, None, (JPEG, "image/jpeg", 2)),
]


@pytest.fixture(scope="module")
def image_site(tmp_path_factory):
    ca, cert, key = make_certificates(tmp_path_factory.mktemp("pki"), ("dogs.test",))

    def serve(connection, _head):
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s" % (len(JPEG), JPEG))

    site = Site(serve, (ca, cert, key))
    yield site, ca
    site.close()


@pytest.fixture
def invoke(monkeypatch, image_site, network, tmp_path):
    site, ca = image_site
    monkeypatch.setenv("ENDPOINT_NAME", ENDPOINT)
    for name in ("ALLOWED_ORIGIN", "TOP_K", "MAX_IMAGE_BYTES", "URL_TIMEOUT_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    module = load_handler("invoke_endpoint")
    def resolve(host: str, port: int) -> list:
        if host == "dogs.test":
            return [ipaddress.ip_address(PUBLIC)]
        if host == "internal.test":
            return [ipaddress.ip_address("10.0.0.9")]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(sys.modules["url_fetch"], "resolve_addresses", resolve)
    network.route(PUBLIC, 443, site.port)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("integration", sorted(INTEGRATIONS))
@pytest.mark.parametrize(("name", "body", "encoded", "headers", "query", "expected"), BODIES, ids=[row[0] for row in BODIES])
def test_every_integration_and_body_reaches_the_endpoint(aws, runtime_takes_images, invoke, network, integration, name, body,
                                                         encoded, headers, query, expected):
    endpoint_answers(RANKED)
    event = INTEGRATIONS[integration](body, encoded, headers, query)
    answer = invoke.handler(json.loads(json.dumps(event)), None)

    assert answer["statusCode"] == 200, answer["body"]
    data, content_type, top_k = expected
    (sent,) = runtime_takes_images
    assert (sent["body"], sent["content_type"], sent["custom_attributes"]) == (data, content_type, f"top_k={top_k}")
    assert len(json.loads(answer["body"])["top_k"]) == top_k
    if integration == "alb-multi-value":  # the ALB reads only multiValueHeaders back in this mode
        assert "headers" not in answer and answer["multiValueHeaders"]["Content-Type"] == ["application/json"]
    else:
        assert answer["headers"]["Content-Type"] == "application/json"
    assert ("statusDescription" in answer) == integration.startswith("alb")
    assert network.outside_attempts == []


@pytest.mark.parametrize(("integration", "status", "description"), [("alb", 415, "415 Unsupported Media Type"), ("alb-multi-value", 400, "400 Bad Request")])
def test_an_alb_refusal_has_its_status_description(invoke, integration, status, description):
    body, encoded = (b64(b"GIF89a...."), True) if status == 415 else ("{" * 40 + "}" * 40, False)
    answer = invoke.handler(INTEGRATIONS[integration](body, encoded, {}, None), None)
    assert (answer["statusCode"], answer["statusDescription"]) == (status, description)


@pytest.mark.parametrize(("event", "message"), [
    (rest_v1("{}", False, {"Content-Type": "application/json"}, None) | {"headers": {"Content-Type": 7}}, "header 'Content-Type' must have a string value"),
    (rest_v1("{}", False, {}, None) | {"headers": ["Content-Type", "image/jpeg"]}, "headers must be an object"),
    (alb_multi("{}", False, {}, None) | {"multiValueHeaders": {"content-type": "image/jpeg"}}, "header 'content-type' in multiValueHeaders must be a list of strings"),
    (rest_v1("{}", False, {}, {"top_k": ["²"]}) | {"body": b64(JPEG), "isBase64Encoded": True}, "top_k must be a whole number from 1 to 20, got '²'"),
    (rest_v1(json.dumps({"image_base64": b64(JPEG), "top_k": "٣"}), False, {"Content-Type": "application/json"}, None), "top_k must be a whole number"),
    (rest_v1(json.dumps({"image_base64": b64(JPEG), "top_k": 1e400}), False, {"Content-Type": "application/json"}, None), "top_k must be a whole number"),
    (rest_v1(json.dumps({"image_base64": b64(JPEG), "top_k": 2.5}), False, {"Content-Type": "application/json"}, None), "top_k must be a whole number"),
    (rest_v1(json.dumps({"image_base64": b64(JPEG), "top_k": True}), False, {"Content-Type": "application/json"}, None), "top_k must be a whole number"),
    (rest_v1("[" * 100_000 + "]" * 100_000, False, {"Content-Type": "application/json"}, None), "the JSON body is nested deeper than 16 levels"),
    (rest_v1('{"a": ' * 17 + "1" + "}" * 17, False, {}, None), "the JSON body is nested deeper than 16 levels"),
    (rest_v1("{}", "yes", {"Content-Type": "application/json"}, None), "isBase64Encoded must be true or false"),
    (rest_v1('{"url": 1}', False, {}, None) | {"requestContext": "prod"}, "requestContext must be an object"),
    (http_api_v2("{}", False, {}, None) | {"requestContext": {"http": "POST"}}, "requestContext.http must be an object"),
    (rest_v1("{}", False, {}, None) | {"httpMethod": ["POST"]}, "the proxy event's HTTP method must be a string"),
    (rest_v1(json.dumps({"url": "https://[::1"}), False, {"Content-Type": "application/json"}, None), "url is not a valid URL"),
    (rest_v1(b64(b"\xff\xfe{}"), True, {"Content-Type": "application/json"}, None), "the JSON body is not UTF-8"),
    (rest_v1("\ud800", False, {"Content-Type": "application/json"}, None), "the JSON body is not UTF-8"),
])
def test_a_malformed_event_is_a_400_naming_the_field(invoke, network, event, message):
    answer = invoke.handler(event, None)
    assert answer["statusCode"] == 400, answer["body"]
    assert message in json.loads(answer["body"])["error"]
    assert network.connections == []


# --- arbitrary events: never a 500, never a traceback ------------------------

class _Runtime(QuietHandler):
    """A SageMaker runtime that classifies anything, so an arbitrary body that passes every check gets a 200."""

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.answer(200, "application/json", json.dumps(RANKED).encode())


@pytest.fixture
def runtime(monkeypatch):
    with local_runtime(monkeypatch, _Runtime):
        yield


def json_containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                           json_containers, max_leaves=8)
header_names = st.sampled_from(["Content-Type", "content-type", "Origin", "origin"]) | st.text(max_size=10)
header_values = st.sampled_from(["image/jpeg", "image/png", "application/json", "text/plain", ""]) | st.text(max_size=20) | json_values
top_k_values = st.sampled_from(["2", "²", "٣", "0", "21", "-1", " 3 ", "1e3", "", "0x3"]) | json_values
urls = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    st.sampled_from(["https", "http", "HTTPS", "file", ""]),
    st.sampled_from(["dogs.test", "internal.test", "[::1", "[64:ff9b::a9fe:a9fe]", "127.0.0.1", "nowhere.test", "", "user@dogs.test"]),
    st.sampled_from(["", ":443", ":99999", ":x", ":", ":0"]),
    st.text(max_size=12),
)
json_payloads = st.fixed_dictionaries({}, optional={
    "url": urls | json_values, "image_base64": st.sampled_from([b64(JPEG), "%%%", ""]) | json_values, "top_k": top_k_values,
})
bodies = st.one_of(
    st.none(), st.text(max_size=40), json_values,
    st.binary(max_size=40).map(b64),
    st.sampled_from([JPEG[:3], PNG[:8], b"GIF89a"]).flatmap(lambda head: st.binary(max_size=30).map(lambda tail: b64(head + tail))),
    json_payloads.map(json.dumps), json_payloads.map(lambda payload: b64(json.dumps(payload).encode())),
    st.integers(min_value=1, max_value=60).map(lambda depth: "[" * depth + "]" * depth),
)
contexts = st.sampled_from([{"elb": {"targetGroupArn": "arn"}}, {"http": {"method": "POST"}}, {"http": {"method": "OPTIONS"}}, {}]) | json_values
events = st.fixed_dictionaries({}, optional={
    "httpMethod": st.sampled_from(["POST", "GET", "OPTIONS", "post"]) | json_values,
    "routeKey": st.just("$default"),
    "headers": st.dictionaries(header_names, header_values, max_size=3) | json_values,
    "multiValueHeaders": st.dictionaries(header_names, st.lists(header_values, max_size=2) | json_values, max_size=3) | json_values,
    "queryStringParameters": st.dictionaries(st.just("top_k") | st.text(max_size=5), top_k_values, max_size=2) | json_values,
    "multiValueQueryStringParameters": st.dictionaries(st.just("top_k"), st.lists(top_k_values, max_size=2), max_size=1) | json_values,
    "requestContext": contexts,
    "body": bodies,
    "isBase64Encoded": st.booleans() | json_values,
}) | json_payloads | json_values


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(event=events)
def test_no_event_gets_a_500_or_a_traceback(invoke, runtime, network, capsys, event):
    answer = invoke.handler(event, None)

    assert answer["statusCode"] in (200, 204, 400, 405, 413, 415), answer
    text = json.dumps(answer)
    assert "Traceback" not in text and "File \"" not in text
    if answer["statusCode"] >= 400:
        assert json.loads(answer["body"])["error"]
    assert all(host in ("127.0.0.1", PUBLIC) for host, _ in network.connections), network.connections
    capsys.readouterr()


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(url=urls | st.text(max_size=40) | st.text(max_size=20).map(lambda text: "https://" + text))
def test_no_url_gets_a_500_or_reaches_a_refused_address(invoke, runtime, network, capsys, url):
    answer = invoke.handler({"url": url, "top_k": 1}, None)

    assert answer["statusCode"] in (200, 400, 413, 415), answer
    if answer["statusCode"] == 400:
        assert json.loads(answer["body"])["error"]
    # a public name on another port (":443" followed by a path that starts with a digit) is tried and refused by
    # the guard; no attempt ever goes to an address that is not public
    assert all(host == PUBLIC for host, _ in network.outside_attempts), network.outside_attempts
    assert all(host in ("127.0.0.1", PUBLIC) for host, _ in network.connections), network.connections
    capsys.readouterr()

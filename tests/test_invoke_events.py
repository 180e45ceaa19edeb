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
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lambda_harness import Site, aws as aws_only, endpoint_answers, load_handler, make_certificates, network  # noqa: F401
from lambda_harness import runtime_takes_images  # noqa: F401  (a fixture)

ENDPOINT = "dogbreed-single-instance"
PUBLIC = "93.184.215.14"


def image(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 14), (90, 140, 60)).save(buffer, fmt)
    return buffer.getvalue()


JPEG, PNG = image("JPEG"), image("PNG")
RANKED = {"predictions": [{"top_k": [{"label": f"{i + 1:03d}.Breed", "index": i, "probability": 0.5 ** (i + 1)} for i in range(8)]}]}


# --- events as the integrations send them ------------------------------------

def rest_v1(body: str, encoded: bool, headers: dict[str, str], query: dict[str, list[str]] | None) -> dict:
    """API Gateway REST API, Lambda proxy integration (payload 1.0)."""
    return {
        "resource": "/predict", "path": "/predict", "httpMethod": "POST",
        "headers": {"Accept": "*/*", "Host": "abc123.execute-api.us-east-1.amazonaws.com", "User-Agent": "curl/8.5.0",
                    "X-Forwarded-For": "198.51.100.7", "X-Forwarded-Port": "443", "X-Forwarded-Proto": "https", **headers},
        "multiValueHeaders": {"Accept": ["*/*"], "Host": ["abc123.execute-api.us-east-1.amazonaws.com"], "User-Agent": ["curl/8.5.0"],
                              "X-Forwarded-For": ["198.51.100.7"], "X-Forwarded-Port": ["443"], "X-Forwarded-Proto": ["https"],
                              **{name: [value] for name, value in headers.items()}},
        "queryStringParameters": {name: values[-1] for name, values in query.items()} if query else None,
        "multiValueQueryStringParameters": query or None,
        "pathParameters": None, "stageVariables": None,
        "requestContext": {
            "resourceId": "2gxmpl", "resourcePath": "/predict", "httpMethod": "POST", "extendedRequestId": "JJbxmplHYosFVYQ=",
            "requestTime": "10/Mar/2020:00:03:59 +0000", "path": "/prod/predict", "accountId": "123456789012", "protocol": "HTTP/1.1",
            "stage": "prod", "domainPrefix": "abc123", "requestTimeEpoch": 1583798639428, "requestId": "77375676-xmpl-4b79-853a-f982474efe18",
            "identity": {"cognitoIdentityPoolId": None, "accountId": None, "cognitoIdentityId": None, "caller": None,
                         "sourceIp": "198.51.100.7", "principalOrgId": None, "accessKey": None, "cognitoAuthenticationType": None,
                         "cognitoAuthenticationProvider": None, "userArn": None, "userAgent": "curl/8.5.0", "user": None},
            "domainName": "abc123.execute-api.us-east-1.amazonaws.com", "apiId": "abc123",
        },
        "body": body, "isBase64Encoded": encoded,
    }


def _v2(body: str, encoded: bool, headers: dict[str, str], query: dict[str, list[str]] | None, domain: str, route: str,
        account: str) -> dict:
    raw_query = "&".join(f"{name}={value}" for name, values in (query or {}).items() for value in values)
    event = {
        "version": "2.0", "routeKey": route, "rawPath": "/predict" if route != "$default" else "/", "rawQueryString": raw_query,
        "headers": {"accept": "*/*", "content-length": str(len(body)), "host": domain, "user-agent": "curl/8.5.0",
                    "x-amzn-trace-id": "Root=1-5e6722a7-cc56xmpl46db7ae02d4da47e", "x-forwarded-for": "198.51.100.7",
                    "x-forwarded-port": "443", "x-forwarded-proto": "https", **{name.lower(): value for name, value in headers.items()}},
        "requestContext": {
            "accountId": account, "apiId": domain.split(".")[0], "domainName": domain, "domainPrefix": domain.split(".")[0],
            "http": {"method": "POST", "path": "/predict" if route != "$default" else "/", "protocol": "HTTP/1.1",
                     "sourceIp": "198.51.100.7", "userAgent": "curl/8.5.0"},
            "requestId": "JKJaXmPLvHcESHA=", "routeKey": route, "stage": "$default",
            "time": "10/Mar/2020:05:16:23 +0000", "timeEpoch": 1583817383220,
        },
        "body": body, "isBase64Encoded": encoded,
    }
    if query:  # v2 joins repeated parameters with commas
        event["queryStringParameters"] = {name: ",".join(values) for name, values in query.items()}
    return event


def http_api_v2(body, encoded, headers, query) -> dict:
    """API Gateway HTTP API (payload 2.0)."""
    return _v2(body, encoded, headers, query, "r3pmxmplak.execute-api.us-east-2.amazonaws.com", "POST /predict", "123456789012")


def function_url(body, encoded, headers, query) -> dict:
    """A Lambda function URL (payload 2.0, accountId 'anonymous' without IAM auth)."""
    return _v2(body, encoded, headers, query, "a1b2c3d4e5f6g7h8.lambda-url.us-east-1.on.aws", "$default", "anonymous")


ALB_HEADERS = {"accept": "*/*", "host": "lambda-alb-123578498.us-east-2.elb.amazonaws.com", "user-agent": "curl/8.5.0",
               "x-amzn-trace-id": "Root=1-5c536348-3d683b8b04734faae651f476", "x-forwarded-for": "198.51.100.7",
               "x-forwarded-port": "443", "x-forwarded-proto": "https"}
ALB_CONTEXT = {"elb": {"targetGroupArn": "arn:aws:elasticloadbalancing:us-east-2:123456789012:targetgroup/lambda-279XGJDqGZ5rsrHC2Fjr/49e9d65c45c6791a"}}


def alb_single(body, encoded, headers, query) -> dict:
    """An ALB target group without multi-value headers: the last value of each; the query as the client encoded it."""
    return {
        "requestContext": ALB_CONTEXT, "httpMethod": "POST", "path": "/predict",
        "queryStringParameters": {name: values[-1].replace("2", "%32") for name, values in (query or {}).items()},
        "headers": {**ALB_HEADERS, **{name.lower(): value for name, value in headers.items()}},
        "body": body, "isBase64Encoded": encoded,
    }


def alb_multi(body, encoded, headers, query) -> dict:
    """An ALB target group with multi-value headers on: only the multi-value maps arrive."""
    return {
        "requestContext": ALB_CONTEXT, "httpMethod": "POST", "path": "/predict",
        "multiValueQueryStringParameters": {name: [value.replace("2", "%32") for value in values] for name, values in (query or {}).items()},
        "multiValueHeaders": {**{name: [value] for name, value in ALB_HEADERS.items()},
                              **{name.lower(): [value] for name, value in headers.items()}},
        "body": body, "isBase64Encoded": encoded,
    }


INTEGRATIONS = {"rest-v1": rest_v1, "http-api-v2": http_api_v2, "function-url": function_url, "alb": alb_single, "alb-multi-value": alb_multi}


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

    monkeypatch.setattr(module, "resolve_addresses", resolve)
    network.route(PUBLIC, 443, site.port)
    return module


@pytest.mark.parametrize("integration", sorted(INTEGRATIONS))
@pytest.mark.parametrize(("name", "body", "encoded", "headers", "query", "expected"), BODIES, ids=[row[0] for row in BODIES])
def test_every_integration_and_body_reaches_the_endpoint(aws_only, runtime_takes_images, invoke, network, integration, name, body,
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

class _Runtime(BaseHTTPRequestHandler):
    """A SageMaker runtime that classifies anything, so an arbitrary body that passes every check gets a 200."""

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps(RANKED).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def runtime(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Runtime)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name, value in {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": f"http://127.0.0.1:{server.server_port}"}.items():
        monkeypatch.setenv(name, value)
    yield
    server.shutdown()
    server.server_close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
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
    assert network.outside_attempts == []
    assert all(host in ("127.0.0.1", PUBLIC) for host, _ in network.connections), network.connections
    capsys.readouterr()

"""lambda/invoke_endpoint.py: every input form and every error status, against moto and local servers.

The endpoint is moto's SageMaker runtime, or a local HTTP server that answers
as SageMaker does when the model container refuses an image (ModelError).
Image URLs are fetched from a local HTTPS server with a self-signed
certificate; nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import base64
import io
import json
import socket
import ssl
import threading
import time
from http.server import ThreadingHTTPServer

import pytest
from PIL import Image

from lambda_harness import LambdaContext, QuietHandler, endpoint_answers, load_handler, local_runtime, log_lines, make_certificates
from lambda_harness import function_url, rest_v1, use_test_credentials

ENDPOINT = "dogbreed-single-instance"


@pytest.fixture
def aws(aws_taking_images):
    """moto in this process; what the runtime was sent, one record per invocation."""
    return aws_taking_images


@pytest.fixture
def invoke(monkeypatch):
    """The handler module with a configured environment (each test may change it)."""
    monkeypatch.setenv("ENDPOINT_NAME", ENDPOINT)
    for name in ("ALLOWED_ORIGIN", "TOP_K", "MAX_IMAGE_BYTES", "URL_TIMEOUT_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    return load_handler("invoke_endpoint")


def image_bytes(fmt: str = "JPEG", size=(48, 36), color=(150, 100, 50)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def ranked(count: int = 10) -> dict:
    probabilities = [2.0 ** -(i + 1) for i in range(count)]
    return {"predictions": [{"top_k": [{"label": f"{i + 1:03d}.Breed_{i}", "index": i, "probability": p} for i, p in enumerate(probabilities)]}]}


def rest_event(body: bytes | str | None, content_type: str | None, *, encoded: bool = True, method: str = "POST", headers=None, query=None) -> dict:
    """An API Gateway REST (v1) proxy event; ``query`` maps each parameter to one value."""
    all_headers = {"Content-Type": content_type} if content_type else {}
    all_headers.update(headers or {})
    if isinstance(body, bytes):
        body = base64.b64encode(body).decode() if encoded else body.decode("latin-1")
    queries = {name: [value] for name, value in query.items()} if query else None
    return rest_v1(body, encoded and isinstance(body, str), all_headers, queries, method)


def url_event(body: bytes, content_type: str, *, method: str = "POST", headers=None) -> dict:
    """A Lambda function URL (v2) proxy event: lower-case headers, method under requestContext.http."""
    return function_url(base64.b64encode(body).decode(), True, {"content-type": content_type, **(headers or {})}, None, method)


def body_of(response: dict) -> dict:
    assert response["headers"]["Content-Type"] == "application/json"
    return json.loads(response["body"])


# --- accepted input forms --------------------------------------------------

def test_a_binary_jpeg_through_api_gateway_gets_the_top_k_labels(aws, invoke, capsys):
    endpoint_answers(ranked(10))
    jpeg = image_bytes()
    response = invoke.handler(rest_event(jpeg, "image/jpeg"), LambdaContext(request_id="abc-123"))

    assert response["statusCode"] == 200
    top = body_of(response)["top_k"]
    assert [item["label"] for item in top] == [f"{i + 1:03d}.Breed_{i}" for i in range(5)]
    assert top[0] == {"label": "001.Breed_0", "probability": 0.5}
    (sent,) = aws
    assert (sent["endpoint"], sent["content_type"], sent["accept"], sent["custom_attributes"]) == (ENDPOINT, "image/jpeg", "application/json", "top_k=5")
    assert sent["body"] == jpeg
    (line,) = log_lines(capsys)
    assert line["request_id"] == "abc-123" and line["status"] == 200 and line["source"] == "body"
    assert line["image_bytes"] == len(jpeg) and line["latency_ms"] >= 0


def test_a_png_through_a_function_url_is_sent_as_png(aws, invoke):
    endpoint_answers(ranked(3))
    png = image_bytes("PNG")
    response = invoke.handler(url_event(png, "image/png"), None)

    assert response["statusCode"] == 200
    assert len(body_of(response)["top_k"]) == 3
    assert aws[0]["content_type"] == "image/png" and aws[0]["body"] == png


def test_json_with_image_base64_and_top_k(aws, invoke):
    endpoint_answers(ranked(10))
    jpeg = image_bytes()
    payload = json.dumps({"image_base64": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode(), "top_k": 2})
    response = invoke.handler(rest_event(payload, "application/json; charset=utf-8", encoded=False), None)

    assert response["statusCode"] == 200
    assert len(body_of(response)["top_k"]) == 2
    assert aws[0]["custom_attributes"] == "top_k=2" and aws[0]["body"] == jpeg


def test_a_direct_invocation_and_the_top_k_setting(aws, invoke, monkeypatch):
    monkeypatch.setenv("TOP_K", "3")
    endpoint_answers(ranked(10))
    response = invoke.handler({"image_base64": base64.b64encode(image_bytes()).decode()}, None)

    assert response["statusCode"] == 200
    assert len(body_of(response)["top_k"]) == 3
    assert "Access-Control-Allow-Origin" not in response["headers"]


@pytest.mark.slow
def test_top_k_from_the_query_string(aws, invoke):
    endpoint_answers(ranked(10))
    response = invoke.handler(rest_event(image_bytes(), "image/jpeg", query={"top_k": "1"}), None)
    assert [item["label"] for item in body_of(response)["top_k"]] == ["001.Breed_0"]


# --- CORS ------------------------------------------------------------------

def test_no_cors_header_unless_an_origin_is_configured(aws, invoke):
    endpoint_answers(ranked())
    response = invoke.handler(rest_event(image_bytes(), "image/jpeg", headers={"Origin": "https://evil.example"}), None)
    assert response["statusCode"] == 200
    assert not any(name.lower().startswith("access-control") for name in response["headers"])


def test_a_configured_origin_is_echoed_and_others_are_not(aws, invoke, monkeypatch):
    monkeypatch.setenv("ALLOWED_ORIGIN", "https://dogs.example, https://admin.dogs.example")
    endpoint_answers(ranked())
    allowed = invoke.handler(rest_event(image_bytes(), "image/jpeg", headers={"Origin": "https://dogs.example"}), None)
    other = invoke.handler(rest_event(image_bytes(), "image/jpeg", headers={"Origin": "https://evil.example"}), None)

    assert allowed["headers"]["Access-Control-Allow-Origin"] == "https://dogs.example"
    assert allowed["headers"]["Vary"] == "Origin"
    assert "Access-Control-Allow-Origin" not in other["headers"]


def test_a_preflight_request_gets_204_with_the_allowed_methods(aws, invoke, monkeypatch):
    monkeypatch.setenv("ALLOWED_ORIGIN", "https://dogs.example")
    response = invoke.handler(url_event(b"", "image/jpeg", method="OPTIONS", headers={"origin": "https://dogs.example"}), None)

    assert response["statusCode"] == 204 and response["body"] == ""
    assert response["headers"]["Access-Control-Allow-Origin"] == "https://dogs.example"
    assert response["headers"]["Access-Control-Allow-Methods"] == "POST, OPTIONS"
    assert aws == []


# --- refusals: 400, 405, 413, 415 -------------------------------------------

@pytest.mark.parametrize(
    ("event", "status", "message"),
    [
        (rest_event(None, "image/jpeg"), 400, "the request has no body"),
        (rest_event("not base64!!", "image/jpeg", encoded=False) | {"isBase64Encoded": True}, 400, "the request body is not valid base64"),
        (rest_event(image_bytes(), "image/jpeg", encoded=False), 400, "binary image bodies must arrive base64-encoded"),
        (rest_event("{\"image_base64\": ", "application/json", encoded=False), 400, "the JSON body cannot be parsed"),
        (rest_event("[1, 2]", "application/json", encoded=False), 400, "the JSON body must be an object"),
        (rest_event("{}", "application/json", encoded=False), 400, "send exactly one of image_base64 and url"),
        (rest_event(json.dumps({"image_base64": "AAAA", "url": "https://x.example/a.jpg"}), "application/json", encoded=False), 400, "send exactly one of image_base64 and url"),
        (rest_event(json.dumps({"image_base64": "%%%"}), "application/json", encoded=False), 400, "image_base64 is not valid base64"),
        (rest_event(json.dumps({"image_base64": 12}), "application/json", encoded=False), 400, "image_base64 must be a string"),
        (rest_event(json.dumps({"image_base64": ""}), "application/json", encoded=False), 400, "the image is empty"),
        (rest_event(json.dumps({"image_base64": "AAAA", "top_k": 0}), "application/json", encoded=False), 400, "top_k must be from 1 to 20, got 0"),
        (rest_event(json.dumps({"image_base64": "AAAA", "top_k": "many"}), "application/json", encoded=False), 400, "top_k must be a whole number from 1 to 20, got 'many'"),
        (rest_event(json.dumps({"url": "http://127.0.0.1/dog.jpg"}), "application/json", encoded=False), 400, "url must start with https://"),
        (rest_event(json.dumps({"url": "https://127.0.0.1/dog.jpg"}), "application/json", encoded=False), 400, "the URL points to an address that is not allowed"),
        (rest_event(json.dumps({"url": "https://[::1]/dog.jpg"}), "application/json", encoded=False), 400, "the URL points to an address that is not allowed"),
        (rest_event(json.dumps({"url": "https://169.254.169.254/latest/meta-data"}), "application/json", encoded=False), 400, "the URL points to an address that is not allowed"),
        (rest_event(json.dumps({"url": "https://user:pw@127.0.0.1/dog.jpg"}), "application/json", encoded=False), 400, "must not carry a user name or password"),
        ({"url": ["https://x.example"]}, 400, "url must be a string"),
        ("a string event", 400, "the event must be a JSON object"),
        (rest_event(image_bytes(), "image/jpeg", method="GET"), 405, "use POST"),
        (rest_event(b"GIF89a" + bytes(40), "image/jpeg"), 415, "the image is neither JPEG nor PNG"),
        (rest_event(image_bytes(), "image/gif"), 415, "unsupported content type 'image/gif'"),
        (rest_event("hello", "text/plain", encoded=False), 415, "unsupported content type 'text/plain'"),
    ],
    ids=lambda value: value if isinstance(value, (int, str)) and len(str(value)) < 40 else None,
)
def test_bad_input_gets_a_short_json_error(aws, invoke, capsys, event, status, message):
    response = invoke.handler(event, LambdaContext())

    assert response["statusCode"] == status
    error = body_of(response)["error"]
    assert message in error
    assert "Traceback" not in response["body"]
    assert aws == []  # nothing reached the endpoint
    (line,) = log_lines(capsys)
    assert line["status"] == status and line["error"] == error


def test_an_image_over_the_size_limit_is_413_in_every_form(aws, invoke, monkeypatch):
    monkeypatch.setenv("MAX_IMAGE_BYTES", "2000")
    big = image_bytes("PNG", size=(200, 200), color=(10, 20, 30))
    big = big + bytes(3000)  # PNG readers ignore trailing bytes; the size is what counts here
    for event in (
        rest_event(big, "image/png"),
        url_event(big, "image/png"),
        {"image_base64": base64.b64encode(big).decode()},
        rest_event(json.dumps({"image_base64": base64.b64encode(big).decode()}), "application/json", encoded=False),
    ):
        response = invoke.handler(event, None)
        assert response["statusCode"] == 413, event
        assert "larger than 2000 bytes" in body_of(response)["error"]
    assert aws == []


def test_the_log_never_holds_the_image(aws, invoke, capsys):
    endpoint_answers(ranked())
    jpeg = image_bytes()
    encoded = base64.b64encode(jpeg).decode()
    invoke.handler({"image_base64": encoded}, None)
    invoke.handler(rest_event(b"\x89PNG\r\n\x1a\n" + b"A" * 600, "image/gif"), None)
    output = capsys.readouterr().out

    assert len(output.splitlines()) == 2
    assert encoded[:40] not in output and "AAAAAAAAAA" not in output


# --- endpoint failures: 502, and the container's own refusals ----------------

@pytest.mark.slow
@pytest.mark.parametrize(
    ("answer", "content_type", "message"),
    [
        ("<html>busy</html>", "text/html", "content type other than JSON"),
        ("{\"predictions\": []}", "application/json", "an answer this function cannot read"),
        ("{\"predictions\": [{\"top_k\": []}]}", "application/json", "returned no predictions"),
        ("not json", "application/json", "an answer this function cannot read"),
    ],
)
def test_an_unreadable_endpoint_answer_is_502(aws, invoke, answer, content_type, message):
    endpoint_answers(answer, content_type)
    response = invoke.handler(rest_event(image_bytes(), "image/jpeg"), None)

    assert response["statusCode"] == 502
    assert message in body_of(response)["error"]


class FakeRuntime(QuietHandler):
    """Answers InvokeEndpoint the way SageMaker does when the model container returns an error."""

    container_status = 400
    container_body = {"error": "the request body: cannot identify image file", "status": 400}

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({
            "ErrorCode": "CLIENT_ERROR_FROM_MODEL" if self.container_status < 500 else "SERVER_ERROR_FROM_MODEL",
            "Message": f"Received error ({self.container_status}) from primary",
            "OriginalMessage": json.dumps(self.container_body),
            "OriginalStatusCode": self.container_status,
            "LogStreamArn": "arn:aws:logs:us-east-1:123456789012:log-group:/aws/sagemaker/Endpoints/x",
        }).encode()
        self.answer(424, "application/json", body,
                    {"x-amzn-ErrorType": "ModelError:http://internal.amazon.com/coral/com.amazon.sagemaker/"})


@pytest.fixture
def fake_runtime(monkeypatch):
    """A local SageMaker runtime that only ever answers ModelError; yields its handler class to configure."""
    class Handler(FakeRuntime):
        pass

    with local_runtime(monkeypatch, Handler):
        yield Handler


@pytest.mark.slow
@pytest.mark.parametrize(("container_status", "expected"), [(400, 400), (413, 413), (415, 415), (500, 502), (406, 502)])
def test_the_container_refusing_the_image_is_passed_on_and_its_failures_are_502(fake_runtime, invoke, container_status, expected):
    fake_runtime.container_status = container_status
    fake_runtime.container_body = {"error": "the request body: cannot identify image file", "status": container_status}
    response = invoke.handler(rest_event(image_bytes(), "image/jpeg"), None)

    assert response["statusCode"] == expected
    error = body_of(response)["error"]
    if expected == 502:
        assert error == "the model endpoint failed to answer; try again later"
    else:
        assert error == "the request body: cannot identify image file"


def test_an_endpoint_that_cannot_be_reached_is_502(invoke, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when the block ends: connections are refused
    use_test_credentials(monkeypatch, runtime_url=f"http://127.0.0.1:{port}")
    response = invoke.handler(rest_event(image_bytes(), "image/jpeg"), None)

    assert response["statusCode"] == 502
    assert body_of(response)["error"] == "the model endpoint cannot be reached; try again later"


def test_a_missing_endpoint_setting_is_500_without_details(invoke, monkeypatch, capsys):
    monkeypatch.delenv("ENDPOINT_NAME")
    response = invoke.handler(rest_event(image_bytes(), "image/jpeg"), None)

    assert response["statusCode"] == 500
    assert body_of(response) == {"error": "the function is not configured correctly"}
    assert any("ENDPOINT_NAME" in line.get("detail", "") for line in log_lines(capsys))


# --- fetching image URLs: a local HTTPS server with a certificate from a CA made here -----

JPEG = image_bytes()


class ImageSite(QuietHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/dog.jpg":
            self.answer(200, "image/jpeg", JPEG)
        elif self.path == "/dog.png":
            self.answer(200, "image/png", image_bytes("PNG"))
        elif self.path == "/page.html":
            self.answer(200, "text/html; charset=utf-8", b"<html>a dog</html>")
        elif self.path == "/big.jpg":
            self.answer(200, "image/jpeg", JPEG + bytes(5000))
        elif self.path == "/big-unannounced.jpg":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()  # no Content-Length: the body runs until the connection closes
            self.wfile.write(JPEG + bytes(5000))
            self.close_connection = True
        elif self.path == "/slow.jpg":
            time.sleep(1.5)
            self.answer(200, "image/jpeg", JPEG)
        elif self.path == "/to-http":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1/dog.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/to-dog":
            self.send_response(302)
            self.send_header("Location", "/dog.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.answer(404, "text/plain", b"not found")


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up (the timeout test) closes mid-answer; that is expected


@pytest.fixture(scope="module")
def image_site(tmp_path_factory):
    """(base URL, SSL context that trusts the site) of a local HTTPS image server."""
    ca, cert, key = make_certificates(tmp_path_factory.mktemp("tls"), ("127.0.0.1",))
    server = QuietServer(("127.0.0.1", 0), ImageSite)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_port}", ssl.create_default_context(cafile=str(ca))
    server.shutdown()
    server.server_close()


def fetch(invoke, image_site, path: str, **options):
    base, trusted = image_site
    arguments = {"max_bytes": 4000, "timeout": 1.0, "ssl_context": trusted, "allow_private_addresses": True, **options}
    return invoke.fetch_image(base + path, **arguments)


def test_an_https_image_url_is_fetched(invoke, image_site):
    assert fetch(invoke, image_site, "/dog.jpg") == (JPEG, "image/jpeg")
    assert fetch(invoke, image_site, "/dog.png")[1] == "image/png"
    assert fetch(invoke, image_site, "/to-dog") == (JPEG, "image/jpeg")


@pytest.mark.parametrize(
    ("path", "options", "status", "message"),
    [
        ("/page.html", {}, 415, "the URL did not answer with a JPEG or PNG image"),
        ("/big.jpg", {}, 413, "the image is larger than 4000 bytes"),
        ("/big-unannounced.jpg", {}, 413, "the image is larger than 4000 bytes"),
        ("/slow.jpg", {"timeout": 0.3}, 400, "the download took longer than 0.3 s"),
        ("/missing", {}, 400, "the URL answered HTTP 404"),
        ("/to-http", {}, 400, "the URL could not be fetched"),  # a redirect to plain http
        ("/dog.jpg", {"ssl_context": None}, 400, "the URL could not be fetched"),  # the default trust store does not know the site
        ("/dog.jpg", {"allow_private_addresses": False}, 400, "the URL points to an address that is not allowed"),
    ],
)
def test_an_image_url_is_refused_when_it_cannot_be_trusted(invoke, image_site, path, options, status, message):
    started = time.monotonic()
    with pytest.raises(invoke.HttpError) as refusal:
        fetch(invoke, image_site, path, **options)
    assert refusal.value.status == status
    assert message in refusal.value.message
    assert time.monotonic() - started < 1.2

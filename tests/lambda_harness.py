"""What the Lambda tests share: loading a handler the way Lambda does, moto set-up, a Lambda context,
local HTTP servers in place of AWS and the internet, and the handlers' log lines.

``lambda`` is a Python keyword, so the handlers are loaded by path with their
folder on ``sys.path`` (the Lambda runtime puts the zip root there too). Each
test loads them afresh, so boto3 clients cached by a handler never outlive the
moto mock they were made under.
"""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping

import boto3
import pytest

from pipeline.local.http_server import LoopbackServer
from sources import LAMBDA_DIR

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
SHARED_MODULES = ("events", "proxy_events", "url_fetch")


def load_handler(name: str) -> ModuleType:
    """A fresh copy of ``lambda/<name>.py`` and of the modules it shares with the other handlers."""
    if str(LAMBDA_DIR) not in sys.path:
        sys.path.insert(0, str(LAMBDA_DIR))
    for module in (*SHARED_MODULES, name):
        sys.modules.pop(module, None)
    spec = importlib.util.spec_from_file_location(name, LAMBDA_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class LambdaContext:
    """The two members of the Lambda runtime's context object that the handlers read."""

    def __init__(self, budget_seconds: float = 60.0, request_id: str = "req-0001") -> None:
        self._deadline = time.monotonic() + budget_seconds
        self.aws_request_id = request_id

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def use_test_credentials(monkeypatch: pytest.MonkeyPatch, *, endpoint_url: str = "", runtime_url: str = "") -> None:
    """Fake credentials and the test region for every boto3 client, so nothing can reach a real account.

    ``endpoint_url`` sends every service to one server (moto's), ``runtime_url``
    only the SageMaker runtime; with neither, the clients are left to ``mock_aws``.
    """
    for variable in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SAGEMAKER", "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(variable, "testing")
    if endpoint_url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint_url)
    if runtime_url:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", runtime_url)


@contextlib.contextmanager
def moto_in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from moto import mock_aws

    use_test_credentials(monkeypatch)
    with mock_aws():
        yield


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch):
    """moto in-process, with fake credentials so nothing can reach a real account."""
    with moto_in_process(monkeypatch):
        yield


@pytest.fixture
def aws_taking_images(monkeypatch: pytest.MonkeyPatch):
    """moto, with a SageMaker runtime that takes the images sent to it (see runtime_takes_images); yields what it received."""
    received = runtime_taking_images(monkeypatch)
    with moto_in_process(monkeypatch):
        yield received


_trained = itertools.count(1)


def model_package(status: str = "Approved", group: str = "dogbreed-models", model_data_url: str = "") -> str:
    """A registered model package (in moto) with the given approval status; returns its ARN.

    Each package serves a model.tar.gz of its own (as each training job writes one) unless ``model_data_url`` is given.
    """
    model_data_url = model_data_url or f"s3://bucket/jobs/train-{next(_trained)}/output/model.tar.gz"
    sagemaker = boto3.client("sagemaker", region_name=REGION)
    try:
        sagemaker.create_model_package_group(ModelPackageGroupName=group)
    except sagemaker.exceptions.ClientError:
        pass  # the group exists from an earlier package in the same test
    return sagemaker.create_model_package(
        ModelPackageGroupName=group,
        ModelApprovalStatus=status,
        InferenceSpecification={
            "Containers": [{"Image": f"763104351884.dkr.ecr.{REGION}.amazonaws.com/pytorch-inference:2.6-cpu-py312", "ModelDataUrl": model_data_url}],
            "SupportedContentTypes": ["image/jpeg", "image/png"],
            "SupportedResponseMIMETypes": ["application/json"],
        },
    )["ModelPackageArn"]


def sagemaker_backend() -> Any:
    from moto.sagemaker.models import sagemaker_backends

    return sagemaker_backends[ACCOUNT][REGION]


@pytest.fixture
def update_endpoint_in_moto(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Teach moto's SageMaker the UpdateEndpoint call it lacks; returns the requests it received.

    The stand-in does what SageMaker ends with after a successful update: the
    endpoint serves the new config's variants and is InService, and describes
    the update's DeploymentConfig as its LastDeploymentConfig.
    """
    from moto.sagemaker.models import FakeEndpoint
    from moto.sagemaker.responses import SageMakerResponse

    received: list[dict[str, Any]] = []

    def update_endpoint(self: SageMakerResponse) -> str:
        params = json.loads(self.body)
        received.append(params)
        backend = self.sagemaker_backend
        endpoint = backend.endpoints[params["EndpointName"]]
        config = backend.describe_endpoint_config(params["EndpointConfigName"])
        endpoint.endpoint_config_name = params["EndpointConfigName"]
        endpoint.production_variants = FakeEndpoint._process_production_variants(endpoint, config["ProductionVariants"])
        endpoint.endpoint_status = "InService"
        if "DeploymentConfig" in params:
            endpoint.last_deployment_config = params["DeploymentConfig"]
        return json.dumps({"EndpointArn": endpoint.arn})

    monkeypatch.setattr(SageMakerResponse, "update_endpoint", update_endpoint, raising=False)
    return received


STEPS_PAGE = 10


class ExecutionSteps(dict):
    """execution ARN -> its steps (ListPipelineExecutionSteps' PipelineExecutionStep members, StartTime a datetime)."""


@pytest.fixture
def execution_steps_in_moto(monkeypatch: pytest.MonkeyPatch) -> ExecutionSteps:
    """Teach moto's SageMaker the ListPipelineExecutionSteps call it lacks, answered from the returned table.

    Each step is checked against botocore's PipelineExecutionStep shape before it
    is sent (a test cannot hand the handler a field SageMaker never sends); the
    execution must exist in moto, else ResourceNotFound as SageMaker answers;
    SortOrder orders by StartTime (Descending by default, as the API reference says); pages hold MaxResults
    steps (STEPS_PAGE by default) and end with a NextToken while more remain.
    """
    from botocore.validate import ParamValidator
    from moto.sagemaker.responses import SageMakerResponse

    from pipeline.constraints import named_shape

    table = ExecutionSteps()
    shape = named_shape("sagemaker", "PipelineExecutionStep")

    def list_pipeline_execution_steps(self: SageMakerResponse):
        params = json.loads(self.body)
        arn = params["PipelineExecutionArn"]
        try:
            self.sagemaker_backend.describe_pipeline_execution(arn)
        except Exception:
            return 400, {}, json.dumps({"__type": "ResourceNotFound", "message": f"Pipeline execution {arn} does not exist"})
        steps = sorted(table.get(arn, []), key=lambda step: step["StartTime"], reverse=params.get("SortOrder") != "Ascending")
        start = int(params.get("NextToken") or 0)
        end = start + params.get("MaxResults", STEPS_PAGE)
        for step in steps[start:end]:
            report = ParamValidator().validate(step, shape)
            assert not report.has_errors(), report.generate_report()
        answer = [{**step, **{key: step[key].timestamp() for key in ("StartTime", "EndTime") if key in step}} for step in steps[start:end]]
        return json.dumps({"PipelineExecutionSteps": answer, **({"NextToken": str(end)} if end < len(steps) else {})})

    monkeypatch.setattr(SageMakerResponse, "list_pipeline_execution_steps", list_pipeline_execution_steps, raising=False)
    return table


@pytest.fixture
def tuning_trials_in_moto(monkeypatch: pytest.MonkeyPatch) -> None:
    """Teach moto's SageMaker the ListTrainingJobsForHyperParameterTuningJob call it lacks.

    A tuning job's trials are the training jobs in moto named ``<tuning job>-<NNN>-<suffix>``, as SageMaker
    names them; the answer filters them by StatusEquals, sorts them (SortBy CreationTime or Name, SortOrder),
    keeps MaxResults, and is checked against botocore's HyperParameterTrainingJobSummary shape. A tuning job
    moto does not know is ResourceNotFound.
    """
    from botocore.validate import ParamValidator
    from moto.sagemaker.responses import SageMakerResponse

    from pipeline.constraints import named_shape

    shape = named_shape("sagemaker", "HyperParameterTrainingJobSummary")

    def list_training_jobs_for_hyper_parameter_tuning_job(self: SageMakerResponse):
        params = json.loads(self.body)
        tuning = params["HyperParameterTuningJobName"]
        backend = self.sagemaker_backend
        if tuning not in backend.hyper_parameter_tuning_jobs:
            return 400, {}, json.dumps({"__type": "ResourceNotFound", "message": f"Amazon SageMaker can't find a tuning job with name {tuning}"})
        trials = [job for name, job in backend.training_jobs.items() if name.startswith(f"{tuning}-")
                  and params.get("StatusEquals") in (None, job.training_job_status)]
        by_name = params.get("SortBy") == "Name"
        trials.sort(key=lambda job: job.training_job_name if by_name else job.creation_time, reverse=params.get("SortOrder") == "Descending")
        summaries = []
        for job in trials[: params.get("MaxResults", 10)]:
            summary = {"TrainingJobName": job.training_job_name, "TrainingJobArn": job.arn, "TuningJobName": tuning,
                       "CreationTime": job.creation_time, "TrainingJobStatus": job.training_job_status,
                       "TunedHyperParameters": job.hyper_parameters or {}}
            if getattr(job, "failure_reason", None):
                summary["FailureReason"] = job.failure_reason
            report = ParamValidator().validate(summary, shape)
            assert not report.has_errors(), report.generate_report()
            summaries.append({**summary, "CreationTime": job.creation_time.timestamp()})
        return json.dumps({"TrainingJobSummaries": summaries})

    monkeypatch.setattr(SageMakerResponse, "list_training_jobs_for_hyper_parameter_tuning_job",
                        list_training_jobs_for_hyper_parameter_tuning_job, raising=False)


@pytest.fixture
def runtime_takes_images(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Let moto's SageMaker runtime take binary bodies; returns the requests it received."""
    return runtime_taking_images(monkeypatch)


def runtime_taking_images(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Let moto's SageMaker runtime take binary bodies; returns the requests it received.

    moto decodes every request body as UTF-8, so a JPEG crashes it before the
    call is answered: this keeps the body as bytes, records it, and hands moto a
    base64 text of it to key its answer cache on.
    """
    import base64

    from moto.sagemakerruntime.responses import SageMakerRuntimeResponse

    received: list[dict[str, Any]] = []
    answer = SageMakerRuntimeResponse.invoke_endpoint

    def invoke_endpoint(self: SageMakerRuntimeResponse):
        raw = self.body if isinstance(self.body, bytes) else str(self.body).encode()
        received.append({
            "endpoint": self.path.split("/")[2],
            "content_type": self.headers.get("Content-Type"),
            "accept": self.headers.get("Accept"),
            "custom_attributes": self.headers.get("X-Amzn-SageMaker-Custom-Attributes"),
            "body": raw,
        })
        self.body = base64.b64encode(raw).decode()
        return answer(self)

    monkeypatch.setattr(SageMakerRuntimeResponse, "use_raw_body", True, raising=False)
    monkeypatch.setattr(SageMakerRuntimeResponse, "invoke_endpoint", invoke_endpoint)
    return received


def endpoint_answers(body: Any, content_type: str = "application/json") -> None:
    """Queue the next answer moto's SageMaker runtime gives to InvokeEndpoint."""
    from moto.sagemakerruntime.models import sagemakerruntime_backends

    text = body if isinstance(body, str) else json.dumps(body)
    sagemakerruntime_backends[ACCOUNT][REGION].results_queue.append((text, content_type, "AllTraffic", ""))


# --- events as AWS's integrations send them to the invoke function ------------
# The shapes of the Lambda developer guide's samples (what ``sam local generate-event`` renders).

def rest_v1(body: str | None, encoded: bool, headers: dict[str, str], query: dict[str, list[str]] | None, method: str = "POST") -> dict:
    """API Gateway REST API, Lambda proxy integration (payload 1.0)."""
    return {
        "resource": "/predict", "path": "/predict", "httpMethod": method,
        "headers": {"Accept": "*/*", "Host": "abc123.execute-api.us-east-1.amazonaws.com", "User-Agent": "curl/8.5.0",
                    "X-Forwarded-For": "198.51.100.7", "X-Forwarded-Port": "443", "X-Forwarded-Proto": "https", **headers},
        "multiValueHeaders": {"Accept": ["*/*"], "Host": ["abc123.execute-api.us-east-1.amazonaws.com"], "User-Agent": ["curl/8.5.0"],
                              "X-Forwarded-For": ["198.51.100.7"], "X-Forwarded-Port": ["443"], "X-Forwarded-Proto": ["https"],
                              **{name: [value] for name, value in headers.items()}},
        "queryStringParameters": {name: values[-1] for name, values in query.items()} if query else None,
        "multiValueQueryStringParameters": query or None,
        "pathParameters": None, "stageVariables": None,
        "requestContext": {
            "resourceId": "2gxmpl", "resourcePath": "/predict", "httpMethod": method, "extendedRequestId": "JJbxmplHYosFVYQ=",
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
        account: str, method: str) -> dict:
    raw_query = "&".join(f"{name}={value}" for name, values in (query or {}).items() for value in values)
    event = {
        "version": "2.0", "routeKey": route, "rawPath": "/predict" if route != "$default" else "/", "rawQueryString": raw_query,
        "headers": {"accept": "*/*", "content-length": str(len(body)), "host": domain, "user-agent": "curl/8.5.0",
                    "x-amzn-trace-id": "Root=1-5e6722a7-cc56xmpl46db7ae02d4da47e", "x-forwarded-for": "198.51.100.7",
                    "x-forwarded-port": "443", "x-forwarded-proto": "https", **{name.lower(): value for name, value in headers.items()}},
        "requestContext": {
            "accountId": account, "apiId": domain.split(".")[0], "domainName": domain, "domainPrefix": domain.split(".")[0],
            "http": {"method": method, "path": "/predict" if route != "$default" else "/", "protocol": "HTTP/1.1",
                     "sourceIp": "198.51.100.7", "userAgent": "curl/8.5.0"},
            "requestId": "JKJaXmPLvHcESHA=", "routeKey": route, "stage": "$default",
            "time": "10/Mar/2020:05:16:23 +0000", "timeEpoch": 1583817383220,
        },
        "body": body, "isBase64Encoded": encoded,
    }
    if query:  # v2 joins repeated parameters with commas
        event["queryStringParameters"] = {name: ",".join(values) for name, values in query.items()}
    return event


def http_api_v2(body: str, encoded: bool, headers: dict[str, str], query: dict[str, list[str]] | None, method: str = "POST") -> dict:
    """API Gateway HTTP API (payload 2.0)."""
    return _v2(body, encoded, headers, query, "r3pmxmplak.execute-api.us-east-2.amazonaws.com", f"{method} /predict", "123456789012", method)


def function_url(body: str, encoded: bool, headers: dict[str, str], query: dict[str, list[str]] | None, method: str = "POST") -> dict:
    """A Lambda function URL (payload 2.0, accountId 'anonymous' without IAM auth)."""
    return _v2(body, encoded, headers, query, "a1b2c3d4e5f6g7h8.lambda-url.us-east-1.on.aws", "$default", "anonymous", method)


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


def changed(event: Mapping[str, Any], change: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``event`` with ``change`` applied: a field changed to None is left out."""
    edited = dict(event)
    for key, value in change.items():
        if value is None:
            edited.pop(key)
        else:
            edited[key] = value
    return edited


def log_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """The JSON log lines written on stdout since the last read."""
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


# --- local HTTP servers: a SageMaker runtime, an image site ------------------

class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that answers with ``answer`` and keeps http.server's access log off the test output."""

    def answer(self, status: int, content_type: str, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def local_runtime(monkeypatch: pytest.MonkeyPatch, handler: type[BaseHTTPRequestHandler]) -> Iterator[LoopbackServer]:
    """A SageMaker runtime on 127.0.0.1 that answers with ``handler``: the endpoint every sagemaker-runtime client calls."""
    server = LoopbackServer(handler, "test-sagemaker-runtime")
    use_test_credentials(monkeypatch, runtime_url=server.url)
    try:
        yield server
    finally:
        server.stop()


# --- a network for the URL fetcher: only loopback, with public addresses routed to local servers -----

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class NetworkGuard:
    """Replaces socket.socket.connect: loopback goes through, routed public addresses go to a local port,
    and every other connection is refused before it leaves the machine (and recorded)."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, int], int] = {}
        self.connections: list[tuple[str, int]] = []  # what the code under test asked for, routed or not
        self.refused: list[tuple[str, int]] = []

    def route(self, public_address: str, port: int, local_port: int) -> None:
        self.routes[(public_address, port)] = local_port

    def connect(self, original, sock, address) -> Any:  # noqa: ANN001 - socket's signature
        if not isinstance(address, tuple):
            return original(sock, address)  # a Unix socket
        host, port = str(address[0]), int(address[1])
        self.connections.append((host, port))
        if (host, port) in self.routes:
            target = ("127.0.0.1", self.routes[(host, port)]) if sock.family == socket.AF_INET else ("::1", self.routes[(host, port)], 0, 0)
            return original(sock, target)
        if host in LOOPBACK_HOSTS:
            return original(sock, address)
        self.refused.append((host, port))
        raise ConnectionRefusedError(f"the test network refuses {host}:{port} (only loopback and routed addresses)")

    @property
    def outside_attempts(self) -> list[tuple[str, int]]:
        """Connections to anything but loopback and the routed public addresses."""
        return list(self.refused)


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> NetworkGuard:
    guard = NetworkGuard()
    original = socket.socket.connect

    def connect(sock, address):  # noqa: ANN001
        return guard.connect(original, sock, address)

    def connect_ex(sock, address):  # noqa: ANN001
        try:
            connect(sock, address)
            return 0
        except OSError as error:
            return error.errno or 111

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return guard


def make_certificates(folder: Path, names: tuple[str, ...]) -> tuple[Path, Path, Path]:
    """A CA (its PEM is the trust store for SSL_CERT_FILE) and a server certificate it signed for ``names``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(hours=2))

    def build(subject: str, issuer: x509.Name, public_key, signing_key, extensions) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(validity[0]).not_valid_after(validity[1]))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dogbreed test CA")])
    ca = build("dogbreed test CA", ca_name, ca_key.public_key(), ca_key, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False), True),
        (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
    ])
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names = [x509.IPAddress(ipaddress.ip_address(name)) if name[0].isdigit() else x509.DNSName(name) for name in names]
    leaf = build(names[0], ca_name, key.public_key(), ca_key, [
        (x509.SubjectAlternativeName(alt_names), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
    ])
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "server.pem", folder / "server-key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_path, cert_path, key_path


Behaviour = Callable[[socket.socket, str], None]


class Site:
    """A server on 127.0.0.1 that runs ``behaviour(connection, request_head)`` per connection, TLS unless told."""

    def __init__(self, behaviour: Behaviour, certificates=None, tls: bool = True, handshake: bool = True) -> None:
        self.behaviour, self.tls, self.handshake = behaviour, tls, handshake
        self.requests: list[str] = []
        self.server_names: list[str | None] = []
        self.stopped = threading.Event()
        self.context = None
        if tls:
            _, cert, key = certificates
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(cert, key)
            self.context.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            connection.settimeout(10)
            if not self.handshake:
                self.stopped.wait(10)  # accepts, then never says a word
                return
            if self.tls:
                connection = self.context.wrap_socket(connection, server_side=True)
            head = b""
            while b"\r\n\r\n" not in head and not (head and not self.tls):  # plain: answer whatever arrives
                chunk = connection.recv(4096)
                if not chunk:
                    return
                head += chunk
            self.requests.append(head.decode("latin-1"))
            self.behaviour(connection, head.decode("latin-1"))
        except (OSError, ssl.SSLError):
            pass  # the client gave up: that is what most of these tests want
        finally:
            connection.close()

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()

"""The endpoints' data plane on 127.0.0.1: SageMaker's runtime API in front of model containers.

``RuntimeServer`` answers ``POST /endpoints/<name>/invocations`` as the
``sagemaker-runtime`` InvokeEndpoint API does (point boto3 at it with
``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``). It finds what the endpoint serves
through the control plane (moto): endpoint -> endpoint config -> model ->
model package -> container (``ModelDataUrl`` and ``Environment``), and sends
the request to that model's container.

``ModelContainer`` is the inference container contract: ``GET /ping`` and
``POST /invocations`` on a port of its own. It unpacks ``model.tar.gz`` into
its ``/opt/ml/model`` and serves it with the PyTorch inference container's own
Python stack (``pipeline/local/torchserve.py``): ``sagemaker-pytorch-inference``'s
``HandlerService`` on ``sagemaker-inference``'s ``Transformer``, loaded and
driven by TorchServe's worker code, which imports ``SAGEMAKER_PROGRAM`` from
``/opt/ml/model/code``, calls ``model_fn`` once and ``input_fn``,
``predict_fn`` and ``output_fn`` per request, with TorchServe's request context
(headers, CustomAttributes included). TorchServe's Java front end is not started.
"""
from __future__ import annotations

import json
import logging
import shutil
import tarfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import unquote, urlsplit

from pipeline.local.containers import rewrite_opt_ml
from pipeline.local.torchserve import ModelWorker
from pipeline.local.references import LocalRunError
from pipeline.local.s3 import LocalS3

CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
FORWARDED_HEADERS = ("Content-Type", "Accept", CUSTOM_ATTRIBUTES)
MAX_BODY_BYTES = 6 * 1024 * 1024
LOG = logging.getLogger("dogbreed.local.endpoint")


# ---------------------------------------------------------------- the container

_serving = threading.local()  # the container whose worker this thread is running


class _ContainerLog(logging.Handler):
    """Log records of an inference script go to the log of the container that runs it, as its worker's stdout would."""

    def emit(self, record: logging.LogRecord) -> None:
        container = getattr(_serving, "container", None)
        if container is not None:
            container.log(self.format(record))


_CONTAINER_LOG = _ContainerLog()


def script_logger(program: str) -> logging.Logger:
    """The logger of the script the toolkit imports by module name (``inference`` for inference.py)."""
    logger = logging.getLogger(program[:-3] if program.endswith(".py") else program)
    if _CONTAINER_LOG not in logger.handlers:
        logger.addHandler(_CONTAINER_LOG)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def model_worker(model_dir: Path, environment: Mapping[str, str]) -> ModelWorker:
    """The served model, as the container's TorchServe worker loads it from ``/opt/ml/model``."""
    program = environment.get("SAGEMAKER_PROGRAM", "inference.py")
    code_dir = model_dir / "code"  # where the PyTorch container imports SAGEMAKER_PROGRAM from
    if not (code_dir / program).is_file():
        raise LocalRunError(f"the model's inference script {code_dir / program} does not exist (SAGEMAKER_PROGRAM={program}); "
                            "the PyTorch inference container imports it from code/ in model.tar.gz")
    try:
        return ModelWorker(model_dir, code_dir, environment)
    except ImportError as error:
        raise LocalRunError(f"the endpoint needs the SageMaker inference toolkits ({error}): pip install -e '.[dev]'") from None


class ModelContainer:
    """One model served under the inference container contract."""

    def __init__(self, root: Path, model_archive: Path, environment: Mapping[str, str]) -> None:
        self.root = root
        self._lock_log = threading.Lock()
        self.model_dir = root / "opt" / "ml" / "model"
        self.environment = rewrite_opt_ml(dict(environment), root)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(model_archive, "r:gz") as tar:
            tar.extractall(self.model_dir, filter="data")
        script_logger(self.environment.get("SAGEMAKER_PROGRAM", "inference.py"))
        self._lock = threading.Lock()
        with self._serving():
            self.worker = model_worker(self.model_dir, self.environment)
        self.server: ThreadingHTTPServer | None = None
        self.url = ""
        self.variant = "AllTraffic"

    def invoke(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes, str]:
        """(status, body, Content-Type) of one request, as the container's worker answers it (one at a time)."""
        with self._lock, self._serving():
            return self.worker.invoke(body, headers)

    @contextmanager
    def _serving(self) -> Iterator[None]:
        _serving.container = self
        try:
            yield
        finally:
            _serving.container = None

    def log(self, text: str) -> None:
        with self._lock_log, open(self.root / "container.log", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")

    def serve(self) -> str:
        """Start answering GET /ping and POST /invocations on a free loopback port; returns the URL."""
        container = self

        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                if urlsplit(self.path).path == "/ping":
                    self.answer(200, b"", "text/plain")
                else:
                    self.answer(404, b'{"error": "not found"}', "application/json")

            def do_POST(self) -> None:
                parts = urlsplit(self.path)
                if parts.path != "/invocations":
                    self.answer(404, b'{"error": "not found"}', "application/json")
                    return
                body = self.read_body()
                if body is None:
                    return
                headers = {name: self.headers[name] for name in FORWARDED_HEADERS if self.headers.get(name) is not None}
                self.answer(*container.invoke(body, headers))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="model-container", daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        """Stop serving and drop the unpacked model (the endpoint's instance goes away; its log stays)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        shutil.rmtree(self.model_dir, ignore_errors=True)


class _QuietHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("%s " + format, self.address_string(), *args)

    def read_body(self) -> bytes | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.answer(413, json.dumps({"error": f"the body is {length} bytes, above {MAX_BODY_BYTES}"}).encode(), "application/json")
            return None
        return self.rfile.read(length) if length else b""

    def answer(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            LOG.debug("the client left before the answer was sent")


# ---------------------------------------------------------------- the runtime API

class EndpointNotFound(LocalRunError):
    pass


class RuntimeServer:
    """``POST /endpoints/<name>/invocations`` in front of one model container per endpoint config."""

    def __init__(self, sagemaker: Any, s3: LocalS3, root: Path, log_path: Path) -> None:
        self.sagemaker = sagemaker  # a boto3 SageMaker client of the control plane (moto)
        self.s3 = s3
        self.root = root
        self.log_path = log_path
        self.containers: dict[tuple[str, str], ModelContainer] = {}
        self.invocations: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.url = ""

    def __enter__(self) -> "RuntimeServer":
        runtime = self

        class Handler(_QuietHandler):
            def do_POST(self) -> None:
                parts = [unquote(part) for part in urlsplit(self.path).path.split("/")]
                if len(parts) != 4 or parts[1] != "endpoints" or parts[3] != "invocations":
                    self.answer(404, b'{"message": "unknown operation"}', "application/json",
                                {"x-amzn-ErrorType": "UnknownOperationException"})
                    return
                body = self.read_body()
                if body is None:
                    return
                headers = {name: self.headers[name] for name in FORWARDED_HEADERS if self.headers.get(name) is not None}
                self.answer(*runtime.invoke(parts[2], body, headers))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="sagemaker-runtime", daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        for container in self.containers.values():
            container.stop()

    def invoke(self, endpoint: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes, str, dict[str, str]]:
        started = time.perf_counter()
        try:
            container, variant = self.container_for(endpoint)
        except EndpointNotFound as error:
            return self._error(400, "ValidationError", str(error), endpoint, started)
        except Exception as error:
            self._write_log(f"endpoint {endpoint} cannot start its model:\n{traceback.format_exc()}")
            return self._error(500, "InternalFailure", f"endpoint {endpoint} could not load its model: {error}", endpoint, started)
        status, payload, content_type = self._forward(container, body, headers)
        if status != 200:
            message = (f"Received client error ({status}) from primary with message \"{payload.decode(errors='replace')}\". "
                       f"See the endpoint log {self.log_path}.")
            document = {"ErrorCode": "CLIENT_ERROR_FROM_MODEL", "Message": message, "OriginalStatusCode": status,
                        "OriginalMessage": payload.decode(errors="replace")}
            self._record(endpoint, status, started, headers)
            return 424, json.dumps(document).encode(), "application/json", {"x-amzn-ErrorType": "ModelError"}
        self._record(endpoint, status, started, headers)
        return 200, payload, content_type, {"x-Amzn-Invoked-Production-Variant": variant}

    def _forward(self, container: ModelContainer, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes, str]:
        request = urllib.request.Request(f"{container.url}/invocations", data=body, method="POST", headers=dict(headers))
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            return error.code, error.read(), error.headers.get("Content-Type", "")

    def _error(self, status: int, code: str, message: str, endpoint: str, started: float) -> tuple[int, bytes, str, dict[str, str]]:
        self._record(endpoint, status, started, {})
        return status, json.dumps({"message": message}).encode(), "application/json", {"x-amzn-ErrorType": code}

    def _record(self, endpoint: str, status: int, started: float, headers: Mapping[str, str]) -> None:
        entry = {"endpoint": endpoint, "status": status, "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                 "content_type": headers.get("Content-Type", "")}
        with self._lock:
            self.invocations.append(entry)
        self._write_log(json.dumps({"time": round(time.time(), 3), **entry}))

    def _write_log(self, text: str) -> None:
        with self._log_lock:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as log:
                log.write(text + "\n")

    def start_containers(self) -> None:
        """Bring up the containers of every endpoint moto knows, as CreateEndpoint/UpdateEndpoint do.

        A model that cannot load is written to the log; invoking its endpoint then answers the error.
        """
        for endpoint in self.sagemaker.list_endpoints().get("Endpoints", []):
            try:
                self.container_for(endpoint["EndpointName"])
            except Exception:
                self._write_log(f"endpoint {endpoint['EndpointName']} cannot start its model:\n{traceback.format_exc()}")

    def container_for(self, endpoint: str) -> tuple[ModelContainer, str]:
        """The running container of the endpoint's current config, started on first use."""
        description = self._describe(lambda: self.sagemaker.describe_endpoint(EndpointName=endpoint), endpoint)
        config_name = description["EndpointConfigName"]
        with self._lock:
            key = (endpoint, config_name)
            if key not in self.containers:
                config = self.sagemaker.describe_endpoint_config(EndpointConfigName=config_name)
                variant = config["ProductionVariants"][0]
                archive, environment = self.model_source(variant["ModelName"])
                container = ModelContainer(self.root / endpoint / config_name, archive, environment)
                container.serve()
                container.variant = variant["VariantName"]
                self.containers[key] = container
            container = self.containers[key]
        return container, container.variant

    def _describe(self, call: Callable[[], Any], endpoint: str) -> Any:
        try:
            return call()
        except Exception as error:
            message = getattr(error, "response", {}).get("Error", {}).get("Message", str(error))
            raise EndpointNotFound(f"Endpoint {endpoint} not found ({message})") from None

    def model_source(self, model_name: str) -> tuple[Path, dict[str, str]]:
        """model.tar.gz and container environment of a model, through its model package when it has one."""
        model = self.sagemaker.describe_model(ModelName=model_name)
        container = (model.get("Containers") or [model.get("PrimaryContainer") or {}])[0]
        if container.get("ModelPackageName"):
            package = self.sagemaker.describe_model_package(ModelPackageName=container["ModelPackageName"])
            specification = package["InferenceSpecification"]["Containers"][0]
            uri, environment = specification.get("ModelDataUrl"), dict(specification.get("Environment") or {})
            environment.update(container.get("Environment") or {})
        else:
            uri, environment = container.get("ModelDataUrl"), dict(container.get("Environment") or {})
        if not uri:
            raise LocalRunError(f"model {model_name} has no ModelDataUrl")
        archive = self.s3.path(uri)
        if not archive.is_file():
            raise LocalRunError(f"model {model_name}: {uri} does not exist (local file {archive})")
        return archive, environment

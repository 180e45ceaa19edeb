"""The endpoints' data plane on 127.0.0.1: SageMaker's runtime API in front of model containers.

``RuntimeServer`` answers ``POST /endpoints/<name>/invocations`` as the
``sagemaker-runtime`` InvokeEndpoint API does (point boto3 at it with
``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``). It finds what the endpoint serves
through the control plane (moto): endpoint -> endpoint config -> model ->
model package -> container (``ModelDataUrl`` and ``Environment``), and sends
the request to that model's container.

``ModelContainer`` is the inference container contract: ``GET /ping`` and
``POST /invocations`` on a port of its own. It unpacks ``model.tar.gz`` into
its ``/opt/ml/model``, imports ``SAGEMAKER_PROGRAM`` from
``SAGEMAKER_SUBMIT_DIRECTORY`` and serves it as the SageMaker inference
toolkit does: ``model_fn`` once, then ``input_fn``, ``predict_fn`` and
``output_fn`` per request, with a request context that carries the headers
(CustomAttributes included) and takes the response status. A request with a
query string goes to the script's ``handle(body, content_type, accept, query,
model)`` instead, when it has one.
"""
from __future__ import annotations

import inspect
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
from types import ModuleType
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

from pipeline.local.containers import rewrite_opt_ml
from pipeline.local.modules import module_from_folder
from pipeline.local.references import LocalRunError
from pipeline.local.s3 import LocalS3

CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
FORWARDED_HEADERS = ("Content-Type", "Accept", CUSTOM_ATTRIBUTES)
MAX_BODY_BYTES = 6 * 1024 * 1024
LOG = logging.getLogger("dogbreed.local.endpoint")


# ---------------------------------------------------------------- the container

class _RequestProperties:
    def __init__(self, headers: Mapping[str, str]) -> None:
        self._headers = dict(headers)

    def get_request_properties(self) -> dict[str, str]:
        return dict(self._headers)


class RequestContext:
    """What the inference toolkit hands the handler functions: request headers in, response status out."""

    def __init__(self, headers: Mapping[str, str]) -> None:
        self.request_processor = [_RequestProperties(headers)]
        self.status = 200
        self.phrase = ""

    def set_response_status(self, code: int = 200, phrase: str = "") -> None:
        self.status, self.phrase = int(code), phrase


def import_script(code_dir: Path, program: str) -> ModuleType:
    """``code_dir/program`` imported under a name of its own, its sibling modules from ``code_dir``."""
    path = code_dir / program
    if not path.is_file():
        raise LocalRunError(f"the model's inference script {path} does not exist (SAGEMAKER_PROGRAM={program})")
    return module_from_folder(code_dir, path, f"dogbreed_endpoint_{abs(hash(str(path)))}")


def _takes_context(function: Callable) -> bool:
    try:
        return len(inspect.signature(function).parameters) >= 3
    except (TypeError, ValueError):
        return False


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
        program = self.environment.get("SAGEMAKER_PROGRAM", "inference.py")
        code_dir = Path(self.environment.get("SAGEMAKER_SUBMIT_DIRECTORY", str(self.model_dir / "code")))
        self.module = import_script(code_dir, program)
        script_log = logging.getLogger(self.module.__name__)
        script_log.handlers[:] = [logging.FileHandler(self.root / "container.log")]
        script_log.setLevel(logging.INFO)
        script_log.propagate = False
        for name in ("model_fn",):
            if not hasattr(self.module, name):
                raise LocalRunError(f"{code_dir / program} has no {name}(); the PyTorch inference container needs one")
        self.model = self.module.model_fn(str(self.model_dir))
        self._lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.url = ""
        self.variant = "AllTraffic"

    def invoke(self, body: bytes, headers: Mapping[str, str], query: str = "") -> tuple[int, bytes, str]:
        """(status, body, Content-Type) of one request, as the container answers it."""
        content_type = headers.get("Content-Type")
        accept = headers.get("Accept")
        with self._lock:
            try:
                if query and hasattr(self.module, "handle"):
                    return self.module.handle(body, content_type, accept, parse_qs(query), self.model)
                return self._toolkit_invoke(body, content_type, accept, headers)
            except Exception as error:  # the toolkit answers 500 and logs the traceback
                self.log(f"inference failed:\n{traceback.format_exc()}")
                message = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
                status = getattr(error, "status_code", 500)
                return int(status), json.dumps({"error": message, "status": int(status)}).encode(), "application/json"

    def _toolkit_invoke(self, body: bytes, content_type: str | None, accept: str | None,
                        headers: Mapping[str, str]) -> tuple[int, bytes, str]:
        module, context = self.module, RequestContext(headers)

        def call(name: str, *arguments: Any) -> Any:
            function = getattr(module, name)
            return function(*arguments, context) if _takes_context(function) else function(*arguments)

        data = call("input_fn", body, content_type)
        prediction = call("predict_fn", data, self.model)
        result = call("output_fn", prediction, accept)
        text, response_type = result if isinstance(result, tuple) else (result, accept or "application/json")
        payload = text.encode() if isinstance(text, str) else bytes(text)
        return context.status, payload, response_type

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
                self.answer(*container.invoke(body, headers, parts.query))

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

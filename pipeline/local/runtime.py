"""The endpoints' data plane on 127.0.0.1: SageMaker's runtime API in front of the model containers.

``RuntimeServer`` answers ``POST /endpoints/<name>/invocations`` as the
``sagemaker-runtime`` InvokeEndpoint API does (point boto3 at it with
``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``). It finds what the endpoint serves
through the control plane (moto): endpoint -> endpoint config -> model ->
model package -> container (``ModelDataUrl`` and ``Environment``), and sends
the request to that model's container (``model_container``).
"""
from __future__ import annotations

import json
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import unquote, urlsplit

from pipeline.local.errors import LocalRunError
from pipeline.local.http_server import LoopbackServer, QuietHandler
from pipeline.local.model_container import ModelContainer
from pipeline.local.s3 import LocalS3


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
        self.server: LoopbackServer | None = None
        self.url = ""

    def __enter__(self) -> "RuntimeServer":
        runtime = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                parts = [unquote(part) for part in urlsplit(self.path).path.split("/")]
                if len(parts) != 4 or parts[1] != "endpoints" or parts[3] != "invocations":
                    self.answer(404, b'{"message": "unknown operation"}', "application/json",
                                {"x-amzn-ErrorType": "UnknownOperationException"})
                    return
                body = self.read_body()
                if body is not None:
                    self.answer(*runtime.invoke(parts[2], body, self.forwarded_headers()))

        self.server = LoopbackServer(Handler, "sagemaker-runtime")
        self.url = self.server.url
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.server is not None:
            self.server.stop()
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

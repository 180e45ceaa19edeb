"""A model container on 127.0.0.1: the inference container contract, served by the PyTorch image's own Python stack.

``ModelContainer`` answers ``GET /ping`` and ``POST /invocations`` on a port of
its own. It unpacks ``model.tar.gz`` into its ``/opt/ml/model`` and serves it
with the PyTorch inference container's own Python stack
(``pipeline/local/torchserve.py``): ``sagemaker-pytorch-inference``'s
``HandlerService`` on ``sagemaker-inference``'s ``Transformer``, loaded and
driven by TorchServe's worker code, which imports ``SAGEMAKER_PROGRAM`` from
``/opt/ml/model/code``, calls ``model_fn`` once and ``input_fn``,
``predict_fn`` and ``output_fn`` per request, with TorchServe's request context
(headers, CustomAttributes included). TorchServe's Java front end is not started.
What the inference script logs goes to the container's ``container.log``.
"""
from __future__ import annotations

import logging
import shutil
import tarfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping
from urllib.parse import urlsplit

from pipeline.local.errors import LocalRunError
from pipeline.local.http_server import LoopbackServer, QuietHandler
from pipeline.local.jobs import rewrite_opt_ml
from pipeline.local.torchserve import ModelWorker

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
        self.server: LoopbackServer | None = None
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

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                if urlsplit(self.path).path == "/ping":
                    self.answer(200, b"", "text/plain")
                else:
                    self.answer(404, b'{"error": "not found"}', "application/json")

            def do_POST(self) -> None:
                if urlsplit(self.path).path != "/invocations":
                    self.answer(404, b'{"error": "not found"}', "application/json")
                    return
                body = self.read_body()
                if body is not None:
                    self.answer(*container.invoke(body, self.forwarded_headers()))

        self.server = LoopbackServer(Handler, "model-container")
        self.url = self.server.url
        return self.url

    def stop(self) -> None:
        """Stop serving and drop the unpacked model (the endpoint's instance goes away; its log stays)."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        shutil.rmtree(self.model_dir, ignore_errors=True)

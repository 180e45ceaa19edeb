"""A model served by the real serving stack of SageMaker's PyTorch inference container, minus its Java front end.

In the container, ``serve`` starts TorchServe with ``sagemaker_pytorch_serving_container.handler_service``
as the handler; TorchServe's Python backend worker loads it through ``ts.model_loader``
(``HandlerService.initialize`` imports ``SAGEMAKER_PROGRAM`` through ``sagemaker_inference``'s
``Transformer`` and calls ``model_fn``), and then, for each request the Java front end sends
over its socket, decodes the message with ``ts.protocol.otf_message_handler``, hands it to
``ts.service.Service.predict`` (which builds the ``Context`` and ``RequestProcessor`` the
script sees) and sends back what ``create_predict_response`` encodes.

``ModelWorker`` does exactly that in this process: it loads the model with the real loader,
encodes each request in the front end's wire format, lets the real ``retrieve_msg`` and
``Service.predict`` handle it, and decodes the real response message into (status, body,
Content-Type). Only the Java front end (HTTP, queues, worker processes) is left out;
``front_end`` starts it too (where Java 11+ is installed), for the tests and
``benchmarks/serving_load.py``.
"""
from __future__ import annotations

import io
import itertools
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from pipeline.local.jobs import free_port
from pipeline.local.modules import script_folder

HANDLER_SERVICE = "sagemaker_pytorch_serving_container.handler_service"
MODEL_NAME = "model"  # the name the container registers its one model under
# The container's TorchServe config says decode_input_request=false: bodies reach the handler as bytes.
WORKER_ENVIRONMENT = {"TS_DECODE_INPUT_REQUEST": "false"}
_END = -1


def _frame(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def predict_message(request_id: str, headers: Mapping[str, str], body: bytes) -> bytes:
    """One inference request in the front end's wire format: headers, and the body as parameter ``body``."""
    message = bytearray(b"I")
    message += _frame(request_id.encode())
    for name, value in headers.items():
        message += _frame(name.encode()) + _frame(str(value).encode())
    message += struct.pack("!i", _END)
    content_type = next((value for name, value in headers.items() if name.lower() == "content-type"), "")
    message += _frame(b"body") + _frame(content_type.encode()) + _frame(bytes(body))
    message += struct.pack("!i", _END)
    message += struct.pack("!i", _END)  # end of the batch
    return bytes(message)


class _Reader:
    """The front end's socket, as far as ``retrieve_msg`` uses it."""

    def __init__(self, data: bytes) -> None:
        self._stream = io.BytesIO(data)

    def recv(self, length: int) -> bytes:
        return self._stream.read(length)


class _ResponseReader:
    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def integer(self) -> int:
        (value,) = struct.unpack_from("!i", self._data, self._at)
        self._at += 4
        return value

    def chunk(self) -> bytes:
        length = self.integer()
        value = self._data[self._at:self._at + length]
        self._at += length
        return value


def parsed_response(message: bytes) -> tuple[int, bytes, str, dict[str, str]]:
    """(HTTP status, body, Content-Type, headers) of the first request in a ``create_predict_response`` message."""
    reader = _ResponseReader(message)
    batch_code = reader.integer()
    batch_message = reader.chunk().decode("utf-8", "replace")
    if reader.integer() == _END:  # no per-request part: the whole batch failed
        return batch_code, batch_message.encode(), "text/plain", {}
    reader._at -= 4
    reader.chunk()  # request id
    content_type = reader.chunk().decode()
    status = reader.integer()
    reader.chunk()  # reason phrase
    headers = {reader.chunk().decode(): reader.chunk().decode() for _ in range(reader.integer())}
    return status, bytes(reader.chunk()), content_type, headers


class ModelWorker:
    """One TorchServe backend worker of the PyTorch inference container, serving ``model_dir``."""

    def __init__(self, model_dir: Path, code_dir: Path, environment: Mapping[str, str]) -> None:
        import ts  # the toolkits are a dev dependency, not a core one
        from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
        from ts.model_loader import ModelLoaderFactory

        os.environ.update(WORKER_ENVIRONMENT)
        self._ids = itertools.count(1)
        metrics = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
        metrics.initialize_cache()
        metrics.model_name = MODEL_NAME
        with script_folder(code_dir, {**environment, **WORKER_ENVIRONMENT}, kept=("PYTHONPATH",)):
            self.service = ModelLoaderFactory.get_model_loader().load(
                MODEL_NAME, str(model_dir), handler=HANDLER_SERVICE, gpu_id=None, batch_size=1, metrics_cache=metrics)
        self.service.set_cl_socket(None)

    def invoke(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes, str]:
        """(status, body, Content-Type) of one request, as the worker answers it (not thread-safe: one at a time)."""
        from ts.protocol.otf_message_handler import retrieve_msg

        _, batch = retrieve_msg(_Reader(predict_message(f"request-{next(self._ids)}", headers, body)))
        status, payload, content_type, _ = parsed_response(bytes(self.service.predict(batch)))
        return status, payload, content_type


# ---------------------------------------------------------------- the real front end

@dataclass(frozen=True)
class FrontEnd:
    """A running TorchServe: its base URL on 127.0.0.1, its process group and its log."""

    url: str
    process: subprocess.Popen
    log: Path

    def resident_mib(self) -> float:
        """Resident memory of the whole server (the Java front end and its Python workers), in MiB."""
        total = 0
        for status in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = status.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == self.process.pid:  # the process group
                    total += int((status.parent / "statm").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
        return total * os.sysconf("SC_PAGE_SIZE") / 2**20


def front_end_properties(environment: Mapping[str, str], port: int, metrics_port: int) -> str:
    """The config.properties the container's ``serve`` writes for ``environment``, bound to 127.0.0.1."""
    from sagemaker_pytorch_serving_container import torchserve

    saved = dict(os.environ)
    os.environ.update(environment)
    try:
        properties = torchserve._generate_ts_config_properties(HANDLER_SERVICE)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    properties = properties.replace(f"0.0.0.0:{port}", f"127.0.0.1:{port}")  # the container binds every interface
    return properties + f"metrics_address=http://127.0.0.1:{metrics_port}\n"


def wait_until_serving(url: str, process: subprocess.Popen, log: Path, probe: tuple[bytes, str], timeout: float) -> None:
    """Until ``/ping`` is healthy and ``probe`` (body, Content-Type) gets a 200; raises RuntimeError with the log's tail."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"TorchServe exited with {process.returncode}: {log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                healthy = response.status == 200 and b"Healthy" in response.read()
            request = urllib.request.Request(f"{url}/invocations", data=probe[0], method="POST", headers={"Content-Type": probe[1]})
            with urllib.request.urlopen(request, timeout=60) as response:
                if healthy and response.status == 200:
                    return
        except OSError:  # not listening yet, or the worker still loading: the probe timed out
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"TorchServe did not serve within {timeout:.0f} s: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(1)


@contextmanager
def front_end(model_dir: Path, work_dir: Path, probe: tuple[bytes, str], environment: Mapping[str, str] | None = None,
              timeout: float = 180) -> Iterator[FrontEnd]:
    """TorchServe started as the container's ``serve`` starts it, serving ``model_dir`` on 127.0.0.1 once
    ``probe`` is answered; ``environment`` adds the model's environment (``SAGEMAKER_MODEL_SERVER_WORKERS``,
    ``OMP_NUM_THREADS``, ...). Stopped (its whole process group) on exit."""
    port, metrics_port = free_port(), free_port()
    settings = {"SAGEMAKER_PROGRAM": "inference.py", **(environment or {}), "SAGEMAKER_BIND_TO_PORT": str(port),
                "PYTHONPATH": str(model_dir / "code"), "LOG_LOCATION": str(work_dir / "logs"),
                "METRICS_LOCATION": str(work_dir / "logs")}
    full = {**os.environ, **settings, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    (work_dir / "ts.properties").write_text(front_end_properties(settings, port, metrics_port))
    (work_dir / "store").mkdir(exist_ok=True)
    from sagemaker_pytorch_serving_container.torchserve import DEFAULT_TS_LOG_FILE

    log = work_dir / "torchserve.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            ["torchserve", "--start", "--foreground", "--ncs", "--model-store", str(work_dir / "store"),
             "--ts-config", str(work_dir / "ts.properties"), "--log-config", DEFAULT_TS_LOG_FILE,
             "--models", f"{MODEL_NAME}={model_dir}"],
            env=full, cwd=work_dir, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, process, log, probe, timeout)
        yield FrontEnd(url, process, log)
    finally:
        stopped(process)


def stopped(process: subprocess.Popen) -> None:
    """Stop the server's process group (its workers too), which may have ended already."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()

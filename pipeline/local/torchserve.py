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
``tests/test_toolkits.py`` serves through it too where Java can run.
"""
from __future__ import annotations

import io
import itertools
import os
import struct
from pathlib import Path
from typing import Mapping

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

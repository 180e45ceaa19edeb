"""The HTTP plumbing of local-run's loopback servers (the model containers and the runtime API)."""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Mapping

CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
FORWARDED_HEADERS = ("Content-Type", "Accept", CUSTOM_ATTRIBUTES)
MAX_BODY_BYTES = 6 * 1024 * 1024
LOG = logging.getLogger("dogbreed.local.endpoint")


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs at debug level, refuses bodies above InvokeEndpoint's 6 MB and answers whole."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("%s " + format, self.address_string(), *args)

    def read_body(self) -> bytes | None:
        """The request body; None once a too-large body has been answered with 413."""
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.answer(413, json.dumps({"error": f"the body is {length} bytes, above {MAX_BODY_BYTES}"}).encode(), "application/json")
            return None
        return self.rfile.read(length) if length else b""

    def forwarded_headers(self) -> dict[str, str]:
        """The request headers InvokeEndpoint passes on to the model container."""
        return {name: self.headers[name] for name in FORWARDED_HEADERS if self.headers.get(name) is not None}

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


class LoopbackServer:
    """``handler`` served on a free 127.0.0.1 port from a daemon thread named ``name``, until ``stop``."""

    def __init__(self, handler: type[QuietHandler], name: str) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name=name, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

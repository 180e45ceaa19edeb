"""moto's HTTP server in a thread of this process, on 127.0.0.1, behind a WSGI layer of our own.

moto lacks a few operations the project calls (the pipeline callback API, Lambda's
provisioned concurrency); a layer in front of moto's server app answers those and
passes every other request to moto. This is the one way such a layer is served:
local-run's ``EmbeddedMoto`` (``callbacks.CallbackApi``) and the tests'
``moto_provisioned_concurrency`` both use it.
"""
from __future__ import annotations

import threading
import urllib.request
from typing import Any, Callable, Iterable

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import BaseWSGIServer, make_server

WsgiApp = Callable[..., Iterable[bytes]]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class ThreadedMotoServer:
    """``layer(moto's server app)`` served on ``port`` of 127.0.0.1 (0: a free one) from a daemon thread."""

    def __init__(self, layer: Callable[[WsgiApp], Any], port: int = 0) -> None:
        self.app = layer(DomainDispatcherApplication(create_backend_app))
        self._server: BaseWSGIServer = make_server("127.0.0.1", port, self.app, threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def reset(self) -> None:
        """Empty moto's backends (they live in this process, shared with any in-process mock)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()

    def __enter__(self) -> "ThreadedMotoServer":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Emptied and stopped, also when what it served failed."""
        try:
            self.reset()
        finally:
            self.stop()

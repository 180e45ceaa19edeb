"""moto's HTTP server plus Lambda's provisioned-concurrency operations, which moto does not implement.

moto 5.2.5 (and its main branch, whose IMPLEMENTATION_COVERAGE.md leaves
``put/get/delete/list_provisioned_concurrency_config`` unchecked) has no route
for ``/2019-09-30/functions/{FunctionName}/provisioned-concurrency``: its
server answers 404 with an HTML page. ``ProvisionedConcurrency`` is a WSGI
layer in front of moto that answers Put, Get and Delete as the Lambda API
reference describes them and passes every other request to moto:

- the function and the alias or version named by ``Qualifier`` must exist in
  moto (asked through moto itself, with the caller's own credentials scope),
  else 404 ResourceNotFoundException; ``$LATEST`` or no qualifier is refused
  with InvalidParameterValueException, as is a count below 1;
- Put answers 202 with Status IN_PROGRESS; allocation then completes at once,
  so the next Get answers READY with the requested count allocated;
- Get of an alias without a configuration answers 404
  ProvisionedConcurrencyConfigNotFoundException; Delete of one answers 404
  ResourceNotFoundException (Delete declares no not-found error of its own).

Requests are serialized by botocore and parsed by botocore, so what a test sees
is what the boto3 client does with Lambda's wire format. Lambda's asynchronous
allocation failures cannot happen here; a test that needs one sets a stored
configuration's Status to FAILED (``configurations`` is that store).
"""
from __future__ import annotations

import json
import re
import threading
from datetime import datetime, timezone
from typing import Any, Iterable
from urllib.parse import parse_qs, unquote

from werkzeug.test import Client

from pipeline.local.moto_server import StartResponse, ThreadedMotoServer, WsgiApp

PATH = re.compile(r"^/2019-09-30/functions/(?P<function>[^/]+)/provisioned-concurrency/?$")


class ProvisionedConcurrency:
    """WSGI application: the three provisioned-concurrency operations here, everything else to ``moto``."""

    def __init__(self, moto: WsgiApp) -> None:
        self.moto = moto
        self.configurations: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        match = PATH.match(environ.get("PATH_INFO", ""))
        if not match:
            return self.moto(environ, start_response)
        function = unquote(match.group("function")).split(":function:")[-1]
        qualifier = parse_qs(environ.get("QUERY_STRING", "")).get("Qualifier", [""])[0]
        status, body, error = self._answer(environ, function, qualifier)
        headers = [("Content-Type", "application/json")]
        if error:
            headers.append(("x-amzn-ErrorType", error))
        payload = b"" if body is None else json.dumps(body).encode()
        start_response(status, headers + [("Content-Length", str(len(payload)))])
        return [payload]

    def _answer(self, environ: dict[str, Any], function: str, qualifier: str) -> tuple[str, dict | None, str | None]:
        method = environ["REQUEST_METHOD"]
        if method not in ("PUT", "GET", "DELETE"):
            return _error("405 Method Not Allowed", "InvalidParameterValueException", f"{method} is not supported")
        if not qualifier or qualifier == "$LATEST":
            return _error("400 Bad Request", "InvalidParameterValueException",
                          "Provisioned concurrency needs an alias or a published version as Qualifier")
        if not self._exists(environ, function, qualifier):
            return _error("404 Not Found", "ResourceNotFoundException", f"Function not found: {function}:{qualifier}")
        key = (function, qualifier)
        with self._lock:
            if method == "PUT":
                count = _requested_count(environ)
                if count is None:
                    return _error("400 Bad Request", "InvalidParameterValueException",
                                  "ProvisionedConcurrentExecutions must be an integer of at least 1")
                now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000+0000")
                self.configurations[key] = {
                    "RequestedProvisionedConcurrentExecutions": count, "AllocatedProvisionedConcurrentExecutions": count,
                    "AvailableProvisionedConcurrentExecutions": count, "Status": "READY", "LastModified": now,
                }
                return "202 Accepted", {**self.configurations[key], "AllocatedProvisionedConcurrentExecutions": 0,
                                        "AvailableProvisionedConcurrentExecutions": 0, "Status": "IN_PROGRESS"}, None
            current = self.configurations.get(key)
            if current is None:
                code = "ProvisionedConcurrencyConfigNotFoundException" if method == "GET" else "ResourceNotFoundException"
                return _error("404 Not Found", code, f"No Provisioned Concurrency Config found for this function: {function}:{qualifier}")
            if method == "GET":
                return "200 OK", dict(current), None
            del self.configurations[key]
            return "204 No Content", None, None

    def _exists(self, environ: dict[str, Any], function: str, qualifier: str) -> bool:
        """Whether moto knows the function and the alias or version, asked with the request's own signature
        headers so that moto picks the same account and region."""
        headers = {name: environ[key] for name, key in (("Authorization", "HTTP_AUTHORIZATION"), ("X-Amz-Date", "HTTP_X_AMZ_DATE"),
                                                         ("Host", "HTTP_HOST")) if key in environ}
        answer = Client(self.moto).get(f"/2015-03-31/functions/{function}/configuration",
                                       query_string={"Qualifier": qualifier}, headers=headers)
        return answer.status_code == 200


def _requested_count(environ: dict[str, Any]) -> int | None:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    try:
        count = json.loads(environ["wsgi.input"].read(length) or b"{}").get("ProvisionedConcurrentExecutions")
    except ValueError:
        return None
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 1 else None


def _error(status: str, code: str, message: str) -> tuple[str, dict, str]:
    return status, {"Type": "User", "message": message}, code


class Server(ThreadedMotoServer):
    """moto's server app behind ``ProvisionedConcurrency`` (``app``), served on 127.0.0.1 from a thread."""

    def __init__(self, port: int) -> None:
        super().__init__(ProvisionedConcurrency, port)

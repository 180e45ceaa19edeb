"""Concurrent clients against a model endpoint on 127.0.0.1: a fixed mix of good and bad requests, and what came back.

Used by ``benchmarks/serving_load.py`` (timed) and ``tests/code/test_toolkits.py`` (statuses only).
Each client holds one keep-alive connection and sends a fixed number of requests, walking the
mix from its own offset, so every kind of body is in flight at once. Every request names the
status it must get: 200 for the valid bodies, the handler's 4xx for each bad one.
"""
from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence
from urllib.parse import urlsplit

HUGE_BODY_BYTES = 6 * 1024 * 1024 + 64 * 1024  # above the 6 MiB a real-time request may carry


@dataclass(frozen=True)
class LoadRequest:
    name: str
    content_type: str
    body: bytes
    expected: int  # the HTTP status it must get


@dataclass
class Answer:
    name: str
    status: int  # 0: no HTTP answer (the connection failed)
    expected: int
    seconds: float


@dataclass
class LoadResult:
    clients: int
    seconds: float
    answers: list[Answer] = field(default_factory=list)

    @property
    def server_errors(self) -> int:
        return sum(answer.status >= 500 or answer.status == 0 for answer in self.answers)

    @property
    def wrong(self) -> list[Answer]:
        """Answers whose status is not the one their request must get."""
        return [answer for answer in self.answers if answer.status != answer.expected]

    def latency_ms(self, percentile: float) -> float:
        ordered = sorted(answer.seconds for answer in self.answers)
        return 1000 * ordered[min(len(ordered) - 1, int(percentile / 100 * len(ordered)))] if ordered else 0.0

    @property
    def per_second(self) -> float:
        return len(self.answers) / self.seconds if self.seconds else 0.0


def request_mix(jpeg: bytes, png: bytes) -> list[LoadRequest]:
    """Valid JPEG, PNG and JSON bodies interleaved with the bad ones an endpoint must refuse with a 4xx."""
    encoded = base64.b64encode(jpeg).decode()
    return [
        LoadRequest("jpeg", "image/jpeg", jpeg, 200),
        LoadRequest("truncated jpeg", "image/jpeg", jpeg[: len(jpeg) // 2], 400),
        LoadRequest("png", "image/png", png, 200),
        LoadRequest("wrong type", "text/plain", b"a dog", 415),
        LoadRequest("json", "application/json", json.dumps({"image_base64": encoded}).encode(), 200),
        LoadRequest("non-utf-8 json", "application/json", b'{"image_base64": "\xff\xfe"}', 400),
        LoadRequest("json instances", "application/json", json.dumps({"instances": [encoded, encoded], "top_k": 2}).encode(), 200),
        LoadRequest("huge", "image/jpeg", jpeg + b"\0" * (HUGE_BODY_BYTES - len(jpeg)), 413),
        LoadRequest("png again", "image/png", png, 200),
        LoadRequest("malformed json", "application/json", b'{"image_base64": ', 400),
    ]


def client_answers(url: str, mix: Sequence[LoadRequest], offset: int, count: int, timeout: float) -> list[Answer]:
    """``count`` requests over one keep-alive connection (opened again after a failure)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    answers = []
    try:
        for number in range(count):
            request = mix[(offset + number) % len(mix)]
            started = time.perf_counter()
            try:
                connection.request("POST", "/invocations", body=request.body,
                                   headers={"Content-Type": request.content_type, "Accept": "application/json"})
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                connection.close()
                status = 0
            answers.append(Answer(request.name, status, request.expected, time.perf_counter() - started))
    finally:
        connection.close()
    return answers


def load_run(url: str, mix: Sequence[LoadRequest], clients: int, requests_each: int, timeout: float = 60) -> LoadResult:
    """``clients`` concurrent clients, each sending ``requests_each`` requests of ``mix`` to ``url``/invocations."""
    results: list[list[Answer]] = [[] for _ in range(clients)]

    def client(index: int) -> None:
        results[index] = client_answers(url, mix, index, requests_each, timeout)

    threads = [threading.Thread(target=client, args=(index,), daemon=True) for index in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadResult(clients, time.perf_counter() - started, [answer for answers in results for answer in answers])

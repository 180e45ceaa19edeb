"""moto's HTTP server plus the pipeline-execution operations moto does not have or does not keep.

moto 5.2.5 starts an execution and records it as Succeeded at once; it has no
ListPipelineExecutionSteps, no RetryPipelineExecution, and it drops a
StartPipelineExecution's SelectiveExecutionConfig. ``PipelineExecutions`` is a
WSGI layer in front of moto (as ``pipeline.local.callbacks.CallbackApi`` is):

- what SageMaker would report about an execution moto started (its status,
  failure reason and steps with their Metadata) is set with ``record``, the way
  an execution engine would leave it; DescribePipelineExecution and
  ListPipelineExecutions answer with that status (moto answers the rest);
- ListPipelineExecutionSteps answers the recorded steps (by StartTime, in the
  requested SortOrder);
- RetryPipelineExecution of a Failed or Stopped execution makes it Executing
  again; of any other it is refused with ValidationException, of an unknown
  one with ResourceNotFound;
- StartPipelineExecution with a SelectiveExecutionConfig is refused as
  SageMaker refuses it (a step the pipeline does not have; a reference
  execution of another pipeline, unknown, or not Succeeded or Failed), else
  moto starts it and the layer keeps the config, which DescribePipelineExecution
  then returns;
- DescribeTrainingJob answers moto's job with the status and FailureReason
  set by ``record_job`` (moto completes every job at once);
- every request these operations get is first checked against botocore's
  shape of the operation (``callbacks.shape_problem``) and kept in ``requests``.
"""
from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable

from pipeline.dag import steps_of
from pipeline.local.callbacks import TARGET_PREFIX, shape_problem
from pipeline.local.moto_server import StartResponse, ThreadedMotoServer, WsgiApp

ANSWERED = ("ListPipelineExecutionSteps", "RetryPipelineExecution")
OVERLAID = ("StartPipelineExecution", "DescribePipelineExecution", "ListPipelineExecutions", "DescribeTrainingJob")


@dataclass
class Run:
    status: str
    failure_reason: str = ""
    steps: list[dict[str, Any]] = field(default_factory=list)
    selective: dict[str, Any] | None = None


class PipelineExecutions:
    """WSGI application: the operations above here (or around moto's answer), everything else to ``moto``."""

    def __init__(self, moto: WsgiApp) -> None:
        self.moto = moto
        self.runs: dict[str, Run] = {}
        self.jobs: dict[str, dict[str, Any]] = {}  # training job name -> what DescribeTrainingJob says instead of moto
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def record(self, arn: str, status: str, steps: list[dict[str, Any]] | None = None, failure_reason: str = "") -> None:
        """What SageMaker reports about execution ``arn`` from now on."""
        with self._lock:
            self.runs[arn] = Run(status, failure_reason, list(steps or []))

    def record_job(self, name: str, status: str, failure_reason: str = "") -> None:
        """What DescribeTrainingJob says of job ``name``'s status (moto's jobs all complete at once)."""
        with self._lock:
            self.jobs[name] = {"TrainingJobStatus": status, "SecondaryStatus": status, "FailureReason": failure_reason}

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        operation = target[len(TARGET_PREFIX):] if target.startswith(TARGET_PREFIX) else ""
        if operation not in ANSWERED + OVERLAID:
            return self.moto(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) or b"{}"
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        problem = shape_problem(operation, request)
        if problem:
            return _respond(start_response, *_error("ValidationException", problem))
        with self._lock:
            self.requests.append((operation, request))
        answer = getattr(self, f"_{operation}")(environ, request, body)
        return _respond(start_response, *answer)

    def _moto(self, environ: dict[str, Any], operation: str, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """moto's answer to ``operation`` with ``request``, signed as the caller's request was."""
        body = json.dumps(request).encode()
        inner = {**environ, "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)),
                 "HTTP_X_AMZ_TARGET": TARGET_PREFIX + operation}
        answer: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            answer["status"] = status

        payload = b"".join(self.moto(inner, capture))
        return answer["status"], json.loads(payload or b"{}")

    def _status(self, environ: dict[str, Any], arn: str) -> str | None:
        """The execution's status: recorded here, else moto's; None when moto does not know it."""
        if arn in self.runs:
            return self.runs[arn].status
        status, answer = self._moto(environ, "DescribePipelineExecution", {"PipelineExecutionArn": arn})
        return answer.get("PipelineExecutionStatus") if status.startswith("200") else None

    def _ListPipelineExecutionSteps(self, environ: dict[str, Any], request: dict[str, Any], body: bytes) -> tuple[str, dict]:
        arn = request["PipelineExecutionArn"]
        if self._status(environ, arn) is None:
            return _error("ResourceNotFound", f"Pipeline execution {arn} does not exist")
        steps = sorted(self.runs[arn].steps if arn in self.runs else [], key=lambda step: step.get("StartTime", 0),
                       reverse=request.get("SortOrder") == "Descending")
        return "200 OK", {"PipelineExecutionSteps": steps}

    def _RetryPipelineExecution(self, environ: dict[str, Any], request: dict[str, Any], body: bytes) -> tuple[str, dict]:
        arn = request["PipelineExecutionArn"]
        status = self._status(environ, arn)
        if status is None:
            return _error("ResourceNotFound", f"Pipeline execution {arn} does not exist")
        if status not in ("Failed", "Stopped"):
            return _error("ValidationException", f"Pipeline execution {arn} is {status}; only a Failed or Stopped one can be retried")
        with self._lock:
            run = self.runs[arn]
            run.status, run.failure_reason = "Executing", ""
        return "200 OK", {"PipelineExecutionArn": arn}

    def _StartPipelineExecution(self, environ: dict[str, Any], request: dict[str, Any], body: bytes) -> tuple[str, dict]:
        selective = request.get("SelectiveExecutionConfig")
        if selective:
            refusal = self._selective_refusal(environ, request["PipelineName"], selective)
            if refusal:
                return _error("ValidationException", refusal)
        status, answer = self._moto(environ, "StartPipelineExecution", request)
        if status.startswith("200"):
            with self._lock:
                self.runs[answer["PipelineExecutionArn"]] = Run("Executing", selective=selective)
        return status, answer

    def _selective_refusal(self, environ: dict[str, Any], pipeline: str, selective: dict[str, Any]) -> str:
        status, described = self._moto(environ, "DescribePipeline", {"PipelineName": pipeline})
        if not status.startswith("200"):
            return f"Pipeline {pipeline} does not exist"
        steps = steps_of(json.loads(described["PipelineDefinition"]))
        unknown = [step["StepName"] for step in selective["SelectedSteps"] if step["StepName"] not in steps]
        if unknown:
            return f"Selected steps {', '.join(unknown)} are not in pipeline {pipeline}"
        source = selective.get("SourcePipelineExecutionArn")
        if source:
            if f":pipeline/{pipeline}/execution/" not in source:
                return f"Source pipeline execution {source} is not an execution of pipeline {pipeline}"
            source_status = self._status(environ, source)
            if source_status not in ("Succeeded", "Failed"):
                return f"Source pipeline execution {source} is {source_status or 'unknown'}; it must be Succeeded or Failed"
        return ""

    def _DescribePipelineExecution(self, environ: dict[str, Any], request: dict[str, Any], body: bytes) -> tuple[str, dict]:
        status, answer = self._moto(environ, "DescribePipelineExecution", request)
        run = self.runs.get(request["PipelineExecutionArn"])
        if status.startswith("200") and run is not None:
            answer.update(PipelineExecutionStatus=run.status, FailureReason=run.failure_reason)
            if run.selective:
                answer["SelectiveExecutionConfig"] = run.selective
        return status, answer

    def _DescribeTrainingJob(self, environ: dict[str, Any], request: dict[str, Any], body: bytes) -> tuple[str, dict]:
        status, answer = self._moto(environ, "DescribeTrainingJob", request)
        if status.startswith("200"):
            answer.update(self.jobs.get(request["TrainingJobName"], {}))
        return status, answer

    def _ListPipelineExecutions(self, environ: dict[str, Any], request: dict[str, Any], body: bytes) -> tuple[str, dict]:
        status, answer = self._moto(environ, "ListPipelineExecutions", request)
        for summary in answer.get("PipelineExecutionSummaries", []):
            run = self.runs.get(summary["PipelineExecutionArn"])
            if run is not None:
                summary["PipelineExecutionStatus"] = run.status
        return status, answer


def _error(code: str, message: str) -> tuple[str, dict[str, Any]]:
    return "400 Bad Request", {"__type": code, "message": message}


def _respond(start_response: StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    payload = json.dumps(body, default=_timestamp).encode()
    start_response(status, [("Content-Type", "application/x-amz-json-1.1"), ("Content-Length", str(len(payload)))])
    return [payload]


def _timestamp(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    raise TypeError(f"{type(value).__name__} is not JSON")


class Server(ThreadedMotoServer):
    """moto's server app behind ``PipelineExecutions`` (``app``), served on 127.0.0.1 from a thread."""

    def __init__(self, port: int = 0) -> None:
        super().__init__(PipelineExecutions, port)

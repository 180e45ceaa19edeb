"""Lambda steps and model registration against the embedded AWS.

A Lambda step's ``FunctionArn`` names one of the project's functions; its
code is the ``lambda/`` asset, unpacked once per function as Lambda would
(each function gets its own copy of the shared modules, as each runs in its
own environment), and ``handler(event, context)`` is called in this process
with the step's resolved arguments as the event. boto3 inside the handler
reaches only the embedded moto and the local endpoint data plane, through the
run's environment. What the handler prints goes to a log file per step.

RegisterModel creates the model package (and its group, when it is missing,
as the pipeline service does) in moto; its properties are DescribeModelPackage's
answer.
"""
from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
import uuid
import zipfile
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping, TextIO

from pipeline.local.aws import plain
from pipeline.local.errors import LocalRunError
from pipeline.local.modules import module_from_folder
from pipeline.local.references import as_text
from pipeline.settings import LAMBDA_FUNCTIONS, Settings

FUNCTION_TIMEOUT_SECONDS = 120.0


class LambdaFailed(LocalRunError):
    """The function raised or answered without a declared output; the message is the step's FailureReason."""


class LambdaContext:
    """The members of the Lambda runtime's context object."""

    def __init__(self, function_name: str, function_arn: str, timeout_seconds: float) -> None:
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = function_arn
        self.memory_limit_in_mb = "256"
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = f"local/{self.aws_request_id}"
        self._deadline = time.monotonic() + timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def handler_module_names(settings: Settings) -> dict[str, str]:
    """Function name -> handler module, e.g. ``dogbreed-deploy-endpoint`` -> ``deploy_endpoint``."""
    return {settings.lambda_function_name(function): function.replace("-", "_") for function in LAMBDA_FUNCTIONS}


def function_name_of(arn: str) -> str:
    """``arn:aws:lambda:<region>:<account>:function:<name>[:<alias>]`` -> ``<name>``."""
    parts = str(arn).split(":")
    if len(parts) < 7 or parts[2] != "lambda" or parts[5] != "function":
        raise LocalRunError(f"{arn!r} is not a Lambda function ARN")
    return parts[6]


class ThreadOutput(io.TextIOBase):
    """sys.stdout for a run: writes from a thread that claimed a file go there, the rest to the real stdout."""

    def __init__(self, fallback: TextIO) -> None:
        self.fallback = fallback
        self.local = threading.local()

    def write(self, text: str) -> int:
        target = getattr(self.local, "target", None)
        return (target or self.fallback).write(text)

    def flush(self) -> None:
        target = getattr(self.local, "target", None)
        (target or self.fallback).flush()

    def isatty(self) -> bool:
        return self.fallback.isatty()

    @contextmanager
    def to(self, handle: TextIO) -> Iterator[None]:
        previous = getattr(self.local, "target", None)
        self.local.target = handle
        try:
            yield
        finally:
            self.local.target = previous


@contextmanager
def routed_stdout() -> Iterator[ThreadOutput]:
    """Install a ThreadOutput as sys.stdout for the duration."""
    stdout = sys.stdout
    router = ThreadOutput(stdout)
    sys.stdout = router
    try:
        yield router
    finally:
        sys.stdout = stdout


class LambdaFunctions:
    """The project's functions, loaded from the lambda asset on first use."""

    def __init__(self, settings: Settings, archive: bytes, task_root: Path,
                 environment: Callable[[str], Mapping[str, str]] = lambda name: {}) -> None:
        self.modules = handler_module_names(settings)
        self.archive = archive
        self.task_root = task_root
        self.environment = environment
        self._loaded: dict[str, ModuleType] = {}
        self._lock = threading.Lock()
        self._env_lock = threading.Lock()

    def handler(self, function_name: str) -> Callable[[Any, Any], Any]:
        if function_name not in self.modules:
            raise LocalRunError(f"function {function_name} is not one of this project's Lambda functions "
                                f"({', '.join(sorted(self.modules))}); local-run can only call those")
        with self._lock:
            if function_name not in self._loaded:
                self._loaded[function_name] = self._load(function_name)
            module = self._loaded[function_name]
        if not callable(getattr(module, "handler", None)):
            raise LocalRunError(f"{self.modules[function_name]}.py has no handler(event, context)")
        return module.handler

    def _load(self, function_name: str) -> ModuleType:
        """Unpack the asset into this function's task folder and import its handler module like the Lambda runtime."""
        task = self.task_root / function_name
        task.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(self.archive)) as archive:
            archive.extractall(task)
        module_name = self.modules[function_name]
        path = task / f"{module_name}.py"
        if not path.is_file():
            raise LocalRunError(f"the lambda asset has no {module_name}.py for function {function_name}")
        return module_from_folder(task, path, module_name)

    def invoke(self, arn: str, event: Mapping[str, Any], log: Path, router: ThreadOutput | None) -> dict[str, Any]:
        """The function's answer to ``event``, as the JSON object Lambda would return."""
        name = function_name_of(arn)
        handler = self.handler(name)
        with self._env_lock:
            os.environ.update(self.environment(name))
        context = LambdaContext(name, arn, FUNCTION_TIMEOUT_SECONDS)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as handle:
            handle.write(f"START RequestId: {context.aws_request_id} {json.dumps(event, sort_keys=True)}\n")
            handle.flush()
            try:
                with (router.to(handle) if router else _nothing()):
                    answer = handler(json.loads(json.dumps(event)), context)
            except Exception as error:
                handle.write(f"ERROR {type(error).__name__}: {error}\n")
                raise LambdaFailed(f"{name} failed: {type(error).__name__}: {error}") from None
            finally:
                handle.write(f"END RequestId: {context.aws_request_id}\n")
        try:
            return json.loads(json.dumps(answer))
        except (TypeError, ValueError) as error:
            raise LambdaFailed(f"{name} answered something that is not JSON: {error}") from None


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def output_parameters(answer: Any, declared: list[Mapping[str, str]], function: str) -> dict[str, Any]:
    """The step's OutputParameters, name -> value: each declared output, converted to its OutputType."""
    if not isinstance(answer, Mapping):
        raise LambdaFailed(f"{function} answered {type(answer).__name__}, not a JSON object with the step's outputs")
    outputs = {}
    for item in declared:
        name, kind = item["OutputName"], item.get("OutputType", "String")
        if name not in answer:
            raise LambdaFailed(f"{function}'s answer has no output {name!r} (it has {', '.join(sorted(answer)) or 'nothing'})")
        value = answer[name]
        try:
            converted = {"String": as_text, "Integer": int, "Float": float,
                         "Boolean": lambda v: v if isinstance(v, bool) else str(v).lower() == "true"}[kind](value)
        except (KeyError, TypeError, ValueError):
            raise LambdaFailed(f"{function}'s output {name!r} = {value!r} is not of OutputType {kind}") from None
        outputs[name] = converted
    return outputs


def register_model_package(sagemaker: Any, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """CreateModelPackage in the embedded registry; returns DescribeModelPackage's answer."""
    group = arguments.get("ModelPackageGroupName")
    if group:
        try:
            sagemaker.describe_model_package_group(ModelPackageGroupName=group)
        except Exception:
            sagemaker.create_model_package_group(ModelPackageGroupName=group,
                                                 ModelPackageGroupDescription="created by the pipeline's first registration")
    try:
        arn = sagemaker.create_model_package(**arguments)["ModelPackageArn"]
        description = sagemaker.describe_model_package(ModelPackageName=arn)
    except Exception as error:
        message = getattr(error, "response", {}).get("Error", {}).get("Message", str(error))
        raise LocalRunError(f"CreateModelPackage failed: {message}") from None
    return plain(description)

"""What the handlers share: typed event fields, AWS clients and errors, and each request's log lines.

Standard library and boto3 only: the functions ship as one zip and must
start fast. Pipeline parameters reach a LambdaStep either as JSON numbers or as
strings, so the number readers accept both.

``@request_handler(name)`` on a handler gives each request one summary log line
with the function's name, the request id and ``latency_ms`` (plus what the
handler adds with ``annotate``), and every other ``log`` line of the request the
name and request id; an exception that escapes the handler is logged once and
raised without the frames below the handler.
"""
from __future__ import annotations

import contextvars
import functools
import json
import math
import os
import re
import sys
import time
import traceback
from typing import Any, Callable, Mapping, Pattern, TypeVar

import boto3
from botocore.config import Config

# --- event fields -------------------------------------------------------------

NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")  # a SageMaker endpoint or endpoint config name
NAME_HINT = "1 to 63 letters, digits and hyphens, starting and ending with a letter or digit"
_INTEGER = re.compile(r"^[+-]?[0-9]+$")
_MISSING = object()


class EventError(ValueError):
    """An event field is missing or has a value that cannot work; the message names the field."""


def _raw(event: Mapping[str, Any], name: str, default: Any) -> Any:
    if not isinstance(event, Mapping):
        raise EventError(f"the event must be a JSON object, got {type(event).__name__}")
    value = event.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise EventError(f"event field {name!r} is missing")
        return default
    return value


def read_str(
    event: Mapping[str, Any],
    name: str,
    *,
    default: Any = _MISSING,
    pattern: Pattern[str] | None = None,
    hint: str = "",
    allow_empty: bool = False,
) -> str:
    """``event[name]`` as a string; ``pattern`` (with ``hint`` for the message) must match when given."""
    value = _raw(event, name, default)
    if not isinstance(value, str):
        raise EventError(f"event field {name!r} must be a string, got {type(value).__name__} {value!r}")
    value = value.strip()
    if not value:
        if allow_empty:
            return ""
        raise EventError(f"event field {name!r} is empty")
    if pattern is not None and not pattern.match(value):
        raise EventError(f"event field {name!r} = {value!r} is not {hint or 'valid'}")
    return value


def read_name(event: Mapping[str, Any], name: str, *, default: Any = _MISSING, allow_empty: bool = False) -> str:
    """``event[name]`` as a SageMaker endpoint or endpoint config name (NAME_PATTERN)."""
    return read_str(event, name, default=default, pattern=NAME_PATTERN, hint=NAME_HINT, allow_empty=allow_empty)


def read_int(event: Mapping[str, Any], name: str, *, default: Any = _MISSING,
             minimum: int | None = None, maximum: int | None = None) -> int:
    """``event[name]`` as an int, from a JSON integer, an integral float or a decimal string."""
    return _read_number(event, name, default, minimum, maximum, "an integer", _as_int)


def read_float(event: Mapping[str, Any], name: str, *, default: Any = _MISSING,
               minimum: float | None = None, maximum: float | None = None) -> float:
    """``event[name]`` as a finite float, from a JSON number or a decimal string."""
    return _read_number(event, name, default, minimum, maximum, "a number", _as_float)


def _read_number(event: Mapping[str, Any], name: str, default: Any, minimum: float | None, maximum: float | None,
                 kind: str, convert: Callable[[str, Any], Any]) -> Any:
    value = _raw(event, name, default)
    if isinstance(value, bool):  # JSON true is no number, though Python's bool is an int
        raise EventError(f"event field {name!r} must be {kind}, got a boolean")
    value = convert(name, value)
    _check_range(name, value, minimum, maximum)
    return value


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.match(value.strip()):
        return int(value.strip())
    if not isinstance(value, int):
        raise EventError(f"event field {name!r} must be an integer, got {type(value).__name__} {value!r}")
    return value


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise EventError(f"event field {name!r} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EventError(f"event field {name!r} must be a finite number, got {value!r}")
    return float(value)


def read_bool(event: Mapping[str, Any], name: str, *, default: Any = _MISSING) -> bool:
    """``event[name]`` as a bool, from a JSON boolean or the strings 'true' and 'false' (any case)."""
    value = _raw(event, name, default)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise EventError(f"event field {name!r} must be true or false, got {type(value).__name__} {value!r}")
    return value


def read_str_list(event: Mapping[str, Any], name: str) -> tuple[str, ...]:
    """A list of strings, given either as a JSON list or as one comma-separated string; absent means empty."""
    value = _raw(event, name, [])
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise EventError(f"event field {name!r} must be a list of strings or a comma-separated string, got {value!r}")
    return tuple(item.strip() for item in value if item.strip())


def _check_range(name: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise EventError(f"event field {name!r} = {value} is below the minimum {minimum}")
    if maximum is not None and value > maximum:
        raise EventError(f"event field {name!r} = {value} is above the maximum {maximum}")


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """The function's environment variable ``name`` as a whole number of at least ``minimum``; else ``default``."""
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw.isdigit() and int(raw) >= minimum else default


# --- SageMaker endpoints and AWS calls -----------------------------------------

VARIANT_NAME = "AllTraffic"  # the one production variant deploy-endpoint creates
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
WAITING_STATUSES = ("Creating", "Updating", "SystemUpdating", "RollingBack")  # an endpoint on its way to InService or Failed


class AwsCallFailed(RuntimeError):
    """AWS refused a call the function made; the message carries AWS's error code and message."""


@functools.lru_cache(maxsize=None)
def client(service: str, read_timeout: float = 20.0, max_attempts: int = 3) -> Any:
    """One boto3 client per service and settings for the life of the execution environment (reused while warm)."""
    config = Config(
        connect_timeout=5,
        read_timeout=read_timeout,
        retries={"mode": "standard", "max_attempts": max_attempts},
        user_agent_extra="dogbreed-lambda",
    )
    return boto3.client(service, config=config)


def scaling_resource_id(endpoint_name: str, variant_name: str = VARIANT_NAME) -> str:
    """Application Auto Scaling's ResourceId for an endpoint variant."""
    return f"endpoint/{endpoint_name}/variant/{variant_name}"


def error_code(error: Exception) -> str:
    """The AWS error code of a botocore ClientError, or '' for anything else."""
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def error_message(error: Exception) -> str:
    """The AWS error message of a botocore ClientError, or the text of anything else."""
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Message", "")) or str(error)


def is_not_found(error: Exception) -> bool:
    """SageMaker's answer for a missing model, config or endpoint: a ValidationException saying 'Could not find'."""
    return error_code(error) == "ValidationException" and "could not find" in error_message(error).lower()


# --- each request's log lines --------------------------------------------------

LATENCY_FIELD = "latency_ms"  # every handler's summary line: milliseconds from the event's arrival to the answer
_REQUEST: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("request", default=None)
Handler = TypeVar("Handler", bound=Callable[..., Any])


def log(**fields: Any) -> None:
    """One JSON line on stdout, which Lambda sends to CloudWatch Logs; inside a request, with its function and id."""
    request = _REQUEST.get()
    identity = {key: request[key] for key in ("function", "request_id")} if request is not None else {}
    if request is not None and not request["summary_line"]:
        identity[LATENCY_FIELD] = _milliseconds(request["started"])
    record = {"time": round(time.time(), 3), **identity, **fields}
    sys.stdout.write(json.dumps(record, default=str, sort_keys=True) + "\n")
    sys.stdout.flush()


def annotate(**fields: Any) -> None:
    """Fields for the current request's summary line, written when the handler returns."""
    request = _REQUEST.get()
    if request is None or not request["summary_line"]:
        raise RuntimeError("annotate() is for the body of a @request_handler handler")
    request["summary"].update(fields)


def request_id(context: Any) -> str:
    """The Lambda request id, or 'local' outside Lambda."""
    return str(getattr(context, "aws_request_id", "") or "local")


def request_handler(function: str, *, expected: tuple[type, ...] = (),
                    summary_line: bool = True) -> Callable[[Handler], Handler]:
    """A decorator for ``handler(event, context)``: the request's identity on its log lines, one summary
    line with its latency, and an escaping exception shaped by ``_failure`` (``expected`` errors are the caller's).

    A handler of batches (``summary_line=False``) writes a line per item itself; each gets the latency so far.
    """

    def decorate(body: Handler) -> Handler:
        @functools.wraps(body)
        def handler(event: Any, context: Any) -> Any:  # named so: a LambdaStep's failure ends in the frame "handler"
            started = time.perf_counter()
            request = {"function": function, "request_id": request_id(context), "summary": {},
                       "summary_line": summary_line, "started": started}
            token = _REQUEST.set(request)
            try:
                result = body(event, context)
            except Exception as error:
                raise _failure(error, expected, started) from None
            else:
                if summary_line:
                    log(**request["summary"], **{LATENCY_FIELD: _milliseconds(started)})
                return result
            finally:
                _REQUEST.reset(token)

        return handler  # type: ignore[return-value]

    return decorate


def _milliseconds(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def _failure(error: BaseException, expected: tuple[type, ...], started: float) -> BaseException:
    """The exception a handler raises for ``error``: logged once, without the frames below the handler.

    SageMaker shows the message as the step's failure reason. ``expected``
    errors (bad events, failed checks) and AWS refusals are the caller's to
    read; anything else is a fault in the function, so its traceback goes to
    the log, not to the caller.
    """
    if getattr(error, "response", None) is not None and error_code(error):  # botocore ClientError
        error = AwsCallFailed(f"{error_code(error)}: {error_message(error)}")
    fields: dict[str, Any] = {"status": "failed", "error_type": error.__class__.__name__, "error": str(error),
                              LATENCY_FIELD: _milliseconds(started)}
    if not isinstance(error, (*expected, AwsCallFailed)):
        fields["traceback"] = traceback.format_exc(limit=20)
    log(**fields)
    return error.with_traceback(None)

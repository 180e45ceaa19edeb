"""Every handler's log lines carry its function name, the request id and ``latency_ms``, from one decorator."""
from __future__ import annotations

import ast

import pytest

from lambda_harness import LambdaContext, load_handler, log_lines
from sources import LAMBDA_DIR

HANDLERS = {"deploy_endpoint": "deploy-endpoint", "check_endpoint": "check-endpoint",
            "wait_endpoint": "wait-endpoint", "invoke_endpoint": "invoke-endpoint"}


def decorator_names(module: str) -> list[str]:
    """The function names given to ``@request_handler`` on ``handler`` in ``lambda/<module>.py``."""
    tree = ast.parse((LAMBDA_DIR / f"{module}.py").read_text())
    (handler,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "handler"]
    return [decorator.args[0].value for decorator in handler.decorator_list
            if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", "") == "request_handler"]


@pytest.mark.parametrize("module", sorted(HANDLERS))
def test_each_handler_is_wrapped_once_with_its_function_name(module):
    assert decorator_names(module) == [HANDLERS[module]]


@pytest.mark.parametrize("module", sorted(HANDLERS))
def test_no_handler_writes_its_identity_by_hand(module):
    calls = [node for node in ast.walk(ast.parse((LAMBDA_DIR / f"{module}.py").read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "log"]
    assert [keyword.arg for call in calls for keyword in call.keywords
            if keyword.arg in ("function", "request_id", "latency_ms")] == []


def test_a_failed_step_request_logs_one_line_with_its_identity_and_latency(capsys):
    deploy = load_handler("deploy_endpoint")
    with pytest.raises(deploy.EventError):
        deploy.handler({}, LambdaContext(request_id="req-42"))
    (line,) = log_lines(capsys)
    assert (line["function"], line["request_id"], line["status"]) == ("deploy-endpoint", "req-42", "failed")
    assert line["latency_ms"] >= 0 and "traceback" not in line


def test_a_batch_handler_stamps_each_of_its_lines(capsys):
    wait = load_handler("wait_endpoint")
    assert wait.handler({"Records": [{"messageId": "m-1", "body": "not json"}]}, LambdaContext(request_id="req-7")) \
        == {"batchItemFailures": []}
    (line,) = log_lines(capsys)
    assert (line["function"], line["request_id"], line["status"], line["message_id"]) == ("wait-endpoint", "req-7", "dropped", "m-1")
    assert line["latency_ms"] >= 0


def test_outside_a_request_a_line_has_no_identity(capsys):
    events = load_handler("events")
    events.log(event="cold-start")
    (line,) = log_lines(capsys)
    assert "function" not in line and "latency_ms" not in line and line["event"] == "cold-start"

"""Rerun without starting over: ``dogbreed retry [EXECUTION]`` and ``dogbreed start --from STEP [--reference EXECUTION]``.

``retry`` is RetryPipelineExecution: the failed steps of the same execution run again, with the definition
and parameters it started with (for a passing failure: capacity, throttling, a spot interruption).

``start --from STEP`` is a selective execution (StartPipelineExecution's SelectiveExecutionConfig) of the
deployed definition: STEP and every step downstream of it in the DAG run; the steps they need and that are
not selected give their outputs from a reference execution (by default the latest succeeded one).

Both refuse what SageMaker would refuse, before asking it: an execution still running, a step the pipeline
does not have, more steps than one selective execution takes, a reference execution of another pipeline,
one that ran another version of the pipeline (without a step the selection needs, or with it of another
type), and one in which a step the selection needs did not succeed.
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Callable

from pipeline.aws import Clients, explained
from pipeline.commands import UsageError
from pipeline.constraints import input_member
from pipeline.dag import StepNode, steps_of, topological_order
from pipeline.publish.executions import execution_steps
from pipeline.publish.lookup import chosen_execution, execution_arn, latest_execution
from pipeline.settings import Settings
from pipeline.status import RUNNING, Status

RETRYABLE = frozenset({Status.FAILED, Status.STOPPED})
REFERENCE_STATUSES = frozenset({Status.SUCCEEDED, Status.FAILED})  # SelectiveExecutionConfig.SourcePipelineExecutionArn's rule


def max_selected_steps() -> int:
    """How many steps one selective execution may select (SelectedStepList's limit in botocore's model)."""
    return int(input_member("sagemaker", "StartPipelineExecution", "SelectiveExecutionConfig", "SelectedSteps").metadata["max"])


def execution_status(clients: Clients, arn: str) -> str:
    return clients.sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)["PipelineExecutionStatus"]


def retry_execution(clients: Clients, settings: Settings, given: str | None) -> str:
    """RetryPipelineExecution of the named execution (default: the latest); returns its ARN."""
    arn = chosen_execution(clients, settings, given)
    with explained(f"retrying execution {arn}"):
        status = execution_status(clients, arn)
        if status in RUNNING:
            raise UsageError(f"execution {arn} is {status}: only an execution that has ended can be retried; "
                             f"follow it with dogbreed diagnose {arn}")
        if status not in RETRYABLE:
            raise UsageError(f"execution {arn} {status}: nothing to retry (only a Failed or Stopped execution can be); "
                             "dogbreed start runs a new one")
        return clients.sagemaker.retry_pipeline_execution(
            PipelineExecutionArn=arn, ClientRequestToken=str(uuid.uuid4()))["PipelineExecutionArn"]


def downstream_of(nodes: dict[str, StepNode], start: str) -> list[str]:
    """``start`` and every step that depends on it, directly or not, in the order they run."""
    if start not in nodes:
        raise UsageError(f"--from {start}: the deployed pipeline has no such step; it has "
                         f"{', '.join(topological_order(nodes))}")
    chosen = {start}
    for name in topological_order(nodes):
        if nodes[name].depends_on & chosen:
            chosen.add(name)
    return [name for name in topological_order(nodes) if name in chosen]


def needed_from_reference(nodes: dict[str, StepNode], selected: list[str]) -> list[str]:
    """The steps the selected ones depend on directly and that are not selected: their outputs come from the reference."""
    return sorted({dependency for name in selected for dependency in nodes[name].depends_on} - set(selected),
                  key=list(nodes).index)


def reference_execution(clients: Clients, settings: Settings, given: str | None) -> str:
    if given:
        return execution_arn(settings, given)
    return latest_execution(clients, settings.pipeline_name, Status.SUCCEEDED)["PipelineExecutionArn"]


def check_reference(clients: Clients, arn: str, nodes: dict[str, StepNode], needed: list[str]) -> None:
    """Refuse a reference execution that cannot give the outputs of the ``needed`` steps."""
    status = execution_status(clients, arn)
    if status not in REFERENCE_STATUSES:
        raise UsageError(f"--reference {arn} is {status}: a reference execution must have ended Succeeded or Failed")
    if not needed:
        return
    ran = steps_of(json.loads(
        clients.sagemaker.describe_pipeline_definition_for_execution(PipelineExecutionArn=arn)["PipelineDefinition"]))
    for name in needed:
        if name not in ran or ran[name].type != nodes[name].type:
            found = "has no such step" if name not in ran else f"has it as a {ran[name].type} step"
            raise UsageError(f"--reference {arn} ran another version of the pipeline: the selection needs the outputs of "
                             f"{nodes[name].type} step {name}, and that version {found}; choose a reference that ran "
                             "the deployed version, or start from an earlier step")
    statuses = {summary["StepName"]: summary.get("StepStatus", "") for summary in execution_steps(clients, arn)}
    missing = [name for name in needed if statuses.get(name) != Status.SUCCEEDED]
    if missing:
        said = ", ".join(f"{name} ({statuses.get(name) or 'not run'})" for name in missing)
        raise UsageError(f"--reference {arn} has no outputs of {said}, which the selection needs: choose a reference in "
                         "which they succeeded, or start from an earlier step")


def selective_execution(clients: Clients, settings: Settings, start: str,
                        reference: str | None) -> Callable[[dict], dict[str, Any]]:
    """What ``start_execution`` calls with the deployed definition: the checked SelectiveExecutionConfig."""

    def config(deployed: dict) -> dict[str, Any]:
        nodes = steps_of(deployed)
        selected = downstream_of(nodes, start)
        limit = max_selected_steps()
        if len(selected) > limit:
            raise UsageError(f"--from {start} selects {len(selected)} steps, and one selective execution runs at most "
                             f"{limit}: start from a later step")
        needed = needed_from_reference(nodes, selected)
        arn = reference_execution(clients, settings, reference)
        check_reference(clients, arn, nodes, needed)
        print(f"running {len(selected)} steps from {start}; the outputs of {', '.join(needed) or 'no other step'} "
              f"come from {arn}", flush=True)
        return {"SourcePipelineExecutionArn": arn, "SelectedSteps": [{"StepName": name} for name in selected]}

    return config

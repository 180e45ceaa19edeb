"""``start`` and ``--wait``: an execution of the deployed pipeline with checked parameters, followed
step by step until it ends."""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

from pipeline.aws import AwsError, Clients, explained
from pipeline.commands import parse_parameters
from pipeline.constraints import parameter_text
from pipeline.dag import steps_of, topological_order
from pipeline.parameters import MALFORMED, OUT_OF_RANGE, UNKNOWN, WRONG_TYPE, ParameterError
from pipeline.progress import ProgressView, StepRow
from pipeline.publish.pipeline_resource import deployed_definition
from pipeline.settings import Settings
from pipeline.status import FINISHED, Status

DEFAULT_POLL_SECONDS = 20.0


def pipeline_parameters(pairs: Iterable[str], definition: dict) -> list[dict[str, str]]:
    """``Name=Value`` pairs checked against the pipeline's parameters, as StartPipelineExecution's PipelineParameters."""
    values = parse_parameters(list(pairs), definition, refusal=_refusal)
    return [{"Name": name, "Value": parameter_text(value)} for name, value in values.items()]


def trial_instance_note(parameters: list[dict[str, str]], definition: dict) -> str | None:
    """What ``start`` says when the tuning trials will train the whole network on another instance type than the
    final trainings: with ``PretrainedWeights=none`` train.py trains every trial whole (the frozen-backbone rule),
    and a definition cannot choose the trials' instance type from a parameter's value."""
    values = {item["Name"]: str(item["DefaultValue"]) for item in definition.get("Parameters", []) if "DefaultValue" in item}
    values.update({item["Name"]: item["Value"] for item in parameters})
    tuning, training = values.get("TuningInstanceType"), values.get("TrainingInstanceType")
    if values.get("PretrainedWeights") != "none" or tuning is None or tuning == training:
        return None
    return (f"note: PretrainedWeights=none makes each tuning trial train the whole network, on TuningInstanceType={tuning}, "
            f"while the final trainings run on TrainingInstanceType={training}; add --param TuningInstanceType={training} "
            "to give the trials what the trainings get")


def _refusal(error: ParameterError) -> str:
    """The refusal worded for ``start``, which checks against the deployed pipeline."""
    if error.problem == MALFORMED:
        return f"--param {error.pair!r} is not Name=Value"
    if error.problem == UNKNOWN:
        return f"--param {error.name}: the pipeline has no such parameter; it has {', '.join(error.declared)}"
    if error.problem == WRONG_TYPE:
        kind = error.parameter.get("Type", "String").lower()
        return f"--param {error.name}={error.text!r} is not {'an' if kind == 'integer' else 'a'} {kind}"
    if error.problem == OUT_OF_RANGE:
        return str(error)
    return f"--param {error.name}={error.text!r} is not one of {', '.join(map(str, error.parameter['EnumValues']))}"


def start_execution(clients: Clients, settings: Settings, parameters: list[str], display_name: str | None = None,
                    selective: Callable[[dict], dict[str, Any]] | None = None) -> str:
    """Start an execution of the deployed pipeline; returns its ARN. ``selective`` makes a selective execution:
    it gets the deployed definition and returns the request's SelectiveExecutionConfig."""
    name = settings.pipeline_name
    with explained(f"starting pipeline {name}"):
        deployed = deployed_definition(clients, name)
        if deployed is None:
            raise AwsError(f"pipeline {name} does not exist in {settings.region}: run dogbreed upsert first")
        request: dict[str, Any] = {
            "PipelineName": name,
            "PipelineParameters": pipeline_parameters(parameters, deployed),
            "ClientRequestToken": str(uuid.uuid4()),  # a retried call cannot start a second execution
        }
        note = trial_instance_note(request["PipelineParameters"], deployed)
        if note:
            print(note, file=sys.stderr, flush=True)
        if display_name:
            request["PipelineExecutionDisplayName"] = display_name
        if selective is not None:
            request["SelectiveExecutionConfig"] = selective(deployed)
        return clients.sagemaker.start_pipeline_execution(**request)["PipelineExecutionArn"]


@dataclass(frozen=True)
class ExecutionSnapshot:
    status: str
    failure_reason: str
    rows: list[StepRow]

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def failed_steps(self) -> list[StepRow]:
        return [row for row in self.rows if row.status == Status.FAILED]


def snapshot_of(execution: dict, step_summaries: list[dict], order: list[str]) -> ExecutionSnapshot:
    """Rows for every step of the definition in ``order``, filled from ListPipelineExecutionSteps.

    Steps not listed yet are Pending; once the execution has finished they are
    shown as not run (a branch not taken, or steps after a failure).
    """
    latest: dict[str, dict] = {}
    for summary in step_summaries:
        name = summary["StepName"]
        if name not in latest or start_time_of(summary) >= start_time_of(latest[name]):
            latest[name] = summary
    status = execution.get("PipelineExecutionStatus", Status.EXECUTING)
    finished = status in FINISHED
    rows = []
    for name in [*order, *(n for n in latest if n not in order)]:
        summary = latest.get(name)
        if summary is None:
            rows.append(StepRow(name, Status.NOT_RUN if finished else Status.PENDING))
            continue
        rows.append(StepRow(
            name, summary.get("StepStatus", Status.EXECUTING), summary.get("StartTime"), summary.get("EndTime"),
            (summary.get("FailureReason") or "").strip(),
        ))
    return ExecutionSnapshot(status, (execution.get("FailureReason") or "").strip(), rows)


def start_time_of(summary: dict) -> datetime:
    return summary.get("StartTime") or datetime.min.replace(tzinfo=timezone.utc)


def watch(poll: Callable[[], ExecutionSnapshot], view: ProgressView, *, interval: float,
          sleep: Callable[[float], None] = time.sleep) -> ExecutionSnapshot:
    """Poll until the execution finishes, showing each snapshot; returns the last one."""
    while True:
        snapshot = poll()
        view.update(snapshot.rows, status=snapshot.status)
        if snapshot.finished:
            return snapshot
        sleep(interval)


def failure_message(arn: str, snapshot: ExecutionSnapshot) -> str:
    """One line for a failed or stopped execution, naming the failing steps and their reasons."""
    failed = snapshot.failed_steps()
    if failed:
        reasons = "; ".join(f"step {row.name} failed: {row.reason or 'no reason given'}" for row in failed)
    else:
        reasons = snapshot.failure_reason or "no reason given"
    return f"execution {arn} {snapshot.status}: {reasons}"


def execution_poller(clients: Clients, arn: str) -> Callable[[], ExecutionSnapshot]:
    """A function that reads the execution's status and steps, with steps in the definition's order."""

    with explained(f"reading the definition of execution {arn}"):
        definition = json.loads(clients.sagemaker.describe_pipeline_definition_for_execution(
            PipelineExecutionArn=arn)["PipelineDefinition"])
    order = topological_order(steps_of(definition))

    def poll() -> ExecutionSnapshot:
        with explained(f"following execution {arn}"):
            execution = clients.sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)
            summaries = execution_steps(clients, arn)
        return snapshot_of(execution, summaries, order)

    return poll


def execution_steps(clients: Clients, arn: str) -> list[dict]:
    """ListPipelineExecutionSteps, every page, oldest step first."""
    summaries: list[dict] = []
    request: dict[str, Any] = {"PipelineExecutionArn": arn, "SortOrder": "Ascending"}
    while True:
        page = clients.sagemaker.list_pipeline_execution_steps(**request)
        summaries.extend(page.get("PipelineExecutionSteps", []))
        if not page.get("NextToken"):
            return summaries
        request["NextToken"] = page["NextToken"]


def start_and_maybe_wait(args: argparse.Namespace, clients: Clients, settings: Settings,
                         selective: Callable[[dict], dict[str, Any]] | None = None) -> int:
    arn = start_execution(clients, settings, args.params, getattr(args, "execution_name", None), selective)
    print(arn, flush=True)
    return follow(args, clients, settings, arn)


def follow(args: argparse.Namespace, clients: Clients, settings: Settings, arn: str) -> int:
    """With --wait, the execution's progress until it ends; 0 when it succeeded (or was not followed)."""
    if not args.wait:
        return 0
    poll = execution_poller(clients, arn)
    plain = True if args.no_progress else None
    try:
        with ProgressView(settings.pipeline_name, plain=plain) as view:
            snapshot = watch(poll, view, interval=args.poll_seconds)
    except KeyboardInterrupt:
        print(f"stopped watching; the execution goes on: {arn}", file=sys.stderr)
        raise
    if snapshot.status == Status.SUCCEEDED:
        return 0
    print(f"dogbreed {args.command}: {failure_message(arn, snapshot)}", file=sys.stderr)
    return 1

"""Which execution a command means: one named by ARN or id, checked to be of the project's pipeline, or the
pipeline's latest (with a given status). Used by ``diagnose``, ``retry`` and ``start --from``."""
from __future__ import annotations

import re
from typing import Any

from pipeline.aws import Clients, explained
from pipeline.commands import UsageError
from pipeline.publish.executions import start_time_of
from pipeline.settings import Settings

EXECUTION_ARN = re.compile(r"arn:aws[a-z-]*:sagemaker:[a-z0-9-]+:[0-9]{12}:pipeline/(?P<pipeline>[^/]+)/execution/(?P<id>[A-Za-z0-9]+)")
EXECUTION_ID = re.compile(r"[A-Za-z0-9]{1,64}")


def execution_arn(settings: Settings, given: str) -> str:
    """An execution of this project's pipeline named by its ARN or by its id (the ARN's last part)."""
    if not given.startswith("arn:"):
        if not EXECUTION_ID.fullmatch(given):
            raise UsageError(f"{given!r} is neither an execution ARN nor an execution id (letters and digits, "
                             f"as the last part of arn:aws:sagemaker:REGION:ACCOUNT:pipeline/NAME/execution/ID)")
        return f"arn:aws:sagemaker:{settings.region}:{settings.account}:pipeline/{settings.pipeline_name.lower()}/execution/{given}"
    match = EXECUTION_ARN.fullmatch(given)
    if match is None:
        raise UsageError(f"{given} is not a pipeline execution ARN (arn:aws:sagemaker:REGION:ACCOUNT:pipeline/NAME/execution/ID)")
    if match["pipeline"].lower() != settings.pipeline_name.lower():
        raise UsageError(f"execution {given} is one of pipeline {match['pipeline']}, not of {settings.pipeline_name}: "
                         f"give an execution of {settings.pipeline_name} (or --project-name of the other pipeline)")
    return given


def latest_execution(clients: Clients, pipeline: str, status: str | None = None) -> dict:
    """The newest execution summary of ``pipeline`` (with ``status`` when given); a UsageError when there is none."""
    request: dict[str, Any] = {"PipelineName": pipeline, "SortBy": "CreationTime", "SortOrder": "Descending"}
    with explained(f"listing the executions of pipeline {pipeline}"):
        while True:
            page = clients.sagemaker.list_pipeline_executions(**request)
            for summary in sorted(page.get("PipelineExecutionSummaries", []), key=start_time_of, reverse=True):
                if status is None or summary.get("PipelineExecutionStatus") == status:
                    return summary
            if not page.get("NextToken"):
                break
            request["NextToken"] = page["NextToken"]
    which = f"{status.lower()} execution" if status else "execution"
    raise UsageError(f"pipeline {pipeline} has no {which}: start one with dogbreed start")


def chosen_execution(clients: Clients, settings: Settings, given: str | None) -> str:
    """The ARN of the execution the user named, or of the pipeline's latest one."""
    if given:
        return execution_arn(settings, given)
    return latest_execution(clients, settings.pipeline_name)["PipelineExecutionArn"]

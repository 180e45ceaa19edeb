"""Upsert's SageMaker pipeline: created, or updated when the deployed definition or its display name,
description, role or parallelism differ; missing tags added."""
from __future__ import annotations

import json
import uuid
from typing import Any

from botocore.exceptions import ClientError

from pipeline.aws import Clients, error_code, error_message, explained
from pipeline.changes import diff_definitions
from pipeline.settings import Settings

DEFAULT_MAX_PARALLEL_STEPS = 2  # the twins (single/multi instance) run side by side; nothing else is parallel


def pipeline_attributes(settings: Settings, max_parallel_steps: int) -> dict[str, Any]:
    return {
        # CreatePipeline takes a display name of letters, digits and hyphens only (the PipelineName pattern).
        "PipelineDisplayName": f"dog-breed-classifier-{settings.project_name}",
        "PipelineDescription": "Prepares the dog images, tunes, trains single- and multi-instance models, evaluates, "
                               "registers and deploys those that pass the accuracy threshold.",
        "RoleArn": settings.pipeline_role_arn,
        "ParallelismConfiguration": {"MaxParallelExecutionSteps": max_parallel_steps},
    }


def deploy_pipeline_attributes(settings: Settings) -> dict[str, Any]:
    """The deploy-only pipeline's: one chain of three steps runs, so one step at a time."""
    return {
        "PipelineDisplayName": f"dog-breed-classifier-{settings.project_name}-deploy",
        "PipelineDescription": "Deploys a model package approved after registration to its endpoint with the pipeline's "
                               "own Deploy, WaitFor and Check steps; started by the approval rule.",
        "RoleArn": settings.pipeline_role_arn,
        "ParallelismConfiguration": {"MaxParallelExecutionSteps": 1},
    }


def deployed_pipeline(clients: Clients, name: str) -> dict[str, Any] | None:
    """DescribePipeline's answer, or None when the pipeline does not exist."""
    try:
        return clients.sagemaker.describe_pipeline(PipelineName=name)
    except ClientError as error:
        if _pipeline_missing(error):
            return None
        raise


def deployed_definition(clients: Clients, name: str) -> dict | None:
    """The deployed pipeline's definition document, or None when the pipeline does not exist."""
    deployed = deployed_pipeline(clients, name)
    return None if deployed is None else json.loads(deployed["PipelineDefinition"])


def _pipeline_missing(error: ClientError) -> bool:
    message = error_message(error).lower()
    return error_code(error) in ("ResourceNotFound", "ResourceNotFoundException") or (
        error_code(error) == "ValidationException" and ("could not find" in message or "does not exist" in message))


def publish_pipeline(clients: Clients, settings: Settings, definition: str, document: dict, tags: list[dict[str, str]],
                     max_parallel_steps: int, *, deploy_only: bool = False) -> tuple[str, bool]:
    """Create or update the pipeline (with ``deploy_only``, the deploy-only one) with ``definition``, the text sent as
    it is, whose parsed ``document`` is compared with the deployed one."""
    name = settings.deploy_pipeline_name if deploy_only else settings.pipeline_name
    attributes = deploy_pipeline_attributes(settings) if deploy_only else pipeline_attributes(settings, max_parallel_steps)
    with explained(f"publishing pipeline {name}", role=settings.pipeline_role_arn):
        deployed = deployed_pipeline(clients, name)
        if deployed is None:
            clients.sagemaker.create_pipeline(
                PipelineName=name, PipelineDefinition=definition, Tags=tags,
                ClientRequestToken=str(uuid.uuid4()), **attributes,
            )
            steps = len(diff_definitions({}, document).added_steps)
            return f"pipeline {name}: created ({steps} steps)", True
        done = []
        diff = diff_definitions(json.loads(deployed["PipelineDefinition"]), document)
        different = [key for key, value in attributes.items() if deployed.get(key) != value]
        if not diff.equal or different:
            clients.sagemaker.update_pipeline(PipelineName=name, PipelineDefinition=definition, **attributes)
            if not diff.equal:
                done.append(f"definition updated: {diff.summary()}")
            if different:
                done.append(f"{', '.join(different)} updated")
        added = _missing_tags(clients, deployed["PipelineArn"], tags)
        if added:
            clients.sagemaker.add_tags(ResourceArn=deployed["PipelineArn"], Tags=added)
            done.append(f"tags added ({', '.join(tag['Key'] for tag in added)})")
    if not done:
        return f"pipeline {name}: unchanged", False
    return f"pipeline {name}: {'; '.join(done)}", True


def _missing_tags(clients: Clients, arn: str, tags: list[dict[str, str]]) -> list[dict[str, str]]:
    have: dict[str, str] = {}
    request: dict[str, Any] = {"ResourceArn": arn}
    while True:
        page = clients.sagemaker.list_tags(**request)
        have.update((tag["Key"], tag["Value"]) for tag in page.get("Tags", []))
        if not page.get("NextToken"):
            break
        request["NextToken"] = page["NextToken"]
    return [tag for tag in tags if have.get(tag["Key"]) != tag["Value"]]

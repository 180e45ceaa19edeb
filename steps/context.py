"""What every step factory receives: settings, SDK session, parameters, assets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sagemaker.core.workflow.execution_variables import ExecutionVariables
from sagemaker.core.workflow.functions import Join
from sagemaker.core.workflow.pipeline_context import PipelineSession
from sagemaker.mlops.workflow.retry import (
    SageMakerJobExceptionTypeEnum,
    SageMakerJobStepRetryPolicy,
    StepExceptionTypeEnum,
    StepRetryPolicy,
)
from sagemaker.mlops.workflow.steps import CacheConfig

from steps.parameters import Parameters

if TYPE_CHECKING:  # the settings object is built by pipeline/, steps only read it
    from pipeline.settings import Settings

CACHE = CacheConfig(enable_caching=True, expire_after="P30D")


@dataclass(frozen=True)
class BuildContext:
    settings: "Settings"
    session: PipelineSession
    parameters: Parameters
    code_uri: str  # S3 URI of the content-addressed code/ tarball
    contract: Any  # code/contract.py, loaded by path
    training_image: str
    inference_image: str

    def execution_path(self, *parts: str) -> Join:
        """An S3 prefix unique to the running execution, under the artifact prefix."""
        return Join(on="/", values=[self.settings.s3_uri("executions"), ExecutionVariables.PIPELINE_EXECUTION_ID, *parts])


def job_step_policies() -> dict:
    """A job step's caching and retries, as keyword arguments: every processing, tuning and training step has them."""
    return {"cache_config": CACHE, "retry_policies": retry_policies()}


def retry_policies() -> list:
    """Retry what AWS may throw at a job step and later accept: throttling and capacity."""
    return [
        StepRetryPolicy(
            exception_types=[StepExceptionTypeEnum.THROTTLING, StepExceptionTypeEnum.SERVICE_FAULT],
            interval_seconds=10, backoff_rate=2.0, max_attempts=5,
        ),
        SageMakerJobStepRetryPolicy(
            exception_types=[SageMakerJobExceptionTypeEnum.CAPACITY_ERROR, SageMakerJobExceptionTypeEnum.RESOURCE_LIMIT,
                             SageMakerJobExceptionTypeEnum.INTERNAL_ERROR],
            interval_seconds=60, backoff_rate=2.0, max_attempts=3,
        ),
    ]

"""DeploySingleInstance / DeployMultiInstance: put a registered model behind its endpoint.

A LambdaStep (it stops after ten minutes), so it only starts the change and
returns; ``steps/wait.py`` waits for the endpoint and ``steps/check.py``
proves it answers. The function is published by ``dogbreed upsert``.
"""
from __future__ import annotations

from sagemaker.core.workflow.entities import PipelineVariable
from sagemaker.mlops.workflow.lambda_step import LambdaStep

from steps.context import BuildContext
from steps.lambda_step import lambda_step
from steps.variants import Variant

DEPLOY_OUTPUTS = ("endpoint_name", "endpoint_config_name", "model_name", "action")
# Intra-op threads of each TorchServe worker; the function gives the model one worker per this many vCPUs
# (ml.m5.large: 2 workers). Chosen from benchmarks/serving_load.py (benchmarks/README.md "Serving under load").
THREADS_PER_WORKER = 1


def endpoint_name(ctx: BuildContext, variant: Variant) -> str:
    return f"{ctx.settings.project_name}-{variant.slug}"


def deploy_step(ctx: BuildContext, variant: Variant, model_package_arn: PipelineVariable) -> LambdaStep:
    """``model_package_arn``: the Register step's property in the pipeline, a parameter in the deploy-only one."""
    params = ctx.parameters
    return lambda_step(
        ctx, "deploy-endpoint", DEPLOY_OUTPUTS,
        **variant.names("Deploy", "Deploy"),
        description=f"Creates or updates the endpoint {endpoint_name(ctx, variant)} from the registered model package; "
                    "returns at once, without waiting for the endpoint.",
        inputs={
            "model_package_arn": model_package_arn,
            "endpoint_name": endpoint_name(ctx, variant),
            "instance_type": params.endpoint_instance_type,
            "initial_instance_count": params.endpoint_initial_instance_count,
            "model_role_arn": ctx.settings.model_role_arn,
            "data_capture_s3_uri": params.data_capture_s3_uri,
            "kms_key_id": ctx.settings.kms_key_id,
            "threads_per_worker": THREADS_PER_WORKER,
            "deployment_strategy": params.deployment_strategy,
            "deployment_step_percent": params.deployment_step_percent,
            "deployment_bake_seconds": params.deployment_bake_seconds,
            "max_wait_minutes": params.endpoint_wait_minutes,
        },
    )

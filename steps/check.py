"""CheckSingleInstance / CheckMultiInstance: prove the endpoint the wait step saw InService answers.

A LambdaStep, quick because the endpoint is ready when it starts: it sets the
endpoint's auto scaling, sends it a real image and checks that the answer
ranks every class of the prepared data.
"""
from __future__ import annotations

from sagemaker.core.workflow.functions import JsonGet
from sagemaker.mlops.workflow.callback_step import CallbackStep
from sagemaker.mlops.workflow.lambda_step import LambdaStep
from sagemaker.mlops.workflow.steps import ProcessingStep

from steps.context import BuildContext
from steps.lambda_step import lambda_step
from steps.prepare import manifest_property_file
from steps.variants import Variant

CHECK_OUTPUTS = ("endpoint_name", "status", "top_label", "latency_ms")
CHECK_WAIT_SECONDS = 60  # the endpoint is InService when Check starts; this only covers a status that lags


def check_step(ctx: BuildContext, variant: Variant, wait: CallbackStep, prepare: ProcessingStep) -> LambdaStep:
    params = ctx.parameters
    return lambda_step(
        ctx, "check-endpoint", CHECK_OUTPUTS,
        **variant.names("Check", "Check"),
        description="Verifies the endpoint the wait step saw InService: sets its auto scaling, sends it a real image and "
                    "checks that the answer ranks every class of the prepared data.",
        inputs={
            "endpoint_name": wait.properties.Outputs["endpoint_name"],
            "endpoint_config_name": wait.properties.Outputs["endpoint_config_name"],
            "wait_seconds": CHECK_WAIT_SECONDS,
            "min_capacity": params.endpoint_min_capacity,
            "max_capacity": params.endpoint_max_capacity,
            "target_invocations_per_instance": params.endpoint_target_invocations,
            "num_classes": JsonGet(step_name=prepare.name, property_file=manifest_property_file(ctx.contract),
                                   json_path=ctx.contract.CLASS_COUNT_JSON_PATH),
        },
    )

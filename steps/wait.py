"""WaitForSingleInstance / WaitForMultiInstance: wait, with no ten-minute limit, for the endpoint just deployed.

A CallbackStep: it sends its token to the endpoint-wait SQS queue, and the
wait-endpoint function answers it once the endpoint is InService on the
configuration the Deploy step chose, has failed or been rolled back, or
``EndpointWaitMinutes`` have passed.
"""
from __future__ import annotations

from sagemaker.mlops.workflow.callback_step import CallbackOutput, CallbackOutputTypeEnum, CallbackStep
from sagemaker.mlops.workflow.lambda_step import LambdaStep

from steps.context import BuildContext
from steps.variants import Variant

WAIT_OUTPUTS = ("endpoint_name", "endpoint_config_name", "status")


def wait_step(ctx: BuildContext, variant: Variant, deploy: LambdaStep) -> CallbackStep:
    return CallbackStep(
        **variant.names("WaitFor", "Wait for endpoint"),
        description="Waits, with no ten-minute limit, until the endpoint is InService on the configuration just deployed; "
                    "fails when it fails, is rolled back, or is not InService within EndpointWaitMinutes.",
        sqs_queue_url=ctx.settings.endpoint_wait_queue_url,
        inputs={
            "endpoint_name": deploy.properties.Outputs["endpoint_name"],
            "endpoint_config_name": deploy.properties.Outputs["endpoint_config_name"],
            "max_wait_minutes": ctx.parameters.endpoint_wait_minutes,
        },
        outputs=[CallbackOutput(output_name=name, output_type=CallbackOutputTypeEnum.String) for name in WAIT_OUTPUTS],
    )

"""DeploySingleInstance / WaitForSingleInstance / CheckSingleInstance and twins: put a model
behind an endpoint, wait for it, and prove the endpoint answers.

Deploy and Check are LambdaSteps (a LambdaStep stops after ten minutes, so
neither waits long). The wait between them is a CallbackStep, which has no
time limit: it sends its token to the endpoint-wait SQS queue, and the
wait-endpoint function answers it once the endpoint is InService, has
failed, or ``EndpointWaitMinutes`` have passed. The functions are published
by ``dogbreed upsert``; the definition refers to them by ARN so that building
it never creates a Lambda function.
"""
from __future__ import annotations

from sagemaker.lambda_helper import Lambda
from sagemaker.workflow.callback_step import CallbackOutput, CallbackOutputTypeEnum, CallbackStep
from sagemaker.workflow.lambda_step import LambdaOutput, LambdaOutputTypeEnum, LambdaStep
from sagemaker.workflow.functions import JsonGet
from sagemaker.workflow.step_collections import RegisterModel
from sagemaker.workflow.steps import ProcessingStep

from steps.context import BuildContext
from steps.prepare import manifest_property_file
from steps.variants import Variant

DEPLOY_OUTPUTS = ("endpoint_name", "endpoint_config_name", "model_name", "action")
WAIT_OUTPUTS = ("endpoint_name", "endpoint_config_name", "status")
CHECK_OUTPUTS = ("endpoint_name", "status", "top_label", "latency_ms")
CHECK_WAIT_SECONDS = 60  # the endpoint is InService when Check starts; this only covers a status that lags


def endpoint_name(ctx: BuildContext, variant: Variant) -> str:
    return f"{ctx.settings.project_name}-{variant.slug}"


def _outputs(names: tuple[str, ...]) -> list[LambdaOutput]:
    return [LambdaOutput(output_name=name, output_type=LambdaOutputTypeEnum.String) for name in names]


def _function(ctx: BuildContext, function: str) -> Lambda:
    return Lambda(function_arn=ctx.settings.lambda_arn(function), session=ctx.session)


def deploy_step(ctx: BuildContext, variant: Variant, register: RegisterModel) -> LambdaStep:
    params = ctx.parameters
    return LambdaStep(
        name=variant.step("Deploy"),
        display_name=f"Deploy ({variant.title})",
        description=f"Creates or updates the endpoint {endpoint_name(ctx, variant)} from the registered model package; "
                    "returns at once, without waiting for the endpoint.",
        lambda_func=_function(ctx, "deploy-endpoint"),
        inputs={
            "model_package_arn": register.properties.ModelPackageArn,
            "endpoint_name": endpoint_name(ctx, variant),
            "instance_type": params.endpoint_instance_type,
            "initial_instance_count": params.endpoint_initial_instance_count,
            "model_role_arn": ctx.settings.model_role_arn,
            "data_capture_s3_uri": params.data_capture_s3_uri,
            "kms_key_id": ctx.settings.kms_key_id,
        },
        outputs=_outputs(DEPLOY_OUTPUTS),
    )


def wait_step(ctx: BuildContext, variant: Variant, deploy: LambdaStep) -> CallbackStep:
    return CallbackStep(
        name=variant.step("WaitFor"),
        display_name=f"Wait for endpoint ({variant.title})",
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


def check_step(ctx: BuildContext, variant: Variant, wait: CallbackStep, prepare: ProcessingStep) -> LambdaStep:
    params = ctx.parameters
    return LambdaStep(
        name=variant.step("Check"),
        display_name=f"Check ({variant.title})",
        description="Verifies the endpoint the wait step saw InService: sets its auto scaling, sends it a real image and "
                    "checks that the answer ranks every class of the prepared data.",
        lambda_func=_function(ctx, "check-endpoint"),
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
        outputs=_outputs(CHECK_OUTPUTS),
    )

"""RegisterSingleInstance / RegisterMultiInstance: a model package with its evaluation."""
from __future__ import annotations

from sagemaker.core.model_metrics import MetricsSource, ModelMetrics
from sagemaker.mlops.workflow.model_step import ModelStep
from sagemaker.mlops.workflow.steps import ProcessingStep, TrainingStep
from sagemaker.serve.model_builder import ModelBuilder

from steps.context import BuildContext, retry_policies
from steps.evaluate import evaluation_uri, served_precision
from steps.variants import Variant

CONTENT_TYPES = ["image/jpeg", "image/png", "application/x-image", "application/json"]
RESPONSE_TYPES = ["application/json"]
CPU_INSTANCES = ("ml.m5.large", "ml.m5.xlarge", "ml.c5.large", "ml.c5.xlarge")
GPU_INSTANCES = ("ml.g4dn.xlarge", "ml.g5.xlarge")


def supported_inference_instances(ctx: BuildContext) -> list[str]:
    """The model package's real-time instance types: the settings' endpoint instance type and others of its kind.

    Static, from the settings rather than the EndpointInstanceType parameter: the inference image is chosen at
    synth for the settings' instance type (a CPU or a GPU image), so what it can serve on is fixed by then."""
    endpoint_instance_type = ctx.settings.endpoint_instance_type
    gpu = endpoint_instance_type.startswith(("ml.g", "ml.p"))
    return sorted({endpoint_instance_type, *(GPU_INSTANCES if gpu else CPU_INSTANCES)})


def inference_environment(ctx: BuildContext) -> dict[str, str]:
    """The PyTorch inference container runs code/inference.py, which train.py packs into the model."""
    return {
        "SAGEMAKER_PROGRAM": ctx.contract.INFERENCE_SCRIPT,
        "SAGEMAKER_SUBMIT_DIRECTORY": f"/opt/ml/model/{ctx.contract.MODEL_CODE_DIR}",
        "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
        "SAGEMAKER_REGION": ctx.settings.region,
        "TS_DEFAULT_RESPONSE_TIMEOUT": "60",
    }


def register_step(ctx: BuildContext, variant: Variant, training: TrainingStep, evaluation: ProcessingStep) -> ModelStep:
    builder = ModelBuilder(
        image_uri=ctx.inference_image,
        s3_model_data_url=training.properties.ModelArtifacts.S3ModelArtifacts,
        role_arn=ctx.settings.model_role_arn,
        # the endpoint's model_fn serves the precision the evaluation chose
        env_vars={**inference_environment(ctx), ctx.contract.INFERENCE_PRECISION_ENV: served_precision(ctx, variant, evaluation)},
        sagemaker_session=ctx.session,
        # None, else register() resolves the default dependencies and asks S3 for the default bucket
        # (sagemaker/serve/model_builder.py, ``dependencies`` defaults to {"auto": True})
        dependencies=None,
    )
    metrics = ModelMetrics(model_statistics=MetricsSource(s3_uri=evaluation_uri(ctx, evaluation), content_type="application/json"))
    description = f"Registers the {variant.title} model in the model package group with its test metrics."
    step_args = builder.register(
        model_package_group_name=ctx.settings.model_package_group,
        description=description,
        content_types=CONTENT_TYPES,
        response_types=RESPONSE_TYPES,
        inference_instances=supported_inference_instances(ctx),
        transform_instances=["ml.m5.xlarge"],
        approval_status=ctx.parameters.model_approval_status,
        model_metrics=metrics,
    )
    return ModelStep(
        **variant.names("Register", "Register"),
        description=description,
        step_args=step_args,
        retry_policies=retry_policies()[:1],
    )

"""The estimator that runs code/train.py, shared by tuning and both training steps."""
from __future__ import annotations

from typing import Mapping

from sagemaker.inputs import TrainingInput
from sagemaker.processing import ProcessingInput
from sagemaker.pytorch import PyTorch
from sagemaker.workflow.steps import ProcessingStep

from steps.context import BuildContext
from steps.prepare import channel_uri

TRAIN_SCRIPT = "train.py"
MAX_RUNTIME_SECONDS = 8 * 3600


def static_hyperparameters(ctx: BuildContext, *, augment: bool, cache_features: bool) -> dict:
    """No freeze_backbone: train.py's default follows the weights (frozen when loaded, trained when random),
    which a static value could not do for every PretrainedWeights. ``cache_features`` asks for caching where
    it applies (auto: a frozen backbone without augmentation). The rest of the recipe (schedule, label
    smoothing, crop scale) is train.py's defaults."""
    params = ctx.parameters
    return {
        "backbone": params.backbone,
        "image_size": params.image_size,
        "pretrained_weights": params.pretrained_weights,
        "augment": "true" if augment else "false",
        "flip": params.horizontal_flip,
        "cache_features": "auto" if cache_features else "false",
        "seed": "42",
        "patience": "3",
    }


def pytorch_estimator(
    ctx: BuildContext,
    *,
    instance_count,
    hyperparameters: Mapping[str, object],
    output_path: str,
    base_job_name: str,
    instance_type=None,
    spot_checkpoint_s3_uri=None,
    encrypt_traffic: bool = False,
) -> PyTorch:
    """With ``spot_checkpoint_s3_uri`` the job runs on managed spot instances and
    checkpoints there, so an interruption resumes from the last epoch."""
    settings = ctx.settings
    spot = spot_checkpoint_s3_uri is not None
    return PyTorch(
        entry_point=TRAIN_SCRIPT,
        source_dir=ctx.code_uri,
        image_uri=ctx.training_image,
        role=settings.job_role_arn,
        instance_count=instance_count,
        instance_type=instance_type or ctx.parameters.training_instance_type,
        hyperparameters=dict(hyperparameters),
        metric_definitions=ctx.contract.metric_definitions(),
        output_path=output_path,
        code_location=settings.s3_uri("assets", "code"),
        base_job_name=base_job_name,
        sagemaker_session=ctx.session,
        volume_size=50,
        volume_kms_key=settings.kms_key_id or None,
        output_kms_key=settings.kms_key_id or None,
        max_run=MAX_RUNTIME_SECONDS,
        use_spot_instances=spot,
        max_wait=2 * MAX_RUNTIME_SECONDS if spot else None,
        checkpoint_s3_uri=spot_checkpoint_s3_uri,
        encrypt_inter_container_traffic=encrypt_traffic,
        disable_profiler=True,
        debugger_hook_config=False,
        environment={"PYTHONUNBUFFERED": "1"},
    )


def training_channels(ctx: BuildContext, prepare: ProcessingStep) -> dict[str, TrainingInput]:
    """The channels train.py reads, from PrepareData's outputs; the test split is never among them."""
    return {channel: TrainingInput(s3_data=channel_uri(prepare, channel), content_type="application/x-image")
            for channel in (ctx.contract.TRAIN_CHANNEL, ctx.contract.VALID_CHANNEL)}


def pretrained_channel(ctx: BuildContext) -> dict[str, TrainingInput]:
    """The ``pretrained`` channel (SM_CHANNEL_PRETRAINED): PretrainedWeightsS3Uri, read without internet.

    Its default is the job's own code archive, which train.py reads as "no weights supplied".
    """
    return {ctx.contract.PRETRAINED_CHANNEL: TrainingInput(s3_data=ctx.parameters.pretrained_weights_s3_uri)}


def pretrained_processing_input(ctx: BuildContext, destination: str) -> ProcessingInput:
    """The same weights as a processing job's input, downloaded to ``destination``."""
    return ProcessingInput(source=ctx.parameters.pretrained_weights_s3_uri, destination=destination,
                           input_name=ctx.contract.PRETRAINED_CHANNEL)

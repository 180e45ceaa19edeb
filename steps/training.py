"""The ModelTrainer that runs code/train.py, shared by tuning and both training steps.

The training image is the PyTorch framework container, whose toolkit
(sagemaker-training) downloads ``sagemaker_submit_directory`` and runs
``sagemaker_program`` from it: the content-addressed code archive synth
publishes. ModelTrainer's ``SourceCode`` is not used, since it uploads a driver
channel (``sm_drivers``) under a timestamped key while the definition is built
(``sagemaker/train/model_trainer.py``, ``_create_training_job_args``:
``sm_drivers_channel = self.create_input_data_channel(...)``).
"""
from __future__ import annotations

import json
from typing import Mapping

from sagemaker.core.helper.pipeline_variable import PipelineVariable
from sagemaker.core.shapes import (
    Channel,
    CheckpointConfig,
    MetricDefinition,
    DataSource,
    OutputDataConfig,
    ProcessingInput,
    S3DataSource,
    StoppingCondition,
)
from sagemaker.core.training.configs import Compute, Networking
from sagemaker.core.workflow.functions import Join
from sagemaker.core.workflow.parameters import ParameterString
from sagemaker.mlops.workflow.steps import ProcessingStep
from sagemaker.train.model_trainer import ModelTrainer

from steps.context import BuildContext
from steps.prepare import channel_uri
from steps.processing import processing_input

TRAIN_SCRIPT = "train.py"
MAX_RUNTIME_SECONDS = 8 * 3600


def static_hyperparameters(ctx: BuildContext, *, augment: bool, cache_features: bool) -> dict:
    """No freeze_backbone: train.py's default follows the weights (frozen when loaded, trained when random),
    which a static value could not do for every PretrainedWeights. ``cache_features`` asks for caching where
    it applies (auto: a frozen backbone without augmentation)."""
    params = ctx.parameters
    return {
        "backbone": params.backbone,
        "image_size": params.image_size,
        "pretrained_weights": params.pretrained_weights,
        "augment": "true" if augment else "false",
        "cache_features": "auto" if cache_features else "false",
        "seed": "42",
        "patience": "3",
    }


def framework_hyperparameters(ctx: BuildContext) -> dict[str, object]:
    """What the framework container's toolkit reads to find and run train.py (sagemaker-training's
    ``_params``: sagemaker_program, sagemaker_submit_directory, sagemaker_region, sagemaker_container_log_level)."""
    return {
        "sagemaker_program": TRAIN_SCRIPT,
        "sagemaker_submit_directory": ctx.code_uri,
        "sagemaker_region": ctx.settings.region,
        "sagemaker_container_log_level": 20,
    }


def hyperparameter_text(value: object):
    """A hyperparameter as the container's toolkit reads it: JSON text (it ``json.loads`` each value and keeps
    the raw string where that fails), a string parameter as it is, any other pipeline value joined into a string
    (HyperParameters is a map of strings).

    ModelTrainer would pass a string unquoted (``safe_serialize`` in ``sagemaker/train/model_trainer.py``),
    so that "42" reached train.py as the number 42 rather than the text it was; quoting here keeps what
    each value means to train.py exactly as before."""
    if isinstance(value, ParameterString):
        return value
    if isinstance(value, PipelineVariable):
        return Join(on="", values=[value])
    return json.dumps(value)


def trainer_hyperparameters(ctx: BuildContext, hyperparameters: Mapping[str, object]) -> dict:
    return {name: hyperparameter_text(value)
            for name, value in {**hyperparameters, **framework_hyperparameters(ctx)}.items()}


def model_trainer(
    ctx: BuildContext,
    *,
    instance_count,
    hyperparameters: Mapping[str, object],
    output_path: str,
    base_job_name: str,
    instance_type=None,
    spot_checkpoint_s3_uri=None,
    encrypt_traffic: bool = False,
) -> ModelTrainer:
    """With ``spot_checkpoint_s3_uri`` the job runs on managed spot instances and
    checkpoints there, so an interruption resumes from the last epoch."""
    settings = ctx.settings
    spot = spot_checkpoint_s3_uri is not None
    kms_key = settings.kms_key_id or None
    trainer = ModelTrainer(
        training_image=ctx.training_image,
        role=settings.job_role_arn,
        base_job_name=base_job_name,
        sagemaker_session=ctx.session,
        compute=Compute(
            instance_type=instance_type or ctx.parameters.training_instance_type,
            instance_count=instance_count,
            volume_size_in_gb=50,
            volume_kms_key_id=kms_key,
            enable_managed_spot_training=True if spot else None,
        ),
        stopping_condition=StoppingCondition(
            max_runtime_in_seconds=MAX_RUNTIME_SECONDS,
            max_wait_time_in_seconds=2 * MAX_RUNTIME_SECONDS if spot else None,
        ),
        # explicit, else TrainDefaults.get_output_data_config asks S3 for the default bucket
        # (sagemaker/train/defaults.py: ``_default_s3_uri(session=sagemaker_session, ...)``)
        output_data_config=OutputDataConfig(s3_output_path=output_path, kms_key_id=kms_key),
        checkpoint_config=CheckpointConfig(s3_uri=spot_checkpoint_s3_uri) if spot else None,
        networking=Networking(enable_inter_container_traffic_encryption=True) if encrypt_traffic else None,
        environment={"PYTHONUNBUFFERED": "1"},
        hyperparameters=trainer_hyperparameters(ctx, hyperparameters),
    )
    return trainer.with_metric_definitions(metric_definitions(ctx))


def metric_definitions(ctx: BuildContext) -> list[MetricDefinition]:
    """The contract's metrics (code/contract.py), as the shapes ModelTrainer and the tuner take."""
    return [MetricDefinition(name=metric["Name"], regex=metric["Regex"]) for metric in ctx.contract.metric_definitions()]


def s3_channel(name: str, uri, content_type: str | None = None) -> Channel:
    """An input channel of an S3 prefix, every field as the API reads it."""
    return Channel(channel_name=name, content_type=content_type, data_source=DataSource(s3_data_source=S3DataSource(
        s3_data_type="S3Prefix", s3_uri=uri, s3_data_distribution_type="FullyReplicated")))


def training_channels(ctx: BuildContext, prepare: ProcessingStep) -> list[Channel]:
    """The channels train.py reads, from PrepareData's outputs; the test split is never among them."""
    return [s3_channel(channel, channel_uri(prepare, channel), "application/x-image")
            for channel in (ctx.contract.TRAIN_CHANNEL, ctx.contract.VALID_CHANNEL)]


def pretrained_channel(ctx: BuildContext) -> list[Channel]:
    """The ``pretrained`` channel (SM_CHANNEL_PRETRAINED): PretrainedWeightsS3Uri, read without internet.

    Its default is the job's own code archive, which train.py reads as "no weights supplied".
    """
    return [s3_channel(ctx.contract.PRETRAINED_CHANNEL, ctx.parameters.pretrained_weights_s3_uri)]


def pretrained_processing_input(ctx: BuildContext, destination: str) -> ProcessingInput:
    """The same weights as a processing job's input, downloaded to ``destination``."""
    return processing_input(ctx.parameters.pretrained_weights_s3_uri, destination, ctx.contract.PRETRAINED_CHANNEL)

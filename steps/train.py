"""TrainSingleInstance and TrainMultiInstance: the final models, on the tuned hyperparameters."""
from __future__ import annotations

from sagemaker.mlops.workflow.steps import ProcessingStep, TrainingStep, TuningStep

from steps.context import BuildContext, job_step_policies
from steps.training import model_trainer, pretrained_channel, static_hyperparameters, training_channels
from steps.tune import best_hyperparameters
from steps.variants import MULTI, Variant


def instance_count(ctx: BuildContext, variant: Variant):
    return ctx.parameters.multi_instance_count if variant == MULTI else 1


def train_step(ctx: BuildContext, variant: Variant, prepare: ProcessingStep, tuning: TuningStep) -> TrainingStep:
    names = variant.names("Train", "Train")
    name = names["name"]
    hyperparameters = {
        **static_hyperparameters(ctx, augment=True, cache_features=False),
        **best_hyperparameters(tuning),
    }
    trainer = model_trainer(
        ctx,
        instance_count=instance_count(ctx, variant),
        hyperparameters=hyperparameters,
        output_path=ctx.settings.s3_uri("jobs", name),
        base_job_name=f"{ctx.settings.project_name}-train-{variant.slug}",
        spot_checkpoint_s3_uri=ctx.execution_path(name, "checkpoints") if ctx.settings.spot_training else None,
        encrypt_traffic=variant == MULTI,
    )
    step_args = trainer.train(input_data_config=[*training_channels(ctx, prepare), *pretrained_channel(ctx)])
    count = "MultiInstanceCount instances in one torch.distributed group" if variant == MULTI else "one instance"
    return TrainingStep(
        **names,
        description=f"Trains the classifier on {count}, with augmentation, on the best hyperparameters "
                    "of the tuning step; early stopping on validation loss keeps the best epoch.",
        step_args=step_args,
        **job_step_policies(),
    )

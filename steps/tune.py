"""TuneHyperparameters: Bayesian search that minimizes the validation loss."""
from __future__ import annotations

from sagemaker.core.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter
from sagemaker.core.shapes import Channel
from sagemaker.mlops.workflow.steps import ProcessingStep, TuningStep
from sagemaker.train.tuner import HyperparameterTuner

from steps.context import BuildContext, job_step_policies
from steps.features import features_uri
from steps.training import model_trainer, pretrained_channel, s3_channel, static_hyperparameters

STEP_NAME = "TuneHyperparameters"
TUNED = ("learning_rate", "batch_size", "epochs")


def hyperparameter_ranges() -> dict:
    return {
        "learning_rate": ContinuousParameter(1e-4, 1e-1, scaling_type="Logarithmic"),
        "batch_size": CategoricalParameter([16, 32, 64]),
        "epochs": IntegerParameter(3, 15),
    }


def features_channel(ctx: BuildContext, extraction: ProcessingStep) -> list[Channel]:
    """The trials' only channel: the features ExtractFeatures wrote (train.py reads SM_CHANNEL_FEATURES), never the images."""
    return [s3_channel(ctx.contract.FEATURES_CHANNEL, features_uri(extraction, ctx.contract), "application/x-pytorch")]


def tune_step(ctx: BuildContext, extraction: ProcessingStep) -> TuningStep:
    """Trials train only the head on the backbone features ExtractFeatures computed once (no augmentation:
    ranking them needs none), on their own, small TuningInstanceType. The final training steps reuse the winner."""
    trainer = model_trainer(
        ctx,
        instance_count=1,
        hyperparameters=static_hyperparameters(ctx, augment=False, cache_features=False),
        output_path=ctx.settings.s3_uri("jobs", STEP_NAME),
        base_job_name=f"{ctx.settings.project_name}-tune",
        instance_type=ctx.parameters.tuning_instance_type,
    )
    tuner = HyperparameterTuner(
        trainer,
        objective_metric_name=ctx.contract.OBJECTIVE_METRIC,
        objective_type=ctx.contract.OBJECTIVE_TYPE,
        hyperparameter_ranges=hyperparameter_ranges(),
        metric_definitions=ctx.contract.metric_definitions(),
        strategy="Bayesian",
        # settings, not parameters: the tuner's ResourceLimits shape takes only int
        # (sagemaker/core/shapes/shapes.py, ``class ResourceLimits``: ``max_parallel_training_jobs: int``)
        max_jobs=ctx.settings.tuning_max_jobs,
        max_parallel_jobs=ctx.settings.tuning_max_parallel_jobs,
        base_tuning_job_name=f"{ctx.settings.project_name}-tune",
    )
    step_args = tuner.tune(
        inputs=[*features_channel(ctx, extraction), *pretrained_channel(ctx)],
        job_name=f"{ctx.settings.project_name}-tune",
    )
    return TuningStep(
        name=STEP_NAME,
        display_name="Tune hyperparameters",
        description="Bayesian search over learning rate (log scale), batch size and epochs; "
                    f"the objective is {ctx.contract.OBJECTIVE_METRIC}, minimized, on the validation split.",
        step_args=step_args,
        **job_step_policies(),
    )


def best_hyperparameters(tuning: TuningStep) -> dict:
    """The winning trial's values, as property references for later steps."""
    tuned = tuning.properties.BestTrainingJob.TunedHyperParameters
    return {name: tuned[name] for name in TUNED}

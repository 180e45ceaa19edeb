"""TuneHyperparameters: Bayesian search that minimizes the validation loss."""
from __future__ import annotations

from sagemaker.inputs import TrainingInput
from sagemaker.tuner import CategoricalParameter, ContinuousParameter, HyperparameterTuner, IntegerParameter
from sagemaker.workflow.steps import ProcessingStep, TuningStep

from steps.context import BuildContext, job_step_policies
from steps.features import features_uri
from steps.training import pretrained_channel, pytorch_estimator, static_hyperparameters

STEP_NAME = "TuneHyperparameters"
TUNED = ("learning_rate", "batch_size", "epochs")


def hyperparameter_ranges() -> dict:
    return {
        "learning_rate": ContinuousParameter(1e-4, 1e-1, scaling_type="Logarithmic"),
        "batch_size": CategoricalParameter([16, 32, 64]),
        "epochs": IntegerParameter(3, 15),
    }


def features_channel(ctx: BuildContext, extraction: ProcessingStep) -> dict[str, TrainingInput]:
    """The trials' only channel: the features ExtractFeatures wrote (train.py reads SM_CHANNEL_FEATURES), never the images."""
    return {ctx.contract.FEATURES_CHANNEL: TrainingInput(s3_data=features_uri(extraction, ctx.contract),
                                                         content_type="application/x-pytorch")}


def tune_step(ctx: BuildContext, extraction: ProcessingStep) -> TuningStep:
    """Trials train only the head on the backbone features ExtractFeatures computed once (no augmentation:
    ranking them needs none), on their own, small TuningInstanceType. The final training steps reuse the winner."""
    estimator = pytorch_estimator(
        ctx,
        instance_count=1,
        hyperparameters=static_hyperparameters(ctx, augment=False, cache_features=False),
        output_path=ctx.settings.s3_uri("jobs", STEP_NAME),
        base_job_name=f"{ctx.settings.project_name}-tune",
        instance_type=ctx.parameters.tuning_instance_type,
    )
    tuner = HyperparameterTuner(
        estimator,
        objective_metric_name=ctx.contract.OBJECTIVE_METRIC,
        objective_type=ctx.contract.OBJECTIVE_TYPE,
        hyperparameter_ranges=hyperparameter_ranges(),
        metric_definitions=ctx.contract.metric_definitions(),
        strategy="Bayesian",
        max_jobs=ctx.parameters.tuning_max_jobs,
        max_parallel_jobs=ctx.parameters.tuning_max_parallel_jobs,
        base_tuning_job_name=f"{ctx.settings.project_name}-tune",
    )
    step_args = tuner.fit(
        inputs={**features_channel(ctx, extraction), **pretrained_channel(ctx)},
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

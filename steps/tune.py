"""TuneHyperparameters: Bayesian search that minimizes the validation loss."""
from __future__ import annotations

from sagemaker.tuner import CategoricalParameter, ContinuousParameter, HyperparameterTuner, IntegerParameter
from sagemaker.workflow.steps import ProcessingStep, TuningStep

from steps.context import CACHE, BuildContext, retry_policies
from steps.prepare import channel_uri
from steps.training import pytorch_estimator, static_hyperparameters, training_channels

STEP_NAME = "TuneHyperparameters"
TUNED = ("learning_rate", "batch_size", "epochs")


def hyperparameter_ranges() -> dict:
    return {
        "learning_rate": ContinuousParameter(1e-4, 1e-1, scaling_type="Logarithmic"),
        "batch_size": CategoricalParameter([16, 32, 64]),
        "epochs": IntegerParameter(3, 15),
    }


def tune_step(ctx: BuildContext, prepare: ProcessingStep) -> TuningStep:
    """Trials train the head on cached backbone features (no augmentation): cheap, and
    ranking them needs no augmentation. The final training steps reuse the winner."""
    estimator = pytorch_estimator(
        ctx,
        instance_count=1,
        hyperparameters=static_hyperparameters(ctx, augment=False, cache_features=True),
        output_path=ctx.settings.s3_uri("jobs", STEP_NAME),
        base_job_name=f"{ctx.settings.project_name}-tune",
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
        inputs=training_channels(channel_uri(prepare, "train"), channel_uri(prepare, "valid")),
        job_name=f"{ctx.settings.project_name}-tune",
    )
    return TuningStep(
        name=STEP_NAME,
        display_name="Tune hyperparameters",
        description="Bayesian search over learning rate (log scale), batch size and epochs; "
                    f"the objective is {ctx.contract.OBJECTIVE_METRIC}, minimized, on the validation split.",
        step_args=step_args,
        cache_config=CACHE,
        retry_policies=retry_policies(),
    )


def best_hyperparameters(tuning: TuningStep) -> dict:
    """The winning trial's values, as property references for later steps."""
    tuned = tuning.properties.BestTrainingJob.TunedHyperParameters
    return {name: tuned[name] for name in TUNED}

"""AccuracyTooLow…: the Fail steps that end an execution for a model below AccuracyThreshold.

Each names the model and its test accuracy. Where one stands (at once, or
after the twin's deployment) is the twin rule of ``steps/gate.py``.
"""
from __future__ import annotations

from sagemaker.core.workflow.functions import Join
from sagemaker.mlops.workflow.fail_step import FailStep
from sagemaker.mlops.workflow.steps import ProcessingStep

from steps.context import BuildContext
from steps.evaluate import measured_accuracy
from steps.variants import Variant


def below_threshold_message(ctx: BuildContext, variant: Variant, evaluation: ProcessingStep, *tail: object) -> Join:
    return Join(on="", values=[
        f"The {variant.title} model's test accuracy ", measured_accuracy(ctx, variant, evaluation),
        " is below AccuracyThreshold ", ctx.parameters.accuracy_threshold, "; it was not registered or deployed", *tail, ".",
    ])


def accuracy_too_low_step(ctx: BuildContext, variant: Variant, evaluation: ProcessingStep, twin: Variant,
                          twin_evaluation: ProcessingStep) -> FailStep:
    """Fails the execution now, when the twin is not being deployed; the message names both accuracies."""
    return FailStep(
        **variant.names("AccuracyTooLow", "Accuracy too low"),
        description="Fails the execution: the model's test accuracy is below the AccuracyThreshold parameter.",
        error_message=below_threshold_message(ctx, variant, evaluation, f" (the {twin.title} model's is ",
                                              measured_accuracy(ctx, twin, twin_evaluation), ")"),
    )


def accuracy_too_low_after_twin_step(ctx: BuildContext, variant: Variant, evaluation: ProcessingStep,
                                     deployed: Variant) -> FailStep:
    """Fails the execution for ``variant`` once its twin, ``deployed``, has been deployed and checked."""
    return FailStep(
        name=f"AccuracyTooLow{variant.suffix}After{deployed.suffix}",
        display_name=f"Accuracy too low ({variant.title})",
        description=f"Fails the execution once the {deployed.title} model is deployed: the {variant.title} model's test "
                    "accuracy is below the AccuracyThreshold parameter.",
        error_message=below_threshold_message(ctx, variant, evaluation, f"; the {deployed.title} model passed and was deployed"),
    )

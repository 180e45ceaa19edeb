"""CheckAccuracySingleInstance / CheckAccuracyMultiInstance: register and deploy only a model
whose test accuracy reaches the AccuracyThreshold parameter; otherwise fail, saying why."""
from __future__ import annotations

from sagemaker.workflow.condition_step import ConditionStep
from sagemaker.workflow.conditions import ConditionEquals, ConditionGreaterThanOrEqualTo
from sagemaker.workflow.fail_step import FailStep
from sagemaker.workflow.functions import Join, JsonGet
from sagemaker.workflow.steps import ProcessingStep

from steps.context import BuildContext
from steps.evaluate import evaluation_property_file
from steps.variants import Variant


def measured_accuracy(ctx: BuildContext, variant: Variant, evaluation: ProcessingStep) -> JsonGet:
    return JsonGet(
        step_name=evaluation.name,
        property_file=evaluation_property_file(variant, ctx.contract),
        json_path=ctx.contract.ACCURACY_JSON_PATH,
    )


def quality_gate_step(ctx: BuildContext, variant: Variant, evaluation: ProcessingStep, if_steps: list) -> ConditionStep:
    accuracy = measured_accuracy(ctx, variant, evaluation)
    threshold = ctx.parameters.accuracy_threshold
    fail = FailStep(
        name=variant.step("AccuracyTooLow"),
        display_name=f"Accuracy too low ({variant.title})",
        description="Stops this branch: the model's test accuracy is below the AccuracyThreshold parameter.",
        error_message=Join(on="", values=[
            f"The {variant.title} model's test accuracy ", accuracy, " is below AccuracyThreshold ", threshold,
            "; it was not registered or deployed.",
        ]),
    )
    return ConditionStep(
        name=variant.step("CheckAccuracy"),
        display_name=f"Check accuracy ({variant.title})",
        description="Registers and deploys the model when its test accuracy is at least AccuracyThreshold.",
        conditions=[ConditionGreaterThanOrEqualTo(left=accuracy, right=threshold)],
        if_steps=if_steps,
        else_steps=[fail],
    )


def approval_gate_step(ctx: BuildContext, variant: Variant, if_steps: list) -> ConditionStep:
    """Deploy only what is registered as Approved; a package left for manual approval ends the branch here."""
    return ConditionStep(
        name=variant.step("CheckApproval"),
        display_name=f"Check approval ({variant.title})",
        description="Deploys the registered model when ModelApprovalStatus is Approved; with PendingManualApproval "
                    "the package waits in the registry for a person to approve it.",
        conditions=[ConditionEquals(left=ctx.parameters.model_approval_status, right="Approved")],
        if_steps=if_steps,
        else_steps=[],
    )

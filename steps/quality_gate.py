"""CheckAccuracySingleInstance / CheckAccuracyMultiInstance and the twin rule.

Each model's gate decides only that model: at or above AccuracyThreshold it is
registered and (when Approved) deployed; below it, it is neither. The
execution still ends Failed for a model below the threshold, but never while
its twin is being deployed. SageMaker starts no new step once a Fail step is
reached ("When a Fail step and other pipeline steps execute at the same time,
the pipeline does not terminate until all concurrent steps are completed",
SageMaker Developer Guide, Add a step > Fail step), and a step cannot wait for
"whichever branch ran" (DependsOn waits for all of its steps). So a model's
failure is reported at one of two places:

- ``CheckTwinDeployment…`` (in the failing model's else branch): when the twin
  is not being deployed (it failed too, or ModelApprovalStatus is not
  Approved), ``AccuracyTooLow…`` fails the execution at once;
- ``CheckTwinAccuracy…`` (after the twin's Check step): when the twin was
  deployed, ``AccuracyTooLow<model>After<twin>`` fails it then.
"""
from __future__ import annotations

from sagemaker.workflow.condition_step import ConditionStep
from sagemaker.workflow.conditions import ConditionEquals, ConditionGreaterThanOrEqualTo
from sagemaker.workflow.fail_step import FailStep
from sagemaker.workflow.functions import Join, JsonGet
from sagemaker.workflow.steps import ProcessingStep, Step

from steps.context import BuildContext
from steps.evaluate import evaluation_property_file
from steps.variants import Variant


def measured_accuracy(ctx: BuildContext, variant: Variant, evaluation: ProcessingStep) -> JsonGet:
    return JsonGet(
        step_name=evaluation.name,
        property_file=evaluation_property_file(variant, ctx.contract),
        json_path=ctx.contract.ACCURACY_JSON_PATH,
    )


def passes(ctx: BuildContext, variant: Variant, evaluation: ProcessingStep) -> ConditionGreaterThanOrEqualTo:
    return ConditionGreaterThanOrEqualTo(left=measured_accuracy(ctx, variant, evaluation), right=ctx.parameters.accuracy_threshold)


def approved(ctx: BuildContext) -> ConditionEquals:
    return ConditionEquals(left=ctx.parameters.model_approval_status, right="Approved")


def below_threshold_message(ctx: BuildContext, variant: Variant, evaluation: ProcessingStep, *tail: object) -> Join:
    return Join(on="", values=[
        f"The {variant.title} model's test accuracy ", measured_accuracy(ctx, variant, evaluation),
        " is below AccuracyThreshold ", ctx.parameters.accuracy_threshold, "; it was not registered or deployed", *tail, ".",
    ])


def quality_gate_step(ctx: BuildContext, variant: Variant, evaluation: ProcessingStep, twin: Variant,
                      twin_evaluation: ProcessingStep, if_steps: list) -> ConditionStep:
    """The model's gate; below the threshold it fails the execution now unless the twin is being deployed."""
    fail = FailStep(
        name=variant.step("AccuracyTooLow"),
        display_name=f"Accuracy too low ({variant.title})",
        description="Fails the execution: the model's test accuracy is below the AccuracyThreshold parameter.",
        error_message=below_threshold_message(ctx, variant, evaluation, f" (the {twin.title} model's is ",
                                              measured_accuracy(ctx, twin, twin_evaluation), ")"),
    )
    hold = ConditionStep(
        name=variant.step("CheckTwinDeployment"),
        display_name=f"Check twin deployment ({variant.title})",
        description=f"When the {twin.title} model is being deployed, its deployment reports this model's failure when it "
                    "ends (a Fail step now would stop it); otherwise fails the execution now.",
        conditions=[passes(ctx, twin, twin_evaluation), approved(ctx)],
        if_steps=[],
        else_steps=[fail],
    )
    return ConditionStep(
        name=variant.step("CheckAccuracy"),
        display_name=f"Check accuracy ({variant.title})",
        description="Registers and deploys the model when its test accuracy is at least AccuracyThreshold; "
                    "the twin model's gate is independent of this one.",
        conditions=[passes(ctx, variant, evaluation)],
        if_steps=if_steps,
        else_steps=[hold],
    )


def twin_accuracy_step(ctx: BuildContext, variant: Variant, twin: Variant, twin_evaluation: ProcessingStep,
                       after: Step) -> ConditionStep:
    """After this model's deployment: fail the execution when the twin was below the threshold."""
    fail = FailStep(
        name=f"AccuracyTooLow{twin.suffix}After{variant.suffix}",
        display_name=f"Accuracy too low ({twin.title})",
        description=f"Fails the execution once the {variant.title} model is deployed: the {twin.title} model's test "
                    "accuracy is below the AccuracyThreshold parameter.",
        error_message=below_threshold_message(ctx, twin, twin_evaluation, f"; the {variant.title} model passed and was deployed"),
    )
    return ConditionStep(
        name=variant.step("CheckTwinAccuracy"),
        display_name=f"Check twin accuracy ({variant.title})",
        description=f"Ends this model's deployment: fails the execution when the {twin.title} model did not reach AccuracyThreshold.",
        depends_on=[after],
        conditions=[passes(ctx, twin, twin_evaluation)],
        if_steps=[],
        else_steps=[fail],
    )


def approval_gate_step(ctx: BuildContext, variant: Variant, if_steps: list) -> ConditionStep:
    """Deploy only what is registered as Approved; a package left for manual approval ends the branch here."""
    return ConditionStep(
        name=variant.step("CheckApproval"),
        display_name=f"Check approval ({variant.title})",
        description="Deploys the registered model when ModelApprovalStatus is Approved; with PendingManualApproval "
                    "the package waits in the registry for a person to approve it.",
        conditions=[approved(ctx)],
        if_steps=if_steps,
        else_steps=[],
    )

"""The ConditionSteps of each model's branch: CheckAccuracy…, CheckApproval…, and the twin rule's
CheckTwinDeployment… and CheckTwinAccuracy….

Each model's gate decides only that model: at or above AccuracyThreshold it is
registered and (when Approved) deployed; below it, it is neither. The
execution still ends Failed for a model below the threshold, but never while
its twin is being deployed. SageMaker starts no new step once a Fail step is
reached ("When a Fail step and other pipeline steps execute at the same time,
the pipeline does not terminate until all concurrent steps are completed",
SageMaker Developer Guide, Add a step > Fail step), and a step cannot wait for
"whichever branch ran" (DependsOn waits for all of its steps). So a model's
failure (a Fail step of ``steps/fail.py``) is reported at one of two places:

- ``CheckTwinDeployment…`` (in the failing model's else branch): when the twin
  is not being deployed (it failed too, or ModelApprovalStatus is not
  Approved), ``AccuracyTooLow…`` fails the execution at once;
- ``CheckTwinAccuracy…`` (after the twin's Check step): when the twin was
  deployed, ``AccuracyTooLow<model>After<twin>`` fails it then.
"""
from __future__ import annotations

from sagemaker.core.workflow.conditions import ConditionEquals, ConditionGreaterThanOrEqualTo
from sagemaker.mlops.workflow.condition_step import ConditionStep
from sagemaker.mlops.workflow.steps import ProcessingStep, Step

from steps.context import BuildContext
from steps.evaluate import measured_accuracy
from steps.variants import Variant


def passes(ctx: BuildContext, variant: Variant, evaluation: ProcessingStep) -> ConditionGreaterThanOrEqualTo:
    return ConditionGreaterThanOrEqualTo(left=measured_accuracy(ctx, variant, evaluation), right=ctx.parameters.accuracy_threshold)


def approved(ctx: BuildContext) -> ConditionEquals:
    return ConditionEquals(left=ctx.parameters.model_approval_status, right="Approved")


def accuracy_gate_step(ctx: BuildContext, variant: Variant, evaluation: ProcessingStep, if_steps: list,
                       else_steps: list) -> ConditionStep:
    """The model's own gate: ``if_steps`` register and deploy it, ``else_steps`` apply the twin rule."""
    return ConditionStep(
        **variant.names("CheckAccuracy", "Check accuracy"),
        description="Registers and deploys the model when its test accuracy is at least AccuracyThreshold; "
                    "the twin model's gate is independent of this one.",
        conditions=[passes(ctx, variant, evaluation)],
        if_steps=if_steps,
        else_steps=else_steps,
    )


def twin_deployment_step(ctx: BuildContext, variant: Variant, twin: Variant, twin_evaluation: ProcessingStep,
                         else_steps: list) -> ConditionStep:
    """For a model below the threshold: ``else_steps`` (its Fail step) run now unless the twin is being deployed."""
    return ConditionStep(
        **variant.names("CheckTwinDeployment", "Check twin deployment"),
        description=f"When the {twin.title} model is being deployed, its deployment reports this model's failure when it "
                    "ends (a Fail step now would stop it); otherwise fails the execution now.",
        conditions=[passes(ctx, twin, twin_evaluation), approved(ctx)],
        if_steps=[],
        else_steps=else_steps,
    )


def twin_accuracy_step(ctx: BuildContext, variant: Variant, twin: Variant, twin_evaluation: ProcessingStep,
                       after: Step, else_steps: list) -> ConditionStep:
    """After this model's deployment (``after``): ``else_steps`` fail the execution when the twin was below the threshold."""
    return ConditionStep(
        **variant.names("CheckTwinAccuracy", "Check twin accuracy"),
        description=f"Ends this model's deployment: fails the execution when the {twin.title} model did not reach AccuracyThreshold.",
        depends_on=[after],
        conditions=[passes(ctx, twin, twin_evaluation)],
        if_steps=[],
        else_steps=else_steps,
    )


def approval_gate_step(ctx: BuildContext, variant: Variant, if_steps: list) -> ConditionStep:
    """Deploy only what is registered as Approved; a package left for manual approval ends the branch here."""
    return ConditionStep(
        **variant.names("CheckApproval", "Check approval"),
        description="Deploys the registered model when ModelApprovalStatus is Approved; with PendingManualApproval "
                    "the package waits in the registry for a person to approve it.",
        conditions=[approved(ctx)],
        if_steps=if_steps,
        else_steps=[],
    )

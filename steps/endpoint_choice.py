"""ChooseEndpoint: the deploy-only pipeline's one condition, and that pipeline's own parameters.

The deploy-only pipeline (``<project>-deploy``) deploys a model package approved after registration with the
pipeline's own Deploy -> WaitFor -> Check steps. The approval rule starts it with the package's ARN and two
values the Register step recorded on the package (``steps/register.py`` deployment_metadata): which twin it
is, hence which endpoint, and how many classes its check expects. ChooseEndpoint runs that twin's chain.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from sagemaker.core.workflow.conditions import ConditionEquals
from sagemaker.core.workflow.parameters import ParameterInteger, ParameterString
from sagemaker.mlops.workflow.condition_step import ConditionStep

from steps.variants import MULTI, SINGLE, VARIANTS

STEP_NAME = "ChooseEndpoint"


@dataclass(frozen=True)
class DeployParameters:
    model_package_arn: ParameterString
    variant: ParameterString
    class_count: ParameterInteger

    def as_list(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]


def define_deploy_parameters() -> DeployParameters:
    """No defaults: the approval rule gives all three, from the approval event (see infra/template.yaml)."""
    return DeployParameters(
        model_package_arn=ParameterString("ModelPackageArn"),
        variant=ParameterString("Variant", enum_values=[variant.suffix for variant in VARIANTS]),
        class_count=ParameterInteger("ClassCount"),
    )


def endpoint_choice_step(parameters: DeployParameters, single_steps: list, multi_steps: list) -> ConditionStep:
    return ConditionStep(
        name=STEP_NAME,
        display_name="Choose endpoint",
        description=f"Deploys the approved package to the endpoint of the twin it was registered for: "
                    f"the {SINGLE.title} model's steps when Variant is {SINGLE.suffix}, else the {MULTI.title} model's.",
        conditions=[ConditionEquals(left=parameters.variant, right=SINGLE.suffix)],
        if_steps=single_steps,
        else_steps=multi_steps,
    )

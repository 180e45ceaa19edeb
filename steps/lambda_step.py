"""The shape every LambdaStep of the pipeline has: a published function called by its ``live`` ARN,
with string outputs."""
from __future__ import annotations

from typing import Any

from sagemaker.core.lambda_helper import Lambda
from sagemaker.mlops.workflow.lambda_step import LambdaOutput, LambdaOutputTypeEnum, LambdaStep

from steps.context import BuildContext


def lambda_step(ctx: BuildContext, function: str, outputs: tuple[str, ...], **step: Any) -> LambdaStep:
    """A LambdaStep calling ``function`` (one of settings.LAMBDA_FUNCTIONS); ``step`` holds its name, display
    name, description and inputs. Referring to the function by ARN keeps synth from creating one."""
    return LambdaStep(
        lambda_func=Lambda(function_arn=ctx.settings.lambda_arn(function), session=ctx.session),
        outputs=[LambdaOutput(output_name=name, output_type=LambdaOutputTypeEnum.String) for name in outputs],
        **step,
    )

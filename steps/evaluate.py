"""EvaluateSingleInstance / EvaluateMultiInstance: test-split metrics of a trained model."""
from __future__ import annotations

from sagemaker.core.workflow.functions import Join, JsonGet
from sagemaker.core.workflow.properties import PropertyFile
from sagemaker.mlops.workflow.steps import ProcessingStep, TrainingStep

from steps.context import BuildContext, job_step_policies
from steps.prepare import channel_uri
from steps.processing import PRETRAINED_DIR, PROCESSING_ROOT, code_input, processing_input, processing_output, script_processor
from steps.training import pretrained_processing_input
from steps.variants import Variant

MODEL_DIR = f"{PROCESSING_ROOT}/input/model"
TEST_DIR = f"{PROCESSING_ROOT}/input/test"
OUTPUT_DIR = f"{PROCESSING_ROOT}/output/evaluation"
OUTPUT_NAME = "evaluation"


def evaluation_property_file(variant: Variant, contract) -> PropertyFile:
    return PropertyFile(name=f"Evaluation{variant.suffix}", output_name=OUTPUT_NAME, path=contract.EVALUATION_FILE)


def evaluate_step(ctx: BuildContext, variant: Variant, prepare: ProcessingStep, training: TrainingStep) -> ProcessingStep:
    names = variant.names("Evaluate", "Evaluate")
    test = ctx.contract.TEST_CHANNEL
    processor = script_processor(ctx, "evaluate.py", base_job_name=f"{ctx.settings.project_name}-evaluate-{variant.slug}")
    step_args = processor.run(
        inputs=[
            processing_input(training.properties.ModelArtifacts.S3ModelArtifacts, MODEL_DIR, "model"),
            processing_input(channel_uri(prepare, test), TEST_DIR, test),
            pretrained_processing_input(ctx, PRETRAINED_DIR),
            code_input(ctx),
        ],
        outputs=[processing_output(OUTPUT_NAME, OUTPUT_DIR, ctx.execution_path(names["name"]))],
        arguments=["--model", MODEL_DIR, "--test", TEST_DIR, "--output", OUTPUT_DIR,
                   "--inference-precision", ctx.parameters.inference_precision, "--pretrained", PRETRAINED_DIR],
    )
    return ProcessingStep(
        **names,
        description=f"Measures the {variant.title} model on the held-out test split: accuracy, top-5 accuracy, "
                    f"weighted precision/recall/F1 and a confusion matrix, written to {ctx.contract.EVALUATION_FILE}.",
        step_args=step_args,
        property_files=[evaluation_property_file(variant, ctx.contract)],
        **job_step_policies(),
    )


def evaluation_uri(ctx: BuildContext, evaluation: ProcessingStep) -> Join:
    output = evaluation.properties.ProcessingOutputConfig.Outputs[OUTPUT_NAME].S3Output.S3Uri
    return Join(on="/", values=[output, ctx.contract.EVALUATION_FILE])


def evaluation_value(ctx: BuildContext, variant: Variant, evaluation: ProcessingStep, json_path: str) -> JsonGet:
    """A value of the model's evaluation.json, read by later steps when they run."""
    return JsonGet(step_name=evaluation.name, property_file=evaluation_property_file(variant, ctx.contract), json_path=json_path)


def measured_accuracy(ctx: BuildContext, variant: Variant, evaluation: ProcessingStep) -> JsonGet:
    """The model's test accuracy, which the gates compare with AccuracyThreshold."""
    return evaluation_value(ctx, variant, evaluation, ctx.contract.ACCURACY_JSON_PATH)


def served_precision(ctx: BuildContext, variant: Variant, evaluation: ProcessingStep) -> JsonGet:
    """The precision evaluate.py decided to serve (fp32 or int8), read from its evaluation.json."""
    return evaluation_value(ctx, variant, evaluation, ctx.contract.SERVED_PRECISION_JSON_PATH)

"""PrepareData: validate the raw image folders and write train/valid/test channels."""
from __future__ import annotations

from sagemaker.core.workflow.properties import PropertyFile
from sagemaker.mlops.workflow.steps import ProcessingStep

from steps.context import BuildContext, job_step_policies
from steps.processing import PROCESSING_ROOT, code_input, processing_input, processing_output, script_processor

STEP_NAME = "PrepareData"
INPUT_DIR = f"{PROCESSING_ROOT}/input/data"
OUTPUT_DIR = f"{PROCESSING_ROOT}/output"
MANIFEST_OUTPUT = "manifest"


def output_names(contract) -> tuple[str, ...]:
    """The job's outputs: one channel per split, and the manifest folder."""
    return (*contract.SPLITS, MANIFEST_OUTPUT)


def prepare_data_step(ctx: BuildContext) -> ProcessingStep:
    processor = script_processor(ctx, "preprocess.py", base_job_name=f"{ctx.settings.project_name}-prepare")
    step_args = processor.run(
        inputs=[
            processing_input(ctx.parameters.input_data_url, INPUT_DIR, "data"),
            code_input(ctx),
        ],
        outputs=[
            processing_output(name, f"{OUTPUT_DIR}/{name}", ctx.execution_path(STEP_NAME, name))
            for name in output_names(ctx.contract)
        ],
        arguments=["--input", INPUT_DIR, "--output", OUTPUT_DIR],
    )
    return ProcessingStep(
        name=STEP_NAME,
        display_name="Prepare data",
        description="Validates every image, converts it to RGB, resizes it to a 256-pixel short side and writes "
                    "train/valid/test channels with a manifest of classes, counts and dropped files.",
        step_args=step_args,
        property_files=[manifest_property_file(ctx.contract)],
        **job_step_policies(),
    )


def manifest_property_file(contract) -> PropertyFile:
    return PropertyFile(name="Manifest", output_name=MANIFEST_OUTPUT, path=contract.MANIFEST_FILE)


def channel_uri(step: ProcessingStep, name: str):
    """The S3 URI of one of PrepareData's outputs, as a property reference."""
    return step.properties.ProcessingOutputConfig.Outputs[name].S3Output.S3Uri

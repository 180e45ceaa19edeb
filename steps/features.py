"""ExtractFeatures: the frozen backbone's features of the prepared train and valid splits, once per execution.

Every tuning trial trains only the head on them (``train.py --features``), so the
backbone's forward pass over the images, which dominates a trial on CPU, is paid
once instead of once per trial. The step runs ``code/extract_features.py`` on the
training image with the trials' own backbone, image size, weights and seed (the
static hyperparameters of ``steps/training.py``), so its header matches what each
trial checks. Cached like the other job steps: a second execution on the same
prepared data and parameters reuses the features.
"""
from __future__ import annotations

from sagemaker.mlops.workflow.steps import ProcessingStep

from steps.context import BuildContext, job_step_policies
from steps.prepare import channel_uri
from steps.processing import PRETRAINED_DIR, PROCESSING_ROOT, code_input, processing_input, processing_output, script_processor
from steps.training import pretrained_processing_input, static_hyperparameters

STEP_NAME = "ExtractFeatures"
SCRIPT = "extract_features.py"
OUTPUT_DIR = f"{PROCESSING_ROOT}/output/features"


def input_dirs(contract) -> dict[str, str]:
    """Where the job reads each split whose features it computes (the splits of the features folder)."""
    return {split: f"{PROCESSING_ROOT}/input/{split}" for split in contract.FEATURES_SPLIT_FILES}


def extraction_arguments(ctx: BuildContext) -> list:
    """The script's options: the trials' backbone, image size, weights (the same pretrained channel) and seed,
    so the header fits every trial."""
    trial = static_hyperparameters(ctx, augment=False, cache_features=False)
    folders = input_dirs(ctx.contract)
    return [
        "--train", folders[ctx.contract.TRAIN_CHANNEL], "--valid", folders[ctx.contract.VALID_CHANNEL], "--output", OUTPUT_DIR,
        "--backbone", trial["backbone"],
        "--image-size", trial["image_size"].to_string(),
        "--pretrained-weights", trial["pretrained_weights"],
        "--pretrained-channel", PRETRAINED_DIR,
        "--seed", trial["seed"],
    ]


def extract_features_step(ctx: BuildContext, prepare: ProcessingStep) -> ProcessingStep:
    processor = script_processor(ctx, SCRIPT, base_job_name=f"{ctx.settings.project_name}-features")
    step_args = processor.run(
        inputs=[
            *(processing_input(channel_uri(prepare, split), folder, split)
              for split, folder in input_dirs(ctx.contract).items()),
            pretrained_processing_input(ctx, PRETRAINED_DIR),
            code_input(ctx),
        ],
        outputs=[processing_output(ctx.contract.FEATURES_CHANNEL, OUTPUT_DIR, ctx.execution_path(STEP_NAME, ctx.contract.FEATURES_CHANNEL))],
        arguments=extraction_arguments(ctx),
    )
    return ProcessingStep(
        name=STEP_NAME,
        display_name="Extract features",
        description="Computes the frozen backbone's features of the train and valid images once (evaluation "
                    "transform, no augmentation), with a header of backbone, image size, weights and classes; "
                    "every tuning trial trains only the head on them.",
        step_args=step_args,
        **job_step_policies(),
    )


def features_uri(step: ProcessingStep, contract):
    """The S3 URI of the features folder, as a property reference."""
    return step.properties.ProcessingOutputConfig.Outputs[contract.FEATURES_CHANNEL].S3Output.S3Uri

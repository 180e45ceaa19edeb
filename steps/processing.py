"""The container-script pattern shared by the processing steps.

A processing job gets the content-addressed ``code/`` tarball as an input,
unpacks it, and runs one script from it with ``python3``. This is what the
SDK's FrameworkProcessor does, minus the bootstrap script it would upload
while the definition is being built: here the bootstrap is the entrypoint's
``-c`` string itself, which CreateProcessingJob limits to 256 characters
(``ContainerEntrypointString``; ``pipeline.validate`` checks it).

The script's exit status is the job's (``exec``), and so is its failure
message (the scripts write ``contract.PROCESSING_FAILURE_FILE``,
``/opt/ml/output/message``); when the bootstrap itself fails (no tarball, a
requirement that cannot be installed), the ERR trap writes the failing
command there instead.
"""
from __future__ import annotations

import posixpath

from sagemaker.core.processing import Processor
from sagemaker.core.shapes import ProcessingInput, ProcessingOutput, ProcessingS3Input, ProcessingS3Output

from steps.context import BuildContext

PROCESSING_ROOT = "/opt/ml/processing"
CODE_INPUT = f"{PROCESSING_ROOT}/input/code"
CODE_DIR = f"{PROCESSING_ROOT}/code"
CODE_ARCHIVE = "sourcedir.tar.gz"
PRETRAINED_DIR = f"{PROCESSING_ROOT}/input/pretrained"  # the pretrained channel, in every job that reads it


def bootstrap_command(failure_file: str) -> str:
    """The entrypoint's ``-c`` string; ``failure_file`` is where a job's failure message goes
    (contract.PROCESSING_FAILURE_FILE)."""
    return (
        f"set -eu; trap 'echo \"bootstrap: $BASH_COMMAND failed\">{failure_file}' ERR; "
        f"mkdir -p {CODE_DIR}; cd $_; tar -xzf {posixpath.relpath(CODE_INPUT, CODE_DIR)}/{CODE_ARCHIVE}; "
        "[ ! -f requirements.txt ] || pip install -qr requirements.txt; "
        'exec python3 "$@"'
    )


def script_processor(ctx: BuildContext, script: str, base_job_name: str) -> Processor:
    """A processor on the training framework image that runs ``code/<script>``."""
    settings = ctx.settings
    return Processor(
        role=settings.job_role_arn,
        image_uri=ctx.training_image,
        instance_count=1,
        instance_type=ctx.parameters.processing_instance_type,
        entrypoint=["/bin/bash", "-c", bootstrap_command(ctx.contract.PROCESSING_FAILURE_FILE), "bootstrap", script],
        volume_size_in_gb=50,
        volume_kms_key=settings.kms_key_id or None,
        output_kms_key=settings.kms_key_id or None,
        max_runtime_in_seconds=4 * 3600,
        base_job_name=base_job_name,
        sagemaker_session=ctx.session,
        env={"PYTHONUNBUFFERED": "1"},
    )


def processing_input(source, destination: str, input_name: str) -> ProcessingInput:
    """An S3 prefix downloaded to ``destination`` before the job starts, every field as the API reads it."""
    return ProcessingInput(input_name=input_name, app_managed=False, s3_input=ProcessingS3Input(
        s3_uri=source, local_path=destination, s3_data_type="S3Prefix", s3_input_mode="File",
        s3_data_distribution_type="FullyReplicated", s3_compression_type="None"))


def processing_output(output_name: str, source: str, destination) -> ProcessingOutput:
    """The folder ``source``, uploaded to ``destination`` when the job ends."""
    return ProcessingOutput(output_name=output_name, app_managed=False, s3_output=ProcessingS3Output(
        s3_uri=destination, local_path=source, s3_upload_mode="EndOfJob"))


def code_input(ctx: BuildContext) -> ProcessingInput:
    return processing_input(ctx.code_uri, CODE_INPUT, "code")

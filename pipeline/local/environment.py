"""The services a local run's steps talk to, for as long as the run lasts.

moto on 127.0.0.1 (the model registry, the endpoints' control plane, SQS and the callback API), the
endpoints' data plane in front of the model containers (``runtime``), the process environment that points
every AWS client at them (``aws``), the job processes' environment and the Lambda functions. The schedule
and the runners take these as they are; nothing here decides which step runs.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

from pipeline.local import aws
from pipeline.local.jobs import JobContext, container_environment
from pipeline.local.lambdas import LambdaFunctions
from pipeline.local.runners import WAIT_FUNCTION
from pipeline.local.runtime import RuntimeServer
from pipeline.local.s3 import LocalS3
from pipeline.settings import Settings

# Locally the wait function looks every second or two instead of SageMaker-scale intervals.
WAIT_FUNCTION_ENVIRONMENT = {"INITIAL_POLL_SECONDS": "1", "MAX_POLL_SECONDS": "2"}


@dataclass
class LocalServices:
    moto: aws.EmbeddedMoto
    sagemaker: Any  # a boto3 client of moto's SageMaker
    sqs: Any  # a boto3 client of moto's SQS
    runtime: RuntimeServer
    environment: dict[str, str]  # the AWS variables set while the services run


@contextmanager
def local_services(region: str, s3: LocalS3, workdir: Path) -> Iterator[LocalServices]:
    """moto and the endpoints' data plane started, and the process environment pointing at them, while the block
    lasts; the endpoints keep their containers and invocation log under ``workdir/endpoints``."""
    with aws.EmbeddedMoto() as moto:
        sagemaker = aws.client("sagemaker", moto.url, region)
        endpoints = workdir / "endpoints"
        with RuntimeServer(sagemaker, s3, endpoints, endpoints / "invocations.log") as runtime:
            environment = aws.run_environment(region, moto.url, runtime.url, str(workdir))
            with aws.aws_environment(environment):
                yield LocalServices(moto, sagemaker, aws.client("sqs", moto.url, region), runtime, environment)


def job_context(settings: Settings, s3: LocalS3, workdir: Path, services: LocalServices, contract: ModuleType,
                parallel: int) -> JobContext:
    """Where and how the run's processing and training jobs run: the CPUs shared among ``parallel`` steps."""
    return JobContext(s3, workdir / "jobs", settings.region, settings.account,
                      container_environment(os.path.dirname(sys.executable), services.environment),
                      failure_files=(contract.TRAINING_FAILURE_FILE, contract.PROCESSING_FAILURE_FILE),
                      cpus_per_job=max(1, (os.cpu_count() or 1) // max(1, parallel)))


def lambda_functions(settings: Settings, archive: bytes, workdir: Path) -> LambdaFunctions:
    """The project's Lambda handlers from ``archive``, the wait function polling at a local pace."""
    wait_function = settings.lambda_function_name(WAIT_FUNCTION)
    return LambdaFunctions(settings, archive, workdir / "lambda",
                           lambda name: WAIT_FUNCTION_ENVIRONMENT if name == wait_function else {})

"""One module per pipeline step: each a function that returns a native SageMaker step.

The steps are built with the SageMaker Python SDK v3 (sagemaker-mlops, which
brings sagemaker-core, sagemaker-train and sagemaker-serve). Importing it must
not reach the network or read credentials, so the import happens here, once,
under ``offline_import``:

- some of its modules create boto3 clients at import time
  (``sagemaker/ai_registry/air_hub.py``: ``_sagemaker_client = boto3.client("sagemaker")``),
  which needs a region and would resolve credentials: boto3's default session
  is an offline one (static, unusable keys) for the duration of the import;
- ``AWS_EC2_METADATA_DISABLED=true`` keeps any credential lookup that still
  happens from asking the EC2 metadata service;
- the notices the SDK gives about itself (``SDK_NOTICES``) are filtered each by
  category, message and the SDK's own modules; any other warning shows.

The root logger is left as it was before the import.
"""
from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from typing import Iterator

import boto3

OFFLINE_CREDENTIALS = {"aws_access_key_id": "offline-synth", "aws_secret_access_key": "offline-synth"}
OFFLINE_REGION = "us-east-1"  # only for the clients the SDK creates at import; synth passes its own region
SDK_MODULES = r"sagemaker\."  # a notice counts as the SDK's when one of its own modules raised it
SDK_NOTICES = (  # (category, message regex): each warning the SDK gives on import or while synth builds
    # its module moves, raised where one SDK module imports another through a shim
    # (sagemaker/train/model_trainer.py: from sagemaker.train import configs); the same shim imported by
    # this project's code is attributed to this project's module, and shows
    (DeprecationWarning, r"sagemaker\.[\w.]+ has been moved to sagemaker\.[\w.]+\. Please update your imports"),
    (DeprecationWarning, r"Importing from sagemaker\.[\w.]+ is deprecated"),
    # pydantic on sagemaker/core/shapes/shapes.py's own field name
    (UserWarning, r'Field name "json" in "MonitoringDatasetFormat" shadows an attribute in parent "Base"'),
    # each job step built in a PipelineSession: what synth wants, no job started
    (UserWarning, r"Running within a PipelineSession, there will be No Wait, No Logs, and No Job being started"),
    # each Lambda step: the functions are published from lambda/ by dogbreed upsert, not by the SDK
    (UserWarning, r"Lambda function won't be updated because zipped_code_dir\s+or script is not provided"),
)


def filter_sdk_warnings() -> None:
    """Ignore the notices of ``SDK_NOTICES`` when an SDK module raises them; nothing else."""
    for category, message in SDK_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category, module=SDK_MODULES)


@contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """``name=value`` in os.environ inside the block, its previous state after."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


@contextmanager
def offline_default_session(region: str) -> Iterator[boto3.Session]:
    """boto3's default session replaced by one with static, unusable credentials in ``region``."""
    session = boto3.Session(region_name=region, **OFFLINE_CREDENTIALS)
    previous = boto3.DEFAULT_SESSION
    boto3.DEFAULT_SESSION = session
    try:
        yield session
    finally:
        boto3.DEFAULT_SESSION = previous


for _name in ("sagemaker", "sagemaker.core", "sagemaker.train", "sagemaker.serve", "sagemaker.mlops"):
    logging.getLogger(_name).setLevel(logging.ERROR)

_root = logging.getLogger()
_root_state = (_root.level, list(_root.handlers))
filter_sdk_warnings()
try:
    with environment("AWS_EC2_METADATA_DISABLED", "true"), offline_default_session(OFFLINE_REGION):
        import sagemaker.mlops.workflow  # noqa: F401  (imports serve and train, which create clients at import)
        import sagemaker.serve.model_builder  # noqa: F401
        import sagemaker.train.model_trainer  # noqa: F401
finally:
    # logging is the application's choice, whatever the SDK configures on import
    _root.setLevel(_root_state[0])
    _root.handlers[:] = _root_state[1]

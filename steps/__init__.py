"""One module per pipeline step: each a function that returns a native SageMaker step.

Importing the SageMaker SDK resolves AWS credentials for a default JumpStart
session, which falls back to the EC2 metadata service when none are set. A
build must never reach the network, so the SDK is imported here, once, with
that lookup switched off for the duration of the import only; the root logger
is left as it was before the import.
"""
from __future__ import annotations

import logging
import os

os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
for _name in ("sagemaker.config", "sagemaker.telemetry.telemetry_logging", "sagemaker.jumpstart"):
    logging.getLogger(_name).setLevel(logging.ERROR)

_previous = os.environ.get("AWS_EC2_METADATA_DISABLED")
_root = logging.getLogger()
_root_state = (_root.level, list(_root.handlers))
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
try:
    import sagemaker  # noqa: F401  (imported under the guard for its side effects)
    import sagemaker.workflow.pipeline  # noqa: F401  (reaches sagemaker.experiments, which configures logging)
finally:
    if _previous is None:
        del os.environ["AWS_EC2_METADATA_DISABLED"]
    else:
        os.environ["AWS_EC2_METADATA_DISABLED"] = _previous
    # The SDK calls logging.basicConfig(level=INFO) on import; logging is the application's choice.
    _root.setLevel(_root_state[0])
    _root.handlers[:] = _root_state[1]

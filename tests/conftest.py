"""Shared fixtures: small real image data sets made on the fly, AWS stand-ins, the default synth.

Tests live in one folder per room of the project (code, lambda, synth for pipeline/ definition and checks, local, publish, infra). Helpers
that several rooms use are plain modules here (``sources``, ``colour_images``, ``real_images``, ``models``,
the moto stand-ins), imported by name; fixtures that several rooms use are here or in a plugin listed in
``pytest_plugins``, requested by name and never imported.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from colour_images import make_dataset
from sources import CODE_DIR

if TYPE_CHECKING:
    from pipeline.definition import Synth

pytest_plugins = ["lambda_harness"]

# The container scripts import their siblings (contract, common) the way they do
# inside SageMaker: from the script's own folder.
if str(CODE_DIR) not in sys.path:
    sys.path.insert(0, str(CODE_DIR))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture
def real_image_dataset(tmp_path: Path) -> Path:
    """Real handwritten-digit scans as a dogImages tree (see tests/real_images.py)."""
    from real_images import write_digits

    return write_digits(tmp_path / "real")


@pytest.fixture(scope="module")
def aws_environment(tmp_path_factory):
    """Fake credentials and no settings from the shell's environment, for tests against moto's server."""
    from pipeline.settings import ENVIRONMENT

    home = tmp_path_factory.mktemp("aws-home")
    with pytest.MonkeyPatch.context() as patch:
        for variable in [*ENVIRONMENT.values(), "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN",
                         "AWS_ENDPOINT_URL", "AWS_SECURITY_TOKEN"]:
            patch.delenv(variable, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_CONFIG_FILE", str(home / "config"))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
        yield


@pytest.fixture(scope="session")
def default_synth() -> Synth:
    """Both definitions as ``dogbreed synth`` builds them with the default settings (no flags, no environment),
    built once for the session; read-only: copy a document before changing it."""
    from pipeline.definition import synth
    from pipeline.settings import load_settings

    return synth(load_settings({}, environ={}))

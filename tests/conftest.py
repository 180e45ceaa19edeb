"""Shared fixtures: small real image data sets made on the fly, paths to the sources, the default synth."""
from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pipeline.definition import Synth

ROOT = Path(__file__).resolve().parents[1]
CODE_DIR = ROOT / "code"
LAMBDA_DIR = ROOT / "lambda"

# The container scripts import their siblings (contract, common) the way they do
# inside SageMaker: from the script's own folder.
if str(CODE_DIR) not in sys.path:
    sys.path.insert(0, str(CODE_DIR))


def write_images(folder: Path, count: int, color: tuple[int, int, int], size=(40, 30), seed: int = 0, fmt: str = "JPEG") -> list[Path]:
    """``count`` images that share a base colour (so a classifier can learn them) with noise."""
    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.new("RGB", size, color)
        pixels = image.load()
        for _ in range(size[0] * size[1] // 8):
            x, y = rng.randrange(size[0]), rng.randrange(size[1])
            pixels[x, y] = tuple(max(0, min(255, c + rng.randint(-60, 60))) for c in color)
        path = folder / f"img_{i:04d}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        image.save(path, fmt)
        paths.append(path)
    return paths


PALETTE = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 40), (160, 40, 200), (40, 200, 200), (120, 120, 120)]


def make_dataset(root: Path, classes: int = 3, per_split: dict[str, int] | None = None, size=(40, 30)) -> Path:
    """A dogImages-like tree: ``root/{train,valid,test}/NNN.Name/*.jpg``."""
    per_split = per_split or {"train": 12, "valid": 4, "test": 4}
    for s, (split, count) in enumerate(per_split.items()):
        for c in range(classes):
            name = f"{c + 1:03d}.Breed_{chr(ord('A') + c)}"
            write_images(root / split / name, count, PALETTE[c % len(PALETTE)], size=size, seed=100 * s + c)
    return root


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

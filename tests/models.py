"""Models the tests train with code/train.py, packed as SageMaker packs them, and what a pipeline reads from their evaluation."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from sources import CODE_DIR

# What a SageMaker job or a torchrun launch would set: a test's own process must not hand them to train.py.
JOB_ENV_NAMES = ("MASTER_ADDR", "RANK", "WORLD_SIZE")


def trained_job(data: Path, job: Path, *arguments: str) -> Path:
    """``job`` holding train.py's model folder (``model/``) and the model.tar.gz SageMaker packs from it (``artifact/``).

    train.py runs in its own process, as in a training job, for resnet18 without
    pretrained weights, checkpoints or output data, on the class folders in ``data``;
    ``arguments`` (image size, epochs, ...) are added to its command line.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_") and k not in JOB_ENV_NAMES}
    done = subprocess.run(
        [sys.executable, str(CODE_DIR / "train.py"), "--data", str(data), "--model-dir", str(job / "model"),
         "--backbone", "resnet18", "--pretrained-weights", "none", "--num-workers", "0",
         "--checkpoint-dir", "none", "--output-data-dir", "none", *arguments],
        env=env, cwd=job, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (job / "artifact").mkdir()
    with tarfile.open(job / "artifact" / "model.tar.gz", "w:gz") as tar:
        for path in sorted((job / "model").iterdir()):
            tar.add(path, arcname=path.name)
    return job


def json_get(document: dict, dotted_path: str):
    """What a ConditionStep's JsonGet reads at ``dotted_path``."""
    for key in dotted_path.split("."):
        document = document[key]
    return document

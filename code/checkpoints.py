"""The training checkpoint: its format, where it lives, when it may be resumed, and what it restores.

Rank 0 writes one file after every epoch (``write_checkpoint``, through a temporary
file and a rename); a run that finds it resumes after that epoch with the same model,
optimizer, scheduler and scaler states and the same progress (history, best epoch and
model, early-stopping count), so an interrupted run ends bit-identical to one that was
not. It is refused when the settings that change the trained weights differ
(``RESUME_KEYS``) or its format is another one.

Runs inside SageMaker's PyTorch training container: torch and the standard library only.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import common
import distributed
from arguments import TrainingInputError

CHECKPOINT_FORMAT = 2
CHECKPOINT_FILE = "checkpoint.pth"
SAGEMAKER_CHECKPOINT_DIR = "/opt/ml/checkpoints"
# Settings that change the trained weights: a checkpoint is only resumed by a
# run whose settings are the same (epochs too: they set the schedule's length). Patience and the speed settings may change.
RESUME_KEYS = ("backbone", "image_size", "classes", "freeze_backbone", "augment", "crop_scale", "flip", "learning_rate",
               "momentum", "weight_decay", "label_smoothing", "warmup_epochs", "epochs", "batch_size", "seed",
               "world_size")


def default_checkpoint_dir() -> str | None:
    return SAGEMAKER_CHECKPOINT_DIR if os.path.isdir(SAGEMAKER_CHECKPOINT_DIR) else None


@dataclass
class Progress:
    """Where training stands after ``epoch`` epochs: what each checkpoint saves and a resumed run continues from."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_metrics: dict[str, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None  # rank 0 only
    stale_epochs: int = 0
    stopped: bool = False


def checkpoint_path(checkpoint_dir: Path) -> Path:
    """One fixed name, not the job's: a step retry or a spot restart may run under a new job name
    with the same checkpoint location, and must resume. A checkpoint of other settings is refused
    by ``read_checkpoint``."""
    return checkpoint_dir / CHECKPOINT_FILE


def run_config(args: argparse.Namespace, classes: list[str], world_size: int) -> dict[str, Any]:
    values = {**vars(args), "classes": classes, "world_size": world_size}
    return {key: values[key] for key in RESUME_KEYS}


def atomic_torch_save(path: Path, value: Any) -> None:
    common.atomic_write(path, lambda p: torch.save(value, p))


def read_checkpoint(path: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TrainingInputError(f"cannot read the checkpoint {path} ({err}); delete it to start over") from None
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise TrainingInputError(f"{path} is not a checkpoint of this script (format {checkpoint.get('format')!r}); delete it to start over")
    saved = checkpoint["config"]
    differences = [f"{key} {saved.get(key)!r} -> {config[key]!r}" for key in RESUME_KEYS
                   if key != "classes" and saved.get(key) != config[key]]
    if saved.get("classes") != config["classes"]:
        differences.append("the class folders")
    if differences:
        raise TrainingInputError(
            f"the checkpoint {path} was written by a run with other settings ({'; '.join(differences)}); "
            "point --checkpoint-dir at an empty folder, or delete the checkpoint to start over")
    return checkpoint


def shared_checkpoint(path: Path | None, config: dict[str, Any], dist_info: distributed.DistInfo) -> dict[str, Any] | None:
    """Rank 0's checkpoint, sent to every rank: optimizer state must be the same everywhere to stay in step."""
    checkpoint = read_checkpoint(path, config) if path is not None and dist_info.is_main else None
    return distributed.from_main(checkpoint, dist_info)


def state_on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def write_checkpoint(path: Path, config: dict[str, Any], progress: Progress, model: nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                     scaler: torch.amp.GradScaler) -> None:
    # After an epoch that improved, the best state is this epoch's model: one copy serves as both (saved once).
    improved = progress.best_epoch == progress.epoch and progress.best_state is not None
    atomic_torch_save(path, {
        "format": CHECKPOINT_FORMAT, "config": config, "epoch": progress.epoch,
        "model": progress.best_state if improved else state_on_cpu(model), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "history": progress.history,
        "stale_epochs": progress.stale_epochs, "stopped": progress.stopped, "best_epoch": progress.best_epoch,
        "best_metrics": progress.best_metrics, "best_model": progress.best_state})


def resumed(checkpoint: dict[str, Any], optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler) -> Progress:
    """The progress ``checkpoint`` saved, its optimizer, scheduler and scaler states loaded into the given ones."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    return Progress(epoch=checkpoint["epoch"], history=checkpoint["history"], best_epoch=checkpoint["best_epoch"],
                    best_metrics=checkpoint["best_metrics"], best_state=checkpoint["best_model"],
                    stale_epochs=checkpoint["stale_epochs"], stopped=checkpoint["stopped"])

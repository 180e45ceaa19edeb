"""Train the dog-breed classifier: a torchvision ResNet with a new classification head.

Runs unchanged inside SageMaker's PyTorch training container (hyperparameters
arrive as ``--name value`` strings, data in ``SM_CHANNEL_*``, outputs go to
``SM_MODEL_DIR``) and on any machine with torch, torchvision and Pillow::

    python train.py --data ./dogImages --backbone resnet50 --epochs 10

Distributed when ``SM_HOSTS`` lists several hosts (one process per host, as
SageMaker starts it) or under ``torchrun``; only rank 0 writes the model and
the checkpoints. Every epoch prints one metric line (see contract.py) that the
tuner parses.

Laid out as torchvision's classification reference, top to bottom: the
arguments (``get_args_parser``, ``parse_args``, the frozen-backbone rule); the
model's frozen and trained ``Parts``; one epoch (``train_one_epoch``, the
batch-norm statistics, ``evaluate``); the optimizer and schedule; resuming
(``resumed_progress``); the fit (``fit``: a metric line and a checkpoint per
epoch); the outputs (``write_model_dir``); and ``main``/``run``, which read as
the table of contents. What the other scripts share lives in modules of its own:
the argument types (arguments.py), the pretrained weights and the initial model
(pretrained.py), the data and its loaders (training_data.py), the checkpoint
(checkpoints.py), and the process group, seeds, devices and each rank's share of
the data (distributed.py).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

import arguments
import checkpoints
import common
import contract
import distributed
import pretrained
import training_data
from arguments import TrainingInputError

LOG = logging.getLogger("train")
METRICS_HISTORY_FILE = "metrics_history.json"
INFERENCE_FILES = (contract.INFERENCE_SCRIPT, "common.py", "contract.py", "serving_model.py", "requirements.txt")
# Validation images stored with the model for int8 calibration (serving_model.py).
CALIBRATION_IMAGES = 32
# Global batches of the forward pass that recomputes batch-norm statistics after each epoch (when they train).
PRECISE_BN_BATCHES = 50
# The warm-up's first learning rate, as a fraction of --learning-rate (torchvision's lr_warmup_decay).
WARMUP_START_FACTOR = 0.01
DEFAULT_WARMUP_EPOCHS = 1
# What check_args resolves beside the hyperparameters; model_info.json records the hyperparameters without it.
RESOLVED_ARGS = ("weights_source",)


def get_args_parser() -> argparse.ArgumentParser:
    """Every option accepts the dash and the underscore spelling (``--learning-rate``, ``--learning_rate``)."""
    env = os.environ
    parser = argparse.ArgumentParser(
        description="Train a ResNet dog-breed classifier on ImageFolder splits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )

    def add(name: str, **kwargs: Any) -> None:
        flags = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
        parser.add_argument(*flags, dest=name.replace("-", "_"), **kwargs)

    add("data", type=arguments.text, default=env.get("SM_CHANNEL_TRAINING", "./data"),
        help="folder holding the train/ and valid/ ImageFolder splits (default $SM_CHANNEL_TRAINING)")
    for split, what in ((contract.TRAIN_CHANNEL, "training split, one folder per class"),
                        (contract.VALID_CHANNEL, "validation split, same class folders as the training split")):
        variable = common.channel_variable(split)
        add(f"{split}-dir", type=arguments.text, default=env.get(variable), help=f"{what} (default ${variable}, else <data>/{split})")
    add("model-dir", type=arguments.text, default=env.get("SM_MODEL_DIR", "./model"),
        help="where the model, classes, model info and inference code are written (default $SM_MODEL_DIR)")
    add("output-data-dir", type=arguments.optional_path, default=env.get("SM_OUTPUT_DATA_DIR"),
        help="where the per-epoch metrics history is written (default $SM_OUTPUT_DATA_DIR; none to skip)")
    add("checkpoint-dir", type=arguments.optional_path, default=checkpoints.default_checkpoint_dir(),
        help=f"where a checkpoint is written every epoch and resumed from (default {checkpoints.SAGEMAKER_CHECKPOINT_DIR} when it exists; none to skip)")
    add("learning-rate", type=arguments.non_negative_float, default=0.01,
        help="SGD learning rate after the warm-up; it then falls along a cosine to 0 at the last step of --epochs")
    add("momentum", type=arguments.non_negative_float, default=0.9, help="SGD momentum")
    add("weight-decay", type=arguments.non_negative_float, default=1e-4,
        help="SGD weight decay of the convolution and linear weights (batch-norm parameters and biases get none)")
    add("label-smoothing", type=arguments.fraction_below_one, default=0.1,
        help="training targets give the true class 1 - s + s/classes and every other class s/classes; the "
             "training loss is this smoothed cross-entropy, the validation loss stays the plain one")
    add("warmup-epochs", type=arguments.non_negative_int, default=None,
        help="epochs over which the learning rate rises linearly from 1%% of --learning-rate; they do not count "
             "towards --patience; fewer than --epochs (default: 1, or 0 for a one-epoch run)")
    add("batch-size", type=arguments.positive_int, default=32,
        help="images per optimizer step over all processes (the global batch): N processes split it, so every "
             "process count makes the same steps per epoch on the same batches")
    add("epochs", type=arguments.positive_int, default=10, help="most epochs to train")
    add("patience", type=arguments.non_negative_int, default=3,
        help="stop after this many epochs after the warm-up without a lower validation loss (0: never stop early)")
    add("backbone", type=arguments.text, choices=common.BACKBONES, default="resnet50", help="torchvision ResNet")
    add("freeze-backbone", type=arguments.boolean, nargs="?", const=True, default=None,
        help="train only the new head; the backbone, batch-norm statistics included, stays as loaded "
             "(default: frozen when pretrained weights are loaded, trained when the weights are random; "
             "true with --pretrained-weights none is refused)")
    add("pretrained-weights", type=arguments.text, default=None,
        help="backbone weights: 'imagenet' (the state dict in the "
             f"'{contract.PRETRAINED_CHANNEL}' channel, ${common.channel_variable(contract.PRETRAINED_CHANNEL)}, when it holds one, "
             "else torchvision's download), a state dict file (or a folder with one), or 'none' for random weights "
             "(default: imagenet)")
    add("image-size", type=arguments.positive_int, default=common.DEFAULT_IMAGE_SIZE, help="side of the square input, at least 32")
    add("augment", type=arguments.boolean, nargs="?", const=True, default=True,
        help="random resized crop (and horizontal flip, see --flip) on training images; false: the evaluation transform")
    add("crop-scale", type=arguments.area_fraction, default=common.DEFAULT_CROP_SCALE,
        help="smallest share of an image's area a random training crop keeps (1: crops differ only in aspect)")
    add("flip", type=arguments.boolean, nargs="?", const=True, default=True,
        help="mirror training images left-right half the time; false for images whose meaning a mirror changes "
             "(digits, text)")
    add("cache-features", type=arguments.cache_mode, nargs="?", const=True, default=False,
        help="compute the frozen backbone's features once and train the head on them "
             "(true needs a frozen backbone and --augment false; auto caches when both hold, "
             "else trains on the images)")
    add("features", type=arguments.optional_path, default=None,
        help="train the head on the backbone features extract_features.py wrote to this folder instead of on images "
             "(needs --freeze-backbone true and --augment false). Without it, the folder of "
             f"${common.channel_variable(contract.FEATURES_CHANNEL)} is used when the backbone is frozen, augmentation "
             "then off; when the backbone trains, that channel is ignored and the images are trained on")
    add("num-workers", type=arguments.non_negative_int, default=arguments.default_num_workers(), help="data-loading processes")
    add("num-threads", type=arguments.positive_int, default=arguments.default_num_threads(),
        help="torch CPU threads of this process (default $OMP_NUM_THREADS, else the cores divided by the processes on this machine)")
    add("seed", type=arguments.non_negative_int, default=0, help="seed for initialisation, shuffling and augmentation")
    return parser


def is_platform_hyperparameter(flag: str) -> bool:
    """Names SageMaker adds on its own, such as ``_tuning_objective_metric``."""
    name = flag.lstrip("-").split("=", 1)[0]
    return name.startswith("_") or name.startswith("sagemaker_")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    args, unknown = parser.parse_known_args(argv)
    rejected, skipping_value = [], False
    for token in unknown:
        if token.startswith("--"):
            skipping_value = is_platform_hyperparameter(token) and "=" not in token
            if not is_platform_hyperparameter(token):
                rejected.append(token)
        elif skipping_value:
            skipping_value = False
        else:
            rejected.append(token)
    if rejected:
        parser.error(f"unrecognized arguments: {' '.join(rejected)} (see --help for the hyperparameter names)")
    try:
        check_args(args)
    except TrainingInputError as err:
        parser.error(str(err))
    return args


def resolve_freeze(args: argparse.Namespace) -> bool:
    """The frozen-backbone rule: a random backbone always trains; loaded weights stay frozen unless told otherwise.

    A head on a frozen random network learns little, so ``--freeze-backbone true``
    with random weights is refused. Head-only training on given features
    (``--features``) has no backbone in the job, so it counts as frozen.
    """
    random_weights = args.weights_source is None
    if args.features:
        return True if args.freeze_backbone is None else args.freeze_backbone
    if args.freeze_backbone and random_weights:
        raise TrainingInputError(
            "--freeze-backbone true with --pretrained-weights none would train a head on a frozen random network; "
            "drop --freeze-backbone (a random backbone trains), or supply weights: --pretrained-weights <file>, "
            f"or the pipeline parameter {pretrained.PRETRAINED_URI_PARAMETER}")
    return not random_weights if args.freeze_backbone is None else args.freeze_backbone


def channel_features(args: argparse.Namespace) -> str | None:
    """The features channel's folder, when this run trains only a head: the tuning trials' mode follows the weights.

    A tuning job is given the features channel and the image channels. With a frozen backbone the
    features are exactly what the backbone computes on the unaugmented images, so the trial trains the
    head on them; when the backbone trains (random weights, or --freeze-backbone false) the trial trains
    the whole network on the images, as the final trainings do.
    """
    channel = arguments.optional_path(os.environ.get(common.channel_variable(contract.FEATURES_CHANNEL), ""))
    return channel if channel and args.freeze_backbone else None


def check_args(args: argparse.Namespace) -> None:
    """Resolve what the hyperparameters leave open (the weights' source, the frozen backbone, the features, the
    cache, the warm-up) and refuse the combinations that cannot train."""
    args.weights_source = pretrained.pretrained_source(args.pretrained_weights)
    args.freeze_backbone = resolve_freeze(args)
    if not args.features and channel_features(args):
        args.features, args.augment = channel_features(args), False
    if args.cache_features == "auto":
        args.cache_features = args.freeze_backbone and not args.augment and not args.features
    if args.cache_features and (not args.freeze_backbone or args.augment):
        reason = ("the backbone trains, since the weights are random (--pretrained-weights none)"
                  if args.weights_source is None else
                  f"--freeze-backbone {str(args.freeze_backbone).lower()} --augment {str(args.augment).lower()}")
        raise TrainingInputError(
            "--cache-features needs a backbone that does not change (frozen pretrained weights) and images that do not "
            f"change between epochs (--augment false); here {reason}. Use --cache-features false (or auto, which "
            "caches only when both hold), or supply pretrained weights and set --augment false.")
    if args.features and (args.cache_features or not args.freeze_backbone or args.augment):
        raise TrainingInputError(
            f"--features {args.features} trains the head on features computed once, so it needs --freeze-backbone true, "
            f"--augment false and no --cache-features; got --freeze-backbone {str(args.freeze_backbone).lower()} "
            f"--augment {str(args.augment).lower()} --cache-features {str(args.cache_features).lower()}")
    if args.warmup_epochs is None:
        args.warmup_epochs = min(DEFAULT_WARMUP_EPOCHS, args.epochs - 1)
    if args.warmup_epochs >= args.epochs:
        raise TrainingInputError(
            f"--warmup-epochs {args.warmup_epochs} leaves no epoch of the --epochs {args.epochs} for the cosine "
            "schedule: use fewer warm-up epochs (0 for none) or more epochs")
    if args.image_size < 32:
        raise TrainingInputError(f"--image-size must be at least 32 pixels for a ResNet, got {args.image_size}")
    if str(args.model_dir).startswith("s3://"):
        raise TrainingInputError(f"--model-dir must be a local folder, got {args.model_dir}; SageMaker uploads $SM_MODEL_DIR itself")


@dataclass
class Parts:
    """What the optimizer trains (``trainable``, DDP-wrapped when distributed) and what runs frozen before it."""

    trainable: nn.Module
    frozen: nn.Module | None

    @property
    def trainable_module(self) -> nn.Module:
        return self.trainable.module if isinstance(self.trainable, DistributedDataParallel) else self.trainable


def model_parts(model: nn.Module, freeze_backbone: bool, cached: bool, device: torch.device, dist_info: distributed.DistInfo) -> Parts:
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if freeze_backbone:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in model.fc.parameters():
            parameter.requires_grad_(True)
        frozen = None if cached else pretrained.feature_extractor(model).eval()
        trainable: nn.Module = model.fc
    else:
        frozen, trainable = None, distributed.with_global_batch_norm(model) if dist_info.enabled else model
    if dist_info.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        trainable = DistributedDataParallel(trainable, device_ids=device_ids)
    return Parts(trainable, frozen)


def parameters_digest(module: nn.Module) -> str:
    """A short hash of the trainable parameters, logged so that ranks can be compared."""
    digest = hashlib.sha256()
    for name, parameter in module.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def train_one_epoch(parts: Parts, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, device: torch.device,
                    dist_info: distributed.DistInfo, label_smoothing: float = 0.0) -> dict[str, float]:
    """One pass over this rank's share of every global batch; one optimizer step, and one scheduler step, per global batch.

    Each rank's loss is its images' summed loss times N over the global batch's
    size, so DDP's gradient average is the gradient of the global batch's mean
    loss: exactly what one process computes on that batch. The loss is the
    cross-entropy against targets smoothed by ``label_smoothing``.
    """
    parts.trainable.train()
    if parts.frozen is not None:
        parts.frozen.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum", label_smoothing=label_smoothing)
    loss_sum, count, steps = torch.zeros((), dtype=torch.float64, device=device), 0, 0
    global_sizes = loader.batch_sampler.global_sizes()
    started = time.perf_counter()
    for (inputs, targets), global_size in zip(loader, global_sizes, strict=True):
        inputs, targets = distributed.to_device(inputs, device), targets.to(device, non_blocking=True)
        with distributed.autocast(device):
            if parts.frozen is not None:
                with torch.no_grad():
                    inputs = parts.frozen(inputs)
            summed = criterion(parts.trainable(inputs).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(summed * (dist_info.world_size / global_size)).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += summed.detach().double()
        count += len(targets)
        steps += 1
    seconds = time.perf_counter() - started
    total_loss, total_count = distributed.all_reduce_sums([loss_sum.item(), count], device, dist_info)
    return {"train_loss": total_loss / max(total_count, 1), "train_images": total_count,
            "rank_images": count, "train_seconds": seconds, "optimizer_steps": steps}


def recompute_batch_norm_statistics(parts: Parts, loader: DataLoader, device: torch.device) -> None:
    """Running statistics of every trained batch norm, recomputed as the plain mean over this epoch's final weights.

    During training they are a moving average (momentum 0.1) of statistics of
    weights that were still changing: after few steps from random weights they
    mislead evaluation (validation losses in the thousands). One forward pass
    over up to ``PRECISE_BN_BATCHES`` global batches fixes that ("precise BN",
    torch's ``update_bn``: statistics reset, momentum None for the cumulative mean);
    under several ranks GlobalBatchNorm2d makes the statistics the global batches'.
    Nothing to do when the backbone is frozen.
    """
    if parts.frozen is not None:
        return
    batches = itertools.islice(loader, PRECISE_BN_BATCHES)  # no batch is loaded beyond the last one used
    with distributed.autocast(device):
        update_bn((distributed.to_device(inputs, device) for inputs, _ in batches), parts.trainable_module)


@torch.no_grad()
def evaluate(parts: Parts, loader: DataLoader, device: torch.device, dist_info: distributed.DistInfo) -> dict[str, float]:
    """Mean loss and accuracy over the whole validation split, the same on every rank.

    Runs the unwrapped model: the shards may differ in length by one batch, and
    DDP's forward would then wait for collectives that other ranks never call.
    """
    model = parts.trainable_module
    model.eval()
    if parts.frozen is not None:
        parts.frozen.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for inputs, targets in loader:
        inputs, targets = distributed.to_device(inputs, device), targets.to(device, non_blocking=True)
        with distributed.autocast(device):
            if parts.frozen is not None:
                inputs = parts.frozen(inputs)
            logits = model(inputs).float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(dim=1) == targets).sum().item()
        count += len(targets)
    total_loss, total_correct, total_count = distributed.all_reduce_sums([loss_sum, correct, count], device, dist_info)
    return {"val_loss": total_loss / total_count, "val_accuracy": total_correct / total_count}


@dataclass
class Trainer:
    """What every epoch uses: the settings, this process's place, the model and its optimizer, the data."""

    args: argparse.Namespace
    dist_info: distributed.DistInfo
    device: torch.device
    model: nn.Module
    parts: Parts
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    train_loader: DataLoader
    valid_loader: DataLoader
    config: dict[str, Any]
    checkpoint_file: Path | None


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trained parameters in two groups, as torchvision's ``set_weight_decay`` with ``norm_weight_decay=0``:
    convolution and linear weights decay; batch-norm weights and biases and every bias do not (decaying them
    only shrinks the normalised activations' scale and offset, which regularises nothing)."""
    decayed, plain = [], []
    for owner in module.modules():
        is_norm = isinstance(owner, nn.modules.batchnorm._BatchNorm)
        for name, parameter in owner.named_parameters(recurse=False):
            if parameter.requires_grad:
                (plain if is_norm or name == "bias" else decayed).append(parameter)
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def make_optimizer(parts: Parts, args: argparse.Namespace) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameter_groups(parts.trainable, args.weight_decay), lr=args.learning_rate,
                           momentum=args.momentum)


def make_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int,
                   warmup_epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped after every optimizer step: a linear warm-up from ``WARMUP_START_FACTOR`` times the learning rate
    over ``warmup_epochs``, then a cosine from the learning rate to 0 at the last step of ``epochs``; torchvision's
    classification recipe (LinearLR, then CosineAnnealingLR, in a SequentialLR), by steps instead of epochs."""
    warmup_steps, total_steps = warmup_epochs * steps_per_epoch, epochs * steps_per_epoch
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps)
    if warmup_steps == 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=WARMUP_START_FACTOR, total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def resumed_progress(checkpoint: dict[str, Any] | None, trainer: Trainer) -> checkpoints.Progress:
    """The progress the checkpoint saved, its optimizer, scheduler and scaler states loaded into ``trainer``'s;
    none without one."""
    if checkpoint is None:
        return checkpoints.Progress()
    progress = checkpoints.resumed(checkpoint, trainer.optimizer, trainer.scheduler, trainer.scaler)
    LOG.info("resumed from %s after epoch %d (best epoch %d)", trainer.checkpoint_file, progress.epoch, progress.best_epoch)
    return progress


@dataclass(frozen=True)
class Elapsed:
    seconds: float = 0.0
    # CPU seconds of this process's threads (data-loading workers excluded): steadier than wall time on a busy machine.
    cpu_seconds: float = 0.0

    def __add__(self, other: Elapsed) -> Elapsed:
        return Elapsed(self.seconds + other.seconds, self.cpu_seconds + other.cpu_seconds)


class Stopwatch:
    def __init__(self) -> None:
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def elapsed(self) -> Elapsed:
        return Elapsed(time.perf_counter() - self.started, time.process_time() - self.cpu_started)


def write_line(line: str) -> None:
    """One write per line: processes that share stdout (torchrun) then never splice their lines together."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def epoch_metrics(trainer: Trainer, epoch: int) -> tuple[dict[str, float], dict[str, float]]:
    """Train one epoch, recompute the batch-norm statistics, validate: the metrics and the training statistics."""
    args, dist_info, device = trainer.args, trainer.dist_info, trainer.device
    distributed.seed_everything(distributed.derived_seed(args.seed, epoch, dist_info.rank))
    trainer.train_loader.batch_sampler.set_epoch(epoch)
    stats = train_one_epoch(trainer.parts, trainer.train_loader, trainer.optimizer, trainer.scheduler, trainer.scaler,
                            device, dist_info, args.label_smoothing)
    recompute_batch_norm_statistics(trainer.parts, trainer.train_loader, device)
    metrics = {"train_loss": stats["train_loss"], **evaluate(trainer.parts, trainer.valid_loader, device, dist_info)}
    return metrics, stats


def history_row(epoch: int, metrics: dict[str, float], stats: dict[str, float], spent: Elapsed) -> dict[str, Any]:
    return {"epoch": epoch, **metrics, "seconds": spent.seconds, "cpu_seconds": spent.cpu_seconds,
            "train_images_per_second": stats["train_images"] / max(stats["train_seconds"], 1e-9),
            "optimizer_steps": stats["optimizer_steps"]}


def log_epoch(trainer: Trainer, row: dict[str, Any], stats: dict[str, float]) -> None:
    LOG.info("epoch %d took %.2f s; training %d images (%d on this rank) in %d optimizer steps of global batch %d "
             "at %.1f images/s; parameters %s", row["epoch"], row["seconds"], stats["train_images"],
             stats["rank_images"], stats["optimizer_steps"], trainer.args.batch_size, row["train_images_per_second"],
             parameters_digest(trainer.parts.trainable_module))


def record_epoch(trainer: Trainer, progress: checkpoints.Progress, metrics: dict[str, float], improved: bool) -> None:
    """Advance ``progress`` by one epoch: the best model when the validation loss fell, and early stopping.

    Warm-up epochs never count towards the patience: the learning rate is still rising, so a validation
    loss that stalls then says nothing about the epochs to come."""
    progress.epoch += 1
    if improved:
        progress.best_epoch, progress.best_metrics, progress.stale_epochs = progress.epoch, metrics, 0
        progress.best_state = checkpoints.state_on_cpu(trainer.model) if trainer.dist_info.is_main else None
    elif progress.epoch > trainer.args.warmup_epochs:
        progress.stale_epochs += 1
    progress.stopped = trainer.args.patience > 0 and progress.stale_epochs >= trainer.args.patience
    if progress.stopped:
        LOG.info("stopping early: no lower validation loss for %d epochs; best epoch %d",
                 progress.stale_epochs, progress.best_epoch)


def save_progress(trainer: Trainer, progress: checkpoints.Progress) -> None:
    """Rank 0: the checkpoint (with a checkpoint folder) and the metrics history (with an output data folder)."""
    if not trainer.dist_info.is_main:
        return
    if trainer.checkpoint_file is not None:
        checkpoints.write_checkpoint(trainer.checkpoint_file, trainer.config, progress, trainer.model, trainer.optimizer,
                                     trainer.scheduler, trainer.scaler)
        LOG.info("saved checkpoint of epoch %d to %s", progress.epoch, trainer.checkpoint_file)
    if trainer.args.output_data_dir:
        common.atomic_write_json(Path(trainer.args.output_data_dir) / METRICS_HISTORY_FILE, progress.history)


def fit(trainer: Trainer, progress: checkpoints.Progress, setup: Elapsed) -> checkpoints.Progress:
    """The epochs after ``progress.epoch`` up to --epochs, or until early stopping; one metric line and checkpoint each.

    The first epoch of a run that does not resume counts the set-up (loaders, cached features) in its time.
    """
    while not progress.stopped and progress.epoch < trainer.args.epochs:
        epoch, clock = progress.epoch + 1, Stopwatch()
        metrics, stats = epoch_metrics(trainer, epoch)
        best = progress.best_metrics
        improved = best is None or metrics["val_loss"] < best["val_loss"]
        metrics["best_val_loss"] = metrics["val_loss"] if improved else best["val_loss"]
        write_line(contract.format_metric_line(epoch, metrics))
        row = history_row(epoch, metrics, stats, clock.elapsed() + (setup if not progress.history else Elapsed()))
        progress.history.append(row)
        log_epoch(trainer, row, stats)
        record_epoch(trainer, progress, metrics, improved)
        save_progress(trainer, progress)
    return progress


def training_summary(progress: checkpoints.Progress, dist_info: distributed.DistInfo, setup: Elapsed) -> dict[str, Any]:
    return {"best_epoch": progress.best_epoch, "best_metrics": progress.best_metrics, "history": progress.history,
            "epochs_trained": len(progress.history), "stopped_early": progress.stopped,
            "world_size": dist_info.world_size, "setup_seconds": setup.seconds}


def copy_inference_code(destination: Path) -> list[str]:
    """Copy the inference files beside this script into ``destination`` (replaced as a whole)."""
    source = Path(__file__).resolve().parent
    names = [name for name in INFERENCE_FILES if (source / name).is_file()]

    def copy_into(folder: Path) -> None:
        for name in names:
            shutil.copy2(source / name, folder / name)

    common.atomic_write_dir(destination, copy_into)
    return names


def model_info(args: argparse.Namespace, classes: list[str], summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "backbone": args.backbone,
        "image_size": args.image_size,
        "resize_size": common.resize_size(args.image_size),
        "num_classes": len(classes),
        "normalization": {"mean": list(common.IMAGENET_MEAN), "std": list(common.IMAGENET_STD)},
        "best_epoch": summary["best_epoch"],
        "metrics": summary["best_metrics"],
        "epochs_trained": summary["epochs_trained"],
        "stopped_early": summary["stopped_early"],
        "world_size": summary["world_size"],
        "pretrained_weights": args.weights_source,
        # What the run trained on: "features" (the head only, on --features or the features channel) or "images".
        "trained_on": "features" if args.features else "images",
        "hyperparameters": {key: value for key, value in vars(args).items() if key not in RESOLVED_ARGS},
        "torch_version": torch.__version__,
    }


def calibration_sample(dataset: Any, count: int = CALIBRATION_IMAGES) -> list[Path]:
    """Up to ``count`` image files of an ImageFolder split, spread evenly over it (so over its classes).

    None for a split of precomputed features, which has no image files.
    """
    samples = getattr(dataset, "samples", None) or []
    taken = min(count, len(samples))
    return [Path(samples[int(i * len(samples) / taken)][0]) for i in range(taken)]


def write_calibration_sample(destination: Path, images: Sequence[Path]) -> None:
    """Copy ``images`` into ``destination`` as 0000.jpg, 0001.png, ... (replaced as a whole); nothing when there are none."""
    if not images:
        shutil.rmtree(destination, ignore_errors=True)
        return

    def copy_into(folder: Path) -> None:
        for position, image in enumerate(images):
            shutil.copyfile(image, folder / f"{position:04d}{image.suffix.lower()}")

    common.atomic_write_dir(destination, copy_into)


def write_model_dir(model_dir: Path, state: dict[str, torch.Tensor], classes: list[str], info: dict[str, Any],
                    calibration: Sequence[Path] = ()) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    checkpoints.atomic_torch_save(model_dir / contract.MODEL_FILE, state)
    common.atomic_write_json(model_dir / contract.CLASSES_FILE, classes)
    common.atomic_write_json(model_dir / contract.MODEL_INFO_FILE, info)
    write_calibration_sample(model_dir / contract.CALIBRATION_DIR, calibration)
    copied = copy_inference_code(model_dir / contract.MODEL_CODE_DIR)
    LOG.info("wrote %s, %s, %s and %s/ (%s) to %s", contract.MODEL_FILE, contract.CLASSES_FILE,
             contract.MODEL_INFO_FILE, contract.MODEL_CODE_DIR, ", ".join(copied), model_dir)


def write_outputs(args: argparse.Namespace, dist_info: distributed.DistInfo, splits: training_data.Splits, progress: checkpoints.Progress,
                  summary: dict[str, Any]) -> None:
    """Rank 0: the best epoch's model directory (weights, classes, model info, calibration images, inference code)."""
    if dist_info.is_main:
        write_model_dir(Path(args.model_dir), progress.best_state, splits.classes,
                        model_info(args, splits.classes, summary), calibration_sample(splits.valid))
    LOG.info("best epoch %d: %s", progress.best_epoch,
             ", ".join(f"{k} {v:.4f}" for k, v in progress.best_metrics.items()))


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train, print one metric line per epoch, and (rank 0) write the best epoch's model. Returns a summary."""
    torch.set_num_threads(args.num_threads)
    with distributed.process_group() as dist_info:
        return run(args, dist_info)


def run(args: argparse.Namespace, dist_info: distributed.DistInfo) -> dict[str, Any]:
    distributed.configure_logging(LOG, dist_info)
    device = distributed.training_device(dist_info.local_rank)
    LOG.info("device %s, %d CPU threads, %d data workers, torch %s", device, torch.get_num_threads(),
             args.num_workers, torch.__version__)
    splits = training_data.load_splits(args, dist_info)
    model = pretrained.initial_model(args.backbone, len(splits.classes), args.seed, args.weights_source)
    config = checkpoints.run_config(args, splits.classes, dist_info.world_size)
    checkpoint_file = checkpoints.checkpoint_path(Path(args.checkpoint_dir)) if args.checkpoint_dir else None
    checkpoint = checkpoints.shared_checkpoint(checkpoint_file, config, dist_info)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])

    clock = Stopwatch()
    parts = model_parts(model, args.freeze_backbone, args.cache_features or bool(args.features), device, dist_info)
    train_loader, valid_loader = training_data.make_loaders(args, splits, model, device, dist_info)
    setup = clock.elapsed()

    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    optimizer = make_optimizer(parts, args)
    scheduler = make_scheduler(optimizer, len(train_loader.batch_sampler), args.epochs, args.warmup_epochs)
    trainer = Trainer(args, dist_info, device, model, parts, optimizer, scheduler, scaler,
                      train_loader, valid_loader, config, checkpoint_file)
    progress = resumed_progress(checkpoint, trainer)
    del checkpoint
    progress = fit(trainer, progress, setup)

    summary = training_summary(progress, dist_info, setup)
    write_outputs(args, dist_info, splits, progress, summary)
    return summary


def cli(argv: Sequence[str] | None = None) -> int:
    return common.run_script("train.py", contract.TRAINING_FAILURE_FILE, lambda: parse_args(argv), main,
                             (TrainingInputError, distributed.DistributedSetupError))


if __name__ == "__main__":
    sys.exit(cli())

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
arguments (``get_args_parser``, ``parse_args``); the data (``load_data``,
``load_splits``); the model (pretrained weights, ``initial_model``, the frozen
and trained ``Parts``); the features cache and ``make_loaders``; one epoch
(``train_one_epoch``, ``evaluate``); resuming (checkpoints, ``Progress``,
``resumed_progress``); the fit (``fit``: a metric line and a checkpoint per
epoch); the outputs (``write_model_dir``); and ``main``/``run``, which read as
the table of contents. The process group, seeds and each rank's share of the
data are in distributed.py.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets, models

import common
import contract
import distributed
import features

LOG = logging.getLogger("train")
CHECKPOINT_FORMAT = 2
CHECKPOINT_FILE = "checkpoint.pth"
METRICS_HISTORY_FILE = "metrics_history.json"
INFERENCE_FILES = (contract.INFERENCE_SCRIPT, "common.py", "contract.py", "serving_model.py", "requirements.txt")
# Validation images stored with the model for int8 calibration (serving_model.py).
CALIBRATION_IMAGES = 32
WEIGHTS_SUFFIXES = (".pth", ".pt", ".bin")
# Global batches of the forward pass that recomputes batch-norm statistics after each epoch (when they train).
PRECISE_BN_BATCHES = 50
# The pipeline parameter whose S3 URI becomes the pretrained channel (steps/parameters.py).
PRETRAINED_URI_PARAMETER = "PretrainedWeightsS3Uri"
SAGEMAKER_CHECKPOINT_DIR = "/opt/ml/checkpoints"
# Settings that change the trained weights: a checkpoint is only resumed by a
# run whose settings are the same (epochs too: they set the schedule's length). Patience and the speed settings may change.
RESUME_KEYS = ("backbone", "image_size", "classes", "freeze_backbone", "augment", "crop_scale", "flip", "learning_rate",
               "momentum", "weight_decay", "label_smoothing", "warmup_epochs", "epochs", "batch_size", "seed",
               "world_size")
# The warm-up's first learning rate, as a fraction of --learning-rate (torchvision's lr_warmup_decay).
WARMUP_START_FACTOR = 0.01
DEFAULT_WARMUP_EPOCHS = 1


class TrainingInputError(ValueError):
    """Bad data, arguments or checkpoint: the message says what, where, and what to do."""


def text(value: str) -> str:
    """A string hyperparameter; SageMaker may JSON-encode strings, so one level of quotes is removed."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return value


def boolean(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = text(value).lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _number(kind: type, minimum: float, value: str) -> Any:
    try:
        number = kind(text(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if not number >= minimum or (kind is float and not math.isfinite(number)):
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value!r}")
    return number


def positive_int(value: str) -> int:
    return _number(int, 1, value)


def non_negative_int(value: str) -> int:
    return _number(int, 0, value)


def non_negative_float(value: str) -> float:
    return _number(float, 0.0, value)


def fraction_below_one(value: str) -> float:
    """A number in [0, 1): label smoothing of 1 would leave nothing of the true class."""
    number = _number(float, 0.0, value)
    if number >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {value!r}")
    return number


def area_fraction(value: str) -> float:
    """A number in (0, 1]: the smallest share of an image's area a random crop keeps."""
    number = _number(float, 0.0, value)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1 (a share of the image's area), got {value!r}")
    return number


def cache_mode(value: str | bool) -> bool | str:
    """true, false or auto (cache only when the backbone is frozen and augmentation is off)."""
    if isinstance(value, str) and text(value).lower() == "auto":
        return "auto"
    try:
        return boolean(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected true, false or auto, got {value!r}") from None


def optional_path(value: str) -> str | None:
    value = text(value)
    return None if value.lower() in ("", "none") else value


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpus_per_process() -> int:
    return max(1, usable_cpus() // distributed.processes_on_this_machine())


def default_num_threads() -> int:
    """OMP_NUM_THREADS when set, else this process's share of the cores, so N local processes do not oversubscribe."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    return int(configured) if configured.isdigit() and int(configured) > 0 else cpus_per_process()


def default_num_workers() -> int:
    """Data-loading processes: on a GPU decoding is the bottleneck; on a CPU the model is, so fewer."""
    share = cpus_per_process()
    if torch.cuda.is_available():
        return min(8, share)
    return min(4, share // 2)


def default_checkpoint_dir() -> str | None:
    return SAGEMAKER_CHECKPOINT_DIR if os.path.isdir(SAGEMAKER_CHECKPOINT_DIR) else None


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

    add("data", type=text, default=env.get("SM_CHANNEL_TRAINING", "./data"),
        help="folder holding the train/ and valid/ ImageFolder splits (default $SM_CHANNEL_TRAINING)")
    for split, what in ((contract.TRAIN_CHANNEL, "training split, one folder per class"),
                        (contract.VALID_CHANNEL, "validation split, same class folders as the training split")):
        variable = common.channel_variable(split)
        add(f"{split}-dir", type=text, default=env.get(variable), help=f"{what} (default ${variable}, else <data>/{split})")
    add("model-dir", type=text, default=env.get("SM_MODEL_DIR", "./model"),
        help="where the model, classes, model info and inference code are written (default $SM_MODEL_DIR)")
    add("output-data-dir", type=optional_path, default=env.get("SM_OUTPUT_DATA_DIR"),
        help="where the per-epoch metrics history is written (default $SM_OUTPUT_DATA_DIR; none to skip)")
    add("checkpoint-dir", type=optional_path, default=default_checkpoint_dir(),
        help=f"where a checkpoint is written every epoch and resumed from (default {SAGEMAKER_CHECKPOINT_DIR} when it exists; none to skip)")
    add("learning-rate", type=non_negative_float, default=0.01,
        help="SGD learning rate after the warm-up; it then falls along a cosine to 0 at the last step of --epochs")
    add("momentum", type=non_negative_float, default=0.9, help="SGD momentum")
    add("weight-decay", type=non_negative_float, default=1e-4,
        help="SGD weight decay of the convolution and linear weights (batch-norm parameters and biases get none)")
    add("label-smoothing", type=fraction_below_one, default=0.1,
        help="training targets give the true class 1 - s + s/classes and every other class s/classes; the "
             "training loss is this smoothed cross-entropy, the validation loss stays the plain one")
    add("warmup-epochs", type=non_negative_int, default=None,
        help="epochs over which the learning rate rises linearly from 1%% of --learning-rate; they do not count "
             "towards --patience; fewer than --epochs (default: 1, or 0 for a one-epoch run)")
    add("batch-size", type=positive_int, default=32,
        help="images per optimizer step over all processes (the global batch): N processes split it, so every "
             "process count makes the same steps per epoch on the same batches")
    add("epochs", type=positive_int, default=10, help="most epochs to train")
    add("patience", type=non_negative_int, default=3,
        help="stop after this many epochs after the warm-up without a lower validation loss (0: never stop early)")
    add("backbone", type=text, choices=common.BACKBONES, default="resnet50", help="torchvision ResNet")
    add("freeze-backbone", type=boolean, nargs="?", const=True, default=None,
        help="train only the new head; the backbone, batch-norm statistics included, stays as loaded "
             "(default: frozen when pretrained weights are loaded, trained when the weights are random; "
             "true with --pretrained-weights none is refused)")
    add("pretrained-weights", type=text, default=None,
        help="backbone weights: 'imagenet' (the state dict in the "
             f"'{contract.PRETRAINED_CHANNEL}' channel, ${common.channel_variable(contract.PRETRAINED_CHANNEL)}, when it holds one, "
             "else torchvision's download), a state dict file (or a folder with one), or 'none' for random weights "
             "(default: imagenet)")
    add("image-size", type=positive_int, default=common.DEFAULT_IMAGE_SIZE, help="side of the square input, at least 32")
    add("augment", type=boolean, nargs="?", const=True, default=True,
        help="random resized crop (and horizontal flip, see --flip) on training images; false: the evaluation transform")
    add("crop-scale", type=area_fraction, default=common.DEFAULT_CROP_SCALE,
        help="smallest share of an image's area a random training crop keeps (1: crops differ only in aspect)")
    add("flip", type=boolean, nargs="?", const=True, default=True,
        help="mirror training images left-right half the time; false for images whose meaning a mirror changes "
             "(digits, text)")
    add("cache-features", type=cache_mode, nargs="?", const=True, default=False,
        help="compute the frozen backbone's features once and train the head on them "
             "(true needs a frozen backbone and --augment false; auto caches when both hold, "
             "else trains on the images)")
    add("features", type=optional_path, default=None,
        help="train the head on the backbone features extract_features.py wrote to this folder instead of on images "
             "(needs --freeze-backbone true and --augment false). Without it, the folder of "
             f"${common.channel_variable(contract.FEATURES_CHANNEL)} is used when the backbone is frozen, augmentation "
             "then off; when the backbone trains, that channel is ignored and the images are trained on")
    add("num-workers", type=non_negative_int, default=default_num_workers(), help="data-loading processes")
    add("num-threads", type=positive_int, default=default_num_threads(),
        help="torch CPU threads of this process (default $OMP_NUM_THREADS, else the cores divided by the processes on this machine)")
    add("seed", type=non_negative_int, default=0, help="seed for initialisation, shuffling and augmentation")
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
    random_weights = pretrained_source(args.pretrained_weights) is None
    if args.features:
        return True if args.freeze_backbone is None else args.freeze_backbone
    if args.freeze_backbone and random_weights:
        raise TrainingInputError(
            "--freeze-backbone true with --pretrained-weights none would train a head on a frozen random network; "
            "drop --freeze-backbone (a random backbone trains), or supply weights: --pretrained-weights <file>, "
            f"or the pipeline parameter {PRETRAINED_URI_PARAMETER}")
    return not random_weights if args.freeze_backbone is None else args.freeze_backbone


def channel_features(args: argparse.Namespace) -> str | None:
    """The features channel's folder, when this run trains only a head: the tuning trials' mode follows the weights.

    A tuning job is given the features channel and the image channels. With a frozen backbone the
    features are exactly what the backbone computes on the unaugmented images, so the trial trains the
    head on them; when the backbone trains (random weights, or --freeze-backbone false) the trial trains
    the whole network on the images, as the final trainings do.
    """
    channel = optional_path(os.environ.get(common.channel_variable(contract.FEATURES_CHANNEL), ""))
    return channel if channel and args.freeze_backbone else None


def check_args(args: argparse.Namespace) -> None:
    args.freeze_backbone = resolve_freeze(args)
    if not args.features and channel_features(args):
        args.features, args.augment = channel_features(args), False
    if args.cache_features == "auto":
        args.cache_features = args.freeze_backbone and not args.augment and not args.features
    if args.cache_features and (not args.freeze_backbone or args.augment):
        reason = ("the backbone trains, since the weights are random (--pretrained-weights none)"
                  if pretrained_source(args.pretrained_weights) is None else
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


def split_dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    data = Path(args.data)
    train_dir = Path(args.train_dir) if args.train_dir else data / contract.TRAIN_CHANNEL
    valid_dir = Path(args.valid_dir) if args.valid_dir else data / contract.VALID_CHANNEL
    return train_dir, valid_dir


def split_classes(folder: Path, split: str) -> list[str]:
    if not folder.is_dir():
        raise TrainingInputError(
            f"the {split} split is missing: {folder} is not a folder. Expected one folder per class "
            f"({folder}/001.Affenpinscher/*.jpg); pass --{split}-dir, or --data with {split}/ inside")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise TrainingInputError(f"the {split} split at {folder} is empty: it holds no class folders")
    return classes


def check_splits(train_dir: Path, valid_dir: Path) -> list[str]:
    """The class names, in index order, after checking that both splits hold the same class folders."""
    train_classes = split_classes(train_dir, contract.TRAIN_CHANNEL)
    valid_classes = split_classes(valid_dir, contract.VALID_CHANNEL)
    if train_classes != valid_classes:
        only_train = sorted(set(train_classes) - set(valid_classes))
        only_valid = sorted(set(valid_classes) - set(train_classes))
        raise TrainingInputError(
            f"the class folders differ between {train_dir} and {valid_dir}: "
            f"only in train: {', '.join(only_train[:5]) or '-'}{' ...' if len(only_train) > 5 else ''}; "
            f"only in valid: {', '.join(only_valid[:5]) or '-'}{' ...' if len(only_valid) > 5 else ''}. "
            "Both splits need the same class folders, so that class indices mean the same")
    if len(train_classes) < 2:
        raise TrainingInputError(f"the train split at {train_dir} has {len(train_classes)} class folder; a classifier needs at least 2")
    return train_classes


def image_folder(folder: Path, split: str, transform: Any) -> datasets.ImageFolder:
    try:
        dataset = datasets.ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as err:
        raise TrainingInputError(f"the {split} split at {folder} has a class folder without images: {err}") from None
    return dataset


def load_data(train_dir: Path, valid_dir: Path, image_size: int, augment: bool, crop_scale: float = common.DEFAULT_CROP_SCALE,
              flip: bool = True) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """The training and validation ImageFolders; the test split is never read here."""
    check_splits(train_dir, valid_dir)
    train_set = image_folder(train_dir, contract.TRAIN_CHANNEL, common.train_transform(image_size, augment, crop_scale, flip))
    valid_set = image_folder(valid_dir, contract.VALID_CHANNEL, common.eval_transform(image_size))
    return train_set, valid_set


@dataclass
class Splits:
    """The training and validation data: ImageFolders, or the precomputed features of --features (``feature_dim`` set)."""

    train: Dataset
    valid: Dataset
    classes: list[str]
    train_dir: Path
    valid_dir: Path
    feature_dim: int | None = None


def load_splits(args: argparse.Namespace, dist_info: distributed.DistInfo) -> Splits:
    """The --features folder when given, else the image splits; at least one training image per process."""
    if args.features:
        feature_set = read_feature_set(args)
        folder = Path(args.features)
        splits = Splits(feature_set.train, feature_set.valid, feature_set.classes, folder, folder, feature_set.feature_dim)
    else:
        train_dir, valid_dir = split_dirs(args)
        train_set, valid_set = load_data(train_dir, valid_dir, args.image_size, args.augment, args.crop_scale, args.flip)
        splits = Splits(train_set, valid_set, train_set.classes, train_dir, valid_dir)
    if len(splits.train) < dist_info.world_size:
        raise TrainingInputError(f"the train split at {splits.train_dir} has {len(splits.train)} images, "
                                 f"fewer than the {dist_info.world_size} processes")
    LOG.info("%d classes; %d training images in %s, %d validation images in %s",
             len(splits.classes), len(splits.train), splits.train_dir, len(splits.valid), splits.valid_dir)
    return splits


def loader_options(args: argparse.Namespace, device: torch.device, workers: int) -> dict[str, Any]:
    return {"batch_size": args.batch_size, "num_workers": workers, "pin_memory": device.type == "cuda",
            "persistent_workers": workers > 0}


def make_train_loader(dataset: Dataset, args: argparse.Namespace, dist_info: distributed.DistInfo, device: torch.device,
                      seeded: bool, workers: int) -> DataLoader:
    """Batches of this rank's share of each global batch of ``--batch-size`` (see GlobalBatchSampler)."""
    if args.batch_size < dist_info.world_size:
        raise TrainingInputError(
            f"--batch-size {args.batch_size} is the global batch, split across the {dist_info.world_size} processes, "
            f"so it must be at least {dist_info.world_size}: raise it or use fewer instances")
    sampler = distributed.GlobalBatchSampler(len(dataset), args.batch_size, dist_info, args.seed,
                                 batch_norm_trains=not args.freeze_backbone, seeded=seeded)
    options = {key: value for key, value in loader_options(args, device, workers).items() if key != "batch_size"}
    return DataLoader(distributed.SeededDataset(dataset) if seeded else dataset, batch_sampler=sampler, **options)


def make_eval_loader(dataset: Dataset, args: argparse.Namespace, dist_info: distributed.DistInfo, device: torch.device,
                     workers: int) -> DataLoader:
    """Unpadded shards, so that the all-reduced sums count every validation image exactly once."""
    shard = Subset(dataset, distributed.shard_indices(len(dataset), dist_info, pad=False))
    return DataLoader(shard, shuffle=False, **loader_options(args, device, workers))


def channel_weights() -> Path | None:
    """The state dict file in the pretrained channel; None without the channel or when it holds the placeholder.

    The definition cannot leave an input out at run time, and SageMaker refuses an
    empty S3 URI, so ``PretrainedWeightsS3Uri`` defaults to an object every job
    has: the job's own code archive. A channel holding only that file means
    "no weights supplied".
    """
    folder = os.environ.get(common.channel_variable(contract.PRETRAINED_CHANNEL))
    if not folder:
        return None
    path = Path(folder)
    names = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else []
    if names == [contract.NO_WEIGHTS_PLACEHOLDER]:
        return None
    if path.is_dir() and not any(Path(name).suffix in WEIGHTS_SUFFIXES for name in names):
        raise TrainingInputError(
            f"the '{contract.PRETRAINED_CHANNEL}' channel ({path}) holds no state dict file "
            f"({', '.join(names[:5]) or 'nothing'}): point {PRETRAINED_URI_PARAMETER} at a .pth file of the backbone's "
            "weights (torch.save(model.state_dict(), ...)), or leave it at its default for none")
    return weights_file(path)


def pretrained_source(value: str | None) -> str | None:
    """'imagenet', a state dict path, or None for random weights.

    'imagenet' (the default) reads the weights from the pretrained channel when it
    holds some, so jobs without internet can transfer-learn.
    """
    channel = channel_weights()
    lowered = "imagenet" if value is None else value.lower()
    if lowered == "none":
        if channel is not None:
            raise TrainingInputError(
                f"{PRETRAINED_URI_PARAMETER} supplies {channel.name} in the '{contract.PRETRAINED_CHANNEL}' channel, but "
                "--pretrained-weights is none: set PretrainedWeights=imagenet to use the file, "
                f"or leave {PRETRAINED_URI_PARAMETER} at its default to train from random weights")
        return None
    if lowered == "imagenet":
        return str(channel) if channel is not None else "imagenet"
    return value


def weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHTS_SUFFIXES)
        if len(files) == 1:
            return files[0]
        raise TrainingInputError(
            f"the pretrained weights folder {path} holds {len(files)} .pth/.pt files ({', '.join(f.name for f in files) or 'none'}); "
            "it must hold exactly one state dict, or pass --pretrained-weights <file>")
    raise TrainingInputError(f"--pretrained-weights {path} does not exist; pass a state dict file, 'imagenet' or 'none'")


def imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    weights = models.get_model_weights(backbone).DEFAULT
    try:
        return weights.get_state_dict(progress=False)
    except Exception as err:  # network errors come as URLError, OSError, RuntimeError, ...
        filename = weights.url.rsplit("/", 1)[-1]
        raise TrainingInputError(
            f"cannot download torchvision's ImageNet weights for {backbone} from {weights.url} ({err}). "
            f"Jobs without internet cannot download: upload {filename} to S3 and set the pipeline parameter "
            f"{PRETRAINED_URI_PARAMETER} to its URI (it becomes the '{contract.PRETRAINED_CHANNEL}' channel), "
            "or pass --pretrained-weights <file>, or PretrainedWeights=none to train the whole network from random weights") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TrainingInputError(f"cannot read the pretrained weights {path} as a torch state dict: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TrainingInputError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_weights(model: nn.Module, source: str | None, backbone: str) -> None:
    """Load every backbone weight from ``source``; the head is new, so the source's head is ignored."""
    if source is None:
        return
    if source == "imagenet":
        origin, state = "torchvision's ImageNet weights", imagenet_state_dict(backbone)
    else:
        path = weights_file(Path(source))
        origin, state = str(path), read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise TrainingInputError(f"the weights in {origin} do not fit {backbone}: {err}") from None
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise TrainingInputError(
            f"the weights in {origin} do not fit {backbone}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}; "
            "pass the state dict of the same backbone")


def initial_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The model before training: built under ``--seed`` (the head's initial weights), then the backbone's weights loaded."""
    distributed.seed_everything(args.seed)
    model = common.build_model(args.backbone, num_classes)
    load_backbone_weights(model, pretrained_source(args.pretrained_weights), args.backbone)
    return model


def feature_extractor(model: nn.Module) -> nn.Module:
    """The ResNet up to its pooled, flattened features; shares its modules with ``model``."""
    children = [module for name, module in model.named_children() if name != "fc"]
    return nn.Sequential(*children, nn.Flatten(1))


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
        frozen = None if cached else feature_extractor(model).eval()
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


def state_on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: datasets.ImageFolder, args: argparse.Namespace,
                     dist_info: distributed.DistInfo, device: torch.device, workers: int) -> TensorDataset:
    """Features and labels of every image: each rank computes 1/N of them and all ranks gather the whole set."""
    indices = distributed.shard_indices(len(dataset), dist_info, pad=True)
    loader = DataLoader(Subset(dataset, indices), shuffle=False, **loader_options(args, device, workers))
    chunks = []
    for images, _ in loader:
        with autocast(device):
            chunks.append(backbone(to_device(images, device)).float())
    features = distributed.gathered(torch.cat(chunks), dist_info)
    index_tensor = distributed.gathered(torch.tensor(indices, device=device), dist_info)
    everything = torch.empty((len(dataset), features.shape[1]), dtype=features.dtype, device=device)
    everything[index_tensor] = features
    return TensorDataset(everything.cpu(), torch.tensor(dataset.targets, dtype=torch.long))


def resolved_weights(value: str | None) -> str | None:
    """None (random), 'imagenet', or the path of the one state dict file ``value`` names."""
    source = pretrained_source(value)
    return source if source in (None, "imagenet") else str(weights_file(Path(source)))


def read_feature_set(args: argparse.Namespace) -> features.FeatureSet:
    """The --features folder, refused unless it was made with this job's backbone, image size and weights
    (and, when the job is given image folders too, their classes)."""
    expected: dict[str, Any] = {"backbone": args.backbone, "image_size": args.image_size,
                                "weights": features.weights_id(resolved_weights(args.pretrained_weights), args.backbone, args.seed)}
    if args.train_dir or args.valid_dir:
        expected["classes"] = check_splits(*split_dirs(args))
    try:
        return features.read_features(args.features, expected)
    except features.FeaturesError as err:
        raise TrainingInputError(str(err)) from None


def make_loaders(args: argparse.Namespace, splits: Splits, model: nn.Module, device: torch.device,
                 dist_info: distributed.DistInfo) -> tuple[DataLoader, DataLoader]:
    """The training and validation loaders: of the given features, of the features computed here once
    (--cache-features), or of the images (decoded by --num-workers processes, augmentation seeded per image)."""
    if splits.feature_dim is not None:
        if splits.feature_dim != model.fc.in_features:
            raise TrainingInputError(f"the features in {args.features} have {splits.feature_dim} values each; "
                                     f"{args.backbone}'s head takes {model.fc.in_features}: extract them again")
        train_data, valid_data = splits.train, splits.valid
    elif args.cache_features:
        started = time.perf_counter()
        backbone = feature_extractor(model).eval()
        train_data = extract_features(backbone, splits.train, args, dist_info, device, args.num_workers)
        valid_data = extract_features(backbone, splits.valid, args, dist_info, device, args.num_workers)
        LOG.info("computed backbone features of %d training and %d validation images in %.1f s",
                 len(train_data), len(valid_data), time.perf_counter() - started)
    else:
        return (make_train_loader(splits.train, args, dist_info, device, seeded=True, workers=args.num_workers),
                make_eval_loader(splits.valid, args, dist_info, device, workers=args.num_workers))
    return (make_train_loader(train_data, args, dist_info, device, seeded=False, workers=0),
            make_eval_loader(valid_data, args, dist_info, device, workers=0))


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def to_device(inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    inputs = inputs.to(device, non_blocking=True)
    if device.type == "cuda" and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs


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
        inputs, targets = to_device(inputs, device), targets.to(device, non_blocking=True)
        with autocast(device):
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


@torch.no_grad()
def recompute_batch_norm_statistics(parts: Parts, loader: DataLoader, device: torch.device) -> None:
    """Running statistics of every trained batch norm, recomputed as the plain mean over this epoch's final weights.

    During training they are a moving average (momentum 0.1) of statistics of
    weights that were still changing: after few steps from random weights they
    mislead evaluation (validation losses in the thousands). One forward pass
    over up to ``PRECISE_BN_BATCHES`` global batches fixes that ("precise BN"); under
    several ranks GlobalBatchNorm2d makes the statistics the global batches'.
    Nothing to do when the backbone is frozen.
    """
    if parts.frozen is not None:
        return
    model = parts.trainable_module
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative: the mean over the batches below
    model.train()
    try:
        for inputs, _ in itertools.islice(loader, PRECISE_BN_BATCHES):  # no batch is loaded beyond the last one used
            with autocast(device):
                model(to_device(inputs, device))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum


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
        inputs, targets = to_device(inputs, device), targets.to(device, non_blocking=True)
        with autocast(device):
            if parts.frozen is not None:
                inputs = parts.frozen(inputs)
            logits = model(inputs).float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(dim=1) == targets).sum().item()
        count += len(targets)
    total_loss, total_correct, total_count = distributed.all_reduce_sums([loss_sum, correct, count], device, dist_info)
    return {"val_loss": total_loss / total_count, "val_accuracy": total_correct / total_count}


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


def resumed_progress(checkpoint: dict[str, Any] | None, trainer: Trainer) -> Progress:
    """The progress the checkpoint saved, its optimizer and scaler state loaded into ``trainer``'s; none without one."""
    if checkpoint is None:
        return Progress()
    trainer.optimizer.load_state_dict(checkpoint["optimizer"])
    trainer.scheduler.load_state_dict(checkpoint["scheduler"])
    trainer.scaler.load_state_dict(checkpoint["scaler"])
    progress = Progress(epoch=checkpoint["epoch"], history=checkpoint["history"], best_epoch=checkpoint["best_epoch"],
                        best_metrics=checkpoint["best_metrics"], best_state=checkpoint["best_model"],
                        stale_epochs=checkpoint["stale_epochs"], stopped=checkpoint["stopped"])
    LOG.info("resumed from %s after epoch %d (best epoch %d)", trainer.checkpoint_file, progress.epoch, progress.best_epoch)
    return progress


def checkpoint_of(trainer: Trainer, progress: Progress) -> dict[str, Any]:
    # After an epoch that improved, the best state is this epoch's model: one copy serves as both (saved once).
    improved = progress.best_epoch == progress.epoch and progress.best_state is not None
    return {"format": CHECKPOINT_FORMAT, "config": trainer.config, "epoch": progress.epoch,
            "model": progress.best_state if improved else state_on_cpu(trainer.model), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(), "history": progress.history, "stale_epochs": progress.stale_epochs,
            "stopped": progress.stopped, "best_epoch": progress.best_epoch, "best_metrics": progress.best_metrics,
            "best_model": progress.best_state}


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


def record_epoch(trainer: Trainer, progress: Progress, metrics: dict[str, float], improved: bool) -> None:
    """Advance ``progress`` by one epoch: the best model when the validation loss fell, and early stopping.

    Warm-up epochs never count towards the patience: the learning rate is still rising, so a validation
    loss that stalls then says nothing about the epochs to come."""
    progress.epoch += 1
    if improved:
        progress.best_epoch, progress.best_metrics, progress.stale_epochs = progress.epoch, metrics, 0
        progress.best_state = state_on_cpu(trainer.model) if trainer.dist_info.is_main else None
    elif progress.epoch > trainer.args.warmup_epochs:
        progress.stale_epochs += 1
    progress.stopped = trainer.args.patience > 0 and progress.stale_epochs >= trainer.args.patience
    if progress.stopped:
        LOG.info("stopping early: no lower validation loss for %d epochs; best epoch %d",
                 progress.stale_epochs, progress.best_epoch)


def save_progress(trainer: Trainer, progress: Progress) -> None:
    """Rank 0: the checkpoint (with a checkpoint folder) and the metrics history (with an output data folder)."""
    if not trainer.dist_info.is_main:
        return
    if trainer.checkpoint_file is not None:
        atomic_torch_save(trainer.checkpoint_file, checkpoint_of(trainer, progress))
        LOG.info("saved checkpoint of epoch %d to %s", progress.epoch, trainer.checkpoint_file)
    if trainer.args.output_data_dir:
        common.atomic_write_json(Path(trainer.args.output_data_dir) / METRICS_HISTORY_FILE, progress.history)


def fit(trainer: Trainer, progress: Progress, setup: Elapsed) -> Progress:
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


def training_summary(progress: Progress, dist_info: distributed.DistInfo, setup: Elapsed) -> dict[str, Any]:
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
        "pretrained_weights": pretrained_source(args.pretrained_weights),
        # What the run trained on: "features" (the head only, on --features or the features channel) or "images".
        "trained_on": "features" if args.features else "images",
        "hyperparameters": dict(vars(args)),
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
    atomic_torch_save(model_dir / contract.MODEL_FILE, state)
    common.atomic_write_json(model_dir / contract.CLASSES_FILE, classes)
    common.atomic_write_json(model_dir / contract.MODEL_INFO_FILE, info)
    write_calibration_sample(model_dir / contract.CALIBRATION_DIR, calibration)
    copied = copy_inference_code(model_dir / contract.MODEL_CODE_DIR)
    LOG.info("wrote %s, %s, %s and %s/ (%s) to %s", contract.MODEL_FILE, contract.CLASSES_FILE,
             contract.MODEL_INFO_FILE, contract.MODEL_CODE_DIR, ", ".join(copied), model_dir)


def write_outputs(args: argparse.Namespace, dist_info: distributed.DistInfo, splits: Splits, progress: Progress,
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
    splits = load_splits(args, dist_info)
    model = initial_model(args, len(splits.classes))
    config = run_config(args, splits.classes, dist_info.world_size)
    checkpoint_file = checkpoint_path(Path(args.checkpoint_dir)) if args.checkpoint_dir else None
    checkpoint = shared_checkpoint(checkpoint_file, config, dist_info)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])

    clock = Stopwatch()
    parts = model_parts(model, args.freeze_backbone, args.cache_features or bool(args.features), device, dist_info)
    train_loader, valid_loader = make_loaders(args, splits, model, device, dist_info)
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

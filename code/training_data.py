"""The training data: the image splits or precomputed features, checked, and the loaders over them.

``load_splits`` reads the train and valid splits (ImageFolders, the test split is never
read) or the features folder of ``--features``; ``make_loaders`` gives the training and
validation loaders: over the given features, over the features computed here once
(``--cache-features``), or over the images. Training batches are this rank's share of
each global batch (distributed.py's ``GlobalBatchSampler``); validation is sharded so
that every image counts once. ``extract_features`` (the frozen backbone's features of a
split) also serves ``extract_features.py``.

Runs inside SageMaker's PyTorch containers: torch, torchvision, Pillow and the standard library only.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets

import common
import contract
import distributed
import features
import pretrained
from arguments import TrainingInputError

LOG = logging.getLogger("train")  # the training job's log, which train.py configures


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

def read_feature_set(args: argparse.Namespace) -> features.FeatureSet:
    """The --features folder, refused unless it was made with this job's backbone, image size and weights
    (and, when the job is given image folders too, their classes)."""
    weights_id = features.weights_id(pretrained.resolved_weights(args.weights_source), args.backbone, args.seed)
    expected: dict[str, Any] = {"backbone": args.backbone, "image_size": args.image_size, "weights": weights_id}
    if args.train_dir or args.valid_dir:
        expected["classes"] = check_splits(*split_dirs(args))
    try:
        return features.read_features(args.features, expected)
    except features.FeaturesError as err:
        raise TrainingInputError(str(err)) from None



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


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: datasets.ImageFolder, args: argparse.Namespace,
                     dist_info: distributed.DistInfo, device: torch.device, workers: int) -> TensorDataset:
    """Features and labels of every image: each rank computes 1/N of them and all ranks gather the whole set."""
    indices = distributed.shard_indices(len(dataset), dist_info, pad=True)
    loader = DataLoader(Subset(dataset, indices), shuffle=False, **loader_options(args, device, workers))
    chunks = []
    for images, _ in loader:
        with distributed.autocast(device):
            chunks.append(backbone(distributed.to_device(images, device)).float())
    features = distributed.gathered(torch.cat(chunks), dist_info)
    index_tensor = distributed.gathered(torch.tensor(indices, device=device), dist_info)
    everything = torch.empty((len(dataset), features.shape[1]), dtype=features.dtype, device=device)
    everything[index_tensor] = features
    return TensorDataset(everything.cpu(), torch.tensor(dataset.targets, dtype=torch.long))


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
        backbone = pretrained.feature_extractor(model).eval()
        train_data = extract_features(backbone, splits.train, args, dist_info, device, args.num_workers)
        valid_data = extract_features(backbone, splits.valid, args, dist_info, device, args.num_workers)
        LOG.info("computed backbone features of %d training and %d validation images in %.1f s",
                 len(train_data), len(valid_data), time.perf_counter() - started)
    else:
        return (make_train_loader(splits.train, args, dist_info, device, seeded=True, workers=args.num_workers),
                make_eval_loader(splits.valid, args, dist_info, device, workers=args.num_workers))
    return (make_train_loader(train_data, args, dist_info, device, seeded=False, workers=0),
            make_eval_loader(valid_data, args, dist_info, device, workers=0))

"""The frozen backbone's features of the train and valid splits, on disk: format, writing, reading, checks.

Written once per pipeline execution by ``extract_features.py`` (the ExtractFeatures
step) and read by every tuning trial (``train.py --features DIR``), which then
trains only the head. A features folder holds::

    features.json   the header: format and version, backbone, image size, weights id,
                    classes in index order, feature size, the images' content hash,
                    and per split its file, image count and the file's sha256
    train.pt        {"features": float32 [images, feature size], "labels": int64 [images]}
    valid.pt

The features depend on the backbone, its weights (for random weights, the seed)
and the input size; a trial whose hyperparameters differ in any of them would
train a head for a backbone it is not attached to, so ``check_header`` refuses
it and names the field. The split files are checked against the header's
hashes, so files of two extractions are never mixed.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch.utils.data import TensorDataset
from torchvision import models

from common import atomic_write, atomic_write_json
from contract import FEATURES_HEADER_FILE, FEATURES_SPLIT_FILES, TRAIN_CHANNEL, VALID_CHANNEL

FORMAT = "dogbreed-features"
VERSION = 1
# Fields of the header that a trial's hyperparameters must match.
CHECKED_FIELDS = ("backbone", "image_size", "weights")


class FeaturesError(ValueError):
    """A features folder that is missing, damaged, or made for other settings; the message says which field."""


@dataclass(frozen=True)
class FeatureSet:
    header: dict[str, Any]
    train: TensorDataset
    valid: TensorDataset

    @property
    def classes(self) -> list[str]:
        return list(self.header["classes"])

    @property
    def feature_dim(self) -> int:
        return int(self.header["feature_dim"])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def images_sha256(files: Iterable[tuple[str, Path]]) -> str:
    """sha256 over the sorted lines ``<split>/<class>/<file>\\t<sha256 of the file>``, as preprocess.py hashes its output."""
    lines = sorted(f"{split}/{path.parent.name}/{path.name}\t{file_sha256(path)}\n" for split, path in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def weights_id(source: str | os.PathLike | None, backbone: str, seed: int) -> str:
    """What the backbone's weights were: torchvision's ImageNet file name (it carries a hash),
    the sha256 of a state dict file, or, for random weights, the seed they were drawn with."""
    if source is None:
        return f"random:seed={seed}"
    if str(source) == "imagenet":
        return "imagenet:" + models.get_model_weights(backbone).DEFAULT.url.rsplit("/", 1)[-1]
    return "sha256:" + file_sha256(Path(source))


def write_features(folder: Path, splits: Mapping[str, TensorDataset], settings: Mapping[str, Any]) -> dict[str, Any]:
    """Write one file per split, then the header last, so a folder with a header is complete. Returns the header."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / FEATURES_HEADER_FILE).exists():
        raise FeaturesError(f"{folder / FEATURES_HEADER_FILE} already exists: write the features into an empty folder")
    split_entries, feature_dim = {}, None
    for split, name in FEATURES_SPLIT_FILES.items():
        features, labels = splits[split].tensors
        feature_dim = int(features.shape[1])
        path = folder / name
        atomic_write(path, lambda p: torch.save({"features": features.float().contiguous(),
                                                  "labels": labels.long().contiguous()}, p))
        split_entries[split] = {"file": name, "images": int(features.shape[0]), "sha256": file_sha256(path)}
    header = {"format": FORMAT, "version": VERSION, **settings, "feature_dim": feature_dim, "splits": split_entries,
              "torch_version": torch.__version__}
    atomic_write_json(folder / FEATURES_HEADER_FILE, header)
    return header


def read_header(folder: Path) -> dict[str, Any]:
    path = folder / FEATURES_HEADER_FILE
    if not path.is_file():
        what = "does not exist" if not folder.exists() else f"holds no {FEATURES_HEADER_FILE}"
        raise FeaturesError(f"the features folder {folder} {what}: pass the output of extract_features.py "
                            "(the ExtractFeatures step's 'features' output) as --features")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FeaturesError(f"{path} is not JSON ({err}); extract the features again") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise FeaturesError(f"{path} is not a features header (format {header.get('format') if isinstance(header, dict) else None!r}, expected {FORMAT!r})")
    if header.get("version") != VERSION:
        raise FeaturesError(f"{path} has format version {header.get('version')!r}; this script reads version {VERSION}: "
                            "extract the features again with this code")
    missing = [key for key in (*CHECKED_FIELDS, "classes", "feature_dim", "splits") if key not in header]
    if missing:
        raise FeaturesError(f"{path} lacks {', '.join(missing)}; extract the features again")
    return header


def check_header(header: Mapping[str, Any], expected: Mapping[str, Any], folder: Path) -> None:
    """Refuse features made for other settings, naming the first field that differs and both values."""
    for field, value in expected.items():
        if header.get(field) != value:
            found = header.get(field)
            if field == "classes":
                only_here = sorted(set(found or []) - set(value))[:3]
                only_job = sorted(set(value) - set(found or []))[:3]
                detail = (f"{len(found or [])} classes in the features, {len(value)} in this job's image folders"
                          f" (only in the features: {', '.join(only_here) or '-'}; only in the job: {', '.join(only_job) or '-'})")
            else:
                detail = f"the features have {field} {found!r}, this job has {field} {value!r}"
            raise FeaturesError(
                f"the features in {folder} do not fit this job: field '{field}' differs: {detail}. Extract the features "
                f"again with this job's {field}, or train with the settings the features were made with")


def _read_split(folder: Path, split: str, entry: Mapping[str, Any], header: Mapping[str, Any]) -> TensorDataset:
    path = folder / str(entry.get("file", ""))
    if not path.is_file():
        raise FeaturesError(f"the {split} features file {path} is missing; extract the features again")
    if file_sha256(path) != entry.get("sha256"):
        raise FeaturesError(f"{path} is not the file the header {folder / FEATURES_HEADER_FILE} describes (sha256 differs): "
                            "the folder mixes files of two extractions; extract the features again into an empty folder")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
        features, labels = content["features"], content["labels"]
    except Exception as err:
        raise FeaturesError(f"cannot read {path} as features ({err}); extract the features again") from None
    count, classes = int(entry.get("images", -1)), len(header["classes"])
    if features.dim() != 2 or tuple(features.shape) != (count, header["feature_dim"]) or labels.shape != (count,):
        raise FeaturesError(f"{path} holds features of shape {tuple(features.shape)} and labels {tuple(labels.shape)}; "
                            f"the header says {count} images of {header['feature_dim']} features")
    if count and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise FeaturesError(f"{path} has labels outside the header's {classes} classes")
    return TensorDataset(features.float(), labels.long())


def read_features(folder: str | os.PathLike, expected: Mapping[str, Any]) -> FeatureSet:
    """The features of both splits, after checking the header against ``expected`` and the files against the header."""
    folder = Path(folder)
    header = read_header(folder)
    check_header(header, expected, folder)
    splits = header["splits"]
    missing = [split for split in FEATURES_SPLIT_FILES if split not in splits]
    if missing:
        raise FeaturesError(f"{folder / FEATURES_HEADER_FILE} has no {', '.join(missing)} split; extract the features again")
    datasets = {split: _read_split(folder, split, splits[split], header) for split in FEATURES_SPLIT_FILES}
    train, valid = datasets[TRAIN_CHANNEL], datasets[VALID_CHANNEL]
    if len(train) == 0 or len(valid) == 0:
        raise FeaturesError(f"the features in {folder} hold {len(train)} training and "
                            f"{len(valid)} validation images; both splits need at least one")
    return FeatureSet(header, train, valid)

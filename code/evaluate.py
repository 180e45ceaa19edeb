"""Evaluate a trained model on the test split: evaluation.json and confusion_matrix.png.

    python3 evaluate.py --model /opt/ml/processing/input/model --test /opt/ml/processing/input/test \
        --output /opt/ml/processing/output/evaluation

``--model`` is the training job's artifact: a folder holding ``model.tar.gz`` (or the
archive itself), or a folder with ``model.pth``, ``classes.json`` and ``model_info.json``.
``--test`` holds one folder per class; its class set must equal the model's classes.json.

``evaluation.json`` uses SageMaker's model-quality format for multiclass classification,
which the model registry shows as the model package's metrics; the pipeline's
ConditionStep reads ``contract.ACCURACY_JSON_PATH`` from it::

    {"multiclass_classification_metrics": {
        "accuracy": {"value": 0.83, "standard_deviation": "NaN"},
        "weighted_precision": {...}, "weighted_recall": {...}, "weighted_f1": {...},
        "confusion_matrix": {"<true class>": {"<predicted class>": count, ...}, ...}},
     "dataset": {"item_count": 836, "class_count": 133},
     "additional_metrics": {"top_5_accuracy": {"value": 0.97, "standard_deviation": "NaN"},
                            "per_class_accuracy": {"<class>": 0.9, ...}}}

Weighted metrics are per-class values averaged with the class's share of the test images
(scikit-learn's ``average="weighted"``; a class never predicted has precision 0).
Both files are written under temporary names and renamed, the JSON last.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import datasets

from common import DEFAULT_IMAGE_SIZE, eval_transform, load_model_dir, run_script
from contract import CLASSES_FILE, CONFUSION_MATRIX_FILE, EVALUATION_FILE, MODEL_FILE, MODEL_INFO_FILE

DEFAULT_MODEL = "/opt/ml/processing/input/model"
DEFAULT_TEST = "/opt/ml/processing/input/test"
DEFAULT_OUTPUT = "/opt/ml/processing/output/evaluation"
# A processing job's exit message (DescribeProcessingJob ExitMessage, shown when it fails).
FAILURE_MESSAGE_FILE = "/opt/ml/output/message"
MODEL_ARCHIVE = "model.tar.gz"
TOP_K = 5
NOT_COMPUTED = "NaN"  # the format's standard_deviation when there is no bootstrap


class EvaluationError(Exception):
    """The model or the test split cannot be evaluated; the message says what to fix."""


# ---------------------------------------------------------------- the model

def model_dir_from(model_path: Path, scratch: Path) -> Path:
    """A folder with the model files: ``model_path`` itself, or ``scratch`` filled from model.tar.gz."""
    if (model_path / MODEL_FILE).is_file():
        return model_path
    archive = model_path / MODEL_ARCHIVE if model_path.is_dir() else model_path
    if not archive.is_file():
        raise EvaluationError(
            f"{model_path} holds neither {MODEL_ARCHIVE} nor {MODEL_FILE}: give the training job's model "
            "artifact (model.tar.gz, or the folder it unpacks to)"
        )
    extract_model_files(archive, scratch)
    return scratch


def extract_model_files(archive: Path, destination: Path) -> None:
    """Copy the three model files out of the archive by name, in one pass; nothing else is written."""
    needed = (MODEL_FILE, CLASSES_FILE, MODEL_INFO_FILE)
    seen: list[str] = []
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                name = os.path.normpath(member.name)
                seen.append(name)
                if member.isfile() and name in needed and not (destination / name).exists():
                    with tar.extractfile(member) as source, open(destination / name, "wb") as target:
                        shutil.copyfileobj(source, target)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise EvaluationError(f"{archive} is not a readable tar.gz archive: {error}") from None
    missing = [name for name in needed if not (destination / name).is_file()]
    if missing:
        raise EvaluationError(
            f"{archive} lacks {', '.join(missing)} at its top level (it holds {', '.join(sorted(seen)[:10]) or 'nothing'}): "
            "is it the output of train.py?"
        )


# ---------------------------------------------------------------- the test split

def test_classes(test_dir: Path) -> list[str]:
    if not test_dir.is_dir():
        raise EvaluationError(f"test folder {test_dir} does not exist or is not a folder")
    return sorted(p.name for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_classes(test_dir: Path, model_classes: list[str]) -> None:
    found = test_classes(test_dir)
    missing, extra = sorted(set(model_classes) - set(found)), sorted(set(found) - set(model_classes))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no test folder for {len(missing)} of the model's classes ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
        if extra:
            parts.append(f"{len(extra)} test folder(s) the model does not know ({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''})")
        raise EvaluationError(
            f"the classes in {test_dir} differ from the model's {CLASSES_FILE}: {'; '.join(parts)}. "
            "Evaluate on the test split prepared with the model's training data"
        )


def test_loader(test_dir: Path, image_size: int, batch_size: int, workers: int) -> DataLoader:
    try:
        dataset = datasets.ImageFolder(str(test_dir), transform=eval_transform(image_size))
    except (FileNotFoundError, RuntimeError) as error:
        raise EvaluationError(f"cannot read the test split {test_dir}: {error}") from None
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def predictions(model: torch.nn.Module, loader: DataLoader, model_classes: list[str], device: torch.device, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true class, predicted class, whether the true class is in the top k) per test image, as model indices."""
    folder_to_model = torch.tensor([model_classes.index(name) for name in loader.dataset.classes])
    true, predicted, in_top_k = [], [], []
    with torch.inference_mode():
        for images, folder_labels in loader:
            labels = folder_to_model[folder_labels]
            best = model(images.to(device)).topk(k, dim=1).indices.cpu()
            true.append(labels)
            predicted.append(best[:, 0])
            in_top_k.append((best == labels[:, None]).any(dim=1))
    return torch.cat(true).numpy(), torch.cat(predicted).numpy(), torch.cat(in_top_k).numpy()


# ---------------------------------------------------------------- metrics

def confusion(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[t, p]: test images of class t predicted as p."""
    return np.bincount(true * num_classes + predicted, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def metric(value: float) -> dict[str, Any]:
    return {"value": float(value), "standard_deviation": NOT_COMPUTED}


def evaluation_document(true: np.ndarray, predicted: np.ndarray, in_top_k: np.ndarray, classes: list[str]) -> dict[str, Any]:
    counts = confusion(true, predicted, len(classes))
    support, predicted_count, hits = counts.sum(axis=1), counts.sum(axis=0), np.diag(counts)
    precision, recall = ratio(hits, predicted_count), ratio(hits, support)
    f1 = ratio(2 * precision * recall, precision + recall)
    share = support / support.sum()
    return {
        "multiclass_classification_metrics": {
            "accuracy": metric(hits.sum() / support.sum()),
            "weighted_precision": metric((share * precision).sum()),
            "weighted_recall": metric((share * recall).sum()),
            "weighted_f1": metric((share * f1).sum()),
            "confusion_matrix": {
                true_name: {predicted_name: int(counts[t, p]) for p, predicted_name in enumerate(classes)}
                for t, true_name in enumerate(classes)
            },
        },
        "dataset": {"item_count": int(support.sum()), "class_count": len(classes)},
        "additional_metrics": {
            f"top_{TOP_K}_accuracy": metric(in_top_k.mean()),
            "per_class_accuracy": {name: float(recall[i]) for i, name in enumerate(classes)},
        },
    }


# ---------------------------------------------------------------- output

def plot_confusion_matrix(counts: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    """Row-normalised matrix with every class named; sized so 133 classes stay legible when zoomed in."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.colors import PowerNorm

    n = len(classes)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = max(6.0, 0.15 * n + 3)
    font = max(3.5, min(10.0, 500 / n))
    figure, axes = pyplot.subplots(figsize=(side, side), dpi=150)
    # The square-root scale makes a single confusion among a class's few test images stand out.
    image = axes.imshow(rows, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    axes.set_xticks(range(n), classes, rotation=90, fontsize=font)
    axes.set_yticks(range(n), classes, fontsize=font)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.03, pad=0.01, label="share of the true class's test images")
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.partial")
    figure.savefig(temporary, format="png")
    pyplot.close(figure)
    os.replace(temporary, path)


def write_json_atomically(path: Path, document: dict) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


# ---------------------------------------------------------------- the run

def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as ``args`` say; write both files and return the evaluation document."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = Path(args.output)
    with tempfile.TemporaryDirectory(prefix="model-") as scratch:
        model_dir = model_dir_from(Path(args.model), Path(scratch))
        try:
            model, classes, info = load_model_dir(model_dir, device)
        except (FileNotFoundError, KeyError, ValueError, RuntimeError) as error:
            raise EvaluationError(f"cannot load the model from {args.model}: {error}") from None
    check_classes(Path(args.test), classes)
    loader = test_loader(Path(args.test), int(info.get("image_size", DEFAULT_IMAGE_SIZE)), args.batch_size, args.num_workers)
    true, predicted, in_top_k = predictions(model, loader, classes, device, min(TOP_K, len(classes)))
    document = evaluation_document(true, predicted, in_top_k, classes)

    accuracy = document["multiclass_classification_metrics"]["accuracy"]["value"]
    top_k = document["additional_metrics"][f"top_{TOP_K}_accuracy"]["value"]
    output_dir.mkdir(parents=True, exist_ok=True)
    title = f"Test confusion matrix: accuracy {accuracy:.1%}, top-{TOP_K} {top_k:.1%}, {len(true)} images"
    plot_confusion_matrix(confusion(true, predicted, len(classes)), classes, title, output_dir / CONFUSION_MATRIX_FILE)
    write_json_atomically(output_dir / EVALUATION_FILE, document)
    print(f"test accuracy={accuracy:.6f} top_{TOP_K}_accuracy={top_k:.6f} images={len(true)} "
          f"classes={len(classes)}; wrote {EVALUATION_FILE} and {CONFUSION_MATRIX_FILE} to {output_dir}", flush=True)
    return document


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"folder with {MODEL_ARCHIVE} or the unpacked model files")
    parser.add_argument("--test", default=DEFAULT_TEST, help="test split: one folder per class")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"where {EVALUATION_FILE} and {CONFUSION_MATRIX_FILE} are written")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_script("evaluate.py", FAILURE_MESSAGE_FILE, lambda: argument_parser().parse_args(argv), evaluate, (EvaluationError,))


if __name__ == "__main__":
    sys.exit(main())

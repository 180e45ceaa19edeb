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
                            "per_class_accuracy": {"<class>": 0.9, ...},
                            "fp32_accuracy": {...}, "int8_accuracy": {...}},
     "inference_precision": {"requested": "int8", "served": "int8", "reason": "...",
                             "fp32": {"accuracy": 0.83, "top_5_accuracy": 0.97},
                             "int8": {"accuracy": 0.826, "top_5_accuracy": 0.97}}}

Both precisions are measured (int8: serving_model.py's static quantization, calibrated on
the images in the model's ``calibration/``); the metrics above are those of the precision
that will be served, so the accuracy gate gates what the endpoint runs. int8 is served
only when ``--inference-precision int8`` asks for it and its top-1 accuracy is at most one
point below fp32's; otherwise fp32, and ``reason`` says why. The endpoint reads
``inference_precision.served`` (``contract.SERVED_PRECISION_JSON_PATH``) through the model
package's environment. An int8 model that cannot be built is recorded as
``"int8": {"error": "..."}``.

Weighted metrics are per-class values averaged with the class's share of the test images
(scikit-learn's ``average="weighted"``; a class never predicted has precision 0).
Both files are written under temporary names and renamed, the JSON last.
"""
from __future__ import annotations

import argparse
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

from common import DEFAULT_IMAGE_SIZE, atomic_write, atomic_write_json, eval_transform, load_model_dir, run_script
from contract import (CALIBRATION_DIR, CLASSES_FILE, CONFUSION_MATRIX_FILE, DEFAULT_PRECISION, EVALUATION_FILE, MODEL_FILE,
                      MODEL_INFO_FILE, NO_WEIGHTS_PLACEHOLDER, PRECISIONS, PROCESSING_FAILURE_FILE, TEST_CHANNEL)
from features import file_sha256
from serving_model import QuantizationFailed, calibration_batch, precision_decision, quantized_int8

DEFAULT_MODEL = "/opt/ml/processing/input/model"
DEFAULT_TEST = f"/opt/ml/processing/input/{TEST_CHANNEL}"
DEFAULT_OUTPUT = "/opt/ml/processing/output/evaluation"
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


def is_calibration_image(name: str) -> bool:
    """``calibration/<file>`` of the model directory (one level, no other path)."""
    folder, _, file = name.partition("/")
    return folder == CALIBRATION_DIR and bool(file) and "/" not in file and not file.startswith(".")


def extract_model_files(archive: Path, destination: Path) -> None:
    """Copy the three model files and the calibration images out of the archive by name, in one pass; nothing else is written."""
    needed = (MODEL_FILE, CLASSES_FILE, MODEL_INFO_FILE)
    seen: list[str] = []
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                name = os.path.normpath(member.name)
                seen.append(name)
                wanted = name in needed or is_calibration_image(name)
                if member.isfile() and wanted and not (destination / name).exists():
                    (destination / name).parent.mkdir(exist_ok=True)
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
    try:
        atomic_write(path, lambda temporary: figure.savefig(temporary, format="png"))
    finally:
        pyplot.close(figure)


# ---------------------------------------------------------------- the run

Outcome = tuple[np.ndarray, np.ndarray, np.ndarray]  # what predictions() returns


def int8_outcome(model: torch.nn.Module, calibration: torch.Tensor | None, loader: DataLoader,
                 classes: list[str], k: int) -> tuple[Outcome | None, str]:
    """The int8 model's predictions on the test split (on the CPU, as it is served), or None and why not."""
    try:
        quantized = quantized_int8(model, calibration)
    except QuantizationFailed as error:
        return None, str(error)
    return predictions(quantized, loader, classes, torch.device("cpu"), k), ""


def precision_record(requested: str, served: str, reason: str, fp32: Outcome, int8: Outcome | None, int8_problem: str) -> dict[str, Any]:
    """evaluation.json's ``inference_precision``: both precisions' test accuracy and which one is served, and why."""
    def measured(outcome: Outcome) -> dict[str, float]:
        true, predicted, in_top_k = outcome
        return {"accuracy": float((true == predicted).mean()), f"top_{TOP_K}_accuracy": float(in_top_k.mean())}

    return {
        "requested": requested, "served": served, "reason": reason,
        "fp32": measured(fp32),
        "int8": measured(int8) if int8 is not None else {"error": int8_problem},
    }


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as ``args`` say; write both files and return the evaluation document.

    Both precisions are measured; the model metrics (and so the accuracy gate) are those
    of the precision that will be served (serving_model.precision_decision).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = Path(args.output)
    with tempfile.TemporaryDirectory(prefix="model-") as scratch:
        model_dir = model_dir_from(Path(args.model), Path(scratch))
        try:
            model, classes, info = load_model_dir(model_dir, device)
        except (FileNotFoundError, KeyError, ValueError, RuntimeError) as error:
            raise EvaluationError(f"cannot load the model from {args.model}: {error}") from None
        image_size = int(info.get("image_size", DEFAULT_IMAGE_SIZE))
        calibration = calibration_batch(model_dir, eval_transform(image_size))
    check_classes(Path(args.test), classes)
    loader = test_loader(Path(args.test), image_size, args.batch_size, args.num_workers)
    k = min(TOP_K, len(classes))
    fp32 = predictions(model, loader, classes, device, k)
    int8, int8_problem = int8_outcome(model, calibration, loader, classes, k)
    fp32_accuracy = float((fp32[0] == fp32[1]).mean())
    int8_accuracy = float((int8[0] == int8[1]).mean()) if int8 is not None else None
    served, reason = precision_decision(args.inference_precision, fp32_accuracy, int8_accuracy, int8_problem)
    true, predicted, in_top_k = int8 if served == "int8" else fp32
    document = evaluation_document(true, predicted, in_top_k, classes)
    document["additional_metrics"]["fp32_accuracy"] = metric(fp32_accuracy)
    if int8_accuracy is not None:
        document["additional_metrics"]["int8_accuracy"] = metric(int8_accuracy)
    document["pretrained_weights"] = pretrained_record(args.pretrained, info)
    document["inference_precision"] = precision_record(args.inference_precision, served, reason, fp32, int8, int8_problem)

    accuracy = document["multiclass_classification_metrics"]["accuracy"]["value"]
    top_k = document["additional_metrics"][f"top_{TOP_K}_accuracy"]["value"]
    output_dir.mkdir(parents=True, exist_ok=True)
    title = f"Test confusion matrix ({served}): accuracy {accuracy:.1%}, top-{TOP_K} {top_k:.1%}, {len(true)} images"
    plot_confusion_matrix(confusion(true, predicted, len(classes)), classes, title, output_dir / CONFUSION_MATRIX_FILE)
    atomic_write_json(output_dir / EVALUATION_FILE, document)
    int8_text = f"{int8_accuracy:.6f}" if int8_accuracy is not None else f"unavailable ({int8_problem})"
    print(f"test accuracy={accuracy:.6f} top_{TOP_K}_accuracy={top_k:.6f} images={len(true)} "
          f"classes={len(classes)}; fp32 accuracy={fp32_accuracy:.6f}, int8 accuracy={int8_text}; "
          f"serving {served}: {reason}; wrote {EVALUATION_FILE} and {CONFUSION_MATRIX_FILE} to {output_dir}", flush=True)
    return document


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"folder with {MODEL_ARCHIVE} or the unpacked model files")
    parser.add_argument("--test", default=DEFAULT_TEST, help="test split: one folder per class")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"where {EVALUATION_FILE} and {CONFUSION_MATRIX_FILE} are written")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes")
    parser.add_argument("--inference-precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                        help="the precision asked for; int8 is served only if its top-1 is within 1 point of fp32's")
    parser.add_argument("--pretrained", default=None,
                        help="the pipeline's pretrained weights input (PretrainedWeightsS3Uri); its state dict's "
                             "sha256 is recorded beside the metrics. Nothing is downloaded")
    return parser


def pretrained_record(folder: str | None, info: dict[str, Any]) -> dict[str, Any]:
    """Which backbone weights the evaluated model was transfer-learned from: the input's file and hash, and
    the source train.py recorded. The input holding only the definition's placeholder means none."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file()) if folder and Path(folder).is_dir() else []
    weights = [p for p in files if p.name != NO_WEIGHTS_PLACEHOLDER]
    record: dict[str, Any] = {"file": None, "sha256": None, "trained_from": info.get("pretrained_weights")}
    if len(weights) == 1:
        record.update(file=weights[0].name, sha256=file_sha256(weights[0]))
    return record


def main(argv: Sequence[str] | None = None) -> int:
    return run_script("evaluate.py", PROCESSING_FAILURE_FILE, lambda: argument_parser().parse_args(argv), evaluate, (EvaluationError,))


if __name__ == "__main__":
    sys.exit(main())

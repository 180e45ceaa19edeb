"""Build the serving artifact, evaluate exactly it on the test split, and write the model archive to register.

    python3 evaluate.py --model /opt/ml/processing/input/model --test /opt/ml/processing/input/test \
        --output /opt/ml/processing/output/evaluation --archive-output /opt/ml/processing/output/model

It runs on the inference image, so the serving network is built once on the torch that
serves it: fp32 traced and frozen, and int8 calibrated and converted (serving_model.py), each
saved with ``torch.jit.save``, loaded back from the file and measured as loaded. The one that
will be served goes into ``--archive-output``/``model.tar.gz``, the archive the pipeline
registers and deploys: the training job's files (``model.pth``, ``classes.json``,
``calibration/``, ``code/``), the serving artifact (``contract.SERVING_MODEL_FILE``) and
``model_info.json`` with the artifact's record (precision, torch version, device, sha256) under
``contract.SERVING_INFO_KEY``. An fp32 network that cannot be traced is measured eager and the
archive has no artifact (the endpoint then builds at start-up). ``test_predictions.json`` maps
each test image (``<class>/<file>``) to the served artifact's top-1 class.

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
(scikit-learn's ``average="weighted"``; a class never predicted has precision 0). The
confusion matrix is drawn with Pillow, which every PyTorch image has (torchvision needs it),
not matplotlib, which the inference image need not have.
Every file is written under a temporary name and renamed: the archive first, evaluation.json last.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader
from torchvision import datasets

from common import DEFAULT_IMAGE_SIZE, atomic_write, atomic_write_json, eval_transform, load_model_dir, run_script
from contract import (CALIBRATION_DIR, CLASSES_FILE, CONFUSION_MATRIX_FILE, DEFAULT_PRECISION, EVALUATION_FILE, MODEL_ARCHIVE,
                      MODEL_CODE_DIR, MODEL_FILE, MODEL_INFO_FILE, NO_WEIGHTS_PLACEHOLDER, PRECISIONS, PROCESSING_FAILURE_FILE,
                      SERVING_INFO_KEY, SERVING_MODEL_FILE, TEST_CHANNEL, TEST_PREDICTIONS_FILE)
from features import file_sha256
from serving_model import (QuantizationFailed, ServedNetwork, calibration_batch, loaded_artifact, precision_decision,
                           quantized_int8, saved_artifact, served_network)

DEFAULT_MODEL = "/opt/ml/processing/input/model"
DEFAULT_TEST = f"/opt/ml/processing/input/{TEST_CHANNEL}"
DEFAULT_OUTPUT = "/opt/ml/processing/output/evaluation"
DEFAULT_ARCHIVE_OUTPUT = "/opt/ml/processing/output/model"
CPU = torch.device("cpu")  # the serving artifact is built and measured on the CPU, where it is served
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
    scratch.mkdir(parents=True, exist_ok=True)
    extract_model_files(archive, scratch)
    return scratch


def is_packed_folder_file(name: str) -> bool:
    """``calibration/<file>`` or ``code/<file>`` of the model directory (one level, no other path)."""
    folder, _, file = name.partition("/")
    return folder in (CALIBRATION_DIR, MODEL_CODE_DIR) and bool(file) and "/" not in file and not file.startswith(".")


def extract_model_files(archive: Path, destination: Path) -> None:
    """Copy the three model files, the calibration images and the inference code out of the archive by name,
    in one pass; nothing else is written."""
    needed = (MODEL_FILE, CLASSES_FILE, MODEL_INFO_FILE)
    seen: list[str] = []
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                name = os.path.normpath(member.name)
                seen.append(name)
                wanted = name in needed or is_packed_folder_file(name)
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


def predictions(model: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, model_classes: list[str], device: torch.device,
                k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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

BLUES = ((247, 251, 255), (8, 48, 107))  # the colour of a share of 0 and of 1


def label_font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has one bitmap size
        return ImageFont.load_default()


def share_colour(share: float) -> tuple[int, int, int]:
    """Blue for a row share; the square-root scale makes a single confusion among a class's few test images stand out."""
    weight = share ** 0.5
    return tuple(round(low + (high - low) * weight) for low, high in zip(*BLUES))


def right_aligned(draw: ImageDraw.ImageDraw, right: int, middle: int, text: str, font: ImageFont.ImageFont) -> None:
    """``text`` ending at x ``right``, centred on y ``middle`` (without anchors, which bitmap fonts lack)."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    draw.text((right - x1, middle - (y0 + y1) // 2), text, fill="black", font=font)


def confusion_image(counts: np.ndarray, classes: list[str], title: str) -> Image.Image:
    """Row-normalised matrix with every class named (predicted classes along the bottom, turned upright);
    cells of at least 12 pixels, so 133 classes stay legible when zoomed in."""
    n = len(classes)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    cell = max(12, 900 // n)
    font, title_font = label_font(max(9, min(cell - 2, 18))), label_font(18)
    widest = max(int(font.getlength(name)) for name in classes) + 8
    top, left = 40, widest + 30
    side = n * cell
    picture = Image.new("RGB", (left + side + 20, top + side + widest + 30), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((10, 10), title, fill="black", font=title_font)
    for t in range(n):
        right_aligned(draw, left - 6, top + t * cell + cell // 2, classes[t], font)
        for p in range(n):
            x, y = left + p * cell, top + t * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=share_colour(float(rows[t, p])))
    names = Image.new("RGB", (widest, side), "white")
    names_draw = ImageDraw.Draw(names)
    for p in range(n):
        right_aligned(names_draw, widest - 4, p * cell + cell // 2, classes[p], font)
    picture.paste(names.rotate(90, expand=True), (left, top + side + 4))
    draw.text((6, top + side + widest + 8), "rows: true class; columns: predicted class; colour: share of the true "
              "class's test images", fill="black", font=label_font(12))
    return picture


def plot_confusion_matrix(counts: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    picture = confusion_image(counts, classes, title)
    atomic_write(path, lambda temporary: picture.save(temporary, format="PNG"))


def model_archive(model_dir: Path, info: dict[str, Any], artifact: Path | None, path: Path) -> None:
    """The model archive the pipeline registers: the model files, model_info.json with the artifact's record, the artifact."""
    def pack(temporary: Path) -> None:
        with tarfile.open(temporary, "w:gz", compresslevel=1) as tar:  # weights hardly compress
            for name in (MODEL_FILE, CLASSES_FILE, CALIBRATION_DIR, MODEL_CODE_DIR):
                if (model_dir / name).exists():
                    tar.add(model_dir / name, arcname=name)
            data = (json.dumps(info, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
            member = tarfile.TarInfo(MODEL_INFO_FILE)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
            if artifact is not None:
                tar.add(artifact, arcname=SERVING_MODEL_FILE)

    atomic_write(path, pack)


# ---------------------------------------------------------------- the run

Outcome = tuple[np.ndarray, np.ndarray, np.ndarray]  # what predictions() returns


def stored_and_loaded(served: ServedNetwork, folder: Path) -> tuple[ServedNetwork, dict[str, Any] | None]:
    """``served`` saved as a serving artifact in ``folder`` and loaded back from the file, with its record;
    ``served`` itself and None when it is not TorchScript (an fp32 network that could not be traced)."""
    if served.runtime != "torchscript":
        return served, None
    folder.mkdir(parents=True, exist_ok=True)
    record = saved_artifact(served, folder)
    return loaded_artifact(folder, record), record


def int8_network(model: torch.nn.Module, calibration: torch.Tensor | None, folder: Path) -> tuple[tuple[ServedNetwork, dict] | None, str]:
    """The stored int8 artifact as loaded back and its record, or None and why it cannot be built."""
    try:
        served = ServedNetwork(quantized_int8(model, calibration), "int8", "torchscript")
    except QuantizationFailed as error:
        return None, str(error)
    return stored_and_loaded(served, folder), ""


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


def test_image_names(loader: DataLoader) -> list[str]:
    """``<class folder>/<file>`` of each test image, in the loader's order."""
    return [f"{Path(path).parent.name}/{Path(path).name}" for path, _ in loader.dataset.samples]


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as ``args`` say; write the archive, the three evaluation files, and return the evaluation document.

    Both precisions are built, stored, loaded back and measured; the model metrics (and so the accuracy
    gate) are those of the precision that will be served (serving_model.precision_decision).
    """
    output_dir, archive_dir = Path(args.output), Path(args.archive_output)
    with tempfile.TemporaryDirectory(prefix="model-") as scratch:
        model_dir = model_dir_from(Path(args.model), Path(scratch) / "model")
        try:
            model, classes, info = load_model_dir(model_dir, CPU)
        except (FileNotFoundError, KeyError, ValueError, RuntimeError) as error:
            raise EvaluationError(f"cannot load the model from {args.model}: {error}") from None
        image_size = int(info.get("image_size", DEFAULT_IMAGE_SIZE))
        calibration = calibration_batch(model_dir, eval_transform(image_size))
        check_classes(Path(args.test), classes)
        loader = test_loader(Path(args.test), image_size, args.batch_size, args.num_workers)
        k = min(TOP_K, len(classes))
        fp32_network, fp32_record = stored_and_loaded(
            served_network(model, CPU, "fp32", calibration, image_size, optimize=False), Path(scratch) / "fp32")
        built_int8, int8_problem = int8_network(model, calibration, Path(scratch) / "int8")
        fp32 = predictions(fp32_network, loader, classes, CPU, k)
        int8 = predictions(built_int8[0], loader, classes, CPU, k) if built_int8 is not None else None
        fp32_accuracy = float((fp32[0] == fp32[1]).mean())
        int8_accuracy = float((int8[0] == int8[1]).mean()) if int8 is not None else None
        served, reason = precision_decision(args.inference_precision, fp32_accuracy, int8_accuracy, int8_problem)
        record = built_int8[1] if served == "int8" else fp32_record
        info = {key: value for key, value in info.items() if key != SERVING_INFO_KEY}
        if record is not None:
            info[SERVING_INFO_KEY] = record
        artifact = Path(scratch) / served / SERVING_MODEL_FILE if record is not None else None
        model_archive(model_dir, info, artifact, archive_dir / MODEL_ARCHIVE)

    true, predicted, in_top_k = int8 if served == "int8" else fp32
    document = evaluation_document(true, predicted, in_top_k, classes)
    document["additional_metrics"]["fp32_accuracy"] = metric(fp32_accuracy)
    if int8_accuracy is not None:
        document["additional_metrics"]["int8_accuracy"] = metric(int8_accuracy)
    document["pretrained_weights"] = pretrained_record(args.pretrained, info)
    document["inference_precision"] = precision_record(args.inference_precision, served, reason, fp32, int8, int8_problem)
    document["serving_artifact"] = record or {"error": fp32_network.note or "no serving artifact could be saved"}

    accuracy = document["multiclass_classification_metrics"]["accuracy"]["value"]
    top_k = document["additional_metrics"][f"top_{TOP_K}_accuracy"]["value"]
    output_dir.mkdir(parents=True, exist_ok=True)
    title = f"Test confusion matrix ({served}): accuracy {accuracy:.1%}, top-{TOP_K} {top_k:.1%}, {len(true)} images"
    plot_confusion_matrix(confusion(true, predicted, len(classes)), classes, title, output_dir / CONFUSION_MATRIX_FILE)
    atomic_write_json(output_dir / TEST_PREDICTIONS_FILE,
                      {name: classes[index] for name, index in zip(test_image_names(loader), predicted.tolist())})
    atomic_write_json(output_dir / EVALUATION_FILE, document)
    int8_text = f"{int8_accuracy:.6f}" if int8_accuracy is not None else f"unavailable ({int8_problem})"
    print(f"test accuracy={accuracy:.6f} top_{TOP_K}_accuracy={top_k:.6f} images={len(true)} "
          f"classes={len(classes)}; fp32 accuracy={fp32_accuracy:.6f}, int8 accuracy={int8_text}; "
          f"serving {served}: {reason}; wrote {EVALUATION_FILE}, {CONFUSION_MATRIX_FILE} and {TEST_PREDICTIONS_FILE} "
          f"to {output_dir} and {MODEL_ARCHIVE} ({'with its' if record else 'without a'} serving artifact) to {archive_dir}",
          flush=True)
    return document


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"folder with {MODEL_ARCHIVE} or the unpacked model files")
    parser.add_argument("--test", default=DEFAULT_TEST, help="test split: one folder per class")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help=f"where {EVALUATION_FILE}, {CONFUSION_MATRIX_FILE} and {TEST_PREDICTIONS_FILE} are written")
    parser.add_argument("--archive-output", default=DEFAULT_ARCHIVE_OUTPUT,
                        help=f"where the model archive to register ({MODEL_ARCHIVE}, with the serving artifact) is written")
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

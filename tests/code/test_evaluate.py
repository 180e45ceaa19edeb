"""code/evaluate.py on a model trained by code/train.py from data prepared by code/preprocess.py."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from PIL import Image

import common
import contract
import evaluate
import preprocess
from colour_images import make_dataset
from models import json_get, trained_job

pytestmark = pytest.mark.slow

IMAGE_SIZE = 32

METRIC = {
    "type": "object",
    "required": ["value", "standard_deviation"],
    "properties": {"value": {"type": "number", "minimum": 0, "maximum": 1}, "standard_deviation": {"enum": ["NaN"]}},
}


def evaluation_schema(classes: list[str]) -> dict:
    """SageMaker's model-quality format for multiclass classification, plus this project's extras."""
    row = {"type": "object", "required": classes, "additionalProperties": {"type": "integer", "minimum": 0}}
    return {
        "type": "object",
        "required": ["multiclass_classification_metrics", "dataset", "additional_metrics"],
        "properties": {
            "multiclass_classification_metrics": {
                "type": "object",
                "required": ["accuracy", "weighted_precision", "weighted_recall", "weighted_f1", "confusion_matrix"],
                "properties": {
                    **{name: METRIC for name in ("accuracy", "weighted_precision", "weighted_recall", "weighted_f1")},
                    "confusion_matrix": {"type": "object", "required": classes, "additionalProperties": row},
                },
                "additionalProperties": False,
            },
            "dataset": {"type": "object", "required": ["item_count", "class_count"]},
            "additional_metrics": {
                "type": "object",
                "required": ["top_5_accuracy", "per_class_accuracy"],
                "properties": {
                    "top_5_accuracy": METRIC,
                    "per_class_accuracy": {"type": "object", "required": classes,
                                           "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1}},
                },
            },
        },
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    raw = make_dataset(root / "raw", classes=3, per_split={"train": 12, "valid": 4, "test": 5}, size=(48, 36))
    assert preprocess.main(["--input", str(raw), "--output", str(root / "prepared"), "--resize", "37", "--workers", "1"]) == 0
    return root / "prepared"


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    """model.tar.gz as SageMaker packs the model folder train.py writes."""
    return trained_job(prepared, tmp_path_factory.mktemp("job"), "--image-size", str(IMAGE_SIZE),
                       "--epochs", "1", "--batch-size", "8", "--learning-rate", "0.05")


def independent_count(model_dir: Path, test_dir: Path) -> dict[str, tuple[int, int]]:
    """(correct, total) per class, counted here from the files with the trained network."""
    network, classes, info = common.load_model_dir(model_dir)
    transform = common.eval_transform(info["image_size"])
    counts = {}
    with torch.no_grad():
        for class_dir in sorted(test_dir.iterdir()):
            paths = sorted(class_dir.iterdir())
            batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
            predicted = [classes[i] for i in network(batch).argmax(dim=1).tolist()]
            counts[class_dir.name] = (sum(name == class_dir.name for name in predicted), len(paths))
    return counts


def run(model: Path, test: Path, output: Path) -> int:
    return evaluate.main(["--model", str(model), "--test", str(test), "--output", str(output), "--num-workers", "0",
                          "--batch-size", "4", "--archive-output", str(output.with_name(f"{output.name}-archive"))])


@pytest.fixture(scope="module")
def evaluated(trained, prepared, tmp_path_factory) -> Path:
    """The evaluation output for the artifact folder, as the pipeline passes it."""
    out = tmp_path_factory.mktemp("evaluation")
    assert run(trained / "artifact", prepared / "test", out) == 0
    return out


def test_evaluation_of_the_training_artifact(evaluated, trained, prepared):
    document = json.loads((evaluated / contract.EVALUATION_FILE).read_text())
    classes = json.loads((trained / "model" / contract.CLASSES_FILE).read_text())
    jsonschema.validate(document, evaluation_schema(classes))

    counts = independent_count(trained / "model", prepared / "test")
    correct, total = sum(c for c, _ in counts.values()), sum(t for _, t in counts.values())
    assert total == 15
    assert json_get(document, contract.ACCURACY_JSON_PATH) == correct / total
    assert document["dataset"] == {"item_count": total, "class_count": 3}
    assert document["additional_metrics"]["per_class_accuracy"] == {name: c / t for name, (c, t) in counts.items()}
    assert document["additional_metrics"]["top_5_accuracy"]["value"] == 1.0  # three classes: always in the top five
    matrix = document["multiclass_classification_metrics"]["confusion_matrix"]
    assert {name: (row[name], sum(row.values())) for name, row in matrix.items()} == counts

    with Image.open(evaluated / contract.CONFUSION_MATRIX_FILE) as picture:
        assert picture.format == "PNG" and min(picture.size) >= 600
    assert sorted(p.name for p in evaluated.iterdir()) == sorted([contract.EVALUATION_FILE, contract.CONFUSION_MATRIX_FILE,
                                                                  contract.TEST_PREDICTIONS_FILE])
    recorded = json.loads((evaluated / contract.TEST_PREDICTIONS_FILE).read_text())
    assert len(recorded) == total and set(recorded.values()) <= set(classes)
    assert {name: sum(path.split("/")[0] == name == label for path, label in recorded.items()) for name in counts} == {
        name: correct for name, (correct, _) in counts.items()}


def test_an_unpacked_model_folder_gives_the_same_evaluation(evaluated, trained, prepared, tmp_path):
    assert run(trained / "model", prepared / "test", tmp_path / "from-folder") == 0
    from_folder, from_archive = (json.loads((folder / contract.EVALUATION_FILE).read_text()) for folder in (tmp_path / "from-folder", evaluated))
    # a second trace in one process names its TorchScript classes apart (torch's mangling counter): other bytes, other hash
    assert from_folder["serving_artifact"].pop("sha256") != from_archive["serving_artifact"].pop("sha256")
    assert from_folder == from_archive


def test_test_classes_that_differ_from_the_model_are_refused(trained, tmp_path, capsys):
    test = make_dataset(tmp_path / "other", classes=4, per_split={"test": 1}) / "test"
    (test / "001.Breed_A").rename(test / "001.Breed_Z")
    assert run(trained / "artifact", test, tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "differ from the model's classes.json" in error
    assert "no test folder for 1 of the model's classes (001.Breed_A)" in error
    assert "2 test folder(s) the model does not know (001.Breed_Z, 004.Breed_D)" in error
    assert not (tmp_path / "out" / contract.EVALUATION_FILE).exists()


def test_a_model_folder_without_the_model_is_refused(prepared, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    job_output = tmp_path / "opt-ml-output"
    job_output.mkdir()
    monkeypatch.setattr(evaluate, "PROCESSING_FAILURE_FILE", str(job_output / "message"))
    assert run(tmp_path / "empty", prepared / "test", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "neither model.tar.gz nor model.pth" in error
    assert (job_output / "message").read_text() == error.strip()
    assert [p.name for p in job_output.iterdir()] == ["message"]

    monkeypatch.setattr(evaluate, "PROCESSING_FAILURE_FILE", str(tmp_path / "no-such-folder" / "message"))

    with tarfile.open(tmp_path / "model.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("model.pth")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert run(tmp_path / "model.tar.gz", prepared / "test", tmp_path / "out") == 2
    assert "lacks classes.json, model_info.json" in capsys.readouterr().err

    (tmp_path / "broken.tar.gz").write_bytes(b"not a tar file")
    assert run(tmp_path / "broken.tar.gz", prepared / "test", tmp_path / "out") == 2
    assert "not a readable tar.gz archive" in capsys.readouterr().err
    assert not (tmp_path / "no-such-folder").exists()


def test_the_failure_message_is_cut_to_1_kb_of_whole_utf8_characters(tmp_path):
    message = "évaluation " * 200
    assert common.write_failure_message(tmp_path / "message", message)
    written = (tmp_path / "message").read_bytes()
    assert 1022 <= len(written) <= 1024 and message.startswith(written.decode("utf-8"))
    assert [p.name for p in tmp_path.iterdir()] == ["message"]


def test_weighted_metrics_follow_the_class_shares():
    true = np.array([0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0])
    document = evaluate.evaluation_document(true, predicted, np.array([True] * 5), ["a", "b", "c"])
    metrics = {k: v["value"] for k, v in document["multiclass_classification_metrics"].items() if k != "confusion_matrix"}
    # per class: precision 1/2, 2/3, 0; recall 1/2, 1, 0; F1 1/2, 4/5, 0; shares 2/5, 2/5, 1/5
    assert metrics == pytest.approx({
        "accuracy": 3 / 5,
        "weighted_precision": 2 / 5 * 1 / 2 + 2 / 5 * 2 / 3,
        "weighted_recall": 2 / 5 * 1 / 2 + 2 / 5 * 1,
        "weighted_f1": 2 / 5 * 1 / 2 + 2 / 5 * 4 / 5,
    })
    assert document["multiclass_classification_metrics"]["confusion_matrix"]["a"] == {"a": 1, "b": 1, "c": 0}
    assert document["additional_metrics"]["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.0}

"""int8 serving: a model trained on real scans, quantized with the calibration sample it carries.

train.py stores validation images in the model's calibration/; evaluate.py measures fp32
and int8 on the test split and serves int8 only within one point of fp32 (and the gate reads
the served precision's accuracy); the definition carries the choice to the endpoint, whose
model_fn builds the int8 network from the same sample.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import contract
import evaluate
import inference
import serving_model
from models import json_get, trained_job
from pipeline.local.torchserve import ModelWorker
from real_images import write_digits

pytestmark = pytest.mark.slow

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"), per_class={"train": 40, "valid": 8, "test": 20}, size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory) -> Path:
    """train.py's model folder and model.tar.gz (as SageMaker packs it) for resnet18 trained on the digit scans."""
    return trained_job(digits, tmp_path_factory.mktemp("job"), "--freeze-backbone", "false", "--augment", "false",
                       "--image-size", str(IMAGE_SIZE), "--epochs", "5", "--patience", "0", "--batch-size", "32",
                       "--learning-rate", "0.05", "--num-threads", "1")


def archive_of(output: Path) -> Path:
    """Where ``evaluated`` has evaluate.py write the model archive for the evaluation in ``output``."""
    return output.with_name(f"{output.name}-archive") / contract.MODEL_ARCHIVE


def evaluated(trained: Path, digits: Path, output: Path, precision: str) -> dict:
    assert evaluate.main(["--model", str(trained / "artifact"), "--test", str(digits / "test"), "--output", str(output),
                          "--num-workers", "0", "--batch-size", "50", "--inference-precision", precision,
                          "--archive-output", str(archive_of(output).parent)]) == 0
    return json.loads((output / contract.EVALUATION_FILE).read_text())


@pytest.fixture(scope="module")
def int8_output(trained, digits, tmp_path_factory) -> Path:
    """The evaluation of the digits model with int8 asked for: evaluation files here, the archive beside."""
    output = tmp_path_factory.mktemp("int8")
    evaluated(trained, digits, output, "int8")
    return output


@pytest.fixture(scope="module")
def int8_evaluation(int8_output) -> dict:
    return json.loads((int8_output / contract.EVALUATION_FILE).read_text())


@pytest.fixture(scope="module")
def served_dir(int8_output, tmp_path_factory) -> Path:
    """The evaluation's model archive, unpacked as the endpoint unpacks it into /opt/ml/model."""
    folder = tmp_path_factory.mktemp("served") / "model"
    with tarfile.open(archive_of(int8_output)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def copied_model(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def edited_info(model_dir: Path, **record_changes) -> None:
    info = json.loads((model_dir / contract.MODEL_INFO_FILE).read_text())
    info[contract.SERVING_INFO_KEY].update(record_changes)
    (model_dir / contract.MODEL_INFO_FILE).write_text(json.dumps(info))


def test_training_stores_a_calibration_sample_of_validation_images(trained, digits):
    stored = serving_model.calibration_files(trained / "model")
    assert len(stored) == 32
    valid = {path.read_bytes() for path in (digits / "valid").glob("*/*.png")}
    test = {path.read_bytes() for path in (digits / "test").glob("*/*.png")}
    assert all(path.read_bytes() in valid and path.read_bytes() not in test for path in stored)
    classes_seen = {next(p.parent.name for p in (digits / "valid").glob("*/*.png") if p.read_bytes() == path.read_bytes())
                    for path in stored}
    assert len(classes_seen) == 10  # spread over the classes, not the first few
    with tarfile.open(trained / "artifact" / "model.tar.gz") as tar:
        assert sum(name.startswith(f"{contract.CALIBRATION_DIR}/") for name in tar.getnames()) == 32
    assert (trained / "model" / contract.MODEL_CODE_DIR / "serving_model.py").is_file()


def test_evaluation_measures_both_precisions_and_serves_by_the_one_point_rule(int8_evaluation):
    record = int8_evaluation["inference_precision"]
    fp32, int8 = record["fp32"]["accuracy"], record["int8"]["accuracy"]
    assert fp32 > 0.5, "the model learned the digits"
    assert record["requested"] == "int8"
    assert record["served"] == ("int8" if fp32 - int8 <= serving_model.MAX_INT8_ACCURACY_DROP else "fp32")
    served = record[record["served"]]
    assert json_get(int8_evaluation, contract.ACCURACY_JSON_PATH) == pytest.approx(served["accuracy"])
    assert json_get(int8_evaluation, contract.SERVED_PRECISION_JSON_PATH) == record["served"]
    assert int8_evaluation["additional_metrics"]["fp32_accuracy"]["value"] == pytest.approx(fp32)
    assert int8_evaluation["additional_metrics"]["int8_accuracy"]["value"] == pytest.approx(int8)
    assert record["reason"].startswith("int8 was requested")


def test_fp32_requested_is_served_with_int8_still_measured(trained, digits, int8_evaluation, tmp_path):
    document = evaluated(trained, digits, tmp_path, "fp32")
    record = document["inference_precision"]
    assert (record["requested"], record["served"]) == ("fp32", "fp32")
    assert record["int8"] == int8_evaluation["inference_precision"]["int8"]
    assert json_get(document, contract.ACCURACY_JSON_PATH) == pytest.approx(record["fp32"]["accuracy"])


@pytest.mark.parametrize("fp32, int8, served, words", [
    (0.90, 0.895, "int8", "within 1 point"),
    (0.90, 0.89, "int8", "within 1 point"),
    (0.90, 0.885, "fp32", "1.50 points below"),
    (0.90, None, "fp32", "could not be measured: no calibration"),
])
def test_the_served_precision_rule(fp32, int8, served, words):
    decision = serving_model.precision_decision("int8", fp32, int8, "no calibration images")
    assert decision[0] == served and words in decision[1]
    assert serving_model.precision_decision("fp32", fp32, 1.0)[0] == "fp32"


def test_model_fn_serves_int8_from_the_calibration_sample_agreeing_with_fp32(trained, digits, monkeypatch):
    torch.set_num_threads(1)
    fp32 = inference.model_fn(str(trained / "model"))
    monkeypatch.setenv(contract.INFERENCE_PRECISION_ENV, "int8")
    int8 = inference.model_fn(str(trained / "model"))
    assert (int8.served.precision, fp32.served.precision) == ("int8", "fp32")
    images = [Image.open(path).convert("RGB") for path in sorted((digits / "test").glob("*/*.png"))]
    request = inference.Request(images, top_k=1, return_logits=False)
    fp32_top = inference.prediction_of(request, fp32).probabilities.argmax(dim=1)
    int8_top = inference.prediction_of(request, int8).probabilities.argmax(dim=1)
    assert (fp32_top == int8_top).float().mean().item() >= 0.9


def test_int8_without_a_calibration_sample_serves_fp32_saying_why(trained, tmp_path, monkeypatch, caplog):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in (contract.MODEL_FILE, contract.CLASSES_FILE, contract.MODEL_INFO_FILE):
        (model_dir / name).write_bytes((trained / "model" / name).read_bytes())
    monkeypatch.setenv(contract.INFERENCE_PRECISION_ENV, "int8")
    with caplog.at_level(logging.WARNING, logger=serving_model.log.name):
        model = inference.model_fn(str(model_dir))
    assert (model.served.precision, model.served.runtime) == ("fp32", "torchscript")
    assert any("int8 was asked for" in r.getMessage() and contract.CALIBRATION_DIR in r.getMessage() for r in caplog.records)


def test_the_definition_passes_the_precision_from_evaluation_to_the_endpoint():
    from pipeline.dag import steps_of
    from pipeline.definition import synth
    from pipeline.settings import load_settings

    document = synth(load_settings({}, environ={})).document
    parameter = next(p for p in document["Parameters"] if p["Name"] == "InferencePrecision")
    assert parameter["DefaultValue"] == contract.DEFAULT_PRECISION
    assert tuple(parameter["EnumValues"]) == contract.PRECISIONS
    steps = steps_of(document)
    for suffix in ("SingleInstance", "MultiInstance"):
        arguments = steps[f"Evaluate{suffix}"].document["Arguments"]["AppSpecification"]["ContainerArguments"]
        assert arguments[arguments.index("--inference-precision") + 1] == {"Get": "Parameters.InferencePrecision"}
        environment = steps[f"Register{suffix}"].document["Arguments"]["InferenceSpecification"]["Containers"][0]["Environment"]
        assert environment[contract.INFERENCE_PRECISION_ENV] == {"Std:JsonGet": {
            "PropertyFile": {"Get": f"Steps.Evaluate{suffix}.PropertyFiles.Evaluation{suffix}"},
            "Path": contract.SERVED_PRECISION_JSON_PATH}}


# ---------------------------------------------------------------- the serving artifact


def test_the_evaluation_archive_holds_the_artifact_it_measured(int8_evaluation, int8_output, served_dir, trained):
    served = int8_evaluation["inference_precision"]["served"]
    record = json.loads((served_dir / contract.MODEL_INFO_FILE).read_text())[contract.SERVING_INFO_KEY]
    assert record == int8_evaluation["serving_artifact"]
    assert (record["precision"], record["torch_version"], record["device"]) == (served, torch.__version__, "cpu")
    assert hashlib.sha256((served_dir / contract.SERVING_MODEL_FILE).read_bytes()).hexdigest() == record["sha256"]
    with tarfile.open(archive_of(int8_output)) as tar:
        top = {name.split("/")[0] for name in tar.getnames()}
    assert top == {contract.MODEL_FILE, contract.CLASSES_FILE, contract.MODEL_INFO_FILE, contract.SERVING_MODEL_FILE,
                   contract.CALIBRATION_DIR, contract.MODEL_CODE_DIR}
    assert (served_dir / contract.MODEL_FILE).read_bytes() == (trained / "model" / contract.MODEL_FILE).read_bytes()
    assert sorted(p.name for p in (served_dir / contract.MODEL_CODE_DIR).iterdir()) == sorted(
        p.name for p in (trained / "model" / contract.MODEL_CODE_DIR).iterdir())


def test_the_handler_service_serves_the_archive_with_the_answers_the_evaluation_recorded(int8_evaluation, int8_output,
                                                                                         served_dir, digits):
    served = int8_evaluation["inference_precision"]["served"]
    recorded = json.loads((int8_output / contract.TEST_PREDICTIONS_FILE).read_text())
    worker = ModelWorker(served_dir, served_dir / contract.MODEL_CODE_DIR,
                         {"SAGEMAKER_PROGRAM": contract.INFERENCE_SCRIPT, contract.INFERENCE_PRECISION_ENV: served})
    answered = {}
    for name in recorded:
        status, payload, _ = worker.invoke((digits / "test" / name).read_bytes(), {"Content-Type": "image/png"})
        assert status == 200, payload
        answered[name] = json.loads(payload)["predictions"][0]["top_k"][0]["label"]
    assert len(answered) == 200 and answered == recorded


def test_model_fn_loads_the_stored_artifact_without_building(served_dir, int8_evaluation, monkeypatch, caplog):
    served = int8_evaluation["inference_precision"]["served"]
    monkeypatch.setenv(contract.INFERENCE_PRECISION_ENV, served)
    with caplog.at_level(logging.INFO, logger=inference.log.name):
        model = inference.model_fn(str(served_dir))
    assert model.network is None and (model.served.precision, model.served.runtime) == (served, "torchscript")
    assert any("stored artifact" in record.getMessage() for record in caplog.records)
    assert not any(record.levelno >= logging.WARNING for record in caplog.records)


def test_an_artifact_of_another_torch_is_rebuilt_from_the_state_dict_saying_why(served_dir, int8_evaluation, tmp_path,
                                                                               monkeypatch, caplog):
    served = int8_evaluation["inference_precision"]["served"]
    model_dir = copied_model(served_dir, tmp_path / "model")
    edited_info(model_dir, torch_version="2.6.0+cpu")
    (model_dir / contract.SERVING_MODEL_FILE).write_bytes(b"never read")
    monkeypatch.setenv(contract.INFERENCE_PRECISION_ENV, served)
    with caplog.at_level(logging.INFO, logger=inference.log.name):
        model = inference.model_fn(str(model_dir))
    assert model.network is not None and model.served.precision == served
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert warnings == [f"building the serving network from {contract.MODEL_FILE}: its serving artifact was built by "
                        f"torch 2.6.0+cpu and this is torch {torch.__version__}"]


def test_a_precision_other_than_the_artifacts_is_built_saying_why(served_dir, int8_evaluation, monkeypatch, caplog):
    other = next(p for p in contract.PRECISIONS if p != int8_evaluation["inference_precision"]["served"])
    monkeypatch.setenv(contract.INFERENCE_PRECISION_ENV, other)
    with caplog.at_level(logging.WARNING, logger=inference.log.name):
        model = inference.model_fn(str(served_dir))
    assert model.network is not None and model.served.precision == other
    assert any(f"and {other} is asked for" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("damage, words", [
    ("flipped byte", "not the"),
    ("missing", "cannot be read"),
    ("not torchscript", "cannot be loaded by torch"),
])
def test_a_corrupt_artifact_is_refused_at_load(served_dir, int8_evaluation, tmp_path, monkeypatch, damage, words):
    model_dir = copied_model(served_dir, tmp_path / "model")
    artifact = model_dir / contract.SERVING_MODEL_FILE
    if damage == "flipped byte":
        data = bytearray(artifact.read_bytes())
        data[len(data) // 2] ^= 0x01
        artifact.write_bytes(bytes(data))
    elif damage == "missing":
        artifact.unlink()
    else:  # a file whose hash is recorded but that torch cannot read
        artifact.write_bytes(b"PK\x03\x04 not a TorchScript archive")
        edited_info(model_dir, sha256=hashlib.sha256(artifact.read_bytes()).hexdigest())
    monkeypatch.setenv(contract.INFERENCE_PRECISION_ENV, int8_evaluation["inference_precision"]["served"])
    with pytest.raises(serving_model.ArtifactRefused) as refused:
        inference.model_fn(str(model_dir))
    message = str(refused.value)
    assert words in message and contract.SERVING_MODEL_FILE in message and "Evaluate step" in message

"""Backbone features computed once (ExtractFeatures, code/extract_features.py) and trials that train only the head on them.

Small and real: generated images, resnet18 at 32 pixels with weights from a state
dict file written here, the extraction script run as a process, train.py's own
entry points, the synthesized definition, and local-run on a cut-down definition.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from torchvision import models

from colour_images import make_dataset
from sources import CODE_DIR, ROOT

import contract
import train

EXTRACT_SCRIPT = CODE_DIR / "extract_features.py"
RUN_ENV = ("SM_CHANNEL_TRAINING", "SM_CHANNEL_TRAIN", "SM_CHANNEL_VALID", "SM_CHANNEL_PRETRAINED",
           f"SM_CHANNEL_{contract.FEATURES_CHANNEL.upper()}", "SM_MODEL_DIR", "SM_OUTPUT_DATA_DIR", "SM_HOSTS",
           "SM_CURRENT_HOST", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
           "OMP_NUM_THREADS")
SMALL = ["--backbone", "resnet18", "--image-size", "32", "--num-workers", "0", "--num-threads", "1"]
TRIAL = [*SMALL, "--epochs", "3", "--batch-size", "8", "--learning-rate", "0.05", "--augment", "false",
         "--seed", "42", "--patience", "0", "--checkpoint-dir", "none", "--output-data-dir", "none"]


@pytest.fixture
def no_run_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in RUN_ENV:
        monkeypatch.delenv(name, raising=False)


def clean_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in RUN_ENV}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("features") / "data", classes=3,
                        per_split={"train": 16, "valid": 6, "test": 1})


def weights_file(folder: Path, seed: int) -> Path:
    """A resnet18 state dict, as someone would supply pretrained weights."""
    torch.manual_seed(seed)
    path = folder / f"resnet18-{seed}.pth"
    torch.save(models.resnet18().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return weights_file(tmp_path_factory.mktemp("weights"), seed=3)


def extract(data: Path, output: Path, weights: Path | str, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(EXTRACT_SCRIPT), "--train", str(data / "train"), "--valid", str(data / "valid"),
               "--output", str(output), "--pretrained-weights", str(weights), *SMALL, *extra]
    return subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def extracted(data: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("extracted") / "features"
    result = extract(data, output, weights)
    assert result.returncode == 0, result.stdout + result.stderr
    return output


@pytest.mark.slow
def test_the_header_describes_the_features(extracted: Path, data: Path, weights: Path) -> None:
    header = json.loads((extracted / contract.FEATURES_HEADER_FILE).read_text())
    assert (header["format"], header["version"]) == ("dogbreed-features", 1)
    assert (header["backbone"], header["image_size"], header["feature_dim"]) == ("resnet18", 32, 512)
    assert header["classes"] == sorted(p.name for p in (data / "train").iterdir())
    assert header["weights"].startswith("sha256:") and len(header["weights"]) == len("sha256:") + 64
    assert {split: entry["images"] for split, entry in header["splits"].items()} == {"train": 48, "valid": 18}
    train_split = torch.load(extracted / contract.FEATURES_SPLIT_FILES["train"], weights_only=True)
    assert train_split["features"].shape == (48, 512) and train_split["labels"].tolist() == sorted(train_split["labels"].tolist())


def test_features_train_the_same_head_as_the_cached_run_on_the_images(
        no_run_env: None, data: Path, weights: Path, extracted: Path, tmp_path: Path) -> None:
    common = [*TRIAL, "--pretrained-weights", str(weights)]
    cached = train.main(train.parse_args([*common, "--data", str(data), "--cache-features", "true",
                                          "--model-dir", str(tmp_path / "cached")]))
    head_only = train.main(train.parse_args([*common, "--features", str(extracted), "--model-dir", str(tmp_path / "features")]))
    assert len(cached["history"]) == len(head_only["history"]) == 3
    for on_images, on_features in zip(cached["history"], head_only["history"]):
        assert on_features["val_loss"] == pytest.approx(on_images["val_loss"], abs=1e-4)
        assert on_features["train_loss"] == pytest.approx(on_images["train_loss"], abs=1e-4)
    assert cached["history"][-1]["val_loss"] < cached["history"][0]["val_loss"]
    states = [torch.load(tmp_path / name / contract.MODEL_FILE, weights_only=True) for name in ("cached", "features")]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.allclose(states[0][key].float(), states[1][key].float(), atol=1e-5), key


def refusal(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """train.py's exit status must be 2; returns its error line."""
    assert train.cli(argv) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("change, field", [
    (["--backbone", "resnet34"], "backbone"),
    (["--image-size", "64"], "image_size"),
])
def test_features_of_other_settings_are_refused_naming_the_field(
        no_run_env: None, extracted: Path, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        change: list[str], field: str) -> None:
    argv = [*TRIAL, "--pretrained-weights", str(weights), "--features", str(extracted), "--model-dir", str(tmp_path), *change]
    line = refusal(argv, capsys)
    assert line.startswith("train.py: error: ") and f"field '{field}' differs" in line
    assert f"{change[1]!r}" in line or change[1] in line
    assert not (tmp_path / contract.MODEL_FILE).exists()


def test_features_of_other_weights_are_refused(no_run_env: None, extracted: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    other = weights_file(tmp_path, seed=4)
    line = refusal([*TRIAL, "--pretrained-weights", str(other), "--features", str(extracted),
                    "--model-dir", str(tmp_path / "model")], capsys)
    assert "field 'weights' differs" in line


def test_features_of_other_classes_are_refused(no_run_env: None, extracted: Path, weights: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    other = make_dataset(tmp_path / "other", classes=2, per_split={"train": 2, "valid": 1})
    line = refusal([*TRIAL, "--pretrained-weights", str(weights), "--features", str(extracted),
                    "--train-dir", str(other / "train"), "--valid-dir", str(other / "valid"),
                    "--model-dir", str(tmp_path / "model")], capsys)
    assert "field 'classes' differs" in line and "3 classes in the features, 2 in this job" in line


def test_a_split_file_of_another_extraction_is_refused(no_run_env: None, extracted: Path, weights: Path,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(extracted, mixed)
    valid = mixed / contract.FEATURES_SPLIT_FILES["valid"]
    content = torch.load(valid, weights_only=True)
    torch.save({"features": content["features"] + 1, "labels": content["labels"]}, valid)
    line = refusal([*TRIAL, "--pretrained-weights", str(weights), "--features", str(mixed),
                    "--model-dir", str(tmp_path / "model")], capsys)
    assert "sha256 differs" in line and "mixes files of two extractions" in line


def test_a_missing_features_folder_is_named(no_run_env: None, weights: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    line = refusal([*TRIAL, "--pretrained-weights", str(weights), "--features", str(tmp_path / "nowhere"),
                    "--model-dir", str(tmp_path / "model")], capsys)
    assert f"{tmp_path / 'nowhere'} does not exist" in line


def test_features_with_augmentation_are_refused(no_run_env: None, extracted: Path, weights: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    argv = [*SMALL, "--pretrained-weights", str(weights), "--features", str(extracted), "--augment", "true",
            "--model-dir", str(tmp_path)]
    line = refusal(argv, capsys)
    assert "--augment false" in line and "--augment true" in line


@pytest.mark.slow
def test_extraction_refuses_a_folder_that_holds_features(data: Path, weights: Path, extracted: Path) -> None:
    before = (extracted / contract.FEATURES_HEADER_FILE).read_bytes()
    result = extract(data, extracted, weights)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"extract_features.py: error: {extracted} already holds features: write into an empty --output")
    assert (extracted / contract.FEATURES_HEADER_FILE).read_bytes() == before


@pytest.mark.slow
def test_weights_of_the_pretrained_channel_fit_a_trial_given_the_same_channel(
        no_run_env: None, data: Path, weights: Path, extracted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    channel = tmp_path / "pretrained"
    channel.mkdir()
    shutil.copy(weights, channel / "resnet18-weights.pth")
    output = tmp_path / "features"
    result = extract(data, output, "imagenet", "--pretrained-channel", str(channel))
    assert result.returncode == 0, result.stdout + result.stderr
    header = json.loads((output / contract.FEATURES_HEADER_FILE).read_text())
    assert header["weights"] == json.loads((extracted / contract.FEATURES_HEADER_FILE).read_text())["weights"]
    monkeypatch.setenv(f"SM_CHANNEL_{contract.PRETRAINED_CHANNEL.upper()}", str(channel))
    summary = train.main(train.parse_args([*TRIAL, "--epochs", "1", "--pretrained-weights", "imagenet",
                                           "--features", str(output), "--model-dir", str(tmp_path / "model")]))
    assert summary["epochs_trained"] == 1 and (tmp_path / "model" / contract.MODEL_FILE).is_file()


# ---------------------------------------------------------------- the definition

@pytest.fixture(scope="module")
def steps() -> dict[str, dict]:
    from pipeline.definition import synth
    from pipeline.settings import load_settings

    document = synth(load_settings({}, environ={})).document
    return {step["Name"]: step for step in document["Steps"]} | {"Parameters": document["Parameters"]}


@pytest.mark.slow
def test_tuning_trials_get_the_features_and_the_images_with_the_final_trainings_settings(steps: dict) -> None:
    """train.py picks from them: the features with a frozen backbone, the images when the backbone trains."""
    tuning = steps["TuneHyperparameters"]["Arguments"]["TrainingJobDefinition"]
    channels = {item["ChannelName"]: item["DataSource"]["S3DataSource"]["S3Uri"] for item in tuning["InputDataConfig"]}
    assert set(channels) == {contract.FEATURES_CHANNEL, contract.TRAIN_CHANNEL, contract.VALID_CHANNEL,
                             contract.PRETRAINED_CHANNEL}
    assert channels[contract.FEATURES_CHANNEL] == {
        "Get": f"Steps.ExtractFeatures.ProcessingOutputConfig.Outputs['{contract.FEATURES_CHANNEL}'].S3Output.S3Uri"}
    training = steps["TrainSingleInstance"]["Arguments"]
    final = {item["ChannelName"]: item["DataSource"]["S3DataSource"]["S3Uri"] for item in training["InputDataConfig"]}
    assert {name: channels[name] for name in final} == final
    extraction_inputs = {item["InputName"]: item["S3Input"]["S3Uri"] for item in steps["ExtractFeatures"]["Arguments"]["ProcessingInputs"]}
    assert extraction_inputs[contract.PRETRAINED_CHANNEL] == channels[contract.PRETRAINED_CHANNEL]
    ranges = steps["TuneHyperparameters"]["Arguments"]["HyperParameterTuningJobConfig"]["ParameterRanges"]
    tuned = {item["Name"] for kind in ranges.values() for item in kind}
    static = tuning["StaticHyperParameters"]

    def ours(hyperparameters: dict) -> dict:
        return {name: value for name, value in hyperparameters.items()
                if name not in tuned and not name.startswith(("_", "sagemaker_"))}

    assert ours(training["HyperParameters"]) == ours(static)
    assert json.loads(static["augment"]) == "true" and static["flip"] == {"Get": "Parameters.HorizontalFlip"}


def test_the_features_step_extracts_prepared_train_and_valid_with_the_trials_settings(steps: dict) -> None:
    step = steps["ExtractFeatures"]
    arguments = step["Arguments"]
    inputs = {item["InputName"]: item["S3Input"]["S3Uri"] for item in arguments["ProcessingInputs"]}
    for split in ("train", "valid"):
        assert inputs[split] == {"Get": f"Steps.PrepareData.ProcessingOutputConfig.Outputs['{split}'].S3Output.S3Uri"}
    assert "test" not in inputs
    assert "extract_features.py" in arguments["AppSpecification"]["ContainerEntrypoint"]
    options = arguments["AppSpecification"]["ContainerArguments"]
    given = dict(zip(options[::2], options[1::2]))
    trial = steps["TuneHyperparameters"]["Arguments"]["TrainingJobDefinition"]["StaticHyperParameters"]
    assert given["--backbone"] == trial["backbone"] == {"Get": "Parameters.Backbone"}
    assert given["--pretrained-weights"] == trial["pretrained_weights"] == {"Get": "Parameters.PretrainedWeights"}
    assert given["--image-size"] == trial["image_size"]
    assert "Parameters.ImageSize" in json.dumps(given["--image-size"])
    assert given["--seed"] == json.loads(trial["seed"])
    pretrained = next(item["S3Input"] for item in arguments["ProcessingInputs"] if item["InputName"] == contract.PRETRAINED_CHANNEL)
    assert given["--pretrained-channel"] == pretrained["LocalPath"]
    assert arguments["AppSpecification"]["ImageUri"] == \
        steps["TrainSingleInstance"]["Arguments"]["AlgorithmSpecification"]["TrainingImage"]
    assert step["CacheConfig"]["Enabled"] is True
    exceptions = {e for policy in step["RetryPolicies"] for e in policy["ExceptionType"]}
    assert {"Step.THROTTLING", "SageMaker.CAPACITY_ERROR"} <= exceptions


def test_trials_run_on_their_own_instance_type_and_the_final_trainings_on_images(steps: dict) -> None:
    parameters = {item["Name"]: item for item in steps["Parameters"]}
    assert parameters["TuningInstanceType"]["DefaultValue"] == "ml.m5.large"
    tuning = steps["TuneHyperparameters"]["Arguments"]["TrainingJobDefinition"]
    resources = tuning.get("HyperParameterTuningResourceConfig") or tuning["ResourceConfig"]
    assert resources["InstanceType"] == {"Get": "Parameters.TuningInstanceType"}
    for name in ("TrainSingleInstance", "TrainMultiInstance"):
        arguments = steps[name]["Arguments"]
        assert arguments["ResourceConfig"]["InstanceType"] == {"Get": "Parameters.TrainingInstanceType"}
        channels = {item["ChannelName"] for item in arguments["InputDataConfig"]}
        assert contract.FEATURES_CHANNEL not in channels and {contract.TRAIN_CHANNEL, contract.VALID_CHANNEL} <= channels
        assert json.loads(arguments["HyperParameters"]["augment"]) == "true"


# ---------------------------------------------------------------- local-run

@pytest.mark.slow
@pytest.mark.parametrize("pretrained, trained_on", [("file", "features")])
def test_local_run_trials_train_the_head_on_the_features_or_the_whole_network_on_the_images(
        tmp_path: Path, weights: Path, pretrained: str, trained_on: str) -> None:
    """With a weights file the backbone is frozen and every trial trains the head on the features extracted
    once; with PretrainedWeights=none (local-run's default) it trains the whole network on the images, which
    tests/local/test_local_run.py's full run shows (``test_without_weights_the_trials_train_the_whole_network``)."""
    from pipeline import cli
    from pipeline.local.sample import make_sample

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert cli.main(["synth", "--out", str(tmp_path / "full.json"), "--source-dir", str(ROOT)]) == 0, err.getvalue()
    document = json.loads((tmp_path / "full.json").read_text())
    document["Steps"] = [s for s in document["Steps"] if s["Name"] in ("PrepareData", "ExtractFeatures", "TuneHyperparameters")]
    (tmp_path / "cut.json").write_text(json.dumps(document))
    sample = make_sample(tmp_path / "data", classes=2, split_sizes={"train": 6, "valid": 3, "test": 1})
    workdir = tmp_path / "work"
    with redirect_stdout(out), redirect_stderr(err):
        status = cli.main(["local-run", "--no-progress", "--source-dir", str(ROOT), "--definition", str(tmp_path / "cut.json"),
                           "--data", str(sample.root), "--workdir", str(workdir), "--max-tuning-jobs", "2",
                           "--param", "Backbone=resnet18", "--param", "ImageSize=32",
                           *(["--pretrained-weights", str(weights)] if pretrained == "file" else [])])
    assert status == 0, out.getvalue()[-3000:] + err.getvalue()
    summary = json.loads((workdir / "summary.json").read_text())
    (extraction,) = summary["feature_extraction"].values()
    assert extraction["images"] == {"train": 12, "valid": 6} and extraction["backbone"] == "resnet18"
    tuning = summary["tuning"]["TuneHyperparameters"]
    assert {contract.FEATURES_CHANNEL, contract.TRAIN_CHANNEL, contract.VALID_CHANNEL} <= set(tuning["channels"])
    assert tuning["channels"][contract.FEATURES_CHANNEL] == str(Path(extraction["path"]).parent)
    assert len(tuning["trials"]) == 2 and all(t["seconds"] is not None and t["objective"] is not None for t in tuning["trials"])
    assert [t["trained_on"] for t in tuning["trials"]] == [trained_on] * 2
    steps = {step["name"]: step for step in summary["steps"]}
    for log in steps["TuneHyperparameters"]["logs"]:
        text = Path(log).read_text()
        read = "/input/data/features" if trained_on == "features" else "/input/data/train"
        assert re.search(rf"training images in \S*{read}\b", text), text[-2000:]
        assert "computed backbone features" not in text
    printed = out.getvalue()
    assert "Features (ExtractFeatures, once for all trials): 12 train + 6 valid images, resnet18 at 32 px" in printed
    assert ("trials, each training only the head on the features above" if trained_on == "features" else
            "trials, each training the whole network on the images") in printed

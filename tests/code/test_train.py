"""code/train.py on small generated image sets: resnet18, 32-pixel inputs, three classes.

Head-only runs load a seeded random resnet18 saved here as their "pretrained"
weights (nothing can be downloaded): a frozen backbone needs loaded weights.

The metric line, the artifacts and the resume are checked on the script run as
a real process the way SageMaker runs it; the rest calls its functions directly.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision import datasets, models, transforms

from colour_images import make_dataset, write_images
from sources import CODE_DIR
from real_images import write_digits

import arguments
import common
import contract
import distributed
import pretrained
import train
import training_data

TRAIN_SCRIPT = CODE_DIR / "train.py"
# Variables of the container contract and of torchrun that would change what a run does.
RUN_ENV = ("SM_CHANNEL_TRAINING", "SM_CHANNEL_TRAIN", "SM_CHANNEL_VALID", "SM_CHANNEL_PRETRAINED", "SM_MODEL_DIR",
           "SM_OUTPUT_DATA_DIR", "SM_HOSTS", "SM_CURRENT_HOST", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
           "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TRAINING_JOB_NAME", "OMP_NUM_THREADS")
SMALL = ["--backbone", "resnet18", "--pretrained-weights", "none", "--image-size", "32", "--num-workers", "0"]


def sagemaker_hyperparameters(weights: Path) -> list[str]:
    """As SageMaker passes them: underscore names, strings JSON-quoted, plus the tuner's own entry."""
    return ["--backbone", '"resnet18"', "--pretrained_weights", f'"{weights}"', "--image_size", "32", "--epochs", "3",
            "--batch_size", "8", "--learning_rate", "0.05", "--num_workers", "0", "--freeze_backbone", "true",
            "--augment", "true", "--seed", "7", "--patience", "0", "--_tuning_objective_metric", '"best_val_loss"',
            "--num_threads", "1"]


def write_backbone_weights(path: Path, seed: int = 1) -> Path:
    """A resnet18 state dict drawn with ``seed``, standing in for downloaded pretrained weights."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(models.resnet18(weights=None).state_dict(), path)
    return path


def head_only(weights: Path) -> list[str]:
    """SMALL with loaded weights: the backbone is frozen by default."""
    return [*SMALL[:2], "--pretrained-weights", str(weights), *SMALL[4:]]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RUN_ENV}
    env.update(extra)
    return env


@pytest.fixture
def no_run_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in RUN_ENV:
        monkeypatch.delenv(name, raising=False)


def metric_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("epoch=")]


def parsed_metrics(output: str) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in (pair.split("=") for pair in line.split())} for line in metric_lines(output)]


def run_script(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *args], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def sagemaker_env(data: Path, job: Path) -> dict[str, str]:
    return clean_env(SM_CHANNEL_TRAIN=str(data / "train"), SM_CHANNEL_VALID=str(data / "valid"),
                     SM_MODEL_DIR=str(job / "model"), SM_OUTPUT_DATA_DIR=str(job / "output"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("train") / "data", classes=3,
                        per_split={"train": 20, "valid": 6, "test": 4})


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_backbone_weights(tmp_path_factory.mktemp("weights") / "resnet18.pth")


@pytest.fixture(scope="module")
def reference(data: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted three-epoch run in the SageMaker manner: channels and outputs from SM_* variables."""
    job = tmp_path_factory.mktemp("reference")
    args = sagemaker_hyperparameters(weights) + ["--checkpoint_dir", str(job / "checkpoints")]
    result = run_script(args, sagemaker_env(data, job), job)
    return {"job": job, "args": args, "stdout": result.stdout}


@pytest.mark.slow
def test_run_writes_the_model_classes_info_and_inference_code(reference: dict, data: Path) -> None:
    model_dir = reference["job"] / "model"
    model, classes, info = common.load_model_dir(model_dir)
    assert classes == sorted(p.name for p in (data / "train").iterdir())
    assert info["backbone"] == "resnet18" and info["image_size"] == 32 and info["num_classes"] == 3
    assert info["normalization"] == {"mean": list(common.IMAGENET_MEAN), "std": list(common.IMAGENET_STD)}
    assert info["hyperparameters"]["learning_rate"] == 0.05
    copied = sorted(p.name for p in (model_dir / contract.MODEL_CODE_DIR).iterdir())
    expected = sorted(n for n in train.INFERENCE_FILES if (CODE_DIR / n).is_file())
    assert copied == expected and {"common.py", "contract.py"} <= set(copied)
    for name in copied:
        assert (model_dir / contract.MODEL_CODE_DIR / name).read_bytes() == (CODE_DIR / name).read_bytes()
    history = json.loads((reference["job"] / "output" / train.METRICS_HISTORY_FILE).read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_loss_falls(reference: dict) -> None:
    epochs = parsed_metrics(reference["stdout"])
    assert len(epochs) == 3
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    assert min(e["val_loss"] for e in epochs[1:]) < epochs[0]["val_loss"]


def test_saved_weights_are_the_best_epochs(reference: dict, data: Path) -> None:
    """The saved model reproduces the validation figures of the epoch with the lowest validation loss."""
    epochs = parsed_metrics(reference["stdout"])
    best = min(epochs, key=lambda e: e["val_loss"])
    model, classes, info = common.load_model_dir(reference["job"] / "model")
    assert info["best_epoch"] == best["epoch"]
    assert info["metrics"] == pytest.approx({k: v for k, v in best.items() if k != "epoch"}, abs=1e-6)
    valid_set = datasets.ImageFolder(str(data / "valid"), transform=common.eval_transform(32))
    images = torch.stack([image for image, _ in valid_set])
    labels = torch.tensor(valid_set.targets)
    with torch.no_grad():
        logits = model(images)
    assert torch.nn.functional.cross_entropy(logits, labels).item() == pytest.approx(best["val_loss"], abs=1e-4)
    assert (logits.argmax(1) == labels).float().mean().item() == pytest.approx(best["val_accuracy"], abs=1e-6)
    # The tuning objective: the lowest validation loss so far, which the last line gives as the saved model's.
    running_lowest = [min(e["val_loss"] for e in epochs[: i + 1]) for i in range(len(epochs))]
    assert [e["best_val_loss"] for e in epochs] == pytest.approx(running_lowest, abs=1e-6)
    assert epochs[-1]["best_val_loss"] == pytest.approx(info["metrics"]["val_loss"], abs=1e-6)
    assert contract.OBJECTIVE_METRIC == "best_val_loss"


def synthesized_metric_definitions() -> list[dict[str, str]]:
    """Every MetricDefinitions entry of the pipeline definition: the tuning job's and both training jobs'."""
    from pipeline.dag import steps_of
    from pipeline.definition import synth
    from pipeline.settings import load_settings

    found = []
    for node in steps_of(synth(load_settings({}, environ={})).document).values():
        arguments = node.document["Arguments"]
        algorithm = arguments.get("TrainingJobDefinition", arguments).get("AlgorithmSpecification", {})
        found += algorithm.get("MetricDefinitions", [])
    assert len(found) == 3 * len(contract.METRIC_NAMES)
    return found


@pytest.mark.slow
def test_the_definitions_metric_regexes_parse_the_real_output(reference: dict) -> None:
    output = reference["stdout"]
    printed = parsed_metrics(output)
    definitions = synthesized_metric_definitions()
    assert {d["Name"] for d in definitions} == set(contract.METRIC_NAMES)
    for definition in definitions:
        values = [float(v) for v in re.findall(definition["Regex"], output)]
        assert values == [epoch[definition["Name"]] for epoch in printed], definition
    # No log line may be mistaken for a metric line.
    for line in output.splitlines():
        if any(re.search(d["Regex"], line) for d in definitions):
            assert line.startswith("epoch=")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(reference: dict, data: Path, tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    args = [*reference["args"][:-2], "--checkpoint_dir", str(checkpoints)]
    env = sagemaker_env(data, tmp_path)
    process = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args], env={**env, "TRAINING_JOB_NAME": "train-spot-1"}, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_output = []
    for line in process.stdout:
        killed_output.append(line)
        if "saved checkpoint of epoch 1" in line:
            process.kill()
            break
    process.wait(timeout=60)
    process.stdout.close()
    assert process.returncode == -9, "".join(killed_output)
    assert not (tmp_path / "model").exists()

    # A step retry or a spot restart runs under another job name and still resumes.
    resumed = run_script(args, {**env, "TRAINING_JOB_NAME": "train-spot-1-retry"}, tmp_path)
    assert "resumed from" in resumed.stdout and "after epoch 1" in resumed.stdout
    assert metric_lines(resumed.stdout) == metric_lines(reference["stdout"])[1:]
    for job in (reference["job"] / "checkpoints", checkpoints):
        assert [p.name for p in job.iterdir()] == ["checkpoint.pth"]
    final = [torch.load(d / "checkpoint.pth", weights_only=True)["model"] for d in (reference["job"] / "checkpoints", checkpoints)]
    saved = [torch.load(d / "model" / contract.MODEL_FILE, weights_only=True) for d in (reference["job"], tmp_path)]
    for first, second in (final, saved):
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)
    # The resumed run went on along the schedule: 3 epochs of 8 steps (60 images in batches of 8), not a new warm-up.
    schedules = [torch.load(d / "checkpoint.pth", weights_only=True)["scheduler"]
                 for d in (reference["job"] / "checkpoints", checkpoints)]
    assert schedules[0] == schedules[1] and schedules[1]["last_epoch"] == 3 * 8


def accuracy_on_test_split(model_dir: Path, test_dir: Path) -> float:
    model, classes, info = common.load_model_dir(model_dir)
    test_set = datasets.ImageFolder(str(test_dir), transform=common.eval_transform(info["image_size"]))
    assert test_set.classes == classes
    with torch.no_grad():
        logits = model(torch.stack([image for image, _ in test_set]))
    return (logits.argmax(1) == torch.tensor(test_set.targets)).float().mean().item()


def in_process_run(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[dict, str]:
    """main() in this process with one torch thread (tiny tensors gain nothing from more); the thread count is restored."""
    threads = torch.get_num_threads()
    try:
        summary = train.main(train.parse_args([*argv, "--num-threads", "1"]))
    finally:
        torch.set_num_threads(threads)
    return summary, capsys.readouterr().out


@pytest.mark.slow
def test_validation_loss_does_not_depend_on_batch_size(no_run_env: None, data: Path, weights: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    results = {}
    for batch_size in (4, 16):
        _, output = in_process_run(capsys, head_only(weights) + ["--data", str(data), "--model-dir", str(tmp_path / f"m{batch_size}"),
                                                    "--learning-rate", "0", "--epochs", "1", "--seed", "3",
                                                    "--batch-size", str(batch_size)])
        (line,) = metric_lines(output)
        results[batch_size] = {d["Name"]: float(re.search(d["Regex"], line).group(1)) for d in contract.metric_definitions()}
    assert results[4]["val_loss"] == pytest.approx(results[16]["val_loss"], abs=1e-4)
    assert results[4]["train_loss"] == pytest.approx(results[16]["train_loss"], abs=1e-4)
    assert results[4]["val_accuracy"] == results[16]["val_accuracy"]


@pytest.mark.slow
def test_cached_features_train_the_same_head(no_run_env: None, data: Path, weights: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    states, histories = [], []
    for cache in ("false", "true"):
        summary, _ = in_process_run(capsys, head_only(weights) + [
            "--data", str(data), "--model-dir", str(tmp_path / cache), "--epochs", "2", "--batch-size", "8",
            "--learning-rate", "0.05", "--augment", "false", "--cache-features", cache])
        states.append(torch.load(tmp_path / cache / contract.MODEL_FILE, weights_only=True))
        histories.append(summary["history"])
    for key in states[0]:
        assert torch.allclose(states[0][key], states[1][key], atol=1e-5), key
    for uncached, cached in zip(*histories):
        assert cached["val_loss"] == pytest.approx(uncached["val_loss"], abs=1e-4)


def test_early_stopping_keeps_the_best_epoch(no_run_env: None, data: Path, weights: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """With a learning rate of 0 the validation loss never falls after epoch 1, so patience 2 stops after epoch 3."""
    summary, output = in_process_run(capsys, head_only(weights) + [
        "--data", str(data), "--model-dir", str(tmp_path / "model"), "--epochs", "6", "--patience", "2",
        "--learning-rate", "0", "--augment", "false", "--cache-features", "true"])
    assert len(metric_lines(output)) == 3
    assert summary["stopped_early"] and summary["best_epoch"] == 1
    assert json.loads((tmp_path / "model" / contract.MODEL_INFO_FILE).read_text())["best_epoch"] == 1


def test_checkpoint_of_other_settings_is_refused(no_run_env: None, data: Path, weights: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    common_args = head_only(weights) + ["--data", str(data), "--model-dir", str(tmp_path / "model"), "--epochs", "1",
                           "--checkpoint-dir", str(tmp_path / "ckpt"), "--augment", "false", "--cache-features"]
    in_process_run(capsys, common_args + ["--learning-rate", "0.05"])
    with pytest.raises(arguments.TrainingInputError, match=r"other settings \(learning_rate 0.05 -> 0.1\).*empty folder"):
        in_process_run(capsys, common_args + ["--learning-rate", "0.1"])


# ---------------------------------------------------------------------------- arguments

def test_hyperparameters_in_sagemaker_spelling(no_run_env: None, weights: Path) -> None:
    args = train.parse_args(sagemaker_hyperparameters(weights) + ["--cache_features", "false"])
    assert (args.backbone, args.pretrained_weights, args.image_size, args.batch_size) == ("resnet18", str(weights), 32, 8)
    assert args.learning_rate == 0.05 and args.freeze_backbone is True and args.cache_features is False
    dashed = train.parse_args(["--learning-rate", "0.2", "--freeze-backbone", "false", "--augment", "False",
                               "--batch-size", '"16"'])
    assert (dashed.learning_rate, dashed.freeze_backbone, dashed.augment, dashed.batch_size) == (0.2, False, False, 16)


def test_defaults_come_from_the_container_variables(monkeypatch: pytest.MonkeyPatch, no_run_env: None) -> None:
    monkeypatch.setenv("SM_CHANNEL_TRAIN", "/in/train")
    monkeypatch.setenv("SM_MODEL_DIR", "/opt/model")
    args = train.parse_args([])
    assert training_data.split_dirs(args) == (Path("/in/train"), Path("data/valid"))
    assert args.model_dir == "/opt/model" and args.output_data_dir is None
    assert (args.backbone, args.freeze_backbone, args.augment, args.cache_features) == ("resnet50", True, True, False)


def test_threads_are_shared_between_local_processes(monkeypatch: pytest.MonkeyPatch, no_run_env: None) -> None:
    monkeypatch.setenv("SM_HOSTS", json.dumps([f"algo-{i}" for i in range(1, 8)]))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert distributed.processes_on_this_machine() == 7
    assert train.parse_args([]).num_threads == max(1, arguments.usable_cpus() // 7)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.5")
    assert distributed.processes_on_this_machine() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert train.parse_args([]).num_threads == 3


@pytest.mark.parametrize("argv, message", [
    (["--learning_rat", "0.1"], "unrecognized arguments: --learning_rat"),
    (["--augment", "maybe"], "expected true or false"),
    (["--backbone", "resnet101"], "invalid choice"),
    (["--batch-size", "0"], "must be at least 1"),
    (["--cache-features", "true"], "--cache-features needs .*--augment false"),
    (["--cache-features", "--augment", "false", "--freeze-backbone", "false"], "here --freeze-backbone false"),
    (["--cache-features", "--augment", "false", "--pretrained-weights", "none"],
     "the backbone trains, since the weights are random.*--cache-features false \\(or auto"),
    (["--freeze-backbone", "true", "--pretrained-weights", "none"],
     "frozen random network; drop --freeze-backbone .*PretrainedWeightsS3Uri"),
    (["--cache-features", "sometimes"], "expected true, false or auto"),
    (["--image-size", "16"], "at least 32"),
    (["--warmup-epochs", "3", "--epochs", "3"], "--warmup-epochs 3 leaves no epoch of the --epochs 3"),
    (["--label-smoothing", "1"], "--label_smoothing: must be below 1"),
    (["--crop-scale", "0"], "--crop_scale: must be above 0 and at most 1"),
    (["--flip", "sideways"], "argument --flip: expected true or false"),
])
def test_bad_arguments_are_named(no_run_env: None, capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


# ---------------------------------------------------------------------------- bad data

def test_missing_split_is_named(no_run_env: None, tmp_path: Path, capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_dataset(tmp_path / "data", classes=2, per_split={"train": 2})
    job_output = tmp_path / "opt-ml-output"
    job_output.mkdir()
    monkeypatch.setattr(contract, "TRAINING_FAILURE_FILE", str(job_output / "failure"))
    assert train.cli(SMALL + ["--data", str(root), "--model-dir", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert f"the valid split is missing: {root / 'valid'} is not a folder" in err and "--valid-dir" in err
    assert "Traceback" not in err and not (tmp_path / "model").exists()
    assert (job_output / "failure").read_text() == f"train.py: error: {err.split('train.py: error: ', 1)[1]}".strip()


def test_empty_split_is_named(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", classes=2, per_split={"train": 2})
    (root / "valid").mkdir()
    with pytest.raises(arguments.TrainingInputError, match=r"the valid split at .*valid is empty: it holds no class folders"):
        training_data.load_data(root / "train", root / "valid", 32, False)
    for name in ("001.Breed_A", "002.Breed_B"):
        (root / "valid" / name).mkdir()
    with pytest.raises(arguments.TrainingInputError, match=r"the valid split at .* has a class folder without images"):
        training_data.load_data(root / "train", root / "valid", 32, False)


def test_class_folders_that_differ_between_splits_are_named(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", classes=3, per_split={"train": 2, "valid": 2})
    write_images(root / "valid" / "004.Extra_Breed", 1, (10, 10, 10))
    (root / "valid" / "001.Breed_A").rename(root / "valid" / "001.Breed_a")
    with pytest.raises(arguments.TrainingInputError,
                       match=r"differ .* only in train: 001.Breed_A; only in valid: 001.Breed_a, 004.Extra_Breed"):
        training_data.load_data(root / "train", root / "valid", 32, False)


def test_test_split_is_not_needed(no_run_env: None, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_dataset(tmp_path / "data", classes=2, per_split={"train": 4, "valid": 2})
    summary, _ = in_process_run(capsys, head_only(weights) + ["--train-dir", str(root / "train"), "--valid-dir", str(root / "valid"),
                                                 "--data", str(tmp_path / "absent"), "--model-dir", str(tmp_path / "m"),
                                                 "--epochs", "1", "--augment", "false", "--cache-features"])
    assert summary["epochs_trained"] == 1


# ---------------------------------------------------------------------------- pretrained weights

def test_backbone_weights_load_from_a_file_and_the_head_is_new(monkeypatch: pytest.MonkeyPatch, no_run_env: None,
                                                               tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = models.resnet18(weights=None)
    channel = tmp_path / "pretrained"
    channel.mkdir()
    torch.save(source.state_dict(), channel / "resnet18.pth")
    monkeypatch.setenv("SM_CHANNEL_PRETRAINED", str(channel))
    model = common.build_model("resnet18", 5)
    pretrained.load_backbone_weights(model, pretrained.pretrained_source(None), "resnet18")
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert torch.equal(model.bn1.running_var, source.bn1.running_var)
    assert model.fc.out_features == 5


def test_weights_of_another_backbone_are_refused(tmp_path: Path) -> None:
    torch.save(models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(arguments.TrainingInputError, match=r"r18.pth do not fit resnet34"):
        pretrained.load_backbone_weights(common.build_model("resnet34", 3), str(tmp_path / "r18.pth"), "resnet34")
    (tmp_path / "other.pth").write_bytes(b"not a state dict")
    with pytest.raises(arguments.TrainingInputError, match=r"holds 2 .pth/.pt files"):
        pretrained.load_backbone_weights(common.build_model("resnet18", 3), str(tmp_path), "resnet18")
    with pytest.raises(arguments.TrainingInputError, match=r"cannot read the pretrained weights .*other.pth"):
        pretrained.load_backbone_weights(common.build_model("resnet18", 3), str(tmp_path / "other.pth"), "resnet18")


def test_imagenet_weights_come_from_the_torch_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / models.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(2)
    source = models.resnet18(weights=None)
    torch.save(source.state_dict(), cached)
    model = common.build_model("resnet18", 3)
    pretrained.load_backbone_weights(model, "imagenet", "resnet18")
    assert torch.equal(model.conv1.weight, source.conv1.weight)


def test_imagenet_weights_that_cannot_be_downloaded_say_how_to_supply_them(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there: the download fails at once
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(arguments.TrainingInputError,
                       match=r"cannot download .*PretrainedWeightsS3Uri to its URI \(it becomes the 'pretrained' channel\).*PretrainedWeights=none"):
        pretrained.load_backbone_weights(common.build_model("resnet18", 3), "imagenet", "resnet18")


# ---------------------------------------------------------------------------- the frozen-backbone rule

@pytest.mark.slow
def test_random_weights_train_the_whole_network(no_run_env: None, data: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """--pretrained-weights none and no freeze flag: every backbone layer learns, batch-norm statistics too."""
    summary, _ = in_process_run(capsys, SMALL + ["--data", str(data), "--model-dir", str(tmp_path / "m"), "--epochs", "1",
                                                 "--batch-size", "8", "--learning-rate", "0.05", "--seed", "5"])
    distributed.seed_everything(5)
    initial = common.build_model("resnet18", 3).state_dict()
    trained = torch.load(tmp_path / "m" / contract.MODEL_FILE, weights_only=True)
    backbone = [k for k in initial if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    unchanged = [k for k in backbone if torch.equal(initial[k], trained[k])]
    assert len(backbone) == 100 and unchanged == []
    info = json.loads((tmp_path / "m" / contract.MODEL_INFO_FILE).read_text())
    assert info["hyperparameters"]["freeze_backbone"] is False and info["pretrained_weights"] is None
    assert summary["history"][0]["optimizer_steps"] == 8  # 60 images in global batches of 8, the last of 4 kept


def test_loaded_weights_freeze_the_backbone_unless_told(no_run_env: None, weights: Path) -> None:
    assert train.parse_args(head_only(weights)).freeze_backbone is True
    assert train.parse_args(head_only(weights) + ["--freeze-backbone", "false"]).freeze_backbone is False
    assert train.parse_args(SMALL).freeze_backbone is False
    cached = train.parse_args(head_only(weights) + ["--augment", "false", "--cache-features", "auto"])
    assert cached.cache_features is True
    assert train.parse_args(SMALL + ["--augment", "false", "--cache-features", "auto"]).cache_features is False


def test_the_pretrained_channel_supplies_weights_or_the_placeholder(monkeypatch: pytest.MonkeyPatch, no_run_env: None,
                                                                    weights: Path, tmp_path: Path) -> None:
    """The definition's default channel source (the job's code archive) means no weights; a .pth file is used."""
    channel = tmp_path / "pretrained"
    channel.mkdir()
    monkeypatch.setenv("SM_CHANNEL_PRETRAINED", str(channel))
    (channel / contract.NO_WEIGHTS_PLACEHOLDER).write_bytes(b"\x1f\x8b code archive")
    assert pretrained.pretrained_source("imagenet") == "imagenet" and pretrained.pretrained_source("none") is None
    assert train.parse_args(SMALL).freeze_backbone is False
    (channel / contract.NO_WEIGHTS_PLACEHOLDER).unlink()
    (channel / "notes.txt").write_text("not weights")
    with pytest.raises(arguments.TrainingInputError, match=r"'pretrained' channel .* holds no state dict file \(notes.txt\)"):
        pretrained.pretrained_source("imagenet")
    (channel / "resnet18.pth").write_bytes(weights.read_bytes())
    assert pretrained.pretrained_source("imagenet") == str(channel / "resnet18.pth")
    assert train.parse_args(["--backbone", "resnet18"]).freeze_backbone is True
    with pytest.raises(arguments.TrainingInputError, match=r"supplies resnet18.pth .* set PretrainedWeights=imagenet"):
        pretrained.pretrained_source("none")


def test_the_weights_source_is_resolved_once_when_the_arguments_are_parsed(
        monkeypatch: pytest.MonkeyPatch, no_run_env: None, data: Path, weights: Path, tmp_path: Path) -> None:
    """The channel is listed once: a file added to it later (two state dicts, which a new listing refuses) changes
    nothing for the run, and model_info.json names the file resolved then, not among the hyperparameters."""
    channel = tmp_path / "pretrained"
    channel.mkdir()
    (channel / "resnet18.pth").write_bytes(weights.read_bytes())
    monkeypatch.setenv("SM_CHANNEL_PRETRAINED", str(channel))
    args = train.parse_args([*SMALL[:2], *SMALL[4:], "--data", str(data), "--model-dir", str(tmp_path / "m"),
                             "--epochs", "1", "--augment", "false", "--cache-features", "true", "--num-threads", "1"])
    (channel / "other.pth").write_bytes(weights.read_bytes())
    with pytest.raises(arguments.TrainingInputError, match=r"holds 2 .pth/.pt files"):
        pretrained.pretrained_source("imagenet")
    assert train.main(args)["epochs_trained"] == 1
    info = json.loads((tmp_path / "m" / contract.MODEL_INFO_FILE).read_text())
    assert info["pretrained_weights"] == str(channel / "resnet18.pth")
    assert "weights_source" not in info["hyperparameters"] and info["hyperparameters"]["pretrained_weights"] is None


# ---------------------------------------------------------------------------- the recipe

def test_the_schedule_warms_up_linearly_then_falls_along_a_cosine() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = train.make_scheduler(optimizer, steps_per_epoch=5, epochs=4, warmup_epochs=1)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.1 * train.WARMUP_START_FACTOR)
    assert rates[1] == pytest.approx(0.1 * (train.WARMUP_START_FACTOR + (1 - train.WARMUP_START_FACTOR) / 5))
    assert rates[5] == pytest.approx(0.1)  # the warm-up's end: the full rate, the cosine's start
    assert rates[19] == pytest.approx(0.1 * (1 + math.cos(math.pi * 14 / 15)) / 2)  # the last of 20 steps
    assert all(later < earlier for earlier, later in zip(rates[5:], rates[6:]))
    no_warmup = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    train.make_scheduler(no_warmup, steps_per_epoch=5, epochs=4, warmup_epochs=0)
    assert no_warmup.param_groups[0]["lr"] == pytest.approx(0.1)


def test_batch_norm_and_biases_get_no_weight_decay() -> None:
    model = common.build_model("resnet18", 3)
    decayed, plain = train.parameter_groups(model, 1e-4)
    assert (decayed["weight_decay"], plain["weight_decay"]) == (1e-4, 0.0)
    weights = [module.weight for module in model.modules() if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))]
    assert [id(p) for p in decayed["params"]] == [id(p) for p in weights]
    assert {id(p) for p in plain["params"]} == {id(p) for p in model.parameters()} - {id(p) for p in weights}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def former_precise_batch_norm(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """The batch-norm pass train.py ran before it used torch's ``update_bn``, kept as the reference."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for inputs in batches:
            model(inputs)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def test_batch_norm_statistics_are_the_former_pass_over_the_first_global_batches(
        no_run_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """update_bn over the first PRECISE_BN_BATCHES global batches gives the statistics of the pass it replaced:
    on real scans, a resnet18 whose statistics had drifted; the mean of each batch's mean and unbiased variance."""
    root = write_digits(tmp_path / "digits", per_class={"train": 5, "valid": 1, "test": 0}, classes=5)
    args = train.parse_args([*SMALL, "--data", str(root), "--batch-size", "8", "--seed", "3"])
    splits = training_data.load_splits(args, distributed.DistInfo())
    loader = training_data.make_train_loader(splits.train, args, distributed.DistInfo(), torch.device("cpu"),
                                             seeded=True, workers=0)
    loader.batch_sampler.set_epoch(2)
    monkeypatch.setattr(train, "PRECISE_BN_BATCHES", 2)  # of the epoch's 4 global batches (25 scans)
    model = common.build_model("resnet18", len(splits.classes))
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_mean.fill_(3.0)
        norm.running_var.fill_(7.0)
    reference = common.build_model("resnet18", len(splits.classes))
    reference.load_state_dict(model.state_dict())
    first_batches = [inputs for inputs, _ in list(loader)[:2]]

    train.recompute_batch_norm_statistics(train.Parts(model, None), loader, torch.device("cpu"))
    former_precise_batch_norm(reference, first_batches)

    buffers, expected = dict(model.named_buffers()), dict(reference.named_buffers())
    assert len(buffers) == 3 * 20  # running_mean, running_var and num_batches_tracked of resnet18's 20 norms
    for name, value in expected.items():
        torch.testing.assert_close(buffers[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert int(model.bn1.num_batches_tracked) == 2
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        stem = [model.conv1(inputs) for inputs in first_batches]
    torch.testing.assert_close(model.bn1.running_mean, torch.stack([x.mean((0, 2, 3)) for x in stem]).mean(0))
    torch.testing.assert_close(model.bn1.running_var,
                               torch.stack([x.transpose(0, 1).flatten(1).var(1) for x in stem]).mean(0))


def test_label_smoothing_mixes_the_loss_with_the_mean_over_classes(no_run_env: None, data: Path, weights: Path,
                                                                   tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """At learning rate 0 the training loss with smoothing s is (1 - s) times the cross-entropy plus s times the
    mean over classes of -log p; the validation loss stays the plain cross-entropy."""
    losses = {}
    for smoothing in (0.0, 0.3):
        summary, _ = in_process_run(capsys, head_only(weights) + [
            "--data", str(data), "--model-dir", str(tmp_path / str(smoothing)), "--epochs", "1", "--learning-rate", "0",
            "--augment", "false", "--cache-features", "true", "--label-smoothing", str(smoothing)])
        losses[smoothing] = summary["history"][0]
    model, _, _ = common.load_model_dir(tmp_path / "0.0")
    train_set = datasets.ImageFolder(str(data / "train"), transform=common.eval_transform(32))
    with torch.no_grad():
        log_p = torch.log_softmax(model(torch.stack([image for image, _ in train_set])), dim=1)
    uniform = -log_p.mean(dim=1).mean().item()
    assert losses[0.0]["train_loss"] == pytest.approx(
        torch.nn.functional.nll_loss(log_p, torch.tensor(train_set.targets)).item(), abs=1e-4)
    assert losses[0.3]["train_loss"] == pytest.approx(0.7 * losses[0.0]["train_loss"] + 0.3 * uniform, abs=1e-4)
    assert losses[0.3]["val_loss"] == pytest.approx(losses[0.0]["val_loss"], abs=1e-6)


def test_augmentation_settings_reach_the_transform(no_run_env: None, data: Path) -> None:
    def train_steps(*argv: str) -> list:
        splits = training_data.load_splits(train.parse_args([*SMALL, "--data", str(data), *argv]), distributed.DistInfo())
        return list(splits.train.transform.transforms)

    crop, flip, *_ = train_steps()
    assert isinstance(crop, transforms.RandomResizedCrop) and crop.scale == (common.DEFAULT_CROP_SCALE, 1.0)
    assert isinstance(flip, transforms.RandomHorizontalFlip)
    crop, *rest = train_steps("--crop-scale", "0.6", "--flip", "false")
    assert crop.scale == (0.6, 1.0) and not any(isinstance(t, transforms.RandomHorizontalFlip) for t in rest)
    assert not any(isinstance(t, transforms.RandomResizedCrop) for t in train_steps("--augment", "false"))


def test_warm_up_epochs_do_not_count_towards_patience(no_run_env: None, data: Path, weights: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """Learning rate 0: the loss never falls after epoch 1; with 3 warm-up epochs, patience 1 stops after epoch 4."""
    summary, output = in_process_run(capsys, head_only(weights) + [
        "--data", str(data), "--model-dir", str(tmp_path / "model"), "--epochs", "6", "--patience", "1",
        "--warmup-epochs", "3", "--learning-rate", "0", "--augment", "false", "--cache-features", "true"])
    assert len(metric_lines(output)) == 4 and summary["stopped_early"] and summary["best_epoch"] == 1


# Half the training images of benchmarks/model_quality.py's digit set (whose lowest test accuracy over seeds,
# 1 and 7 processes, is in benchmarks/README.md); this run measured 0.91 test accuracy on 300 test scans in
# 35 CPU seconds. The floor leaves a margin for noise, so only a broken recipe (a schedule that never warms
# up, a loss or augmentation that stops learning) fails it.
FLOOR_SPLIT = {"train": 30, "valid": 10, "test": 30}
ACCURACY_FLOOR = 0.8


@pytest.mark.slow
def test_the_recipe_defaults_learn_the_digit_scans(no_run_env: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_digits(tmp_path / "digits", per_class=FLOOR_SPLIT)
    in_process_run(capsys, SMALL + ["--data", str(data), "--model-dir", str(tmp_path / "model"), "--epochs", "8",
                                    "--flip", "false", "--seed", "1", "--checkpoint-dir", "none"])
    assert accuracy_on_test_split(tmp_path / "model", data / "test") >= ACCURACY_FLOOR


def test_a_trial_trains_the_whole_network_on_images_unless_the_backbone_is_frozen(
        monkeypatch: pytest.MonkeyPatch, no_run_env: None, weights: Path, tmp_path: Path) -> None:
    """The tuning job gives every trial the features channel and the images: the frozen-backbone rule picks one."""
    monkeypatch.setenv(common.channel_variable(contract.FEATURES_CHANNEL), str(tmp_path / "features"))
    whole = train.parse_args(SMALL)
    assert (whole.features, whole.augment, whole.freeze_backbone) == (None, True, False)
    unfrozen = train.parse_args(head_only(weights) + ["--freeze-backbone", "false"])
    assert (unfrozen.features, unfrozen.augment) == (None, True)
    head = train.parse_args(head_only(weights))
    assert (head.features, head.augment, head.freeze_backbone) == (str(tmp_path / "features"), False, True)

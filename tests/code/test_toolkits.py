"""The container scripts under the real SageMaker container toolkits, as the PyTorch images run them.

Training: ``sagemaker-training``'s entry point (what the image's ``train`` command runs) with
``sagemaker-pytorch-training`` as the framework module, on a generated data set in a
temporary ``SAGEMAKER_BASE_DIR``, with the hyperparameters of the synthesized
``TrainSingleInstance`` step. Serving: ``sagemaker-pytorch-inference``'s ``HandlerService``
on ``sagemaker-inference``'s ``Transformer``, loaded and driven by TorchServe's own Python
worker code (``pipeline/local/torchserve.py``), and once behind the real TorchServe front end
over HTTP on 127.0.0.1 where Java is installed.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import common
import contract
import serving_model
import train
from colour_images import make_dataset
from sources import CODE_DIR
from pipeline.local.load_run import load_run, request_mix
from pipeline.local.torchserve import ModelWorker, front_end

pytestmark = pytest.mark.slow

CLASSES = ["001.Breed_A", "002.Breed_B", "003.Breed_C"]
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def step_hyperparameters() -> dict[str, Any]:
    """HyperParameters of the synthesized TrainSingleInstance step, as the service receives them."""
    from pipeline.definition import synth
    from pipeline.settings import load_settings

    document = synth(load_settings({}, environ={})).document
    step = next(step for step in document["Steps"] if step["Name"] == "TrainSingleInstance")
    return step["Arguments"]["HyperParameters"]


# What each reference of the step resolves to in this test: a small, fast job whose backbone
# weights come from the pretrained channel, as in the pipeline (random weights saved to a file).
PLAIN_VALUES = {"backbone": "resnet18", "image_size": 32, "pretrained_weights": "imagenet",
                "batch_size": 8, "epochs": 1, "learning_rate": 0.01, "flip": "true"}


def resolved(value: Any, name: str) -> str:
    """A step property's value as the service resolves it: ``Get`` to the plain value, ``Std:Join`` to the joined string."""
    if isinstance(value, str):
        return value
    assert name in PLAIN_VALUES, f"hyperparameter {name} of TrainSingleInstance is a reference this test has no value for: {value}"
    if "Std:Join" in value:
        join = value["Std:Join"]
        return join["On"].join(resolved(part, name) for part in join["Values"])
    assert set(value) == {"Get"}, value
    return str(PLAIN_VALUES[name])


def service_hyperparameters(step: dict[str, Any], **changes: Any) -> dict[str, str]:
    """hyperparameters.json as SageMaker writes it for the step; ``changes`` JSON-encoded, as the SDK encodes values."""
    written = {name: resolved(value, name) for name, value in step.items()}
    written.update({name: json.dumps(value) for name, value in changes.items()})
    return written


def toolkit_training_job(base: Path, data: Path, hyperparameters: dict[str, str]) -> subprocess.CompletedProcess:
    """One host of a training job under sagemaker-training, laid out in ``base`` as SageMaker lays out /opt/ml."""
    config = base / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "lo"}))
    (config / "inputdataconfig.json").write_text(json.dumps(
        {channel: {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated"} for channel in CHANNELS}))
    for channel in CHANNELS:
        shutil.copytree(data / channel, base / "input" / "data" / channel)
    shutil.copytree(CODE_DIR, base / "code", ignore=shutil.ignore_patterns("__pycache__"))  # the unpacked sourcedir.tar.gz
    for folder in ("model", "output/data", "output/intermediate"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    environment = {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
        "SAGEMAKER_BASE_DIR": str(base),
        "SAGEMAKER_TRAINING_MODULE": "sagemaker_pytorch_container.training:main",  # set by the PyTorch training image
        "SM_STUDIO_LOCAL_MODE": "true",  # one host: no wait for algo-1 to resolve
        **THREADS,
    }
    return subprocess.run([sys.executable, "-m", "sagemaker_training.cli.train"], env=environment, cwd=base,
                          capture_output=True, text=True, timeout=600)


CHANNELS = ("train", "valid", "pretrained")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three channels of the training step: images and a resnet18 state dict."""
    import torch
    from torchvision import models

    root = make_dataset(tmp_path_factory.mktemp("data"), classes=2, per_split={"train": 4, "valid": 2})
    (root / "pretrained").mkdir()
    torch.save(models.resnet18(weights=None).state_dict(), root / "pretrained" / "resnet18.pth")
    return root


def test_train_runs_under_the_training_toolkit_with_the_steps_hyperparameters(step_hyperparameters, data, tmp_path):
    """The model artifacts appear; a JSON ``false`` reaches train.py as the argument ``False`` and is read as false."""
    base = tmp_path / "opt" / "ml"
    job = toolkit_training_job(base, data, service_hyperparameters(step_hyperparameters, augment=False))
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-5000:]
    assert "Reporting training SUCCESS" in log and " --augment False " in log
    for name in ("model.pth", "classes.json", "model_info.json", "code/inference.py"):
        assert (base / "model" / name).is_file(), name
    info = json.loads((base / "model" / "model_info.json").read_text())
    assert (info["backbone"], info["image_size"], info["hyperparameters"]["augment"]) == ("resnet18", 32, False)
    assert (base / "output" / "success").is_file() and not (base / "output" / "failure").exists()


# ---------------------------------------------------------------- serving


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


PHOTO = Image.new("RGB", (48, 40), (180, 40, 30))
JPEG = encoded(PHOTO, "JPEG")
PNG = encoded(Image.new("RGBA", (30, 30), (0, 90, 200, 128)), "PNG")
B64 = base64.b64encode(JPEG).decode()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder as evaluate.py archives it (random resnet18 weights): the files train.py writes, the code
    it packs, and a stored fp32 serving artifact."""
    import torch

    folder = tmp_path_factory.mktemp("served") / "model"
    folder.mkdir()
    torch.manual_seed(0)
    network = common.build_model("resnet18", len(CLASSES)).eval()
    torch.save(network.state_dict(), folder / "model.pth")
    (folder / "classes.json").write_text(json.dumps(CLASSES))
    served = serving_model.served_network(network, torch.device("cpu"), "fp32", None, 32, optimize=False)
    artifact = serving_model.saved_artifact(served, folder)
    (folder / "model_info.json").write_text(json.dumps({"backbone": "resnet18", "image_size": 32, contract.SERVING_INFO_KEY: artifact}))
    train.copy_inference_code(folder / "code")
    return folder


@pytest.fixture(scope="module")
def worker(model_dir: Path) -> ModelWorker:
    return ModelWorker(model_dir, model_dir / "code", {"SAGEMAKER_PROGRAM": "inference.py"})


ACCEPTED = {
    "jpeg": ("image/jpeg", JPEG),
    "png": ("image/png", PNG),
    "x-image": ("application/x-image", JPEG),
    "base64 json": ("application/json", json.dumps({"image_base64": B64}).encode()),
    "json instances": ("application/json", json.dumps({"instances": [B64, {"image_base64": B64}], "top_k": 2}).encode()),
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_the_handler_service_answers_images_and_json_with_predictions(worker, name):
    content_type, body = ACCEPTED[name]
    status, payload, response_type = worker.invoke(body, {"Content-Type": content_type, "Accept": "application/json"})
    assert (status, response_type) == (200, "application/json"), payload
    predictions = json.loads(payload)["predictions"]
    assert len(predictions) == (2 if name == "json instances" else 1)
    assert all(entry["label"] in CLASSES for prediction in predictions for entry in prediction["top_k"])


REFUSED = {
    "text": ("text/plain", b"a dog", 415),
    "empty image": ("image/jpeg", b"", 400),
    "empty json": ("application/json", b"", 400),
    "truncated jpeg": ("image/jpeg", JPEG[: len(JPEG) // 2], 400),
    "malformed json": ("application/json", b'{"image_base64": ', 400),
    "non-utf-8 json": ("application/json", b'{"image_base64": "\xff\xfe"}', 400),
    "non-utf-8 csv": ("text/csv", b"\xff\xfe1,2,3", 400),
    "utf-8 csv": ("text/csv", b"1,2,3", 415),
}


@pytest.mark.parametrize("name", REFUSED)
def test_the_handler_service_refuses_bad_bodies_with_short_json(worker, name):
    content_type, body, expected = REFUSED[name]
    status, payload, response_type = worker.invoke(body, {"Content-Type": content_type, "Accept": "application/json"})
    assert (status, response_type) == (expected, "application/json"), payload
    document = json.loads(payload)
    assert document["status"] == expected and document["error"]
    assert b"Traceback" not in payload and len(payload) < 600


def test_custom_attributes_reach_the_script_through_the_toolkit(worker):
    status, payload, _ = worker.invoke(JPEG, {"Content-Type": "image/jpeg",
                                              "X-Amzn-SageMaker-Custom-Attributes": "top_k=1;return_logits=true"})
    prediction = json.loads(payload)["predictions"][0]
    assert status == 200 and len(prediction["top_k"]) == 1 and len(prediction["logits"]) == len(CLASSES)


def test_without_the_guard_the_toolkit_answers_a_non_utf8_json_body_with_a_traceback(tmp_path):
    """Pins why inference.py guards the toolkit: it decodes JSON and CSV bodies before input_fn sees them."""
    code = tmp_path / "model" / "code"
    code.mkdir(parents=True)
    (code / "plain.py").write_text(
        "def model_fn(model_dir):\n    return None\n\n"
        "def input_fn(body, content_type):\n    return body\n\n"
        "def predict_fn(data, model):\n    return data\n\n"
        "def output_fn(prediction, accept):\n    return 'ok', 'text/plain'\n")
    import sagemaker_inference.transformer as transformer

    guarded = transformer.Transformer.transform
    transformer.Transformer.transform = getattr(guarded, "toolkit_transform", guarded)
    try:
        plain = ModelWorker(tmp_path / "model", code, {"SAGEMAKER_PROGRAM": "plain.py"})
        status, payload, _ = plain.invoke(b'{"a": "\xff"}', {"Content-Type": "application/json"})
    finally:
        transformer.Transformer.transform = guarded
    assert status == 500 and b"Traceback" in payload and b"UnicodeDecodeError" in payload


# ---------------------------------------------------------------- the real TorchServe front end


def post(url: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe's front end needs Java 11+")
def test_torchserve_answers_concurrent_good_and_bad_requests_over_http_on_loopback(model_dir, tmp_path):
    """TorchServe started as the container's ``serve`` starts it, bound to 127.0.0.1, with one worker:
    a few hundred requests from 8 clients at once, every valid body answered and every bad one refused
    with its 4xx, none with a 5xx."""
    with front_end(model_dir, tmp_path, (JPEG, "image/jpeg"), {**THREADS, "SAGEMAKER_MODEL_SERVER_WORKERS": "1"}) as server:
        status, payload = post(f"{server.url}/invocations", JPEG, "image/jpeg")
        assert status == 200 and json.loads(payload)["predictions"][0]["top_k"][0]["label"] in CLASSES
        status, payload = post(f"{server.url}/invocations", b'{"image_base64": "\xff"}', "application/json")
        assert status == 400 and json.loads(payload)["status"] == 400 and b"Traceback" not in payload
        status, payload = post(f"{server.url}/invocations", b"a dog", "text/plain")
        assert status == 415 and b"Traceback" not in payload
        mix = request_mix(JPEG, PNG)
        result = load_run(server.url, mix, clients=8, requests_each=40)
    assert len(result.answers) == 320 and result.server_errors == 0
    assert [(a.name, a.status, a.expected) for a in result.wrong] == []
    assert {answer.name for answer in result.answers} == {request.name for request in mix}
    assert {request.expected for request in mix} == {200, 400, 413, 415}


# ---------------------------------------------------------------- local-run's training jobs


def test_an_unknown_hyperparameter_is_the_failure_reason_under_the_toolkit(step_hyperparameters, data, tmp_path):
    """local-run's training job runs the toolkit's entry point: the script's error is the failure file and the FailureReason."""
    import tarfile

    from pipeline.local.jobs import JobContext, JobFailed
    from pipeline.local.training_job import TrainingSpec, run_training_job
    from pipeline.local.s3 import LocalS3

    s3 = LocalS3(tmp_path / "s3")
    archive = tmp_path / "sourcedir.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(CODE_DIR.glob("*.py")):
            tar.add(path, arcname=path.name)
    s3.put("s3://bucket/code/sourcedir.tar.gz", archive.read_bytes())
    s3.upload(data / "train", "s3://bucket/data/train")
    hyperparameters = service_hyperparameters(step_hyperparameters, learning_rat=0.1)
    hyperparameters["sagemaker_submit_directory"] = json.dumps("s3://bucket/code/sourcedir.tar.gz")
    spec = TrainingSpec("job-1", {
        "HyperParameters": hyperparameters,
        "InputDataConfig": [{"ChannelName": "train", "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": "s3://bucket/data/train", "S3DataDistributionType": "FullyReplicated"}}}],
        "OutputDataConfig": {"S3OutputPath": "s3://bucket/out"},
        "ResourceConfig": {"InstanceCount": 1, "InstanceType": "ml.m5.large"}})
    ctx = JobContext(s3=s3, jobs_dir=tmp_path / "jobs", region="us-east-1", account="111122223333",
                     environment={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")},
                     failure_files=(contract.TRAINING_FAILURE_FILE, contract.PROCESSING_FAILURE_FILE), cpus_per_job=1)
    with pytest.raises(JobFailed) as failed:
        run_training_job(ctx, spec)
    line = "train.py: error: unrecognized arguments: --learning_rat 0.1 (see --help for the hyperparameter names)"
    assert (tmp_path / "jobs" / "job-1" / "algo-1" / "opt" / "ml" / "output" / "failure").read_text() == line
    assert str(failed.value) == f"AlgorithmError: {line}"
    log = (tmp_path / "jobs" / "job-1" / "logs" / "algo-1.log").read_text()
    assert "runs through the toolkit" in log and "Reporting training FAILURE" in log


def test_the_private_network_resolves_the_host_names_to_its_own_loopback(tmp_path):
    from pipeline.local.jobs import ProcessRegistry
    from pipeline.local.training_job import HostNetwork

    network = HostNetwork(["algo-1", "algo-2"], tmp_path, ProcessRegistry())
    problem = network.start()
    if problem:
        pytest.skip(f"no private network namespace here: {problem}")
    try:
        probe = ("import socket; s = socket.socket(); s.bind(('algo-1', 7777)); "
                 "print(socket.gethostbyname('algo-2'), s.getsockname()[1])")
        seen = subprocess.run([*network.prefix, sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    finally:
        network.stop()
    assert seen.stdout.split() == ["127.0.0.1", "7777"], seen.stderr
    assert network.holder is None


def test_without_namespace_tools_a_multi_host_job_names_why_it_uses_the_launcher(tmp_path, monkeypatch):
    from pipeline.local.jobs import ProcessRegistry
    from pipeline.local.training_job import LAUNCHER, HostNetwork, training_runner

    monkeypatch.setenv("PATH", str(tmp_path))
    runner, why = training_runner(["algo-1", "algo-2"], HostNetwork(["algo-1", "algo-2"], tmp_path, ProcessRegistry()))
    assert runner == LAUNCHER
    assert why.startswith("2 hosts need algo-1..2 to resolve and port 7777 free") and "unshare" in why and "not found" in why

"""The endpoint's optimized fp32 path (code/serving_model.py through inference.model_fn).

The traced, frozen network answers with the eager network's probabilities within 1e-4 on
generated and real images (scikit-learn's digit scans, scikit-learn's two sample photos);
a network that cannot be traced, or whose trace does not match, is served eager after one
log line; a batch of JSON instances is one forward pass; large JPEGs are decoded in draft mode.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import common
import inference
import serving_model
from contract import CALIBRATION_DIR, INFERENCE_PRECISION_ENV
from real_images import sample_photo, write_digits

IMAGE_SIZE = 64
TOLERANCE = serving_model.FP32_TOLERANCE


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"), per_class={"train": 0, "valid": 2, "test": 2}, size=48)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, digits) -> Path:
    """A resnet18 model directory, with real digit scans as its calibration sample, as train.py writes it."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    classes = sorted(p.name for p in (digits / "valid").iterdir())
    torch.save(common.build_model("resnet18", len(classes)).state_dict(), folder / "model.pth")
    (folder / "classes.json").write_text(json.dumps(classes))
    (folder / "model_info.json").write_text(json.dumps({"backbone": "resnet18", "image_size": IMAGE_SIZE}))
    (folder / CALIBRATION_DIR).mkdir()
    for position, image in enumerate(sorted((digits / "valid").glob("*/*.png"))[:8]):
        shutil.copyfile(image, folder / CALIBRATION_DIR / f"{position:04d}.png")
    return folder


@pytest.fixture(scope="module")
def model(model_dir) -> inference.Classifier:
    torch.set_num_threads(1)
    return inference.model_fn(str(model_dir))


def real_images(digits: Path) -> list[Image.Image]:
    scans = [Image.open(path).convert("RGB") for path in sorted((digits / "test").glob("*/*.png"))]
    return scans + [sample_photo("china.jpg"), sample_photo("flower.jpg")]


def generated_images(count: int = 4) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(1)
    return [Image.fromarray((torch.rand(70 + 10 * i, 90, 3, generator=generator) * 255).to(torch.uint8).numpy(), "RGB")
            for i in range(count)]


def eager_probabilities(model: inference.Classifier, images: list[Image.Image]) -> torch.Tensor:
    with torch.inference_mode():
        batch = torch.stack([model.transform(image) for image in images])
        return torch.softmax(model.network(batch), dim=1)


def served_probabilities(model: inference.Classifier, images: list[Image.Image]) -> torch.Tensor:
    request = inference.Request(images, top_k=len(model.classes), return_logits=False)
    return inference.prediction_of(request, model).probabilities


def test_model_fn_serves_the_traced_fp32_network(model):
    assert model.served.precision == "fp32" and model.served.runtime == "torchscript"
    assert isinstance(model.served.forward, torch.jit.ScriptModule)
    assert model.precision == "fp32"


@pytest.mark.parametrize("kind", ["generated", "real"])
def test_the_optimized_network_gives_the_eager_probabilities(model, digits, kind):
    images = generated_images() if kind == "generated" else real_images(digits)
    served, eager = served_probabilities(model, images), eager_probabilities(model, images)
    assert served.shape == eager.shape == (len(images), len(model.classes))
    assert (served - eager).abs().max().item() <= TOLERANCE


def test_an_image_request_answers_with_the_eager_probabilities(model):
    body = jpeg_bytes(sample_photo("flower.jpg"))
    status, answer, _ = inference.handle(body, "image/jpeg", None, {"top_k": "3"}, model)
    assert status == 200
    top = json.loads(answer)["predictions"][0]["top_k"]
    decoded = common.image_from_bytes(body, draft_side=inference.DRAFT_FACTOR * common.resize_size(IMAGE_SIZE))
    assert decoded.size == (320, 214)  # 640x427 at DCT scale 1/2
    expected = eager_probabilities(model, [decoded])[0]
    assert [entry["index"] for entry in top] == expected.topk(3).indices.tolist()
    for entry in top:
        assert abs(entry["probability"] - expected[entry["index"]].item()) <= TOLERANCE


def test_json_instances_run_as_one_batched_forward_pass(model, digits):
    images = real_images(digits)[:5]
    body = json.dumps({"instances": [base64.b64encode(jpeg_bytes(image)).decode() for image in images]})
    batches: list[int] = []
    forward = model.served.forward
    counting = dataclasses.replace(model, served=dataclasses.replace(
        model.served, forward=lambda batch: batches.append(len(batch)) or forward(batch)))
    status, answer, _ = inference.handle(body.encode(), "application/json", None, None, counting)
    assert status == 200 and len(json.loads(answer)["predictions"]) == 5
    assert batches == [5]


class DataDependent(nn.Module):
    """Takes one branch or the other by the input's mean: a trace records only the branch it saw."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(3, classes), nn.Linear(3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        return self.first(pooled) if x.mean() > 0 else self.second(pooled)


class ReturnsText(nn.Module):
    """Its output is not a tensor, which TorchScript's tracer refuses."""

    def forward(self, x: torch.Tensor):
        return {"logits": x.mean(dim=(2, 3)), "note": "not a tensor"}


@pytest.mark.parametrize("network, reason", [(DataDependent(), "differ from the eager network"),
                                             (ReturnsText(), "could not be prepared")])
def test_a_network_that_cannot_be_traced_is_served_eager_after_one_log_line(network, reason, caplog):
    torch.manual_seed(0)
    batch = torch.cat([torch.ones(1, 3, 8, 8), -torch.ones(1, 3, 8, 8)])
    with caplog.at_level(logging.INFO, logger=serving_model.log.name):
        served = serving_model.optimized_fp32(network.eval(), batch)
    assert (served.precision, served.runtime) == ("fp32", "eager")
    assert served.forward is network
    records = [record for record in caplog.records if record.name == serving_model.log.name]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "serving the eager network" in records[0].getMessage() and reason in served.note


def test_an_unknown_precision_in_the_environment_is_refused_by_name(model_dir, monkeypatch):
    monkeypatch.setenv(INFERENCE_PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match=f"{INFERENCE_PRECISION_ENV}='fp16'.*fp32, int8"):
        inference.model_fn(str(model_dir))


def test_large_jpegs_are_decoded_in_draft_mode_close_to_a_full_decode(model):
    photo = sample_photo("china.jpg")
    large = jpeg_bytes(photo.resize((photo.width * 4, photo.height * 4), Image.BICUBIC))
    side = inference.DRAFT_FACTOR * common.resize_size(IMAGE_SIZE)
    full = common.image_from_bytes(large)
    draft = common.image_from_bytes(large, draft_side=side)
    assert (full.size, draft.size) == ((2560, 1708), (320, 214))  # DCT scale 1/8
    difference = (model.transform(draft) - model.transform(full)).abs().mean().item()
    assert difference < 0.03, difference  # normalized units: about 0.5% of the pixel range
    small = jpeg_bytes(photo)  # 640x427: no DCT scale keeps both sides at 320 or more
    assert common.image_from_bytes(small, draft_side=320).size == (640, 427)
    png = io.BytesIO()
    photo.resize((1280, 854)).save(png, "PNG")
    assert common.image_from_bytes(png.getvalue(), draft_side=side).size == (1280, 854)  # only JPEGs have draft mode

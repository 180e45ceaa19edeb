"""code/inference.py: round trips on real JPEG/PNG bytes and a clear refusal for each bad input."""
from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from ts.context import Context, RequestProcessor

import common
import inference
from sources import CODE_DIR

CLASSES = ["001.Breed_A", "002.Breed_B", "003.Breed_C", "004.Breed_D"]
IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    network = common.build_model("resnet18", len(CLASSES))
    torch.save(network.state_dict(), folder / "model.pth")
    (folder / "classes.json").write_text(json.dumps(CLASSES))
    (folder / "model_info.json").write_text(json.dumps({"backbone": "resnet18", "image_size": IMAGE_SIZE}))
    return folder


@pytest.fixture(scope="module")
def model(model_dir) -> inference.Classifier:
    return inference.model_fn(str(model_dir))


def photo(seed: int, size=(90, 70)) -> Image.Image:
    torch.manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def network(model_dir) -> torch.nn.Module:
    return common.load_model_dir(model_dir)[0]


def direct_logits(network: torch.nn.Module, images: list[Image.Image]) -> torch.Tensor:
    """The network's output computed here, without inference.py."""
    transform = common.eval_transform(IMAGE_SIZE)
    with torch.no_grad():
        return network(torch.stack([transform(image.convert("RGB")) for image in images]))


def ok(response: tuple[int, bytes, str]) -> list[dict]:
    status, body, content_type = response
    assert (status, content_type) == (200, "application/json"), body
    return json.loads(body)["predictions"]


def probabilities_by_index(prediction: dict) -> dict[int, float]:
    return {entry["index"]: entry["probability"] for entry in prediction["top_k"]}


def test_model_fn_rebuilds_the_network_from_model_info(model):
    assert model.classes == CLASSES
    assert model.info["backbone"] == "resnet18"
    assert model.network.fc.out_features == len(CLASSES)
    assert not model.network.training
    assert next(model.network.parameters()).device == model.device


def test_model_fn_names_a_missing_file(tmp_path, model_dir):
    with pytest.raises(FileNotFoundError, match="classes.json is missing: is .* the output of train.py"):
        inference.model_fn(str(tmp_path))
    for name in ("classes.json", "model_info.json"):  # no serving artifact either: the weights are needed
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="model.pth is missing"):
        inference.model_fn(str(tmp_path))


def test_jpeg_round_trip_gives_the_networks_top_k(model, network):
    image_bytes = encoded(photo(1), "JPEG")
    [prediction] = ok(inference.handle(image_bytes, "image/jpeg", "application/json", None, model))
    expected = torch.softmax(direct_logits(network, [Image.open(io.BytesIO(image_bytes))]), dim=1)[0]

    entries = prediction["top_k"]
    assert len(entries) == len(CLASSES)  # the default of 5 is capped at the number of classes
    assert [e["probability"] for e in entries] == sorted((e["probability"] for e in entries), reverse=True)
    for entry in entries:
        assert entry["label"] == CLASSES[entry["index"]]
        assert entry["probability"] == pytest.approx(expected[entry["index"]].item(), abs=1e-5)
    assert sum(e["probability"] for e in entries) == pytest.approx(1.0, abs=1e-5)
    assert "logits" not in prediction


def test_png_with_transparency_is_read_as_if_on_white(model):
    rgba = photo(2).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    on_white = Image.new("RGB", rgba.size, (255, 255, 255))
    on_white.paste(rgba, mask=rgba.getchannel("A"))
    [transparent] = ok(inference.handle(encoded(rgba, "PNG"), "image/png", None, None, model))
    [flattened] = ok(inference.handle(encoded(on_white, "PNG"), "application/x-image", "*/*", None, model))
    assert probabilities_by_index(transparent) == pytest.approx(probabilities_by_index(flattened), abs=1e-6)


def test_base64_json_and_a_batch_give_the_same_answers_as_single_images(model):
    images = [encoded(photo(seed), "JPEG") for seed in (3, 4, 5)]
    singles = [ok(inference.handle(data, "image/jpeg", None, None, model))[0] for data in images]
    [one] = ok(inference.handle(json.dumps({"image_base64": b64(images[0])}).encode(), "application/json", None, None, model))
    batch_body = {"instances": [b64(images[0]), {"image_base64": b64(images[1])}, "data:image/jpeg;base64," + b64(images[2])]}
    batch = ok(inference.handle(json.dumps(batch_body).encode(), "application/json; charset=utf-8", None, None, model))

    assert probabilities_by_index(one) == pytest.approx(probabilities_by_index(singles[0]), abs=1e-6)
    assert len(batch) == 3
    for got, single in zip(batch, singles):
        assert probabilities_by_index(got) == pytest.approx(probabilities_by_index(single), abs=1e-5)


def test_top_k_and_logits_on_request(model, network):
    image_bytes = encoded(photo(6), "JPEG")
    [by_query] = ok(inference.handle(image_bytes, "image/jpeg", None, {"top_k": ["2"], "return_logits": ["true"]}, model))
    assert len(by_query["top_k"]) == 2
    logits = direct_logits(network, [Image.open(io.BytesIO(image_bytes))])[0]
    assert by_query["logits"] == pytest.approx(logits.tolist(), abs=1e-4)
    assert by_query["top_k"][0]["index"] == int(logits.argmax())

    body = json.dumps({"image_base64": b64(image_bytes), "top_k": 1, "return_logits": False}).encode()
    [by_body] = ok(inference.handle(body, "application/json", None, {"top_k": "3", "return_logits": "true"}, model))
    assert len(by_body["top_k"]) == 1 and "logits" not in by_body


def pixel_bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, in a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


JPEG = encoded(photo(7), "JPEG")


def as_json(document) -> bytes:
    return json.dumps(document).encode()


BAD_REQUESTS = {
    "unsupported type": (JPEG, "text/plain", None, None, 415, "Content-Type 'text/plain' is not supported"),
    "no content type": (JPEG, None, None, None, 415, "Content-Type missing"),
    "unacceptable accept": (JPEG, "image/jpeg", "text/csv", None, 406, "Accept 'text/csv'"),
    "empty body": (b"", "image/jpeg", None, None, 400, "body is empty"),
    "text as jpeg": (b"a poodle, probably", "image/jpeg", None, None, 400, "not an image"),
    "truncated jpeg": (JPEG[: len(JPEG) // 2], "image/jpeg", None, None, 400, "truncated"),
    "too many pixels": (pixel_bomb_png(8000, 8000), "image/png", None, None, 413, "64,000,000 pixels"),
    "too many pixels together": (as_json({"instances": [b64(pixel_bomb_png(6000, 6000))] * 3}), "application/json", None, None, 413, "together"),
    "body too large": (b"\xff" * (inference.MAX_BODY_BYTES + 1), "image/jpeg", None, None, 413, "above the limit"),
    "url as body": (b"https://example.com/dog.jpg", "image/jpeg", None, None, 400, "does not fetch URLs"),
    "invalid json": (b'{"image_base64": ', "application/json", None, None, 400, "not valid JSON"),
    "json list": (b"[1, 2]", "application/json", None, None, 400, "must be an object"),
    "neither field": (as_json({"top_k": 2}), "application/json", None, None, 400, "exactly one of"),
    "both fields": (as_json({"image_base64": b64(JPEG), "instances": [b64(JPEG)]}), "application/json", None, None, 400, "exactly one of"),
    "unknown field": (as_json({"image_base64": b64(JPEG), "topk": 2}), "application/json", None, None, 400, "unknown field(s) topk"),
    "url field": (as_json({"url": "http://169.254.169.254/latest/meta-data"}), "application/json", None, None, 400, "does not fetch URLs"),
    "url instance": (as_json({"instances": ["https://example.com/dog.jpg"]}), "application/json", None, None, 400, "instances[0]: this endpoint does not fetch URLs"),
    "bad base64": (as_json({"image_base64": "not base64!"}), "application/json", None, None, 400, "image_base64 is not valid base64"),
    "base64 of text": (as_json({"instances": [b64(JPEG), b64(b"hello")]}), "application/json", None, None, 400, "instances[1]: not an image"),
    "base64 not a string": (as_json({"image_base64": 12}), "application/json", None, None, 400, "must be a base64 string, got int"),
    "empty instances": (as_json({"instances": []}), "application/json", None, None, 400, "non-empty list"),
    "too many instances": (as_json({"instances": [b64(JPEG)] * (inference.MAX_INSTANCES + 1)}), "application/json", None, None, 413, "above the limit of 32"),
    "instance with other fields": (as_json({"instances": [{"b64": b64(JPEG)}]}), "application/json", None, None, 400, "instances[0] must be"),
    "top_k zero": (as_json({"image_base64": b64(JPEG), "top_k": 0}), "application/json", None, None, 400, "top_k must be a whole number"),
    "top_k boolean": (as_json({"image_base64": b64(JPEG), "top_k": True}), "application/json", None, None, 400, "top_k must be a whole number"),
    "top_k in query": (JPEG, "image/jpeg", None, {"top_k": "many"}, 400, "'many' (in the query string)"),
    "return_logits maybe": (as_json({"image_base64": b64(JPEG), "return_logits": "maybe"}), "application/json", None, None, 400, "return_logits must be true or false"),
    "unknown query": (JPEG, "image/jpeg", None, {"topk": "2"}, 400, "unknown query parameter(s) topk"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_input_gets_its_status_and_a_short_json_error(model, case):
    body, content_type, accept, query, status, words = case
    got_status, got_body, got_type = inference.handle(body, content_type, accept, query, model)
    assert (got_status, got_type) == (status, "application/json"), got_body
    document = json.loads(got_body)
    assert document["status"] == status
    assert words in document["error"]
    assert "Traceback" not in document["error"] and len(document["error"]) < 300


def test_container_functions_raise_the_status_without_a_context():
    with pytest.raises(inference.RequestError) as caught:
        inference.input_fn(JPEG, "text/plain")
    assert caught.value.status_code == 415 and "not supported" in caught.value.message


def TorchServeContext(headers: dict[str, str]) -> Context:
    """The model server's own request context for one request, as ts.service.Service sets it up."""
    context = Context("model", "/opt/ml/model", None, 1, None, "0.12.0")
    context.request_processor = [RequestProcessor(dict(headers))]
    return context


def status_of(context: Context) -> tuple[int, str | None]:
    return context.get_response_status(0)


def run_container_functions(model, body, content_type: str, accept: str, context: Context) -> tuple[str, str]:
    data = inference.input_fn(body, content_type, context)
    prediction = inference.predict_fn(data, model, context)
    return inference.output_fn(prediction, accept, context)


def test_container_functions_honour_custom_attributes(model):
    body = json.dumps({"image_base64": b64(JPEG)})  # the toolkit hands JSON bodies over as text
    context = TorchServeContext({"Content-Type": "application/json", "X-Amzn-SageMaker-Custom-Attributes": "top_k=2;return_logits=true"})
    text, content_type = run_container_functions(model, body, "application/json", "application/json", context)
    [prediction] = json.loads(text)["predictions"]
    assert content_type == "application/json" and status_of(context) == (200, None)
    assert len(prediction["top_k"]) == 2 and len(prediction["logits"]) == len(CLASSES)


@pytest.mark.parametrize("body, content_type, accept, status", [
    (b"", "image/jpeg", "application/json", 400),
    (pixel_bomb_png(8000, 8000), "image/png", "application/json", 413),
    (JPEG, "text/plain", "application/json", 415),
    (JPEG, "image/jpeg", "text/csv", 406),
])
def test_container_functions_set_the_status_and_return_a_clean_body(model, body, content_type, accept, status):
    context = TorchServeContext({})
    text, response_type = run_container_functions(model, bytearray(body), content_type, accept, context)
    assert response_type == "application/json"
    assert status_of(context)[0] == status
    document = json.loads(text)
    assert document["status"] == status and document["error"] == status_of(context)[1]


class ForwardFails(torch.nn.Module):
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.fixture
def failing_model(model) -> inference.Classifier:
    return inference.Classifier(ForwardFails(), model.classes, model.info, model.device, model.transform)


def assert_short_internal_error(text: str, stage: str) -> None:
    document = json.loads(text)
    assert document == {"error": f"internal error while {stage}; see the endpoint's log", "status": 500}


def assert_logged_with_traceback(caplog, exception_text: str) -> None:
    [record] = [r for r in caplog.records if r.exc_info is not None]
    assert record.levelname == "ERROR" and exception_text in str(record.exc_info[1])


def test_a_failing_forward_gives_a_short_500_through_the_context_and_logs_the_traceback(failing_model, caplog):
    context = TorchServeContext({})
    with caplog.at_level("INFO", logger="inference"):
        text, response_type = run_container_functions(failing_model, JPEG, "image/jpeg", "application/json", context)
    assert response_type == "application/json"
    assert_short_internal_error(text, "predicting")
    assert status_of(context) == (500, json.loads(text)["error"])
    assert "out of memory" not in text and "Traceback" not in text
    assert_logged_with_traceback(caplog, "CUDA out of memory")


def test_a_failing_forward_raises_a_500_request_error_without_a_context(failing_model, caplog):
    data = inference.input_fn(JPEG, "image/jpeg")
    with caplog.at_level("INFO", logger="inference"), pytest.raises(inference.RequestError) as caught:
        inference.predict_fn(data, failing_model)
    assert caught.value.status_code == 500 and caught.value.__suppress_context__
    assert_logged_with_traceback(caplog, "CUDA out of memory")


def test_a_failing_forward_gives_a_500_from_the_local_handler(failing_model):
    status, body, content_type = inference.handle(JPEG, "image/jpeg", None, None, failing_model)
    assert (status, content_type) == (500, "application/json")
    assert_short_internal_error(body.decode(), "predicting")


def test_a_prediction_with_fewer_class_names_than_outputs_gives_a_short_500_from_output_fn(caplog):
    """classes.json out of step with the weights: the network answers, naming its best class fails."""
    probabilities = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    prediction = inference.Prediction(probabilities, probabilities.log(), ["001.Breed_A"], top_k=1, return_logits=False)
    context = TorchServeContext({})
    with caplog.at_level("INFO", logger="inference"):
        text, response_type = inference.output_fn(prediction, "application/json", context)
    assert response_type == "application/json"
    assert_short_internal_error(text, "writing the response")
    assert status_of(context)[0] == 500
    assert_logged_with_traceback(caplog, "list index out of range")


@pytest.mark.slow
def test_the_packed_code_folder_imports_its_siblings(model_dir, tmp_path):
    """As in the container: model_dir/code/inference.py loaded by path, common and contract beside it."""
    packed = tmp_path / "model"
    shutil.copytree(model_dir, packed)
    (packed / "code").mkdir()
    for name in ("inference.py", "common.py", "contract.py", "serving_model.py"):
        shutil.copy(CODE_DIR / name, packed / "code" / name)
    (tmp_path / "request.jpg").write_bytes(JPEG)
    script = f"""
import importlib.util, json, sys
assert not any(p.endswith("code") for p in sys.path)
spec = importlib.util.spec_from_file_location("inference", {str(packed / 'code' / 'inference.py')!r})
module = sys.modules["inference"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
model = module.model_fn({str(packed)!r})
status, body, _ = module.handle(open({str(tmp_path / 'request.jpg')!r}, "rb").read(), "image/jpeg", None, None, model)
print(status, json.loads(body)["predictions"][0]["top_k"][0]["label"], sys.modules["common"].__file__)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    status, label, common_file = done.stdout.split()
    assert status == "200" and label in CLASSES
    assert Path(common_file) == packed / "code" / "common.py"

"""Endpoint latency on CPU: the naive eager baseline, the handler's fp32 path and its int8 path.

resnet50 at 224 px; one real 500x375 JPEG (scikit-learn's sample photo ``china.jpg``, resized)
sent through input_fn -> predict_fn -> output_fn as the SageMaker container calls them: batch 1
as an image/jpeg body, batch 8 as JSON ``instances``. The naive baseline is what a plain
script does: eager network under ``torch.no_grad``, ``Resize((224, 224))``, ``ToTensor``, no
normalisation. For each thread count (one run, cases taking turns so a busy spell on a shared
machine falls on all alike) it prints CPU ms and wall ms per image (p50, p95), the images
per second of a batch of 8, and model_fn's time.

The network has random backbone weights (no pretrained weights can be downloaded here) and
a classifier head trained on the backbone's features of real images: scikit-learn's digit
scans (tests/real_images.py), 10 classes. Top-1 agreement of int8 with fp32 is measured on
held-out scans and on crops of scikit-learn's two sample photos; the head's test accuracy in
both precisions is printed too.

    .venv/bin/python benchmarks/inference_latency.py [--repeats 20] [--threads 1 2]
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "code"), str(ROOT / "tests")]

import common  # noqa: E402
import contract  # noqa: E402
import inference  # noqa: E402
import train  # noqa: E402
from real_images import sample_photo, write_digits  # noqa: E402

IMAGE_SIZE = 224
PHOTO_SIZE = (500, 375)


def machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, quantized engine {torch.backends.quantized.engine}"


def load_average() -> str:
    return ", ".join(f"{value:.1f}" for value in os.getloadavg())


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def photo_crops(count: int) -> list[Image.Image]:
    """Crops of the two real sample photos at several places and scales."""
    rng = np.random.default_rng(0)
    photos = [sample_photo("china.jpg"), sample_photo("flower.jpg")]
    crops = []
    for index in range(count):
        photo = photos[index % 2]
        side = int(rng.integers(120, min(photo.size)))
        x, y = int(rng.integers(0, photo.width - side)), int(rng.integers(0, photo.height - side))
        crops.append(photo.crop((x, y, x + side, y + side)))
    return crops


# ---------------------------------------------------------------- the model

def head_trained_on(backbone: torch.nn.Module, images: list[Image.Image], labels: list[int], classes: int) -> torch.nn.Linear:
    """A linear head fitted (full-batch LBFGS) to the backbone's pooled features of ``images``."""
    transform = common.eval_transform(IMAGE_SIZE)
    fc = backbone.fc
    backbone.fc = torch.nn.Identity()
    with torch.inference_mode():
        features = torch.cat([backbone(torch.stack([transform(image) for image in images[i:i + 16]]))
                              for i in range(0, len(images), 16)])
    backbone.fc = fc
    features = features.clone()
    mean, std = features.mean(0), features.std(0) + 1e-6
    head = torch.nn.Linear(features.shape[1], classes)
    target = torch.tensor(labels)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head((features - mean) / std), target) + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():  # fold the feature standardisation into the layer
        head.weight /= std
        head.bias -= (head.weight * mean).sum(1)
    return head


def write_model_dir(folder: Path, digits: Path) -> list[str]:
    """model.pth (random resnet50 backbone, head fitted on digit scans), classes, info and calibration/."""
    torch.manual_seed(0)
    classes = sorted(p.name for p in (digits / "train").iterdir())
    network = common.build_model("resnet50", len(classes)).eval()
    paths = sorted((digits / "train").glob("*/*.png"))
    images = [Image.open(path).convert("RGB") for path in paths]
    network.fc = head_trained_on(network, images, [classes.index(path.parent.name) for path in paths], len(classes))
    torch.save(network.state_dict(), folder / contract.MODEL_FILE)
    (folder / contract.CLASSES_FILE).write_text(json.dumps(classes))
    (folder / contract.MODEL_INFO_FILE).write_text(json.dumps({"backbone": "resnet50", "image_size": IMAGE_SIZE}))
    train.write_calibration_sample(folder / contract.CALIBRATION_DIR,
                                   train.calibration_sample(datasets.ImageFolder(str(digits / "valid"))))
    return classes


def loaded(model_dir: Path, precision: str) -> tuple[float, inference.Classifier]:
    os.environ[contract.INFERENCE_PRECISION_ENV] = precision
    started = time.perf_counter()
    model = inference.model_fn(str(model_dir))
    seconds = time.perf_counter() - started
    assert model.precision == precision, model.served.note
    return seconds, model


# ---------------------------------------------------------------- the cases

NAIVE_TRANSFORM = transforms.Compose([transforms.Resize((IMAGE_SIZE, IMAGE_SIZE)), transforms.ToTensor()])


def naive_request(network: torch.nn.Module, bodies: list[bytes]) -> None:
    with torch.no_grad():
        batch = torch.stack([NAIVE_TRANSFORM(Image.open(io.BytesIO(body)).convert("RGB")) for body in bodies])
        torch.softmax(network(batch), dim=1)


def handler_request(model: inference.Classifier, body: bytes | str, content_type: str) -> None:
    data = inference.input_fn(body, content_type)
    inference.output_fn(inference.predict_fn(data, model), "application/json")


def timings(cases: dict[str, Callable[[], None]], repeats: int, warmup: int = 3) -> dict[str, np.ndarray]:
    """Per case, (wall ms, CPU ms) of each timed call; the cases take turns."""
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for round_ in range(warmup + repeats):
        for name, call in cases.items():
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            if round_ >= warmup:
                rows[name].append(((time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000))
    return {name: np.array(values) for name, values in rows.items()}


def agreement(first: inference.Classifier, second: inference.Classifier, images: list[Image.Image]) -> float:
    request = inference.Request(images, top_k=1, return_logits=False)
    one = inference.prediction_of(request, first).probabilities.argmax(1)
    two = inference.prediction_of(request, second).probabilities.argmax(1)
    return (one == two).float().mean().item()


def accuracy(model: inference.Classifier, images: list[Image.Image], labels: list[int]) -> float:
    request = inference.Request(images, top_k=1, return_logits=False)
    predicted = inference.prediction_of(request, model).probabilities.argmax(1)
    return (predicted == torch.tensor(labels)).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--train-per-class", type=int, default=30)
    parser.add_argument("--test-per-class", type=int, default=15)
    args = parser.parse_args()
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"

    photo = sample_photo("china.jpg").resize(PHOTO_SIZE, Image.BICUBIC)
    jpeg = jpeg_bytes(photo)
    batch_of_8 = json.dumps({"instances": [base64.b64encode(jpeg).decode()] * 8})
    print(f"machine: {machine()}; load average at the start {load_average()}")
    print(f"request: one {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEG of {len(jpeg) / 1024:.0f} KiB (sample photo); resnet50 at "
          f"{IMAGE_SIZE} px; {args.repeats} timed requests per case after 3 warm-up ones, cases taking turns\n")

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        torch.set_num_threads(max(args.threads))
        split = {"train": args.train_per_class, "valid": 10, "test": args.test_per_class}
        digits = write_digits(scratch / "digits", per_class=split, size=IMAGE_SIZE)
        (scratch / "model").mkdir()
        started = time.perf_counter()
        classes = write_model_dir(scratch / "model", digits)
        print(f"fitted the head on {len(classes) * args.train_per_class} digit scans in {time.perf_counter() - started:.0f} s")
        naive = common.build_model("resnet50", len(classes))
        naive.load_state_dict(torch.load(scratch / "model" / contract.MODEL_FILE, weights_only=True))
        naive.eval()

        rows = []
        for threads in args.threads:
            torch.set_num_threads(threads)
            fp32_seconds, fp32 = loaded(scratch / "model", "fp32")
            int8_seconds, int8 = loaded(scratch / "model", "int8")
            cases = {
                ("naive eager", 1): lambda: naive_request(naive, [jpeg]),
                ("naive eager", 8): lambda: naive_request(naive, [jpeg] * 8),
                ("handler fp32", 1): lambda: handler_request(fp32, jpeg, "image/jpeg"),
                ("handler fp32", 8): lambda: handler_request(fp32, batch_of_8, "application/json"),
                ("handler int8", 1): lambda: handler_request(int8, jpeg, "image/jpeg"),
                ("handler int8", 8): lambda: handler_request(int8, batch_of_8, "application/json"),
            }
            measured = timings(cases, args.repeats)
            load_seconds = {"naive eager": None, "handler fp32": fp32_seconds, "handler int8": int8_seconds}
            naive_cpu = np.median(measured[("naive eager", 1)][:, 1])
            for path in ("naive eager", "handler fp32", "handler int8"):
                one, eight = measured[(path, 1)], measured[(path, 8)]
                cpu50, cpu95 = np.percentile(one[:, 1], [50, 95])
                wall50, wall95 = np.percentile(one[:, 0], [50, 95])
                rows.append((threads, path, cpu50, cpu95, wall50, wall95, cpu50 / naive_cpu,
                             8000 / np.median(eight[:, 0]), np.median(eight[:, 1]) / 8, load_seconds[path]))
            print(f"{threads} thread(s) done; load average {load_average()}")

        torch.set_num_threads(max(args.threads))
        test_paths = sorted((digits / "test").glob("*/*.png"))
        scans = [Image.open(path).convert("RGB") for path in test_paths]
        labels = [classes.index(path.parent.name) for path in test_paths]
        crops = photo_crops(100)
        _, fp32 = loaded(scratch / "model", "fp32")
        _, int8 = loaded(scratch / "model", "int8")
        eager = inference.Classifier(fp32.network, fp32.classes, fp32.info, fp32.device, fp32.transform)
        eager_probabilities = inference.prediction_of(inference.Request(scans[:20], 1, False), eager).probabilities
        fp32_probabilities = inference.prediction_of(inference.Request(scans[:20], 1, False), fp32).probabilities
        print()

    header = (f"{'threads':>7} {'path':<13} {'CPU ms/img p50':>14} {'p95':>6} {'wall ms/img p50':>15} {'p95':>6} "
              f"{'CPU vs naive':>12} {'batch 8 img/s':>13} {'batch 8 CPU ms/img':>18} {'model_fn s':>10}")
    print(header)
    print("-" * len(header))
    for threads, path, cpu50, cpu95, wall50, wall95, ratio, rate, cpu8, seconds in rows:
        load = f"{seconds:.1f}" if seconds is not None else "-"
        print(f"{threads:>7} {path:<13} {cpu50:>14.1f} {cpu95:>6.1f} {wall50:>15.1f} {wall95:>6.1f} {ratio:>11.2f}x "
              f"{rate:>13.1f} {cpu8:>18.1f} {load:>10}")
    print(f"\ntop-1 agreement, int8 with fp32: {agreement(fp32, int8, scans):.1%} of {len(scans)} held-out digit scans, "
          f"{agreement(fp32, int8, crops):.1%} of {len(crops)} crops of the two sample photos")
    print(f"digit test accuracy: fp32 {accuracy(fp32, scans, labels):.1%}, int8 {accuracy(int8, scans, labels):.1%} "
          f"(random backbone, fitted head: a check of int8, not of the model)")
    print(f"handler fp32 vs eager: largest probability difference {(fp32_probabilities - eager_probabilities).abs().max().item():.1e}")
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()

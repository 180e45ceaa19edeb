"""Latency of the endpoint handler (code/inference.py) on CPU: model_fn load time and p50/p95 per request.

A resnet50 with random weights and 133 classes, and one synthetic 500x375 JPEG (about
the size of a dogImages photo), sent through input_fn -> predict_fn -> output_fn the
way the SageMaker container calls them: batch 1 as an image/jpeg body, batch 8 as
application/json instances. Prints a table (milliseconds): wall-clock p50/p95 per
request, and the CPU time the process spent on it, which a busy shared machine
disturbs less (with one thread it is the compute one core needs).

    .venv/bin/python benchmarks/inference_latency.py [--repeats 30] [--threads 2]
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

import numpy as np
import torch
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))

import common  # noqa: E402
import inference  # noqa: E402

NUM_CLASSES = 133
PHOTO_SIZE = (500, 375)


def machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load}"


def photo_jpeg() -> bytes:
    """A photo-like JPEG: smooth shapes plus fine noise, so it compresses like a real picture."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:PHOTO_SIZE[1], 0:PHOTO_SIZE[0]]
    base = np.stack([128 + 90 * np.sin(x / 37), 128 + 90 * np.cos(y / 23), 128 + 60 * np.sin((x + y) / 51)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB").filter(ImageFilter.GaussianBlur(0.6))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_model_dir(folder: Path) -> None:
    torch.save(common.build_model("resnet50", NUM_CLASSES).state_dict(), folder / "model.pth")
    (folder / "classes.json").write_text(json.dumps([f"{i + 1:03d}.Breed_{i + 1}" for i in range(NUM_CLASSES)]))
    (folder / "model_info.json").write_text(json.dumps({"backbone": "resnet50", "image_size": common.DEFAULT_IMAGE_SIZE}))


def timed(function, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args)
    return (time.perf_counter() - start) * 1000, result


def one_request(model, body, content_type: str) -> tuple[float, float, float, float]:
    """Wall milliseconds of input_fn, predict_fn, output_fn, and CPU milliseconds of all three."""
    cpu_start = time.process_time()
    t_in, data = timed(inference.input_fn, body, content_type)
    t_predict, prediction = timed(inference.predict_fn, data, model)
    t_out, _ = timed(inference.output_fn, prediction, "application/json")
    return t_in, t_predict, t_out, (time.process_time() - cpu_start) * 1000


def latencies(model, cases: dict[str, tuple], repeats: int, warmup: int = 3) -> dict[str, np.ndarray]:
    """Per case, rows of one_request's timings; the cases take turns,
    so a busy spell on a shared machine falls on all of them alike."""
    rows: dict[str, list[tuple[float, ...]]] = {name: [] for name in cases}
    for round_ in range(warmup + repeats):
        for name, (body, content_type, _) in cases.items():
            timing = one_request(model, body, content_type)
            if round_ >= warmup:
                rows[name].append(timing)
    return {name: np.array(values) for name, values in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    jpeg = photo_jpeg()
    with tempfile.TemporaryDirectory() as folder:
        write_model_dir(Path(folder))
        load_times = []
        for _ in range(3):
            elapsed, model = timed(inference.model_fn, folder)
            load_times.append(elapsed)

    batch_of_8 = json.dumps({"instances": [base64.b64encode(jpeg).decode()] * 8})
    cases = {
        "batch 1 (image/jpeg)": (jpeg, "image/jpeg", 1),
        "batch 8 (JSON instances)": (batch_of_8, "application/json", 8),
    }
    print(f"machine: {machine()}")
    print(f"request: one {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEG of {len(jpeg) / 1024:.0f} KiB; resnet50, {NUM_CLASSES} classes, "
          f"random weights; {args.repeats} timed requests per case after 3 warm-up ones, cases taking turns\n")
    print(f"model_fn load: first {load_times[0]:.0f} ms, then {np.median(load_times[1:]):.0f} ms\n")
    header = (f"{'case':<26} {'p50 ms':>8} {'p95 ms':>8} {'per image p50':>14} {'images/s':>9} {'CPU ms p50':>11}"
              "   p50 of input_fn / predict_fn / output_fn")
    print(header)
    print("-" * len(header))
    for name, stages in latencies(model, cases, args.repeats).items():
        images = cases[name][2]
        p50, p95 = np.percentile(stages[:, :3].sum(axis=1), [50, 95])
        cpu = np.median(stages[:, 3])
        parts = " / ".join(f"{value:.1f}" for value in np.median(stages[:, :3], axis=0))
        print(f"{name:<26} {p50:>8.1f} {p95:>8.1f} {p50 / images:>14.1f} {images * 1000 / p50:>9.1f} {cpu:>11.1f}   {parts}")
    print(f"\nload average at the end: {', '.join(f'{value:.1f}' for value in os.getloadavg())}")

if __name__ == "__main__":
    main()

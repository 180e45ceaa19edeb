"""Endpoint cold start: model_fn's time for the seed's plain load, building at start-up, and the stored artifact.

resnet50 at 224 px with 10 classes and random weights (start-up does not depend on their
values), 32 digit scans as the calibration sample train.py stores, one thread. Five cases, each in a fresh Python process as an
endpoint worker starts (imports are not timed, they are the same for all):

* **plain load**: the seed's ``model_fn``: build resnet50 and load ``model.pth`` (eager network);
* **build fp32** / **build int8**: ``model_fn`` on the training job's archive (no serving
  artifact): trace, freeze and optimize, or calibrate on the 32 stored images and convert;
* **stored fp32** / **stored int8**: ``model_fn`` on the archive the Evaluate step writes:
  read the serving artifact, check its sha256 and ``torch.jit.load`` it.

The cases take turns over ``--rounds`` rounds, so a busy spell on a shared machine falls on all
alike. Besides model_fn's seconds it prints the first request's milliseconds after start-up and
the median of the next five (one 500x375 JPEG each, through input_fn -> predict_fn -> output_fn).

    .venv/bin/python benchmarks/cold_start.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from inference_latency import PHOTO_SIZE, jpeg_bytes, load_average, machine  # noqa: E402

import common  # noqa: E402  (inference_latency puts code/ and tests/ on the path)
import contract  # noqa: E402
import serving_model  # noqa: E402
import train  # noqa: E402
from real_images import sample_photo, write_digits  # noqa: E402

CASES = {  # name: (model folder, precision; None: the seed's plain load)
    "plain load": ("training", None),
    "build fp32": ("training", "fp32"),
    "build int8": ("training", "int8"),
    "stored fp32": ("stored-fp32", "fp32"),
    "stored int8": ("stored-int8", "int8"),
}
FOLLOWING_REQUESTS = 5


def training_model_dir(folder: Path, digits: Path) -> None:
    """model.pth (random resnet50 weights), classes, info, calibration/ and code/, as train.py writes them."""
    torch.manual_seed(0)
    classes = sorted(p.name for p in (digits / "valid").iterdir())
    folder.mkdir()
    torch.save(common.build_model("resnet50", len(classes)).state_dict(), folder / contract.MODEL_FILE)
    (folder / contract.CLASSES_FILE).write_text(json.dumps(classes))
    (folder / contract.MODEL_INFO_FILE).write_text(json.dumps({"backbone": "resnet50", "image_size": 224}))
    train.write_calibration_sample(folder / contract.CALIBRATION_DIR,
                                   train.calibration_sample(datasets.ImageFolder(str(digits / "valid"))))
    train.copy_inference_code(folder / contract.MODEL_CODE_DIR)


def stored_model_dir(training: Path, folder: Path, precision: str) -> None:
    """The training folder plus the serving artifact evaluate.py stores for ``precision``, recorded in model_info.json."""
    shutil.copytree(training, folder)
    network, _, info = common.load_model_dir(training)
    calibration = serving_model.calibration_batch(training, common.eval_transform(info["image_size"]))
    if precision == "int8":
        served = serving_model.ServedNetwork(serving_model.quantized_int8(network, calibration), "int8", "torchscript")
    else:
        served = serving_model.served_network(network, torch.device("cpu"), "fp32", calibration, info["image_size"], optimize=False)
    info[contract.SERVING_INFO_KEY] = serving_model.saved_artifact(served, folder)
    (folder / contract.MODEL_INFO_FILE).write_text(json.dumps(info))


def measure(model_dir: Path, precision: str | None, jpeg: Path) -> dict[str, float]:
    """In this fresh process: model_fn's seconds, then the first and the following requests' milliseconds."""
    import inference

    body = jpeg.read_bytes()
    started = time.perf_counter()
    if precision is None:
        network, classes, info = common.load_model_dir(model_dir)
        model = inference.Classifier(network, classes, info, torch.device("cpu"), common.eval_transform(info["image_size"]))
    else:
        os.environ[contract.INFERENCE_PRECISION_ENV] = precision
        model = inference.model_fn(str(model_dir))
    seconds = time.perf_counter() - started
    requests = []
    for _ in range(1 + FOLLOWING_REQUESTS):
        started = time.perf_counter()
        prediction = inference.predict_fn(inference.input_fn(body, "image/jpeg"), model)
        inference.output_fn(prediction, "application/json")
        requests.append((time.perf_counter() - started) * 1000)
    return {"seconds": seconds, "first_ms": requests[0], "next_ms": float(np.median(requests[1:]))}


def measured_in_new_process(model_dir: Path, precision: str | None, jpeg: Path) -> dict[str, float]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "--measure", str(model_dir), "--precision", precision or "plain",
                           "--jpeg", str(jpeg)], env=environment, capture_output=True, text=True, check=False, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--jpeg", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        torch.set_num_threads(1)
        print(json.dumps(measure(args.measure, None if args.precision == "plain" else args.precision, args.jpeg)))
        return

    torch.set_num_threads(1)
    print(f"machine: {machine()}; load average at the start {load_average()}")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        training_model_dir(scratch / "training", write_digits(scratch / "digits", per_class={"valid": 4}, size=224))
        for precision in ("fp32", "int8"):
            stored_model_dir(scratch / "training", scratch / f"stored-{precision}", precision)
        jpeg = scratch / "photo.jpg"
        jpeg.write_bytes(jpeg_bytes(sample_photo("china.jpg").resize(PHOTO_SIZE, Image.BICUBIC)))
        sizes = {name: (scratch / folder / contract.SERVING_MODEL_FILE) for name, (folder, _) in CASES.items()}
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in CASES}
        for round_ in range(args.rounds):
            for name, (folder, precision) in CASES.items():
                rows[name].append(measured_in_new_process(scratch / folder, precision, jpeg))
                print(f"  {name}: {json.dumps(rows[name][-1])}", flush=True)
            print(f"round {round_ + 1} of {args.rounds} done; load average {load_average()}", flush=True)
        artifact_mib = {name: path.stat().st_size / 2**20 if path.is_file() else None for name, path in sizes.items()}

    plain = np.median([row["seconds"] for row in rows["plain load"]])
    header = (f"{'case':<12} {'model_fn s median':>17} {'min':>6} {'max':>6} {'vs plain load':>13} "
              f"{'first request ms':>16} {'next requests ms':>16} {'artifact MiB':>12}")
    print(f"\n{header}\n{'-' * len(header)}")
    for name, measured in rows.items():
        seconds = [row["seconds"] for row in measured]
        size = f"{artifact_mib[name]:.1f}" if artifact_mib[name] is not None else "-"
        print(f"{name:<12} {np.median(seconds):>17.2f} {min(seconds):>6.2f} {max(seconds):>6.2f} "
              f"{np.median(seconds) / plain:>12.2f}x {np.median([r['first_ms'] for r in measured]):>16.0f} "
              f"{np.median([r['next_ms'] for r in measured]):>16.0f} {size:>12}")
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()

"""Model quality over seeds: test accuracy of code/train.py's defaults on real images, 1 process against 7.

Two real image sets, written as dogImages trees (tests/real_images.py), nothing fetched:

- ``digits``: scikit-learn's handwritten-digit scans, 10 classes;
- ``photos``: crops of the photographs scikit-image ships in its wheel, one class per photograph.

For each set, resnet18 trains whole from random weights at 32 px with train.py's recipe defaults (warm-up
and cosine schedule, label smoothing, augmentation; flips off, since a mirrored digit is another
shape), once per seed for each process count; an N-process job is N processes joined by gloo on the
loopback, as SageMaker starts N instances (benchmarks/train_distributed.py). The table gives, per set and
process count, the mean, lowest and highest test accuracy over the seeds, the 1-vs-7 gap (the mean over
seeds of |accuracy(7) - accuracy(1)| and its largest value) and the wall time. Then ``dogbreed local-run
--data`` runs once per set (PretrainedWeights=none, resnet18, ImageSize 32, HorizontalFlip false for the
digits; 2 tuning trials, which then train the whole network) and the table gives both models' test
accuracy as the pipeline's Evaluate steps measured it. The sets are sized for a 2-core machine: a
7-process job there costs several times a 1-process one (every step waits for all 7 ranks).

    .venv/bin/python benchmarks/model_quality.py [--sets digits photos] [--seeds 1 2 3] [--processes 1 7]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from real_images import write_digits, write_photo_crops  # noqa: E402
from train_distributed import run_job, test_accuracy  # noqa: E402

# Per class: images of each split, small enough for 2 shared cores (a 7-process job there is the costly part).
SETS: dict[str, tuple[Callable[..., Path], dict[str, int]]] = {
    "digits": (write_digits, {"train": 60, "valid": 20, "test": 50}),
    "photos": (write_photo_crops, {"train": 40, "valid": 10, "test": 30}),
}
IMAGE_SIZE = 32
# Settings of the data, not of the recipe: a mirrored digit is another shape.
DATA_ARGS = {"digits": ["--flip", "false"], "photos": []}


def job_args(name: str, seed: int, epochs: int) -> list[str]:
    return ["--backbone", "resnet18", "--pretrained-weights", "none", "--image-size", str(IMAGE_SIZE),
            "--num-workers", "0", "--num-threads", "1", "--epochs", str(epochs), "--seed", str(seed),
            "--checkpoint-dir", "none", *DATA_ARGS[name]]


def trained_accuracy(data: Path, job: Path, processes: int, args: list[str]) -> float:
    job.mkdir()
    run_job(data, job, processes, args)
    return test_accuracy(job / "model", data / "test")


def local_run_accuracies(data: Path, workdir: Path, name: str) -> dict[str, float]:
    """Both models' test accuracy from ``dogbreed local-run --data``: the Evaluate steps' figures in summary.json."""
    params = ["PretrainedWeights=none", "Backbone=resnet18", f"ImageSize={IMAGE_SIZE}"]
    params += [f"HorizontalFlip={'false' if '--flip' in DATA_ARGS[name] else 'true'}"]
    command = [str(Path(sys.executable).with_name("dogbreed")), "local-run", "--no-progress", "--data", str(data),
               "--workdir", str(workdir), *(item for param in params for item in ("--param", param))]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if finished.returncode != 0:
        sys.exit(f"local-run failed ({finished.returncode}):\n{finished.stdout[-3000:]}\n{finished.stderr[-2000:]}")
    return json.loads((workdir / "summary.json").read_text())["test_accuracy"]


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} | {min(values):.3f} | {max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", choices=sorted(SETS), default=sorted(SETS))
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3], help="none: only the local-run")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 7])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--no-local-run", action="store_true", help="skip the local-run of each set")
    parser.add_argument("extra", nargs="*", help="more train.py arguments for every job (after --)")
    options = parser.parse_args()
    rows, local_rows = [], []
    with tempfile.TemporaryDirectory(prefix="model-quality-") as scratch:
        root = Path(scratch)
        for name in options.sets:
            write, per_class = SETS[name]
            data = write(root / name, per_class=per_class, size=IMAGE_SIZE)
            accuracy: dict[int, list[float]] = {count: [] for count in options.processes}
            seconds: dict[int, float] = {count: 0.0 for count in options.processes}
            for seed in options.seeds:
                for count in options.processes:
                    started = time.perf_counter()
                    args = job_args(name, seed, options.epochs) + options.extra
                    accuracy[count].append(trained_accuracy(data, root / f"{name}-{seed}-{count}", count, args))
                    seconds[count] += time.perf_counter() - started
                    print(f"{name} seed {seed} {count} processes: test accuracy {accuracy[count][-1]:.3f}", flush=True)
            gaps = ([abs(a - b) for a, b in zip(accuracy[options.processes[0]], accuracy[options.processes[-1]])]
                    if len(options.processes) > 1 else [0.0])
            for count in options.processes if options.seeds else ():
                rows.append((name, count, spread(accuracy[count]), statistics.mean(gaps), max(gaps),
                             seconds[count] / len(options.seeds)))
            if not options.no_local_run:
                started = time.perf_counter()
                found = local_run_accuracies(data, root / f"{name}-local-run", name)
                local_rows.append((name, found, time.perf_counter() - started))
                print(f"{name} local-run: {found}", flush=True)
    sizes = "; ".join(f"{name} {'/'.join(map(str, SETS[name][1].values()))}" for name in options.sets)
    print(f"\n# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}; resnet18 from random weights at {IMAGE_SIZE} px, train.py defaults, "
          f"{options.epochs} epochs, seeds {' '.join(map(str, options.seeds)) or '-'}; train/valid/test images per "
          f"class: {sizes}")
    print("| set | processes | test accuracy mean | min | max | 1-vs-7 gap mean | gap max | wall s per run |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, count, figures, gap, gap_max, wall in rows:
        print(f"| {name} | {count} | {figures} | {gap:.3f} | {gap_max:.3f} | {wall:.0f} |")
    if local_rows:
        print("\n| set | `local-run --data` step | test accuracy | wall s (whole command) |")
        print("| --- | --- | ---: | ---: |")
        for name, found, wall in local_rows:
            for step, value in sorted(found.items()):
                print(f"| {name} | {step} | {value:.3f} | {wall:.0f} |")


if __name__ == "__main__":
    main()

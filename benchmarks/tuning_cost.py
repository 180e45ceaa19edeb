"""What a hyperparameter search costs on this machine: every trial caching features vs one extraction for all.

Generates JPEGs of the dogImages size (500x375), written as preprocess.py writes
them (shorter side 256), a resnet50 state dict (random values: the speed does not
depend on them) and runs N trials of code/train.py one after another, as real
processes with the script's default threads and data workers, two ways:

* old: each trial runs ``--cache-features true`` on the images, so each pays the
  frozen backbone's forward pass over every training and validation image;
* new: ``extract_features.py`` once, then each trial runs ``--features`` and trains
  only the head.

The trials differ in learning rate and batch size, as a tuner's would. CPU seconds
are those of the processes and their data workers (``RUSAGE_CHILDREN``), steadier
than wall-clock seconds on a machine that other jobs share. It also checks that
both ways report the same objective for every trial.

    .venv/bin/python benchmarks/tuning_cost.py [--train-images 96 --valid-images 24 --trials 4 --epochs 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from torchvision import models  # noqa: E402

from train_throughput import write_data_sets  # noqa: E402

TRAIN_SCRIPT = ROOT / "code" / "train.py"
EXTRACT_SCRIPT = ROOT / "code" / "extract_features.py"
# (learning rate, batch size) of each trial, as a search would vary them.
TRIAL_SETTINGS = [(0.001, 16), (0.01, 32), (0.03, 64), (0.1, 32), (0.003, 64), (0.05, 16), (0.02, 32), (0.005, 64)]
BACKBONE, IMAGE_SIZE = "resnet50", 224
OBJECTIVE = re.compile(r"best_val_loss=([0-9.]+)")


@dataclass
class Cost:
    what: str
    seconds: float
    cpu_seconds: float
    objective: float | None = None


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(what: str, command: list[str], env: dict[str, str]) -> Cost:
    """Run one job as a process; its wall and CPU seconds and the last objective it printed."""
    cpu_before, started = children_cpu_seconds(), time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds, cpu_seconds = time.perf_counter() - started, children_cpu_seconds() - cpu_before
    if result.returncode != 0:
        raise SystemExit(f"{what} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    found = OBJECTIVE.findall(result.stdout)
    return Cost(what, seconds, cpu_seconds, float(found[-1]) if found else None)


def trial_command(index: int, epochs: int, weights: Path, model_dir: Path, source: list[str]) -> list[str]:
    learning_rate, batch_size = TRIAL_SETTINGS[index % len(TRIAL_SETTINGS)]
    return [sys.executable, str(TRAIN_SCRIPT), *source, "--model-dir", str(model_dir), "--backbone", BACKBONE,
            "--image-size", str(IMAGE_SIZE), "--pretrained-weights", str(weights), "--augment", "false",
            "--learning-rate", str(learning_rate), "--batch-size", str(batch_size), "--epochs", str(epochs),
            "--patience", "0", "--seed", "42", "--checkpoint-dir", "none", "--output-data-dir", "none"]


def trial_name(index: int) -> str:
    learning_rate, batch_size = TRIAL_SETTINGS[index % len(TRIAL_SETTINGS)]
    return f"trial {index + 1} (lr {learning_rate}, batch {batch_size})"


def old_way(data: Path, weights: Path, work: Path, trials: int, epochs: int, env: dict[str, str]) -> list[Cost]:
    return [timed(f"{trial_name(i)}: --cache-features on images", trial_command(
        i, epochs, weights, work / f"old-{i}", ["--data", str(data), "--cache-features", "true"]), env)
        for i in range(trials)]


def new_way(data: Path, weights: Path, work: Path, trials: int, epochs: int, env: dict[str, str]) -> list[Cost]:
    features = work / "features"
    extraction = timed("extract_features.py (once)", [
        sys.executable, str(EXTRACT_SCRIPT), "--train", str(data / "train"), "--valid", str(data / "valid"),
        "--output", str(features), "--backbone", BACKBONE, "--image-size", str(IMAGE_SIZE),
        "--pretrained-weights", str(weights), "--seed", "42"], env)
    return [extraction] + [timed(f"{trial_name(i)}: --features (head only)", trial_command(
        i, epochs, weights, work / f"new-{i}", ["--features", str(features)]), env) for i in range(trials)]


def table(old: list[Cost], new: list[Cost], trials: int) -> list[str]:
    def total(costs: list[Cost]) -> tuple[float, float]:
        return sum(c.seconds for c in costs), sum(c.cpu_seconds for c in costs)

    def objective(cost: Cost) -> str:
        return f"{cost.objective:.4f}" if cost.objective is not None else ""

    rows = ["| way | job | wall s | CPU s | best_val_loss |", "| --- | --- | ---: | ---: | ---: |"]
    rows += [f"| old | {c.what} | {c.seconds:.1f} | {c.cpu_seconds:.1f} | {objective(c)} |" for c in old]
    rows += [f"| new | {c.what} | {c.seconds:.1f} | {c.cpu_seconds:.1f} | {objective(c)} |" for c in new]
    (old_wall, old_cpu), (new_wall, new_cpu) = total(old), total(new)
    head_wall, head_cpu = total(new[1:])
    rows += [f"| **old** | **{trials} trials** | **{old_wall:.1f}** | **{old_cpu:.1f}** | |",
             f"| **new** | **1 extraction + {trials} trials** | **{new_wall:.1f}** | **{new_cpu:.1f}** | |",
             "", "| | wall | CPU |", "| --- | ---: | ---: |",
             f"| old / new | {old_wall / new_wall:.2f}x | {old_cpu / new_cpu:.2f}x |",
             f"| target: old / {trials} + head-only trials | {old_wall / trials + head_wall:.1f} s | {old_cpu / trials + head_cpu:.1f} s |",
             f"| new within the target | {'yes' if new_wall <= old_wall / trials + head_wall else 'no'} "
             f"| {'yes' if new_cpu <= old_cpu / trials + head_cpu else 'no'} |"]
    same = all(a.objective is not None and b.objective is not None and abs(a.objective - b.objective) <= 1e-4
               for a, b in zip(old, new[1:]))
    rows += ["", f"every trial's best_val_loss the same both ways (within 1e-4): {'yes' if same else 'NO'}"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-images", type=int, default=96)
    parser.add_argument("--valid-images", type=int, default=24)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    env = {key: value for key, value in os.environ.items() if not key.startswith("SM_")}
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        _, data = write_data_sets(work / "data", {"train": args.train_images, "valid": args.valid_images})
        weights = work / f"{BACKBONE}.pth"
        torch.save(getattr(models, BACKBONE)(weights=None).state_dict(), weights)
        old = old_way(data, weights, work, args.trials, args.epochs, env)
        new = new_way(data, weights, work, args.trials, args.epochs, env)
    print(f"{args.train_images} training + {args.valid_images} validation JPEGs (500x375 generated, shorter side 256 "
          f"as PrepareData writes them), {BACKBONE} frozen at {IMAGE_SIZE} px, {args.trials} trials of {args.epochs} "
          f"epochs one after another; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print()
    print("\n".join(table(old, new, args.trials)))


if __name__ == "__main__":
    main()

"""1 instance against N: code/train.py on the same real images, printed as a table.

The data set is scikit-learn's handwritten-digit scans (tests/real_images.py:
real images shipped in the scikit-learn wheel), 10 classes, as a dogImages tree.
resnet18 trains whole from random weights (the frozen-backbone rule), with the
same hyperparameters and seed for every process count; an N-instance job is N
processes joined by gloo on the loopback, as SageMaker starts them (SM_HOSTS),
one torch thread each. For each count the table gives the optimizer steps per
epoch, wall seconds per epoch (mean over the epochs after the first), and the
saved model's accuracy on the test split. On one machine the N processes share
its cores, so wall seconds measure the cost of N ranks' collectives on a
crowded CPU, not the speed of N instances.

    .venv/bin/python benchmarks/train_distributed.py [--processes 1 7] [--train 40 --epochs 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from torchvision import datasets  # noqa: E402

import common  # noqa: E402
from pipeline.local.jobs import free_port  # noqa: E402
import train  # noqa: E402
from real_images import write_digits  # noqa: E402

TRAIN_SCRIPT = ROOT / "code" / "train.py"


def run_job(data: Path, job: Path, processes: int, args: list[str]) -> None:
    """One training job of ``processes`` instances; raises with the first failing process's output."""
    hosts = [f"algo-{i}" for i in range(1, processes + 1)]
    port = str(free_port())
    started = []
    for host in hosts:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "MASTER_", "OMP_"))}
        env.update(SM_CHANNEL_TRAIN=str(data / "train"), SM_CHANNEL_VALID=str(data / "valid"),
                   SM_MODEL_DIR=str(job / "model"), SM_OUTPUT_DATA_DIR=str(job / "output"))
        if processes > 1:
            env.update(SM_HOSTS=json.dumps(hosts), SM_CURRENT_HOST=host, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        log = open(job / f"{host}.log", "w")
        started.append((subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args], env=env, cwd=job,
                                         stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for process, log in started:
        process.wait()
        log.close()
        if process.returncode != 0:
            failed.append(Path(log.name).read_text()[-3000:])
    if failed:
        raise RuntimeError(f"a {processes}-process job failed:\n{failed[0]}")


def test_accuracy(model_dir: Path, test_dir: Path) -> float:
    model, classes, info = common.load_model_dir(model_dir)
    test_set = datasets.ImageFolder(str(test_dir), transform=common.eval_transform(info["image_size"]))
    with torch.no_grad():
        logits = model(torch.stack([image for image, _ in test_set]))
    return (logits.argmax(1) == torch.tensor(test_set.targets)).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 7])
    parser.add_argument("--train", type=int, default=40, help="training images per class")
    parser.add_argument("--valid", type=int, default=10, help="validation images per class")
    parser.add_argument("--test", type=int, default=40, help="test images per class")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=3)
    options = parser.parse_args()
    args = ["--backbone", "resnet18", "--pretrained-weights", "none", "--image-size", str(options.image_size),
            "--num-workers", "0", "--num-threads", "1", "--epochs", str(options.epochs),
            "--batch-size", str(options.batch_size), "--learning-rate", str(options.learning_rate),
            "--augment", "false", "--patience", "0", "--seed", str(options.seed), "--checkpoint-dir", "none"]
    with tempfile.TemporaryDirectory(prefix="train-distributed-") as scratch:
        root = Path(scratch)
        data = write_digits(root / "digits", per_class={"train": options.train, "valid": options.valid,
                                                        "test": options.test}, size=options.image_size)
        rows = []
        for count in options.processes:
            job = root / f"job{count}"
            job.mkdir()
            run_job(data, job, count, args)
            history = json.loads((job / "output" / train.METRICS_HISTORY_FILE).read_text())
            later = history[1:] or history
            rows.append((count, sorted({h["optimizer_steps"] for h in history}),
                         sum(h["seconds"] for h in later) / len(later), history[-1]["val_accuracy"],
                         test_accuracy(job / "model", data / "test")))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}; {options.train * 10} train / {options.test * 10} test digit scans, "
          f"resnet18 from random weights at {options.image_size} px, batch {options.batch_size}, "
          f"lr {options.learning_rate}, {options.epochs} epochs, seed {options.seed}")
    print("| processes | optimizer steps / epoch | wall s / epoch | last val accuracy | test accuracy |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for count, steps, seconds, val_accuracy, accuracy in rows:
        print(f"| {count} | {', '.join(map(str, steps))} | {seconds:.1f} | {val_accuracy:.3f} | {accuracy:.3f} |")


if __name__ == "__main__":
    main()

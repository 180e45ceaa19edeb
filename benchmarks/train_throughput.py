"""Training throughput of code/train.py on this machine, printed as a table.

Generates JPEGs of the dogImages size (500x375), and the same images as
preprocess.py writes them (shorter side 256), then measures:

* decoding: images per second through the training DataLoader (decode + resize + crop),
  originals against preprocessed images;
* training: resnet50 with a frozen backbone (random weights: speed does not depend
  on them) at 224 pixels, batch 32, augmentation off, two epochs each, with and without
  --cache-features. Seconds per epoch include the validation pass and, in epoch 1 of a
  cached run, computing the features. The script runs with its defaults for threads
  and data workers; CPU seconds are those of the training process (the model's work;
  decoding happens in the data workers), and vary less than wall-clock seconds on a
  machine that other jobs share.

    .venv/bin/python benchmarks/train_throughput.py [--train-images 64 --valid-images 16]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))

import torch  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets  # noqa: E402

import arguments  # noqa: E402
import common  # noqa: E402
import preprocess  # noqa: E402
import train  # noqa: E402

ORIGINAL_SIZE = (500, 375)
CLASSES = 4


def photo_like_jpeg(rng: random.Random, size: tuple[int, int]) -> bytes:
    """A smooth colour field with grain, so that the JPEG is about as large as a photo's."""
    small = Image.new("RGB", (size[0] // 25, size[1] // 25))
    small.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(small.width * small.height)])
    image = small.resize(size, Image.Resampling.BICUBIC)
    grain = Image.effect_noise(size, 40).convert("RGB").filter(ImageFilter.GaussianBlur(0.6))
    image = Image.blend(image, grain, 0.25)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_data_sets(root: Path, counts: dict[str, int], seed: int = 0) -> tuple[Path, Path]:
    """The same images twice: as generated (``originals``) and as preprocess.py writes them (``resized``)."""
    rng = random.Random(seed)
    for split, count in counts.items():
        for index in range(count):
            name = f"{index % CLASSES + 1:03d}.Breed_{index % CLASSES}"
            data = photo_like_jpeg(rng, ORIGINAL_SIZE)
            for variant, content in (("originals", data),
                                     ("resized", preprocess.jpeg_bytes(data, 256, common.MAX_IMAGE_PIXELS, 90))):
                path = root / variant / split / name / f"img_{index:04d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
    return root / "originals", root / "resized"


def decode_rates(train_dir: Path, image_size: int, batch_size: int) -> tuple[float, float]:
    """Images per wall-clock second and per CPU second through the training DataLoader alone (no model).

    Measured in this process with one torch thread, as a DataLoader worker runs.
    """
    dataset = datasets.ImageFolder(str(train_dir), transform=common.eval_transform(image_size))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in loader:
            pass
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        torch.set_num_threads(threads)
    return len(dataset) / wall, len(dataset) / cpu


def training_epochs(data: Path, work: Path, options: argparse.Namespace, cache: bool) -> list[dict]:
    argv = ["--data", str(data), "--model-dir", str(work / "model"), "--backbone", options.backbone,
            "--pretrained-weights", "none", "--image-size", str(options.image_size), "--batch-size", str(options.batch_size),
            "--epochs", "2", "--patience", "0", "--augment", "false", "--cache-features", str(cache).lower(),
            "--checkpoint-dir", "none", "--output-data-dir", "none"]
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train.main(train.parse_args(argv))
    return summary["history"]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--valid-images", type=int, default=16)
    parser.add_argument("--backbone", default="resnet50", choices=common.BACKBONES)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    options = parser.parse_args()
    load_before = f"{os.getloadavg()[0]:.1f}"

    with tempfile.TemporaryDirectory(prefix="train-throughput-") as temporary:
        root = Path(temporary)
        originals, resized = write_data_sets(root, {"train": options.train_images, "valid": options.valid_images})
        decode = {name: decode_rates(folder / "train", options.image_size, options.batch_size)
                  for name, folder in (("500x375 originals", originals), ("256 short side", resized))}
        runs = []
        for images, folder, cache in (("500x375 originals", originals, False), ("500x375 originals", originals, True),
                                      ("256 short side", resized, True)):
            history = training_epochs(folder, root / f"run{len(runs)}", options, cache)
            runs.append((images, cache, history))

    print(f"\nmachine: {cpu_model()}, {arguments.usable_cpus()} usable cores, torch {torch.__version__}, "
          f"{arguments.default_num_threads()} torch threads, {arguments.default_num_workers()} data workers; "
          f"load average before and after: {load_before} / {os.getloadavg()[0]:.1f}")
    print(f"{options.backbone} frozen, {options.image_size} px, batch {options.batch_size}, augmentation off; "
          f"{options.train_images} training + {options.valid_images} validation images, {CLASSES} classes\n")
    print("| images | decode + resize + crop (one thread), images/s | images per CPU s |")
    print("| --- | ---: | ---: |")
    for name, (rate, cpu_rate) in decode.items():
        print(f"| {name} | {rate:.1f} | {cpu_rate:.1f} |")
    print()
    print("| images | --cache-features | epoch 1 s | epoch 2 s | epoch 1 CPU s | epoch 2 CPU s "
          "| training images per CPU s, epoch 1 | epoch 2 | epoch 1 / epoch 2 (CPU) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for images, cache, history in runs:
        wall = [h["seconds"] for h in history]
        cpu = [h["cpu_seconds"] for h in history]
        print(f"| {images} | {'on' if cache else 'off'} | {wall[0]:.2f} | {wall[1]:.3f} | {cpu[0]:.2f} | {cpu[1]:.3f} | "
              f"{options.train_images / cpu[0]:.1f} | {options.train_images / cpu[1]:.0f} | {cpu[0] / cpu[1]:.0f}x |")


if __name__ == "__main__":
    main()

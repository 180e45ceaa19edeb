"""A small generated data set in the dogImages layout, for a local run on a fresh machine.

``<root>/<split>/<NNN.Breed>/*.jpg`` for each of code/contract.py's SPLITS
(train, valid, test): a few classes, each a base colour and a shape of its own
with per-image noise, position and size, so a small network separates them
after a few epochs even from random weights.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from pipeline.definition import load_contract
from pipeline.settings import default_source_dir

BREEDS = ("001.Affenpinscher", "002.Afghan_hound", "003.Airedale_terrier", "004.Akita",
          "005.Alaskan_malamute", "006.American_eskimo_dog", "007.American_foxhound", "008.American_staffordshire_terrier")
COLOURS = ((205, 50, 45), (50, 170, 70), (45, 80, 200), (225, 190, 40), (150, 60, 180), (40, 180, 185),
           (120, 120, 120), (230, 120, 30))
IMAGES_PER_CLASS = (24, 4, 4)  # of each split, in the order of contract.py's SPLITS (train, valid, test)
IMAGE_SIZE = (64, 48)
CORRUPT_NAME = "corrupt_upload.jpg"


@dataclass(frozen=True)
class Sample:
    root: Path
    classes: tuple[str, ...]
    images: int


def _image(colour: tuple[int, int, int], shape: int, rng: random.Random, size: tuple[int, int]):
    from PIL import Image, ImageDraw

    width, height = size
    background = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour)
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    side = rng.randint(height // 3, height // 2)
    x, y = rng.randint(0, width - side), rng.randint(0, height - side)
    box = (x, y, x + side, y + side)
    ink = tuple(255 - c for c in colour)
    if shape % 4 == 0:
        draw.ellipse(box, fill=ink)
    elif shape % 4 == 1:
        draw.rectangle(box, fill=ink)
    elif shape % 4 == 2:
        draw.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=ink)
    else:
        draw.line([(x, y), (x + side, y + side)], fill=ink, width=max(2, side // 5))
    pixels = image.load()
    for _ in range(width * height // 10):
        px, py = rng.randrange(width), rng.randrange(height)
        pixels[px, py] = tuple(max(0, min(255, c + rng.randint(-70, 70))) for c in pixels[px, py])
    return image


def split_sizes_of(splits: Sequence[str]) -> dict[str, int]:
    """Images per class of each split: ``IMAGES_PER_CLASS`` under the contract's split names."""
    return dict(zip(splits, IMAGES_PER_CLASS, strict=True))


def _contract_splits() -> tuple[str, ...]:
    return tuple(load_contract(default_source_dir()).SPLITS)  # the source dir the settings default to


def make_sample(root: Path, classes: int = 4, split_sizes: Mapping[str, int] | None = None,
                size: tuple[int, int] = IMAGE_SIZE, seed: int = 0) -> Sample:
    """Write the sample under ``root`` (which must not hold one already) and describe it.

    ``split_sizes`` (images per class, by split) defaults to ``split_sizes_of`` the contract's SPLITS.
    """
    if not 2 <= classes <= len(BREEDS):
        raise ValueError(f"a sample has 2 to {len(BREEDS)} classes, not {classes}")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; the sample is written into a new folder")
    sizes = split_sizes or split_sizes_of(_contract_splits())
    rng = random.Random(seed)
    count = 0
    for split, per_class in sizes.items():
        for index, breed in enumerate(BREEDS[:classes]):
            folder = root / split / breed
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(per_class):
                _image(COLOURS[index], index, rng, size).save(folder / f"{breed.split('.')[1]}_{number:04d}.jpg", "JPEG", quality=90)
                count += 1
    return Sample(root, BREEDS[:classes], count)


def plant_corrupt_image(root: Path, split: str | None = None) -> Path:
    """A file named like a JPEG that is not one, in the first class folder of ``split`` (default: the
    contract's first split, train); returns its path."""
    folder = sorted(p for p in (root / (split or _contract_splits()[0])).iterdir() if p.is_dir())[0]
    path = folder / CORRUPT_NAME
    path.write_bytes(b"\xff\xd8\xff\xe0 this upload was cut off" + bytes(range(64)))
    return path

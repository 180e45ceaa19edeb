"""Small image sets drawn on the fly: each class a base colour with noise, so a classifier can learn them."""
from __future__ import annotations

import random
from pathlib import Path


def write_images(folder: Path, count: int, color: tuple[int, int, int], size=(40, 30), seed: int = 0, fmt: str = "JPEG") -> list[Path]:
    """``count`` images that share a base colour (so a classifier can learn them) with noise."""
    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.new("RGB", size, color)
        pixels = image.load()
        for _ in range(size[0] * size[1] // 8):
            x, y = rng.randrange(size[0]), rng.randrange(size[1])
            pixels[x, y] = tuple(max(0, min(255, c + rng.randint(-60, 60))) for c in color)
        path = folder / f"img_{i:04d}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        image.save(path, fmt)
        paths.append(path)
    return paths


PALETTE = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 40), (160, 40, 200), (40, 200, 200), (120, 120, 120)]


def make_dataset(root: Path, classes: int = 3, per_split: dict[str, int] | None = None, size=(40, 30)) -> Path:
    """A dogImages-like tree: ``root/{train,valid,test}/NNN.Name/*.jpg``."""
    per_split = per_split or {"train": 12, "valid": 4, "test": 4}
    for s, (split, count) in enumerate(per_split.items()):
        for c in range(classes):
            name = f"{c + 1:03d}.Breed_{chr(ord('A') + c)}"
            write_images(root / split / name, count, PALETTE[c % len(PALETTE)], size=size, seed=100 * s + c)
    return root

"""A small real image data set, written as a dogImages tree, with nothing fetched at run time.

The images are scikit-learn's ``load_digits`` set: 1,797 real scans of
handwritten digits (8x8 pixels, 17 grey levels, 10 classes, about 180 each),
shipped inside the scikit-learn wheel as ``sklearn/datasets/data/digits.csv.gz``.
They are real, noisy, human-made images (not a colour per class), so a model has
to learn shapes to classify them, and they are tiny, so tests on 2 cores stay cheap.

Interface::

    from real_images import write_digits
    root = write_digits(tmp_path / "data")              # 10 classes, 40/10/20 per class
    root = write_digits(dir, per_class={"train": 100, "valid": 20, "test": 40}, size=32)

writes ``root/{train,valid,test}/NNN.name/digit_IIII.png`` (class folders
``001.zero`` .. ``010.nine``, the dogImages layout the pipeline reads) and
returns ``root``. Each image is the scan upscaled to ``size`` x ``size`` pixels,
dark ink on white paper, saved as RGB PNG (or JPEG with ``fmt="JPEG"``). The
split is deterministic: the scans of each class are shuffled with ``seed`` and
dealt to train, valid and test in that order, so no scan is in two splits and
the same arguments always write the same files. The pytest fixture
``real_image_dataset`` (tests/conftest.py) is ``write_digits(tmp_path / "real")``.

``sample_photo("china.jpg")`` (or ``"flower.jpg"``) is one of the two real colour
photos the wheel ships too (427x640 JPEGs), as an RGB image.

``write_photo_crops(root)`` writes a second real set, of photographs: square crops of
the photos scikit-image ships in its wheel (``skimage.data``: the astronaut, the
cat, the coffee cup, the rocket...), one class per photo. Each photo is cut into
vertical bands, the left 60% for train, the next 15% for valid, the right 25% for
test, and every crop lies inside its split's band, so a test crop shows a part of
the scene that no training crop shows: the model must learn what the scene looks
like, not remember pixels.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Mapping

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEFAULT_PER_CLASS = {"train": 40, "valid": 10, "test": 20}
_GREY_LEVELS = 16  # load_digits pixels run 0..16 (ink density)


def class_folder(label: int) -> str:
    """``001.zero`` for digit 0: the dogImages ``NNN.Name`` folder name of a digit."""
    return f"{label + 1:03d}.{CLASS_NAMES[label]}"


def _scans_by_class():
    from sklearn.datasets import load_digits

    digits = load_digits()
    by_class: dict[int, list] = {label: [] for label in range(len(CLASS_NAMES))}
    for image, label in zip(digits.images, digits.target):
        by_class[int(label)].append(image)
    return by_class


def _to_pil(scan, size: int):
    import numpy as np
    from PIL import Image

    paper = 255 - np.clip(scan * (255 / _GREY_LEVELS), 0, 255).astype("uint8")
    return Image.fromarray(paper, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")


def write_digits(root: Path, per_class: Mapping[str, int] | None = None, size: int = 32, classes: int = 10,
                 seed: int = 0, fmt: str = "PNG") -> Path:
    """Write ``classes`` digit classes as ``root/{split}/NNN.name/*.png``; returns ``root``.

    ``per_class`` maps split name to images per class (default 40/10/20); the
    three counts together may not exceed 174, the size of the smallest class.
    """
    per_class = dict(DEFAULT_PER_CLASS if per_class is None else per_class)
    if not 1 <= classes <= len(CLASS_NAMES):
        raise ValueError(f"classes must be 1..{len(CLASS_NAMES)}, got {classes}")
    by_class = _scans_by_class()
    needed = sum(per_class.values())
    smallest = min(len(scans) for scans in by_class.values())
    if needed > smallest:
        raise ValueError(f"per_class asks {needed} images per class; the smallest digit class has {smallest}")
    suffix = "jpg" if fmt.upper() == "JPEG" else fmt.lower()
    root = Path(root)
    for label in range(classes):
        scans = list(by_class[label])
        random.Random(seed * 1000 + label).shuffle(scans)
        start = 0
        for split, count in per_class.items():
            folder = root / split / class_folder(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i, scan in enumerate(scans[start:start + count]):
                _to_pil(scan, size).save(folder / f"digit_{i:04d}.{suffix}", fmt.upper())
            start += count
    return root


def sample_photo(name: str):
    """One of the two real photos scikit-learn ships in its wheel (427x640 JPEGs), in RGB."""
    import sklearn
    from PIL import Image

    with Image.open(Path(sklearn.__file__).parent / "datasets" / "images" / name) as image:
        return image.convert("RGB")


PHOTO_NAMES = ("astronaut", "camera", "cat", "coffee", "coins", "hubble_deep_field", "moon", "rocket")
_PHOTO_BANDS = {"train": (0.0, 0.6), "valid": (0.6, 0.75), "test": (0.75, 1.0)}


def _photo(name: str):
    import numpy as np
    from PIL import Image
    from skimage import data

    return Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")


def write_photo_crops(root: Path, per_class: Mapping[str, int] | None = None, size: int = 32, seed: int = 0) -> Path:
    """Write ``root/{split}/NNN.name/crop_IIII.png``: random square crops of each photo in ``PHOTO_NAMES`` (one
    class each), a fifth to a quarter of the photo's shorter side, inside the split's band, resized to ``size``."""
    from PIL import Image

    per_class = dict(DEFAULT_PER_CLASS if per_class is None else per_class)
    root = Path(root)
    for label, name in enumerate(PHOTO_NAMES):
        photo = _photo(name)
        width, height = photo.size
        draw = random.Random(seed * 1000 + label)
        for split, count in per_class.items():
            left, right = (int(width * edge) for edge in _PHOTO_BANDS.get(split, (0.0, 1.0)))
            folder = root / split / f"{label + 1:03d}.{name}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                side = min(right - left, int(min(width, height) * draw.uniform(0.2, 0.25)))
                x, y = draw.randint(left, right - side), draw.randint(0, height - side)
                crop = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR)
                crop.save(folder / f"crop_{i:04d}.png", "PNG")
    return root

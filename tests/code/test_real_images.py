"""The shared real-image fixture: layout, determinism, disjoint splits."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from real_images import write_digits


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def test_real_image_dataset_is_a_dogimages_tree_of_real_scans(real_image_dataset: Path):
    from PIL import Image

    for split, count in (("train", 40), ("valid", 10), ("test", 20)):
        folders = sorted(p.name for p in (real_image_dataset / split).iterdir())
        assert folders[0] == "001.zero" and folders[-1] == "010.nine" and len(folders) == 10
        assert all(len(list((real_image_dataset / split / f).iterdir())) == count for f in folders)
    with Image.open(next((real_image_dataset / "train" / "002.one").iterdir())) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
        assert len(set(image.convert("L").tobytes())) > 4  # grey levels of a scan, not a flat colour


def test_write_digits_is_deterministic_and_splits_are_disjoint(tmp_path: Path):
    sizes = {"train": 3, "valid": 2, "test": 2}
    first = _digests(write_digits(tmp_path / "a", per_class=sizes, size=16, classes=2))
    assert first == _digests(write_digits(tmp_path / "b", per_class=sizes, size=16, classes=2))
    by_split: dict[str, set[str]] = {}
    for name, digest in first.items():
        by_split.setdefault(name.split("/")[0], set()).add(digest)
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["valid"])


def test_write_digits_refuses_more_images_than_a_class_has(tmp_path: Path):
    with pytest.raises(ValueError, match="smallest digit class has 174"):
        write_digits(tmp_path, per_class={"train": 150, "valid": 20, "test": 20})

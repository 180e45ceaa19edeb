"""code/preprocess.py on generated folders with planted faults."""
from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

import contract
import preprocess
from colour_images import make_dataset, write_images

RESIZE = 24


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def noise_image(size=(40, 30)) -> Image.Image:
    return Image.effect_noise(size, 64).convert("RGB")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def pixel_bomb_png(width: int = 9000, height: int = 9000) -> bytes:
    """A PNG whose header claims width x height pixels, in a few dozen bytes."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


def png_with_bad_checksum() -> bytes:
    data = bytearray(encoded(noise_image(), "PNG"))
    data[data.index(b"IDAT") + 12] ^= 0xFF
    return bytes(data)


def half_transparent_red() -> Image.Image:
    image = Image.new("RGBA", (40, 30), (255, 0, 0, 255))
    image.paste((255, 0, 0, 0), (0, 0, 20, 30))
    return image


# path under the input root -> (bytes, words expected in the reason)
FAULTS = {
    "train/001.Breed_A/corrupt.png": (png_with_bad_checksum, "damaged"),
    "train/001.Breed_A/truncated.jpg": (lambda: encoded(noise_image(), "JPEG")[:300], "truncated"),
    "train/001.Breed_A/empty.jpg": (lambda: b"", "empty"),
    "valid/002.Breed_B/notes.jpg": (lambda: b"breed list, to do\n", "not an image"),
    "test/003.Breed_C/huge.png": (pixel_bomb_png, "81,000,000 pixels"),
}
CONVERTED = {
    "train/002.Breed_B/rgba.png": lambda: encoded(half_transparent_red(), "PNG"),
    "train/002.Breed_B/gray.jpg": lambda: encoded(noise_image().convert("L"), "JPEG"),
    "train/002.Breed_B/palette.png": lambda: encoded(noise_image().convert("P"), "PNG"),
}


def plant(root: Path, files: dict) -> None:
    for relative, make in files.items():
        make = make[0] if isinstance(make, tuple) else make
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make())


@pytest.fixture
def faulty_dataset(tmp_path: Path) -> Path:
    root = make_dataset(tmp_path / "data")
    plant(root, FAULTS)
    plant(root, CONVERTED)
    (root / "train" / "001.Breed_A" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


def run(input_dir: Path, output_dir: Path, *extra: str) -> int:
    return preprocess.main(["--input", str(input_dir), "--output", str(output_dir), "--resize", str(RESIZE), "--workers", "1", *extra])


def manifest_of(output_dir: Path) -> dict:
    return json.loads((output_dir / "manifest" / "manifest.json").read_text())


def files_on_disk(output_dir: Path) -> dict[str, dict[str, list[str]]]:
    return {
        split: {d.name: sorted(f.name for f in d.iterdir()) for d in sorted((output_dir / split).iterdir())}
        for split in ("train", "valid", "test")
    }


def independent_content_hash(output_dir: Path) -> str:
    lines = sorted(
        f"{path.relative_to(output_dir).as_posix()}\t{hashlib.sha256(path.read_bytes()).hexdigest()}\n"
        for split in ("train", "valid", "test") for path in (output_dir / split).rglob("*.jpg")
    )
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def test_faults_are_listed_with_reasons_and_good_images_come_out_rgb_at_size(faulty_dataset, tmp_path):
    out = tmp_path / "out"
    assert run(faulty_dataset, out, "--max-bad-fraction", "0.1") == 0
    manifest = manifest_of(out)

    reasons = {entry["path"]: entry["reason"] for entry in manifest["dropped"]}
    assert set(reasons) == set(FAULTS)
    for path, (_, words) in FAULTS.items():
        assert words in reasons[path], (path, reasons[path])
    assert manifest["examined"] == 3 * 20 + len(FAULTS) + len(CONVERTED)
    assert manifest["hidden_files_skipped"] == 1

    assert manifest["classes"] == ["001.Breed_A", "002.Breed_B", "003.Breed_C"]
    assert manifest[contract.CLASS_COUNT_JSON_PATH] == 3
    on_disk = files_on_disk(out)
    assert {split: {c: len(names) for c, names in classes.items()} for split, classes in on_disk.items()} == manifest["counts"]
    assert manifest["counts"]["train"]["002.Breed_B"] == 12 + len(CONVERTED)
    assert {"rgba.png.jpg", "gray.jpg", "palette.png.jpg"} <= set(on_disk["train"]["002.Breed_B"])

    for path in out.rglob("*.jpg"):
        with Image.open(path) as image:
            assert (image.format, image.mode) == ("JPEG", "RGB"), path
            assert min(image.size) == RESIZE, (path, image.size)
            assert image.size == (32, RESIZE)  # 40x30 inputs keep their aspect ratio
    with Image.open(out / "train" / "002.Breed_B" / "rgba.png.jpg") as image:
        transparent, opaque = image.getpixel((2, 12)), image.getpixel((29, 12))
    assert min(transparent) > 235, "transparent pixels should come out white"
    assert opaque[0] > 200 and opaque[1] < 60 and opaque[2] < 60

    assert manifest["content_sha256"] == independent_content_hash(out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest", "test", "train", "valid"]


def test_too_many_bad_files_fail_clearly_and_leave_nothing_behind(faulty_dataset, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(preprocess, "PROCESSING_FAILURE_FILE", str(tmp_path / "no-such-folder" / "message"))
    assert run(faulty_dataset, out) == 2
    assert not (tmp_path / "no-such-folder").exists()
    error = capsys.readouterr().err
    assert f"{len(FAULTS)} of {3 * 20 + len(FAULTS) + len(CONVERTED)} files" in error
    assert "--max-bad-fraction" in error and "train/001.Breed_A/corrupt.png" in error
    assert list(out.iterdir()) == []


def test_the_same_input_gives_the_same_content_with_one_or_two_workers(faulty_dataset, tmp_path):
    assert run(faulty_dataset, tmp_path / "one", "--max-bad-fraction", "0.1") == 0
    assert run(faulty_dataset, tmp_path / "two", "--max-bad-fraction", "0.1", "--workers", "2") == 0
    assert manifest_of(tmp_path / "one") == manifest_of(tmp_path / "two")


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    root = tmp_path / "flat"
    for c, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        write_images(root / f"{c + 1:03d}.Breed_{'ABC'[c]}", 20, color, seed=c)
    return root


def test_class_folders_are_split_stratified_and_reproducibly(class_folders, tmp_path):
    fractions = ["--valid-fraction", "0.2", "--test-fraction", "0.15"]
    assert run(class_folders, tmp_path / "a", *fractions, "--seed", "7") == 0
    assert run(class_folders, tmp_path / "b", *fractions, "--seed", "7") == 0
    assert run(class_folders, tmp_path / "c", *fractions, "--seed", "8") == 0

    manifest = manifest_of(tmp_path / "a")
    assert manifest["layout"] == "class_folders"
    for split, expected in {"train": 13, "valid": 4, "test": 3}.items():
        assert manifest["counts"][split] == dict.fromkeys(manifest["classes"], expected)

    first, again, other = (files_on_disk(tmp_path / name) for name in "abc")
    assert first == again
    assert manifest_of(tmp_path / "b")["content_sha256"] == manifest["content_sha256"]
    assert first != other
    for class_name in manifest["classes"]:
        placed = [name for split in ("train", "valid", "test") for name in first[split][class_name]]
        assert sorted(placed) == [f"img_{i:04d}.jpg" for i in range(20)]  # each image in exactly one split
    assert manifest["content_sha256"] == independent_content_hash(tmp_path / "a")


def test_a_single_enclosing_folder_is_looked_through(tmp_path):
    make_dataset(tmp_path / "unzipped" / "dogImages", per_split={"train": 3, "valid": 1, "test": 1})
    assert run(tmp_path / "unzipped", tmp_path / "out") == 0
    assert manifest_of(tmp_path / "out")["totals"] == {"train": 9, "valid": 3, "test": 3}


def error_of(input_dir: Path, output_dir: Path, *extra: str) -> str:
    with pytest.raises(preprocess.PreprocessError) as caught:
        preprocess.prepare(preprocess.argument_parser().parse_args(
            ["--input", str(input_dir), "--output", str(output_dir), "--resize", str(RESIZE), "--workers", "1", *extra]))
    assert not (output_dir / "manifest").exists()
    return str(caught.value)


def test_classes_that_differ_between_splits_are_refused(tmp_path):
    root = make_dataset(tmp_path / "data", per_split={"train": 3, "valid": 1, "test": 1})
    for path in (root / "valid" / "003.Breed_C").iterdir():
        path.unlink()
    (root / "valid" / "003.Breed_C").rmdir()
    write_images(root / "test" / "004.Breed_D", 1, (0, 0, 0))
    message = error_of(root, tmp_path / "out")
    assert "valid/ lacks 003.Breed_C, 004.Breed_D" in message and "train/ lacks 004.Breed_D" in message


def test_a_class_without_usable_training_images_is_refused(tmp_path):
    root = make_dataset(tmp_path / "data", per_split={"train": 3, "valid": 1, "test": 1})
    for path in (root / "train" / "002.Breed_B").iterdir():
        path.write_bytes(b"")
    message = error_of(root, tmp_path / "out", "--max-bad-fraction", "0.5")
    assert "no usable images in train/002.Breed_B" in message and "3 bad file(s)" in message


def test_fewer_than_two_classes_are_refused(tmp_path):
    write_images(tmp_path / "flat" / "001.Breed_A", 5, (10, 10, 10))
    assert "at least two" in error_of(tmp_path / "flat", tmp_path / "out")


def test_an_empty_input_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no class folders" in error_of(tmp_path / "empty", tmp_path / "out")
    for name in ("001.A", "002.B"):
        (tmp_path / "classes" / name).mkdir(parents=True)
    assert "the input is empty" in error_of(tmp_path / "classes", tmp_path / "out")
    assert "does not exist" in error_of(tmp_path / "missing", tmp_path / "out")


def test_an_incomplete_split_layout_is_refused(tmp_path):
    root = make_dataset(tmp_path / "data", per_split={"train": 2, "test": 1})
    assert "has train/, test/ but not valid/" in error_of(root, tmp_path / "out")


def test_a_class_too_small_to_split_is_refused(tmp_path):
    write_images(tmp_path / "flat" / "001.Breed_A", 5, (10, 10, 10))
    write_images(tmp_path / "flat" / "002.Breed_B", 2, (90, 90, 90))
    assert "class 002.Breed_B has 2 usable image(s)" in error_of(tmp_path / "flat", tmp_path / "out")


def test_an_output_that_already_holds_data_is_refused(dataset, tmp_path):
    (tmp_path / "out" / "train").mkdir(parents=True)
    (tmp_path / "out" / "train" / "old.jpg").write_bytes(b"old")
    assert "not an empty folder" in error_of(dataset, tmp_path / "out")


def test_bad_settings_are_refused_before_any_work(dataset, tmp_path):
    message = error_of(dataset, tmp_path / "out", "--valid-fraction", "0.6", "--test-fraction", "0.5", "--resize", "4")
    assert "leave some images for training" in message and "--resize must be at least 16" in message

"""PrepareData: check every image, convert it to RGB, shrink it, split the set, write a manifest.

    python3 preprocess.py --input /opt/ml/processing/input/data --output /opt/ml/processing/output \
        [--valid-fraction 0.1 --test-fraction 0.1 --resize 256 --max-bad-fraction 0.01 --seed 0]

Input, one of two layouts (a single enclosing folder, as in dogImages.zip, is looked through):
  * ``train/ valid/ test/``, each with one folder per class (``001.Affenpinscher/``): kept as given;
  * one folder per class: split per class by ``--valid-fraction``/``--test-fraction``
    with a fixed ``--seed`` (stratified, reproducible).

Every file inside a class folder is decoded and verified (``common.image_from_bytes``).
Empty, non-image, damaged or truncated files and images above ``--max-pixels`` are
left out and listed with the reason; the run fails when they are more than
``--max-bad-fraction`` of all files. Hidden files (``.DS_Store``) are skipped.
Good images are converted to RGB, resized so the shorter side is ``--resize``
pixels and written as JPEG.

Output:
  ``<output>/{train,valid,test}/<class>/*.jpg`` and ``<output>/manifest/manifest.json``
  with the classes in index order, counts per split and class, the dropped files
  with reasons, and ``content_sha256``, a hash of every written file's path and bytes.

All images are written to a staging folder under ``<output>`` first and moved into
place only when every check has passed; the manifest is written last, atomically.
A failed run leaves no manifest and no split folders behind.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from common import MAX_IMAGE_PIXELS, ImageRejected, atomic_write_json, image_from_bytes, run_script
from contract import MANIFEST_FILE, PROCESSING_FAILURE_FILE, SPLITS, TEST_CHANNEL, TRAIN_CHANNEL, VALID_CHANNEL

DEFAULT_INPUT = "/opt/ml/processing/input/data"
DEFAULT_OUTPUT = "/opt/ml/processing/output"
MANIFEST_DIR = "manifest"
MANIFEST_FORMAT = 1
UNSPLIT = "unsplit"
# A 10000x10 strip would become 256x256000 pixels after the resize.
MAX_ASPECT_RATIO = 20


class PreprocessError(Exception):
    """The input cannot be turned into a usable data set; the message says what to fix."""


@dataclass(frozen=True)
class Candidate:
    """One file found in a class folder and where its prepared copy goes."""

    relative: str  # path under the data root, "/"-separated, for messages and the manifest
    split: str  # a name in SPLITS, or UNSPLIT until a flat input is split
    class_name: str
    output_name: str


@dataclass(frozen=True)
class Outcome:
    candidate: Candidate
    reason: str | None  # None: written
    sha256: str = ""


# ---------------------------------------------------------------- finding the files

def is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name == "__MACOSX"


def visible_children(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not is_hidden(p)), key=lambda p: p.name)


def data_root(input_dir: Path) -> tuple[Path, str]:
    """The folder holding the data and its layout: ``"splits"`` or ``"class_folders"``."""
    if not input_dir.is_dir():
        raise PreprocessError(f"input folder {input_dir} does not exist or is not a folder")
    root = input_dir
    children = visible_children(root)
    folders = [p for p in children if p.is_dir()]
    if len(folders) == 1 and not any(p.is_file() for p in children) and split_folders_in(folders[0]):
        root = folders[0]
    present = split_folders_in(root)
    if not present:
        return root, "class_folders"
    if len(present) < len(SPLITS):
        missing = [s for s in SPLITS if s not in present]
        raise PreprocessError(
            f"{root} has {', '.join(f'{s}/' for s in present)} but not {', '.join(f'{s}/' for s in missing)}: "
            f"give all of {', '.join(SPLITS)} or a folder of class folders to be split"
        )
    return root, "splits"


def split_folders_in(folder: Path) -> list[str]:
    return [s for s in SPLITS if (folder / s).is_dir()]


def class_folders(folder: Path) -> list[Path]:
    return [p for p in visible_children(folder) if p.is_dir()]


def files_under(folder: Path) -> tuple[list[Path], int]:
    """Regular files below ``folder`` in a stable order, and how many hidden ones were skipped."""
    found, hidden = [], 0
    for directory, subdirs, names in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not is_hidden(Path(d)))
        for name in sorted(names):
            path = Path(directory) / name
            if is_hidden(path):
                hidden += 1
            elif path.is_file():
                found.append(path)
    return found, hidden


def output_name(relative_to_class: Path) -> str:
    """A flat ``.jpg`` file name for a file anywhere under its class folder."""
    name = "__".join(relative_to_class.parts)
    return name if name.endswith(".jpg") else f"{name}.jpg"


def class_sets_by_split(root: Path) -> dict[str, list[str]]:
    return {split: [p.name for p in class_folders(root / split)] for split in SPLITS}


def check_same_classes(classes_by_split: dict[str, list[str]], root: Path) -> list[str]:
    """The one class list all splits share; a clear error when they differ."""
    all_classes = sorted(set().union(*classes_by_split.values()))
    problems = []
    for split, classes in classes_by_split.items():
        missing = sorted(set(all_classes) - set(classes))
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            problems.append(f"{split}/ lacks {shown}")
    if problems:
        raise PreprocessError(
            f"the splits in {root} do not have the same class folders: {'; '.join(problems)}. "
            "Every class needs a folder in train/, valid/ and test/"
        )
    return all_classes


def find_candidates(root: Path, layout: str) -> tuple[list[str], list[Candidate], list[tuple[str, str]], int]:
    """Classes, files to prepare, files dropped already (path, reason), and hidden files skipped."""
    if layout == "splits":
        classes = check_same_classes(class_sets_by_split(root), root)
        folders = [(split, root / split) for split in SPLITS]
    else:
        classes = [p.name for p in class_folders(root)]
        folders = [(UNSPLIT, root)]
    if not classes:
        raise PreprocessError(
            f"no class folders in {root}: expected train/, valid/ and test/ each with one folder per class "
            "(such as 001.Affenpinscher/), or one folder per class"
        )
    if len(classes) < 2:
        raise PreprocessError(f"only one class ({classes[0]}) in {root}: a classifier needs at least two class folders")
    candidates, dropped, hidden = [], [], 0
    seen: dict[tuple[str, str, str], str] = {}
    for split, folder in folders:
        for path in visible_children(folder):
            if path.is_file():
                dropped.append((path.relative_to(root).as_posix(), "not inside a class folder"))
        for class_name in classes:
            class_dir = folder / class_name
            files, skipped = files_under(class_dir)
            hidden += skipped
            for path in files:
                relative = path.relative_to(root).as_posix()
                name = output_name(path.relative_to(class_dir))
                key = (split, class_name, name)
                if key in seen:
                    dropped.append((relative, f"its output name {name} is taken by {seen[key]}"))
                    continue
                seen[key] = relative
                candidates.append(Candidate(relative, split, class_name, name))
    if not candidates:
        raise PreprocessError(f"no files in the class folders of {root}: the input is empty")
    return classes, candidates, dropped, hidden


# ---------------------------------------------------------------- preparing one image

def resized(image: Image.Image, short_side: int) -> Image.Image:
    """The image scaled so that its shorter side is exactly ``short_side`` pixels."""
    width, height = image.size
    if width <= height:
        size = (short_side, max(short_side, round(height * short_side / width)))
    else:
        size = (max(short_side, round(width * short_side / height)), short_side)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def jpeg_bytes(data: bytes, short_side: int, max_pixels: int, quality: int) -> bytes:
    """The prepared JPEG for one input file; ``ImageRejected`` when the file is unusable."""
    image = image_from_bytes(data, max_pixels=max_pixels)
    width, height = image.size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageRejected(f"{width}x{height} is more than {MAX_ASPECT_RATIO} times as long as it is wide")
    buffer = io.BytesIO()
    resized(image, short_side).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@dataclass(frozen=True)
class Job:
    candidate: Candidate
    source: Path
    destination: Path
    short_side: int
    max_pixels: int
    quality: int


def prepare_one(job: Job) -> Outcome:
    try:
        data = job.source.read_bytes()
    except OSError as error:
        return Outcome(job.candidate, f"cannot be read: {error.strerror or error}")
    try:
        prepared = jpeg_bytes(data, job.short_side, job.max_pixels, job.quality)
    except ImageRejected as error:
        return Outcome(job.candidate, error.reason)
    job.destination.parent.mkdir(parents=True, exist_ok=True)
    job.destination.write_bytes(prepared)
    return Outcome(job.candidate, None, hashlib.sha256(prepared).hexdigest())


def run_jobs(jobs: Sequence[Job], workers: int) -> list[Outcome]:
    if workers <= 1 or len(jobs) < 2 * workers:
        return [prepare_one(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(prepare_one, jobs, chunksize=32))


# ---------------------------------------------------------------- splitting and checks

def split_counts(total: int, valid_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, valid, test) sizes for one class: at least one image in each."""
    test = max(1, round(total * test_fraction))
    valid = max(1, round(total * valid_fraction))
    return total - valid - test, valid, test


def assign_splits(outcomes: list[Outcome], valid_fraction: float, test_fraction: float, seed: int) -> list[Outcome]:
    """Stratified split of a flat input: the same files go to the same splits for the same seed."""
    by_class: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_class.setdefault(outcome.candidate.class_name, []).append(outcome)
    assigned = []
    for class_name in sorted(by_class):
        members = sorted(by_class[class_name], key=lambda o: o.candidate.output_name)
        train, valid, _ = split_counts(len(members), valid_fraction, test_fraction)
        if train < 1:
            raise PreprocessError(
                f"class {class_name} has {len(members)} usable image(s): splitting it needs at least 3 "
                "(one each for train, valid and test)"
            )
        random.Random(f"{seed}/{class_name}").shuffle(members)
        for position, outcome in enumerate(members):
            split = TRAIN_CHANNEL if position < train else VALID_CHANNEL if position < train + valid else TEST_CHANNEL
            c = outcome.candidate
            assigned.append(Outcome(Candidate(c.relative, split, c.class_name, c.output_name), None, outcome.sha256))
    return assigned


def counts_by_split(written: Iterable[Outcome], classes: list[str]) -> dict[str, dict[str, int]]:
    counts = {split: dict.fromkeys(classes, 0) for split in SPLITS}
    for outcome in written:
        counts[outcome.candidate.split][outcome.candidate.class_name] += 1
    return counts


def check_every_class_present(counts: dict[str, dict[str, int]], dropped_count: int) -> None:
    empty = [f"{split}/{name}" for split in SPLITS for name, count in counts[split].items() if count == 0]
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise PreprocessError(
            f"no usable images in {shown} (after leaving out {dropped_count} bad file(s)): "
            "every class needs at least one image in train, valid and test"
        )


def check_bad_fraction(dropped: list[tuple[str, str]], examined: int, limit: float) -> float:
    fraction = len(dropped) / examined if examined else 0.0
    if fraction > limit:
        listed = "; ".join(f"{path}: {reason}" for path, reason in dropped[:5])
        more = f"; and {len(dropped) - 5} more" if len(dropped) > 5 else ""
        raise PreprocessError(
            f"{len(dropped)} of {examined} files ({fraction:.2%}) are unusable, above --max-bad-fraction "
            f"{limit:.2%}: {listed}{more}. Fix or remove them, or raise --max-bad-fraction"
        )
    return fraction


def content_sha256(written: Iterable[Outcome]) -> str:
    """sha256 over the sorted lines ``<split>/<class>/<file>\\t<sha256 of the file>``."""
    lines = sorted(f"{o.candidate.split}/{o.candidate.class_name}/{o.candidate.output_name}\t{o.sha256}\n" for o in written)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# ---------------------------------------------------------------- output

def check_output_empty(output_dir: Path) -> None:
    for name in (*SPLITS, MANIFEST_DIR):
        folder = output_dir / name
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise PreprocessError(
                f"{folder} already exists and is not an empty folder: write into an empty --output "
                "so that a new data set is never mixed with an older one"
            )


def move_into_place(staging: Path, output_dir: Path) -> None:
    """Move the staged class folders into the split folders (a rename, or a copy across file systems)."""
    for split in SPLITS:
        target = output_dir / split
        target.mkdir(parents=True, exist_ok=True)
        source = staging / split
        for class_dir in sorted(source.iterdir()) if source.is_dir() else []:
            shutil.move(str(class_dir), str(target / class_dir.name))


# ---------------------------------------------------------------- the run

def prepare(args: argparse.Namespace) -> dict:
    """Prepare the data set described by ``args``; return the manifest written."""
    check_settings(args)
    input_dir, output_dir = Path(args.input), Path(args.output)
    check_output_empty(output_dir)
    root, layout = data_root(input_dir)
    classes, candidates, dropped, hidden = find_candidates(root, layout)
    examined = len(candidates) + len(dropped)
    print(f"{layout} layout in {root}: {len(classes)} classes, {examined} files", flush=True)

    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=output_dir))
    try:
        jobs = [
            Job(c, root / c.relative, staging / c.split / c.class_name / c.output_name, args.resize, args.max_pixels, args.jpeg_quality)
            for c in candidates
        ]
        outcomes = run_jobs(jobs, args.workers)
        dropped += [(o.candidate.relative, o.reason) for o in outcomes if o.reason is not None]
        dropped.sort()
        for path, reason in dropped:
            print(f"dropped {path}: {reason}", flush=True)
        bad_fraction = check_bad_fraction(dropped, examined, args.max_bad_fraction)
        written = [o for o in outcomes if o.reason is None]
        if layout == "class_folders":
            written = assign_splits(written, args.valid_fraction, args.test_fraction, args.seed)
            for o in written:
                destination = staging / o.candidate.split / o.candidate.class_name / o.candidate.output_name
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / UNSPLIT / o.candidate.class_name / o.candidate.output_name, destination)
        counts = counts_by_split(written, classes)
        check_every_class_present(counts, len(dropped))
        manifest = {
            "format": MANIFEST_FORMAT,
            "layout": layout,
            "classes": classes,
            "class_count": len(classes),
            "counts": counts,
            "totals": {split: sum(counts[split].values()) for split in SPLITS},
            "examined": examined,
            "dropped": [{"path": path, "reason": reason} for path, reason in dropped],
            "dropped_fraction": bad_fraction,
            "hidden_files_skipped": hidden,
            "settings": {
                "resize": args.resize,
                "valid_fraction": args.valid_fraction if layout == "class_folders" else None,
                "test_fraction": args.test_fraction if layout == "class_folders" else None,
                "seed": args.seed if layout == "class_folders" else None,
                "max_bad_fraction": args.max_bad_fraction,
                "max_pixels": args.max_pixels,
                "jpeg_quality": args.jpeg_quality,
            },
            "content_sha256": content_sha256(written),
        }
        move_into_place(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write_json(output_dir / MANIFEST_DIR / MANIFEST_FILE, manifest)
    totals = ", ".join(f"{split} {count}" for split, count in manifest["totals"].items())
    print(f"wrote {totals} images and {MANIFEST_DIR}/{MANIFEST_FILE}; dropped {len(dropped)}", flush=True)
    return manifest


def check_settings(args: argparse.Namespace) -> None:
    problems = []
    for name in ("valid_fraction", "test_fraction"):
        value = getattr(args, name)
        if not 0 < value < 1:
            problems.append(f"--{name.replace('_', '-')} must be between 0 and 1, got {value}")
    if args.valid_fraction + args.test_fraction >= 1:
        problems.append("--valid-fraction and --test-fraction must leave some images for training")
    if not 0 <= args.max_bad_fraction <= 1:
        problems.append(f"--max-bad-fraction must be between 0 and 1, got {args.max_bad_fraction}")
    if args.resize < 16:
        problems.append(f"--resize must be at least 16 pixels, got {args.resize}")
    if args.max_pixels < 1:
        problems.append(f"--max-pixels must be positive, got {args.max_pixels}")
    if not 1 <= args.jpeg_quality <= 95:
        problems.append(f"--jpeg-quality must be between 1 and 95, got {args.jpeg_quality}")
    if problems:
        raise PreprocessError("; ".join(problems))


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", default=DEFAULT_INPUT, help="raw data: train/valid/test folders, or class folders")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="where train/, valid/, test/ and manifest/ are written")
    parser.add_argument("--valid-fraction", type=float, default=0.1, help="share of each class for valid/ when splitting class folders")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="share of each class for test/ when splitting class folders")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    parser.add_argument("--resize", type=int, default=256, help="shorter side of the written images, in pixels")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01, help="fail when more than this share of files is unusable")
    parser.add_argument("--max-pixels", type=int, default=MAX_IMAGE_PIXELS, help="refuse images with more pixels than this")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes decoding images")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_script("preprocess.py", PROCESSING_FAILURE_FILE, lambda: argument_parser().parse_args(argv), prepare, (PreprocessError,))


if __name__ == "__main__":
    sys.exit(main())

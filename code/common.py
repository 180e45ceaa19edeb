"""Model and image transforms shared by train.py, evaluate.py and inference.py.

Runs inside the SageMaker PyTorch containers: torch, torchvision, Pillow and
the standard library only.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import sys
import traceback
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torchvision import models, transforms

from contract import CLASSES_FILE, MODEL_FILE, MODEL_INFO_FILE

BACKBONES = ("resnet18", "resnet34", "resnet50")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224


def resize_size(image_size: int) -> int:
    """Shorter side before the center crop (256 for 224, as in the ImageNet recipe)."""
    return int(round(image_size * 256 / 224))


def eval_transform(image_size: int = DEFAULT_IMAGE_SIZE) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(resize_size(image_size)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# The smallest share of an image's area a random training crop keeps: milder than ImageNet's 0.08,
# since the tuned runs are short and a breed's cues (ears, muzzle) fill only part of a photo.
DEFAULT_CROP_SCALE = 0.25


def train_transform(image_size: int = DEFAULT_IMAGE_SIZE, augment: bool = True, crop_scale: float = DEFAULT_CROP_SCALE,
                    flip: bool = True) -> transforms.Compose:
    """A random crop of ``crop_scale`` to all of the image's area, resized to ``image_size``, mirrored half the
    time with ``flip``; without ``augment`` the evaluation transform."""
    if not augment:
        return eval_transform(image_size)
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(crop_scale, 1.0)),
        *([transforms.RandomHorizontalFlip()] if flip else []),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def build_model(backbone: str, num_classes: int) -> nn.Module:
    """The backbone with a new classification head; weights are loaded separately."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    model = getattr(models, backbone)(weights=None)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def model_description(model_dir: str | os.PathLike, also_needed: Sequence[str] = ()) -> tuple[list[str], dict[str, Any]]:
    """(classes, model info) of a model directory, which must also hold the files ``also_needed``."""
    model_dir = Path(model_dir)
    for name in (*also_needed, CLASSES_FILE, MODEL_INFO_FILE):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} is missing: is {model_dir} the output of train.py?")
    classes = json.loads((model_dir / CLASSES_FILE).read_text(encoding="utf-8"))
    return classes, json.loads((model_dir / MODEL_INFO_FILE).read_text(encoding="utf-8"))


def load_model_dir(model_dir: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, list[str], dict[str, Any]]:
    """Rebuild the trained model from a model directory: weights, classes, info."""
    model_dir = Path(model_dir)
    classes, info = model_description(model_dir, (MODEL_FILE,))
    model = build_model(info["backbone"], len(classes))
    state = torch.load(model_dir / MODEL_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    return model, classes, info


def channel_variable(channel: str) -> str:
    """The variable in which the training toolkit gives a channel's folder: ``SM_CHANNEL_`` and the name in capitals."""
    return f"SM_CHANNEL_{channel.upper()}"


# SageMaker shows the first 1 KB of a job's failure file (FailureReason, ExitMessage).
FAILURE_MESSAGE_LIMIT = 1024


def write_failure_message(path: str | os.PathLike, message: str) -> bool:
    """Write ``message`` (UTF-8, cut to 1 KB) to a SageMaker job's failure file; True if written.

    Only when the file's folder exists, as it does inside a job, so a local run writes
    nothing under /opt/ml. Written through a temporary file and renamed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return False
    data = message.encode("utf-8")[:FAILURE_MESSAGE_LIMIT].decode("utf-8", "ignore").encode("utf-8")
    atomic_write(path, lambda temporary: temporary.write_bytes(data))
    return True


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """``write(temporary)`` into a temporary file beside ``path``, then rename it to ``path``,
    so no reader ever sees half a file and a failed write leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_dir(path: str | os.PathLike, fill: Callable[[Path], Any]) -> None:
    """``fill(temporary)`` fills a temporary folder beside ``path``, which then replaces ``path`` as a whole."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        fill(temporary)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    """``value`` as indented UTF-8 JSON, written atomically."""
    text = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


Parsed = TypeVar("Parsed")
USAGE_EXIT_CODE = 2
FAILURE_EXIT_CODE = 1


def argument_error_line(script: str, argparse_output: str) -> str:
    """The ``<script>: error: ...`` line of what argparse printed before it exited."""
    lines = [line.strip() for line in argparse_output.splitlines() if line.strip()]
    for line in reversed(lines):
        if ": error: " in line:
            return f"{script}: error: {line.split(': error: ', 1)[1]}"
    return f"{script}: error: {lines[-1] if lines else 'invalid arguments'}"


def job_failure_file(default: str | os.PathLike) -> Path:
    """The failure file: ``default`` (under /opt/ml/output), or the same name in ``$SM_OUTPUT_DIR``.

    The training toolkit sets SM_OUTPUT_DIR from SAGEMAKER_BASE_DIR, which is /opt/ml in the
    container and the job's own folder when the toolkit runs elsewhere (local-run, tests); it
    writes its own failure file there too, unless the script wrote one first.
    """
    output_dir = os.environ.get("SM_OUTPUT_DIR")
    return Path(output_dir) / Path(default).name if output_dir else Path(default)


def report_failure(failure_file: str | os.PathLike, line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    write_failure_message(job_failure_file(failure_file), line)


def run_script(script: str, failure_file: str | os.PathLike, parse: Callable[[], Parsed],
               run: Callable[[Parsed], Any], expected: tuple[type[BaseException], ...]) -> int:
    """A container script's main: every failure ends as one ``<script>: error: ...`` line.

    The line goes to stderr and to the job's failure file (``/opt/ml/output/failure``
    for training, ``/opt/ml/output/message`` for processing), which SageMaker shows as
    the job's FailureReason or ExitMessage. This covers argparse's refusals too (an
    unknown hyperparameter, a bad value), which exit before any script code runs:
    argparse's usage and error line stay in the log and its error line becomes the message.
    ``expected`` are the script's own input errors (exit 2, no traceback); anything
    else is reported with its type and exits 1, its traceback in the log.
    """
    captured = io.StringIO()
    try:
        with redirect_stderr(captured):
            parsed = parse()
    except SystemExit as stop:
        sys.stderr.write(captured.getvalue())
        if stop.code in (0, None):
            return 0
        write_failure_message(job_failure_file(failure_file), argument_error_line(script, captured.getvalue()))
        return stop.code if isinstance(stop.code, int) else USAGE_EXIT_CODE
    sys.stderr.write(captured.getvalue())
    try:
        run(parsed)
    except expected as error:
        report_failure(failure_file, f"{script}: error: {error}")
        return USAGE_EXIT_CODE
    except Exception as error:
        traceback.print_exc()
        report_failure(failure_file, f"{script}: error: {type(error).__name__}: {error}")
        return FAILURE_EXIT_CODE
    return 0


# Images are refused above this many pixels before they are decoded (decompression
# bombs); 50 megapixels is more than any camera photo of a dog needs.
MAX_IMAGE_PIXELS = 50_000_000


class ImageRejected(ValueError):
    """Bytes that are not a usable image; the message says why in a few words.

    ``too_large`` tells a too-many-pixels refusal (HTTP 413) from bytes that are
    empty, not an image or damaged (HTTP 400).
    """

    def __init__(self, reason: str, too_large: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.too_large = too_large


def rgb_image(image: Image.Image) -> Image.Image:
    """The image upright (EXIF orientation applied) in 8-bit RGB, transparent parts on white.

    Training data (preprocess.py) and endpoint requests (inference.py) both pass
    through here, so the model sees the same kind of pixels in both.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        # 16/32-bit grayscale: a plain convert would clip everything above 255 to white.
        image = image.convert("I").point(lambda value: value / 257).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def image_from_bytes(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, formats: Sequence[str] | None = None,
                     draft_side: int | None = None) -> Image.Image:
    """Decode, verify and convert one image (see ``rgb_image``); raise ``ImageRejected`` if unusable.

    The pixel count is read from the header and checked before any decoding. The
    data is decoded twice: ``verify`` finds damage that a plain decode lets pass
    (a PNG checksum), a full ``load`` finds truncation. With ``draft_side`` a JPEG is decoded at the
    smallest DCT scale (1/2, 1/4, 1/8) whose width and height stay at least ``draft_side``, which
    is several times faster for a large photo that is resized to that side anyway.
    """
    if not data:
        raise ImageRejected("empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=formats) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(f"{width}x{height} is {width * height:,} pixels, above the limit of {max_pixels:,}", too_large=True)
            image.verify()
        with Image.open(io.BytesIO(data), formats=formats) as image:
            if draft_side and image.format == "JPEG":
                image.draft(None, (draft_side, draft_side))
            image.load()
            return rgb_image(image)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as error:
        raise ImageRejected(f"too many pixels: {error}", too_large=True) from None
    except UnidentifiedImageError:
        allowed = f" (accepted: {', '.join(formats)})" if formats else ""
        raise ImageRejected(f"not an image in a format Pillow can read{allowed}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as error:
        raise ImageRejected(f"damaged or truncated image data: {error}") from None

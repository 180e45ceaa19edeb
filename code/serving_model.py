"""How the endpoint runs the trained network: optimized fp32, or static int8 for x86 CPUs.

Both are prepared by ``model_fn`` on the serving torch itself (the inference image runs
another torch than training, so nothing compiled at training time is shipped):

* **fp32** (the default): the eager network traced with TorchScript, frozen (weights become
  constants, batch norm folded into the convolutions) and passed through
  ``torch.jit.optimize_for_inference`` (oneDNN convolutions on CPU). Before it is used, its
  probabilities are compared with the eager network's on real images (the calibration
  sample) or generated ones; any failure or a difference above ``FP32_TOLERANCE`` logs one
  line and the eager network is served.
* **int8**: static post-training quantization with PyTorch's FX graph mode and the x86
  backend (fbgemm/oneDNN kernels, VNNI where the CPU has it), calibrated on the validation
  images ``train.py`` stores in ``calibration/`` of the model directory. Only CPUs run it; its
  accuracy is verified by ``evaluate.py``, which decides what is served (``precision_decision``).

Also used by evaluate.py (the same quantization, on the same calibration sample).
torch, torchvision, Pillow and the standard library only.
"""
from __future__ import annotations

import copy
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from PIL import Image
from torch import nn

from common import rgb_image
from contract import CALIBRATION_DIR, DEFAULT_PRECISION, INFERENCE_PRECISION_ENV, PRECISIONS

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4  # most a probability of the optimized network may differ from the eager one
MAX_INT8_ACCURACY_DROP = 0.01  # int8 is served only if its test top-1 is at most 1 point below fp32's
CALIBRATION_SUFFIXES = (".jpg", ".jpeg", ".png")
VERIFICATION_IMAGES = 4


class QuantizationFailed(RuntimeError):
    """The int8 model cannot be built here; the message says why."""


@dataclass
class ServedNetwork:
    """The callable that answers requests, and how it was made."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    precision: str  # "fp32" or "int8"
    runtime: str  # "torchscript" or "eager"
    channels_last: bool = False
    note: str = ""  # why it is not what was asked for, if it is not


# ---------------------------------------------------------------- settings and inputs

def requested_precision(environ: Mapping[str, str] = os.environ) -> str:
    """The precision the model package asks for (``DOGBREED_INFERENCE_PRECISION``), fp32 when unset."""
    value = environ.get(INFERENCE_PRECISION_ENV, "").strip().lower() or DEFAULT_PRECISION
    if value not in PRECISIONS:
        raise ValueError(f"{INFERENCE_PRECISION_ENV}={environ[INFERENCE_PRECISION_ENV]!r} is not a precision this "
                         f"endpoint serves; set it to one of {', '.join(PRECISIONS)} (or leave it unset for {DEFAULT_PRECISION})")
    return value


def calibration_files(model_dir: str | os.PathLike) -> list[Path]:
    folder = Path(model_dir) / CALIBRATION_DIR
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in CALIBRATION_SUFFIXES and path.is_file())


def calibration_batch(model_dir: str | os.PathLike, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor | None:
    """The stored calibration images through the evaluation transform, as one batch; None if there are none."""
    tensors = []
    for path in calibration_files(model_dir):
        with Image.open(path) as image:
            image.load()
            tensors.append(transform(rgb_image(image)))
    return torch.stack(tensors) if tensors else None


def generated_batch(image_size: int, count: int = 2) -> torch.Tensor:
    """Normalized-looking inputs for checking a prepared network when no real images are stored."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, 3, image_size, image_size, generator=generator)


# ---------------------------------------------------------------- fp32

def probability_difference(first: Callable, first_batch: torch.Tensor, second: Callable, second_batch: torch.Tensor) -> float:
    """Largest difference between the softmax outputs of two networks, each on its batch (the same images)."""
    with torch.inference_mode():
        first_probabilities = torch.softmax(first(first_batch).float(), 1)
        return (first_probabilities - torch.softmax(second(second_batch).float(), 1)).abs().max().item()


def traced_fp32(network: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """The network traced on ``example``, frozen and optimized for inference."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notices; the serving torch (2.6) supports it
        traced = torch.jit.trace(network.eval(), example, check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))


def optimized_fp32(network: nn.Module, batch: torch.Tensor, channels_last: bool = True) -> ServedNetwork:
    """The traced network when it matches the eager one on ``batch``, else the eager network (one log line).

    ``batch`` holds at least two images: the network is traced on the first and checked
    on all, so control flow that depends on the input shows up as a difference.
    """
    try:
        channels_last = channels_last and batch.device.type == "cpu"
        traced_input = batch.contiguous(memory_format=torch.channels_last) if channels_last else batch
        source = copy.deepcopy(network).to(memory_format=torch.channels_last) if channels_last else network
        prepared = traced_fp32(source, traced_input[:1])
        difference = probability_difference(prepared, traced_input, network, batch)
        if not difference <= FP32_TOLERANCE:
            raise ValueError(f"its probabilities differ from the eager network's by {difference:.2e} "
                             f"(more than {FP32_TOLERANCE:.0e})")
    except Exception as error:
        note = f"serving the eager network: the optimized fp32 network could not be prepared ({type(error).__name__}: {error})"
        log.warning(note.splitlines()[0])
        return ServedNetwork(network, "fp32", "eager", note=note)
    return ServedNetwork(prepared, "fp32", "torchscript", channels_last=channels_last)


# ---------------------------------------------------------------- int8

def quantization_engine() -> str:
    engines = torch.backends.quantized.supported_engines
    for engine in ("x86", "fbgemm"):
        if engine in engines:
            return engine
    raise QuantizationFailed(f"this torch has no x86 quantized engine (it has {', '.join(engines) or 'none'})")


def quantized_int8(network: nn.Module, calibration: torch.Tensor, batch_size: int = 8) -> torch.jit.ScriptModule:
    """Static int8 for x86: FX graph mode with the x86 qconfig, calibrated on ``calibration``, traced and frozen.

    Raises QuantizationFailed (with the cause) when it cannot be built.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if calibration is None or len(calibration) == 0:
        raise QuantizationFailed(f"the model has no calibration images ({CALIBRATION_DIR}/ in the model directory)")
    engine = quantization_engine()
    torch.backends.quantized.engine = engine
    calibration = calibration.cpu()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The classifier head (a ResNet's fc, the only Linear) stays fp32: it costs little, and 8-bit
            # logits tie often enough to flip the top class (measured: 99.5% top-1 agreement instead of 96.5%).
            mapping = get_default_qconfig_mapping(engine).set_object_type(nn.Linear, None)
            prepared = prepare_fx(copy.deepcopy(network).cpu().eval(), mapping, (calibration[:1],))
            with torch.inference_mode():
                for start in range(0, len(calibration), batch_size):
                    prepared(calibration[start:start + batch_size])
            quantized = convert_fx(prepared)
            with torch.no_grad():
                return torch.jit.freeze(torch.jit.trace(quantized, calibration[:1], check_trace=False).eval())
    except Exception as error:
        raise QuantizationFailed(f"quantization failed: {type(error).__name__}: {error}") from error


# ---------------------------------------------------------------- what model_fn serves

def served_network(network: nn.Module, device: torch.device, precision: str, calibration: torch.Tensor | None,
                   image_size: int) -> ServedNetwork:
    """What the endpoint runs for ``precision``; int8 that cannot be built here falls back to fp32, logged."""
    note = ""
    if precision == "int8":
        try:
            if device.type != "cpu":
                raise QuantizationFailed(f"int8 runs on CPUs only and this endpoint serves on {device}")
            return ServedNetwork(quantized_int8(network, calibration), "int8", "torchscript")
        except QuantizationFailed as error:
            note = f"int8 was asked for but cannot be served ({error}); serving fp32"
            log.warning(note)
    check = calibration[:VERIFICATION_IMAGES] if calibration is not None and len(calibration) >= 2 else generated_batch(image_size)
    served = optimized_fp32(network, check.to(device))
    if note:
        served.note = f"{note}. {served.note}".strip()
    return served


def precision_decision(requested: str, fp32_accuracy: float, int8_accuracy: float | None,
                       int8_problem: str = "") -> tuple[str, str]:
    """(served precision, why): int8 only when asked for and its top-1 is within 1 point of fp32's."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return "fp32", "fp32 was requested (InferencePrecision=fp32)"
    if int8_accuracy is None:
        return "fp32", f"int8 was requested but could not be measured: {int8_problem or 'no int8 model'}"
    drop = fp32_accuracy - int8_accuracy
    if drop > MAX_INT8_ACCURACY_DROP + 1e-12:
        return "fp32", (f"int8 was requested but its top-1 accuracy {int8_accuracy:.4f} is {drop * 100:.2f} points "
                        f"below fp32's {fp32_accuracy:.4f}, more than the {MAX_INT8_ACCURACY_DROP * 100:.0f} point allowed")
    return "int8", (f"int8 was requested and its top-1 accuracy {int8_accuracy:.4f} is within "
                    f"{MAX_INT8_ACCURACY_DROP * 100:.0f} point of fp32's {fp32_accuracy:.4f}")

"""How the endpoint runs the trained network: fp32 TorchScript, or static int8 for x86 CPUs.

The serving network is built once, by evaluate.py on the inference image (the endpoint's torch),
measured on the test split and saved as the **serving artifact** (``contract.SERVING_MODEL_FILE``,
``torch.jit.save``) in the model archive the pipeline registers; ``model_info.json`` records it
under ``contract.SERVING_INFO_KEY``. ``model_fn`` loads that file (``stored_network``) when the
running torch can load it (``artifact_unusable``), and otherwise builds the network from the state
dict on its own torch (``served_network``), saying why in one log line:

* **fp32**: the eager network traced with TorchScript and frozen (weights become constants,
  batch norm folded into the convolutions), channels-last. The artifact stops there:
  ``torch.jit.optimize_for_inference``'s oneDNN graph cannot be loaded back from a file by
  this torch (``torch.jit.load`` fails on its constants), so only a network built at start-up
  gets that pass. Before it is used, its probabilities are compared with the eager
  network's on real images (the calibration sample) or generated ones; any failure or a
  difference above ``FP32_TOLERANCE`` logs one line and the eager network is served.
* **int8**: static post-training quantization with PyTorch's FX graph mode and the x86
  backend (fbgemm/oneDNN kernels, VNNI where the CPU has it), calibrated on the validation
  images ``train.py`` stores in ``calibration/`` of the model directory, traced and frozen.
  Only CPUs run it; its accuracy is verified by ``evaluate.py``, which decides what is served
  (``precision_decision``).

torch, torchvision, Pillow and the standard library only.
"""
from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from PIL import Image
from torch import nn

from common import rgb_image
from contract import (CALIBRATION_DIR, DEFAULT_PRECISION, INFERENCE_PRECISION_ENV, PRECISIONS, SERVING_INFO_KEY,
                      SERVING_MODEL_FILE)

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4  # most a probability of the optimized network may differ from the eager one
MAX_INT8_ACCURACY_DROP = 0.01  # int8 is served only if its test top-1 is at most 1 point below fp32's
CALIBRATION_SUFFIXES = (".jpg", ".jpeg", ".png")
VERIFICATION_IMAGES = 4


class QuantizationFailed(RuntimeError):
    """The int8 model cannot be built here; the message says why."""


class ArtifactRefused(RuntimeError):
    """The model archive's serving artifact is corrupt or unreadable: it must never be served."""


@dataclass
class ServedNetwork:
    """The callable that answers requests, and how it was made."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    precision: str  # "fp32" or "int8"
    runtime: str  # "torchscript" or "eager"
    channels_last: bool = False
    note: str = ""  # why it is not what was asked for, if it is not

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits of one batch (the network's own memory format)."""
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return self.forward(batch)


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


def traced_fp32(network: nn.Module, example: torch.Tensor, optimize: bool = True) -> torch.jit.ScriptModule:
    """The network traced on ``example`` and frozen; optimized for inference unless ``optimize`` is False
    (which a network to be saved needs: see the module's docstring)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notices; the serving torch (2.6) supports it
        frozen = torch.jit.freeze(torch.jit.trace(network.eval(), example, check_trace=False).eval())
        return torch.jit.optimize_for_inference(frozen) if optimize else frozen


def optimized_fp32(network: nn.Module, batch: torch.Tensor, channels_last: bool = True, optimize: bool = True) -> ServedNetwork:
    """The traced network when it matches the eager one on ``batch``, else the eager network (one log line).

    ``batch`` holds at least two images: the network is traced on the first and checked
    on all, so control flow that depends on the input shows up as a difference.
    """
    try:
        channels_last = channels_last and batch.device.type == "cpu"
        traced_input = batch.contiguous(memory_format=torch.channels_last) if channels_last else batch
        source = copy.deepcopy(network).to(memory_format=torch.channels_last) if channels_last else network
        prepared = traced_fp32(source, traced_input[:1], optimize)
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
                   image_size: int, optimize: bool = True) -> ServedNetwork:
    """What the endpoint runs for ``precision``; int8 that cannot be built here falls back to fp32, logged.

    ``optimize=False`` builds the fp32 network that can be saved as the serving artifact."""
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
    served = optimized_fp32(network, check.to(device), optimize=optimize)
    if note:
        served.note = f"{note}. {served.note}".strip()
    return served


# ---------------------------------------------------------------- the serving artifact

def saved_artifact(served: ServedNetwork, model_dir: str | os.PathLike) -> dict:
    """Save ``served`` (a TorchScript network) as the model directory's serving artifact; its model_info.json record."""
    if served.runtime != "torchscript":
        raise ValueError(f"only a TorchScript network can be saved as the serving artifact, not a {served.runtime} one")
    path = Path(model_dir) / SERVING_MODEL_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.save's deprecation notice
        torch.jit.save(served.forward, str(path))
    return {"file": SERVING_MODEL_FILE, "precision": served.precision, "channels_last": served.channels_last,
            "device": "cpu", "torch_version": torch.__version__, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def artifact_unusable(record: Mapping | None, precision: str, device: torch.device) -> str:
    """Why this process cannot serve the recorded artifact ("" when it can).

    It can when model_info.json records one, for the precision asked for, saved by exactly the
    running torch (``torch.__version__``, build label included: a TorchScript file holds
    operator versions and prepacked quantized weights of the torch that wrote it) for the
    device this process serves on.
    """
    if not record:
        return "the model has no serving artifact (it is the training job's archive, not the evaluation's)"
    if record.get("precision") != precision:
        return f"its serving artifact is {record.get('precision')} and {precision} is asked for"
    if record.get("torch_version") != torch.__version__:
        return f"its serving artifact was built by torch {record.get('torch_version')} and this is torch {torch.__version__}"
    if record.get("device") != device.type:
        return f"its serving artifact runs on {record.get('device')} and this endpoint serves on {device.type}"
    return ""


def loaded_artifact(model_dir: str | os.PathLike, record: Mapping) -> ServedNetwork:
    """The stored serving artifact, loaded from the bytes whose sha256 matched the record.

    Raises ArtifactRefused when the file is missing, differs from the record or cannot be loaded.
    The hash is computed while torch reads the same bytes (hashlib releases the GIL), so checking
    costs little more than loading.
    """
    path = Path(model_dir) / str(record.get("file", SERVING_MODEL_FILE))
    remedy = "the model archive is damaged; register and deploy the archive of the Evaluate step again"
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ArtifactRefused(f"the serving artifact {path} recorded in model_info.json cannot be read "
                              f"({error.strerror or error}): {remedy}") from None
    digest: list[str] = []
    hashing = threading.Thread(target=lambda: digest.append(hashlib.sha256(data).hexdigest()))
    hashing.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            network = torch.jit.load(io.BytesIO(data), map_location="cpu")
        problem = ""
    except Exception as error:
        network, problem = None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    hashing.join()
    if digest[0] != record.get("sha256"):
        raise ArtifactRefused(f"the serving artifact {path} has sha256 {digest[0]}, not the {record.get('sha256')} "
                              f"recorded in model_info.json: {remedy}")
    if network is None:
        raise ArtifactRefused(f"the serving artifact {path} cannot be loaded by torch {torch.__version__} ({problem}): {remedy}")
    return ServedNetwork(network.eval(), str(record["precision"]), "torchscript", channels_last=bool(record.get("channels_last")))


def stored_network(model_dir: str | os.PathLike, info: Mapping, precision: str, device: torch.device) -> tuple[ServedNetwork | None, str]:
    """(the stored serving artifact, "") when this process can serve it, else (None, why not).

    Raises ArtifactRefused for an artifact that is recorded and usable here but corrupt."""
    record = info.get(SERVING_INFO_KEY)
    why = artifact_unusable(record, precision, device)
    return (None, why) if why else (loaded_artifact(model_dir, record), "")


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

"""The backbone's pretrained weights, and the model before training.

Where the weights come from is resolved once per job (``pretrained_source``: the
pretrained channel's folder is listed there and nowhere else), and the result is
passed on: to the frozen-backbone rule, to the initial model, to the features' weights id
and to ``model_info.json``. ``train.py`` builds its model with ``initial_model`` and
``extract_features.py`` builds the same backbone with it, so the features it writes are
exactly what a training job's frozen backbone computes.

Runs inside SageMaker's PyTorch containers: torch, torchvision and the standard library only.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torchvision import models

import common
import contract
import distributed
from arguments import TrainingInputError

WEIGHTS_SUFFIXES = (".pth", ".pt", ".bin")
# The pipeline parameter whose S3 URI becomes the pretrained channel (steps/parameters.py).
PRETRAINED_URI_PARAMETER = "PretrainedWeightsS3Uri"


def channel_weights() -> Path | None:
    """The state dict file in the pretrained channel; None without the channel or when it holds the placeholder.

    The definition cannot leave an input out at run time, and SageMaker refuses an
    empty S3 URI, so ``PretrainedWeightsS3Uri`` defaults to an object every job
    has: the job's own code archive. A channel holding only that file means
    "no weights supplied".
    """
    folder = os.environ.get(common.channel_variable(contract.PRETRAINED_CHANNEL))
    if not folder:
        return None
    path = Path(folder)
    names = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else []
    if names == [contract.NO_WEIGHTS_PLACEHOLDER]:
        return None
    if path.is_dir() and not any(Path(name).suffix in WEIGHTS_SUFFIXES for name in names):
        raise TrainingInputError(
            f"the '{contract.PRETRAINED_CHANNEL}' channel ({path}) holds no state dict file "
            f"({', '.join(names[:5]) or 'nothing'}): point {PRETRAINED_URI_PARAMETER} at a .pth file of the backbone's "
            "weights (torch.save(model.state_dict(), ...)), or leave it at its default for none")
    return weights_file(path)


def pretrained_source(value: str | None) -> str | None:
    """'imagenet', a state dict path, or None for random weights: where the backbone's weights come from.

    'imagenet' (the default) reads the weights from the pretrained channel when it
    holds some, so jobs without internet can transfer-learn. It lists the channel's
    folder: a script calls it once and passes the result on.
    """
    channel = channel_weights()
    lowered = "imagenet" if value is None else value.lower()
    if lowered == "none":
        if channel is not None:
            raise TrainingInputError(
                f"{PRETRAINED_URI_PARAMETER} supplies {channel.name} in the '{contract.PRETRAINED_CHANNEL}' channel, but "
                "--pretrained-weights is none: set PretrainedWeights=imagenet to use the file, "
                f"or leave {PRETRAINED_URI_PARAMETER} at its default to train from random weights")
        return None
    if lowered == "imagenet":
        return str(channel) if channel is not None else "imagenet"
    return value


def resolved_weights(source: str | None) -> str | None:
    """None (random), 'imagenet', or the path of the one state dict file the resolved ``source`` names."""
    return source if source in (None, "imagenet") else str(weights_file(Path(source)))


def weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHTS_SUFFIXES)
        if len(files) == 1:
            return files[0]
        raise TrainingInputError(
            f"the pretrained weights folder {path} holds {len(files)} .pth/.pt files ({', '.join(f.name for f in files) or 'none'}); "
            "it must hold exactly one state dict, or pass --pretrained-weights <file>")
    raise TrainingInputError(f"--pretrained-weights {path} does not exist; pass a state dict file, 'imagenet' or 'none'")


def imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    weights = models.get_model_weights(backbone).DEFAULT
    try:
        return weights.get_state_dict(progress=False)
    except Exception as err:  # network errors come as URLError, OSError, RuntimeError, ...
        filename = weights.url.rsplit("/", 1)[-1]
        raise TrainingInputError(
            f"cannot download torchvision's ImageNet weights for {backbone} from {weights.url} ({err}). "
            f"Jobs without internet cannot download: upload {filename} to S3 and set the pipeline parameter "
            f"{PRETRAINED_URI_PARAMETER} to its URI (it becomes the '{contract.PRETRAINED_CHANNEL}' channel), "
            "or pass --pretrained-weights <file>, or PretrainedWeights=none to train the whole network from random weights") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TrainingInputError(f"cannot read the pretrained weights {path} as a torch state dict: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TrainingInputError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_weights(model: nn.Module, source: str | None, backbone: str) -> None:
    """Load every backbone weight from ``source``; the head is new, so the source's head is ignored."""
    if source is None:
        return
    if source == "imagenet":
        origin, state = "torchvision's ImageNet weights", imagenet_state_dict(backbone)
    else:
        path = weights_file(Path(source))
        origin, state = str(path), read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise TrainingInputError(f"the weights in {origin} do not fit {backbone}: {err}") from None
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise TrainingInputError(
            f"the weights in {origin} do not fit {backbone}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}; "
            "pass the state dict of the same backbone")


def initial_model(backbone: str, num_classes: int, seed: int, source: str | None) -> nn.Module:
    """The model before training: built under ``seed`` (the head's initial weights), then the backbone's weights
    loaded from the resolved ``source`` (see ``pretrained_source``)."""
    distributed.seed_everything(seed)
    model = common.build_model(backbone, num_classes)
    load_backbone_weights(model, source, backbone)
    return model


def feature_extractor(model: nn.Module) -> nn.Module:
    """The ResNet up to its pooled, flattened features; shares its modules with ``model``."""
    children = [module for name, module in model.named_children() if name != "fc"]
    return nn.Sequential(*children, nn.Flatten(1))

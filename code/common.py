"""Model and image transforms shared by train.py, evaluate.py and inference.py.

Runs inside the SageMaker PyTorch containers: torch, torchvision, Pillow and
the standard library only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
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


def train_transform(image_size: int = DEFAULT_IMAGE_SIZE, augment: bool = True) -> transforms.Compose:
    if not augment:
        return eval_transform(image_size)
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
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


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.fc.parameters())


def load_model_dir(model_dir: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, list[str], dict[str, Any]]:
    """Rebuild the trained model from a model directory: weights, classes, info."""
    model_dir = Path(model_dir)
    for name in (MODEL_FILE, CLASSES_FILE, MODEL_INFO_FILE):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} is missing: is {model_dir} the output of train.py?")
    classes = json.loads((model_dir / CLASSES_FILE).read_text())
    info = json.loads((model_dir / MODEL_INFO_FILE).read_text())
    model = build_model(info["backbone"], len(classes))
    state = torch.load(model_dir / MODEL_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    return model, classes, info

"""ExtractFeatures: the frozen backbone's features of the train and valid splits, computed once.

    python3 extract_features.py --train prepared/train --valid prepared/valid --output features \
        --backbone resnet50 --image-size 224 --pretrained-weights imagenet --seed 42

The backbone is built and loaded exactly as ``train.py`` builds it (same seed,
same weights), the images get the evaluation transform (no augmentation), and
the output is the folder ``features.py`` describes. Every tuning trial then
trains only the head on it (``train.py --features``): the backbone's forward
pass, the bulk of a trial's cost, is paid once per execution instead of once
per trial. The header records what the features depend on, so a trial with
another backbone, image size or weights is refused.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

import arguments
import common
import contract
import distributed
import features
import pretrained
import training_data
from arguments import TrainingInputError

DEFAULT_ROOT = "/opt/ml/processing"


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train", default=f"{DEFAULT_ROOT}/input/{contract.TRAIN_CHANNEL}", help="training split, one folder per class")
    parser.add_argument("--valid", default=f"{DEFAULT_ROOT}/input/{contract.VALID_CHANNEL}", help="validation split, the same class folders")
    parser.add_argument("--output", default=f"{DEFAULT_ROOT}/output/features", help="where the features folder is written")
    parser.add_argument("--backbone", type=arguments.text, choices=common.BACKBONES, default="resnet50")
    parser.add_argument("--image-size", type=arguments.positive_int, default=common.DEFAULT_IMAGE_SIZE)
    parser.add_argument("--pretrained-weights", type=arguments.text, default="imagenet",
                        help="a state dict file (or a folder with one), 'imagenet', or 'none' for random weights")
    parser.add_argument("--pretrained-channel", default=None,
                        help="the folder of the pipeline's pretrained weights channel; read by the rule a training job "
                             "reads its own (a state dict there replaces 'imagenet', the placeholder means none)")
    parser.add_argument("--seed", type=arguments.non_negative_int, default=0,
                        help="the trials' seed: random weights (--pretrained-weights none) are drawn with it")
    parser.add_argument("--batch-size", type=arguments.positive_int, default=64)
    parser.add_argument("--num-workers", type=arguments.non_negative_int, default=arguments.default_num_workers())
    parser.add_argument("--num-threads", type=arguments.positive_int, default=arguments.default_num_threads())
    return parser


def backbone_of(args: argparse.Namespace, num_classes: int, source: str | None) -> torch.nn.Module:
    """The frozen backbone as train.py builds it before training (``pretrained.initial_model``: seeded, then the
    weights of the resolved ``source`` loaded)."""
    return pretrained.feature_extractor(pretrained.initial_model(args.backbone, num_classes, args.seed, source)).eval()


def extract(args: argparse.Namespace) -> dict[str, Any]:
    """Write the features folder; returns its header."""
    if args.image_size < 32:
        raise TrainingInputError(f"--image-size must be at least 32 pixels for a ResNet, got {args.image_size}")
    output = Path(args.output)
    if (output / contract.FEATURES_HEADER_FILE).exists():
        raise TrainingInputError(f"{output} already holds features: write into an empty --output")
    if args.pretrained_channel:
        os.environ[common.channel_variable(contract.PRETRAINED_CHANNEL)] = args.pretrained_channel
    torch.set_num_threads(args.num_threads)
    device = distributed.training_device(0)
    train_set, valid_set = training_data.load_data(Path(args.train), Path(args.valid), args.image_size, augment=False)
    source = pretrained.pretrained_source(args.pretrained_weights)
    backbone = backbone_of(args, len(train_set.classes), source).to(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    splits = {name: training_data.extract_features(backbone, dataset, args, distributed.DistInfo(), device, args.num_workers)
              for name, dataset in ((contract.TRAIN_CHANNEL, train_set), (contract.VALID_CHANNEL, valid_set))}
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    images = len(train_set) + len(valid_set)
    settings = {
        "backbone": args.backbone,
        "image_size": args.image_size,
        "weights": features.weights_id(pretrained.resolved_weights(source), args.backbone, args.seed),
        "classes": train_set.classes,
        "transform": f"resize {common.resize_size(args.image_size)}, center crop {args.image_size}, ImageNet normalization",
        "content_sha256": features.images_sha256(
            [(contract.TRAIN_CHANNEL, Path(p)) for p, _ in train_set.samples]
            + [(contract.VALID_CHANNEL, Path(p)) for p, _ in valid_set.samples]),
        "extraction": {"device": str(device), "threads": torch.get_num_threads(), "seconds": round(seconds, 3),
                       "cpu_seconds": round(cpu_seconds, 3), "images_per_second": round(images / max(seconds, 1e-9), 2)},
    }
    header = features.write_features(output, splits, settings)
    print(f"features of {len(train_set)} training and {len(valid_set)} validation images: {args.backbone} at "
          f"{args.image_size} px, {header['feature_dim']} each, weights {header['weights']}; "
          f"{seconds:.1f} s ({images / max(seconds, 1e-9):.1f} images/s) on {device}; wrote {output}", flush=True)
    return header


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_script("extract_features.py", contract.PROCESSING_FAILURE_FILE, lambda: argument_parser().parse_args(argv),
                             extract, (TrainingInputError, features.FeaturesError))


if __name__ == "__main__":
    sys.exit(main())

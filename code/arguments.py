"""The scripts' argument types and defaults, and the error a bad input raises.

SageMaker passes every hyperparameter as a ``--name value`` string (a string value
sometimes JSON-quoted), so the types below parse strings and say what they expected.
``train.py`` and ``extract_features.py`` share them, and the defaults of their data-loading
processes and torch threads, which divide this machine's cores among the processes on it.

Runs inside SageMaker's PyTorch containers: torch and the standard library only.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Any

import torch

import distributed


class TrainingInputError(ValueError):
    """Bad data, arguments, weights or checkpoint: the message says what, where, and what to do.

    The scripts pass it to ``common.run_script`` as an expected error: one error line, exit status 2, no traceback.
    """


def text(value: str) -> str:
    """A string hyperparameter; SageMaker may JSON-encode strings, so one level of quotes is removed."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return value


def boolean(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = text(value).lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _number(kind: type, minimum: float, value: str) -> Any:
    try:
        number = kind(text(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if not number >= minimum or (kind is float and not math.isfinite(number)):
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value!r}")
    return number


def positive_int(value: str) -> int:
    return _number(int, 1, value)


def non_negative_int(value: str) -> int:
    return _number(int, 0, value)


def non_negative_float(value: str) -> float:
    return _number(float, 0.0, value)


def fraction_below_one(value: str) -> float:
    """A number in [0, 1): label smoothing of 1 would leave nothing of the true class."""
    number = _number(float, 0.0, value)
    if number >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {value!r}")
    return number


def area_fraction(value: str) -> float:
    """A number in (0, 1]: the smallest share of an image's area a random crop keeps."""
    number = _number(float, 0.0, value)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1 (a share of the image's area), got {value!r}")
    return number


def cache_mode(value: str | bool) -> bool | str:
    """true, false or auto (cache only when the backbone is frozen and augmentation is off)."""
    if isinstance(value, str) and text(value).lower() == "auto":
        return "auto"
    try:
        return boolean(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected true, false or auto, got {value!r}") from None


def optional_path(value: str) -> str | None:
    value = text(value)
    return None if value.lower() in ("", "none") else value


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpus_per_process() -> int:
    return max(1, usable_cpus() // distributed.processes_on_this_machine())


def default_num_threads() -> int:
    """OMP_NUM_THREADS when set, else this process's share of the cores, so N local processes do not oversubscribe."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    return int(configured) if configured.isdigit() and int(configured) > 0 else cpus_per_process()


def default_num_workers() -> int:
    """Data-loading processes: on a GPU decoding is the bottleneck; on a CPU the model is, so fewer."""
    share = cpus_per_process()
    if torch.cuda.is_available():
        return min(8, share)
    return min(4, share // 2)



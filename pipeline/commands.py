"""What every ``dogbreed`` command shares: the error a user can fix, the settings flags, argument types
and the one ``--param`` parser. The command modules import this; ``pipeline.cli`` imports them all."""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

from pipeline.parameters import ParameterError, parameter_values
from pipeline.settings import ENVIRONMENT, Settings, load_settings, parse_tags

# Settings without a plain --name flag: with flags of their own (--spot-training, --source-dir, --tag), pinned
# by the package (framework versions), or set in CodeBuild's environment only (the wait and notify functions, the
# queue and the topic).
NOT_FLAGS = frozenset({
    "spot_training", "source_dir", "tags", "training_framework_version", "inference_framework_version", "python_version",
    "wait_lambda_role_arn", "endpoint_wait_queue_url", "notify_lambda_role_arn", "failure_topic_arn",
})
SETTING_FLAGS = tuple(setting.name for setting in fields(Settings) if setting.name not in NOT_FLAGS)


class UsageError(Exception):
    """A mistake in what the user asked for; printed as one line."""


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings", "flags override environment variables, which override defaults")
    for name in SETTING_FLAGS:
        env = ENVIRONMENT.get(name)
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                           help=f"(env {env})" if env else None)
    group.add_argument("--spot-training", dest="spot_training", action="store_true", default=None,
                       help="train on managed spot instances, resuming from checkpoints (env SPOT_TRAINING)")
    group.add_argument("--source-dir", dest="source_dir", type=Path, default=None,
                       help="project checkout holding code/ and lambda/ (default: the working directory)")
    group.add_argument("--tag", dest="tags", action="append", default=[], metavar="KEY=VALUE",
                       help="tag for the pipeline and its resources; repeatable")


def settings_from_args(args: argparse.Namespace) -> Settings:
    flags = {name: getattr(args, name, None) for name in (*SETTING_FLAGS, "spot_training", "source_dir")}
    if getattr(args, "tags", None):
        flags["tags"] = parse_tags(args.tags)
    return load_settings(flags)


def _number(text: str, kind: Callable[[str], Any], expected: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    value = _number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number above 0."""
    value = _number(text, float, "a number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def parse_parameters(pairs: list[str], document: dict,
                     refusal: Callable[[ParameterError], str] = str) -> dict[str, Any]:
    """The ``--param NAME=VALUE`` pairs as typed values of the ``document``'s parameters; a refused pair
    raises a UsageError worded by ``refusal`` (by default the checker's own message)."""
    try:
        return parameter_values(pairs, document)
    except ParameterError as error:
        raise UsageError(refusal(error)) from None

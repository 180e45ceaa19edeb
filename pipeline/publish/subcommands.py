"""The ``upsert``, ``start``, ``diff`` and ``bootstrap`` commands: their arguments, settings and AWS clients."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from pipeline.artifact import load_artifact, read_definition
from pipeline.aws import Clients, Target, add_aws_arguments, explained
from pipeline.changes import DefinitionDiff, diff_definitions
from pipeline.commands import add_settings_arguments, positive_float, positive_int, settings_from_args
from pipeline.definition import synth
from pipeline.publish.bootstrap import add_bootstrap_arguments, bootstrap_command
from pipeline.publish.executions import DEFAULT_POLL_SECONDS, start_and_maybe_wait
from pipeline.publish.pipeline_resource import DEFAULT_MAX_PARALLEL_STEPS, deployed_definition
from pipeline.publish.upsert import upsert
from pipeline.settings import PLACEHOLDER_ACCOUNT, Settings

def publishing_settings(args: argparse.Namespace, clients_for: Callable[[Settings], Clients]) -> tuple[Settings, Clients]:
    """Settings for a command that talks to AWS: the account comes from the caller's identity
    when neither --account nor AWS_ACCOUNT_ID gave one (ARNs in the definition need the real one)."""
    settings = settings_from_args(args)
    clients = clients_for(settings)
    if settings.account == PLACEHOLDER_ACCOUNT:
        with explained("finding the AWS account of the credentials (sts:GetCallerIdentity)"):
            account = clients.sts.get_caller_identity()["Account"]
        args.account = account
        settings = settings_from_args(args)
    return settings, clients


def clients_from_args(args: argparse.Namespace) -> Callable[[Settings], Clients]:
    return lambda settings: Clients(Target(settings.region, args.profile, args.endpoint_url))


def _upsert_command(args: argparse.Namespace) -> int:
    settings, clients = publishing_settings(args, clients_from_args(args))
    built = load_artifact(args.definition, settings) if args.definition else None
    if built is not None:
        print(f"publishing {args.definition} and the assets its {args.definition.parent / 'assets.json'} lists", flush=True)
    upsert(clients, settings, max_parallel_steps=args.max_parallel_steps, built=built)
    if args.start or args.wait:
        return start_and_maybe_wait(args, clients, settings)
    return 0


def _start_command(args: argparse.Namespace) -> int:
    settings, clients = publishing_settings(args, clients_from_args(args))
    return start_and_maybe_wait(args, clients, settings)


def _diff_command(args: argparse.Namespace) -> int:
    settings, clients = publishing_settings(args, clients_from_args(args))
    local = read_definition(args.definition)[1] if args.definition else synth(settings).document
    name = settings.pipeline_name
    with explained(f"reading pipeline {name}"):
        deployed = deployed_definition(clients, name)
    if deployed is None:
        print(f"pipeline {name} does not exist in {settings.region}: upsert would create it with "
              f"{len(diff_definitions({}, local).added_steps)} steps")
        return 1
    diff: DefinitionDiff = diff_definitions(deployed, local)
    if diff.equal:
        print(f"no differences: the deployed definition of {name} equals the local one")
        return 0
    print(f"pipeline {name}: deployed (-) vs local (+)")
    for line in diff.lines():
        print(line)
    print(diff.summary())
    return 1


def _add_start_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--param", dest="params", action="append", default=[], metavar="NAME=VALUE",
                        help="pipeline parameter for this execution; repeatable")
    parser.add_argument("--wait", action="store_true", help="follow the execution until it ends; exit 1 if it fails")
    parser.add_argument("--no-progress", action="store_true",
                        help="print a line per step status change instead of a live table (the default when not on a terminal)")
    parser.add_argument("--poll-seconds", type=positive_float, default=DEFAULT_POLL_SECONDS,
                        help=f"seconds between status reads while waiting (default {DEFAULT_POLL_SECONDS:g})")
    parser.add_argument("--execution-name", default=None, help="display name of the execution")


def _add_upsert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--start", action="store_true", help="start an execution afterwards")
    parser.add_argument("--max-parallel-steps", type=positive_int, default=DEFAULT_MAX_PARALLEL_STEPS,
                        help=f"ParallelismConfiguration of the pipeline (default {DEFAULT_MAX_PARALLEL_STEPS})")
    parser.add_argument("--definition", type=Path, default=None, metavar="FILE",
                        help="publish this definition (written by dogbreed synth) and the assets its assets.json "
                             "lists, exactly as they are, instead of synthesizing one")


def _add_diff_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--definition", type=Path, default=None, metavar="FILE",
                        help="compare this definition file instead of synthesizing one")


def _add_aws_command(commands: argparse._SubParsersAction, name: str, help: str,
                     handler: Callable[[argparse.Namespace], int],
                     *own_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    """A command that reads the settings and talks to AWS: its own arguments, then the settings and connection flags."""
    parser = commands.add_parser(name, help=help)
    for add in own_arguments:
        add(parser)
    add_settings_arguments(parser)
    add_aws_arguments(parser)
    parser.set_defaults(handler=handler)


def register(commands: argparse._SubParsersAction) -> None:
    _add_aws_command(commands, "upsert", "publish the assets, the Lambda functions (with the invoke function's provisioned "
                     "concurrency) and the pipeline; changes only what differs",
                     _upsert_command, _add_upsert_arguments, _add_start_arguments)
    _add_aws_command(commands, "start", "start an execution of the deployed pipeline and print its ARN",
                     _start_command, _add_start_arguments)
    _add_aws_command(commands, "diff", "compare the local definition with the deployed one; exit 1 when they differ",
                     _diff_command, _add_diff_arguments)
    _add_aws_command(commands, "bootstrap", "create or update the stack of infra/template.yaml through a change set "
                     "(--print: its parameters; --delete: remove it)", bootstrap_command, add_bootstrap_arguments)

"""The ``upsert``, ``start``, ``diff``, ``bootstrap``, ``diagnose``, ``retry`` and ``approve`` commands: their
arguments, settings and AWS clients."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from pipeline.artifact import load_artifact, read_definition
from pipeline.aws import Clients, Target, add_aws_arguments, explained
from pipeline.changes import DefinitionDiff, diff_definitions
from pipeline.commands import UsageError, add_settings_arguments, positive_float, positive_int, settings_from_args
from pipeline.definition import synth
from pipeline.diagnosis import diagnosis_lines
from pipeline.publish.approve import approve_package
from pipeline.publish.bootstrap import add_bootstrap_arguments, bootstrap_command
from pipeline.publish.diagnose import diagnose_execution
from pipeline.publish.executions import DEFAULT_POLL_SECONDS, follow, start_and_maybe_wait
from pipeline.publish.lookup import chosen_execution
from pipeline.publish.pipeline_resource import DEFAULT_MAX_PARALLEL_STEPS, deployed_definition
from pipeline.publish.retry import retry_execution, selective_execution
from pipeline.publish.upsert import upsert
from pipeline.settings import PLACEHOLDER_ACCOUNT, Settings
from pipeline.status import Status

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
    if args.reference and not args.from_step:
        raise UsageError("--reference names the execution whose outputs a selective execution reuses: give --from STEP too")
    selective = selective_execution(clients, settings, args.from_step, args.reference) if args.from_step else None
    return start_and_maybe_wait(args, clients, settings, selective)


def _diagnose_command(args: argparse.Namespace) -> int:
    """Exit 0 when the execution succeeded, 1 when it did not (or has not yet)."""
    if args.local is not None:
        from pipeline.local.diagnose import diagnose_workdir

        if args.execution:
            raise UsageError("give an EXECUTION or --local WORKDIR, not both")
        diagnosis = diagnose_workdir(args.local)
    else:
        settings, clients = publishing_settings(args, clients_from_args(args))
        diagnosis = diagnose_execution(clients, settings.pipeline_name, chosen_execution(clients, settings, args.execution))
    print("\n".join(diagnosis_lines(diagnosis)))
    return 0 if diagnosis.status == Status.SUCCEEDED else 1


def _retry_command(args: argparse.Namespace) -> int:
    settings, clients = publishing_settings(args, clients_from_args(args))
    arn = retry_execution(clients, settings, args.execution)
    print(f"retrying the failed steps of {arn}", flush=True)
    return follow(args, clients, settings, arn)


def _approve_command(args: argparse.Namespace) -> int:
    settings, clients = publishing_settings(args, clients_from_args(args))
    print(approve_package(clients, settings, args.package, args.description))
    return 0


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
    _add_wait_arguments(parser)
    parser.add_argument("--execution-name", default=None, help="display name of the execution")


def _add_wait_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true", help="follow the execution until it ends; exit 1 if it fails")
    parser.add_argument("--no-progress", action="store_true",
                        help="print a line per step status change instead of a live table (the default when not on a terminal)")
    parser.add_argument("--poll-seconds", type=positive_float, default=DEFAULT_POLL_SECONDS,
                        help=f"seconds between status reads while waiting (default {DEFAULT_POLL_SECONDS:g})")


def _add_selective_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="from_step", default=None, metavar="STEP",
                        help="a selective execution: run STEP and every step after it in the DAG, the others' outputs "
                             "taken from the --reference execution")
    parser.add_argument("--reference", default=None, metavar="EXECUTION",
                        help="with --from: the execution (ARN or id) whose outputs the steps before STEP give "
                             "(default: the latest succeeded execution)")


def _add_execution_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("execution", nargs="?", default=None, metavar="EXECUTION",
                        help="an execution of the project's pipeline, by ARN or id (default: the latest)")


def _add_diagnose_arguments(parser: argparse.ArgumentParser) -> None:
    _add_execution_argument(parser)
    parser.add_argument("--local", type=Path, default=None, metavar="WORKDIR",
                        help="diagnose a local-run work folder (build/local-run/<id>) instead of a SageMaker execution")


def _add_approve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", metavar="PACKAGE_ARN_OR_VERSION",
                        help="a version of the project's model package group: its ARN or its version number")
    parser.add_argument("--description", default=None, help="the approval's description (ApprovalDescription)")


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
                     _start_command, _add_start_arguments, _add_selective_arguments)
    _add_aws_command(commands, "diagnose", "why an execution failed: its first failed step, job, reason, log tail "
                     "and the next command; exit 1 unless it succeeded", _diagnose_command, _add_diagnose_arguments)
    _add_aws_command(commands, "retry", "retry the failed steps of an execution (RetryPipelineExecution)",
                     _retry_command, _add_execution_argument, _add_wait_arguments)
    _add_aws_command(commands, "approve", "approve a model package version of the project's group; its approval "
                     "event deploys it", _approve_command, _add_approve_arguments)
    _add_aws_command(commands, "diff", "compare the local definition with the deployed one; exit 1 when they differ",
                     _diff_command, _add_diff_arguments)
    _add_aws_command(commands, "bootstrap", "create or update the stack of infra/template.yaml through a change set "
                     "(--print: its parameters; --delete: remove it)", bootstrap_command, add_bootstrap_arguments)

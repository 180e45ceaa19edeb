"""Publish and run the pipeline: ``dogbreed upsert``, ``dogbreed start``, ``dogbreed diff``.

``upsert`` builds the definition once (offline, as ``synth`` does), then
publishes exactly what it refers to, each part only when it changed:

1. the assets from the manifest, to their content-addressed S3 keys (a key
   that exists already holds the same bytes, so it is not uploaded again);
2. the three Lambda functions from ``lambda.zip``: created when missing, code
   updated when its SHA-256 differs, configuration updated when it differs,
   then a version is published and the alias ``live`` (which the definition
   calls) moved to it;
3. the provisioned concurrency of the invoke function's ``live`` alias: set
   when it differs from the setting, removed when the setting is 0;
4. the pipeline: created, or updated when the deployed definition or its
   display name, description, role or parallelism differ; missing tags added.

Running it again with nothing changed makes no AWS change and says so.
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

from botocore.exceptions import ClientError

from pipeline.artifact import load_artifact, read_definition
from pipeline.assets import Asset, Assets
from pipeline.aws import AwsError, Clients, Target, add_aws_arguments, error_code, error_message, explained, is_not_found
from pipeline.changes import DefinitionDiff, diff_definitions
from pipeline.commands import UsageError, add_settings_arguments, parse_parameters, positive_float, positive_int, settings_from_args
from pipeline.constraints import Walk, check_value, input_member
from pipeline.dag import steps_of, topological_order
from pipeline.definition import synth
from pipeline.parameters import MALFORMED, OUT_OF_RANGE, UNKNOWN, WRONG_TYPE, ParameterError
from pipeline.progress import PENDING, ProgressView, StepRow
from pipeline.settings import LAMBDA_ALIAS, PLACEHOLDER_ACCOUNT, Settings

LAMBDA_RUNTIME = "python3.12"
LAMBDA_ARCHITECTURE = "arm64"
DEFAULT_MAX_PARALLEL_STEPS = 2  # the twins (single/multi instance) run side by side; nothing else is parallel
DEFAULT_POLL_SECONDS = 20.0
TERMINAL_EXECUTION_STATUSES = frozenset({"Succeeded", "Failed", "Stopped"})
NOT_RUN = "Not run"
PROVISIONED_FUNCTION = "invoke-endpoint"  # the public function: its latency is what users wait for
WAITER = {"Delay": 2, "MaxAttempts": 150}


@dataclass(frozen=True)
class FunctionSpec:
    function: str  # one of settings.LAMBDA_FUNCTIONS
    handler: str
    timeout: int
    memory: int
    description: str

    def environment(self, settings: Settings) -> dict[str, str]:
        """Variables upsert owns; others already set on the function (e.g. by the stack) are kept."""
        if self.function == "invoke-endpoint":
            return {"ENDPOINT_NAME": settings.invoke_endpoint_name, "ALLOWED_ORIGIN": settings.allowed_origin}
        return {}


FUNCTIONS = (
    FunctionSpec("deploy-endpoint", "deploy_endpoint.handler", 120, 256,
                 "Deploys an approved model package to an endpoint (the pipeline's Deploy steps)."),
    # one look at an endpoint per SQS delivery; the queue's visibility timeout (360 s) stays above this timeout
    FunctionSpec("wait-endpoint", "wait_endpoint.handler", 60, 128,
                 "Answers the pipeline's WaitFor callback steps once their endpoint is InService, failed or waited for too long."),
    # a LambdaStep gives up after 10 minutes; the handler fits its wait into the time Lambda leaves it
    FunctionSpec("check-endpoint", "check_endpoint.handler", 600, 256,
                 "Sets an InService endpoint's auto scaling and tests it with a real image (the pipeline's Check steps)."),
    FunctionSpec("invoke-endpoint", "invoke_endpoint.handler", 30, 512,
                 "Classifies a dog photo with the public endpoint and answers the top breeds as JSON."),
)


@dataclass
class Report:
    """What upsert did, one line per resource; ``changed`` counts the resources it changed."""
    lines: list[str] = field(default_factory=list)
    changed: int = 0

    def add(self, line: str, changed: bool) -> None:
        self.lines.append(line)
        self.changed += int(changed)


# ---------------------------------------------------------------- settings and clients

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


# ---------------------------------------------------------------- assets

def publish_asset(clients: Clients, settings: Settings, asset: Asset) -> tuple[str, bool]:
    """Upload ``asset`` unless its content-addressed key exists; returns (report line, uploaded)."""
    bucket, key = settings.bucket, asset.key
    uri = asset.s3_uri
    with explained(f"checking {uri}", bucket=bucket):
        if _object_exists(clients, bucket, key):
            return f"asset {asset.name}: unchanged, {uri}", False
    extra: dict[str, Any] = {}
    if settings.kms_key_id:
        extra = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": settings.kms_key_id}
    with explained(f"uploading {uri}", bucket=bucket):
        clients.s3.put_object(
            Bucket=bucket, Key=key, Body=asset.data, ChecksumAlgorithm="SHA256",
            ContentType="application/gzip" if asset.filename.endswith(".tar.gz") else "application/zip",
            Metadata={"sha256": asset.sha256, "source": asset.source}, **extra,
        )
    return f"asset {asset.name}: uploaded {uri} ({len(asset.data) / 1024:.1f} KiB)", True


def _object_exists(clients: Clients, bucket: str, key: str) -> bool:
    """True when the key exists. A 403 counts as absent: without s3:ListBucket, S3 answers 403 for
    a missing key, and uploading the same content-addressed bytes again is harmless."""
    try:
        clients.s3.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as error:
        if is_not_found(error) or error_code(error) in ("403", "AccessDenied"):
            return False
        raise


# ---------------------------------------------------------------- Lambda functions

def code_sha256(asset: Asset) -> str:
    """Lambda's CodeSha256 of an archive: base64 of the raw SHA-256 digest."""
    return base64.b64encode(bytes.fromhex(asset.sha256)).decode()


def desired_configuration(spec: FunctionSpec, settings: Settings, current_environment: dict[str, str]) -> dict[str, Any]:
    return {
        "Runtime": LAMBDA_RUNTIME,
        "Role": settings.lambda_role_arn(spec.function),
        "Handler": spec.handler,
        "Timeout": spec.timeout,
        "MemorySize": spec.memory,
        "Description": spec.description,
        "Environment": {"Variables": {**current_environment, **spec.environment(settings)}},
    }


def configuration_differences(current: dict[str, Any], desired: dict[str, Any]) -> list[str]:
    """Names of the configuration fields that differ (environment compared as variables)."""
    different = []
    for name, value in desired.items():
        have = current.get(name)
        if name == "Environment":
            have = {"Variables": (have or {}).get("Variables", {})}
        if have != value:
            different.append(name)
    return different


def publish_function(clients: Clients, settings: Settings, spec: FunctionSpec, archive: Asset) -> tuple[str, bool]:
    """Create or update one function from the lambda asset and point its alias at a version of it."""
    name = settings.lambda_function_name(spec.function)
    role = settings.lambda_role_arn(spec.function)
    sha = code_sha256(archive)
    code = {"S3Bucket": settings.bucket, "S3Key": archive.key}
    done: list[str] = []
    with explained(f"publishing Lambda function {name}", bucket=settings.bucket, role=role):
        current = _function_configuration(clients, name)
        if current is None:
            desired = desired_configuration(spec, settings, {})
            clients.lambda_.create_function(
                FunctionName=name, Code=code, Architectures=[LAMBDA_ARCHITECTURE], Publish=False,
                Tags=dict((tag["Key"], tag["Value"]) for tag in settings.all_tags()), **desired,
            )
            _wait(clients, "function_active_v2", name)
            done.append("created")
        else:
            if current.get("CodeSha256") != sha:
                clients.lambda_.update_function_code(FunctionName=name, Architectures=[LAMBDA_ARCHITECTURE], **code)
                _wait(clients, "function_updated_v2", name)
                done.append("code updated")
            desired = desired_configuration(spec, settings, (current.get("Environment") or {}).get("Variables", {}))
            different = configuration_differences(current, desired)
            if different:
                clients.lambda_.update_function_configuration(FunctionName=name, **desired)
                _wait(clients, "function_updated_v2", name)
                done.append(f"configuration updated ({', '.join(different)})")
        alias_version = _alias_version(clients, name)
        live = None if alias_version is None else _function_configuration(clients, name, alias_version)
        if done or live is None or live.get("CodeSha256") != sha or configuration_differences(live, desired):
            version = clients.lambda_.publish_version(
                FunctionName=name, CodeSha256=sha, Description=f"lambda.zip {archive.sha256[:16]}",
            )["Version"]
            if alias_version is None:
                clients.lambda_.create_alias(FunctionName=name, Name=LAMBDA_ALIAS, FunctionVersion=version)
            elif alias_version != version:
                clients.lambda_.update_alias(FunctionName=name, Name=LAMBDA_ALIAS, FunctionVersion=version)
            if alias_version != version:
                done.append(f"alias {LAMBDA_ALIAS} -> version {version}")
    if not done:
        return f"function {name}: unchanged, alias {LAMBDA_ALIAS} -> version {alias_version}", False
    return f"function {name}: {', '.join(done)}", True


def _function_configuration(clients: Clients, name: str, qualifier: str | None = None) -> dict[str, Any] | None:
    try:
        extra = {"Qualifier": qualifier} if qualifier else {}
        return clients.lambda_.get_function_configuration(FunctionName=name, **extra)
    except ClientError as error:
        if error_code(error) == "ResourceNotFoundException":
            return None
        raise


def _alias_version(clients: Clients, name: str) -> str | None:
    try:
        return clients.lambda_.get_alias(FunctionName=name, Name=LAMBDA_ALIAS)["FunctionVersion"]
    except ClientError as error:
        if error_code(error) == "ResourceNotFoundException":
            return None
        raise


def _wait(clients: Clients, waiter: str, name: str) -> None:
    clients.lambda_.get_waiter(waiter).wait(FunctionName=name, WaiterConfig=WAITER)


def publish_provisioned_concurrency(clients: Clients, settings: Settings) -> tuple[str, bool]:
    """Keep ``settings.invoke_provisioned_concurrency`` instances of the invoke function's alias
    initialized (none when it is 0); returns (report line, changed).

    The configuration belongs to the alias, so Lambda moves it along when the alias moves to a new
    version. A configuration whose last request failed is requested again.
    """
    name = settings.lambda_function_name(PROVISIONED_FUNCTION)
    target = f"{name}:{LAMBDA_ALIAS}"
    wanted = settings.invoke_provisioned_concurrency
    with explained(f"setting the provisioned concurrency of Lambda function {target}"):
        current = _provisioned_concurrency(clients, name)
        have = None if current is None else current["RequestedProvisionedConcurrentExecutions"]
        if wanted == 0:
            if current is None:
                return f"provisioned concurrency {target}: unchanged, none", False
            clients.lambda_.delete_provisioned_concurrency_config(FunctionName=name, Qualifier=LAMBDA_ALIAS)
            return f"provisioned concurrency {target}: removed (was {have})", True
        failed = current is not None and current.get("Status") == "FAILED"
        if have == wanted and not failed:
            return f"provisioned concurrency {target}: unchanged, {wanted} ({current.get('Status', 'status unknown')})", False
        answer = clients.lambda_.put_provisioned_concurrency_config(
            FunctionName=name, Qualifier=LAMBDA_ALIAS, ProvisionedConcurrentExecutions=wanted)
    if failed:
        before = f"the last request for {have} failed: {current.get('StatusReason') or 'no reason given'}"
    else:
        before = f"was {'none' if have is None else have}"
    return f"provisioned concurrency {target}: set to {wanted} ({before}), {answer.get('Status', 'status unknown')}", True


def _provisioned_concurrency(clients: Clients, name: str) -> dict[str, Any] | None:
    """GetProvisionedConcurrencyConfig of the alias, or None when it has none."""
    try:
        return clients.lambda_.get_provisioned_concurrency_config(FunctionName=name, Qualifier=LAMBDA_ALIAS)
    except ClientError as error:
        if error_code(error) == "ProvisionedConcurrencyConfigNotFoundException":
            return None
        raise


# ---------------------------------------------------------------- the pipeline

def pipeline_attributes(settings: Settings, max_parallel_steps: int) -> dict[str, Any]:
    return {
        # CreatePipeline takes a display name of letters, digits and hyphens only (the PipelineName pattern).
        "PipelineDisplayName": f"dog-breed-classifier-{settings.project_name}",
        "PipelineDescription": "Prepares the dog images, tunes, trains single- and multi-instance models, evaluates, "
                               "registers and deploys those that pass the accuracy threshold.",
        "RoleArn": settings.pipeline_role_arn,
        "ParallelismConfiguration": {"MaxParallelExecutionSteps": max_parallel_steps},
    }


def request_problems(settings: Settings, max_parallel_steps: int) -> list[str]:
    """What SageMaker's and Lambda's limits refuse in the requests upsert would send besides the definition
    (pipeline name, display name, description, tags; each function's name and configuration)."""

    walk = Walk(f"pipeline {settings.pipeline_name}", {})
    pipeline = {"PipelineName": settings.pipeline_name, **pipeline_attributes(settings, max_parallel_steps),
                "Tags": settings.all_tags()}
    check_value(walk, pipeline, input_member("sagemaker", "CreatePipeline"), "CreatePipeline")
    for spec in FUNCTIONS:
        name = settings.lambda_function_name(spec.function)
        walk.where = f"function {name}"
        function = {"FunctionName": name, **desired_configuration(spec, settings, {}),
                    "Tags": {tag["Key"]: tag["Value"] for tag in settings.all_tags()}}
        check_value(walk, function, input_member("lambda", "CreateFunction"), "CreateFunction")
    return [str(finding) for finding in walk.findings]


def deployed_pipeline(clients: Clients, name: str) -> dict[str, Any] | None:
    """DescribePipeline's answer, or None when the pipeline does not exist."""
    try:
        return clients.sagemaker.describe_pipeline(PipelineName=name)
    except ClientError as error:
        if _pipeline_missing(error):
            return None
        raise


def _pipeline_missing(error: ClientError) -> bool:
    message = error_message(error).lower()
    return error_code(error) in ("ResourceNotFound", "ResourceNotFoundException") or (
        error_code(error) == "ValidationException" and ("could not find" in message or "does not exist" in message))


def publish_pipeline(clients: Clients, settings: Settings, definition: str, tags: list[dict[str, str]],
                     max_parallel_steps: int) -> tuple[str, bool]:
    name = settings.pipeline_name
    attributes = pipeline_attributes(settings, max_parallel_steps)
    with explained(f"publishing pipeline {name}", role=settings.pipeline_role_arn):
        deployed = deployed_pipeline(clients, name)
        if deployed is None:
            clients.sagemaker.create_pipeline(
                PipelineName=name, PipelineDefinition=definition, Tags=tags,
                ClientRequestToken=str(uuid.uuid4()), **attributes,
            )
            steps = len(diff_definitions({}, json.loads(definition)).added_steps)
            return f"pipeline {name}: created ({steps} steps)", True
        done = []
        diff = diff_definitions(json.loads(deployed["PipelineDefinition"]), json.loads(definition))
        different = [key for key, value in attributes.items() if deployed.get(key) != value]
        if not diff.equal or different:
            clients.sagemaker.update_pipeline(PipelineName=name, PipelineDefinition=definition, **attributes)
            if not diff.equal:
                done.append(f"definition updated: {diff.summary()}")
            if different:
                done.append(f"{', '.join(different)} updated")
        added = _missing_tags(clients, deployed["PipelineArn"], tags)
        if added:
            clients.sagemaker.add_tags(ResourceArn=deployed["PipelineArn"], Tags=added)
            done.append(f"tags added ({', '.join(tag['Key'] for tag in added)})")
    if not done:
        return f"pipeline {name}: unchanged", False
    return f"pipeline {name}: {'; '.join(done)}", True


def _missing_tags(clients: Clients, arn: str, tags: list[dict[str, str]]) -> list[dict[str, str]]:
    have: dict[str, str] = {}
    request: dict[str, Any] = {"ResourceArn": arn}
    while True:
        page = clients.sagemaker.list_tags(**request)
        have.update((tag["Key"], tag["Value"]) for tag in page.get("Tags", []))
        if not page.get("NextToken"):
            break
        request["NextToken"] = page["NextToken"]
    return [tag for tag in tags if have.get(tag["Key"]) != tag["Value"]]


def upsert(clients: Clients, settings: Settings, *, max_parallel_steps: int = DEFAULT_MAX_PARALLEL_STEPS,
           out: TextIO | None = None, built: Any = None) -> Report:
    """Publish the assets, the functions and the pipeline; print and return what changed.

    ``built`` is what to publish (a definition and its assets, e.g. from ``pipeline.artifact.load_artifact``);
    without it the definition is synthesized from the settings here."""

    out = out or sys.stdout
    problems = request_problems(settings, max_parallel_steps)
    if problems:
        raise UsageError("nothing was published; these requests would be refused:\n  " + "\n  ".join(problems))
    built = built if built is not None else synth(settings)
    report = Report()

    def record(result: tuple[str, bool]) -> None:
        report.add(*result)
        print(result[0], file=out, flush=True)

    assets: Assets = built.assets
    for asset in assets:
        record(publish_asset(clients, settings, asset))
    for spec in FUNCTIONS:
        record(publish_function(clients, settings, spec, assets.lambdas))
    record(publish_provisioned_concurrency(clients, settings))
    record(publish_pipeline(clients, settings, built.definition, settings.all_tags(), max_parallel_steps))
    if report.changed:
        print(f"{report.changed} of {len(report.lines)} resources changed", file=out)
    else:
        print(f"no changes: the assets, the {len(FUNCTIONS)} functions, the invoke function's provisioned concurrency "
              f"and pipeline {settings.pipeline_name} are up to date", file=out)
    return report


# ---------------------------------------------------------------- executions

def pipeline_parameters(pairs: Iterable[str], definition: dict) -> list[dict[str, str]]:
    """``Name=Value`` pairs checked against the pipeline's parameters, as StartPipelineExecution's PipelineParameters."""
    values = parse_parameters(list(pairs), definition, refusal=_refusal)
    return [{"Name": name, "Value": _request_value(value)} for name, value in values.items()]


def _refusal(error: ParameterError) -> str:
    """The refusal worded for ``start``, which checks against the deployed pipeline."""
    if error.problem == MALFORMED:
        return f"--param {error.pair!r} is not Name=Value"
    if error.problem == UNKNOWN:
        return f"--param {error.name}: the pipeline has no such parameter; it has {', '.join(error.declared)}"
    if error.problem == WRONG_TYPE:
        kind = error.parameter.get("Type", "String").lower()
        return f"--param {error.name}={error.text!r} is not {'an' if kind == 'integer' else 'a'} {kind}"
    if error.problem == OUT_OF_RANGE:
        return str(error)
    return f"--param {error.name}={error.text!r} is not one of {', '.join(map(str, error.parameter['EnumValues']))}"


def _request_value(value: Any) -> str:
    """A typed value as the string a pipeline parameter's Value is (booleans as true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def start_execution(clients: Clients, settings: Settings, parameters: list[str], display_name: str | None = None) -> str:
    """Start an execution of the deployed pipeline; returns its ARN."""
    name = settings.pipeline_name
    with explained(f"starting pipeline {name}"):
        deployed = deployed_pipeline(clients, name)
        if deployed is None:
            raise AwsError(f"pipeline {name} does not exist in {settings.region}: run dogbreed upsert first")
        request: dict[str, Any] = {
            "PipelineName": name,
            "PipelineParameters": pipeline_parameters(parameters, json.loads(deployed["PipelineDefinition"])),
            "ClientRequestToken": str(uuid.uuid4()),  # a retried call cannot start a second execution
        }
        if display_name:
            request["PipelineExecutionDisplayName"] = display_name
        return clients.sagemaker.start_pipeline_execution(**request)["PipelineExecutionArn"]


@dataclass(frozen=True)
class ExecutionSnapshot:
    status: str
    failure_reason: str
    rows: list[StepRow]

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_EXECUTION_STATUSES

    def failed_steps(self) -> list[StepRow]:
        return [row for row in self.rows if row.status == "Failed"]


def snapshot_of(execution: dict, step_summaries: list[dict], order: list[str]) -> ExecutionSnapshot:
    """Rows for every step of the definition in ``order``, filled from ListPipelineExecutionSteps.

    Steps not listed yet are Pending; once the execution has finished they are
    shown as not run (a branch not taken, or steps after a failure).
    """
    latest: dict[str, dict] = {}
    for summary in step_summaries:
        name = summary["StepName"]
        if name not in latest or _start(summary) >= _start(latest[name]):
            latest[name] = summary
    status = execution.get("PipelineExecutionStatus", "Executing")
    finished = status in TERMINAL_EXECUTION_STATUSES
    rows = []
    for name in [*order, *(n for n in latest if n not in order)]:
        summary = latest.get(name)
        if summary is None:
            rows.append(StepRow(name, NOT_RUN if finished else PENDING))
            continue
        rows.append(StepRow(
            name, summary.get("StepStatus", "Executing"), summary.get("StartTime"), summary.get("EndTime"),
            (summary.get("FailureReason") or "").strip(),
        ))
    return ExecutionSnapshot(status, (execution.get("FailureReason") or "").strip(), rows)


def _start(summary: dict) -> datetime:
    return summary.get("StartTime") or datetime.min.replace(tzinfo=timezone.utc)


def watch(poll: Callable[[], ExecutionSnapshot], view: ProgressView, *, interval: float,
          sleep: Callable[[float], None] = time.sleep) -> ExecutionSnapshot:
    """Poll until the execution finishes, showing each snapshot; returns the last one."""
    while True:
        snapshot = poll()
        view.update(snapshot.rows, status=snapshot.status)
        if snapshot.finished:
            return snapshot
        sleep(interval)


def failure_message(arn: str, snapshot: ExecutionSnapshot) -> str:
    """One line for a failed or stopped execution, naming the failing steps and their reasons."""
    failed = snapshot.failed_steps()
    if failed:
        reasons = "; ".join(f"step {row.name} failed: {row.reason or 'no reason given'}" for row in failed)
    else:
        reasons = snapshot.failure_reason or "no reason given"
    return f"execution {arn} {snapshot.status}: {reasons}"


def execution_poller(clients: Clients, arn: str) -> Callable[[], ExecutionSnapshot]:
    """A function that reads the execution's status and steps, with steps in the definition's order."""

    with explained(f"reading the definition of execution {arn}"):
        definition = json.loads(clients.sagemaker.describe_pipeline_definition_for_execution(
            PipelineExecutionArn=arn)["PipelineDefinition"])
    order = topological_order(steps_of(definition))

    def poll() -> ExecutionSnapshot:
        with explained(f"following execution {arn}"):
            execution = clients.sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)
            summaries: list[dict] = []
            request: dict[str, Any] = {"PipelineExecutionArn": arn, "SortOrder": "Ascending"}
            while True:
                page = clients.sagemaker.list_pipeline_execution_steps(**request)
                summaries.extend(page.get("PipelineExecutionSteps", []))
                if not page.get("NextToken"):
                    break
                request["NextToken"] = page["NextToken"]
        return snapshot_of(execution, summaries, order)

    return poll


def start_and_maybe_wait(args: argparse.Namespace, clients: Clients, settings: Settings) -> int:
    arn = start_execution(clients, settings, args.params, getattr(args, "execution_name", None))
    print(arn, flush=True)
    if not args.wait:
        return 0
    poll = execution_poller(clients, arn)
    plain = True if args.no_progress else None
    try:
        with ProgressView(settings.pipeline_name, plain=plain) as view:
            snapshot = watch(poll, view, interval=args.poll_seconds)
    except KeyboardInterrupt:
        print(f"stopped watching; the execution goes on: {arn}", file=sys.stderr)
        raise
    if snapshot.status == "Succeeded":
        return 0
    print(f"dogbreed {args.command}: {failure_message(arn, snapshot)}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------- commands

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
        deployed = deployed_pipeline(clients, name)
    if deployed is None:
        print(f"pipeline {name} does not exist in {settings.region}: upsert would create it with "
              f"{len(diff_definitions({}, local).added_steps)} steps")
        return 1
    diff: DefinitionDiff = diff_definitions(json.loads(deployed["PipelineDefinition"]), local)
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


def register(commands: argparse._SubParsersAction) -> None:
    upsert_parser = commands.add_parser("upsert", help="publish the assets, the Lambda functions (with the invoke function's provisioned "
                                                      "concurrency) and the pipeline; changes only what differs")
    upsert_parser.add_argument("--start", action="store_true", help="start an execution afterwards")
    upsert_parser.add_argument("--max-parallel-steps", type=positive_int, default=DEFAULT_MAX_PARALLEL_STEPS,
                               help=f"ParallelismConfiguration of the pipeline (default {DEFAULT_MAX_PARALLEL_STEPS})")
    upsert_parser.add_argument("--definition", type=Path, default=None, metavar="FILE",
                               help="publish this definition (written by dogbreed synth) and the assets its assets.json "
                                    "lists, exactly as they are, instead of synthesizing one")
    _add_start_arguments(upsert_parser)
    add_settings_arguments(upsert_parser)
    add_aws_arguments(upsert_parser)
    upsert_parser.set_defaults(handler=_upsert_command)

    start_parser = commands.add_parser("start", help="start an execution of the deployed pipeline and print its ARN")
    _add_start_arguments(start_parser)
    add_settings_arguments(start_parser)
    add_aws_arguments(start_parser)
    start_parser.set_defaults(handler=_start_command)

    diff_parser = commands.add_parser("diff", help="compare the local definition with the deployed one; exit 1 when they differ")
    diff_parser.add_argument("--definition", type=Path, default=None, metavar="FILE",
                             help="compare this definition file instead of synthesizing one")
    add_settings_arguments(diff_parser)
    add_aws_arguments(diff_parser)
    diff_parser.set_defaults(handler=_diff_command)

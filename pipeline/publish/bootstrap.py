"""``dogbreed bootstrap``: the project's AWS side from ``infra/template.yaml``, through a change set.

Creating or updating the stack goes through one change set: what it would add, modify or remove is printed
first, a change that would replace or remove a bucket or the model package group is refused, and nothing is
applied without ``--yes`` or a "y" on a terminal. The stack's events are then printed as they come, one line
each, and its outputs and the build project's environment at the end. ``--print`` writes the parameters it
would use; ``--delete`` removes what upsert published and the stack, keeping the buckets' data unless told.

The template goes as compact JSON (CloudFormation takes at most 51,200 bytes as a body, and the YAML's
comments and indentation count); a larger one is uploaded to S3 first and passed by URL.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

import yaml
from botocore.exceptions import ClientError

from pipeline.aws import AwsError, Clients, Target, error_message, explained, is_not_found
from pipeline.commands import UsageError, settings_from_args
from pipeline.settings import LAMBDA_FUNCTIONS, Settings

TEMPLATE_BODY_LIMIT = 51_200
CAPABILITIES = ["CAPABILITY_NAMED_IAM"]
PROTECTED_TYPES = frozenset({"AWS::S3::Bucket", "AWS::SageMaker::ModelPackageGroup"})
NO_CHANGES = ("didn't contain changes", "No updates are to be performed")
SUCCEEDED = frozenset({"CREATE_COMPLETE", "UPDATE_COMPLETE"})
POLL_SECONDS = 5.0
ENDPOINT_SLUGS = ("single-instance", "multi-instance")
SYMBOLS = {"Add": "+", "Modify": "~", "Remove": "-"}


# --- the template and its parameters ------------------------------------------------

class _TemplateLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short forms (!Ref, !Sub, !GetAtt a.b, ...) read as their long forms."""


def _intrinsic(loader: yaml.SafeLoader, tag: str, node: yaml.Node) -> dict[str, Any]:
    name = tag.lstrip("!")
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if name == "Ref":
        return {"Ref": value}
    if name == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {name if name == "Condition" else f"Fn::{name}": value}


_TemplateLoader.add_multi_constructor("!", _intrinsic)


def template_document(path: Path) -> dict[str, Any]:
    """The template at ``path`` as a document, or a UsageError that names the file and the line."""
    try:
        document = yaml.load(path.read_text(), Loader=_TemplateLoader)  # noqa: S506 (a SafeLoader subclass)
    except OSError as error:
        raise UsageError(f"cannot read the template {path}: {error.strerror}; pass --template or run from the project checkout") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UsageError(f"{path}{where} is not valid YAML: {getattr(error, 'problem', None) or error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("Resources"), dict):
        raise UsageError(f"{path} is not a CloudFormation template: it has no Resources section")
    return document


def template_body(document: dict[str, Any]) -> str:
    """The template as compact JSON: what CloudFormation parses, without the YAML's comments and indentation."""
    return json.dumps(document, separators=(",", ":"), default=str)


def template_source(clients: Clients, settings: Settings, body: str, bucket: str | None) -> dict[str, str]:
    """CreateChangeSet's TemplateBody, or for a body over CloudFormation's limit a TemplateURL of a copy uploaded to
    ``bucket`` under the project prefix (content-addressed, so an unchanged template is uploaded once)."""
    size = len(body.encode())
    if size <= TEMPLATE_BODY_LIMIT:
        return {"TemplateBody": body}
    if not bucket:
        raise UsageError(f"the template is {size} bytes as compact JSON, over CloudFormation's {TEMPLATE_BODY_LIMIT}-byte "
                         "TemplateBody limit, and the stack has no bucket yet: pass --template-bucket BUCKET (any bucket "
                         "in this region you may write to) for the first deployment")
    key = f"{settings.prefix}/bootstrap/template-{hashlib.sha256(body.encode()).hexdigest()[:16]}.json"
    with explained(f"uploading the template to s3://{bucket}/{key}", bucket=bucket):
        clients.s3.put_object(Bucket=bucket, Key=key, Body=body.encode(), ContentType="application/json")
    return {"TemplateURL": f"https://{bucket}.s3.{settings.region}.amazonaws.com/{key}"}


def parameter_overrides(pairs: Iterable[str], document: dict[str, Any]) -> dict[str, str]:
    """``--parameter Key=Value`` pairs, each naming a parameter of the template."""
    declared = document.get("Parameters", {})
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--parameter {pair!r} is not Key=Value")
        if key not in declared:
            raise UsageError(f"--parameter {key}: the template has no such parameter; it has {', '.join(declared)}")
        values[key] = value
    return values


def settings_parameters(settings: Settings, document: dict[str, Any]) -> dict[str, str]:
    """The template parameters the settings decide, so that the stack names what upsert and synth expect."""
    values = {"ProjectName": settings.project_name, "ArtifactPrefix": settings.prefix}
    if settings.kms_key_id:
        values["KmsKeyArn"] = settings.kms_key_id
    for slug in ENDPOINT_SLUGS:
        if settings.invoke_endpoint_name == f"{settings.project_name}-{slug}":
            values["PublicEndpoint"] = slug
    return {key: value for key, value in values.items() if key in document.get("Parameters", {})}


def stack_parameters(document: dict[str, Any], settings: Settings, overrides: dict[str, str],
                     previous: dict[str, str]) -> list[dict[str, str]]:
    """Every template parameter with its value: --parameter, else the settings, else the stack's current value,
    else the template's default."""
    chosen, decided = [], settings_parameters(settings, document)
    for key, spec in document.get("Parameters", {}).items():
        value = overrides.get(key, decided.get(key, previous.get(key, spec.get("Default"))))
        if value is None:
            raise UsageError(f"template parameter {key} has no default: pass --parameter {key}=VALUE")
        chosen.append({"ParameterKey": key, "ParameterValue": str(value)})
    return chosen


# --- reading the stack ------------------------------------------------------------------

def cloudformation(clients: Clients) -> Any:
    return clients.client("cloudformation")


def current_stack(clients: Clients, name: str) -> dict[str, Any] | None:
    """DescribeStacks of the stack, or None when there is none."""
    try:
        return cloudformation(clients).describe_stacks(StackName=name)["Stacks"][0]
    except ClientError as error:
        if "does not exist" in error_message(error):
            return None
        raise


def stack_values(stack: dict[str, Any] | None, field: str, key: str, value: str) -> dict[str, str]:
    return {item[key]: item.get(value, "") for item in (stack or {}).get(field, [])}


def event_line(event: dict[str, Any]) -> str:
    """One stack event as a line: resource (type): status - reason."""
    line = f"{event['LogicalResourceId']} ({event.get('ResourceType', '?')}): {event['ResourceStatus']}"
    reason = " ".join(str(event.get("ResourceStatusReason") or "").split())
    return f"{line} - {reason}" if reason else line


def new_events(clients: Clients, stack_id: str, since: datetime, seen: set[str]) -> list[dict[str, Any]]:
    """Events of the stack from ``since`` on that are not in ``seen``, oldest first."""
    events, request = [], {"StackName": stack_id}
    while True:
        page = cloudformation(clients).describe_stack_events(**request)
        fresh = [e for e in page.get("StackEvents", []) if e["Timestamp"] >= since]
        events.extend(e for e in fresh if e["EventId"] not in seen)
        if len(fresh) < len(page.get("StackEvents", [])) or not page.get("NextToken"):
            break
        request["NextToken"] = page["NextToken"]
    seen.update(e["EventId"] for e in events)
    return events[::-1]


def wait_for_stack(clients: Clients, stack_id: str, since: datetime, out: TextIO, *, seen: set[str] | None = None,
                   sleep: Callable[[float], None] = time.sleep, interval: float = POLL_SECONDS) -> tuple[dict[str, Any], list[dict]]:
    """Print the stack's events (those not in ``seen``) until it stops changing; returns the stack and those events."""
    seen = set(seen or ())
    history: list[dict] = []
    while True:
        stack = cloudformation(clients).describe_stacks(StackName=stack_id)["Stacks"][0]
        for event in new_events(clients, stack_id, since, seen):
            history.append(event)
            print(f"  {event_line(event)}", file=out, flush=True)
        if not stack["StackStatus"].endswith("_IN_PROGRESS"):
            return stack, history
        sleep(interval)


# --- the change set -----------------------------------------------------------------------

def change_lines(changes: list[dict[str, Any]]) -> list[str]:
    lines = []
    for change in changes:
        resource = change["ResourceChange"]
        line = f"  {SYMBOLS.get(resource['Action'], '?')} {resource['Action']:<6} {resource['LogicalResourceId']} ({resource['ResourceType']})"
        if resource.get("Replacement") in ("True", "Conditional"):
            line += " - replaced" if resource["Replacement"] == "True" else " - may be replaced"
        lines.append(line)
    return lines


def refused_changes(changes: list[dict[str, Any]]) -> list[str]:
    """Changes that would replace or remove a bucket or the model package group (their data would be lost)."""
    refused = []
    for change in changes:
        resource = change["ResourceChange"]
        if resource["ResourceType"] not in PROTECTED_TYPES:
            continue
        if resource["Action"] == "Remove" or resource.get("Replacement") in ("True", "Conditional"):
            verb = "remove" if resource["Action"] == "Remove" else "replace"
            refused.append(f"{verb} {resource['LogicalResourceId']} ({resource['ResourceType']})")
    return refused


def create_change_set(clients: Clients, stack_name: str, template: dict[str, str], parameters: list[dict[str, str]],
                      change_set_type: str) -> dict[str, Any] | None:
    """Create a change set and wait until CloudFormation has computed it; None when it holds no change."""
    cfn = cloudformation(clients)
    name = f"dogbreed-bootstrap-{uuid.uuid4().hex[:12]}"
    try:
        created = cfn.create_change_set(StackName=stack_name, ChangeSetName=name, **template, Parameters=parameters,
                                        Capabilities=CAPABILITIES, ChangeSetType=change_set_type,
                                        Description="dogbreed bootstrap")
    except ClientError as error:
        if any(text in error_message(error) for text in NO_CHANGES):
            return None
        raise
    while True:
        change_set = cfn.describe_change_set(ChangeSetName=created["Id"])
        if change_set["Status"] not in ("CREATE_PENDING", "CREATE_IN_PROGRESS"):
            break
        time.sleep(1)
    changes = list(change_set.get("Changes", []))
    while change_set.get("NextToken"):
        change_set = cfn.describe_change_set(ChangeSetName=created["Id"], NextToken=change_set["NextToken"])
        changes.extend(change_set.get("Changes", []))
    if change_set["Status"] == "FAILED":
        reason = change_set.get("StatusReason") or "no reason given"
        cfn.delete_change_set(ChangeSetName=created["Id"])
        if any(text in reason for text in NO_CHANGES):
            return None
        raise AwsError(f"CloudFormation refused the change set for stack {stack_name}: {' '.join(reason.split())}")
    return {**change_set, "Id": created["Id"], "StackId": created["StackId"], "Changes": changes}


def discard_change_set(clients: Clients, change_set: dict[str, Any], change_set_type: str) -> None:
    """Delete the change set, and the empty stack a CREATE change set made."""
    cfn = cloudformation(clients)
    cfn.delete_change_set(ChangeSetName=change_set["Id"])
    if change_set_type == "CREATE":
        cfn.delete_stack(StackName=change_set["StackId"])


def confirmed(assume_yes: bool, out: TextIO, what: str = "apply these changes") -> bool:
    """--yes, or a "y" typed on a terminal; without a terminal, no."""
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        print(f"nothing applied: run again with --yes to {what}", file=out)
        return False
    try:
        return input(f"{what}? [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def deploy(clients: Clients, settings: Settings, stack: dict[str, Any] | None, stack_name: str, document: dict[str, Any],
           parameters: list[dict[str, str]], *, template_bucket: str | None, assume_yes: bool, out: TextIO) -> int:
    """Create or update the stack through one change set; ``stack`` is its DescribeStacks, None when there is none."""
    status = (stack or {}).get("StackStatus", "")
    if status in ("ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "DELETE_FAILED"):
        raise UsageError(f"stack {stack_name} is {status} after a failed creation or deletion: remove it with "
                         f"dogbreed bootstrap --delete (the buckets' data is kept), then run bootstrap again")
    if status.endswith("_IN_PROGRESS") and status != "REVIEW_IN_PROGRESS":
        raise UsageError(f"stack {stack_name} is {status}: wait until it has finished, then run bootstrap again")
    change_set_type = "UPDATE" if stack and status != "REVIEW_IN_PROGRESS" else "CREATE"
    bucket = template_bucket or stack_values(stack, "Outputs", "OutputKey", "OutputValue").get("ArtifactBucketName")
    template = template_source(clients, settings, template_body(document), bucket)
    with explained(f"preparing the change set of stack {stack_name}"):
        change_set = create_change_set(clients, stack_name, template, parameters, change_set_type)
    if change_set is None:
        print(f"no changes: stack {stack_name} already matches {len(document['Resources'])} resources of the template "
              "and these parameters", file=out)
        return 0
    verb = "create" if change_set_type == "CREATE" else "update"
    count = len(change_set["Changes"])
    print(f"stack {stack_name} ({settings.region}): {verb}, {count or 'no resource'} change{'' if count == 1 else 's'}"
          f"{'' if count else ' (parameter values or outputs only)'}", file=out)
    for line in change_lines(change_set["Changes"]):
        print(line, file=out)
    refused = refused_changes(change_set["Changes"])
    if refused or not confirmed(assume_yes, out):
        with explained(f"deleting the change set of stack {stack_name}"):
            discard_change_set(clients, change_set, change_set_type)
        if refused:
            raise UsageError(f"will not {'; '.join(refused)}: its data would be lost. Nothing was applied; change the "
                             "template or parameters back (ProjectName names the buckets and the model group)")
        return 1
    with explained(f"applying the change set of stack {stack_name}"):
        since = change_set["CreationTime"]
        cloudformation(clients).execute_change_set(ChangeSetName=change_set["Id"])
        final, events = wait_for_stack(clients, change_set["StackId"], since, out)
    if final["StackStatus"] not in SUCCEEDED:
        failed = [event_line(e) for e in events if e["ResourceStatus"].endswith("_FAILED")]
        for line in failed:
            print(f"failed: {line}", file=sys.stderr)
        raise AwsError(f"stack {stack_name} ended {final['StackStatus']}: "
                       f"{failed[0] if failed else final.get('StackStatusReason') or 'see the events above'}")
    print(f"stack {stack_name}: {final['StackStatus']}", file=out)
    print_outputs(clients, final, out)
    return 0


def print_outputs(clients: Clients, stack: dict[str, Any], out: TextIO) -> None:
    outputs = stack_values(stack, "Outputs", "OutputKey", "OutputValue")
    print("outputs:", file=out)
    for key, value in outputs.items():
        print(f"  {key} = {value}", file=out)
    project = outputs.get("BuildProjectName")
    if not project:
        return
    with explained(f"reading CodeBuild project {project}"):
        found = clients.client("codebuild").batch_get_projects(names=[project]).get("projects", [])
    if not found:
        print(f"CodeBuild project {project}: not found", file=out)
        return
    print(f"environment of CodeBuild project {project}:", file=out)
    for variable in found[0].get("environment", {}).get("environmentVariables", []):
        print(f"  {variable['name']}={variable['value']}", file=out)


# --- deleting -----------------------------------------------------------------------------

def live_endpoints(clients: Clients, settings: Settings) -> list[str]:
    names = [f"{settings.project_name}-{slug}" for slug in ENDPOINT_SLUGS]
    found = []
    for name in names:
        try:
            clients.sagemaker.describe_endpoint(EndpointName=name)
            found.append(name)
        except ClientError as error:
            if not _missing(error):
                raise
    return found


def _missing(error: ClientError) -> bool:
    """Whether the error says the resource is not there (SageMaker answers ValidationException for that)."""
    return is_not_found(error) or any(text in error_message(error).lower() for text in ("could not find", "does not exist", "not found"))


def delete_published(clients: Clients, settings: Settings, out: TextIO) -> None:
    """What upsert published outside the stack: the pipeline and the functions (with their mappings)."""
    try:
        clients.sagemaker.delete_pipeline(PipelineName=settings.pipeline_name, ClientRequestToken=str(uuid.uuid4()))
        print(f"deleted pipeline {settings.pipeline_name}", file=out)
    except ClientError as error:
        if not _missing(error):
            raise
    for function in LAMBDA_FUNCTIONS:
        name = settings.lambda_function_name(function)
        try:
            clients.lambda_.delete_function(FunctionName=name)
            print(f"deleted Lambda function {name}", file=out)
        except ClientError as error:
            if not _missing(error):
                raise


def empty_bucket(clients: Clients, bucket: str) -> int:
    """Delete every version and delete marker in ``bucket``; returns how many."""
    deleted = 0
    for page in clients.s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        keys = [{"Key": v["Key"], "VersionId": v["VersionId"]} for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]]
        if keys:
            clients.s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            deleted += len(keys)
    return deleted


def stack_buckets(clients: Clients, stack_id: str) -> list[str]:
    """The names of the stack's buckets (kept when the stack goes: DeletionPolicy Retain)."""
    resources = cloudformation(clients).describe_stack_resources(StackName=stack_id)["StackResources"]
    return [r["PhysicalResourceId"] for r in resources if r.get("ResourceType") == "AWS::S3::Bucket" and r.get("PhysicalResourceId")]


def delete(clients: Clients, settings: Settings, stack_name: str, *, delete_endpoints: bool, delete_data: bool,
           assume_yes: bool, out: TextIO) -> int:
    with explained(f"reading stack {stack_name}"):
        stack = current_stack(clients, stack_name)
        endpoints = live_endpoints(clients, settings)
        if stack is None:
            print(f"stack {stack_name} does not exist in {settings.region}: nothing to delete", file=out)
            return 0
        if endpoints and not delete_endpoints:
            raise UsageError(f"endpoints {', '.join(endpoints)} still exist and use the stack's roles: delete them first, "
                             "or pass --delete-endpoints to delete them with the stack")
        buckets = stack_buckets(clients, stack["StackId"])
    kept = f"buckets {', '.join(buckets)} are {'emptied and deleted' if delete_data else 'kept with their data'}, " if buckets else ""
    print(f"stack {stack_name} ({settings.region}) will be deleted with the pipeline {settings.pipeline_name}, the "
          f"{len(LAMBDA_FUNCTIONS)} functions{', the endpoints ' + ', '.join(endpoints) if endpoints else ''}; {kept}the "
          f"model package group {settings.model_package_group} is kept with its versions", file=out)
    if not confirmed(assume_yes, out, "delete them"):
        return 1
    with explained(f"deleting stack {stack_name} and what upsert published"):
        for endpoint in endpoints:
            clients.sagemaker.delete_endpoint(EndpointName=endpoint)
            print(f"deleted endpoint {endpoint}", file=out)
        delete_published(clients, settings, out)
        before = cloudformation(clients).describe_stack_events(StackName=stack["StackId"])["StackEvents"]
        cloudformation(clients).delete_stack(StackName=stack["StackId"])
        final, events = wait_for_stack(clients, stack["StackId"], before[0]["Timestamp"], out, seen={e["EventId"] for e in before})
    if final["StackStatus"] != "DELETE_COMPLETE":
        failed = [event_line(e) for e in events if e["ResourceStatus"].endswith("_FAILED")]
        raise AwsError(f"stack {stack_name} ended {final['StackStatus']}: {failed[0] if failed else 'see the events above'}")
    print(f"stack {stack_name}: DELETE_COMPLETE", file=out)
    for bucket in buckets:
        if not delete_data:
            print(f"kept bucket {bucket} and its data (dogbreed bootstrap --delete --delete-data removes it)", file=out)
            continue
        with explained(f"deleting bucket {bucket}", bucket=bucket):
            count = empty_bucket(clients, bucket)
            clients.s3.delete_bucket(Bucket=bucket)
        print(f"deleted bucket {bucket} ({count} object versions)", file=out)
    return 0


# --- the command ----------------------------------------------------------------------------

def bootstrap_command(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    clients = Clients(Target(settings.region, args.profile, args.endpoint_url))
    stack_name = args.stack_name or settings.project_name
    out = sys.stdout
    for flag in ("delete_endpoints", "delete_data"):
        if getattr(args, flag) and not args.delete:
            raise UsageError(f"--{flag.replace('_', '-')} goes with --delete")
    if args.delete and args.print:
        raise UsageError("--print writes the parameters of a deployment; it does not go with --delete")
    if args.delete:
        return delete(clients, settings, stack_name, delete_endpoints=args.delete_endpoints, delete_data=args.delete_data,
                      assume_yes=args.yes, out=out)
    path = args.template or settings.source_dir / "infra" / "template.yaml"
    document = template_document(path)
    overrides = parameter_overrides(args.parameters, document)
    with explained(f"reading stack {stack_name}"):
        stack = current_stack(clients, stack_name)
    parameters = stack_parameters(document, settings, overrides, stack_values(stack, "Parameters", "ParameterKey", "ParameterValue"))
    if args.print:
        print(json.dumps(parameters, indent=2), file=out)
        return 0
    return deploy(clients, settings, stack, stack_name, document, parameters, template_bucket=args.template_bucket,
                  assume_yes=args.yes, out=out)


def add_bootstrap_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stack-name", default=None, help="CloudFormation stack (default: the project name)")
    parser.add_argument("--template", type=Path, default=None, metavar="FILE",
                        help="template to deploy (default: infra/template.yaml of the source directory)")
    parser.add_argument("--template-bucket", default=None, metavar="BUCKET",
                        help="where to upload a template over CloudFormation's 51,200-byte body limit (default: the "
                             "stack's artifact bucket, once it exists)")
    parser.add_argument("--parameter", dest="parameters", action="append", default=[], metavar="KEY=VALUE",
                        help="template parameter, e.g. ConnectionArn=arn:aws:codeconnections:...; repeatable. ProjectName, "
                             "ArtifactPrefix, KmsKeyArn and PublicEndpoint follow the settings; others keep the stack's "
                             "current value, else the template's default")
    parser.add_argument("--yes", action="store_true", help="apply the change set (or the deletion) without asking")
    parser.add_argument("--print", action="store_true",
                        help="write the parameters as JSON (ParameterKey/ParameterValue) and change nothing")
    parser.add_argument("--delete", action="store_true",
                        help="delete the pipeline, the functions and the stack; the buckets' data and the model group are kept")
    parser.add_argument("--delete-endpoints", action="store_true", help="with --delete: delete the two endpoints too")
    parser.add_argument("--delete-data", action="store_true", help="with --delete: empty and delete the two buckets too")

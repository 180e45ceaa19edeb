"""Upsert's Lambda functions from ``lambda.zip``: created when missing, code updated when its SHA-256
differs, configuration updated when it differs, then a version published and the alias ``live`` (which the
definition calls) moved to it; the provisioned concurrency of the invoke function's ``live`` alias:
set when it differs from the setting, removed when the setting is 0; and the resource-policy statement that lets
the stack's rule on failed executions invoke the notify function's ``live`` alias."""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from pipeline.assets import Asset
from pipeline.aws import Clients, error_code, explained
from pipeline.settings import LAMBDA_ALIAS, Settings

LAMBDA_RUNTIME = "python3.12"
LAMBDA_ARCHITECTURE = "arm64"
PROVISIONED_FUNCTION = "invoke-endpoint"  # the public function: its latency is what users wait for
NOTIFY_FUNCTION = "notify-failure"
RULE_STATEMENT_ID = "failed-executions-rule"
EVENTS_PRINCIPAL = "events.amazonaws.com"
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
        if self.function == NOTIFY_FUNCTION:
            return {"TOPIC_ARN": settings.failure_topic_arn}
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
    FunctionSpec(NOTIFY_FUNCTION, "notify_failure.handler", 60, 128,
                 "Tells the failure topic which step of a failed pipeline execution failed, why, and what to run next."),
)


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


def publish_rule_permission(clients: Clients, settings: Settings) -> tuple[str, bool]:
    """Let the stack's rule on failed executions (and only it) invoke the notify function's alias; returns
    (report line, changed).

    The stack cannot hold this statement: the function is upsert's, and a resource policy needs the function
    to exist. A statement of the same id that grants anything else is replaced.
    """
    name = settings.lambda_function_name(NOTIFY_FUNCTION)
    target = f"{name}:{LAMBDA_ALIAS}"
    rule = settings.failure_rule_arn
    with explained(f"letting EventBridge rule {settings.failure_rule_name} invoke Lambda function {target}"):
        current = _rule_statement(clients, name)
        if current is not None and _grants_rule(current, rule):
            return f"permission {target}: unchanged, rule {settings.failure_rule_name} may invoke it", False
        if current is not None:
            clients.lambda_.remove_permission(FunctionName=name, Qualifier=LAMBDA_ALIAS, StatementId=RULE_STATEMENT_ID)
        clients.lambda_.add_permission(FunctionName=name, Qualifier=LAMBDA_ALIAS, StatementId=RULE_STATEMENT_ID,
                                       Action="lambda:InvokeFunction", Principal=EVENTS_PRINCIPAL, SourceArn=rule)
    done = "replaced" if current is not None else "added"
    return f"permission {target}: {done}, rule {settings.failure_rule_name} may invoke it", True


def _rule_statement(clients: Clients, name: str) -> dict[str, Any] | None:
    """The alias's resource-policy statement RULE_STATEMENT_ID, or None when it has none."""
    try:
        policy = clients.lambda_.get_policy(FunctionName=name, Qualifier=LAMBDA_ALIAS)["Policy"]
    except ClientError as error:
        if error_code(error) == "ResourceNotFoundException":
            return None
        raise
    return next((s for s in json.loads(policy).get("Statement", []) if s.get("Sid") == RULE_STATEMENT_ID), None)


def _grants_rule(statement: dict[str, Any], rule_arn: str) -> bool:
    """Whether the statement lets EventBridge invoke the function for ``rule_arn`` alone."""
    source = (statement.get("Condition") or {}).get("ArnLike", {}).get("AWS:SourceArn")
    return (statement.get("Effect") == "Allow" and statement.get("Principal") == {"Service": EVENTS_PRINCIPAL}
            and statement.get("Action") == "lambda:InvokeFunction" and source == rule_arn)

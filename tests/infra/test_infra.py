"""infra/template.yaml: cfn-lint, parliament on every policy, and the least-privilege rules walked in code.

Policies are linted as they would be deployed: the template is resolved
(parameters, pseudo parameters, Ref, GetAtt, Sub, If) for a sample account,
once with and once without a KMS key, and each resulting JSON policy goes to
parliament.
"""
from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
import re
import sys
import types
from typing import Any, Callable, Iterator

import pytest

from sources import ROOT

TEMPLATE = ROOT / "infra" / "template.yaml"
ACCOUNT, REGION, PARTITION = "111122223333", "eu-west-1", "aws"
KMS_KEY = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
CONNECTION = f"arn:aws:codeconnections:{REGION}:{ACCOUNT}:connection/8f2a6e1c-3b4d-4e5f-9a0b-1c2d3e4f5a6b"
NO_VALUE = object()  # what Ref AWS::NoValue resolves to: the field or list item is left out
UNRESOLVED = object()  # an intrinsic handler's answer for a one-key mapping that is not a function it evaluates


# --- loading and resolving the template --------------------------------------

def resolve_node(node: Any, intrinsic: Callable[[str, Any], Any]) -> Any:
    """``node`` with every one-key mapping that ``intrinsic(key, argument)`` evaluates replaced by its value,
    and NO_VALUE left out of lists and mappings, as CloudFormation resolves a template."""
    if isinstance(node, list):
        return [item for item in (resolve_node(item, intrinsic) for item in node) if item is not NO_VALUE]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        (key, argument), = node.items()
        value = intrinsic(key, argument)
        if value is not UNRESOLVED:
            return value
    return {key: item for key, item in ((k, resolve_node(v, intrinsic)) for k, v in node.items()) if item is not NO_VALUE}


def load_template() -> dict:
    from cfnlint.decode import decode_str

    template, errors = decode_str(TEMPLATE.read_text())
    assert not errors, errors
    return json.loads(json.dumps(template))  # plain dicts and strings


class Resolver:
    """Evaluates the intrinsic functions the template uses, for one set of parameter values."""

    def __init__(self, template: dict, overrides: dict[str, str] | None = None) -> None:
        self.template = template
        self.parameters = {name: str(spec.get("Default", "")) for name, spec in template["Parameters"].items()}
        self.parameters.update(overrides or {})
        self.pseudo = {"AWS::AccountId": ACCOUNT, "AWS::Region": REGION, "AWS::Partition": PARTITION, "AWS::StackName": "dogbreed", "AWS::URLSuffix": "amazonaws.com"}
        self.conditions: dict[str, bool] = {}

    def condition(self, name: str) -> bool:
        if name not in self.conditions:
            self.conditions[name] = bool(self.value(self.template["Conditions"][name]))
        return self.conditions[name]

    def ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return NO_VALUE
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.parameters:
            return self.parameters[name]
        resource = self.template["Resources"][name]
        return self.physical_id(name, resource)

    def physical_id(self, logical: str, resource: dict) -> str:
        properties = self.value(resource.get("Properties", {}))
        kind = resource["Type"]
        names = {
            "AWS::S3::Bucket": "BucketName", "AWS::IAM::Role": "RoleName", "AWS::Logs::LogGroup": "LogGroupName",
            "AWS::SageMaker::ModelPackageGroup": "ModelPackageGroupName", "AWS::CloudWatch::Alarm": "AlarmName",
            "AWS::Events::Rule": "Name",
        }
        if kind == "AWS::SQS::Queue":  # Ref of a queue is its URL
            return f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{properties['QueueName']}"
        if kind == "AWS::SNS::Topic":  # Ref of a topic is its ARN
            return f"arn:{PARTITION}:sns:{REGION}:{ACCOUNT}:{properties['TopicName']}"
        return properties[names[kind]] if kind in names else f"{logical}-physical-id"

    def get_att(self, logical: str, attribute: str) -> str:
        resource = self.template["Resources"][logical]
        name = self.ref(logical)
        arns = {
            "AWS::S3::Bucket": f"arn:{PARTITION}:s3:::{name}",
            "AWS::IAM::Role": f"arn:{PARTITION}:iam::{ACCOUNT}:role/{name}",
            "AWS::Logs::LogGroup": f"arn:{PARTITION}:logs:{REGION}:{ACCOUNT}:log-group:{name}",
            "AWS::CloudWatch::Alarm": f"arn:{PARTITION}:cloudwatch:{REGION}:{ACCOUNT}:alarm:{name}",
            "AWS::SQS::Queue": f"arn:{PARTITION}:sqs:{REGION}:{ACCOUNT}:{name.rsplit('/', 1)[-1]}",
            "AWS::Events::Rule": f"arn:{PARTITION}:events:{REGION}:{ACCOUNT}:rule/{name}",
        }
        if attribute != "Arn":
            raise AssertionError(f"the resolver knows only Arn attributes, not {logical}.{attribute}")
        return arns[resource["Type"]]

    def sub(self, text: str, variables: dict[str, Any]) -> str:
        def replace(match: re.Match) -> str:
            token = match.group(1)
            if token in variables:
                return str(variables[token])
            if "." in token and not token.startswith("AWS::"):
                logical, attribute = token.split(".", 1)
                return self.get_att(logical, attribute)
            return str(self.ref(token))

        return re.sub(r"\$\{([^}!]+)\}", replace, text)

    def value(self, node: Any) -> Any:
        return resolve_node(node, self.intrinsic)

    def intrinsic(self, key: str, argument: Any) -> Any:
        """The value of the function ``key`` of ``argument``; UNRESOLVED when ``key`` names no function."""
        if key == "Ref":
            return self.ref(argument)
        if key == "Fn::GetAtt":
            logical, attribute = argument if isinstance(argument, list) else argument.split(".", 1)
            return self.get_att(logical, attribute)
        if key == "Fn::Sub":
            if isinstance(argument, list):
                return self.sub(argument[0], {k: self.value(v) for k, v in argument[1].items()})
            return self.sub(argument, {})
        if key == "Fn::If":
            name, when_true, when_false = argument
            return self.value(when_true if self.condition(name) else when_false)
        if key == "Fn::Equals":
            left, right = (self.value(item) for item in argument)
            return str(left) == str(right)
        if key == "Fn::Not":
            return not self.value(argument[0])
        if key == "Fn::And":
            return all(self.value(item) for item in argument)
        if key == "Fn::Or":
            return any(self.value(item) for item in argument)
        if key == "Condition":
            return self.condition(argument)
        if key == "Fn::Join":
            return argument[0].join(str(item) for item in self.value(argument[1]))
        if key.startswith("Fn::"):
            raise AssertionError(f"the template resolver does not know {key}")
        return UNRESOLVED

    def resources(self) -> dict[str, dict]:
        """The resources this parameter set creates, with their properties resolved."""
        created = {}
        for logical, resource in self.template["Resources"].items():
            if "Condition" in resource and not self.condition(resource["Condition"]):
                continue
            created[logical] = {"Type": resource["Type"], "Properties": self.value(resource.get("Properties", {}))}
        return created


PARAMETER_SETS = {
    "defaults": {},
    "kms-key": {"KmsKeyArn": KMS_KEY},
    "multi-instance-public": {"PublicEndpoint": "multi-instance", "ProjectName": "dogs-eu"},
    "connection": {"ConnectionArn": CONNECTION, "RepositoryUrl": "https://github.com/example/dogbreed", "Branch": "release"},
}


@pytest.fixture(scope="module")
def template() -> dict:
    return load_template()


@pytest.fixture(scope="module", params=sorted(PARAMETER_SETS))
def stack(request, template) -> dict[str, dict]:
    return Resolver(template, PARAMETER_SETS[request.param]).resources()


def policies(resources: dict[str, dict]) -> Iterator[tuple[str, str, dict]]:
    """(resource, policy name, document) for every permission and trust policy the stack holds."""
    for logical, resource in resources.items():
        properties = resource["Properties"]
        if resource["Type"] == "AWS::IAM::Role":
            yield logical, "trust", properties["AssumeRolePolicyDocument"]
            for policy in properties.get("Policies", []):
                yield logical, policy["PolicyName"], policy["PolicyDocument"]
        elif resource["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy", "AWS::S3::BucketPolicy"):
            yield logical, resource["Type"], properties["PolicyDocument"]


def statements(document: dict) -> list[dict]:
    found = document["Statement"]
    return found if isinstance(found, list) else [found]


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def role_statements(resources: dict[str, dict], role: str) -> list[dict]:
    return [s for logical, name, document in policies(resources) if logical == role and name != "trust" for s in statements(document)]


# --- cfn-lint ------------------------------------------------------------------

@pytest.mark.slow
def test_cfn_lint_finds_nothing():
    from cfnlint.api import ManualArgs, lint

    matches = lint(TEMPLATE.read_text(), config=ManualArgs(regions=["us-east-1", REGION], include_checks=["I"]))
    assert [f"{m.rule.id} line {m.linenumber}: {m.message}" for m in matches] == []


# --- parliament ------------------------------------------------------------------

def parliament_module():
    """parliament, importable although setuptools >= 81 no longer ships the pkg_resources it imports.

    parliament 1.6.4 uses pkg_resources only to find two data files in its own
    package; importlib.resources answers the same question.
    """
    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, name: str(importlib.resources.files(package) / name)
        sys.modules["pkg_resources"] = shim
    import parliament

    return parliament


# Findings parliament (with its community auditors) reports that this template
# means, keyed by (issue, action), each with the reason it stays.
SUPPRESSED = {
    ("CREDENTIALS_EXPOSURE", "ecr:getauthorizationtoken"):
        "SageMaker pulls the PyTorch containers from ECR with the role's registry token; the pull itself is limited to the two repositories",
    ("PERMISSIONS_MANAGEMENT_ACTIONS", "iam:passrole"):
        "each PassRole names its roles and one service, sagemaker or lambda (asserted in test_roles_pass_only_the_roles_their_services_need)",
    ("PERMISSIONS_MANAGEMENT_ACTIONS", "kms:creategrant"):
        "SageMaker encrypts job volumes and endpoint storage with the project key through a grant; limited to that key and to AWS resources",
    ("PERMISSIONS_MANAGEMENT_ACTIONS", "iam:createservicelinkedrole"):
        "Application Auto Scaling needs its SageMaker service-linked role once; limited to that role's ARN and service name",
    ("PRIVILEGE_ESCALATION", "lambda:updatefunctioncode"):
        "upsert publishes the project's five functions by design, so the build can act as their roles; those roles reach "
        "only this project's endpoints, models, executions, topic and logs, and UpdateFunctionCode is limited to the five functions",
    # PassRole + CreateFunction + CreateEventSourceMapping: upsert publishes the functions with their roles and
    # connects the wait queue to the wait function; the mapping is limited to that function's live alias
    # (test_the_codebuild_role_maps_only_the_wait_queue_to_the_wait_function), the roles to the five function roles.
    ("PRIVILEGE_ESCALATION", "iam:passrole"): "see lambda:createeventsourcemapping",
    ("PRIVILEGE_ESCALATION", "lambda:createfunction"): "see lambda:createeventsourcemapping",
    ("PRIVILEGE_ESCALATION", "lambda:createeventsourcemapping"):
        "the build creates the wait queue's event source mapping for the wait function's live alias only (a condition "
        "on lambda:FunctionArn), and passes only the five function roles to Lambda",
    ("PERMISSIONS_MANAGEMENT_ACTIONS", "lambda:addpermission"):
        "the notify function belongs to upsert, so upsert lets the stack's failure rule invoke it; limited to that "
        "function's live alias (asserted in test_the_failure_rule_reaches_the_notify_function_and_its_topic)",
    ("PERMISSIONS_MANAGEMENT_ACTIONS", "lambda:removepermission"): "as AddPermission: replaces a statement that grants anything else",
    ("RESOURCE_STAR", "application-autoscaling:registerscalabletarget"):
        "scalable-target ARNs carry an ID made at registration, so they cannot be named in advance; conditions pin the namespace and dimension",
    ("RESOURCE_STAR", "application-autoscaling:putscalingpolicy"): "as RegisterScalableTarget",
    ("RESOURCE_STAR", "application-autoscaling:deletescalingpolicy"): "as RegisterScalableTarget",
    ("RESOURCE_STAR", "application-autoscaling:deregisterscalabletarget"): "as RegisterScalableTarget",
}


def parliament_findings(document: dict) -> list:
    parliament = parliament_module()
    return list(parliament.analyze_policy_string(json.dumps(document), include_community_auditors=True).findings)


def finding_actions(finding) -> list[str]:
    detail = finding.detail if isinstance(finding.detail, list) else finding.location.get("actions", [])
    return [str(action).lower() for action in detail]


def test_every_permission_policy_passes_parliament(template):
    problems, used = [], set()
    for parameters in PARAMETER_SETS.values():
        for logical, name, document in policies(Resolver(template, parameters).resources()):
            if name == "trust":
                continue  # a trust policy is a resource policy; parliament lints identity policies
            for finding in parliament_findings(document):
                keys = {(finding.issue, action) for action in finding_actions(finding)}
                if keys and keys <= SUPPRESSED.keys():
                    used |= keys
                else:
                    problems.append(f"{logical}/{name}: {finding.issue} {finding.detail} {finding.location}")
    assert problems == []
    assert used == set(SUPPRESSED), f"suppressions no finding needs: {set(SUPPRESSED) - used}"


# --- least privilege, walked in code --------------------------------------------

def privileges(action: str) -> list[dict]:
    """parliament's record of an action: the resource types it can be limited to."""
    service, name = action.split(":", 1)
    for entry in parliament_module().iam_definition:
        if entry["prefix"] == service:
            return [p for p in entry["privileges"] if p["privilege"].lower() == name.lower()]
    return []


def accepts_resources(action: str) -> bool:
    return any(r["resource_type"] for p in privileges(action) for r in p["resource_types"])


def test_every_action_exists_and_none_is_a_wildcard(stack):
    for logical, name, document in policies(stack):
        for statement in statements(document):
            for action in as_list(statement["Action"]):
                if statement["Effect"] == "Deny":
                    continue
                assert "*" not in action, f"{logical}: wildcard action {action}"
                assert privileges(action), f"{logical}: unknown action {action}"


# Actions allowed on Resource "*" although IAM knows a resource type for them (see SUPPRESSED for why).
STAR_WITH_CONDITION = {action for issue, action in SUPPRESSED if issue == "RESOURCE_STAR"}


def test_resource_star_only_where_iam_knows_nothing_narrower(stack):
    for logical, name, document in policies(stack):
        for statement in statements(document):
            if statement["Effect"] != "Allow" or "*" not in as_list(statement.get("Resource", [])):
                continue
            for action in as_list(statement["Action"]):
                if action.lower() in STAR_WITH_CONDITION:
                    assert statement["Condition"]["StringEquals"]["application-autoscaling:service-namespace"] == "sagemaker", logical
                    continue
                assert not accepts_resources(action), f"{logical}: {action} on Resource '*' but IAM can narrow it"


def test_no_role_has_sagemaker_star_or_admin_actions(stack):
    for logical, name, document in policies(stack):
        for statement in statements(document):
            actions = [a.lower() for a in as_list(statement["Action"])]
            if statement["Effect"] == "Allow":
                assert not any(a in ("*", "sagemaker:*", "iam:*", "s3:*", "lambda:*") for a in actions), logical
                assert not any(a.startswith(("iam:put", "iam:attach", "iam:create", "iam:update", "sts:")) and a != "iam:createservicelinkedrole" for a in actions if name != "trust"), logical


def test_the_invoke_role_may_invoke_its_one_endpoint_and_nothing_else(stack):
    found = role_statements(stack, "InvokeFunctionRole")
    by_action = {a: s for s in found for a in as_list(s["Action"])}
    assert set(by_action) == {"sagemaker:InvokeEndpoint", "logs:CreateLogStream", "logs:PutLogEvents"}
    project = stack["ModelPackageGroup"]["Properties"]["ModelPackageGroupName"].removesuffix("-models")
    endpoint = stack["InvokeFunctionLogs"]["Properties"]["LogGroupName"]
    assert endpoint == f"/aws/lambda/{project}-invoke-endpoint"
    (resource,) = as_list(by_action["sagemaker:InvokeEndpoint"]["Resource"])
    assert resource in {f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/{project}-{slug}" for slug in ("single-instance", "multi-instance")}
    assert as_list(by_action["logs:PutLogEvents"]["Resource"]) == [f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/aws/lambda/{project}-invoke-endpoint:*"]


def test_roles_pass_only_the_roles_their_services_need(template):
    passes: dict[str, set[tuple[str, str]]] = {}
    for logical, name, document in policies(Resolver(template).resources()):
        for statement in statements(document):
            if "iam:PassRole" in as_list(statement["Action"]):
                assert as_list(statement["Action"]) == ["iam:PassRole"], logical
                (service,) = statement["Condition"]["StringEquals"].values()
                assert list(statement["Condition"]) == ["StringEquals"] and list(statement["Condition"]["StringEquals"]) == ["iam:PassedToService"]
                passes.setdefault(logical, set()).update((resource, service) for resource in as_list(statement["Resource"]))
    role = f"arn:aws:iam::{ACCOUNT}:role/dogbreed"
    assert passes == {
        "DeployFunctionRole": {(f"{role}-sagemaker-model", "sagemaker.amazonaws.com")},
        "PipelineRole": {(f"{role}-sagemaker-jobs", "sagemaker.amazonaws.com")},
        "CodeBuildRole": {(f"{role}-pipeline", "sagemaker.amazonaws.com")}
        | {(f"{role}-{function}", "lambda.amazonaws.com") for function in ("deploy-endpoint", "wait-endpoint", "check-endpoint", "invoke-endpoint",
                                                                        "notify-failure")},
    }


def test_the_endpoint_roles_reach_only_the_two_project_endpoints(stack):
    project = stack["ModelPackageGroup"]["Properties"]["ModelPackageGroupName"].removesuffix("-models")
    endpoints = {f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/{project}-{slug}" for slug in ("single-instance", "multi-instance")}
    for role in ("DeployFunctionRole", "WaitFunctionRole", "CheckFunctionRole"):
        for statement in role_statements(stack, role):
            for resource in as_list(statement["Resource"]):
                if ":endpoint/" in resource:
                    assert resource in endpoints, (role, resource)


def test_kms_is_granted_only_with_a_key(template):
    without = Resolver(template).resources()
    with_key = Resolver(template, {"KmsKeyArn": KMS_KEY}).resources()
    kms_without = [a for _, _, d in policies(without) for s in statements(d) for a in as_list(s["Action"]) if a.startswith("kms:")]
    kms_with = {r for _, _, d in policies(with_key) for s in statements(d) if any(a.startswith("kms:") for a in as_list(s["Action"])) for r in as_list(s["Resource"])}
    assert kms_without == []
    assert kms_with == {KMS_KEY}
    encryption = with_key["ArtifactBucket"]["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    assert encryption == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": KMS_KEY}


# --- the bucket, the functions, the parameters ----------------------------------

def test_the_bucket_is_encrypted_private_and_tls_only(stack):
    bucket = stack["ArtifactBucket"]["Properties"]
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms")
    assert all(bucket["PublicAccessBlockConfiguration"][key] is True for key in ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"))
    (deny,) = statements(stack["ArtifactBucketPolicy"]["Properties"]["PolicyDocument"])
    assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert set(deny["Resource"]) == {f"arn:aws:s3:::{bucket['BucketName']}", f"arn:aws:s3:::{bucket['BucketName']}/*"}


def test_rollback_alarms_watch_the_two_endpoints(template):
    stack = Resolver(template).resources()
    alarms = {r["Properties"]["AlarmName"]: r["Properties"] for r in stack.values() if r["Type"] == "AWS::CloudWatch::Alarm"}
    for slug in ("single-instance", "multi-instance"):
        endpoint = f"dogbreed-{slug}"
        alarm = alarms[f"{endpoint}-5xx-errors"]  # ROLLBACK_ALARM_NAME_PATTERN={endpoint_name}-5xx-errors names them
        assert {d["Name"]: d["Value"] for d in alarm["Dimensions"]} == {"EndpointName": endpoint, "VariantName": "AllTraffic"}
        assert alarm["MetricName"] == "Invocation5XXErrors" and alarm["TreatMissingData"] == "notBreaching"


def test_names_match_the_pipeline_settings(template):
    """The pipeline builds names and ARNs from its settings; the stack must create exactly those."""
    from pipeline.settings import LAMBDA_FUNCTIONS, Settings

    settings = Settings(region=REGION, account=ACCOUNT, source_dir=ROOT)
    stack = Resolver(template).resources()
    roles = {f"arn:aws:iam::{ACCOUNT}:role/{r['Properties']['RoleName']}" for r in stack.values() if r["Type"] == "AWS::IAM::Role"}
    expected_roles = {settings.pipeline_role_arn, settings.job_role_arn, settings.model_role_arn}
    expected_roles |= {settings.lambda_role_arn(function) for function in LAMBDA_FUNCTIONS}
    assert expected_roles <= roles
    assert stack["ArtifactBucket"]["Properties"]["BucketName"] == settings.bucket
    assert stack["ModelPackageGroup"]["Properties"]["ModelPackageGroupName"] == settings.model_package_group
    assert template["Parameters"]["ArtifactPrefix"]["Default"] == settings.prefix
    invoke = {r for s in role_statements(stack, "InvokeFunctionRole") if s["Action"] == "sagemaker:InvokeEndpoint" for r in as_list(s["Resource"])}
    assert invoke == {f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/{settings.invoke_endpoint_name}"}
    called = {r for s in role_statements(stack, "PipelineRole") if s.get("Sid") == "CallDeployAndCheck" for r in s["Resource"]}
    assert called == {settings.lambda_arn("deploy-endpoint"), settings.lambda_arn("check-endpoint")}
    logs = {r["Properties"]["LogGroupName"] for r in stack.values() if r["Type"] == "AWS::Logs::LogGroup"}
    assert logs == {f"/aws/lambda/{settings.lambda_function_name(function)}" for function in LAMBDA_FUNCTIONS} | {
        f"/aws/codebuild/{settings.project_name}-build"}


def test_the_handlers_upsert_publishes_exist_in_lambda():
    import inspect

    from lambda_harness import load_handler
    from pipeline.publish.functions import FUNCTIONS

    for spec in FUNCTIONS:
        module, _, name = spec.handler.partition(".")
        handler = getattr(load_handler(module), name)
        assert list(inspect.signature(handler).parameters) == ["event", "context"], spec.handler


def test_only_the_codebuild_role_sets_provisioned_concurrency_and_only_on_the_invoke_alias(stack):
    project = stack["ModelPackageGroup"]["Properties"]["ModelPackageGroupName"].removesuffix("-models")
    granted = {
        (logical, action, resource)
        for logical, name, document in policies(stack) if name != "trust"
        for statement in statements(document) if statement["Effect"] == "Allow"
        for action in as_list(statement["Action"]) if "ProvisionedConcurrency" in action
        for resource in as_list(statement["Resource"])
    }
    alias = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{project}-invoke-endpoint:live"
    assert granted == {("CodeBuildRole", f"lambda:{verb}ProvisionedConcurrencyConfig", alias) for verb in ("Get", "Put", "Delete")}


def allowed(statements_: list[dict], action: str, resource: str) -> bool:
    """Whether an Allow statement grants ``action`` on ``resource`` (IAM wildcards in the policy's resources)."""
    import fnmatch

    return any(
        s["Effect"] == "Allow" and action in as_list(s["Action"])
        and any(fnmatch.fnmatchcase(resource, pattern) for pattern in as_list(s["Resource"]))
        for s in statements_
    )


@functools.lru_cache(maxsize=None)
def api_names(service: str) -> dict[str, str]:
    """A boto3 client's method names -> the API operations they call (one client per service)."""
    import boto3

    return boto3.client(service, region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x").meta.method_to_api_mapping


def test_the_codebuild_role_allows_every_call_upsert_makes(template):
    """Every AWS call in pipeline/publish/ that upsert and start make, on the resource it names, is allowed to the
    CodeBuild role (diagnose, retry and approve are a person's commands, run with that person's credentials)."""
    from pipeline.settings import LAMBDA_FUNCTIONS, Settings

    settings = Settings(region=REGION, account=ACCOUNT, source_dir=ROOT)
    # bootstrap runs as whoever deploys the stack, and so do the day-two commands: neither runs in CodeBuild
    operators = {"bootstrap.py", "diagnose.py", "retry.py", "approve.py", "lookup.py"}
    source = "\n".join(path.read_text() for path in sorted((ROOT / "pipeline" / "publish").glob("*.py"))
                       if path.name not in operators)
    calls = set(re.findall(r"clients\.(lambda_|sagemaker|s3)\.([a-z_]+)\(", source))
    granted = role_statements(Resolver(template).resources(), "CodeBuildRole")
    prefix = f"arn:aws:s3:::{settings.bucket}/{settings.prefix}/assets/code/sourcedir.tar.gz"
    resources = {
        "lambda": [f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{settings.lambda_function_name(f)}{q}" for f in LAMBDA_FUNCTIONS for q in ("", ":live", ":7")]
        + [f"arn:aws:lambda:{REGION}:{ACCOUNT}:event-source-mapping:a1b2c3d4-5678-90ab-cdef-11111EXAMPLE"],
        "sagemaker": [f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:pipeline/{settings.pipeline_name}", f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:pipeline/{settings.pipeline_name}/execution/abc123"],
        "s3": [prefix],
    }
    renamed = {"s3:HeadObject": "s3:GetObject"}
    waiters = {("lambda", "GetFunction")}  # get_waiter("function_active_v2" / "function_updated_v2") polls GetFunction
    missing = []
    operations = set(waiters)
    for service, method in calls:
        if method == "get_waiter":
            continue
        service = service.rstrip("_")
        operations.add((service, api_names(service)[method]))
    assert ("lambda", "PublishVersion") in operations and ("sagemaker", "UpdatePipeline") in operations
    assert {("lambda", f"{verb}ProvisionedConcurrencyConfig") for verb in ("Get", "Put", "Delete")} <= operations
    assert {("lambda", f"{verb}EventSourceMapping") for verb in ("Create", "Update")} <= operations
    for service, api in sorted(operations):
        action = renamed.get(f"{service}:{api}", f"{service}:{api}")
        if not any(allowed(granted, action, resource) for resource in resources[service]):
            missing.append(action)
    assert missing == []


# --- the Lambda roles allow every call their handler makes ------------------------

# The variable names the handlers give their boto3 clients, and the client's service.
HANDLER_CLIENTS = {"sagemaker": "sagemaker", "autoscaling": "application-autoscaling", "runtime": "sagemaker-runtime", "cloudwatch": "cloudwatch",
                   "sqs": "sqs"}
IAM_PREFIX = {"sagemaker-runtime": "sagemaker"}
ALARM_ID = "AlarmHigh-9f1c2d3e-0a1b-4c5d-8e9f-0123456789ab"


def endpoint_wait_queue(endpoint: str) -> str:
    return f"arn:aws:sqs:{REGION}:{ACCOUNT}:{endpoint.rsplit('-', 2)[0]}-endpoint-wait"


def dependent_permissions(action: str, endpoint: str, model_role: str) -> set[tuple[str, str]]:
    """What AWS checks on the caller, beyond ``action`` itself, when the call acts on other services for it.

    A target-tracking policy's alarms are named TargetTracking-<resource id>-AlarmHigh/-AlarmLow-<id>;
    Application Auto Scaling creates, replaces and deletes them with the caller's permissions.
    """
    alarms = {f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:TargetTracking-endpoint/{endpoint}/variant/AllTraffic-{ALARM_ID}"}
    endpoint_arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/{endpoint}"
    linked_role = f"arn:aws:iam::{ACCOUNT}:role/aws-service-role/sagemaker.application-autoscaling.amazonaws.com/AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint"
    table = {
        "application-autoscaling:RegisterScalableTarget": {
            ("sagemaker:DescribeEndpoint", endpoint_arn), ("sagemaker:UpdateEndpointWeightsAndCapacities", endpoint_arn),
            ("iam:CreateServiceLinkedRole", linked_role),
        },
        "application-autoscaling:PutScalingPolicy": {(a, r) for a in ("cloudwatch:PutMetricAlarm", "cloudwatch:DescribeAlarms", "cloudwatch:DeleteAlarms") for r in alarms},
        "application-autoscaling:DeleteScalingPolicy": {(a, r) for a in ("cloudwatch:DescribeAlarms", "cloudwatch:DeleteAlarms") for r in alarms},
        "application-autoscaling:DeregisterScalableTarget": {(a, r) for a in ("cloudwatch:DescribeAlarms", "cloudwatch:DeleteAlarms") for r in alarms},
        "sagemaker:CreateModel": {("iam:PassRole", model_role)},
        # Lambda's SQS event source mapping receives, deletes and reads the queue as the function's role
        "sqs:ChangeMessageVisibility": {(a, endpoint_wait_queue(endpoint)) for a in ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes")},
    }
    return table.get(action, set())


def direct_resource(action: str, endpoint: str) -> str:
    """The resource a handler's call names, for an endpoint called ``endpoint``."""
    service, name = action.split(":", 1)
    project = endpoint.rsplit("-", 2)[0]
    if service == "sqs":
        return endpoint_wait_queue(endpoint)
    if "PipelineExecutionStep" in name:
        return f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:pipeline/{project}-pipeline/execution/abc123"
    if service == "application-autoscaling":
        return f"arn:aws:application-autoscaling:{REGION}:{ACCOUNT}:scalable-target/056338ba3b5f42c6a2b8d8c1c2b5e4e2"
    if service == "cloudwatch":
        return f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:{endpoint}-5xx-errors"  # the stack's rollback alarm
    if "ModelPackage" in name:
        return f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/{project}-models/3"
    if "EndpointConfig" in name:
        return f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint-config/{endpoint}-0123456789"
    if "Model" in name:
        return f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model/{endpoint}-0123456789"
    return f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/{endpoint}"


def required_permissions(handler_file: str, endpoint: str, model_role: str) -> set[tuple[str, str]]:
    """(IAM action, resource) for every boto3 call in lambda/<handler_file>, and what those calls need besides."""
    source = (ROOT / "lambda" / handler_file).read_text()
    required: set[tuple[str, str]] = set()
    for variable, method in set(re.findall(r"\b(" + "|".join(HANDLER_CLIENTS) + r")\.([a-z_]+)\b", source)):
        service = HANDLER_CLIENTS[variable]
        mapping = api_names(service)
        if method not in mapping:
            continue
        action = f"{IAM_PREFIX.get(service, service)}:{mapping[method]}"
        required.add((action, direct_resource(action, endpoint)))
        required |= dependent_permissions(action, endpoint, model_role)
    return required


@pytest.mark.slow
@pytest.mark.parametrize(("role", "handler_file"), [("DeployFunctionRole", "deploy_endpoint.py"), ("WaitFunctionRole", "wait_endpoint.py"),
                                                    ("CheckFunctionRole", "check_endpoint.py")])
def test_the_endpoint_roles_allow_every_call_their_handler_makes(stack, role, handler_file):
    project = stack["ModelPackageGroup"]["Properties"]["ModelPackageGroupName"].removesuffix("-models")
    model_role = f"arn:aws:iam::{ACCOUNT}:role/{stack['SageMakerModelRole']['Properties']['RoleName']}"
    granted = role_statements(stack, role)
    for slug in ("single-instance", "multi-instance"):
        required = required_permissions(handler_file, f"{project}-{slug}", model_role)
        actions = {action for action, _ in required}
        if role == "CheckFunctionRole":
            assert {"application-autoscaling:PutScalingPolicy", "cloudwatch:PutMetricAlarm", "sagemaker:InvokeEndpoint"} <= actions
        elif role == "WaitFunctionRole":
            assert {"sagemaker:DescribeEndpoint", "sagemaker:SendPipelineExecutionStepSuccess", "sagemaker:SendPipelineExecutionStepFailure",
                    "sqs:ChangeMessageVisibility", "sqs:ReceiveMessage"} <= actions
        else:
            assert {"application-autoscaling:DeregisterScalableTarget", "cloudwatch:DeleteAlarms", "iam:PassRole"} <= actions
        missing = sorted(f"{action} on {resource}" for action, resource in required if not allowed(granted, action, resource))
        assert missing == [], role


def test_the_endpoint_wait_queue_is_encrypted_has_a_dead_letter_queue_and_only_the_pipeline_sends(stack, template):
    queues = {logical: r["Properties"] for logical, r in stack.items() if r["Type"] == "AWS::SQS::Queue"}
    assert set(queues) == {"EndpointWaitQueue", "EndpointWaitDeadLetterQueue", "DeployOnApprovalDeadLetterQueue"}
    assert all(queue["SqsManagedSseEnabled"] is True for queue in queues.values())
    wait = queues["EndpointWaitQueue"]
    assert wait["RedrivePolicy"]["maxReceiveCount"] >= 720 * 60 // 300  # the longest EndpointWaitMinutes at the longest poll interval
    assert wait["MessageRetentionPeriod"] >= 12 * 3600 and wait["VisibilityTimeout"] >= 60
    (policy,) = [stack["EndpointWaitQueuePolicy"]["Properties"]["PolicyDocument"]]
    pipeline_role = f"arn:aws:iam::{ACCOUNT}:role/{stack['PipelineRole']['Properties']['RoleName']}"
    (deny,) = [s for s in policy["Statement"] if s["Effect"] == "Deny" and s["Action"] == "sqs:SendMessage"]
    assert deny["Principal"] == "*" and deny["Condition"] == {"ArnNotEquals": {"aws:PrincipalArn": pipeline_role}}
    senders = {logical for logical, name, document in policies(stack) if name != "trust" for st in statements(document)
               if st["Effect"] == "Allow" and "sqs:SendMessage" in as_list(st["Action"])}
    assert senders == {"PipelineRole"}
    assert not [r for r in stack.values() if r["Type"] == "AWS::Lambda::EventSourceMapping"]  # upsert makes it


def test_the_target_tracking_alarm_grants_reach_only_the_project_endpoints(stack):
    project = stack["ModelPackageGroup"]["Properties"]["ModelPackageGroupName"].removesuffix("-models")
    for role in ("DeployFunctionRole", "CheckFunctionRole"):
        granted = role_statements(stack, role)
        assert not allowed(granted, "cloudwatch:DeleteAlarms", f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:TargetTracking-endpoint/other-endpoint/variant/AllTraffic-{ALARM_ID}")
        assert not allowed(granted, "cloudwatch:DeleteAlarms", f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:{project}-single-instance-5xx-errors")
        assert not allowed(granted, "cloudwatch:PutMetricAlarm", f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:{project}-single-instance-5xx-errors")


# --- the build: the CodeBuild project, its source and trigger, its environment, the dashboard ---------

def test_the_codebuild_role_maps_only_the_wait_queue_to_the_wait_function(stack):
    """Upsert connects the wait queue itself; IAM lets the build create, read and update mappings of the wait
    function's live alias only, and delete none."""
    project = stack["ModelPackageGroup"]["Properties"]["ModelPackageGroupName"].removesuffix("-models")
    alias = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{project}-wait-endpoint:live"
    granted = {}
    for logical, name, document in policies(stack):
        for statement in statements(document):
            for action in as_list(statement["Action"]):
                if statement["Effect"] == "Allow" and "EventSourceMapping" in action:
                    granted[action] = (logical, statement)
    assert set(granted) == {f"lambda:{verb}EventSourceMapping" for verb in ("Create", "Get", "Update")} | {"lambda:ListEventSourceMappings"}
    for action, (logical, statement) in granted.items():
        assert logical == "CodeBuildRole", action
        if action != "lambda:ListEventSourceMappings":  # List has no resource and no condition key in IAM
            assert statement["Condition"] == {"ArnEquals": {"lambda:FunctionArn": alias}}, action


def buildspec() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "buildspec.yml").read_text())


def buildspec_variables() -> set[str]:
    """The variables buildspec.yml's commands read that it also declares as its own overridable defaults."""
    spec = buildspec()
    commands = json.dumps(spec["phases"])
    read = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", commands))
    return read & set(spec["env"]["variables"])


# Settings variables the project leaves out, each with the reason.
NOT_IN_THE_PROJECT = {
    "AWS_REGION": "CodeBuild sets it in every build",
    "AWS_ACCOUNT_ID": "the account comes from CODEBUILD_BUILD_ARN",
    "SAGEMAKER_PROJECT_ID": "only SageMaker Projects have a project id",
    "SPOT_TRAINING": "a choice per team; the setting's default applies",
    "TUNING_MAX_JOBS": "a choice per team within the account's tuning quotas; the setting's default applies",
    "TUNING_MAX_PARALLEL_JOBS": "as TUNING_MAX_JOBS",
    "ALLOWED_ORIGIN": "the invoke function's CORS origins are a choice per site; none by default",
    "INVOKE_PROVISIONED_CONCURRENCY": "the setting's default applies (one source of truth for the number)",
}


def test_the_build_project_environment_names_exactly_what_buildspec_and_settings_read(stack):
    from pipeline.settings import ENVIRONMENT

    environment = {v["Name"]: v["Value"] for v in stack["BuildProject"]["Properties"]["Environment"]["EnvironmentVariables"]}
    assert set(NOT_IN_THE_PROJECT) <= set(ENVIRONMENT.values())
    assert buildspec_variables() == {"START_PIPELINE", "WAIT_FOR_PIPELINE"}
    assert set(environment) == (set(ENVIRONMENT.values()) - set(NOT_IN_THE_PROJECT)) | buildspec_variables()
    documented = set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", (ROOT / "buildspec.yml").read_text().split("version:")[0]))
    assert documented - {"CODEBUILD_BUILD_ARN"} <= set(environment) | set(NOT_IN_THE_PROJECT)
    assert environment["WAIT_FOR_PIPELINE"] == "false" and environment["START_PIPELINE"] == "true"


def test_the_build_project_settings_are_the_stacks_own_resources(template):
    from pipeline.settings import Settings, load_settings

    stack = Resolver(template).resources()
    environment = {v["Name"]: v["Value"] for v in stack["BuildProject"]["Properties"]["Environment"]["EnvironmentVariables"]}
    settings = load_settings({"source_dir": str(ROOT)}, {**environment, "CODEBUILD_BUILD_ARN": f"arn:aws:codebuild:{REGION}:{ACCOUNT}:build/dogbreed-build:1"})
    assert settings == Settings(region=REGION, account=ACCOUNT, source_dir=ROOT)


def test_the_build_runs_buildspec_from_the_connected_branch_or_the_source_object(template):
    from pipeline.settings import Settings

    settings = Settings(region=REGION, account=ACCOUNT, source_dir=ROOT)
    connected = Resolver(template, PARAMETER_SETS["connection"]).resources()["BuildProject"]["Properties"]
    assert connected["Source"] == {"Type": "GITHUB", "Location": "https://github.com/example/dogbreed", "BuildSpec": "buildspec.yml",
                                   "Auth": {"Type": "CODECONNECTIONS", "Resource": CONNECTION}, "GitCloneDepth": 1, "ReportBuildStatus": True}
    assert connected["SourceVersion"] == "refs/heads/release"
    assert connected["Triggers"] == {"Webhook": True, "FilterGroups": [[{"Type": "EVENT", "Pattern": "PUSH"},
                                                                        {"Type": "HEAD_REF", "Pattern": "^refs/heads/release$"}]]}
    stack = Resolver(template).resources()
    from_s3 = stack["BuildProject"]["Properties"]
    assert "Triggers" not in from_s3 and "SourceVersion" not in from_s3
    assert from_s3["Source"]["Type"] == "S3"
    source_object = f"arn:aws:s3:::{from_s3['Source']['Location']}"
    granted = role_statements(stack, "CodeBuildRole")
    assert allowed(granted, "s3:GetObject", source_object) and allowed(granted, "s3:GetObjectVersion", source_object)
    assert not allowed(role_statements(Resolver(template, PARAMETER_SETS["connection"]).resources(), "CodeBuildRole"), "s3:GetObjectVersion", source_object)
    assert allowed(role_statements(Resolver(template, PARAMETER_SETS["connection"]).resources(), "CodeBuildRole"), "codeconnections:UseConnection", CONNECTION)
    for properties in (connected, from_s3):
        assert properties["Name"] == f"{settings.project_name}-build"
        assert properties["ServiceRole"] == f"arn:aws:iam::{ACCOUNT}:role/{settings.project_name}-codebuild"
        assert properties["LogsConfig"]["CloudWatchLogs"] == {"Status": "ENABLED", "GroupName": f"/aws/codebuild/{settings.project_name}-build"}
        assert properties["Environment"]["PrivilegedMode"] is False
    assert buildspec()["phases"]["install"]["runtime-versions"]["python"] == 3.12
    artifacts = from_s3["Artifacts"]
    assert artifacts["Location"] == settings.bucket and artifacts["Path"].startswith(f"{settings.prefix}/")


def test_the_dashboard_shows_the_two_endpoints_and_the_pipeline(template):
    from pipeline.settings import Settings

    settings = Settings(region=REGION, account=ACCOUNT, source_dir=ROOT)
    body = json.loads(Resolver(template).resources()["Dashboard"]["Properties"]["DashboardBody"])
    rows = [[value for value in row if isinstance(value, str)] for widget in body["widgets"] for row in widget["properties"]["metrics"]]
    endpoint_rows = {(namespace, metric, dict(zip(dimensions[::2], dimensions[1::2]))["EndpointName"])
                     for namespace, metric, *dimensions in rows if "EndpointName" in dimensions}
    for endpoint in ("dogbreed-single-instance", "dogbreed-multi-instance"):
        for metric in ("Invocations", "Invocation4XXErrors", "Invocation5XXErrors", "ModelLatency"):
            assert ("AWS/SageMaker", metric, endpoint) in endpoint_rows
        for metric in ("CPUUtilization", "MemoryUtilization"):  # per instance: SageMaker's endpoint instance metrics
            assert ("/aws/sagemaker/Endpoints", metric, endpoint) in endpoint_rows
    executions = {metric for namespace, metric, *dimensions in rows if dimensions == ["PipelineName", settings.pipeline_name]}
    assert executions == {"ExecutionStarted", "ExecutionSucceeded", "ExecutionFailed", "ExecutionStopped"}
    assert all(len(row) in (4, 6) for row in rows)  # every row names its namespace, metric and dimensions in full
    assert all(widget["properties"]["region"] == REGION for widget in body["widgets"])


# --- deploy on approval --------------------------------------------------------

def approval_rule(stack: dict[str, dict]) -> dict:
    return stack["DeployOnApprovalRule"]["Properties"]


def test_the_approval_rule_may_start_the_deploy_pipeline_and_nothing_else(stack):
    from pipeline.settings import Settings

    rule = approval_rule(stack)
    project = rule["Name"].removesuffix("-deploy-on-approval")
    settings = Settings(region=REGION, account=ACCOUNT, source_dir=ROOT, project_name=project)
    target, = rule["Targets"]
    deploy_pipeline = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:pipeline/{settings.deploy_pipeline_name}"
    assert target["Arn"] == deploy_pipeline
    role = stack["DeployOnApprovalRole"]["Properties"]
    assert target["RoleArn"] == f"arn:aws:iam::{ACCOUNT}:role/{role['RoleName']}"
    trust, = statements(role["AssumeRolePolicyDocument"])
    assert trust["Principal"] == {"Service": "events.amazonaws.com"} and trust["Action"] == "sts:AssumeRole"
    assert [(s["Action"], s["Resource"]) for s in role_statements(stack, "DeployOnApprovalRole")] == [
        ("sagemaker:StartPipelineExecution", deploy_pipeline)]
    pattern = rule["EventPattern"]
    assert pattern["detail-type"] == ["SageMaker Model Package State Change"]
    assert pattern["detail"]["ModelPackageGroupName"] == [settings.model_package_group]
    assert pattern["detail"]["ModelApprovalStatus"] == ["Approved"]
    dead_letters = stack["DeployOnApprovalDeadLetterQueue"]["Properties"]
    assert target["DeadLetterConfig"]["Arn"].endswith(f":{dead_letters['QueueName']}")


def test_the_deploy_pipeline_waits_are_answered_and_upsert_may_publish_it(stack):
    rule = approval_rule(stack)
    project = rule["Name"].removesuffix("-deploy-on-approval")
    executions = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:pipeline/{project}-deploy/execution/*"
    answers = [s for s in role_statements(stack, "WaitFunctionRole") if s.get("Sid") == "AnswerCallbackSteps"]
    assert any(executions in as_list(s["Resource"]) for s in answers)
    upsert = [s for s in role_statements(stack, "CodeBuildRole") if "sagemaker:UpdatePipeline" in as_list(s["Action"])]
    assert any(rule["Targets"][0]["Arn"] in as_list(s["Resource"]) for s in upsert)


# --- told when an execution fails ------------------------------------------------------

def test_the_failure_rule_reaches_the_notify_function_and_its_topic(stack):
    """The rule, the function's alias, the topic and the permissions name the same things as the settings and the handler."""
    from lambda_harness import load_handler
    from pipeline.publish.functions import NOTIFY_FUNCTION
    from pipeline.settings import LAMBDA_ALIAS, Settings

    project = stack["ModelPackageGroup"]["Properties"]["ModelPackageGroupName"].removesuffix("-models")
    settings = Settings(region=REGION, account=ACCOUNT, project_name=project, source_dir=ROOT)
    rule = stack["FailedExecutionRule"]["Properties"]
    assert rule["Name"] == settings.failure_rule_name and rule["State"] == "ENABLED"
    (target,) = rule["Targets"]
    assert target["Arn"] == f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{settings.lambda_function_name(NOTIFY_FUNCTION)}:{LAMBDA_ALIAS}"
    pattern = rule["EventPattern"]
    notify = load_handler("notify_failure")
    assert pattern["source"] == ["aws.sagemaker"] and pattern["detail-type"] == [notify.DETAIL_TYPE]
    assert set(pattern["detail"]["currentPipelineExecutionStatus"]) <= set(notify.NOTIFIED_STATUSES)
    pipelines = {arn.rsplit("/", 1)[1] for arn in pattern["detail"]["pipelineArn"]}
    assert pipelines == {settings.pipeline_name, f"{project}-deploy"}
    topic = stack["FailureTopic"]["Properties"]
    assert f"arn:aws:sns:{REGION}:{ACCOUNT}:{topic['TopicName']}" == settings.failure_topic_arn
    assert topic["KmsMasterKeyId"] in ("alias/aws/sns", KMS_KEY)
    notify_role = f"arn:aws:iam::{ACCOUNT}:role/{stack['NotifyFunctionRole']['Properties']['RoleName']}"
    assert notify_role == settings.notify_lambda_role_arn
    (only,) = [s for s in stack["FailureTopicPolicy"]["Properties"]["PolicyDocument"]["Statement"] if s["Sid"] == "OnlyTheNotifyFunctionPublishes"]
    assert only["Effect"] == "Deny" and only["Condition"] == {"ArnNotEquals": {"aws:PrincipalArn": notify_role}}
    publishers = {logical for logical, name, document in policies(stack) if name != "trust" for st in statements(document)
                  if st["Effect"] == "Allow" and "sns:Publish" in as_list(st["Action"])}
    assert publishers == {"NotifyFunctionRole"}
    permission = {(a, r) for s in role_statements(stack, "CodeBuildRole") if s["Effect"] == "Allow"
                  for a in as_list(s["Action"]) if "Permission" in a or a == "lambda:GetPolicy" for r in as_list(s["Resource"])}
    alias = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{project}-notify-failure:live"
    assert permission == {(f"lambda:{verb}", alias) for verb in ("GetPolicy", "AddPermission", "RemovePermission")}


def test_the_notify_role_allows_every_call_its_handler_makes_and_no_more(stack):
    """Each boto3 call of lambda/notify_failure.py, on the resources it names for either pipeline, is allowed."""
    project = stack["ModelPackageGroup"]["Properties"]["ModelPackageGroupName"].removesuffix("-models")
    source = (ROOT / "lambda" / "notify_failure.py").read_text()
    calls = {(variable, method) for variable, method in re.findall(r"\b(sagemaker|sns)\.([a-z_]+)\(", source)}
    prefix = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}"
    resources = {
        "ListPipelineExecutionSteps": [f"{prefix}:pipeline/{project}-{p}/execution/x7k2m9q4p1ab" for p in ("pipeline", "deploy")],
        "DescribePipelineExecution": [f"{prefix}:pipeline/{project}-{p}/execution/x7k2m9q4p1ab" for p in ("pipeline", "deploy")],
        "DescribeTrainingJob": [f"{prefix}:training-job/pipelines-x7k2m9q4p1ab-trainmultiinstance-qz3fr8wlpk"],
        "DescribeProcessingJob": [f"{prefix}:processing-job/pipelines-x7k2m9q4p1ab-preparedata-a1b2c3"],
        "DescribeHyperParameterTuningJob": [f"{prefix}:hyper-parameter-tuning-job/x7k2m9q4p1ab-tunehyp-a1b2c3d4"],
        "ListTrainingJobsForHyperParameterTuningJob": [f"{prefix}:hyper-parameter-tuning-job/x7k2m9q4p1ab-tunehyp-a1b2c3d4"],
        "Publish": [f"arn:aws:sns:{REGION}:{ACCOUNT}:{project}-pipeline-failures"],
    }
    granted = role_statements(stack, "NotifyFunctionRole")
    required = {(service, api_names(service)[method]) for service, method in calls}
    assert {api for _, api in required} == set(resources)
    missing = [f"{service}:{api} on {resource}" for service, api in sorted(required) for resource in resources[api]
               if not allowed(granted, f"{service}:{api}", resource)]
    assert missing == []
    actions = {a for s in granted if s["Effect"] == "Allow" for a in as_list(s["Action"])}
    kms = {"kms:GenerateDataKey", "kms:Decrypt"} if stack["FailureTopic"]["Properties"]["KmsMasterKeyId"] != "alias/aws/sns" else set()
    assert actions == {f"{service}:{api}" for service, api in required} | {"logs:CreateLogStream", "logs:PutLogEvents"} | kms
    assert not allowed(granted, "sns:Publish", f"arn:aws:sns:{REGION}:{ACCOUNT}:another-topic")
    assert not allowed(granted, "sagemaker:ListPipelineExecutionSteps", f"{prefix}:pipeline/another-pipeline/execution/x7k2m9q4p1ab")

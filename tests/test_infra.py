"""infra/template.yaml: cfn-lint, parliament on every policy, and the least-privilege rules walked in code.

Policies are linted as they would be deployed: the template is resolved
(parameters, pseudo parameters, Ref, GetAtt, Sub, If) for a sample account,
once with and once without a KMS key, and each resulting JSON policy goes to
parliament.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import json
import re
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "infra" / "template.yaml"
ACCOUNT, REGION, PARTITION = "111122223333", "eu-west-1", "aws"
KMS_KEY = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
NO_VALUE = object()


# --- loading and resolving the template --------------------------------------

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
            "AWS::SageMaker::ModelPackageGroup": "ModelPackageGroupName", "AWS::Lambda::Function": "FunctionName",
            "AWS::CloudWatch::Alarm": "AlarmName",
        }
        if kind in names:
            return properties[names[kind]]
        if kind == "AWS::Lambda::Alias":
            return f"{self.function_arn(properties['FunctionName'])}:{properties['Name']}"
        return f"{logical}-physical-id"

    def function_arn(self, name: str) -> str:
        return f"arn:{PARTITION}:lambda:{REGION}:{ACCOUNT}:function:{name}"

    def get_att(self, logical: str, attribute: str) -> str:
        resource = self.template["Resources"][logical]
        name = self.ref(logical)
        arns = {
            "AWS::S3::Bucket": f"arn:{PARTITION}:s3:::{name}",
            "AWS::IAM::Role": f"arn:{PARTITION}:iam::{ACCOUNT}:role/{name}",
            "AWS::Logs::LogGroup": f"arn:{PARTITION}:logs:{REGION}:{ACCOUNT}:log-group:{name}",
            "AWS::CloudWatch::Alarm": f"arn:{PARTITION}:cloudwatch:{REGION}:{ACCOUNT}:alarm:{name}",
            "AWS::Lambda::Function": self.function_arn(name),
        }
        if attribute == "Arn":
            return arns[resource["Type"]]
        if attribute == "Version":
            return "1"
        return f"{logical}.{attribute}"

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
        if isinstance(node, list):
            return [item for item in (self.value(item) for item in node) if item is not NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            (key, argument), = node.items()
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
        return {key: item for key, item in ((k, self.value(v)) for k, v in node.items()) if item is not NO_VALUE}

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
    "kms-and-functions": {"KmsKeyArn": KMS_KEY, "LambdaCodeKey": "dogbreed/assets/lambda/0123456789abcdef/lambda.zip"},
    "public-url": {"LambdaCodeKey": "dogbreed/assets/lambda/0123456789abcdef/lambda.zip", "InvokeUrlAuthType": "NONE", "InvokeProvisionedConcurrency": "0"},
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
        "each PassRole names one role and only for sagemaker.amazonaws.com (asserted in test_roles_pass_only_the_role_their_service_needs)",
    ("PERMISSIONS_MANAGEMENT_ACTIONS", "kms:creategrant"):
        "SageMaker encrypts job volumes and endpoint storage with the project key through a grant; limited to that key and to AWS resources",
    ("PERMISSIONS_MANAGEMENT_ACTIONS", "iam:createservicelinkedrole"):
        "Application Auto Scaling needs its SageMaker service-linked role once; limited to that role's ARN and service name",
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
    assert as_list(by_action["sagemaker:InvokeEndpoint"]["Resource"]) == [f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/dogbreed-single-instance"]
    assert as_list(by_action["logs:PutLogEvents"]["Resource"]) == [f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/aws/lambda/dogbreed-invoke-endpoint:*"]


def test_roles_pass_only_the_role_their_service_needs(stack):
    passes = {}
    for logical, name, document in policies(stack):
        for statement in statements(document):
            if "iam:PassRole" in as_list(statement["Action"]):
                assert as_list(statement["Action"]) == ["iam:PassRole"], logical
                assert statement["Condition"] == {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}, logical
                passes[logical] = as_list(statement["Resource"])
    role = f"arn:aws:iam::{ACCOUNT}:role/dogbreed"
    assert passes == {
        "DeployFunctionRole": [f"{role}-sagemaker-model"],
        "PipelineRole": [f"{role}-sagemaker-jobs"],
        "CodeBuildRole": [f"{role}-pipeline"],
    }


def test_the_endpoint_roles_reach_only_the_two_project_endpoints(stack):
    endpoints = {f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/dogbreed-{slug}" for slug in ("single-instance", "multi-instance")}
    for role in ("DeployFunctionRole", "CheckFunctionRole"):
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


def test_scaling_and_concurrency_parameters_default_as_documented(template):
    parameters = template["Parameters"]
    assert (parameters["InvokeProvisionedConcurrency"]["Default"], parameters["EndpointMinCapacity"]["Default"], parameters["EndpointMaxCapacity"]["Default"]) == (5, 1, 5)
    stack = Resolver(template, PARAMETER_SETS["kms-and-functions"]).resources()
    alias = stack["InvokeFunctionAlias"]["Properties"]
    assert alias["Name"] == "live" and alias["ProvisionedConcurrencyConfig"] == {"ProvisionedConcurrentExecutions": "5"}
    assert stack["CheckFunction"]["Properties"]["Environment"]["Variables"] == {"MIN_CAPACITY": "1", "MAX_CAPACITY": "5"}
    without = Resolver(template, PARAMETER_SETS["public-url"]).resources()
    assert "ProvisionedConcurrencyConfig" not in without["InvokeFunctionAlias"]["Properties"]


def test_no_functions_without_code_and_a_public_url_only_when_asked(template):
    bare = Resolver(template).resources()
    assert not any(r["Type"].startswith("AWS::Lambda::") for r in bare.values())
    private = Resolver(template, PARAMETER_SETS["kms-and-functions"]).resources()
    assert private["InvokeFunctionUrl"]["Properties"]["AuthType"] == "AWS_IAM"
    assert not any(r["Type"] == "AWS::Lambda::Permission" for r in private.values())
    public = Resolver(template, PARAMETER_SETS["public-url"]).resources()
    permissions = [r["Properties"] for r in public.values() if r["Type"] == "AWS::Lambda::Permission"]
    assert {p["Action"] for p in permissions} == {"lambda:InvokeFunctionUrl", "lambda:InvokeFunction"}
    assert all(p["FunctionName"].endswith("function:dogbreed-invoke-endpoint:live") for p in permissions)


def test_the_invoke_function_sends_no_wildcard_cors_by_default(template):
    stack = Resolver(template, PARAMETER_SETS["kms-and-functions"]).resources()
    variables = stack["InvokeFunction"]["Properties"]["Environment"]["Variables"]
    assert variables["ALLOWED_ORIGIN"] == "" and variables["ENDPOINT_NAME"] == "dogbreed-single-instance"
    assert (variables["TOP_K"], variables["URL_TIMEOUT_SECONDS"]) == ("5", "5")


def test_each_function_runs_a_handler_that_exists_in_lambda(template):
    stack = Resolver(template, PARAMETER_SETS["kms-and-functions"]).resources()
    functions = [r["Properties"] for r in stack.values() if r["Type"] == "AWS::Lambda::Function"]
    assert len(functions) == 3
    for function in functions:
        module, _, name = function["Handler"].partition(".")
        source = (ROOT / "lambda" / f"{module}.py").read_text()
        assert re.search(rf"^def {name}\(event", source, re.M), function["Handler"]
        assert function["Code"]["S3Key"] == PARAMETER_SETS["kms-and-functions"]["LambdaCodeKey"]


def test_rollback_alarms_are_the_ones_the_deploy_function_names(template):
    stack = Resolver(template, PARAMETER_SETS["kms-and-functions"]).resources()
    pattern = stack["DeployFunction"]["Properties"]["Environment"]["Variables"]["ROLLBACK_ALARM_NAME_PATTERN"]
    alarms = {r["Properties"]["AlarmName"]: r["Properties"] for r in stack.values() if r["Type"] == "AWS::CloudWatch::Alarm"}
    for slug in ("single-instance", "multi-instance"):
        endpoint = f"dogbreed-{slug}"
        alarm = alarms[pattern.format(endpoint_name=endpoint)]
        assert {d["Name"]: d["Value"] for d in alarm["Dimensions"]} == {"EndpointName": endpoint, "VariantName": "AllTraffic"}


def test_names_match_the_pipeline_settings(template):
    """The pipeline builds ARNs from its settings; the stack must create exactly those."""
    from pipeline.settings import LAMBDA_ALIAS, LAMBDA_FUNCTIONS, Settings

    settings = Settings(region=REGION, account=ACCOUNT, source_dir=ROOT)
    stack = Resolver(template, PARAMETER_SETS["kms-and-functions"]).resources()
    roles = {r["Properties"]["RoleName"] for r in stack.values() if r["Type"] == "AWS::IAM::Role"}
    for arn in (settings.pipeline_role_arn, settings.job_role_arn, settings.model_role_arn):
        assert arn.rsplit("/", 1)[1] in roles
    assert stack["ArtifactBucket"]["Properties"]["BucketName"] == settings.bucket
    assert stack["ModelPackageGroup"]["Properties"]["ModelPackageGroupName"] == settings.model_package_group
    assert template["Parameters"]["ArtifactPrefix"]["Default"] == settings.prefix
    functions = {r["Properties"]["FunctionName"] for r in stack.values() if r["Type"] == "AWS::Lambda::Function"}
    assert functions == {settings.lambda_function_name(name) for name in LAMBDA_FUNCTIONS}
    aliases = {r["Properties"]["Name"] for r in stack.values() if r["Type"] == "AWS::Lambda::Alias"}
    assert aliases == {LAMBDA_ALIAS}
    invoked = {r for s in role_statements(stack, "PipelineRole") if s.get("Sid") == "CallDeployAndCheck" for r in s["Resource"]}
    assert invoked == {settings.lambda_arn("deploy-endpoint"), settings.lambda_arn("check-endpoint")}

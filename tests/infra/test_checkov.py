"""checkov on infra/template.yaml: as written, and on copies with its conditions resolved (without and with a KMS
key, and with a repository connection).

checkov evaluates a condition's ``!If`` only partly: on the raw template it
silently skips its IAM checks for a role whose statements use one. So besides
the template itself it scans three copies in which every Condition is decided
(no KMS key; a KMS key; a repository connection for the build) and every ``!If``
replaced by its branch; Ref, Sub and GetAtt stay for checkov to follow. All four
go to one checkov run with
``--skip-download`` (no platform call) and no update check, behind a proxy
setting that points at a closed loopback port, so nothing leaves the machine.

checkov lives in its own virtual environment (``.venv/tools-checkov``, made by
``make test``): its dependencies clash with the SageMaker SDK's. Every finding
the template keeps is listed in ACCEPTED with its reason; a new finding, or an
accepted one that no longer occurs, fails the test.
"""
from __future__ import annotations

import fnmatch
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from test_infra import KMS_KEY, NO_VALUE, PARAMETER_SETS, ROOT, TEMPLATE, UNRESOLVED, Resolver, load_template, resolve_node

pytestmark = pytest.mark.slow

CHECKOV = ROOT / ".venv" / "tools-checkov" / "bin" / "checkov"

# (check id, resource (a glob), variant or "*") -> why the template keeps this finding. The only place a finding is accepted.
ACCEPTED: dict[tuple[str, str, str], str] = {
    ("CKV_AWS_18", "AWS::S3::Bucket.AccessLogBucket", "*"):
        "the access-log bucket is the artifact bucket's log target; logging it to itself would loop, and a second log "
        "bucket would only move the finding",
    ("CKV_AWS_27", "AWS::SQS::Queue.EndpointWaitQueue", "*"):
        "encrypted at rest with SQS-managed keys (SqsManagedSseEnabled, pinned by a test below); CKV_AWS_27 recognises "
        "only KmsMasterKeyId",
    ("CKV_AWS_27", "AWS::SQS::Queue.EndpointWaitDeadLetterQueue", "*"):
        "as EndpointWaitQueue: SQS-managed encryption at rest",
    ("CKV_AWS_27", "AWS::SQS::Queue.DeployOnApprovalDeadLetterQueue", "*"):
        "as EndpointWaitQueue: SQS-managed encryption at rest",
    ("CKV_AWS_158", "AWS::Logs::LogGroup.*", "without-kms-key"):
        "with no KmsKeyArn the stack has no customer managed key; CloudWatch Logs encrypts with its own key, and a "
        "customer key is the KmsKeyArn parameter's choice (every log group takes it when given, pinned by a test below)",
    ("CKV_AWS_158", "AWS::Logs::LogGroup.*", "with-connection"):
        "as without-kms-key: the build from a repository connection, without a KmsKeyArn",
}


# --- deciding the conditions ---------------------------------------------------

def without_conditions(template: dict, parameters: dict[str, str]) -> dict:
    """A copy of ``template`` with its conditions decided: branches chosen, NoValue and false resources dropped."""
    conditions = Resolver(template, parameters)
    decided = {name: conditions.condition(name) for name in template.get("Conditions", {})}

    def choose(node: Any) -> Any:
        return resolve_node(node, decide)

    def decide(key: str, argument: Any) -> Any:
        if key == "Fn::If":
            name, when_true, when_false = argument
            return choose(when_true if decided[name] else when_false)
        if key == "Ref" and argument == "AWS::NoValue":
            return NO_VALUE
        return UNRESOLVED

    resolved = {key: value for key, value in template.items() if key != "Conditions"}
    for section in ("Resources", "Outputs"):
        kept = {}
        for name, body in template.get(section, {}).items():
            if "Condition" in body and not decided[body["Condition"]]:
                continue
            kept[name] = choose({key: value for key, value in body.items() if key != "Condition"})
        resolved[section] = kept
    resolved["Parameters"] = json.loads(json.dumps(template.get("Parameters", {})))
    for name, value in parameters.items():
        resolved["Parameters"][name]["Default"] = value
    return resolved


VARIANTS = {"without-kms-key": {"KmsKeyArn": ""}, "with-kms-key": {"KmsKeyArn": KMS_KEY},
            "with-connection": {"KmsKeyArn": "", **PARAMETER_SETS["connection"]}}


def test_the_resolver_decides_every_condition_and_leaves_no_if():
    template = load_template()
    for variant, parameters in VARIANTS.items():
        resolved = without_conditions(template, parameters)
        text = json.dumps(resolved)
        assert "Fn::If" not in text and "AWS::NoValue" not in text and "Conditions" not in resolved, variant
        assert not any("Condition" in body for section in ("Resources", "Outputs") for body in resolved[section].values()), variant
    with_key = without_conditions(template, VARIANTS["with-kms-key"])
    without_key = without_conditions(template, VARIANTS["without-kms-key"])
    assert with_key["Resources"]["InvokeFunctionLogs"]["Properties"]["KmsKeyId"] == {"Ref": "KmsKeyArn"}
    assert "KmsKeyId" not in without_key["Resources"]["InvokeFunctionLogs"]["Properties"]
    assert "KmsKeyPolicyStatementForLogs" in with_key["Outputs"] and "KmsKeyPolicyStatementForLogs" not in without_key["Outputs"]
    sids = [statement.get("Sid") for statement in with_key["Resources"]["PipelineRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]]
    assert "UseProjectKey" in sids
    assert "UseProjectKey" not in json.dumps(without_key["Resources"]["PipelineRole"])


# --- running checkov -----------------------------------------------------------

def checkov_environment() -> dict[str, str]:
    """No update check, no platform mapping, and any stray HTTP(S) request sent to a closed loopback port."""
    environment = {name: value for name, value in os.environ.items() if not name.upper().startswith(("BC_", "PRISMA_", "CKV_"))}
    environment.update({
        "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "BC_SKIP_MAPPING": "TRUE",
        "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": "",
    })
    return environment


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, dict]:
    """variant -> {"summary", "failed": {(check, resource)}, "checked": {resource: {check ids}}} of one checkov run."""
    if not CHECKOV.exists():
        pytest.fail(f"checkov is not installed at {CHECKOV.relative_to(ROOT)}: run `make test` (it installs the pinned "
                    "checkov into its own virtual environment there) and run the tests again")
    folder = tmp_path_factory.mktemp("checkov")
    template = load_template()
    files = {"raw": TEMPLATE}
    for variant, parameters in VARIANTS.items():
        files[variant] = folder / f"template-{variant}.json"
        files[variant].write_text(json.dumps(without_conditions(template, parameters), indent=1))
    command = [str(CHECKOV), "--skip-download", "--framework", "cloudformation", "--compact", "--output", "json"]
    for path in files.values():
        command += ["--file", str(path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=checkov_environment(), cwd=folder)
    assert finished.returncode in (0, 1), f"checkov failed to run ({finished.returncode}):\n{finished.stderr[-3000:]}"
    report = json.loads(finished.stdout)
    reports = report if isinstance(report, list) else [report]
    by_path = {str(Path(path).resolve()): variant for variant, path in files.items()}
    results: dict[str, dict] = {variant: {"failed": set(), "checked": {}} for variant in files}
    for part in reports:
        assert part["summary"]["parsing_errors"] == 0, part["summary"]
        for outcome in ("passed_checks", "failed_checks"):
            for check in part["results"].get(outcome, []):
                variant = by_path[str(Path(check["file_abs_path"]).resolve())]
                results[variant]["checked"].setdefault(check["resource"], set()).add(check["check_id"])
                if outcome == "failed_checks":
                    results[variant]["failed"].add((check["check_id"], check["resource"]))
    return results


def accepted(check_id: str, resource: str, variant: str) -> bool:
    return any(check == check_id and fnmatch.fnmatchcase(resource, pattern) and where in (variant, "*")
               for check, pattern, where in ACCEPTED)


@pytest.mark.parametrize("variant", ["raw", *VARIANTS])
def test_checkov_finds_nothing_that_is_not_accepted_with_a_reason(scans, variant):
    new = sorted(finding for finding in scans[variant]["failed"] if not accepted(*finding, variant))
    assert not new, f"checkov findings on the {variant} template without an entry in ACCEPTED: {new}"


def test_no_accepted_finding_is_stale(scans):
    """An accepted finding that checkov no longer reports is a stale reason: remove it."""
    for (check_id, resource, variant), reason in ACCEPTED.items():
        variants = [variant] if variant != "*" else ["raw", *VARIANTS]
        assert reason.strip()
        assert any(check == check_id and fnmatch.fnmatchcase(found, resource)
                   for name in variants for check, found in scans[name]["failed"]), (check_id, resource, variant)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_resolved_copies_get_checkovs_iam_checks_on_every_role(scans, variant):
    template = load_template()
    roles = [f"AWS::IAM::Role.{name}" for name, body in template["Resources"].items() if body["Type"] == "AWS::IAM::Role"]
    for role in roles:
        checks = scans[variant]["checked"].get(role, set())
        assert {"CKV_AWS_111", "CKV_AWS_109", "CKV_AWS_110"} <= checks, (role, sorted(checks))


def test_the_log_bucket_takes_access_logs_only_from_the_artifact_bucket():
    resources = load_template()["Resources"]
    logging = resources["ArtifactBucket"]["Properties"]["LoggingConfiguration"]
    assert logging["DestinationBucketName"] == {"Ref": "AccessLogBucket"}
    log_bucket = resources["AccessLogBucket"]["Properties"]
    assert log_bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"] == {"SSEAlgorithm": "AES256"}
    (allow, deny) = resources["AccessLogBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert allow["Principal"] == {"Service": "logging.s3.amazonaws.com"} and allow["Action"] == "s3:PutObject"
    assert allow["Condition"]["ArnLike"] == {"aws:SourceArn": {"Fn::GetAtt": ["ArtifactBucket", "Arn"]}}
    assert allow["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_the_key_policy_statement_lets_cloudwatch_logs_use_the_key_for_the_project_log_groups_only():
    template = load_template()
    resolver = Resolver(template, {"KmsKeyArn": KMS_KEY})
    statement = json.loads(resolver.value(template["Outputs"]["KmsKeyPolicyStatementForLogs"]["Value"]))
    assert statement["Principal"] == {"Service": f"logs.{resolver.pseudo['AWS::Region']}.amazonaws.com"}
    assert set(statement["Action"]) == {"kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"}
    patterns = statement["Condition"]["ArnLike"]["kms:EncryptionContext:aws:logs:arn"]
    names = [resolver.value(body["Properties"]["LogGroupName"]) for body in template["Resources"].values() if body["Type"] == "AWS::Logs::LogGroup"]
    arn_prefix = f"arn:aws:logs:{resolver.pseudo['AWS::Region']}:{resolver.pseudo['AWS::AccountId']}:log-group:"
    assert names and all(any(fnmatch.fnmatchcase(arn_prefix + name, pattern) for pattern in patterns) for name in names)
    assert not any(fnmatch.fnmatchcase(f"{arn_prefix}/aws/lambda/other-function", pattern) for pattern in patterns)
    for body in template["Resources"].values():
        if body["Type"] == "AWS::Logs::LogGroup":
            assert body["Properties"]["KmsKeyId"] == {"Fn::If": ["HasKmsKey", {"Ref": "KmsKeyArn"}, {"Ref": "AWS::NoValue"}]}


def test_the_queues_accepted_for_ckv_aws_27_are_encrypted_at_rest():
    resources = load_template()["Resources"]
    queues = {pattern.split(".", 1)[1] for check, pattern, _ in ACCEPTED if check == "CKV_AWS_27"}
    for name in queues:
        properties = resources[name]["Properties"]
        assert properties.get("SqsManagedSseEnabled") is True or "KmsMasterKeyId" in properties, name

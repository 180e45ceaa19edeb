"""``dogbreed upsert``, ``start`` and ``diff`` against moto's server on 127.0.0.1.

The server is a real HTTP endpoint started for this module; the command line
runs in-process with ``--endpoint-url`` and fake credentials. moto lacks Lambda's
provisioned-concurrency operations, so the server answers those three from
``moto_provisioned_concurrency`` (see there what it models). Every command
works on a copy of the source tree so that edits elsewhere in the checkout
cannot change what is published between two runs.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import re
import shutil
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest

from sources import ROOT
from pipeline.assets import zipball
from pipeline.cli import main
from pipeline.dag import steps_of
from pipeline.settings import LAMBDA_FUNCTIONS

moto_server = pytest.importorskip("moto.server")
from moto_provisioned_concurrency import ProvisionedConcurrency, Server  # noqa: E402  (needs moto)

pytestmark = pytest.mark.slow

REGION = "us-east-1"
PROJECT = "dogbreed"
LAMBDA_TRUST = json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}],
})
UPSERT = ("--tag", "team=vision", "--max-parallel-steps", "3")  # what every upsert here passes unless it tests a change
INVOKE = f"{PROJECT}-invoke-endpoint"
NOTIFY = f"{PROJECT}-notify-failure"
# the two assets, the functions, the wait queue's mapping, the provisioned concurrency, the failure rule's permission,
# the two pipelines
RESOURCES = 2 + len(LAMBDA_FUNCTIONS) + 5
EXECUTION_ARN = re.compile(r"^arn:aws:sagemaker:us-east-1:[0-9]{12}:pipeline/dogbreed-pipeline/execution/[a-z0-9]+$")


@pytest.fixture(scope="module")
def server(aws_environment):
    server = Server(0)  # a free port of 127.0.0.1
    server.start()
    try:
        yield server
    finally:
        server.reset()
        server.stop()


@pytest.fixture(scope="module")
def endpoint(server) -> str:
    return server.url


@pytest.fixture(scope="module")
def provisioned(server) -> ProvisionedConcurrency:
    return server.app


@pytest.fixture(scope="module")
def aws(endpoint):
    def client(service: str):
        return boto3.client(service, region_name=REGION, endpoint_url=endpoint)
    return client


@pytest.fixture(scope="module")
def account(aws) -> str:
    return aws("sts").get_caller_identity()["Account"]


@pytest.fixture(scope="module")
def bucket(aws, account) -> str:
    name = f"{PROJECT}-artifacts-{account}-{REGION}"
    aws("s3").create_bucket(Bucket=name)
    aws("sqs").create_queue(QueueName=f"{PROJECT}-endpoint-wait")
    for function in LAMBDA_FUNCTIONS:
        aws("iam").create_role(RoleName=f"{PROJECT}-{function}", AssumeRolePolicyDocument=LAMBDA_TRUST)
    return name


def copy_sources(target: Path) -> Path:
    for folder in ("code", "lambda"):
        shutil.copytree(ROOT / folder, target / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    return copy_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def deployed_tree(sources) -> dict[str, Path]:
    """The source tree the account was last upserted from; tests that publish a change move it on."""
    return {"path": sources}


def edited_copy(sources: Path, target: Path, relative: str, line: str) -> Path:
    shutil.copytree(sources, target)
    path = target / relative
    path.write_text(path.read_text() + line)
    return target


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli(endpoint: str, source_dir: Path, command: str, *extra: str) -> list[str]:
    return [command, "--endpoint-url", endpoint, "--source-dir", str(source_dir), *extra]


def object_keys(aws, bucket: str) -> set[str]:
    listing = aws("s3").list_objects_v2(Bucket=bucket, Prefix=f"{PROJECT}/assets/")
    return {item["Key"] for item in listing.get("Contents", [])}


def deployed_definition(aws) -> dict:
    return json.loads(aws("sagemaker").describe_pipeline(PipelineName=f"{PROJECT}-pipeline")["PipelineDefinition"])


@pytest.fixture(scope="module")
def first_upsert(endpoint, bucket, sources) -> tuple[int, str]:
    """The first upsert into the empty account: its exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(cli(endpoint, sources, "upsert", *UPSERT))
    return code, out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def manifest(endpoint, sources, tmp_path_factory, first_upsert) -> tuple[dict, dict]:
    """The definition and asset manifest that ``dogbreed synth`` writes for the same settings."""
    out = tmp_path_factory.mktemp("synth") / "pipeline.json"
    assert main(["synth", "--out", str(out), "--source-dir", str(sources), "--account",
                 boto3.client("sts", region_name=REGION, endpoint_url=endpoint).get_caller_identity()["Account"]]) == 0
    return json.loads(out.read_text()), json.loads((out.parent / "assets.json").read_text())


def test_upsert_publishes_assets_functions_and_pipeline(first_upsert, manifest, aws, bucket):
    code, out = first_upsert
    assert code == 0, out
    _, assets = manifest
    keys = {entry["s3_uri"].split("/", 3)[3] for entry in assets["assets"]}
    assert object_keys(aws, bucket) == keys
    for entry in assets["assets"]:
        body = aws("s3").get_object(Bucket=bucket, Key=entry["s3_uri"].split("/", 3)[3])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]
    lambda_zip = next(entry for entry in assets["assets"] if entry["name"] == "lambda")
    expected_sha = base64.b64encode(bytes.fromhex(lambda_zip["sha256"])).decode()
    for function in LAMBDA_FUNCTIONS:
        name = f"{PROJECT}-{function}"
        alias = aws("lambda").get_alias(FunctionName=name, Name="live")
        live = aws("lambda").get_function_configuration(FunctionName=name, Qualifier="live")
        assert alias["FunctionVersion"] == "1"
        assert live["CodeSha256"] == expected_sha
        assert live["Handler"] == f"{function.replace('-', '_')}.handler"
        assert live["Runtime"] == "python3.12"
        assert live["Role"].endswith(f":role/{name}")
    assert aws("lambda").get_function_configuration(FunctionName=f"{PROJECT}-check-endpoint")["Timeout"] == 600
    invoke_env = aws("lambda").get_function_configuration(FunctionName=f"{PROJECT}-invoke-endpoint")["Environment"]
    assert invoke_env["Variables"] == {"ENDPOINT_NAME": f"{PROJECT}-single-instance", "ALLOWED_ORIGIN": ""}
    pipeline = aws("sagemaker").describe_pipeline(PipelineName=f"{PROJECT}-pipeline")
    assert pipeline["ParallelismConfiguration"] == {"MaxParallelExecutionSteps": 3}
    assert pipeline["RoleArn"].endswith(f":role/{PROJECT}-pipeline")
    tags = aws("sagemaker").list_tags(ResourceArn=pipeline["PipelineArn"])["Tags"]
    assert {"Key": "team", "Value": "vision"} in tags
    steps = len(steps_of(json.loads(pipeline["PipelineDefinition"])))
    assert f"pipeline dogbreed-pipeline: created ({steps} steps)" in out
    assert f"provisioned concurrency {INVOKE}:live: set to 5 (was none), IN_PROGRESS" in out
    assert f"{RESOURCES} of {RESOURCES} resources changed" in out
    assert provisioned_count(aws, INVOKE) == 5
    for function in ("deploy-endpoint", "check-endpoint"):
        assert provisioned_count(aws, f"{PROJECT}-{function}") is None


def wait_queue_mappings(aws, account: str) -> list[dict]:
    queue = f"arn:aws:sqs:{REGION}:{account}:{PROJECT}-endpoint-wait"
    return aws("lambda").list_event_source_mappings(EventSourceArn=queue)["EventSourceMappings"]


def test_upsert_connects_the_wait_queue_to_the_wait_function_without_a_stack_update(first_upsert, aws, account):
    code, out = first_upsert
    assert code == 0, out
    (mapping,) = wait_queue_mappings(aws, account)
    assert mapping["FunctionArn"].startswith(f"arn:aws:lambda:{REGION}:{account}:function:{PROJECT}-wait-endpoint")
    assert mapping["BatchSize"] == 1 and mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["State"] == "Enabled"
    assert f"event source mapping {PROJECT}-endpoint-wait -> {PROJECT}-wait-endpoint:live: created ({mapping['UUID']})" in out


def test_upsert_enables_a_disabled_wait_queue_mapping_again(first_upsert, endpoint, deployed_tree, aws, account, capsys):
    (mapping,) = wait_queue_mappings(aws, account)
    aws("lambda").update_event_source_mapping(UUID=mapping["UUID"], Enabled=False, BatchSize=10)
    out = upsert_out(capsys, endpoint, deployed_tree["path"])
    assert f"event source mapping {PROJECT}-endpoint-wait -> {PROJECT}-wait-endpoint:live: updated (BatchSize, Enabled)" in out
    assert out.splitlines()[-1] == f"1 of {RESOURCES} resources changed"
    (after,) = wait_queue_mappings(aws, account)
    assert after["UUID"] == mapping["UUID"] and after["State"] == "Enabled" and after["BatchSize"] == 1


def provisioned_count(aws, function: str) -> int | None:
    """The requested provisioned concurrency of the function's live alias, None when it has none."""
    try:
        config = aws("lambda").get_provisioned_concurrency_config(FunctionName=function, Qualifier="live")
    except aws("lambda").exceptions.ProvisionedConcurrencyConfigNotFoundException:
        return None
    return config["RequestedProvisionedConcurrentExecutions"]


def rule_statement(aws) -> dict:
    """The notify function's live-alias policy statement that lets the failure rule invoke it."""
    policy = json.loads(aws("lambda").get_policy(FunctionName=NOTIFY, Qualifier="live")["Policy"])
    (statement,) = [s for s in policy["Statement"] if s["Sid"] == "failed-executions-rule"]
    return statement


def test_upsert_lets_only_the_failure_rule_invoke_the_notify_function(first_upsert, account, aws):
    code, out = first_upsert
    assert code == 0, out
    rule = f"arn:aws:events:{REGION}:{account}:rule/{PROJECT}-pipeline-failed"
    statement = rule_statement(aws)
    assert statement["Principal"] == {"Service": "events.amazonaws.com"} and statement["Action"] == "lambda:InvokeFunction"
    assert statement["Condition"]["ArnLike"]["AWS:SourceArn"] == rule
    assert statement["Resource"].endswith(f":function:{NOTIFY}:live")
    assert f"permission {NOTIFY}:live: added, rule {PROJECT}-pipeline-failed may invoke it" in out
    environment = aws("lambda").get_function_configuration(FunctionName=NOTIFY)["Environment"]["Variables"]
    assert environment == {"TOPIC_ARN": f"arn:aws:sns:{REGION}:{account}:{PROJECT}-pipeline-failures"}


def test_a_permission_for_another_source_is_replaced(first_upsert, endpoint, deployed_tree, account, aws, capsys):
    aws("lambda").remove_permission(FunctionName=NOTIFY, Qualifier="live", StatementId="failed-executions-rule")
    aws("lambda").add_permission(FunctionName=NOTIFY, Qualifier="live", StatementId="failed-executions-rule",
                                 Action="lambda:InvokeFunction", Principal="events.amazonaws.com",
                                 SourceArn=f"arn:aws:events:{REGION}:{account}:rule/someone-elses-rule")
    out = upsert_out(capsys, endpoint, deployed_tree["path"])
    assert f"permission {NOTIFY}:live: replaced, rule {PROJECT}-pipeline-failed may invoke it" in out
    assert rule_statement(aws)["Condition"]["ArnLike"]["AWS:SourceArn"].endswith(f":rule/{PROJECT}-pipeline-failed")
    assert f"permission {NOTIFY}:live: unchanged" in upsert_out(capsys, endpoint, deployed_tree["path"])


def test_deployed_definition_equals_the_synthesized_one(first_upsert, manifest, aws):
    definition, _ = manifest
    assert deployed_definition(aws) == definition


def test_upsert_publishes_the_deploy_only_pipeline_synth_wrote(first_upsert, manifest, aws, tmp_path_factory):
    code, out = first_upsert
    deploy = aws("sagemaker").describe_pipeline(PipelineName=f"{PROJECT}-deploy")
    document = json.loads(deploy["PipelineDefinition"])
    assert f"pipeline {PROJECT}-deploy: created ({len(steps_of(document))} steps)" in out
    assert deploy["RoleArn"].endswith(f":role/{PROJECT}-pipeline")
    assert [parameter["Name"] for parameter in document["Parameters"]][:3] == ["ModelPackageArn", "Variant", "ClassCount"]
    assert set(steps_of(document)) == {"ChooseEndpoint", *(f"{verb}{variant}" for verb in ("Deploy", "WaitFor", "Check")
                                                           for variant in ("SingleInstance", "MultiInstance"))}


def test_second_upsert_changes_nothing_and_says_so(first_upsert, endpoint, sources, aws, bucket, capsys):
    before = aws("sagemaker").describe_pipeline(PipelineName=f"{PROJECT}-pipeline")["LastModifiedTime"]
    keys = object_keys(aws, bucket)
    code, out, err = run(capsys, *cli(endpoint, sources, "upsert", *UPSERT))
    assert code == 0, err
    assert out.count(": unchanged") == RESOURCES
    assert f"provisioned concurrency {INVOKE}:live: unchanged, 5 (READY)" in out
    assert out.splitlines()[-1].startswith("no changes:")
    assert object_keys(aws, bucket) == keys
    assert aws("sagemaker").describe_pipeline(PipelineName=f"{PROJECT}-pipeline")["LastModifiedTime"] == before
    for function in LAMBDA_FUNCTIONS:
        versions = aws("lambda").list_versions_by_function(FunctionName=f"{PROJECT}-{function}")["Versions"]
        assert sorted(v["Version"] for v in versions) == ["$LATEST", "1"]


def upsert_out(capsys, endpoint: str, source_dir: Path, *extra: str) -> str:
    code, out, err = run(capsys, *cli(endpoint, source_dir, "upsert", *UPSERT, *extra))
    assert code == 0, err
    return out


def test_provisioned_concurrency_follows_the_setting(first_upsert, endpoint, deployed_tree, aws, capsys, monkeypatch):
    tree = deployed_tree["path"]
    line = f"provisioned concurrency {INVOKE}:live: "

    out = upsert_out(capsys, endpoint, tree, "--invoke-provisioned-concurrency", "2")
    assert f"{line}set to 2 (was 5), IN_PROGRESS" in out and out.splitlines()[-1] == f"1 of {RESOURCES} resources changed"
    assert provisioned_count(aws, INVOKE) == 2

    monkeypatch.setenv("INVOKE_PROVISIONED_CONCURRENCY", "0")
    out = upsert_out(capsys, endpoint, tree)
    assert f"{line}removed (was 2)" in out and out.splitlines()[-1] == f"1 of {RESOURCES} resources changed"
    assert provisioned_count(aws, INVOKE) is None

    out = upsert_out(capsys, endpoint, tree)
    assert f"{line}unchanged, none" in out and out.splitlines()[-1].startswith("no changes:")

    monkeypatch.delenv("INVOKE_PROVISIONED_CONCURRENCY")
    out = upsert_out(capsys, endpoint, tree)
    assert f"{line}set to 5 (was none), IN_PROGRESS" in out
    assert provisioned_count(aws, INVOKE) == 5
    for function in LAMBDA_FUNCTIONS:  # no version was published for any of this
        assert aws("lambda").get_alias(FunctionName=f"{PROJECT}-{function}", Name="live")["FunctionVersion"] == "1"


def test_a_failed_allocation_is_requested_again(first_upsert, endpoint, deployed_tree, aws, provisioned, capsys):
    reason = "FUNCTION_ERROR_INIT_FAILURE: the function could not be initialized"
    provisioned.configurations[(INVOKE, "live")].update(Status="FAILED", StatusReason=reason)
    out = upsert_out(capsys, endpoint, deployed_tree["path"])
    assert f"provisioned concurrency {INVOKE}:live: set to 5 (the last request for 5 failed: {reason}), IN_PROGRESS" in out
    assert aws("lambda").get_provisioned_concurrency_config(FunctionName=INVOKE, Qualifier="live")["Status"] == "READY"


@pytest.mark.parametrize("flag, environ, message", [
    ("-1", None, "invoke_provisioned_concurrency=-1 is not a non-negative integer: the number of warm instances of the "
                 "invoke function, 0 for none (flag --invoke-provisioned-concurrency, env INVOKE_PROVISIONED_CONCURRENCY)"),
    ("2.5", None, "invoke_provisioned_concurrency='2.5' is not an integer (flag --invoke-provisioned-concurrency, "
                  "env INVOKE_PROVISIONED_CONCURRENCY)"),
    (None, "five", "invoke_provisioned_concurrency='five' is not an integer"),
])
def test_bad_provisioned_concurrency_is_refused_before_any_call(aws_environment, sources, capsys, monkeypatch, flag, environ, message):
    if environ is not None:
        monkeypatch.setenv("INVOKE_PROVISIONED_CONCURRENCY", environ)
    extra = () if flag is None else (f"--invoke-provisioned-concurrency={flag}",)
    code, out, err = run(capsys, *cli("http://127.0.0.1:9", sources, "upsert", "--account", "123456789012", *extra))
    assert (code, out) == (2, "")
    assert err.startswith(f"dogbreed upsert: {message}"), err


def test_a_request_beyond_the_service_limits_is_refused_before_any_call(aws_environment, sources, capsys):
    code, out, err = run(capsys, *cli("http://127.0.0.1:9", sources, "upsert", "--account", "123456789012",
                                      "--tag", "cost-center=a;b"))
    assert (code, out) == (2, "")
    assert err.startswith("dogbreed upsert: nothing was published; these requests would be refused:\n"
                          "  pipeline dogbreed-pipeline, CreatePipeline.Tags[0].Value: \"a;b\" does not match; "
                          "allowed: values matching "), err


def test_diff_reports_a_code_change_then_upsert_publishes_one_tarball(first_upsert, endpoint, deployed_tree, aws, bucket, tmp_path, capsys):
    changed = edited_copy(deployed_tree["path"], tmp_path / "changed", "code/preprocess.py", "\n# a change in code/\n")
    code, out, err = run(capsys, *cli(endpoint, changed, "diff"))
    assert code == 1, err
    assert "~ step PrepareData" in out
    assert re.search(r"^    \S+: \".*/assets/code/[0-9a-f]{16}/sourcedir\.tar\.gz\" -> \".*/assets/code/[0-9a-f]{16}/sourcedir\.tar\.gz\"$",
                     out, re.MULTILINE), out
    assert "- step" not in out and "+ step" not in out

    keys = object_keys(aws, bucket)
    code, out, err = run(capsys, *cli(endpoint, changed, "upsert", *UPSERT))
    assert code == 0, err
    new_keys = object_keys(aws, bucket) - keys
    assert len(new_keys) == 1 and next(iter(new_keys)).endswith("/sourcedir.tar.gz")
    assert "asset lambda: unchanged" in out
    assert out.count("function ") == len(LAMBDA_FUNCTIONS)
    assert len(re.findall(r": unchanged, alias live -> version \d+$", out, re.MULTILINE)) == len(LAMBDA_FUNCTIONS)
    assert re.search(r"^pipeline dogbreed-pipeline: definition updated: \d+ steps? changed \(.*PrepareData.*\)$", out, re.MULTILINE), out
    assert new_keys.pop().split("/")[-2] in json.dumps(deployed_definition(aws))
    deployed_tree["path"] = changed

    code, out, err = run(capsys, *cli(endpoint, changed, "diff"))
    assert (code, out.strip()) == (0, "no differences: the deployed definition of dogbreed-pipeline equals the local one")


def test_lambda_change_updates_code_and_moves_the_alias(first_upsert, endpoint, deployed_tree, aws, tmp_path, capsys):
    changed = edited_copy(deployed_tree["path"], tmp_path / "changed", "lambda/events.py", "\n# a change in lambda/\n")
    before = aws("lambda").get_alias(FunctionName=f"{PROJECT}-deploy-endpoint", Name="live")["FunctionVersion"]
    after = str(int(before) + 1)
    code, out, err = run(capsys, *cli(endpoint, changed, "upsert", *UPSERT, "--allowed-origin", "https://dogs.example.com"))
    assert code == 0, err
    deployed_tree["path"] = changed
    assert "asset code: unchanged" in out and "asset lambda: uploaded" in out
    assert f"function dogbreed-deploy-endpoint: code updated, alias live -> version {after}" in out
    assert (f"function dogbreed-invoke-endpoint: code updated, configuration updated (Environment), "
            f"alias live -> version {after}") in out
    assert "pipeline dogbreed-pipeline: unchanged" in out  # the definition calls the alias, not a version
    assert f"provisioned concurrency {INVOKE}:live: unchanged, 5 (READY)" in out  # it belongs to the alias, so it moved along
    live = aws("lambda").get_function_configuration(FunctionName=f"{PROJECT}-invoke-endpoint", Qualifier="live")
    assert live["Environment"]["Variables"]["ALLOWED_ORIGIN"] == "https://dogs.example.com"
    new_zip = hashlib.sha256(zipball(changed / "lambda")).digest()
    assert live["CodeSha256"] == base64.b64encode(new_zip).decode()
    first = aws("lambda").get_function_configuration(FunctionName=f"{PROJECT}-invoke-endpoint", Qualifier=before)
    assert first["CodeSha256"] != live["CodeSha256"]


def test_start_returns_an_execution_arn_with_the_parameters(first_upsert, endpoint, sources, aws, capsys):
    code, out, err = run(capsys, *cli(endpoint, sources, "start", "--param", "AccuracyThreshold=0.85",
                                      "--param", "Backbone=resnet18"))
    assert code == 0, err
    arn = out.strip()
    assert EXECUTION_ARN.match(arn), out
    parameters = aws("sagemaker").list_pipeline_parameters_for_execution(PipelineExecutionArn=arn)["PipelineParameters"]
    assert {(p["Name"], p["Value"]) for p in parameters} == {("AccuracyThreshold", "0.85"), ("Backbone", "resnet18")}


@pytest.mark.parametrize("params, note", [
    ([], ""),
    (["PretrainedWeights=none"], "note: PretrainedWeights=none makes each tuning trial train the whole network, on "
     "TuningInstanceType=ml.m5.large, while the final trainings run on TrainingInstanceType=ml.m5.2xlarge; add --param "
     "TuningInstanceType=ml.m5.2xlarge to give the trials what the trainings get\n"),
    (["PretrainedWeights=none", "TuningInstanceType=ml.m5.2xlarge"], ""),
    (["PretrainedWeights=none", "TrainingInstanceType=ml.m5.large"], ""),
])
def test_start_says_when_whole_network_trials_run_on_another_instance_type(first_upsert, endpoint, sources, capsys,
                                                                           params, note):
    code, out, err = run(capsys, *cli(endpoint, sources, "start", *(item for pair in params for item in ("--param", pair))))
    assert code == 0 and EXECUTION_ARN.match(out.strip()), err
    assert err == note


@pytest.mark.parametrize("param, message", [
    ("Nope=1", "--param Nope: the pipeline has no such parameter; it has "),
    ("AccuracyThreshold=high", "--param AccuracyThreshold='high' is not a float"),
    ("Backbone=vgg16", "--param Backbone='vgg16' is not one of resnet18, resnet34, resnet50"),
    ("Backbone", "--param 'Backbone' is not Name=Value"),
    ("ImageSize=0", "--param ImageSize=0: ImageSize must be 32 to 1024, since train.py refuses a side under 32 pixels"),
    ("EndpointMinCapacity=9", "--param EndpointMinCapacity=9: EndpointMinCapacity (9) must not exceed EndpointMaxCapacity (5)"),
])
def test_start_checks_parameters_against_the_deployed_pipeline(first_upsert, endpoint, sources, capsys, param, message):
    code, out, err = run(capsys, *cli(endpoint, sources, "start", "--param", param))
    assert code == 2 and out == ""
    assert err.startswith(f"dogbreed start: {message}"), err


def test_missing_bucket_is_named(first_upsert, endpoint, sources, capsys):
    code, out, err = run(capsys, *cli(endpoint, sources, "upsert", "--bucket", "no-such-bucket-for-dogs"))
    assert code == 2 and out == ""
    assert re.fullmatch(
        r"dogbreed upsert: bucket no-such-bucket-for-dogs does not exist \(while uploading "
        r"s3://no-such-bucket-for-dogs/dogbreed/assets/code/[0-9a-f]{16}/sourcedir\.tar\.gz\): "
        r"create it \(infra/template\.yaml\) or set --bucket / ARTIFACT_BUCKET\n", err), err


def test_missing_lambda_role_is_named(first_upsert, endpoint, sources, account, capsys):
    role = f"arn:aws:iam::{account}:role/no-such-role"
    code, out, err = run(capsys, *cli(endpoint, sources, "upsert", "--project-name", "otherdogs",
                                      "--bucket", f"{PROJECT}-artifacts-{account}-{REGION}",
                                      "--deploy-lambda-role-arn", role))
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith(f"dogbreed upsert: role {role} cannot be used (while publishing Lambda function otherdogs-deploy-endpoint)")


def set_auth_free_requests(endpoint: str, count: str) -> None:
    """Moto's IAM-like access control: after ``count`` more requests it checks signatures and policies."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture
def describe_only_user(aws, monkeypatch):
    """Credentials of an IAM user allowed sagemaker:DescribePipeline and nothing else, with IAM enforced."""
    iam = aws("iam")
    user = f"reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="describe-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["sagemaker:DescribePipeline"], "Resource": "*"}],
    }))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    endpoint = aws("s3").meta.endpoint_url
    set_auth_free_requests(endpoint, "0")
    try:
        yield
    finally:
        set_auth_free_requests(endpoint, "inf")


def test_access_denied_names_the_action(first_upsert, endpoint, sources, describe_only_user, capsys):
    code, out, err = run(capsys, *cli(endpoint, sources, "start"))
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "dogbreed start: access denied to sagemaker:StartPipelineExecution while starting pipeline "
        "dogbreed-pipeline: grant it to the caller's role or policy"
    ]


# ---------------------------------------------------------------- following an execution

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def step(name: str, status: str, start: float | None, end: float | None = None, reason: str | None = None) -> dict:
    """One entry of ListPipelineExecutionSteps, as boto3 returns it."""
    summary = {"StepName": name, "StepDisplayName": name, "StepStatus": status, "AttemptCount": 1, "Metadata": {}}
    if start is not None:
        summary["StartTime"] = T0 + timedelta(seconds=start)
    if end is not None:
        summary["EndTime"] = T0 + timedelta(seconds=end)
    if reason is not None:
        summary["FailureReason"] = reason
    return summary


def execution(status: str, reason: str = "") -> dict:
    return {"PipelineExecutionStatus": status, "FailureReason": reason,
            "PipelineExecutionArn": "arn:aws:sagemaker:us-east-1:111122223333:pipeline/dogbreed-pipeline/execution/abc"}


ORDER = ["PrepareData", "TuneHyperparameters", "TrainSingleInstance", "TrainMultiInstance"]


def test_snapshot_lists_every_step_in_order_and_marks_unlisted_ones():
    from pipeline.publish.executions import snapshot_of

    running = snapshot_of(execution("Executing"), [step("PrepareData", "Succeeded", 0, 252),
                                                   step("TuneHyperparameters", "Executing", 252)], ORDER)
    assert [(r.name, r.status) for r in running.rows] == [
        ("PrepareData", "Succeeded"), ("TuneHyperparameters", "Executing"),
        ("TrainSingleInstance", "Pending"), ("TrainMultiInstance", "Pending")]
    assert not running.finished
    done = snapshot_of(execution("Failed"), [step("TuneHyperparameters", "Failed", 252, 400, "ResourceLimitExceeded"),
                                             step("PrepareData", "Succeeded", 0, 252)], ORDER)
    assert [(r.name, r.status) for r in done.rows][2:] == [("TrainSingleInstance", "Not run"), ("TrainMultiInstance", "Not run")]
    assert done.finished and [r.name for r in done.failed_steps()] == ["TuneHyperparameters"]


def test_snapshot_keeps_the_latest_attempt_of_a_retried_step():
    from pipeline.publish.executions import snapshot_of

    snap = snapshot_of(execution("Executing"), [step("PrepareData", "Failed", 0, 10, "throttled"),
                                                step("PrepareData", "Executing", 20)], ORDER)
    assert (snap.rows[0].status, snap.rows[0].reason) == ("Executing", "")


def test_watch_polls_until_the_execution_ends_and_reports_the_failing_step():
    import io

    from pipeline.progress import ProgressView
    from pipeline.publish.executions import failure_message, snapshot_of, watch

    responses = [
        (execution("Executing"), [step("PrepareData", "Executing", 0)]),
        (execution("Executing"), [step("PrepareData", "Succeeded", 0, 252), step("TuneHyperparameters", "Executing", 252)]),
        (execution("Executing"), [step("PrepareData", "Succeeded", 0, 252), step("TuneHyperparameters", "Executing", 252)]),
        (execution("Failed", "Step failure: One or multiple steps failed."),
         [step("PrepareData", "Succeeded", 0, 252),
          step("TuneHyperparameters", "Failed", 252, 400, "ClientError: ResourceLimitExceeded for ml.m5.2xlarge")]),
    ]
    polled, slept = [], []

    def poll():
        polled.append(True)
        return snapshot_of(*responses[len(polled) - 1], ORDER)

    out = io.StringIO()
    with ProgressView("dogbreed-pipeline", plain=True, file=out, clock=lambda: T0 + timedelta(seconds=500)) as view:
        final = watch(poll, view, interval=7.5, sleep=slept.append)
    assert len(polled) == 4 and slept == [7.5, 7.5, 7.5]
    assert final.status == "Failed"
    assert out.getvalue().splitlines() == [
        "PrepareData: Executing",
        "dogbreed-pipeline: Executing",
        "PrepareData: Succeeded after 4m 12s",
        "TuneHyperparameters: Executing",
        "TuneHyperparameters: Failed after 2m 28s - ClientError: ResourceLimitExceeded for ml.m5.2xlarge",
        "TrainSingleInstance: Not run",
        "TrainMultiInstance: Not run",
        "dogbreed-pipeline: Failed",
    ]
    arn = execution("Failed")["PipelineExecutionArn"]
    assert failure_message(arn, final) == (
        f"execution {arn} Failed: step TuneHyperparameters failed: ClientError: ResourceLimitExceeded for ml.m5.2xlarge")


def test_failure_message_falls_back_to_the_execution_reason():
    from pipeline.publish.executions import failure_message, snapshot_of

    stopped = snapshot_of(execution("Stopped", "Stopped by user"), [step("PrepareData", "Stopped", 0, 5)], ORDER)
    assert failure_message("arn:x", stopped) == "execution arn:x Stopped: Stopped by user"


def test_an_execution_that_completed_with_failures_has_ended():
    from pipeline.publish.executions import failure_message, snapshot_of

    ended = snapshot_of(execution("CompletedWithFailures", "Step failure: One or multiple steps failed."),
                        [step("PrepareData", "Succeeded", 0, 5), step("TuneHyperparameters", "Failed", 5, 9, "no capacity")],
                        ORDER)
    assert ended.finished and [(r.name, r.status) for r in ended.rows][2:] == [
        ("TrainSingleInstance", "Not run"), ("TrainMultiInstance", "Not run")]
    assert failure_message("arn:x", ended) == "execution arn:x CompletedWithFailures: step TuneHyperparameters failed: no capacity"


# ---------------------------------------------------------------- comparing definitions

def test_definition_diff_names_steps_parameters_and_json_paths(manifest):
    import copy

    from pipeline.changes import diff_definitions

    old, _ = manifest
    new = copy.deepcopy(old)
    prepare = next(s for s in new["Steps"] if s["Name"] == "PrepareData")
    prepare["Arguments"]["ProcessingResources"]["ClusterConfig"]["VolumeSizeInGB"] = 321
    new["Steps"].append({"Name": "Announce", "Type": "Fail", "Arguments": {"ErrorMessage": "stop"}})
    new["Parameters"].append({"Name": "Seed", "Type": "Integer", "DefaultValue": 7})
    threshold = next(p for p in new["Parameters"] if p["Name"] == "AccuracyThreshold")
    threshold["DefaultValue"] = 0.9

    diff = diff_definitions(old, new)
    old_volume = old["Steps"][0]["Arguments"]["ProcessingResources"]["ClusterConfig"]["VolumeSizeInGB"]
    assert diff.lines() == [
        "+ step Announce",
        "~ step PrepareData",
        f"    Arguments.ProcessingResources.ClusterConfig.VolumeSizeInGB: {old_volume} -> 321",
        "+ parameter Seed",
        "~ parameter AccuracyThreshold",
        f"    DefaultValue: {json.dumps(old_threshold(old))} -> 0.9",
    ]
    assert diff.summary() == ("1 step changed (PrepareData), 1 step added (Announce), "
                              "1 parameter changed (AccuracyThreshold), 1 parameter added (Seed)")
    back = diff_definitions(new, old)
    assert back.removed_steps == ["Announce"] and back.removed_parameters == ["Seed"]
    assert diff_definitions(old, copy.deepcopy(old)).equal


def old_threshold(definition: dict) -> float:
    return next(p for p in definition["Parameters"] if p["Name"] == "AccuracyThreshold")["DefaultValue"]


def test_moving_a_step_between_condition_branches_changes_the_condition(manifest):
    import copy

    from pipeline.changes import diff_definitions

    old, _ = manifest
    new = copy.deepcopy(old)
    gate = next(s for s in new["Steps"] if s["Type"] == "Condition")
    moved = gate["Arguments"]["IfSteps"].pop()
    gate["Arguments"]["ElseSteps"].append(moved)
    diff = diff_definitions(old, new)
    assert list(diff.changed_steps) == [gate["Name"]]
    paths = [change.path for change in diff.changed_steps[gate["Name"]]]
    assert any(path.startswith("Arguments.ElseSteps[") for path in paths)
    assert any(path.startswith("Arguments.IfSteps[") for path in paths)


def test_long_string_changes_keep_the_part_that_differs():
    from pipeline.changes import Change

    old = "s3://dogbreed-artifacts-123456789012-us-east-1/dogbreed/assets/code/eb86481a9bde1dc3/sourcedir.tar.gz"
    new = old.replace("eb86481a9bde1dc3", "905668f6fbf284d7")
    assert Change("Arguments.S3Uri", old, new).describe() == (
        'Arguments.S3Uri: ".../dogbreed/assets/code/eb86481a9bde1dc3/sourcedir.tar.gz" -> '
        '".../dogbreed/assets/code/905668f6fbf284d7/sourcedir.tar.gz"')
    assert Change("A[0]", 1, "1").describe() == 'A[0]: 1 -> "1"'
    assert Change("A", {"k": 1}, None).describe().startswith('A: {"k": 1} -> null')


def test_rejected_credentials_are_reported_as_such(first_upsert, endpoint, sources, describe_only_user, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    code, out, err = run(capsys, *cli(endpoint, sources, "start"))
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1
    assert re.match(r"dogbreed start: AWS did not accept the credentials while .* \((SignatureDoesNotMatch|InvalidClientTokenId)\)", err), err


# ---------------------------------------------------------------- CodeBuild: one artifact from synth to publish

CODEBUILD_PROJECT = "cbdogs"
SOCKET_GUARD = """
import socket
def _refuse(self, address, *args):
    raise OSError(f"network is blocked in this synth: {address!r}")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
"""


def codebuild_environment(account: str, home: Path) -> dict[str, str]:
    """What a CodeBuild build's environment holds for dogbreed: the build ARN and the project, no account id."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SAGEMAKER_", "ARTIFACT_", "CODEBUILD_"))}
    env.update(HOME=str(home), SAGEMAKER_PROJECT_NAME=CODEBUILD_PROJECT, AWS_REGION=REGION,
               CODEBUILD_BUILD_ARN=f"arn:aws:codebuild:{REGION}:{account}:build/{CODEBUILD_PROJECT}-build:0f1e2d3c")
    env.pop("DOGBREED_DEFINITION", None)
    return env


@pytest.fixture(scope="module")
def codebuild_account(aws, account) -> str:
    aws("s3").create_bucket(Bucket=f"{CODEBUILD_PROJECT}-artifacts-{account}-{REGION}")
    aws("sqs").create_queue(QueueName=f"{CODEBUILD_PROJECT}-endpoint-wait")
    for function in LAMBDA_FUNCTIONS:
        aws("iam").create_role(RoleName=f"{CODEBUILD_PROJECT}-{function}", AssumeRolePolicyDocument=LAMBDA_TRUST)
    return account


def test_codebuild_synthesizes_offline_tests_and_publishes_one_artifact(
        codebuild_account, endpoint, sources, aws, tmp_path, capsys, monkeypatch):
    import subprocess
    import sys

    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(SOCKET_GUARD)
    env = codebuild_environment(codebuild_account, tmp_path)
    out = tmp_path / "build" / "pipeline.json"
    synth = subprocess.run([sys.executable, "-m", "pipeline.cli", "synth", "--out", str(out)], cwd=sources,
                           env={**env, "PYTHONPATH": str(guard)}, capture_output=True, text=True, timeout=300)
    assert synth.returncode == 0, synth.stderr
    text = out.read_text()
    assert f"arn:aws:iam::{codebuild_account}:role/{CODEBUILD_PROJECT}-sagemaker-jobs" in text
    assert f"arn:aws:lambda:{REGION}:{codebuild_account}:function:{CODEBUILD_PROJECT}-deploy-endpoint:live" in text

    tests = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "tests" / "synth" / "test_definition.py"), "-q", "-p", "no:cacheprovider",
         "-k", "service_limits or publishable or botocore_input or every_reference_resolves or lambda_steps_call"],
        cwd=sources, env={**env, "DOGBREED_DEFINITION": str(out)}, capture_output=True, text=True, timeout=300)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert re.search(r"^5 passed", tests.stdout, re.MULTILINE), tests.stdout

    for name, value in env.items():
        if name.startswith(("SAGEMAKER_", "CODEBUILD_")):
            monkeypatch.setenv(name, value)
    code, printed, err = run(capsys, *cli(endpoint, sources, "upsert", "--definition", str(out)))
    assert code == 0, err
    assert printed.startswith(f"publishing {out} and the assets its {out.parent / 'assets.json'} lists\n")
    assert f"pipeline {CODEBUILD_PROJECT}-pipeline: created" in printed
    deployed = aws("sagemaker").describe_pipeline(PipelineName=f"{CODEBUILD_PROJECT}-pipeline")["PipelineDefinition"]
    assert deployed == text
    manifest = json.loads((out.parent / "assets.json").read_text())
    bucket = f"{CODEBUILD_PROJECT}-artifacts-{codebuild_account}-{REGION}"
    for entry in manifest["assets"]:
        body = aws("s3").get_object(Bucket=bucket, Key=entry["s3_uri"].split("/", 3)[3])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]
    code, printed, err = run(capsys, *cli(endpoint, sources, "diff", "--definition", str(out)))
    assert (code, printed.strip()) == (0, f"no differences: the deployed definition of {CODEBUILD_PROJECT}-pipeline "
                                          "equals the local one")


def test_upsert_refuses_a_definition_whose_assets_changed_after_synth(codebuild_account, endpoint, sources, aws,
                                                                      tmp_path, capsys, monkeypatch):
    for name, value in codebuild_environment(codebuild_account, tmp_path).items():
        if name.startswith(("SAGEMAKER_", "CODEBUILD_")):
            monkeypatch.setenv(name, value)
    out = tmp_path / "build" / "pipeline.json"
    assert main(["synth", "--out", str(out), "--source-dir", str(sources)]) == 0
    edited = edited_copy(sources, tmp_path / "edited", "code/train.py", "\n# edited after synth\n")
    code, printed, err = run(capsys, *cli(endpoint, edited, "upsert", "--definition", str(out)))
    assert (code, printed) == (2, "")  # refused before anything was published
    assert "the source tree has changed since" in err and "code/ (its archive is" in err, err

    code_entry = next(e for e in json.loads((out.parent / "assets.json").read_text())["assets"] if e["name"] == "code")
    archive = out.parent / "assets" / code_entry["sha256"][:16] / code_entry["filename"]
    archive.write_bytes(archive.read_bytes() + b"\0")
    code, printed, err = run(capsys, *cli(endpoint, sources, "upsert", "--definition", str(out)))
    assert (code, printed) == (2, "")
    assert err.startswith(f"dogbreed upsert: asset code: {archive} has changed since synth (SHA-256 "), err
    assert "run dogbreed synth again" in err


def test_upsert_refuses_a_definition_built_for_another_account(codebuild_account, endpoint, sources, tmp_path,
                                                               capsys, monkeypatch):
    monkeypatch.setenv("SAGEMAKER_PROJECT_NAME", CODEBUILD_PROJECT)
    out = tmp_path / "build" / "pipeline.json"
    assert main(["synth", "--out", str(out), "--source-dir", str(sources), "--account", "999988887777"]) == 0
    code, printed, err = run(capsys, *cli(endpoint, sources, "upsert", "--definition", str(out)))
    assert code == 2
    assert err.startswith(f"dogbreed upsert: will not publish {out}:\n  {out} was built for account 999988887777 (e.g. "), err
    assert f"but the target account is {codebuild_account}" in err

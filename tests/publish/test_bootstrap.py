"""``dogbreed bootstrap`` against moto's server on 127.0.0.1.

moto's CloudFormation creates resources only of the types it models; it skips the others. The stack here is
made from a copy of infra/template.yaml without those resources (MOTO_LACKS), each reference to one
replaced by the name or ARN CloudFormation would give it, so every resource the copy keeps is really created.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import boto3
import pytest

from pipeline.cli import main
from pipeline.publish.bootstrap import TEMPLATE_BODY_LIMIT, template_body, template_document
from test_infra import ROOT, TEMPLATE, Resolver, load_template

moto_parsing = pytest.importorskip("moto.cloudformation.parsing")
from pipeline.local.moto_server import ThreadedMotoServer  # noqa: E402  (needs moto)

pytestmark = pytest.mark.slow

REGION = "us-east-1"
STACK = "dogbreed"
# The template's resource types moto's CloudFormation does not create (docs/aws-setup.md names them).
MOTO_LACKS = {"AWS::S3::BucketPolicy", "AWS::SQS::QueuePolicy", "AWS::SageMaker::ModelPackageGroup", "AWS::CloudWatch::Alarm",
              "AWS::CodeBuild::Project", "AWS::SNS::TopicPolicy", "AWS::SNS::Subscription"}
NAME_PROPERTY = {"AWS::SageMaker::ModelPackageGroup": "ModelPackageGroupName", "AWS::CloudWatch::Alarm": "AlarmName",
                 "AWS::CodeBuild::Project": "Name"}
ARN_PREFIX = {"AWS::CloudWatch::Alarm": "arn:${AWS::Partition}:cloudwatch:${AWS::Region}:${AWS::AccountId}:alarm:"}


def without_types(document: dict, kinds: set[str]) -> dict:
    """``document`` without its resources of ``kinds``; a Ref or GetAtt Arn of one becomes its name or ARN as a Sub."""
    removed = {name: body for name, body in document["Resources"].items() if body["Type"] in kinds}

    def name_of(logical: str) -> str:
        body = removed[logical]
        return body["Properties"][NAME_PROPERTY[body["Type"]]]["Fn::Sub"]

    def replace(node):
        if isinstance(node, list):
            return [replace(item) for item in node]
        if not isinstance(node, dict):
            return node
        if set(node) == {"Ref"} and node["Ref"] in removed:
            return {"Fn::Sub": name_of(node["Ref"])}
        if set(node) == {"Fn::GetAtt"} and node["Fn::GetAtt"][0] in removed:
            logical = node["Fn::GetAtt"][0]
            return {"Fn::Sub": ARN_PREFIX[removed[logical]["Type"]] + name_of(logical)}
        return {key: replace(value) for key, value in node.items()}

    kept = {key: value for key, value in document.items() if key != "Resources"}
    kept["Resources"] = {name: body for name, body in document["Resources"].items() if name not in removed}
    return replace(kept)


@pytest.fixture(scope="module")
def document() -> dict:
    return template_document(TEMPLATE)


@pytest.fixture(scope="module")
def moto_template(document, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template-for-moto.json"
    path.write_text(json.dumps(without_types(document, MOTO_LACKS), indent=1))
    return path


@pytest.fixture(scope="module")
def outputs_after_change_sets():
    """moto 5.2 computes a stack's outputs when it creates or updates the stack directly (CreateStack, UpdateStack),
    not when it executes a change set, after which DescribeStacks shows none; CloudFormation shows them either way.
    Executing a change set here also computes them, as moto's own Stack.update does."""
    from moto.cloudformation.models import ChangeSet

    original = ChangeSet.apply

    def apply(self) -> None:
        original(self)
        self.stack.template = self.template
        self.stack._parse_template()
        self.stack.output_map = self.stack._create_output_map()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ChangeSet, "apply", apply)
        yield


@pytest.fixture(scope="module")
def endpoint(aws_environment, outputs_after_change_sets):
    server = ThreadedMotoServer(lambda app: app)
    server.start()
    try:
        yield server.url
    finally:
        server.reset()
        server.stop()


@pytest.fixture(scope="module")
def aws(endpoint):
    return lambda service: boto3.client(service, region_name=REGION, endpoint_url=endpoint)


def bootstrap(endpoint: str, *extra: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["bootstrap", "--endpoint-url", endpoint, "--region", REGION, "--source-dir", str(ROOT), *extra])
    return code, out.getvalue(), err.getvalue()


def test_the_types_moto_lacks_are_exactly_those_the_copy_leaves_out(document):
    kinds = {body["Type"] for body in document["Resources"].values()}
    assert {kind for kind in kinds if kind not in moto_parsing.get_model_map()} == MOTO_LACKS


def test_the_template_body_fits_cloudformations_limit(document):
    body = template_body(document)
    assert json.loads(body) == load_template()  # the short forms read as cfn-lint reads them
    assert len(body.encode()) < TEMPLATE_BODY_LIMIT


@pytest.fixture(scope="module")
def build_project(aws, document) -> str:
    """The CodeBuild project, made in moto with the environment the template gives it (moto's stack cannot)."""
    project = Resolver(load_template()).resources()["BuildProject"]["Properties"]  # for the sample account
    account = aws("sts").get_caller_identity()["Account"]
    aws("codebuild").create_project(
        name=project["Name"], source={"type": "S3", "location": project["Source"]["Location"]},
        artifacts={"type": "NO_ARTIFACTS"}, serviceRole=f"arn:aws:iam::{account}:role/dogbreed-codebuild",
        environment={"type": "LINUX_CONTAINER", "image": project["Environment"]["Image"], "computeType": "BUILD_GENERAL1_SMALL",
                     "environmentVariables": [{"name": v["Name"], "value": v["Value"], "type": "PLAINTEXT"}
                                              for v in project["Environment"]["EnvironmentVariables"]]})
    return project["Name"]


@pytest.fixture(scope="module")
def created(endpoint, moto_template, build_project) -> tuple[int, str, str]:
    return bootstrap(endpoint, "--template", str(moto_template), "--yes")


def test_bootstrap_creates_the_stack_and_prints_its_outputs_and_the_build_environment(created, aws, moto_template, build_project):
    code, out, err = created
    assert code == 0, err
    (stack,) = aws("cloudformation").describe_stacks(StackName=STACK)["Stacks"]
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    account = aws("sts").get_caller_identity()["Account"]
    bucket = f"dogbreed-artifacts-{account}-{REGION}"
    aws("s3").head_bucket(Bucket=bucket)
    assert aws("iam").get_role(RoleName="dogbreed-codebuild")["Role"]["RoleName"] == "dogbreed-codebuild"
    assert aws("sqs").get_queue_url(QueueName="dogbreed-endpoint-wait")["QueueUrl"].endswith("/dogbreed-endpoint-wait")
    assert f"stack {STACK} ({REGION}): create, " in out
    assert "  + Add    ArtifactBucket (AWS::S3::Bucket)" in out
    assert f"  {STACK} (AWS::CloudFormation::Stack): CREATE_IN_PROGRESS - User Initiated" in out
    assert f"  {STACK} (AWS::CloudFormation::Stack): CREATE_COMPLETE\nstack {STACK}: CREATE_COMPLETE\noutputs:" in out
    assert f"  ArtifactBucketName = {bucket}" in out and f"  BuildProjectName = {build_project}" in out
    environment = aws("codebuild").batch_get_projects(names=[build_project])["projects"][0]["environment"]["environmentVariables"]
    printed = out.split(f"environment of CodeBuild project {build_project}:\n", 1)[1].splitlines()
    declared = load_template()["Resources"]["BuildProject"]["Properties"]["Environment"]["EnvironmentVariables"]
    assert printed == [f"  {v['name']}={v['value']}" for v in environment] and len(printed) == len(declared)


def pending_change_sets(aws) -> list[str]:
    """Change sets of the stack not executed (moto lists every stack's, and keeps executed ones, which CloudFormation drops)."""
    summaries = aws("cloudformation").list_change_sets(StackName=STACK)["Summaries"]
    return [s["ChangeSetName"] for s in summaries if s["StackName"] == STACK and s.get("ExecutionStatus") != "EXECUTE_COMPLETE"]


def test_a_second_run_changes_nothing_and_says_so(created, endpoint, moto_template, aws):
    before = aws("cloudformation").describe_stacks(StackName=STACK)["Stacks"][0]
    code, out, err = bootstrap(endpoint, "--template", str(moto_template), "--yes")
    assert code == 0, err
    assert out.startswith(f"no changes: stack {STACK} already matches")
    after = aws("cloudformation").describe_stacks(StackName=STACK)["Stacks"][0]
    assert after.get("LastUpdatedTime") == before.get("LastUpdatedTime") and after["StackStatus"] == "CREATE_COMPLETE"
    assert pending_change_sets(aws) == []


def test_print_writes_exactly_the_deployed_parameters(created, endpoint, moto_template, aws):
    code, out, err = bootstrap(endpoint, "--template", str(moto_template), "--print")
    assert code == 0, err
    printed = json.loads(out)
    deployed = aws("cloudformation").describe_stacks(StackName=STACK)["Stacks"][0]["Parameters"]
    assert sorted(printed, key=lambda p: p["ParameterKey"]) == sorted(
        ({"ParameterKey": p["ParameterKey"], "ParameterValue": p["ParameterValue"]} for p in deployed), key=lambda p: p["ParameterKey"])
    assert {"ParameterKey": "ProjectName", "ParameterValue": "dogbreed"} in printed


def test_an_update_is_shown_and_not_applied_without_yes(created, endpoint, moto_template, aws):
    code, out, err = bootstrap(endpoint, "--template", str(moto_template), "--parameter", "LogRetentionDays=14")
    assert code == 1, err
    assert f"stack {STACK} ({REGION}): update" in out and out.rstrip().endswith("run again with --yes to apply these changes")
    assert pending_change_sets(aws) == []
    parameters = aws("cloudformation").describe_stacks(StackName=STACK)["Stacks"][0]["Parameters"]
    assert {"ParameterKey": "LogRetentionDays", "ParameterValue": "30"} in [
        {"ParameterKey": p["ParameterKey"], "ParameterValue": p["ParameterValue"]} for p in parameters]


def test_a_template_error_is_one_readable_line(created, endpoint, moto_template, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(TEMPLATE.read_text().replace("  ArtifactBucket:\n    Type: AWS::S3::Bucket", "  ArtifactBucket:\n  Type: [", 1))
    code, out, err = bootstrap(endpoint, "--template", str(broken), "--yes")
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith(f"dogbreed bootstrap: {broken} line ") and "Traceback" not in err


def test_a_reference_cloudformation_cannot_resolve_is_one_readable_line(created, endpoint, moto_template, tmp_path):
    document = json.loads(moto_template.read_text())
    document["Resources"]["EndpointWaitQueue"]["Properties"]["RedrivePolicy"]["deadLetterTargetArn"] = {"Fn::GetAtt": ["Missing", "Arn"]}
    broken = tmp_path / "unresolved.json"
    broken.write_text(json.dumps(document))
    code, out, err = bootstrap(endpoint, "--template", str(broken), "--project-name", "unresolved", "--yes")
    assert code == 2
    assert err.splitlines() == ["dogbreed bootstrap: applying the change set of stack unresolved failed: ValidationError: "
                                "Template error: instance of Fn::GetAtt references undefined resource Missing"]


def test_bad_parameters_are_refused_before_any_call(endpoint, moto_template):
    code, _, err = bootstrap(endpoint, "--template", str(moto_template), "--parameter", "Nope=1")
    assert code == 2 and "--parameter Nope: the template has no such parameter; it has ProjectName" in err
    code, _, err = bootstrap(endpoint, "--delete-data")
    assert code == 2 and "--delete-data goes with --delete" in err


def test_a_change_that_removes_a_bucket_is_refused_and_nothing_is_applied(created, endpoint, moto_template, aws, tmp_path):
    document = json.loads(moto_template.read_text())
    del document["Resources"]["AccessLogBucket"], document["Outputs"]["AccessLogBucketName"]
    del document["Resources"]["ArtifactBucket"]["Properties"]["LoggingConfiguration"]
    shrunk = tmp_path / "without-log-bucket.json"
    shrunk.write_text(json.dumps(document))
    code, out, err = bootstrap(endpoint, "--template", str(shrunk), "--yes")
    assert code == 2
    assert "  - Remove AccessLogBucket (AWS::S3::Bucket)" in out
    assert err.splitlines() == ["dogbreed bootstrap: will not remove AccessLogBucket (AWS::S3::Bucket): its data would be lost. "
                                "Nothing was applied; change the template or parameters back (ProjectName names the buckets and "
                                "the model group)"]
    assert pending_change_sets(aws) == []
    account = aws("sts").get_caller_identity()["Account"]
    aws("s3").head_bucket(Bucket=f"dogbreed-access-logs-{account}-{REGION}")


def test_a_stack_that_fails_is_one_readable_line(created, endpoint, moto_template, aws):
    """A second stack of the same project collides with the first one's named roles."""
    code, out, err = bootstrap(endpoint, "--template", str(moto_template), "--stack-name", "dogbreed-again", "--yes")
    assert code == 2, out
    (line,) = err.splitlines()
    assert line.startswith("dogbreed bootstrap: applying the change set of stack dogbreed-again failed: ")
    assert "BucketAlreadyExists" in line and "Traceback" not in err


def test_a_creation_not_applied_leaves_no_stack(created, endpoint, moto_template, aws):
    code, out, err = bootstrap(endpoint, "--template", str(moto_template), "--stack-name", "preview")
    assert code == 1, err
    assert "stack preview (us-east-1): create, " in out and out.rstrip().endswith("run again with --yes to apply these changes")
    live = {s["StackName"] for s in aws("cloudformation").list_stacks()["StackSummaries"] if s["StackStatus"] != "DELETE_COMPLETE"}
    assert "preview" not in live


def padded(moto_template: Path, target: Path) -> Path:
    """The template with 60,000 bytes of Metadata: over CloudFormation's TemplateBody limit."""
    document = json.loads(moto_template.read_text())
    document["Metadata"]["Notes"] = ["a note of one hundred characters " * 3 for _ in range(600)]
    target.write_text(json.dumps(document))
    assert len(template_body(document).encode()) > TEMPLATE_BODY_LIMIT
    return target


def test_a_template_over_the_body_limit_goes_through_the_bucket(created, endpoint, moto_template, aws, tmp_path):
    big = padded(moto_template, tmp_path / "big.json")
    code, out, err = bootstrap(endpoint, "--template", str(big), "--stack-name", "elsewhere", "--yes")
    assert code == 2 and "over CloudFormation's 51200-byte TemplateBody limit, and the stack has no bucket yet: pass --template-bucket" in err
    with pytest.raises(aws("cloudformation").exceptions.ClientError):
        aws("cloudformation").describe_stacks(StackName="elsewhere")

    code, out, err = bootstrap(endpoint, "--template", str(big), "--parameter", "LogRetentionDays=14", "--yes")
    assert code == 0, err
    assert f"stack {STACK} ({REGION}): update" in out and f"stack {STACK}: UPDATE_COMPLETE" in out
    account = aws("sts").get_caller_identity()["Account"]
    listing = aws("s3").list_objects_v2(Bucket=f"dogbreed-artifacts-{account}-{REGION}", Prefix="dogbreed/bootstrap/")["Contents"]
    (uploaded,) = [item["Key"] for item in listing]
    body = aws("s3").get_object(Bucket=f"dogbreed-artifacts-{account}-{REGION}", Key=uploaded)["Body"].read()
    assert json.loads(body) == json.loads(big.read_text())
    assert aws("cloudformation").get_template(StackName=STACK)["TemplateBody"] == json.loads(body)  # botocore parses JSON bodies


def test_delete_refuses_while_an_endpoint_exists_then_keeps_the_buckets_data(created, endpoint, aws):
    account = aws("sts").get_caller_identity()["Account"]
    bucket = f"dogbreed-artifacts-{account}-{REGION}"
    aws("s3").put_object(Bucket=bucket, Key="dogbreed/data/dogImages/train/001.Affenpinscher/a.jpg", Body=b"\xff\xd8 jpeg")
    sagemaker = aws("sagemaker")
    role = f"arn:aws:iam::{account}:role/dogbreed-sagemaker-model"
    sagemaker.create_model(ModelName="m", ExecutionRoleArn=role, PrimaryContainer={"Image": "123.dkr.ecr.us-east-1.amazonaws.com/x:1"})
    sagemaker.create_endpoint_config(EndpointConfigName="c", ProductionVariants=[
        {"VariantName": "AllTraffic", "ModelName": "m", "InitialInstanceCount": 1, "InstanceType": "ml.m5.large"}])
    sagemaker.create_endpoint(EndpointName="dogbreed-single-instance", EndpointConfigName="c")

    code, out, err = bootstrap(endpoint, "--delete", "--yes")
    assert code == 2 and "endpoints dogbreed-single-instance still exist" in err and "--delete-endpoints" in err
    assert aws("cloudformation").describe_stacks(StackName=STACK)["Stacks"][0]["StackStatus"] in ("CREATE_COMPLETE", "UPDATE_COMPLETE")

    code, out, err = bootstrap(endpoint, "--delete", "--delete-endpoints", "--yes")
    assert code == 0, err
    assert "deleted endpoint dogbreed-single-instance" in out and f"stack {STACK}: DELETE_COMPLETE" in out
    assert f"kept bucket {bucket} and its data" in out
    assert aws("s3").get_object(Bucket=bucket, Key="dogbreed/data/dogImages/train/001.Affenpinscher/a.jpg")["Body"].read() == b"\xff\xd8 jpeg"
    stacks = aws("cloudformation").list_stacks(StackStatusFilter=["DELETE_COMPLETE"])["StackSummaries"]
    assert STACK in {summary["StackName"] for summary in stacks}

    code, out, err = bootstrap(endpoint, "--delete", "--yes")
    assert code == 0 and out.startswith(f"stack {STACK} does not exist in {REGION}: nothing to delete")


def test_delete_data_empties_every_version_and_deletes_the_buckets(endpoint, moto_template, aws):
    code, out, err = bootstrap(endpoint, "--template", str(moto_template), "--project-name", "spare", "--yes")
    assert code == 0, err
    account = aws("sts").get_caller_identity()["Account"]
    bucket = f"spare-artifacts-{account}-{REGION}"
    s3 = aws("s3")
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for body in (b"first", b"second"):
        s3.put_object(Bucket=bucket, Key="spare/data/a.jpg", Body=body)
    s3.delete_object(Bucket=bucket, Key="spare/data/a.jpg")  # a delete marker on top of two versions

    code, out, err = bootstrap(endpoint, "--project-name", "spare", "--delete", "--delete-data", "--yes")
    assert code == 0, err
    assert f"deleted bucket {bucket} (3 object versions)" in out
    assert f"deleted bucket spare-access-logs-{account}-{REGION} (0 object versions)" in out
    names = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    assert not {bucket, f"spare-access-logs-{account}-{REGION}"} & names

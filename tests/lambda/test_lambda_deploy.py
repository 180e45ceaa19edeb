"""lambda/deploy_endpoint.py against moto: create, idempotent re-run, blue/green update, refusals."""
from __future__ import annotations

import json
import re
import traceback

import boto3
import pytest

from lambda_harness import ACCOUNT, REGION, LambdaContext, changed, load_handler, model_package, sagemaker_backend

MODEL_ROLE = f"arn:aws:iam::{ACCOUNT}:role/dogbreed-sagemaker-model"
SAGEMAKER_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


def put_stack_alarm(endpoint_name: str) -> None:
    """The endpoint's 5xx alarm as infra/template.yaml creates it."""
    boto3.client("cloudwatch", region_name=REGION).put_metric_alarm(
        AlarmName=f"{endpoint_name}-5xx-errors", Namespace="AWS/SageMaker", MetricName="Invocation5XXErrors",
        Dimensions=[{"Name": "EndpointName", "Value": endpoint_name}, {"Name": "VariantName", "Value": "AllTraffic"}],
        Statistic="Sum", Period=60, EvaluationPeriods=2, Threshold=1, ComparisonOperator="GreaterThanOrEqualToThreshold",
    )


@pytest.fixture
def no_stack_alarms():
    """Asked for by a test that needs moto without the stack's rollback alarms."""


@pytest.fixture(autouse=True)
def stack_alarms(request):
    """The two endpoints' rollback alarms exist in moto, as after deploying the stack (unless the test asks for no_stack_alarms)."""
    if "aws" in request.fixturenames and "no_stack_alarms" not in request.fixturenames:
        request.getfixturevalue("aws")
        for endpoint_name in ("dogbreed-single-instance", "dogbreed-multi-instance"):
            put_stack_alarm(endpoint_name)


def deploy_event(package_arn: str, **overrides) -> dict:
    event = {
        "model_package_arn": package_arn,
        "endpoint_name": "dogbreed-single-instance",
        "instance_type": "ml.m5.large",
        "initial_instance_count": 1,
        "model_role_arn": MODEL_ROLE,
        "data_capture_s3_uri": "",
        "kms_key_id": "",
    }
    event.update(overrides)
    return event


def sagemaker():
    return boto3.client("sagemaker", region_name=REGION)


def test_first_deploy_creates_model_config_and_endpoint(aws):
    deploy = load_handler("deploy_endpoint")
    arn = model_package()
    result = deploy.handler(deploy_event(arn, initial_instance_count="2"), LambdaContext())

    assert result["action"] == "created"
    assert set(result) == {"endpoint_name", "endpoint_config_name", "model_name", "action"}
    assert all(isinstance(value, str) for value in result.values())
    model = sagemaker().describe_model(ModelName=result["model_name"])
    assert model["ExecutionRoleArn"] == MODEL_ROLE
    assert model["Containers"] == [{"ModelPackageName": arn}]
    config = sagemaker().describe_endpoint_config(EndpointConfigName=result["endpoint_config_name"])
    (variant,) = config["ProductionVariants"]
    assert (variant["VariantName"], variant["ModelName"], variant["InstanceType"], variant["InitialInstanceCount"]) == (
        "AllTraffic", result["model_name"], "ml.m5.large", 2)
    assert "DataCaptureConfig" not in config or not config["DataCaptureConfig"]
    endpoint = sagemaker().describe_endpoint(EndpointName="dogbreed-single-instance")
    assert endpoint["EndpointConfigName"] == result["endpoint_config_name"]
    for name in (result["model_name"], result["endpoint_config_name"]):
        assert SAGEMAKER_NAME.match(name) and name.startswith("dogbreed-single-instance-")


@pytest.mark.slow
def test_second_deploy_with_the_same_event_changes_nothing(aws):
    deploy = load_handler("deploy_endpoint")
    event = deploy_event(model_package())
    first = deploy.handler(event, None)
    second = deploy.handler(dict(event), None)

    assert second == {**first, "action": "unchanged"}
    assert len(sagemaker().list_models()["Models"]) == 1
    assert len(sagemaker().list_endpoint_configs()["EndpointConfigs"]) == 1
    assert len(sagemaker().list_endpoints()["Endpoints"]) == 1


def test_names_follow_the_content_and_fit_sagemaker_limits(aws):
    deploy = load_handler("deploy_endpoint")
    arn = model_package()
    long_name = "e" * 40 + "-" + "x" * 22  # 63 characters, the longest endpoint name
    plain = deploy.handler(deploy_event(arn, endpoint_name=long_name), None)
    captured = deploy.handler(deploy_event(arn, endpoint_name="dogbreed-multi-instance", data_capture_s3_uri="s3://bucket/dogbreed/data-capture", data_capture_percentage="25", kms_key_id="alias/dogbreed"), None)

    for name in (plain["model_name"], plain["endpoint_config_name"]):
        assert len(name) <= 63 and SAGEMAKER_NAME.match(name)
    config = sagemaker().describe_endpoint_config(EndpointConfigName=captured["endpoint_config_name"])
    capture = config["DataCaptureConfig"]
    assert capture["EnableCapture"] is True
    assert capture["InitialSamplingPercentage"] == 25
    assert capture["DestinationS3Uri"] == "s3://bucket/dogbreed/data-capture"
    assert capture["KmsKeyId"] == "alias/dogbreed"
    assert config["KmsKeyId"] == "alias/dogbreed"
    assert {option["CaptureMode"] for option in capture["CaptureOptions"]} == {"Input", "Output"}


@pytest.mark.slow
@pytest.mark.parametrize("instance_type", ["ml.g4dn.xlarge", "ml.m5d.large", "ml.c5d.2xlarge", "ml.r5d.large"])  # the ones moto accepts
def test_the_kms_key_is_left_out_for_instance_types_with_local_storage(aws, capsys, instance_type):
    deploy = load_handler("deploy_endpoint")
    event = deploy_event(model_package(), instance_type=instance_type, data_capture_s3_uri="s3://bucket/dogbreed/data-capture", kms_key_id="alias/dogbreed")
    result = deploy.handler(event, None)

    config = sagemaker().describe_endpoint_config(EndpointConfigName=result["endpoint_config_name"])
    assert config["ProductionVariants"][0]["InstanceType"] == instance_type
    assert "KmsKeyId" not in config
    assert config["DataCaptureConfig"]["KmsKeyId"] == "alias/dogbreed"  # the captured data in S3 is still encrypted with the key
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    (left_out,) = [line for line in lines if line.get("event") == "kms-key-left-out"]
    assert left_out["instance_type"] == instance_type and "local NVMe storage" in left_out["reason"]


def test_the_kms_key_is_kept_for_instance_types_without_local_storage(aws, capsys):
    deploy = load_handler("deploy_endpoint")
    for instance_type in ("ml.m5.large", "ml.c5.xlarge", "ml.p3.2xlarge", "ml.inf1.xlarge"):
        endpoint = f"dogbreed-{instance_type.replace('.', '-')}"
        result = deploy.handler(deploy_event(model_package(), endpoint_name=endpoint, instance_type=instance_type, kms_key_id="alias/dogbreed"), None)
        assert sagemaker().describe_endpoint_config(EndpointConfigName=result["endpoint_config_name"])["KmsKeyId"] == "alias/dogbreed", instance_type
    assert "kms-key-left-out" not in capsys.readouterr().out


def test_the_endpoint_config_leaves_the_kms_key_out_by_instance_family(aws):
    deploy = load_handler("deploy_endpoint")
    arn = model_package()
    for instance_type, has_key in [("ml.p3dn.24xlarge", False), ("ml.g5.xlarge", False), ("ml.g6e.2xlarge", False), ("ml.p4d.24xlarge", False),
                                   ("ml.g4ad.xlarge", True), ("ml.p3.2xlarge", True), ("ml.m5.large", True), ("ml.g4dn.xlarge", False)]:
        spec = deploy.endpoint_config_spec(deploy.parse_event(deploy_event(arn, instance_type=instance_type, kms_key_id="alias/dogbreed")), "dogbreed-model")
        assert ("KmsKeyId" in spec) is has_key, instance_type


def test_a_new_version_that_serves_the_same_artifacts_changes_nothing(aws, update_endpoint_in_moto):
    """Every execution registers a package version; a fully cached rerun's version serves the same model.tar.gz."""
    deploy = load_handler("deploy_endpoint")
    artifacts = "s3://bucket/jobs/TrainSingleInstance/output/model.tar.gz"
    first = deploy.handler(deploy_event(model_package(model_data_url=artifacts)), None)
    second = deploy.handler(deploy_event(model_package(model_data_url=artifacts)), None)

    assert second == {**first, "action": "unchanged"}
    assert update_endpoint_in_moto == []  # no UpdateEndpoint: no blue/green fleet, no rollback risk
    assert len(sagemaker().list_models()["Models"]) == 1
    assert len(sagemaker().list_endpoint_configs()["EndpointConfigs"]) == 1
    changed = deploy.handler(deploy_event(model_package(model_data_url=artifacts), initial_instance_count=2), None)
    assert changed["action"] == "updated" and changed["model_name"] == first["model_name"]  # same model, new instance settings


@pytest.mark.slow
def test_a_new_model_version_updates_the_endpoint_blue_green(aws, update_endpoint_in_moto, monkeypatch):
    monkeypatch.setenv("ROLLBACK_ALARM_NAME_PATTERN", "{endpoint_name}-5xx-errors")
    deploy = load_handler("deploy_endpoint")
    first = deploy.handler(deploy_event(model_package()), None)
    version_2 = model_package()
    second = deploy.handler(deploy_event(version_2), None)

    assert second["action"] == "updated"
    assert second["model_name"] != first["model_name"]
    assert second["endpoint_config_name"] != first["endpoint_config_name"]
    assert sagemaker().describe_endpoint(EndpointName="dogbreed-single-instance")["EndpointConfigName"] == second["endpoint_config_name"]
    (update,) = update_endpoint_in_moto
    policy = update["DeploymentConfig"]["BlueGreenUpdatePolicy"]
    assert policy["TrafficRoutingConfiguration"]["Type"] == "ALL_AT_ONCE"
    assert policy["TrafficRoutingConfiguration"]["WaitIntervalInSeconds"] > 0  # the old fleet stays while the alarm watches
    assert update["DeploymentConfig"]["AutoRollbackConfiguration"] == {"Alarms": [{"AlarmName": "dogbreed-single-instance-5xx-errors"}]}
    assert "RetainAllVariantProperties" not in update  # not auto-scaled: the event's instance count applies
    assert deploy.handler(deploy_event(version_2), None)["action"] == "unchanged"
    assert len(update_endpoint_in_moto) == 1


def test_an_update_without_its_rollback_alarm_fails_naming_it_unless_the_event_allows_it(aws, no_stack_alarms, update_endpoint_in_moto):
    deploy = load_handler("deploy_endpoint")
    deploy.handler(deploy_event(model_package()), None)
    with pytest.raises(deploy.DeployError) as refusal:
        deploy.handler(deploy_event(model_package(), initial_instance_count=2), None)
    assert "dogbreed-single-instance-5xx-errors do not exist" in str(refusal.value)
    assert '"allow_update_without_rollback": true' in str(refusal.value)
    assert update_endpoint_in_moto == []

    allowed = deploy.handler(deploy_event(model_package(), initial_instance_count=2, allow_update_without_rollback="true"), None)
    assert allowed["action"] == "updated" and allowed["rollback"].startswith("none: the rollback alarm(s) dogbreed-single-instance-5xx-errors do not exist")
    put_stack_alarm("dogbreed-single-instance")
    guarded = deploy.handler(deploy_event(model_package(), initial_instance_count=3), None)

    without_alarm, with_alarm = update_endpoint_in_moto
    assert "AutoRollbackConfiguration" not in without_alarm["DeploymentConfig"]
    assert without_alarm["DeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]["WaitIntervalInSeconds"] == 0
    assert with_alarm["DeploymentConfig"]["AutoRollbackConfiguration"] == {"Alarms": [{"AlarmName": "dogbreed-single-instance-5xx-errors"}]}
    assert "rollback" not in guarded


def deny_describe_alarms(deploy) -> list[dict]:
    """Make CloudWatch answer DescribeAlarms as it does for a role without cloudwatch:DescribeAlarms (the handler's own client)."""
    from botocore.awsrequest import AWSResponse

    calls: list[dict] = []

    def access_denied(params, **_):
        calls.append(params)
        message = ("User: arn:aws:sts::123456789012:assumed-role/dogbreed-deploy-endpoint/dogbreed-deploy-endpoint is not authorized "
                   "to perform: cloudwatch:DescribeAlarms on resource: arn:aws:cloudwatch:us-east-1:123456789012:alarm:"
                   "dogbreed-single-instance-5xx-errors because no identity-based policy allows the cloudwatch:DescribeAlarms action")
        return AWSResponse("https://monitoring.us-east-1.amazonaws.com/", 403, {}, None), {
            "Error": {"Code": "AccessDenied", "Message": message}, "ResponseMetadata": {"HTTPStatusCode": 403}}

    deploy.client("cloudwatch").meta.events.register("before-call.cloudwatch.DescribeAlarms", access_denied)
    return calls


def test_an_update_whose_rollback_alarms_cannot_be_read_fails_naming_the_permission(aws, update_endpoint_in_moto, capsys):
    deploy = load_handler("deploy_endpoint")
    deploy.handler(deploy_event(model_package()), None)
    calls = deny_describe_alarms(deploy)
    with pytest.raises(deploy.DeployError) as refusal:
        deploy.handler(deploy_event(model_package(), initial_instance_count=2), LambdaContext())

    message = str(refusal.value)
    assert calls and "cannot read the rollback alarm(s) dogbreed-single-instance-5xx-errors (AccessDenied" in message
    assert "needs cloudwatch:DescribeAlarms" in message and '"allow_update_without_rollback": true' in message
    assert update_endpoint_in_moto == []
    failure = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert failure["status"] == "failed" and failure["error_type"] == "DeployError" and "traceback" not in failure


def test_an_update_may_go_without_readable_alarms_only_when_the_event_says_so(aws, update_endpoint_in_moto):
    deploy = load_handler("deploy_endpoint")
    deploy.handler(deploy_event(model_package()), None)
    deny_describe_alarms(deploy)
    result = deploy.handler(deploy_event(model_package(), initial_instance_count=2, allow_update_without_rollback=True), None)

    assert result["action"] == "updated"
    assert result["rollback"].startswith("none: cannot read the rollback alarm(s)") and "AccessDenied" in result["rollback"]
    (update,) = update_endpoint_in_moto
    assert "AutoRollbackConfiguration" not in update["DeploymentConfig"]
    with pytest.raises(deploy.EventError, match="allow_update_without_rollback"):
        deploy.parse_event(deploy_event(model_package(), allow_update_without_rollback="maybe"))


def _register_scaling(endpoint_name: str) -> None:
    autoscaling = boto3.client("application-autoscaling", region_name=REGION)
    resource = f"endpoint/{endpoint_name}/variant/AllTraffic"
    autoscaling.register_scalable_target(ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension="sagemaker:variant:DesiredInstanceCount", MinCapacity=1, MaxCapacity=4)
    autoscaling.put_scaling_policy(
        PolicyName=f"{endpoint_name}-invocations-per-instance", ServiceNamespace="sagemaker", ResourceId=resource,
        ScalableDimension="sagemaker:variant:DesiredInstanceCount", PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={"TargetValue": 50.0, "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}},
    )


def _scalable_targets(endpoint_name: str) -> list:
    autoscaling = boto3.client("application-autoscaling", region_name=REGION)
    return autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[f"endpoint/{endpoint_name}/variant/AllTraffic"])["ScalableTargets"]


def test_an_auto_scaled_endpoint_keeps_its_instance_count_on_a_model_update(aws, update_endpoint_in_moto):
    deploy = load_handler("deploy_endpoint")
    deploy.handler(deploy_event(model_package()), None)
    _register_scaling("dogbreed-single-instance")
    deploy.handler(deploy_event(model_package()), None)

    (update,) = update_endpoint_in_moto
    assert update["RetainAllVariantProperties"] is True
    excluded = {item["VariantPropertyType"] for item in update["ExcludeRetainedVariantProperties"]}
    assert excluded == {"DesiredWeight", "DataCaptureConfig"}  # only the scaler's instance count is kept
    assert _scalable_targets("dogbreed-single-instance")  # a model change may keep auto scaling


def test_an_instance_type_change_releases_auto_scaling_first(aws, update_endpoint_in_moto):
    deploy = load_handler("deploy_endpoint")
    arn = model_package()
    deploy.handler(deploy_event(arn), None)
    _register_scaling("dogbreed-single-instance")
    result = deploy.handler(deploy_event(arn, instance_type="ml.c5.xlarge"), None)

    assert result["action"] == "updated"
    assert _scalable_targets("dogbreed-single-instance") == []
    (update,) = update_endpoint_in_moto
    assert "RetainAllVariantProperties" not in update
    config = sagemaker().describe_endpoint_config(EndpointConfigName=result["endpoint_config_name"])
    assert config["ProductionVariants"][0]["InstanceType"] == "ml.c5.xlarge"


def test_an_endpoint_that_is_still_updating_is_not_touched(aws, update_endpoint_in_moto):
    deploy = load_handler("deploy_endpoint")
    deploy.handler(deploy_event(model_package()), None)
    sagemaker_backend().endpoints["dogbreed-single-instance"].endpoint_status = "Updating"

    with pytest.raises(deploy.DeployError, match=r"dogbreed-single-instance is Updating .*wait until it is InService"):
        deploy.handler(deploy_event(model_package()), None)
    assert update_endpoint_in_moto == []


def test_an_endpoint_whose_rollback_failed_is_refused_with_what_to_do(aws, update_endpoint_in_moto):
    deploy = load_handler("deploy_endpoint")
    deploy.handler(deploy_event(model_package()), None)
    endpoint = sagemaker_backend().endpoints["dogbreed-single-instance"]
    endpoint.endpoint_status, endpoint.failure_reason = "UpdateRollbackFailed", "Rollback could not restore the old fleet."

    with pytest.raises(deploy.DeployError, match=r"is UpdateRollbackFailed \(Rollback could not restore the old fleet\.\) and will not recover") as failure:
        deploy.handler(deploy_event(model_package()), None)
    message = str(failure.value)
    assert "update it to a working endpoint config" in message and "or delete it, then run the step again" in message
    assert "wait until it is InService" not in message
    assert update_endpoint_in_moto == []


@pytest.mark.parametrize("status", ["PendingManualApproval", "Rejected"])
def test_a_package_that_is_not_approved_is_refused(aws, status):
    deploy = load_handler("deploy_endpoint")
    arn = model_package(status=status)

    with pytest.raises(deploy.DeployError, match=rf"approval status '{status}', not 'Approved'"):
        deploy.handler(deploy_event(arn), None)
    assert sagemaker().list_models()["Models"] == []
    assert sagemaker().list_endpoints()["Endpoints"] == []


def test_an_unknown_package_is_refused_with_its_arn(aws):
    deploy = load_handler("deploy_endpoint")
    arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/dogbreed-models/42"

    with pytest.raises(deploy.DeployError, match=r"cannot read model package .*dogbreed-models/42"):
        deploy.handler(deploy_event(arn), None)


@pytest.mark.parametrize("instance_type, workers", [("ml.m5.large", "2"), ("ml.c5.2xlarge", "8"), ("ml.g4dn.xlarge", "4")])
def test_the_model_gets_one_server_worker_per_threads_per_worker_vcpus(aws, instance_type, workers):
    deploy = load_handler("deploy_endpoint")
    arn = model_package()
    result = deploy.handler(deploy_event(arn, instance_type=instance_type, threads_per_worker=1), None)
    model = sagemaker().describe_model(ModelName=result["model_name"])
    assert model["Containers"] == [{"ModelPackageName": arn, "Environment": {
        "SAGEMAKER_MODEL_SERVER_WORKERS": workers, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}]
    other = deploy.handler(deploy_event(arn, instance_type=instance_type, threads_per_worker=2,
                                        endpoint_name="dogbreed-multi-instance"), None)
    # another serving environment is another model: the hash of what it serves differs
    assert other["model_name"].rsplit("-", 1)[1] != result["model_name"].rsplit("-", 1)[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"endpoint_name": None}, r"'endpoint_name' is missing"),
        ({"endpoint_name": "dog_breed"}, r"'endpoint_name' = 'dog_breed' is not 1 to 63 letters"),
        ({"endpoint_name": "x" * 64}, r"'endpoint_name'"),
        ({"initial_instance_count": "two"}, r"'initial_instance_count' must be an integer, got str 'two'"),
        ({"initial_instance_count": 0}, r"'initial_instance_count' = 0 is below the minimum 1"),
        ({"initial_instance_count": True}, r"'initial_instance_count' must be an integer, got a boolean"),
        ({"instance_type": "m5.large"}, r"'instance_type' = 'm5.large' is not a SageMaker instance type"),
        ({"model_role_arn": "dogbreed-sagemaker-model"}, r"'model_role_arn' .* is not an IAM role ARN"),
        ({"model_package_arn": 7}, r"'model_package_arn' must be a string, got int"),
        ({"model_package_arn": "arn:aws:sagemaker:us-east-1:123456789012:model/x"}, r"'model_package_arn' .* is not a SageMaker model package ARN"),
        ({"data_capture_s3_uri": "bucket/prefix"}, r"'data_capture_s3_uri' = 'bucket/prefix' is not an s3://"),
        ({"data_capture_percentage": "150"}, r"'data_capture_percentage' = 150 is above the maximum 100"),
        ({"threads_per_worker": -1}, r"'threads_per_worker' = -1 is below the minimum 0"),
        ({"deployment_strategy": "blue-green"}, r"'deployment_strategy' = 'blue-green' is not one of all-at-once, canary, linear"),
        ({"deployment_strategy": "linear", "initial_instance_count": 4, "deployment_step_percent": 5},
         r"'deployment_step_percent' = 5 is below the minimum 10"),
        ({"deployment_strategy": "canary", "initial_instance_count": 4, "deployment_step_percent": 60},
         r"'deployment_step_percent' = 60 is above the maximum 50"),
        ({"deployment_bake_seconds": 3601}, r"'deployment_bake_seconds' = 3601 is above the maximum 3600"),
        ({"deployment_strategy": "canary"}, r"'canary' moves traffic between instances of the new fleet: initial_instance_count must be at least 2, got 1"),
        ({"deployment_strategy": "linear", "initial_instance_count": 4, "deployment_step_percent": 10, "deployment_bake_seconds": 3600},
         r"'linear' with 10 bakes of 3600 s takes longer than SageMaker lets an update run \(28800 s"),
        ({"deployment_strategy": "linear", "initial_instance_count": 4, "deployment_bake_seconds": 900, "max_wait_minutes": 45},
         r"'linear' bakes 4 x 900 s = 60 minutes, more than max_wait_minutes=45 \(EndpointWaitMinutes\): the wait would give up first"),
    ],
)
def test_a_bad_event_names_the_field(aws, change, message):
    deploy = load_handler("deploy_endpoint")
    event = changed(deploy_event(f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/dogbreed-models/1"), change)

    with pytest.raises(deploy.EventError, match=message):
        deploy.handler(event, None)


def test_an_event_that_is_not_an_object_is_refused(aws):
    deploy = load_handler("deploy_endpoint")
    with pytest.raises(deploy.EventError, match="must be a JSON object, got list"):
        deploy.handler(["endpoint_name"], None)


def test_a_failure_reaches_the_step_as_one_message_and_one_log_line(aws, capsys):
    deploy = load_handler("deploy_endpoint")
    event = deploy_event(model_package(status="Rejected"))

    with pytest.raises(deploy.DeployError) as failure:
        deploy.handler(event, LambdaContext(request_id="req-9"))
    frames = traceback.extract_tb(failure.value.__traceback__)
    assert frames[-1].name == "handler"  # the frames below the handler stay out of the step's failure
    (line,) = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert line["status"] == "failed" and line["request_id"] == "req-9" and line["error_type"] == "DeployError"
    assert line["error"] == str(failure.value) and "traceback" not in line


def test_an_aws_refusal_fails_with_the_aws_error(aws, update_endpoint_in_moto):
    deploy = load_handler("deploy_endpoint")
    first = deploy.handler(deploy_event(model_package()), None)
    _register_scaling("dogbreed-single-instance")
    sagemaker().delete_endpoint_config(EndpointConfigName=first["endpoint_config_name"])

    with pytest.raises(deploy.AwsCallFailed, match=r"^ValidationException: Could not find endpoint configuration"):
        deploy.handler(deploy_event(model_package()), None)
    assert update_endpoint_in_moto == []


def update_request_problems(update: dict) -> list[str]:
    """What botocore's UpdateEndpoint input shape refuses in ``update``: its validator (required members, types)
    and the limits in the shape's metadata (ranges, enums, lengths)."""
    from botocore.validate import ParamValidator

    from pipeline.constraints import Walk, check_value, input_member

    shape = input_member("sagemaker", "UpdateEndpoint")
    report = ParamValidator().validate(update, shape)
    walk = Walk("UpdateEndpoint", {})
    check_value(walk, update, shape, "")
    return ([report.generate_report()] if report.has_errors() else []) + [str(finding) for finding in walk.findings]


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "step", "bake", "routing", "timeout"), [
    ("all-at-once", 25, 120, {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 120}, 3600),
    ("canary", 20, 600, {"Type": "CANARY", "WaitIntervalInSeconds": 600, "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 20}}, 3600),
    ("linear", 25, 900, {"Type": "LINEAR", "WaitIntervalInSeconds": 900, "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 25}},
     4 * 900 + 1800),
])
def test_each_strategy_sends_an_update_endpoint_request_of_botocores_shape(aws, update_endpoint_in_moto, strategy, step, bake, routing, timeout):
    deploy = load_handler("deploy_endpoint")
    traffic = {"deployment_strategy": strategy, "deployment_step_percent": step, "deployment_bake_seconds": str(bake), "max_wait_minutes": 90}
    first = deploy.handler(deploy_event(model_package(), initial_instance_count=4, **traffic), None)
    assert first["action"] == "created"  # a new endpoint has no traffic to shift
    result = deploy.handler(deploy_event(model_package(), initial_instance_count=4, **traffic), None)

    assert result["action"] == "updated"
    (update,) = update_endpoint_in_moto
    assert update_request_problems(update) == []
    policy = update["DeploymentConfig"]["BlueGreenUpdatePolicy"]
    assert policy == {"TrafficRoutingConfiguration": routing, "TerminationWaitInSeconds": 0, "MaximumExecutionTimeoutInSeconds": timeout}
    assert update["DeploymentConfig"]["AutoRollbackConfiguration"] == {"Alarms": [{"AlarmName": "dogbreed-single-instance-5xx-errors"}]}


def test_the_default_strategy_sends_the_same_update_as_before_strategies_existed(aws, update_endpoint_in_moto):
    deploy = load_handler("deploy_endpoint")
    deploy.handler(deploy_event(model_package()), None)
    deploy.handler(deploy_event(model_package(), deployment_strategy="all-at-once", deployment_step_percent=25,
                                deployment_bake_seconds=120), None)
    deploy.handler(deploy_event(model_package()), None)

    explicit, implicit = update_endpoint_in_moto
    assert explicit == {**implicit, "EndpointConfigName": explicit["EndpointConfigName"]}
    assert implicit["DeploymentConfig"]["BlueGreenUpdatePolicy"] == {
        "TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 120},
        "TerminationWaitInSeconds": 0, "MaximumExecutionTimeoutInSeconds": 3600}


def test_the_deployment_parameters_are_what_the_deploy_function_takes():
    """The pipeline's deployment parameters and the function's event fields are written on both sides of the
    shipping boundary: their values, defaults and ranges must agree."""
    from pipeline.settings import Settings
    from steps.parameters import PARAMETER_RANGES, define_parameters

    deploy = load_handler("deploy_endpoint")
    parameters = define_parameters(Settings(), "s3://bucket/code.tar.gz")
    assert parameters.deployment_strategy.enum_values == list(deploy.STRATEGIES)
    defaults = {"deployment_strategy": parameters.deployment_strategy.default_value,
                "deployment_step_percent": parameters.deployment_step_percent.default_value,
                "deployment_bake_seconds": parameters.deployment_bake_seconds.default_value}
    assert deploy.parse_traffic(defaults, 1) == deploy.TrafficShift()  # the defaults are today's all-at-once update
    assert PARAMETER_RANGES["DeploymentStepPercent"][:2] == deploy.STEP_PERCENT_RANGE
    assert PARAMETER_RANGES["DeploymentBakeSeconds"][:2] == (0, deploy.MAX_BAKE_SECONDS)

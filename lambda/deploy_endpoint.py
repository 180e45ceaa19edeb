"""Deploy an approved model package to a real-time endpoint (the Deploy... LambdaSteps).

Creates a SageMaker model from the package, with the model server's environment for the
instance type (``serving_environment``: TorchServe workers and each worker's threads), and
an endpoint config, both named
after a hash of what they serve (image, model data URL, environment, role,
instance settings; not the package version), then creates the endpoint or
switches it to the new config with a blue/green update. It returns at once:
waiting for the endpoint is the WaitFor... callback step's job, because an
endpoint can take longer to come up than a LambdaStep may run. Running it
again for a package version that serves the same artifacts changes nothing.

An update shifts traffic as ``deployment_strategy`` says (SageMaker's
deployment guardrails): all at once, a canary of ``deployment_step_percent``
of the new fleet, or linear steps of that size, each followed by a bake of
``deployment_bake_seconds`` while the rollback alarms watch the new fleet. The
endpoint stays Updating through the bakes, so the WaitFor... step waits them out.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from events import (
    SCALABLE_DIMENSION,
    VARIANT_NAME,
    WAITING_STATUSES,
    AwsCallFailed,
    EventError,
    annotate,
    client,
    error_code,
    error_message,
    is_not_found,
    log,
    read_bool,
    read_int,
    read_name,
    read_str,
    read_str_list,
    request_handler,
    scaling_resource_id,
)

HASH_LENGTH = 10
MAX_NAME_LENGTH = 63
BUSY_STATUSES = (*WAITING_STATUSES, "Deleting")
STACK_ALARM_PATTERN = "{endpoint_name}-5xx-errors"  # the alarms infra/template.yaml creates for both endpoints
# Blue/green: shift traffic to the new fleet, keeping the old one while the rollback
# alarms watch the new one, so an alarm can switch traffic back.
STRATEGIES = {"all-at-once": "ALL_AT_ONCE", "canary": "CANARY", "linear": "LINEAR"}
DEFAULT_BAKE_SECONDS = 120
MAX_BAKE_SECONDS = 3600  # TrafficRoutingConfig.WaitIntervalInSeconds
DEFAULT_STEP_PERCENT = 25
STEP_PERCENT_RANGE = (10, 50)  # LinearStepSize: 10-50% of the new fleet; CanarySize: at most 50%
MAX_UPDATE_SECONDS = 3600  # the update's time limit unless its bakes need more
PROVISIONING_SECONDS = 1800  # left, beyond the bakes, for the new fleet to come up
MAX_EXECUTION_SECONDS = 28800  # BlueGreenUpdatePolicy.MaximumExecutionTimeoutInSeconds
# Instance families with local NVMe instance storage. SageMaker encrypts that storage in
# hardware and rejects an endpoint config's KmsKeyId for them, so it is left out there.
LOCAL_STORAGE_FAMILIES = frozenset({
    "c5d", "m5d", "r5d",
    "g4dn", "g5", "g6", "g6e",
    "p3dn", "p4d", "p4de", "p5",
})

# Sizes of SageMaker instance types by vCPUs (ml.<family>.<size>): medium and large have 2, xlarge 4, Nxlarge 4N.
SIZE_VCPUS = {"medium": 2, "large": 2, "xlarge": 4}
NXLARGE = re.compile(r"^([0-9]+)xlarge$")

MODEL_PACKAGE_ARN = re.compile(r"^arn:aws[a-z-]*:sagemaker:[a-z0-9-]+:[0-9]{12}:model-package/[a-zA-Z0-9/-]+$")
ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[\w+=,.@/-]+$")
INSTANCE_TYPE = re.compile(r"^ml\.[a-z0-9]+\.[a-z0-9]+$")
S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")


class DeployError(RuntimeError):
    """The deployment cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class TrafficShift:
    """How an update moves traffic to the new fleet: a key of STRATEGIES, the step size, the bake after each step."""

    strategy: str = "all-at-once"
    step_percent: int = DEFAULT_STEP_PERCENT
    bake_seconds: int = DEFAULT_BAKE_SECONDS

    @property
    def bakes(self) -> int:
        """Bakes in one update: one after all traffic, the canary's and the final one, one per linear step."""
        return {"all-at-once": 1, "canary": 2}.get(self.strategy) or math.ceil(100 / self.step_percent)

    @property
    def shifting_seconds(self) -> int:
        return self.bakes * self.bake_seconds


@dataclass(frozen=True)
class DeployRequest:
    model_package_arn: str
    endpoint_name: str
    instance_type: str
    initial_instance_count: int
    model_role_arn: str
    data_capture_s3_uri: str
    data_capture_percentage: int
    kms_key_id: str
    rollback_alarm_names: tuple[str, ...]
    allow_update_without_rollback: bool = False
    threads_per_worker: int = 0  # 0: the model server's own defaults
    traffic: TrafficShift = TrafficShift()


def parse_event(event: Mapping[str, Any]) -> DeployRequest:
    """The deploy request in ``event``; raises EventError naming the first bad field."""
    endpoint_name = read_name(event, "endpoint_name")
    alarms = read_str_list(event, "rollback_alarm_names") or default_rollback_alarms(endpoint_name)
    instance_count = read_int(event, "initial_instance_count", minimum=1, maximum=100)
    return DeployRequest(
        model_package_arn=read_str(event, "model_package_arn", pattern=MODEL_PACKAGE_ARN, hint="a SageMaker model package ARN (arn:aws:sagemaker:<region>:<account>:model-package/<group>/<version>)"),
        endpoint_name=endpoint_name,
        instance_type=read_str(event, "instance_type", pattern=INSTANCE_TYPE, hint="a SageMaker instance type such as ml.m5.large"),
        initial_instance_count=instance_count,
        model_role_arn=read_str(event, "model_role_arn", pattern=ROLE_ARN, hint="an IAM role ARN (arn:aws:iam::<account>:role/<name>)"),
        data_capture_s3_uri=read_str(event, "data_capture_s3_uri", default="", pattern=S3_URI, hint="an s3://bucket/prefix URI, or empty to turn capture off", allow_empty=True),
        data_capture_percentage=read_int(event, "data_capture_percentage", default=100, minimum=1, maximum=100),
        kms_key_id=read_str(event, "kms_key_id", default="", allow_empty=True),
        rollback_alarm_names=alarms,
        allow_update_without_rollback=read_bool(event, "allow_update_without_rollback", default=False),
        threads_per_worker=read_int(event, "threads_per_worker", default=0, minimum=0, maximum=64),
        traffic=parse_traffic(event, instance_count),
    )


def instance_vcpus(instance_type: str) -> int | None:
    """vCPUs of ``ml.<family>.<size>`` from its size (None for a size outside the rule, e.g. metal)."""
    size = instance_type.rsplit(".", 1)[-1]
    nxlarge = NXLARGE.match(size)
    return 4 * int(nxlarge.group(1)) if nxlarge else SIZE_VCPUS.get(size)


def serving_environment(request: DeployRequest) -> dict[str, str]:
    """The model server's workers and their threads: one TorchServe worker per ``threads_per_worker`` vCPUs,
    each with that many intra-op threads (see benchmarks/README.md "Serving under load"); none when not asked for."""
    vcpus = instance_vcpus(request.instance_type)
    if not request.threads_per_worker or vcpus is None:
        return {}
    threads = str(request.threads_per_worker)
    return {"SAGEMAKER_MODEL_SERVER_WORKERS": str(max(1, vcpus // request.threads_per_worker)),
            "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def parse_traffic(event: Mapping[str, Any], instance_count: int) -> TrafficShift:
    """The traffic shift of the event; refuses one SageMaker would refuse, or one the wait would give up on."""
    strategy = read_str(event, "deployment_strategy", default="all-at-once").lower()
    if strategy not in STRATEGIES:
        raise EventError(f"event field 'deployment_strategy' = {strategy!r} is not one of {', '.join(STRATEGIES)}")
    shift = TrafficShift(
        strategy=strategy,
        step_percent=read_int(event, "deployment_step_percent", default=DEFAULT_STEP_PERCENT,
                              minimum=STEP_PERCENT_RANGE[0], maximum=STEP_PERCENT_RANGE[1]),
        bake_seconds=read_int(event, "deployment_bake_seconds", default=DEFAULT_BAKE_SECONDS, minimum=0, maximum=MAX_BAKE_SECONDS),
    )
    if strategy != "all-at-once" and instance_count < 2:
        raise EventError(f"deployment_strategy {strategy!r} moves traffic between instances of the new fleet: "
                         f"initial_instance_count must be at least 2, got {instance_count} (or deploy all-at-once)")
    if shift.shifting_seconds + PROVISIONING_SECONDS > MAX_EXECUTION_SECONDS:
        raise EventError(f"deployment_strategy {strategy!r} with {shift.bakes} bakes of {shift.bake_seconds} s takes longer than "
                         f"SageMaker lets an update run ({MAX_EXECUTION_SECONDS} s with {PROVISIONING_SECONDS} s to start "
                         "the fleet): take larger steps or shorter bakes")
    wait_minutes = read_int(event, "max_wait_minutes", default=0, minimum=0)
    if wait_minutes and shift.shifting_seconds > wait_minutes * 60:
        raise EventError(f"deployment_strategy {strategy!r} bakes {shift.bakes} x {shift.bake_seconds} s = "
                         f"{shift.shifting_seconds / 60:.0f} minutes, more than max_wait_minutes={wait_minutes} "
                         "(EndpointWaitMinutes): the wait would give up first; wait longer or bake shorter")
    return shift


def default_rollback_alarms(endpoint_name: str) -> tuple[str, ...]:
    """Alarm names from ROLLBACK_ALARM_NAME_PATTERN (e.g. ``{endpoint_name}-5xx-errors``); none when unset."""
    pattern = os.environ.get("ROLLBACK_ALARM_NAME_PATTERN", "").strip()
    if not pattern:
        return ()
    return tuple(name.strip() for name in pattern.format(endpoint_name=endpoint_name).split(",") if name.strip())


@dataclass(frozen=True)
class RollbackPlan:
    alarms: tuple[str, ...]
    skipped_because: str = ""  # set only when the event allowed an update without automatic rollback


def rollback_problem(cloudwatch: Any, names: tuple[str, ...]) -> str:
    """Why ``names`` cannot guard a blue/green update ('' when every alarm exists and can be read)."""
    try:
        answer = cloudwatch.describe_alarms(AlarmNames=list(names), AlarmTypes=["MetricAlarm", "CompositeAlarm"])
    except Exception as error:  # botocore ClientError (AccessDenied, throttled) or no connection
        code = error_code(error) or error.__class__.__name__
        return (f"cannot read the rollback alarm(s) {', '.join(names)} ({code}: {error_message(error)}): "
                "the deploy function's role needs cloudwatch:DescribeAlarms on them")
    found = {alarm.get("AlarmName") for alarm in [*answer.get("MetricAlarms", []), *answer.get("CompositeAlarms", [])]}
    missing = [name for name in names if name not in found]
    if missing:
        return (f"the rollback alarm(s) {', '.join(missing)} do not exist: deploy infra/template.yaml "
                f"(it creates {STACK_ALARM_PATTERN}) or name existing alarms in rollback_alarm_names")
    return ""


def rollback_plan(request: DeployRequest) -> RollbackPlan:
    """The alarms that guard the update: those of the event or the environment, else the stack's alarm.

    An update never loses its automatic rollback silently: when the alarms
    cannot be read or do not exist, the deploy fails saying which and why,
    unless the event sets allow_update_without_rollback, and then the output
    says that the update had no rollback.
    """
    names = request.rollback_alarm_names or (STACK_ALARM_PATTERN.format(endpoint_name=request.endpoint_name),)
    problem = rollback_problem(client("cloudwatch"), names)
    if not problem:
        return RollbackPlan(names)
    if not request.allow_update_without_rollback:
        raise DeployError(f"{problem}; or set \"allow_update_without_rollback\": true in the event to update without automatic rollback")
    log(event="update-without-rollback", reason=problem)
    return RollbackPlan((), f"none: {problem}")


def content_name(prefix: str, content: Mapping[str, Any]) -> str:
    """``prefix-<hash of content>``, cut to SageMaker's 63-character limit; equal content, equal name."""
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:HASH_LENGTH]
    head = prefix[: MAX_NAME_LENGTH - HASH_LENGTH - 1].rstrip("-")
    return f"{head}-{digest}"


def served_content(request: DeployRequest, package: Mapping[str, Any]) -> dict[str, Any]:
    """What the model serves: the package's images, model data URLs and environments, and the role.

    The package ARN is not part of it: each pipeline execution registers a new
    version, and a version that serves the same artifacts must not redeploy.
    """
    containers = (package.get("InferenceSpecification") or {}).get("Containers") or []
    return {
        "ExecutionRoleArn": request.model_role_arn,
        "Containers": [{key: container.get(key) for key in ("Image", "ImageDigest", "ModelDataUrl", "Environment")}
                       for container in containers],
        "ServingEnvironment": serving_environment(request),
    }


def model_spec(request: DeployRequest, package: Mapping[str, Any]) -> dict[str, Any]:
    """CreateModel arguments, ModelName included: named by what it serves, created from the package."""
    container: dict[str, Any] = {"ModelPackageName": request.model_package_arn}
    environment = serving_environment(request)
    if environment:
        container["Environment"] = environment  # added to the package's own
    return {
        "ModelName": content_name(request.endpoint_name, served_content(request, package)),
        "ExecutionRoleArn": request.model_role_arn,
        "Containers": [container],
    }


def endpoint_config_spec(request: DeployRequest, model_name: str) -> dict[str, Any]:
    """CreateEndpointConfig arguments, EndpointConfigName included."""
    content: dict[str, Any] = {
        "ProductionVariants": [
            {
                "VariantName": VARIANT_NAME,
                "ModelName": model_name,
                "InstanceType": request.instance_type,
                "InitialInstanceCount": request.initial_instance_count,
                "InitialVariantWeight": 1.0,
            }
        ],
    }
    if request.data_capture_s3_uri:
        capture: dict[str, Any] = {
            "EnableCapture": True,
            "InitialSamplingPercentage": request.data_capture_percentage,
            "DestinationS3Uri": request.data_capture_s3_uri,
            "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
        }
        if request.kms_key_id:
            capture["KmsKeyId"] = request.kms_key_id
        content["DataCaptureConfig"] = capture
    if request.kms_key_id and has_local_storage(request.instance_type):
        log(event="kms-key-left-out", instance_type=request.instance_type,
            reason="SageMaker refuses KmsKeyId for instance types with local NVMe storage, which is encrypted in hardware")
    elif request.kms_key_id:
        content["KmsKeyId"] = request.kms_key_id
    return {"EndpointConfigName": content_name(request.endpoint_name, content), **content}


def has_local_storage(instance_type: str) -> bool:
    """Whether ``ml.<family>.<size>`` has local NVMe instance storage (see LOCAL_STORAGE_FAMILIES)."""
    return instance_type.split(".")[1] in LOCAL_STORAGE_FAMILIES


def traffic_routing(shift: TrafficShift, alarmed: bool) -> dict[str, Any]:
    """TrafficRoutingConfiguration: all at once with no bake unless alarms watch it; a canary or linear steps
    of ``step_percent`` of the new fleet's capacity, each followed by the bake."""
    if shift.strategy == "all-at-once":
        return {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": shift.bake_seconds if alarmed else 0}
    size = {"Type": "CAPACITY_PERCENT", "Value": shift.step_percent}
    key = "CanarySize" if shift.strategy == "canary" else "LinearStepSize"
    return {"Type": STRATEGIES[shift.strategy], "WaitIntervalInSeconds": shift.bake_seconds, key: size}


def deployment_config(alarm_names: tuple[str, ...], shift: TrafficShift) -> dict[str, Any]:
    """Blue/green update settings; with alarms, traffic returns to the old fleet when one fires while baking."""
    config: dict[str, Any] = {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": traffic_routing(shift, bool(alarm_names)),
            "TerminationWaitInSeconds": 0,
            "MaximumExecutionTimeoutInSeconds": max(MAX_UPDATE_SECONDS, shift.shifting_seconds + PROVISIONING_SECONDS),
        }
    }
    if alarm_names:
        config["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": name} for name in alarm_names]}
    return config


def approved_package(sagemaker: Any, arn: str) -> Mapping[str, Any]:
    """The model package description; refuses a package that is not Approved."""
    try:
        package = sagemaker.describe_model_package(ModelPackageName=arn)
    except Exception as error:  # botocore ClientError: not found, no access, throttled
        raise DeployError(f"cannot read model package {arn}: {error_message(error)}") from None
    status = package.get("ModelApprovalStatus", "")
    if status != "Approved":
        raise DeployError(
            f"model package {arn} has approval status {status or 'unset'!r}, not 'Approved': "
            "approve it in the model registry (or run the pipeline with ModelApprovalStatus=Approved) and deploy again"
        )
    return package


def _exists(describe: Any, **name: str) -> bool:
    try:
        describe(**name)
    except Exception as error:
        if is_not_found(error):
            return False
        raise
    return True


def ensure_created(describe: Any, create: Any, spec: Mapping[str, Any], name_key: str) -> bool:
    """Create the named resource unless it exists; True when this call created it."""
    name = spec[name_key]
    if _exists(describe, **{name_key: name}):
        return False
    try:
        create(**spec)
    except Exception as error:
        if "already exist" in error_message(error).lower():  # created by a concurrent run with the same content
            return False
        raise
    return True


def describe_endpoint_or_none(sagemaker: Any, name: str) -> Mapping[str, Any] | None:
    try:
        return sagemaker.describe_endpoint(EndpointName=name)
    except Exception as error:
        if is_not_found(error):
            return None
        raise


def current_instance_type(sagemaker: Any, endpoint: Mapping[str, Any]) -> str:
    config = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    for variant in config.get("ProductionVariants", []):
        if variant.get("VariantName") == VARIANT_NAME:
            return str(variant.get("InstanceType", ""))
    return ""


def release_autoscaling(autoscaling: Any, endpoint_name: str) -> None:
    """Remove the variant's scaling policies and scalable target.

    SageMaker refuses an update that changes the instance type of a variant
    registered for auto scaling; the Check... step registers it again.
    """
    resource_id = scaling_resource_id(endpoint_name)
    policies = autoscaling.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource_id, ScalableDimension=SCALABLE_DIMENSION)
    for policy in policies.get("ScalingPolicies", []):
        autoscaling.delete_scaling_policy(
            PolicyName=policy["PolicyName"], ServiceNamespace="sagemaker", ResourceId=resource_id, ScalableDimension=SCALABLE_DIMENSION
        )
    autoscaling.deregister_scalable_target(ServiceNamespace="sagemaker", ResourceId=resource_id, ScalableDimension=SCALABLE_DIMENSION)


def update_arguments(request: DeployRequest, config_name: str, keep_instance_count: bool, alarms: tuple[str, ...]) -> dict[str, Any]:
    """UpdateEndpoint arguments; an auto-scaled fleet keeps its current instance count."""
    arguments: dict[str, Any] = {
        "EndpointName": request.endpoint_name,
        "EndpointConfigName": config_name,
        "DeploymentConfig": deployment_config(alarms, request.traffic),
    }
    if keep_instance_count:
        arguments["RetainAllVariantProperties"] = True
        arguments["ExcludeRetainedVariantProperties"] = [
            {"VariantPropertyType": "DesiredWeight"},
            {"VariantPropertyType": "DataCaptureConfig"},
        ]
    return arguments


def is_autoscaled(autoscaling: Any, endpoint_name: str) -> bool:
    """Whether the variant is registered for auto scaling (its instance count is then the scaler's)."""
    targets = autoscaling.describe_scalable_targets(
        ServiceNamespace="sagemaker", ResourceIds=[scaling_resource_id(endpoint_name)], ScalableDimension=SCALABLE_DIMENSION
    )
    return bool(targets.get("ScalableTargets"))


def create_or_update_endpoint(request: DeployRequest, config_name: str) -> tuple[str, str]:
    """Point the endpoint at ``config_name``; returns 'created', 'updated' or 'unchanged', and what an update skipped."""
    sagemaker = client("sagemaker")
    endpoint = describe_endpoint_or_none(sagemaker, request.endpoint_name)
    if endpoint is None:
        try:
            sagemaker.create_endpoint(EndpointName=request.endpoint_name, EndpointConfigName=config_name)
            return "created", ""
        except Exception as error:
            if "already exist" not in error_message(error).lower():
                raise
            endpoint = sagemaker.describe_endpoint(EndpointName=request.endpoint_name)
    if endpoint["EndpointConfigName"] == config_name:
        return "unchanged", ""
    status = endpoint.get("EndpointStatus", "")
    if status in BUSY_STATUSES:
        raise DeployError(
            f"endpoint {request.endpoint_name} is {status} (config {endpoint['EndpointConfigName']}); "
            "wait until it is InService and run the step again"
        )
    if status == "Failed":
        raise DeployError(
            f"endpoint {request.endpoint_name} is Failed ({endpoint.get('FailureReason', 'no reason given')}) and cannot be updated; "
            "delete it and run the step again to create it afresh"
        )
    if status == "UpdateRollbackFailed":  # stays so until someone acts: SageMaker does not retry the rollback
        raise DeployError(
            f"endpoint {request.endpoint_name} is UpdateRollbackFailed ({endpoint.get('FailureReason', 'no reason given')}) "
            "and will not recover on its own: update it to a working endpoint config (aws sagemaker update-endpoint "
            "--endpoint-name ... --endpoint-config-name ...) or delete it, then run the step again"
        )
    rollback = rollback_plan(request)
    autoscaling = client("application-autoscaling")
    autoscaled = is_autoscaled(autoscaling, request.endpoint_name)
    if autoscaled and current_instance_type(sagemaker, endpoint) != request.instance_type:
        release_autoscaling(autoscaling, request.endpoint_name)
        autoscaled = False
    sagemaker.update_endpoint(**update_arguments(request, config_name, autoscaled, rollback.alarms))
    return "updated", rollback.skipped_because


def deploy(request: DeployRequest) -> dict[str, str]:
    """Create what is missing and point the endpoint at it; returns the names used and the action taken."""
    sagemaker = client("sagemaker")
    package = approved_package(sagemaker, request.model_package_arn)
    model = model_spec(request, package)
    ensure_created(sagemaker.describe_model, sagemaker.create_model, model, "ModelName")
    config = endpoint_config_spec(request, model["ModelName"])
    ensure_created(sagemaker.describe_endpoint_config, sagemaker.create_endpoint_config, config, "EndpointConfigName")
    action, rollback_skipped = create_or_update_endpoint(request, config["EndpointConfigName"])
    result = {
        "endpoint_name": request.endpoint_name,
        "endpoint_config_name": config["EndpointConfigName"],
        "model_name": model["ModelName"],
        "action": action,
    }
    if rollback_skipped:
        result["rollback"] = rollback_skipped
    return result


@request_handler("deploy-endpoint", expected=(EventError, DeployError))
def handler(event: Mapping[str, Any], context: Any) -> dict[str, str]:
    result = deploy(parse_event(event))
    annotate(**result)
    return result


__all__ = ["handler", "parse_event", "AwsCallFailed", "DeployError", "EventError"]

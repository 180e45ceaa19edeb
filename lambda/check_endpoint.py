"""Check a deployed endpoint and turn on its auto scaling (the Check... LambdaSteps).

Runs after the WaitFor... callback step (lambda/wait_endpoint.py), which waits
for InService with no time limit of its own; here the status is only re-read,
waiting at most ``wait_seconds`` within this invocation's time budget for a
status that lags, and the config must be the one just deployed. It registers its variant with Application Auto Scaling (target
tracking on invocations per instance); then classifies the sample image
shipped beside this file and checks the answer. Any failed check raises
CheckFailed, whose message names the check: SageMaker shows it as the
step's failure reason.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from events import (
    SCALABLE_DIMENSION,
    VARIANT_NAME,
    WAITING_STATUSES,
    EventError,
    annotate,
    client,
    env_int,
    error_code,
    error_message,
    is_not_found,
    read_float,
    read_int,
    read_name,
    request_handler,
    scaling_resource_id,
)

SAMPLE_IMAGE = Path(__file__).resolve().with_name("sample.jpg")
SAMPLE_CONTENT_TYPE = "image/jpeg"
DEFAULT_BUDGET_SECONDS = 120.0  # when there is no Lambda context (a local run)
LAMBDA_STEP_LIMIT_SECONDS = 600.0  # a pipeline LambdaStep fails after 10 minutes, whatever the function's timeout
RESERVED_SECONDS = 30.0  # kept back from waiting for the scaling calls and the test invocation
DEFAULT_POLL_SECONDS = 15.0
DEFAULT_NUM_CLASSES = 133
PROBABILITY_TOLERANCE = 1e-3  # float32 softmax over 133 classes, rounded by JSON
SCALE_IN_COOLDOWN_SECONDS = 300
SCALE_OUT_COOLDOWN_SECONDS = 60


class CheckFailed(RuntimeError):
    """One check did not pass; the message starts with the check's name."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"{check} check failed: {detail}")
        self.check = check


@dataclass(frozen=True)
class CheckRequest:
    endpoint_name: str
    min_capacity: int
    max_capacity: int
    target_invocations_per_instance: float
    wait_seconds: float | None
    poll_seconds: float
    endpoint_config_name: str
    num_classes: int


def parse_event(event: Mapping[str, Any]) -> CheckRequest:
    """The check request in ``event``; raises EventError naming the first bad field.

    ``min_capacity`` and ``max_capacity`` default to the function's MIN_CAPACITY
    and MAX_CAPACITY environment (the stack's auto-scaling bounds).
    """
    endpoint_name = read_name(event, "endpoint_name")
    min_capacity = read_int(event, "min_capacity", default=env_int("MIN_CAPACITY", 1), minimum=1)
    max_capacity = read_int(event, "max_capacity", default=env_int("MAX_CAPACITY", 5), minimum=1)
    if max_capacity < min_capacity:
        raise EventError(f"event field 'max_capacity' = {max_capacity} is below 'min_capacity' = {min_capacity}")
    target = read_float(event, "target_invocations_per_instance")
    if target <= 0:
        raise EventError(f"event field 'target_invocations_per_instance' = {target} must be above 0")
    wait = event.get("wait_seconds") if isinstance(event, Mapping) else None
    return CheckRequest(
        endpoint_name=endpoint_name,
        min_capacity=min_capacity,
        max_capacity=max_capacity,
        target_invocations_per_instance=target,
        wait_seconds=None if wait in (None, "") else read_float(event, "wait_seconds", minimum=0),
        poll_seconds=read_float(event, "poll_seconds", default=DEFAULT_POLL_SECONDS, minimum=0.01, maximum=300),
        endpoint_config_name=read_name(event, "endpoint_config_name", default="", allow_empty=True),
        num_classes=read_int(event, "num_classes", default=env_int("NUM_CLASSES", DEFAULT_NUM_CLASSES), minimum=2),
    )


def wait_budget_seconds(context: Any, wait_seconds: float | None) -> float:
    """How long this invocation may wait for InService and still answer before Lambda or the LambdaStep gives up."""
    if context is not None and hasattr(context, "get_remaining_time_in_millis"):
        remaining = min(context.get_remaining_time_in_millis() / 1000.0, LAMBDA_STEP_LIMIT_SECONDS)
    else:
        remaining = DEFAULT_BUDGET_SECONDS
    budget = max(0.0, remaining - RESERVED_SECONDS)
    return budget if wait_seconds is None else min(budget, wait_seconds)


def in_service_endpoint(sagemaker: Any, request: CheckRequest, budget_seconds: float) -> Mapping[str, Any]:
    """The endpoint's description once it is InService; CheckFailed if it fails or the budget runs out."""
    started = time.monotonic()
    while True:
        try:
            endpoint = sagemaker.describe_endpoint(EndpointName=request.endpoint_name)
        except Exception as error:
            if is_not_found(error):
                raise CheckFailed("endpoint status", f"endpoint {request.endpoint_name} does not exist; run the Deploy step first") from None
            raise CheckFailed("endpoint status", f"cannot describe endpoint {request.endpoint_name}: {error_message(error)}") from None
        status = endpoint.get("EndpointStatus", "")
        if status == "InService":
            return endpoint
        if status not in WAITING_STATUSES:
            reason = endpoint.get("FailureReason") or "no reason given"
            raise CheckFailed("endpoint status", f"endpoint {request.endpoint_name} is {status}: {reason}")
        waited = time.monotonic() - started
        if waited >= budget_seconds:
            raise CheckFailed(
                "endpoint status",
                f"endpoint {request.endpoint_name} is still {status} after {waited:.0f} s, all this step may wait "
                f"(a pipeline LambdaStep stops after {LAMBDA_STEP_LIMIT_SECONDS / 60:.0f} minutes); SageMaker goes on with the endpoint: "
                "once it is InService, retry the pipeline execution (Retry on the failed execution in SageMaker Studio)",
            )
        time.sleep(min(request.poll_seconds, max(0.0, budget_seconds - waited)))


def check_config(endpoint: Mapping[str, Any], expected: str) -> None:
    """A rolled-back update leaves the endpoint InService on its old config: that is a failure."""
    actual = endpoint.get("EndpointConfigName", "")
    if expected and actual != expected:
        raise CheckFailed(
            "endpoint config",
            f"endpoint {endpoint.get('EndpointName')} serves config {actual}, not the deployed {expected}: "
            "the update was rolled back or replaced; see the endpoint's events",
        )


def configure_autoscaling(autoscaling: Any, request: CheckRequest, variant_name: str) -> str:
    """Register the variant and put its target-tracking policy (both calls replace what exists); returns the policy name."""
    resource_id = scaling_resource_id(request.endpoint_name, variant_name)
    policy_name = f"{request.endpoint_name}-invocations-per-instance"
    try:
        autoscaling.register_scalable_target(
            ServiceNamespace="sagemaker",
            ResourceId=resource_id,
            ScalableDimension=SCALABLE_DIMENSION,
            MinCapacity=request.min_capacity,
            MaxCapacity=request.max_capacity,
        )
        autoscaling.put_scaling_policy(
            PolicyName=policy_name,
            ServiceNamespace="sagemaker",
            ResourceId=resource_id,
            ScalableDimension=SCALABLE_DIMENSION,
            PolicyType="TargetTrackingScaling",
            TargetTrackingScalingPolicyConfiguration={
                "TargetValue": request.target_invocations_per_instance,
                "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                "ScaleInCooldown": SCALE_IN_COOLDOWN_SECONDS,
                "ScaleOutCooldown": SCALE_OUT_COOLDOWN_SECONDS,
            },
        )
    except Exception as error:
        raise CheckFailed("auto scaling", f"cannot configure auto scaling for {resource_id}: {error_message(error)}") from None
    return policy_name


def sample_invocation(num_classes: int) -> dict[str, Any]:
    """InvokeEndpoint arguments that ask for the whole distribution and the logits.

    code/inference.py reads ``top_k`` and ``return_logits`` from the
    CustomAttributes header and cuts top_k to the model's class count, so
    asking for one more than expected reveals a model with more classes.
    """
    return {
        "ContentType": SAMPLE_CONTENT_TYPE,
        "Accept": "application/json",
        "CustomAttributes": f"top_k={num_classes + 1};return_logits=true",
        "Body": SAMPLE_IMAGE.read_bytes(),
    }


def invoke_sample(runtime: Any, request: CheckRequest) -> tuple[str, bytes, float]:
    """Content type, body and latency in milliseconds of classifying the sample image."""
    started = time.perf_counter()
    try:
        response = runtime.invoke_endpoint(EndpointName=request.endpoint_name, **sample_invocation(request.num_classes))
        body = response["Body"].read()
    except Exception as error:
        code = error_code(error) or error.__class__.__name__
        raise CheckFailed("invocation", f"endpoint {request.endpoint_name} did not classify the sample image: {code}: {error_message(error)}") from None
    latency_ms = (time.perf_counter() - started) * 1000
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 200)
    if status != 200:
        raise CheckFailed("status", f"endpoint {request.endpoint_name} answered HTTP {status}")
    return str(response.get("ContentType", "")), body, latency_ms


def validated_top_label(content_type: str, body: bytes, num_classes: int) -> str:
    """The most probable label, once the answer has the shape and numbers a classifier must give.

    Expected: ``{"predictions": [{"top_k": [{"label", "index", "probability"}, ...], "logits": [...]}]}``
    with every class ranked, as code/inference.py answers the request of sample_invocation.
    """
    if not content_type.lower().startswith("application/json"):
        raise CheckFailed("content type", f"expected application/json, got {content_type or '(none)'!r}")
    try:
        answer = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckFailed("response format", f"the body is not JSON: {error}") from None
    predictions = answer.get("predictions") if isinstance(answer, dict) else None
    if not isinstance(predictions, list) or len(predictions) != 1 or not isinstance(predictions[0], dict):
        raise CheckFailed("response format", "expected {'predictions': [{'top_k': [...]}]} with one entry for the one image sent")
    ranked = predictions[0].get("top_k")
    if not isinstance(ranked, list) or not ranked:
        raise CheckFailed("response format", "predictions[0].top_k is missing or empty")
    labels, probabilities = ranked_labels(ranked)
    logits = predictions[0].get("logits")
    if logits is not None:
        check_logits(logits, ranked, num_classes)
    if len(ranked) != num_classes:
        raise CheckFailed("class count", f"the answer ranks {len(ranked)} classes, expected {num_classes}")
    total = math.fsum(probabilities)
    if abs(total - 1.0) > PROBABILITY_TOLERANCE:
        raise CheckFailed("probabilities", f"the probabilities sum to {total:.6f}, not 1")
    return labels[0]


def ranked_labels(ranked: list[Any]) -> tuple[list[str], list[float]]:
    labels, probabilities = [], []
    for position, item in enumerate(ranked):
        if not isinstance(item, dict) or not isinstance(item.get("label"), str) or not item["label"]:
            raise CheckFailed("response format", f"predictions[0].top_k[{position}] has no label")
        probability = item.get("probability")
        if not _is_number(probability):
            raise CheckFailed("probabilities", f"top_k[{position}] has probability {probability!r}, not a number")
        if not 0.0 <= probability <= 1.0:
            raise CheckFailed("probabilities", f"top_k[{position}] has probability {probability}, outside [0, 1]")
        labels.append(item["label"])
        probabilities.append(float(probability))
    if len(set(labels)) != len(labels):
        raise CheckFailed("response format", "a label appears twice in top_k")
    if any(later > earlier for earlier, later in zip(probabilities, probabilities[1:])):
        raise CheckFailed("probabilities", "top_k is not sorted by falling probability")
    return labels, probabilities


def check_logits(logits: Any, ranked: list[dict[str, Any]], num_classes: int) -> None:
    """One logit per class, and the best class's probability is their softmax."""
    if not isinstance(logits, list) or not all(_is_number(value) for value in logits):
        raise CheckFailed("response format", "predictions[0].logits is not a list of numbers")
    if len(logits) != num_classes:
        raise CheckFailed("class count", f"the model has {len(logits)} outputs (logits), expected {num_classes}")
    best = ranked[0]
    index = best.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(logits):
        raise CheckFailed("response format", f"top_k[0] has index {index!r}, not a class index below {len(logits)}")
    peak = max(logits)
    softmax = math.exp(logits[index] - peak) / math.fsum(math.exp(value - peak) for value in logits)
    if abs(softmax - best["probability"]) > PROBABILITY_TOLERANCE:
        raise CheckFailed("probabilities", f"top_k[0] has probability {best['probability']:.6f}, but the softmax of the logits gives {softmax:.6f}")


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check(request: CheckRequest, context: Any) -> tuple[dict[str, str], str]:
    """The check's result and the name of the scaling policy it put."""
    endpoint = in_service_endpoint(client("sagemaker"), request, wait_budget_seconds(context, request.wait_seconds))
    check_config(endpoint, request.endpoint_config_name)
    variants = endpoint.get("ProductionVariants") or [{}]
    policy_name = configure_autoscaling(client("application-autoscaling"), request, variants[0].get("VariantName", VARIANT_NAME))
    content_type, body, latency_ms = invoke_sample(client("sagemaker-runtime"), request)
    result = {
        "endpoint_name": request.endpoint_name,
        "status": endpoint["EndpointStatus"],
        "top_label": validated_top_label(content_type, body, request.num_classes),
        "latency_ms": f"{latency_ms:.1f}",  # the LambdaStep declares every output a String
    }
    return result, policy_name


@request_handler("check-endpoint", expected=(EventError, CheckFailed))
def handler(event: Mapping[str, Any], context: Any) -> dict[str, str]:
    result, policy_name = check(parse_event(event), context)
    outputs = {name: value for name, value in result.items() if name != "latency_ms"}
    annotate(scaling_policy=policy_name, sample_latency_ms=result.get("latency_ms"), **outputs)
    return result

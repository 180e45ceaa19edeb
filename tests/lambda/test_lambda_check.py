"""lambda/check_endpoint.py against moto: waiting within the budget, auto scaling, checking the answer."""
from __future__ import annotations

import io
import json
import math
import random
import threading
import time

import boto3
import pytest
from PIL import Image

from lambda_harness import ACCOUNT, LAMBDA_DIR, REGION, LambdaContext, changed, endpoint_answers, load_handler, model_package, sagemaker_backend

ENDPOINT = "dogbreed-single-instance"
RESOURCE_ID = f"endpoint/{ENDPOINT}/variant/AllTraffic"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"


@pytest.fixture
def aws(aws_taking_images):
    """moto in this process; what the runtime was sent, one record per invocation."""
    return aws_taking_images


def class_names(count: int) -> list[str]:
    return [f"{index + 1:03d}.Breed_{index}" for index in range(count)]


def random_logits(count: int = 133, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(0, 2) for _ in range(count)]


def distribution(count: int = 133, seed: int = 0, logits: list[float] | None = None) -> list[dict]:
    """A softmax over ``count`` classes, ranked as a classifier endpoint ranks it."""
    logits = logits or random_logits(count, seed)
    top = max(logits)
    weights = [math.exp(value - top) for value in logits]
    total = sum(weights)
    ranked = sorted(range(len(logits)), key=lambda index: -weights[index])
    names = class_names(len(logits))
    return [{"label": names[index], "index": index, "probability": weights[index] / total} for index in ranked]


def answer(count: int = 133, seed: int = 0) -> dict:
    """What the endpoint answers for one image asked with all classes and the logits."""
    logits = random_logits(count, seed)
    return {"predictions": [{"top_k": distribution(logits=logits), "logits": logits}]}


def deployed_endpoint() -> dict:
    deploy = load_handler("deploy_endpoint")
    return deploy.handler(
        {
            "model_package_arn": model_package(),
            "endpoint_name": ENDPOINT,
            "instance_type": "ml.m5.large",
            "initial_instance_count": 1,
            "model_role_arn": f"arn:aws:iam::{ACCOUNT}:role/dogbreed-sagemaker-model",
            "data_capture_s3_uri": "",
            "kms_key_id": "",
        },
        None,
    )


def check_event(**overrides) -> dict:
    event = {"endpoint_name": ENDPOINT, "min_capacity": 1, "max_capacity": 5, "target_invocations_per_instance": 70.0, "poll_seconds": 0.05}
    event.update(overrides)
    return event


def scaling_state() -> tuple[list, list]:
    autoscaling = boto3.client("application-autoscaling", region_name=REGION)
    targets = autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[RESOURCE_ID])["ScalableTargets"]
    policies = autoscaling.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=RESOURCE_ID)["ScalingPolicies"]
    return targets, policies


def test_a_healthy_endpoint_passes_and_gets_auto_scaling(aws):
    deployed = deployed_endpoint()
    check = load_handler("check_endpoint")
    expected = answer()
    endpoint_answers(expected)

    result = check.handler(check_event(endpoint_config_name=deployed["endpoint_config_name"]), LambdaContext(120))

    assert result["endpoint_name"] == ENDPOINT
    assert result["status"] == "InService"
    assert result["top_label"] == expected["predictions"][0]["top_k"][0]["label"]
    assert all(isinstance(value, str) for value in result.values())  # the LambdaStep's outputs are Strings
    assert float(result["latency_ms"]) >= 0
    (target,) , (policy,) = scaling_state()
    assert (target["MinCapacity"], target["MaxCapacity"], target["ScalableDimension"]) == (1, 5, DIMENSION)
    assert policy["PolicyType"] == "TargetTrackingScaling"
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["TargetValue"] == 70.0
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"


@pytest.mark.slow
def test_the_endpoint_receives_the_real_sample_image_and_is_asked_for_every_class(aws):
    deployed_endpoint()
    check = load_handler("check_endpoint")
    endpoint_answers(answer())
    check.handler(check_event(), None)

    (sent,) = aws
    assert (sent["endpoint"], sent["content_type"], sent["accept"]) == (ENDPOINT, "image/jpeg", "application/json")
    assert sent["custom_attributes"] == "top_k=134;return_logits=true"
    assert sent["body"] == (LAMBDA_DIR / "sample.jpg").read_bytes()
    with Image.open(io.BytesIO(sent["body"])) as image:
        image.load()
        assert image.format == "JPEG" and image.mode == "RGB" and min(image.size) >= 32


def test_the_check_accepts_what_the_inference_script_answers(aws):
    """The endpoint side of the contract: code/inference.py's own request handling, on a real (untrained) network."""
    import torch

    import common
    import inference

    deployed_endpoint()
    check = load_handler("check_endpoint")
    classes = class_names(133)
    torch.manual_seed(0)
    model = inference.Classifier(common.build_model("resnet18", len(classes)).eval(), classes, {"backbone": "resnet18", "image_size": 64}, torch.device("cpu"), common.eval_transform(64))
    arguments = check.sample_invocation(len(classes))
    options = dict(pair.split("=", 1) for pair in arguments["CustomAttributes"].split(";"))
    status, body, content_type = inference.handle(arguments["Body"], arguments["ContentType"], arguments["Accept"], options, model)
    assert status == 200, body
    endpoint_answers(body.decode(), content_type)

    result = check.handler(check_event(), None)

    assert result["top_label"] == json.loads(body)["predictions"][0]["top_k"][0]["label"]


def test_a_second_check_replaces_the_scaling_settings_instead_of_adding(aws):
    deployed_endpoint()
    check = load_handler("check_endpoint")
    endpoint_answers(answer(seed=1))
    check.handler(check_event(), None)
    endpoint_answers(answer(seed=2))
    check.handler(check_event(min_capacity="2", max_capacity="4", target_invocations_per_instance="120.5"), None)

    (target,), (policy,) = scaling_state()
    assert (target["MinCapacity"], target["MaxCapacity"]) == (2, 4)
    assert policy["TargetTrackingScalingPolicyConfiguration"]["TargetValue"] == 120.5


def test_capacity_defaults_come_from_the_function_environment(aws, monkeypatch):
    monkeypatch.setenv("MIN_CAPACITY", "2")
    monkeypatch.setenv("MAX_CAPACITY", "3")
    deployed_endpoint()
    check = load_handler("check_endpoint")
    endpoint_answers(answer())
    event = check_event()
    del event["min_capacity"], event["max_capacity"]
    check.handler(event, None)

    (target,), _ = scaling_state()
    assert (target["MinCapacity"], target["MaxCapacity"]) == (2, 3)


def test_the_check_waits_for_an_endpoint_that_comes_up(aws):
    deployed_endpoint()
    backend_endpoint = sagemaker_backend().endpoints[ENDPOINT]
    backend_endpoint.endpoint_status = "Creating"
    check = load_handler("check_endpoint")
    endpoint_answers(answer())
    timer = threading.Timer(0.3, lambda: setattr(backend_endpoint, "endpoint_status", "InService"))
    timer.start()
    try:
        started = time.monotonic()
        result = check.handler(check_event(), LambdaContext(check.RESERVED_SECONDS + 10))
    finally:
        timer.cancel()
    assert result["status"] == "InService"
    assert time.monotonic() - started >= 0.3


@pytest.mark.slow
def test_an_endpoint_still_creating_fails_before_the_lambda_timeout(aws):
    deployed_endpoint()
    sagemaker_backend().endpoints[ENDPOINT].endpoint_status = "Creating"
    check = load_handler("check_endpoint")
    context = LambdaContext(check.RESERVED_SECONDS + 0.5)

    started = time.monotonic()
    with pytest.raises(check.CheckFailed, match=r"^endpoint status check failed: endpoint dogbreed-single-instance is still Creating after") as failure:
        check.handler(check_event(), context)
    message = str(failure.value)
    assert "stops after 10 minutes" in message and "once it is InService, retry the pipeline execution" in message
    assert "timeout" not in message  # a longer function timeout cannot help: the LambdaStep's limit is fixed
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 3
    assert context.get_remaining_time_in_millis() > (check.RESERVED_SECONDS - 3) * 1000
    assert scaling_state() == ([], [])


def test_the_wait_fits_the_lambda_step_limit_and_the_function_timeout():
    check = load_handler("check_endpoint")
    reserve = check.RESERVED_SECONDS
    assert check.wait_budget_seconds(LambdaContext(900), None) == pytest.approx(600 - reserve, abs=0.1)  # the LambdaStep's 10 minutes
    assert check.wait_budget_seconds(LambdaContext(200), None) == pytest.approx(200 - reserve, abs=0.1)
    assert check.wait_budget_seconds(LambdaContext(200), 45.0) == 45.0
    assert check.wait_budget_seconds(LambdaContext(10), None) == 0.0
    assert check.wait_budget_seconds(None, None) == check.DEFAULT_BUDGET_SECONDS - reserve


def test_wait_seconds_caps_the_wait(aws):
    deployed_endpoint()
    sagemaker_backend().endpoints[ENDPOINT].endpoint_status = "Updating"
    check = load_handler("check_endpoint")

    started = time.monotonic()
    with pytest.raises(check.CheckFailed, match="still Updating"):
        check.handler(check_event(wait_seconds="0.2"), LambdaContext(600))
    assert time.monotonic() - started < 2


def test_a_failed_endpoint_fails_with_its_reason(aws):
    deployed_endpoint()
    endpoint = sagemaker_backend().endpoints[ENDPOINT]
    endpoint.endpoint_status, endpoint.failure_reason = "Failed", "The primary container did not pass the ping health check."
    check = load_handler("check_endpoint")

    with pytest.raises(check.CheckFailed, match=r"endpoint status check failed: .* is Failed: The primary container did not pass"):
        check.handler(check_event(), None)


def test_a_missing_endpoint_fails_clearly(aws, capsys):
    check = load_handler("check_endpoint")
    with pytest.raises(check.CheckFailed, match=r"endpoint dogbreed-single-instance does not exist; run the Deploy step first") as failure:
        check.handler(check_event(), None)
    (line,) = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert (line["status"], line["error_type"], line["error"]) == ("failed", "CheckFailed", str(failure.value))


def test_a_rolled_back_update_fails_the_config_check(aws):
    deployed_endpoint()
    check = load_handler("check_endpoint")
    with pytest.raises(check.CheckFailed, match=r"^endpoint config check failed: .* not the deployed dogbreed-single-instance-0123456789"):
        check.handler(check_event(endpoint_config_name="dogbreed-single-instance-0123456789"), None)


def _reorder(items: list[dict]) -> list[dict]:
    return [items[1], items[0], *items[2:]]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        ({"predictions": [{"top_k": distribution()}]}, "text/plain", r"^content type check failed: expected application/json, got 'text/plain'"),
        ("<html>error</html>", "application/json", r"^response format check failed: the body is not JSON"),
        ({"predictions": [{"top_k": distribution()}] * 2}, "application/json", r"^response format check failed: .*one entry for the one image"),
        ({"predictions": [{"labels": []}]}, "application/json", r"^response format check failed: predictions\[0\]\.top_k is missing"),
        ({"predictions": [{"top_k": distribution(count=10)}]}, "application/json", r"^class count check failed: the answer ranks 10 classes, expected 133"),
        ({"predictions": [{"top_k": distribution(), "logits": random_logits(134)}]}, "application/json", r"^class count check failed: the model has 134 outputs \(logits\), expected 133"),
        ({"predictions": [{"top_k": distribution(seed=3), "logits": random_logits(seed=4)}]}, "application/json", r"^probabilities check failed: top_k\[0\] has probability .* but the softmax of the logits gives"),
        ({"predictions": [{"top_k": distribution(), "logits": "none"}]}, "application/json", r"^response format check failed: predictions\[0\]\.logits is not a list of numbers"),
        ({"predictions": [{"top_k": distribution()[:-1] + [{"label": "133.Extra", "probability": 0.2}]}]}, "application/json", r"^probabilities check failed"),
        ({"predictions": [{"top_k": _reorder(distribution())}]}, "application/json", r"^probabilities check failed: top_k is not sorted"),
        ({"predictions": [{"top_k": [{"label": "001.A", "probability": 1.5}] + distribution()[1:]}]}, "application/json", r"^probabilities check failed: top_k\[0\] has probability 1.5, outside \[0, 1\]"),
        ({"predictions": [{"top_k": [dict(item, probability=item["probability"] * 0.9) for item in distribution()]}]}, "application/json", r"^probabilities check failed: the probabilities sum to 0.9"),
        ({"predictions": [{"top_k": [{"probability": 0.5}]}]}, "application/json", r"^response format check failed: predictions\[0\]\.top_k\[0\] has no label"),
    ],
    ids=["content-type", "not-json", "two-entries", "no-top-k", "class-count", "logit-count", "logits-disagree", "logits-not-numbers", "extra-mass", "unsorted", "above-one", "sum-short", "no-label"],
)
def test_a_wrong_answer_fails_the_named_check(aws, body, content_type, message):
    deployed_endpoint()
    check = load_handler("check_endpoint")
    endpoint_answers(body, content_type)

    with pytest.raises(check.CheckFailed, match=message):
        check.handler(check_event(), None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"endpoint_name": None}, r"'endpoint_name' is missing"),
        ({"min_capacity": "one"}, r"'min_capacity' must be an integer, got str 'one'"),
        ({"min_capacity": 0}, r"'min_capacity' = 0 is below the minimum 1"),
        ({"min_capacity": 4, "max_capacity": 2}, r"'max_capacity' = 2 is below 'min_capacity' = 4"),
        ({"target_invocations_per_instance": 0}, r"'target_invocations_per_instance' = 0.0 must be above 0"),
        ({"target_invocations_per_instance": "fast"}, r"'target_invocations_per_instance' must be a number, got 'fast'"),
        ({"target_invocations_per_instance": None}, r"'target_invocations_per_instance' is missing"),
        ({"wait_seconds": -1}, r"'wait_seconds' = -1.0 is below the minimum 0"),
    ],
)
def test_a_bad_event_names_the_field(aws, change, message):
    check = load_handler("check_endpoint")
    event = changed(check_event(), change)
    with pytest.raises(check.EventError, match=message):
        check.handler(event, None)

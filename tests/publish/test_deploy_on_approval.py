"""Deploy on approval, against moto: ``dogbreed approve`` of a waiting version, the registry's state-change event,
infra/template.yaml's approval rule (its pattern matched by moto's EventBridge matcher, its target's dynamic paths
read from the event), and the deploy-only pipeline's steps as synth built them: ChooseEndpoint evaluated and the
chosen Deploy step's arguments resolved by local-run's resolver, then given to lambda/deploy_endpoint.py.
A second approval changes nothing: ``approve`` leaves an Approved version alone, and the same event delivered
again deploys nothing new.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import boto3
import pytest

from lambda_harness import ACCOUNT, REGION, LambdaContext, load_handler
from pipeline.aws import Clients, Target
from pipeline.dag import steps_of
from pipeline.definition import synth
from pipeline.local.conditions import evaluate_all
from pipeline.local.references import Resolver, Scope
from pipeline.publish.approve import approve_package
from pipeline.publish.executions import pipeline_parameters
from pipeline.settings import Settings
from test_infra import ROOT, Resolver as TemplateResolver, load_template

pytestmark = pytest.mark.slow

pytest.importorskip("moto")
GROUP = "dogbreed-models"
MODEL_DATA = "s3://bucket/executions/abc/TrainMultiInstance/output/model.tar.gz"


@pytest.fixture
def registry(aws, monkeypatch):  # noqa: F811
    """moto, whose UpdateModelPackage keeps a package's CustomerMetadataProperties as SageMaker does.

    SageMaker changes them only as told (CustomerMetadataProperties to add or change, ...ToRemove to remove, per
    the API reference); moto 5.2.5 replaces them with what the request has, nothing when it has none."""
    from moto.sagemaker.models import SageMakerModelBackend

    update = SageMakerModelBackend.update_model_package

    def keeping_metadata(self, **request):
        arn = request["model_package_arn"]
        package = self.model_packages.get(self.model_package_name_mapping.get(arn, arn))
        kept = {**((package.customer_metadata_properties or {}) if package else {}),
                **(request["customer_metadata_properties"] or {})}
        return update(self, **{**request, "customer_metadata_properties": kept or None})

    monkeypatch.setattr(SageMakerModelBackend, "update_model_package", keeping_metadata)


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(region=REGION, account=ACCOUNT, source_dir=ROOT)


@pytest.fixture(scope="module")
def deploy_definition(settings) -> dict:
    return synth(settings).deploy_document


@pytest.fixture(scope="module")
def rule() -> dict:
    template = load_template()
    stack = TemplateResolver(template).resources()
    return stack["DeployOnApprovalRule"]["Properties"]


def registered(status: str, variant: str = "MultiInstance") -> str:
    """A version registered as the Register step registers it: with the deployment metadata it records."""
    sagemaker = boto3.client("sagemaker", region_name=REGION)
    try:
        sagemaker.create_model_package_group(ModelPackageGroupName=GROUP)
    except sagemaker.exceptions.ClientError:
        pass  # made by an earlier package of the same test
    return sagemaker.create_model_package(
        ModelPackageGroupName=GROUP, ModelApprovalStatus=status,
        InferenceSpecification={
            "Containers": [{"Image": f"763104351884.dkr.ecr.{REGION}.amazonaws.com/pytorch-inference:2.6-cpu-py312",
                            "ModelDataUrl": MODEL_DATA}],
            "SupportedContentTypes": ["image/jpeg"], "SupportedResponseMIMETypes": ["application/json"]},
        CustomerMetadataProperties={"Variant": variant, "EndpointName": f"dogbreed-{variant[:5].lower()}-instance",
                                    "ClassCount": "133", "RegisteredApprovalStatus": status},
    )["ModelPackageArn"]


def state_change_event(package_arn: str) -> dict[str, Any]:
    """The registry's event for the package as it is now, shaped as SageMaker's documented example (the detail is
    the described package)."""
    package = boto3.client("sagemaker", region_name=REGION).describe_model_package(ModelPackageName=package_arn)
    package.pop("ResponseMetadata", None)
    detail = json.loads(json.dumps(package, default=lambda value: value.isoformat() if isinstance(value, datetime) else str(value)))
    return {"version": "0", "id": "844e2571-85d4-695f-b930-0153b71dcb42", "detail-type": "SageMaker Model Package State Change",
            "source": "aws.sagemaker", "account": ACCOUNT, "time": "2026-12-08T01:00:00Z", "region": REGION,
            "resources": [package_arn], "detail": detail}


def matches(rule: dict, event: dict) -> bool:
    """Whether the rule's pattern matches ``event``, by moto's EventBridge matcher (the one its rules deliver with;
    moto 5.2.5's TestEventPattern operation is not implemented)."""
    from moto.events.models import EventPattern

    return EventPattern.load(json.dumps(rule["EventPattern"])).matches_event(event)


def dynamic_path(event: dict, path: str) -> str:
    """What EventBridge puts in a target parameter whose whole value is a JSON path into the event."""
    assert path.startswith("$."), path
    value: Any = event
    for key in path[2:].split("."):
        value = value[key]
    return str(value)


def started_parameters(rule: dict, event: dict, definition: dict) -> dict[str, Any]:
    """The deploy pipeline's parameter values for the rule's target, checked as ``dogbreed start`` checks them."""
    pairs = [f"{item['Name']}={dynamic_path(event, item['Value'])}"
             for item in rule["Targets"][0]["SageMakerPipelineParameters"]["PipelineParameterList"]]
    values = {item["Name"]: item.get("DefaultValue") for item in definition["Parameters"]}
    values.update({item["Name"]: item["Value"] for item in pipeline_parameters(pairs, definition)})
    values["ClassCount"] = int(values["ClassCount"])
    return values


def deploy_step_event(definition: dict, parameters: dict[str, Any]) -> tuple[str, dict]:
    """ChooseEndpoint's branch for these parameters, and its Deploy step's resolved arguments (the function's event)."""
    scope = Scope(parameters=parameters, execution={})
    choice = next(step for step in definition["Steps"] if step["Name"] == "ChooseEndpoint")
    outcome, _ = evaluate_all(choice["Arguments"]["Conditions"], Resolver(scope, "ChooseEndpoint").resolve)
    branch = choice["Arguments"]["IfSteps" if outcome else "ElseSteps"]
    deploy = next(step for step in branch if step["Name"].startswith("Deploy"))
    return deploy["Name"], Resolver(scope, deploy["Name"]).resolve(deploy["Arguments"])


def test_the_rule_gives_every_parameter_the_deploy_pipeline_has_no_default_for(rule, deploy_definition):
    required = {item["Name"] for item in deploy_definition["Parameters"] if "DefaultValue" not in item}
    given = {item["Name"] for item in rule["Targets"][0]["SageMakerPipelineParameters"]["PipelineParameterList"]}
    assert required == given == {"ModelPackageArn", "Variant", "ClassCount"}
    assert set(steps_of(deploy_definition)) == {"ChooseEndpoint", *(f"{verb}{variant}" for verb in ("Deploy", "WaitFor", "Check")
                                                                     for variant in ("SingleInstance", "MultiInstance"))}


def test_approving_a_waiting_version_deploys_it_once(registry, settings, rule, deploy_definition):
    package = registered("PendingManualApproval")
    assert not matches(rule, state_change_event(package))  # registered and waiting: nothing to deploy

    said = approve_package(Clients(Target(REGION)), settings, package.rsplit("/", 1)[-1])
    assert said == (f"model package {package}: PendingManualApproval -> Approved; the registry's state-change event "
                    "starts pipeline dogbreed-deploy, which deploys it")
    event = state_change_event(package)
    assert matches(rule, event)
    parameters = started_parameters(rule, event, deploy_definition)
    assert (parameters["ModelPackageArn"], parameters["Variant"], parameters["ClassCount"]) == (package, "MultiInstance", 133)

    step, function_event = deploy_step_event(deploy_definition, parameters)
    assert step == "DeployMultiInstance" and function_event["model_package_arn"] == package
    deploy = load_handler("deploy_endpoint")
    first = deploy.handler(function_event, LambdaContext())
    assert first["action"] == "created" and first["endpoint_name"] == "dogbreed-multi-instance"
    endpoint = boto3.client("sagemaker", region_name=REGION).describe_endpoint(EndpointName="dogbreed-multi-instance")
    assert endpoint["EndpointConfigName"] == first["endpoint_config_name"]

    assert approve_package(Clients(Target(REGION)), settings, package) == \
        f"model package {package} is already Approved: nothing changed"
    again = deploy.handler(deploy_step_event(deploy_definition, started_parameters(rule, state_change_event(package),
                                                                                   deploy_definition))[1], LambdaContext())
    assert again["action"] == "unchanged" and again["endpoint_config_name"] == first["endpoint_config_name"]


def test_rejections_and_versions_registered_approved_start_nothing(registry, settings, rule):
    approved_at_registration = registered("Approved", variant="SingleInstance")
    assert not matches(rule, state_change_event(approved_at_registration))  # the pipeline deploys it itself
    waiting = registered("PendingManualApproval")
    boto3.client("sagemaker", region_name=REGION).update_model_package(ModelPackageArn=waiting, ModelApprovalStatus="Rejected")
    assert not matches(rule, state_change_event(waiting))
    other = state_change_event(registered("PendingManualApproval"))
    other["detail"].update(ModelPackageGroupName="someone-elses-models", ModelApprovalStatus="Approved")
    assert not matches(rule, other)

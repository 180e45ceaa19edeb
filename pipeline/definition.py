"""Assemble the DAG and render its JSON definition: settings + source tree -> definition.

Synth is a pure function: no AWS call, no clock, no randomness. The SDK gets a
session with static, unusable credentials and a fixed configuration (telemetry
off, no user defaults files), and every S3 location it would otherwise derive
from the default bucket or a timestamp is given explicitly.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Iterator

from steps import environment, filter_sdk_warnings, offline_default_session  # imports the SDK without touching the network

from sagemaker.core import image_uris
from sagemaker.core.config.config_manager import SageMakerConfig
from sagemaker.core.workflow.pipeline_context import PipelineSession
from sagemaker.core.workflow.pipeline_definition_config import PipelineDefinitionConfig
from sagemaker.mlops.workflow.condition_step import ConditionStep
from sagemaker.mlops.workflow.pipeline import Pipeline
from sagemaker.mlops.workflow.steps import ProcessingStep

from pipeline.assets import Assets, build_assets
from pipeline.dag import render
from pipeline.settings import Settings
from pipeline.validate import validate_definition
from steps.check import check_step
from steps.context import BuildContext
from steps.deploy import deploy_step
from steps.endpoint_choice import define_deploy_parameters, endpoint_choice_step
from steps.evaluate import evaluate_step
from steps.fail import accuracy_too_low_after_twin_step, accuracy_too_low_step
from steps.features import extract_features_step
from steps.gate import accuracy_gate_step, approval_gate_step, twin_accuracy_step, twin_deployment_step
from steps.parameters import define_parameters
from steps.prepare import class_count, prepare_data_step
from steps.register import register_step
from steps.train import train_step
from steps.tune import tune_step
from steps.variants import MULTI, SINGLE, VARIANTS, Variant, twin_of
from steps.wait import wait_step

SDK_CONFIG = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}


@dataclass(frozen=True)
class Synth:
    """A definition as the text that is published and its document, parsed once; treat both as read-only. The
    deploy-only pipeline's definition comes with it (empty where a caller built only the main one)."""
    definition: str  # pretty-printed JSON with sorted keys
    document: dict
    assets: Assets
    deploy_definition: str = ""
    deploy_document: dict = field(default_factory=dict)


def load_contract(source_dir: Path) -> ModuleType:
    """code/contract.py, the names the container scripts and the definition share."""
    path = source_dir / "code" / "contract.py"
    spec = importlib.util.spec_from_file_location("dogbreed_code_contract", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the definition takes metric names and file names from it")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def _config_validated_once() -> Iterator[None]:
    """The SDK validates its configuration against a large JSON schema on every lookup
    (``sagemaker/core/common_utils.py``, ``get_sagemaker_config_value``:
    ``SageMakerConfig().validate_sagemaker_config(config_to_check)``; about 0.17 s each, some ninety lookups
    per synth, nine tenths of its time). Ours is fixed: it is validated here, once, and inside the block a
    lookup of an equal configuration skips the schema; any other configuration is still validated."""
    validate = SageMakerConfig.validate_sagemaker_config
    validate(SDK_CONFIG)

    def validated_once(sagemaker_config: dict | None = None) -> None:
        if sagemaker_config != SDK_CONFIG:
            validate(sagemaker_config)

    SageMakerConfig.validate_sagemaker_config = staticmethod(validated_once)
    try:
        yield
    finally:
        SageMakerConfig.validate_sagemaker_config = staticmethod(validate)


@contextmanager
def offline_sdk(settings: Settings) -> Iterator[PipelineSession]:
    """A PipelineSession that cannot reach AWS, installed as boto3's default while the SDK builds
    (some SDK objects create clients from the default session), with the SDK's documented switches set:

    - ``SAGEMAKER_VALIDATE_ROLE=false``: ModelTrainer resolves its role through
      ``sagemaker/core/helper/iam_role_resolver.py``, which calls IAM unless
      ``os.getenv("SAGEMAKER_VALIDATE_ROLE", "true")`` is false;
    - ``AWS_EC2_METADATA_DISABLED=true``: no credential lookup asks the EC2 metadata service;
    - ``AWS_DEFAULT_REGION``, the settings' region: ProcessingStep's constructor builds a
      ``LocalSagemakerClient()`` only to read a method name (``sagemaker/mlops/workflow/steps.py``,
      ``ProcessingStep.__init__``), whose ``LocalSession`` opens a fresh ``boto3.Session()`` and refuses
      to start without a region (``sagemaker/core/local/local_session.py``, ``_initialize``).
    """
    sdk_logger = logging.getLogger("sagemaker")
    previous_level = sdk_logger.level
    sdk_logger.setLevel(logging.ERROR)  # the SDK narrates what it leaves out of a pipeline definition
    try:
        with environment("SAGEMAKER_VALIDATE_ROLE", "false"), environment("AWS_EC2_METADATA_DISABLED", "true"), \
                environment("AWS_DEFAULT_REGION", settings.region), offline_default_session(settings.region) as boto_session, _config_validated_once(), \
                warnings.catch_warnings():
            filter_sdk_warnings()
            yield PipelineSession(boto_session=boto_session, default_bucket=settings.bucket, sagemaker_config=SDK_CONFIG)
    finally:
        sdk_logger.setLevel(previous_level)


def framework_image(settings: Settings, scope: str, instance_type: str) -> str:
    version = settings.training_framework_version if scope == "training" else settings.inference_framework_version
    return image_uris.retrieve(
        "pytorch", region=settings.region, version=version, py_version=settings.python_version,
        instance_type=instance_type, image_scope=scope,
    )


def build_context(settings: Settings, assets: Assets, session: PipelineSession, contract: ModuleType | None = None) -> BuildContext:
    """What the step factories of both pipelines receive.

    ``contract`` is code/contract.py as ``load_contract`` returns it; loaded from the settings' source dir if not given."""
    return BuildContext(
        settings=settings,
        session=session,
        parameters=define_parameters(settings, no_weights_uri=assets.code.s3_uri),
        code_uri=assets.code.s3_uri,
        contract=contract or load_contract(settings.source_dir),
        training_image=framework_image(settings, "training", settings.training_instance_type),
        inference_image=framework_image(settings, "inference", settings.endpoint_instance_type),
    )


def get_pipeline(settings: Settings, assets: Assets, session: PipelineSession, contract: ModuleType | None = None) -> Pipeline:
    """The whole DAG, with one function per step and the twins built by calling it twice (``contract``: see build_context)."""
    ctx = build_context(settings, assets, session, contract)
    prepare = prepare_data_step(ctx)
    extraction = extract_features_step(ctx, prepare)
    tuning = tune_step(ctx, prepare, extraction)
    trainings = {variant: train_step(ctx, variant, prepare, tuning) for variant in VARIANTS}
    evaluations = {variant: evaluate_step(ctx, variant, prepare, trainings[variant]) for variant in VARIANTS}
    gates = [gated_branch(ctx, variant, prepare, evaluations) for variant in VARIANTS]
    return Pipeline(
        name=settings.pipeline_name,
        parameters=ctx.parameters.as_list(),
        steps=[prepare, extraction, tuning, *trainings.values(), *evaluations.values(), *gates],
        sagemaker_session=session,
        pipeline_definition_config=PipelineDefinitionConfig(use_custom_job_prefix=False),
        pipeline_experiment_config=None,  # no experiment per execution: nothing reads it, and the role need not create them
    )


def gated_branch(ctx: BuildContext, variant: Variant, prepare: ProcessingStep,
                 evaluations: dict[Variant, ProcessingStep]) -> ConditionStep:
    """One model's gate and all that follows it: register, deploy, wait, check; the twin rule of steps/gate.py
    decides where a model below the threshold fails the execution."""
    twin = twin_of(variant)
    evaluation, twin_evaluation = evaluations[variant], evaluations[twin]
    register = register_step(ctx, variant, evaluation, prepare)
    deploy = deploy_step(ctx, variant, register.properties.ModelPackageArn)
    wait = wait_step(ctx, variant, deploy)
    check = check_step(ctx, variant, wait, class_count(ctx, prepare))
    report_twin = twin_accuracy_step(ctx, variant, twin, twin_evaluation, after=check,
                                     else_steps=[accuracy_too_low_after_twin_step(ctx, twin, twin_evaluation, deployed=variant)])
    approval = approval_gate_step(ctx, variant, if_steps=[deploy, wait, check, report_twin])
    hold = twin_deployment_step(ctx, variant, twin, twin_evaluation,
                                else_steps=[accuracy_too_low_step(ctx, variant, evaluation, twin, twin_evaluation)])
    return accuracy_gate_step(ctx, variant, evaluation, if_steps=[register, approval], else_steps=[hold])


def get_deploy_pipeline(settings: Settings, assets: Assets, session: PipelineSession,
                        contract: ModuleType | None = None) -> Pipeline:
    """``<project>-deploy``: the pipeline's own Deploy -> WaitFor -> Check steps for a model package approved after
    registration, the twin's chain chosen by the package's Variant (``steps/endpoint_choice.py``)."""
    ctx = build_context(settings, assets, session, contract)
    deploy_parameters = define_deploy_parameters()
    chains = {}
    for variant in VARIANTS:
        deploy = deploy_step(ctx, variant, deploy_parameters.model_package_arn)
        wait = wait_step(ctx, variant, deploy)
        chains[variant] = [deploy, wait, check_step(ctx, variant, wait, deploy_parameters.class_count)]
    params = ctx.parameters
    return Pipeline(
        name=settings.deploy_pipeline_name,
        parameters=[*deploy_parameters.as_list(), params.endpoint_instance_type, params.endpoint_initial_instance_count,
                    params.endpoint_min_capacity, params.endpoint_max_capacity, params.endpoint_target_invocations,
                    params.data_capture_s3_uri, params.endpoint_wait_minutes, params.deployment_strategy,
                    params.deployment_step_percent, params.deployment_bake_seconds],
        steps=[endpoint_choice_step(deploy_parameters, chains[SINGLE], chains[MULTI])],
        sagemaker_session=session,
        pipeline_definition_config=PipelineDefinitionConfig(use_custom_job_prefix=False),
        pipeline_experiment_config=None,
    )


def without_empty_mlflow_config(document: dict) -> dict:
    """The definition without the ``"MlflowConfig": null`` that v3's Pipeline writes when no MLflow server is
    configured (``sagemaker/mlops/workflow/pipeline.py``, ``definition``: ``"MlflowConfig":
    _convert_mlflow_config_to_request(self.mlflow_config)``): the pipeline uses none, and the definition keeps
    the form it had, which the project's schema and the service's pipeline definition format both take."""
    if "MlflowConfig" in document and document["MlflowConfig"] is None:
        del document["MlflowConfig"]
    return document


def synth(settings: Settings, contract: ModuleType | None = None) -> Synth:
    """Both pipeline definitions and the assets they refer to, built offline and checked (``contract``: see build_context)."""
    assets = build_assets(settings)
    contract = contract or load_contract(settings.source_dir)
    with offline_sdk(settings) as session:
        document = without_empty_mlflow_config(json.loads(get_pipeline(settings, assets, session, contract).definition()))
        deploy_document = without_empty_mlflow_config(
            json.loads(get_deploy_pipeline(settings, assets, session, contract).definition()))
    validate_definition(document)
    validate_definition(deploy_document)
    return Synth(definition=render(document), document=document, assets=assets,
                 deploy_definition=render(deploy_document), deploy_document=deploy_document)

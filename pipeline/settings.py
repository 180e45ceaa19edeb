"""One typed settings object: command-line flags, then environment, then defaults.

Settings are what a build needs to know about the account it targets (roles,
bucket, function names, framework versions). What a *run* may vary is a
pipeline parameter instead (see ``pipeline.parameters``), so it never needs a
rebuild.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

# Framework versions: the SageMaker image registry must know them (checked by tests).
TRAINING_FRAMEWORK_VERSION = "2.8"
INFERENCE_FRAMEWORK_VERSION = "2.6"
PYTHON_VERSION = "py312"

PLACEHOLDER_ACCOUNT = "111122223333"
LAMBDA_ALIAS = "live"
LAMBDA_FUNCTIONS = ("deploy-endpoint", "wait-endpoint", "check-endpoint", "invoke-endpoint", "notify-failure")

# Environment variables, named as the SageMaker project templates name them in CodeBuild.
ENVIRONMENT = {
    "region": "AWS_REGION",
    "account": "AWS_ACCOUNT_ID",
    "project_name": "SAGEMAKER_PROJECT_NAME",
    "project_id": "SAGEMAKER_PROJECT_ID",
    "pipeline_role_arn": "SAGEMAKER_PIPELINE_ROLE_ARN",
    "job_role_arn": "SAGEMAKER_JOB_ROLE_ARN",
    "model_role_arn": "SAGEMAKER_MODEL_ROLE_ARN",
    "bucket": "ARTIFACT_BUCKET",
    "prefix": "ARTIFACT_PREFIX",
    "model_package_group": "MODEL_PACKAGE_GROUP_NAME",
    "kms_key_id": "KMS_KEY_ID",
    "spot_training": "SPOT_TRAINING",
    "deploy_lambda_role_arn": "DEPLOY_LAMBDA_ROLE_ARN",
    "check_lambda_role_arn": "CHECK_LAMBDA_ROLE_ARN",
    "wait_lambda_role_arn": "WAIT_LAMBDA_ROLE_ARN",
    "endpoint_wait_queue_url": "ENDPOINT_WAIT_QUEUE_URL",
    "invoke_lambda_role_arn": "INVOKE_LAMBDA_ROLE_ARN",
    "invoke_endpoint_name": "INVOKE_ENDPOINT_NAME",
    "allowed_origin": "ALLOWED_ORIGIN",
    "invoke_provisioned_concurrency": "INVOKE_PROVISIONED_CONCURRENCY",
    "notify_lambda_role_arn": "NOTIFY_LAMBDA_ROLE_ARN",
    "failure_topic_arn": "FAILURE_TOPIC_ARN",
    "tuning_max_jobs": "TUNING_MAX_JOBS",
    "tuning_max_parallel_jobs": "TUNING_MAX_PARALLEL_JOBS",
}
# The tuning step's limits, fixed when the definition is built: CreateHyperParameterTuningJob's ResourceLimits
# is typed int in sagemaker-core's shapes, so they cannot be pipeline parameters. (least, most, why)
TUNING_LIMITS = {
    "tuning_max_jobs": (1, 750, "a Bayesian tuning job runs at most 750 training jobs "
                                "(docs.aws.amazon.com/sagemaker/latest/dg/automatic-model-tuning-limits.html)"),
    "tuning_max_parallel_jobs": (1, 100, "at most 100 parallel training jobs per tuning job, 10 by default "
                                         "(docs.aws.amazon.com/sagemaker/latest/dg/automatic-model-tuning-limits.html)"),
}

_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,39}$")
_ACCOUNT = re.compile(r"^[0-9]{12}$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_NAME_63 = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_INTEGER = re.compile(r"^\s*[+-]?[0-9]+\s*$")
_ROLE = re.compile(r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[\w+=,.@/-]+$")
_TOPIC_ARN = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[a-zA-Z0-9_-]{1,256}$")
_QUEUE_URL = re.compile(r"^https://sqs\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/[0-9]{12}/[a-zA-Z0-9_-]{1,80}$")
# Set by CodeBuild in every build (docs.aws.amazon.com/codebuild/latest/userguide/build-env-ref-env-vars.html).
CODEBUILD_BUILD_ARN = "CODEBUILD_BUILD_ARN"
_BUILD_ARN = re.compile(r"^arn:aws[a-z-]*:codebuild:(?P<region>[a-z0-9-]+):(?P<account>[0-9]{12}):build/.+$")


class SettingsError(ValueError):
    """A setting has a value that cannot work; the message names the setting and its source."""


@dataclass(frozen=True)
class Settings:
    region: str = "us-east-1"
    account: str = PLACEHOLDER_ACCOUNT
    project_name: str = "dogbreed"
    project_id: str = ""
    pipeline_role_arn: str = ""
    job_role_arn: str = ""
    model_role_arn: str = ""
    bucket: str = ""
    prefix: str = "dogbreed"
    model_package_group: str = ""
    kms_key_id: str = ""
    spot_training: bool = False
    processing_instance_type: str = "ml.m5.xlarge"
    training_instance_type: str = "ml.m5.2xlarge"
    # The tuning trials train only the head on features computed once by ExtractFeatures: a small instance will do.
    tuning_instance_type: str = "ml.m5.large"
    endpoint_instance_type: str = "ml.m5.large"
    training_framework_version: str = TRAINING_FRAMEWORK_VERSION
    inference_framework_version: str = INFERENCE_FRAMEWORK_VERSION
    python_version: str = PYTHON_VERSION
    tags: tuple[tuple[str, str], ...] = ()
    source_dir: Path = field(default_factory=lambda: default_source_dir())
    # The Lambda functions that upsert publishes; roles as infra/template.yaml names them.
    deploy_lambda_role_arn: str = ""
    check_lambda_role_arn: str = ""
    wait_lambda_role_arn: str = ""
    # The SQS queue the WaitFor... CallbackSteps send their token to (infra/template.yaml's EndpointWaitQueue).
    endpoint_wait_queue_url: str = ""
    invoke_lambda_role_arn: str = ""
    invoke_endpoint_name: str = ""  # the endpoint the invoke function calls
    allowed_origin: str = ""  # comma-separated CORS origins of the invoke function; empty sends no CORS headers
    # Instances of the invoke function's live alias kept initialized, so public requests skip cold starts; 0 keeps none.
    invoke_provisioned_concurrency: int = 5
    # The notify function, which the stack's rule on failed executions invokes, and the topic it publishes to.
    notify_lambda_role_arn: str = ""
    failure_topic_arn: str = ""
    tuning_max_jobs: int = 8  # trials of the tuning step in all
    tuning_max_parallel_jobs: int = 2  # trials of the tuning step at once

    def __post_init__(self) -> None:
        derived = {
            "pipeline_role_arn": f"arn:aws:iam::{self.account}:role/{self.project_name}-pipeline",
            "job_role_arn": f"arn:aws:iam::{self.account}:role/{self.project_name}-sagemaker-jobs",
            "model_role_arn": f"arn:aws:iam::{self.account}:role/{self.project_name}-sagemaker-model",
            "bucket": f"{self.project_name}-artifacts-{self.account}-{self.region}",
            "model_package_group": f"{self.project_name}-models",
            "deploy_lambda_role_arn": f"arn:aws:iam::{self.account}:role/{self.project_name}-deploy-endpoint",
            "check_lambda_role_arn": f"arn:aws:iam::{self.account}:role/{self.project_name}-check-endpoint",
            "wait_lambda_role_arn": f"arn:aws:iam::{self.account}:role/{self.project_name}-wait-endpoint",
            "endpoint_wait_queue_url": f"https://sqs.{self.region}.amazonaws.com/{self.account}/{self.project_name}-endpoint-wait",
            "invoke_lambda_role_arn": f"arn:aws:iam::{self.account}:role/{self.project_name}-invoke-endpoint",
            "invoke_endpoint_name": f"{self.project_name}-single-instance",
            "notify_lambda_role_arn": f"arn:aws:iam::{self.account}:role/{self.project_name}-notify-failure",
            "failure_topic_arn": f"arn:aws:sns:{self.region}:{self.account}:{self.project_name}-pipeline-failures",
        }
        for name, value in derived.items():
            if not getattr(self, name):
                object.__setattr__(self, name, value)
        object.__setattr__(self, "source_dir", Path(self.source_dir).resolve())
        self._validate()

    def _validate(self) -> None:
        checks = [
            ("region", _REGION, "an AWS region such as us-east-1"),
            ("account", _ACCOUNT, "a 12-digit AWS account id"),
            ("project_name", _NAME, "letters, digits and hyphens, at most 40 characters"),
            ("bucket", _BUCKET, "an S3 bucket name"),
            *((name, _ROLE, "an IAM role ARN") for name in role_settings()),
            ("endpoint_wait_queue_url", _QUEUE_URL, "an SQS queue URL (https://sqs.<region>.amazonaws.com/<account>/<name>)"),
            ("failure_topic_arn", _TOPIC_ARN, "an SNS topic ARN (arn:aws:sns:<region>:<account>:<name>)"),
            ("invoke_endpoint_name", _NAME_63, "a SageMaker endpoint name (letters, digits, hyphens, at most 63 characters)"),
        ]
        for name, pattern, expected in checks:
            value = getattr(self, name)
            if not pattern.match(value):
                raise SettingsError(f"{name}={value!r} is not {expected} ({_sources(name)})")
        count = self.invoke_provisioned_concurrency
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise SettingsError(f"invoke_provisioned_concurrency={count!r} is not a non-negative integer: the number of warm "
                                f"instances of the invoke function, 0 for none ({_sources('invoke_provisioned_concurrency')})")
        self._validate_tuning_limits()
        if self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise SettingsError(f"prefix={self.prefix!r} must not start or end with '/'")
        for name in ("code", "lambda"):
            if not (self.source_dir / name).is_dir():
                raise SettingsError(f"source_dir={self.source_dir} has no {name}/ folder: run from the project checkout or pass --source-dir")

    def _validate_tuning_limits(self) -> None:
        for name, (least, most, why) in TUNING_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
                raise SettingsError(f"{name}={value!r} is not an integer from {least} to {most}: {why} ({_sources(name)})")
        if self.tuning_max_parallel_jobs > self.tuning_max_jobs:
            raise SettingsError(f"tuning_max_parallel_jobs={self.tuning_max_parallel_jobs} exceeds tuning_max_jobs="
                                f"{self.tuning_max_jobs}: a tuning job cannot run more trials at once than it runs in all "
                                f"({_sources('tuning_max_parallel_jobs')})")

    # Names derived from the settings, each defined once.
    @property
    def pipeline_name(self) -> str:
        return f"{self.project_name}-pipeline"

    @property
    def deploy_pipeline_name(self) -> str:
        """The deploy-only pipeline that the registry's approval event starts."""
        return f"{self.project_name}-deploy"

    @property
    def failure_rule_name(self) -> str:
        """The stack's EventBridge rule on failed executions, whose target is the notify function."""
        return f"{self.project_name}-pipeline-failed"

    @property
    def failure_rule_arn(self) -> str:
        return f"arn:aws:events:{self.region}:{self.account}:rule/{self.failure_rule_name}"

    def lambda_function_name(self, function: str) -> str:
        if function not in LAMBDA_FUNCTIONS:
            raise KeyError(f"unknown Lambda function {function!r}; known: {', '.join(LAMBDA_FUNCTIONS)}")
        return f"{self.project_name}-{function}"

    def lambda_arn(self, function: str) -> str:
        name = self.lambda_function_name(function)
        return f"arn:aws:lambda:{self.region}:{self.account}:function:{name}:{LAMBDA_ALIAS}"

    def lambda_role_arn(self, function: str) -> str:
        """The execution role of a Lambda function (``deploy-endpoint`` -> deploy_lambda_role_arn)."""
        self.lambda_function_name(function)
        return getattr(self, f"{function.split('-')[0]}_lambda_role_arn")

    def s3_uri(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, self.prefix, *parts])

    def all_tags(self) -> list[dict[str, str]]:
        """Tags from settings, plus the SageMaker project tags when the project is known."""
        tags = dict(self.tags)
        if self.project_id:
            tags.setdefault("sagemaker:project-name", self.project_name)
            tags.setdefault("sagemaker:project-id", self.project_id)
        return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


def role_settings() -> tuple[str, ...]:
    """The settings that are IAM role ARNs: every ``*_role_arn`` field."""
    return tuple(setting.name for setting in fields(Settings) if setting.name.endswith("_role_arn"))


def default_source_dir() -> Path:
    """The project checkout: the working directory when it holds code/, else beside this package."""
    cwd = Path.cwd()
    if (cwd / "code").is_dir() and (cwd / "lambda").is_dir():
        return cwd
    return Path(__file__).resolve().parents[1]


def parse_tags(pairs: list[str] | tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    tags = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SettingsError(f"tag {pair!r} is not KEY=VALUE")
        tags.append((key, value))
    return tuple(tags)


def _sources(name: str) -> str:
    """Where a setting comes from, for error messages."""
    return f"flag --{name.replace('_', '-')}, env {ENVIRONMENT.get(name, '-')}"


def _coerce(name: str, raw: str) -> object:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    if kind in ("int", int):
        if not _INTEGER.match(raw):
            raise SettingsError(f"{name}={raw!r} is not an integer ({_sources(name)})")
        return int(raw)
    if kind in ("bool", bool):
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("", "0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}={raw!r} is not a boolean (true/false)")
    return raw


def load_settings(flags: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from flags (None means not given), then environment variables, then defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for name, variable in ENVIRONMENT.items():
        if environ.get(variable):
            values[name] = _coerce(name, environ[variable])
    if not values.get("region") and environ.get("AWS_DEFAULT_REGION"):
        values["region"] = environ["AWS_DEFAULT_REGION"]
    known = {f.name for f in fields(Settings)}
    for name, value in (flags or {}).items():
        if value is None:
            continue
        if name not in known:
            raise SettingsError(f"unknown setting {name!r}")
        values[name] = _coerce(name, value) if isinstance(value, str) else value
    for name, value in codebuild_target(environ).items():
        values.setdefault(name, value)
    return Settings(**values)


def codebuild_target(environ: Mapping[str, str]) -> dict[str, str]:
    """Account and region of the CodeBuild build this runs in (from CODEBUILD_BUILD_ARN), without a network call;
    empty outside CodeBuild. They come after flags and AWS_ACCOUNT_ID / AWS_REGION."""
    arn = environ.get(CODEBUILD_BUILD_ARN, "")
    if not arn:
        return {}
    match = _BUILD_ARN.match(arn)
    if not match:
        raise SettingsError(f"{CODEBUILD_BUILD_ARN}={arn!r} is not a CodeBuild build ARN "
                            "(arn:aws:codebuild:<region>:<account>:build/<project>:<id>); unset it outside CodeBuild")
    return {"account": match.group("account"), "region": match.group("region")}

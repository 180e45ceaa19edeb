"""``dogbreed approve PACKAGE_ARN_OR_VERSION``: approve a model package version of the project's group.

The same UpdateModelPackage a reviewer's click in Studio's model registry sends; the registry's
``SageMaker Model Package State Change`` event then starts the deploy-only pipeline. A version that is
already Approved is left as it is: approving it again would change nothing.
"""
from __future__ import annotations

import re

from pipeline.aws import Clients, explained
from pipeline.commands import UsageError
from pipeline.settings import Settings

APPROVED = "Approved"
PACKAGE_ARN = re.compile(r"arn:aws[a-z-]*:sagemaker:[a-z0-9-]+:[0-9]{12}:model-package/(?P<group>[^/]+)/(?P<version>[0-9]+)")


def package_arn(settings: Settings, given: str) -> str:
    """A version of the project's model package group, named by its ARN or its version number, as an ARN."""
    group = settings.model_package_group
    if given.isdigit() and int(given) > 0:
        return f"arn:aws:sagemaker:{settings.region}:{settings.account}:model-package/{group.lower()}/{int(given)}"
    match = PACKAGE_ARN.fullmatch(given)
    if match is None:
        raise UsageError(f"{given!r} is neither a model package version number nor a versioned model package ARN "
                         f"(arn:aws:sagemaker:REGION:ACCOUNT:model-package/{group}/VERSION)")
    if match["group"].lower() != group.lower():
        raise UsageError(f"{given} is a version of model package group {match['group']}, not of this project's {group}")
    return given


def approve_package(clients: Clients, settings: Settings, given: str, description: str | None = None) -> str:
    """Approve the version; returns what happened, one line."""
    arn = package_arn(settings, given)
    with explained(f"approving model package {arn}"):
        package = clients.sagemaker.describe_model_package(ModelPackageName=arn)
        status = package.get("ModelApprovalStatus", "PendingManualApproval")
        if status == APPROVED:
            return f"model package {arn} is already Approved: nothing changed"
        request = {"ModelPackageArn": package["ModelPackageArn"], "ModelApprovalStatus": APPROVED}
        if description:
            request["ApprovalDescription"] = description
        clients.sagemaker.update_model_package(**request)
    return (f"model package {package['ModelPackageArn']}: {status} -> Approved; the registry's state-change event "
            f"starts pipeline {settings.deploy_pipeline_name}, which deploys it")

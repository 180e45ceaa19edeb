"""A definition that ``dogbreed synth`` wrote, read back to be published or compared as it is.

In CodeBuild the definition is synthesized once, tested, and then published:
``dogbreed upsert --definition build/pipeline.json`` sends exactly that file's
text and the archives its ``assets.json`` lists. Nothing is synthesized again,
so what the tests checked is what runs. Before anything is sent, the file is
refused when

- it is not valid (synth's own checks, ``pipeline.validate``);
- an archive on disk no longer has the bytes its manifest names, or a source
  folder has changed since synth;
- it names an asset the manifest does not list, or a bucket other than the target's;
- it was built for another account or region than the one it would be published to
  (every ARN and image URI in it carries them), or calls functions upsert does not publish.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from pipeline.assets import ArtifactError, Assets, assets_from_manifest, stale_sources
from pipeline.dag import strings_in
from pipeline.definition import Synth
from pipeline.settings import LAMBDA_FUNCTIONS, Settings
from pipeline.validate import validate_definition

MANIFEST_NAME = "assets.json"
DEPLOY_DEFINITION_NAME = "deploy-pipeline.json"  # the deploy-only pipeline's definition, written next to the main one
_ARN = re.compile(r"arn:aws[a-z-]*:([a-z0-9-]+):([a-z0-9-]*):([0-9]{12}):")
_IMAGE = re.compile(r"\b[0-9]{12}\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com")
_S3 = re.compile(r"s3://[^\s\"']+")
EXAMPLE_WIDTH = 100
# ARNs of what the pipeline creates, calls or passes, which must be in the target account (a KMS key may be another's).
TARGET_SERVICES = {"iam", "lambda", "sagemaker"}


def _example(text: str) -> str:
    return text if len(text) <= EXAMPLE_WIDTH else text[: EXAMPLE_WIDTH - 3] + "..."


def read_definition(path: Path) -> tuple[str, dict]:
    """The file's text, exactly as it will be sent, and its JSON document."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ArtifactError(f"--definition {path}: {error.strerror or error}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ArtifactError(f"--definition {path} is not JSON: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("Steps"), list):
        raise ArtifactError(f"--definition {path} is not a pipeline definition (no Steps list)")
    return text, document


def targets_in(document: dict) -> tuple[dict[str, str], dict[str, str]]:
    """The accounts and the regions the definition names, each with one place it names it."""
    accounts: dict[str, str] = {}
    regions: dict[str, str] = {}
    for text in strings_in(document):
        for match in _ARN.finditer(text):
            if match.group(1) in TARGET_SERVICES:
                accounts.setdefault(match.group(3), text)
                if match.group(2):
                    regions.setdefault(match.group(2), text)
        for match in _IMAGE.finditer(text):
            regions.setdefault(match.group(1), text)
    return accounts, regions


def target_mismatches(path: Path, document: dict, settings: Settings) -> list[str]:
    accounts, regions = targets_in(document)
    problems = []
    for account, example in sorted(accounts.items()):
        if account != settings.account:
            problems.append(f"{path} was built for account {account} (e.g. {_example(example)}), but the target account is "
                            f"{settings.account}: synthesize it for the target (--account, AWS_ACCOUNT_ID, or "
                            "CODEBUILD_BUILD_ARN in CodeBuild) or publish with that account's credentials")
    for region, example in sorted(regions.items()):
        if region != settings.region:
            problems.append(f"{path} was built for region {region} (e.g. {_example(example)}), but the target region is "
                            f"{settings.region}: synthesize it with --region {settings.region} or publish to {region}")
    if problems:
        return problems
    published = {settings.lambda_arn(function) for function in LAMBDA_FUNCTIONS}
    for step in document.get("Steps", []):
        for text in _function_arns(step):
            if text in published:
                continue
            problems.append(f"{path} calls the Lambda function {text}, which upsert does not publish for these settings "
                            f"(it publishes {', '.join(sorted(published))})")
    return problems


def _function_arns(step: dict) -> Iterator[str]:
    """The FunctionArn of a Lambda step, also inside condition branches."""
    if step.get("Type") == "Lambda" and isinstance(step.get("FunctionArn"), str):
        yield step["FunctionArn"]
    for branch in ("IfSteps", "ElseSteps"):
        for inner in (step.get("Arguments") or {}).get(branch, []) if step.get("Type") == "Condition" else []:
            yield from _function_arns(inner)


def asset_mismatches(path: Path, document: dict, assets: Assets, settings: Settings) -> list[str]:
    problems = []
    listed = {asset.s3_uri for asset in assets}
    prefix = settings.s3_uri("assets") + "/"
    for asset in assets:
        if not asset.s3_uri.startswith(prefix):
            problems.append(f"asset {asset.name} is at {asset.s3_uri}, outside the target's {prefix}: synthesize "
                            "with the target's --bucket and --prefix")
    for text in strings_in(document):
        for uri in _S3.findall(text):
            if uri.startswith(prefix) and uri not in listed:
                problems.append(f"{path} names the asset {uri}, which its {MANIFEST_NAME} does not list: "
                                "run dogbreed synth again and keep its files together")
    stale = stale_sources(assets, settings)
    if stale:
        problems.append(f"the source tree has changed since {path} was synthesized: {', '.join(stale)}; run dogbreed "
                        "synth again, then test and publish what it writes")
    return problems


def load_artifact(path: Path, settings: Settings):
    """The definition at ``path`` and its assets, as ``synth`` would return them, once every check passed."""

    text, document = read_definition(path)
    assets = assets_from_manifest(path.parent / MANIFEST_NAME)
    deploy_path = path.parent / DEPLOY_DEFINITION_NAME
    if not deploy_path.is_file():
        raise ArtifactError(f"will not publish {path}: {deploy_path} (the deploy-only pipeline) is missing; run dogbreed "
                            "synth again and keep its files together")
    deploy_text, deploy_document = read_definition(deploy_path)
    problems = [*target_mismatches(path, document, settings), *asset_mismatches(path, document, assets, settings),
                *target_mismatches(deploy_path, deploy_document, settings),
                *asset_mismatches(deploy_path, deploy_document, assets, settings)]
    if problems:
        raise ArtifactError("will not publish " + str(path) + ":\n  " + "\n  ".join(dict.fromkeys(problems)))
    validate_definition(document)
    validate_definition(deploy_document)
    return Synth(definition=text, document=document, assets=assets, deploy_definition=deploy_text, deploy_document=deploy_document)

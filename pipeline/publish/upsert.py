"""``upsert``: check every request first, then publish the assets, the functions and the pipeline, each
part only when it changed. Running it again with nothing changed makes no AWS change and says so."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from pipeline.assets import Assets
from pipeline.aws import Clients
from pipeline.commands import UsageError
from pipeline.constraints import Walk, check_value, input_member
from pipeline.definition import synth
from pipeline.publish.assets import publish_asset
from pipeline.publish.functions import (
    FUNCTIONS,
    desired_configuration,
    publish_function,
    publish_provisioned_concurrency,
    publish_rule_permission,
)
from pipeline.publish.pipeline_resource import (
    DEFAULT_MAX_PARALLEL_STEPS,
    deploy_pipeline_attributes,
    pipeline_attributes,
    publish_pipeline,
)
from pipeline.publish.wait_queue import publish_wait_queue_mapping
from pipeline.settings import Settings

@dataclass
class Report:
    """What upsert did, one line per resource; ``changed`` counts the resources it changed."""
    lines: list[str] = field(default_factory=list)
    changed: int = 0

    def add(self, line: str, changed: bool) -> None:
        self.lines.append(line)
        self.changed += int(changed)


def request_problems(settings: Settings, max_parallel_steps: int) -> list[str]:
    """What SageMaker's and Lambda's limits refuse in the requests upsert would send besides the definition
    (pipeline name, display name, description, tags; each function's name and configuration)."""

    walk = Walk(f"pipeline {settings.pipeline_name}", {})
    for name, attributes in ((settings.pipeline_name, pipeline_attributes(settings, max_parallel_steps)),
                             (settings.deploy_pipeline_name, deploy_pipeline_attributes(settings))):
        walk.where = f"pipeline {name}"
        pipeline = {"PipelineName": name, **attributes, "Tags": settings.all_tags()}
        check_value(walk, pipeline, input_member("sagemaker", "CreatePipeline"), "CreatePipeline")
    for spec in FUNCTIONS:
        name = settings.lambda_function_name(spec.function)
        walk.where = f"function {name}"
        function = {"FunctionName": name, **desired_configuration(spec, settings, {}),
                    "Tags": {tag["Key"]: tag["Value"] for tag in settings.all_tags()}}
        check_value(walk, function, input_member("lambda", "CreateFunction"), "CreateFunction")
    return [str(finding) for finding in walk.findings]


def upsert(clients: Clients, settings: Settings, *, max_parallel_steps: int = DEFAULT_MAX_PARALLEL_STEPS,
           out: TextIO | None = None, built: Any = None) -> Report:
    """Publish the assets, the functions and the pipeline; print and return what changed.

    ``built`` is what to publish (a definition and its assets, e.g. from ``pipeline.artifact.load_artifact``);
    without it the definition is synthesized from the settings here."""

    out = out or sys.stdout
    problems = request_problems(settings, max_parallel_steps)
    if problems:
        raise UsageError("nothing was published; these requests would be refused:\n  " + "\n  ".join(problems))
    built = built if built is not None else synth(settings)
    report = Report()

    def record(result: tuple[str, bool]) -> None:
        report.add(*result)
        print(result[0], file=out, flush=True)

    assets: Assets = built.assets
    for asset in assets:
        record(publish_asset(clients, settings, asset))
    for spec in FUNCTIONS:
        record(publish_function(clients, settings, spec, assets.lambdas))
    record(publish_wait_queue_mapping(clients, settings))
    record(publish_provisioned_concurrency(clients, settings))
    record(publish_rule_permission(clients, settings))
    record(publish_pipeline(clients, settings, built.definition, built.document, settings.all_tags(), max_parallel_steps))
    record(publish_pipeline(clients, settings, built.deploy_definition, built.deploy_document, settings.all_tags(),
                            max_parallel_steps, deploy_only=True))
    if report.changed:
        print(f"{report.changed} of {len(report.lines)} resources changed", file=out)
    else:
        print(f"no changes: the assets, the {len(FUNCTIONS)} functions, the wait queue's mapping, the invoke function's "
              "provisioned concurrency, the notify function's permission for the failure rule and pipelines "
              f"{settings.pipeline_name} and {settings.deploy_pipeline_name} are up to date", file=out)
    return report

"""Upsert's event source mapping: the endpoint-wait queue delivers each message to the wait function's ``live``
alias. Lambda refuses a mapping for a function that does not exist yet, so the stack cannot make it before the
first upsert; upsert makes it right after publishing the function, and keeps its settings."""
from __future__ import annotations

from typing import Any

from pipeline.aws import Clients, explained
from pipeline.settings import LAMBDA_ALIAS, Settings

WAIT_FUNCTION = "wait-endpoint"
# One token per invocation; a message the handler leaves for later is reported as a batch item failure.
MAPPING: dict[str, Any] = {"BatchSize": 1, "FunctionResponseTypes": ["ReportBatchItemFailures"], "Enabled": True}
ENABLED_STATES = {"Enabled", "Enabling", "Creating", "Updating"}


def queue_arn(url: str) -> str:
    """The ARN of the queue at ``url`` (https://sqs.<region>.amazonaws.com/<account>/<name>, as settings check it)."""
    host, account, name = url.removeprefix("https://").split("/")
    partition = "aws-cn" if host.endswith(".cn") else "aws"
    return f"arn:{partition}:sqs:{host.split('.')[1]}:{account}:{name}"


def mapping_differences(current: dict[str, Any]) -> list[str]:
    """Names of the MAPPING fields a mapping as ListEventSourceMappings shows it does not have."""
    different = [name for name in ("BatchSize", "FunctionResponseTypes") if current.get(name) != MAPPING[name]]
    if current.get("State") not in ENABLED_STATES:
        different.append("Enabled")
    return different


def publish_wait_queue_mapping(clients: Clients, settings: Settings) -> tuple[str, bool]:
    """Create the queue's mapping to the wait function's alias, or update the one there; returns (report line, changed)."""
    function = settings.lambda_arn(WAIT_FUNCTION)
    source = queue_arn(settings.endpoint_wait_queue_url)
    label = f"event source mapping {source.rsplit(':', 1)[-1]} -> {settings.lambda_function_name(WAIT_FUNCTION)}:{LAMBDA_ALIAS}"
    with explained(f"connecting queue {source} to Lambda function {function}"):
        current = _current_mapping(clients, source, function)
        if current is None:
            created = clients.lambda_.create_event_source_mapping(EventSourceArn=source, FunctionName=function, **MAPPING)
            return f"{label}: created ({created['UUID']})", True
        different = mapping_differences(current)
        if not different:
            return f"{label}: unchanged ({current.get('State', 'state unknown')})", False
        clients.lambda_.update_event_source_mapping(UUID=current["UUID"], FunctionName=function, **MAPPING)
    return f"{label}: updated ({', '.join(different)})", True


def _current_mapping(clients: Clients, source: str, function: str) -> dict[str, Any] | None:
    request: dict[str, Any] = {"EventSourceArn": source, "FunctionName": function}
    while True:
        page = clients.lambda_.list_event_source_mappings(**request)
        if page.get("EventSourceMappings"):
            return page["EventSourceMappings"][0]
        if not page.get("NextMarker"):
            return None
        request["Marker"] = page["NextMarker"]

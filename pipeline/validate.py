"""Check a definition before anything reaches AWS.

Two checks that need no network, run by ``synth`` on every build:

- every ``Get`` names an existing parameter, execution variable, step, and a
  property that step really has (walked through botocore's output shape of
  the step's Describe* API, or its Lambda outputs and property files), and
  the steps form a DAG;
- every job step's ``Arguments`` is valid input for its Create* API according
  to botocore's own ``ParamValidator``, after each runtime expression is
  replaced by a placeholder of the type the API expects at that position.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Iterator

import botocore.session
from botocore.validate import ParamValidator

from pipeline.dag import DefinitionError, StepNode, iter_references, steps_of, topological_order

EXECUTION_VARIABLES = {
    "PipelineExecutionId", "PipelineExecutionArn", "PipelineName", "PipelineArn", "StartDateTime",
    "CurrentDateTime", "PipelineExecutionDisplayName",
}
# Step type -> (Create* API its Arguments feed, Describe* API its properties mirror, name SageMaker adds at run time)
STEP_APIS = {
    "Processing": ("CreateProcessingJob", "DescribeProcessingJob", "ProcessingJobName"),
    "Training": ("CreateTrainingJob", "DescribeTrainingJob", "TrainingJobName"),
    "Tuning": ("CreateHyperParameterTuningJob", "DescribeHyperParameterTuningJob", "HyperParameterTuningJobName"),
    "RegisterModel": ("CreateModelPackage", "DescribeModelPackage", None),
}
EXPRESSIONS = ("Get", "Std:Join", "Std:JsonGet")
_PATH_TOKEN = re.compile(r"\.?([A-Za-z0-9_]+)|\[(?:'([^']*)'|\"([^\"]*)\"|([0-9]+))\]")


@lru_cache(maxsize=1)
def sagemaker_model():
    return botocore.session.get_session().get_service_model("sagemaker")


def parse_property_path(path: str) -> list[str | int]:
    """``Outputs['train'].S3Output.S3Uri`` -> ['Outputs', 'train', 'S3Output', 'S3Uri']."""
    tokens: list[str | int] = []
    position = 0
    while position < len(path):
        match = _PATH_TOKEN.match(path, position)
        if not match:
            raise DefinitionError(f"cannot parse property path {path!r} at {path[position:]!r}")
        name, quoted, double_quoted, index = match.groups()
        if name is not None:
            tokens.append(name)
        elif index is not None:
            tokens.append(int(index))
        else:
            tokens.append(quoted if quoted is not None else double_quoted)
        position = match.end()
    return tokens


def _walk_shape(shape, tokens: list[str | int], where: str) -> None:
    for token in tokens:
        if shape.type_name == "structure":
            if not isinstance(token, str) or token not in shape.members:
                raise DefinitionError(f"{where}: {shape.name} has no member {token!r}")
            shape = shape.members[token]
        elif shape.type_name == "list":
            shape = shape.member  # an index, or a name as SageMaker allows for named lists
        elif shape.type_name == "map":
            shape = shape.value
        else:
            raise DefinitionError(f"{where}: cannot index {shape.type_name} {shape.name} with {token!r}")


def _check_step_property(node: StepNode, tokens: list[str | int], where: str) -> None:
    step = node.document
    if not tokens:
        raise DefinitionError(f"{where}: names the step but no property")
    head = tokens[0]
    if head == "PropertyFiles":
        names = {p["PropertyFileName"] for p in step.get("PropertyFiles", [])}
        if len(tokens) != 2 or tokens[1] not in names:
            raise DefinitionError(f"{where}: step {node.name} has no property file {tokens[1:]!r} (has {sorted(names)})")
        return
    if node.type == "Lambda":
        names = {o["OutputName"] for o in step.get("OutputParameters", [])}
        if head != "OutputParameters" or len(tokens) != 2 or tokens[1] not in names:
            raise DefinitionError(f"{where}: Lambda step {node.name} has outputs {sorted(names)}")
        return
    if node.type not in STEP_APIS:
        raise DefinitionError(f"{where}: a {node.type} step has no properties")
    if node.type == "Processing" and tokens[:2] == ["ProcessingOutputConfig", "Outputs"] and len(tokens) > 2:
        names = {o["OutputName"] for o in step["Arguments"].get("ProcessingOutputConfig", {}).get("Outputs", [])}
        if isinstance(tokens[2], str) and tokens[2] not in names:
            raise DefinitionError(f"{where}: step {node.name} has no output {tokens[2]!r} (has {sorted(names)})")
    describe = sagemaker_model().operation_model(STEP_APIS[node.type][1]).output_shape
    _walk_shape(describe, tokens, where)


def check_reference(reference: str, parameters: set[str], nodes: dict[str, StepNode], where: str) -> None:
    kind, _, rest = reference.partition(".")
    if kind == "Parameters":
        if rest not in parameters:
            raise DefinitionError(f"{where}: unknown parameter {rest!r}")
    elif kind == "Execution":
        if rest not in EXECUTION_VARIABLES:
            raise DefinitionError(f"{where}: unknown execution variable {rest!r}")
    elif kind == "Steps":
        match = re.match(r"([^.\[]+)\.?(.*)$", rest)
        name, path = match.group(1), match.group(2)
        if name not in nodes:
            raise DefinitionError(f"{where}: unknown step {name!r}")
        _check_step_property(nodes[name], parse_property_path(path), where)
    else:
        raise DefinitionError(f"{where}: reference {reference!r} is neither Parameters, Execution nor Steps")


def check_references(document: dict) -> dict[str, StepNode]:
    """Every reference resolves and the steps form a DAG; returns the steps."""
    nodes = steps_of(document)
    topological_order(nodes)
    parameters = {p["Name"] for p in document.get("Parameters", [])}
    for node in nodes.values():
        for reference in iter_references(node.document):
            check_reference(reference, parameters, nodes, f"step {node.name}, reference {reference!r}")
    return nodes


def placeholder(shape) -> Any:
    """A value of the type, and within the length and range limits, that ``shape`` expects."""
    kind = shape.type_name
    if kind == "string":
        if shape.enum:
            return shape.enum[0]
        minimum = shape.metadata.get("min", 1)
        return "x" * max(1, minimum)
    if kind in ("integer", "long"):
        return max(1, shape.metadata.get("min", 1))
    if kind in ("float", "double"):
        return float(max(1, shape.metadata.get("min", 1)))
    if kind == "boolean":
        return True
    if kind == "list":
        return [placeholder(shape.member)]
    if kind == "structure":
        return {name: placeholder(shape.members[name]) for name in shape.required_members}
    if kind == "map":
        return {}
    return None


def substitute_expressions(value: Any, shape) -> Any:
    """``value`` with every runtime expression replaced by a placeholder of the shape's type."""
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in EXPRESSIONS:
        return placeholder(shape)
    if isinstance(value, dict):
        if shape is None or shape.type_name not in ("structure", "map"):
            return {k: substitute_expressions(v, None) for k, v in value.items()}
        if shape.type_name == "map":
            return {k: substitute_expressions(v, shape.value) for k, v in value.items()}
        return {k: substitute_expressions(v, shape.members.get(k)) for k, v in value.items()}
    if isinstance(value, list):
        member = shape.member if shape is not None and shape.type_name == "list" else None
        return [substitute_expressions(item, member) for item in value]
    return value


def api_arguments_errors(node: StepNode) -> str | None:
    """botocore's report on a job step's Arguments, or None when they are valid."""
    create, _, run_time_name = STEP_APIS[node.type]
    shape = sagemaker_model().operation_model(create).input_shape
    arguments = substitute_expressions(node.document["Arguments"], shape)
    if run_time_name:
        arguments.setdefault(run_time_name, "name-given-at-run-time")
    report = ParamValidator().validate(arguments, shape)
    return report.generate_report() if report.has_errors() else None


def iter_problems(document: dict) -> Iterator[str]:
    try:
        nodes = check_references(document)
    except DefinitionError as error:
        yield str(error)
        return
    for node in nodes.values():
        if node.type in STEP_APIS:
            errors = api_arguments_errors(node)
            if errors:
                yield f"step {node.name} ({STEP_APIS[node.type][0]}): {errors}"


def validate_definition(document: dict) -> None:
    problems = list(iter_problems(document))
    if problems:
        raise DefinitionError("the pipeline definition is invalid:\n  " + "\n  ".join(problems))

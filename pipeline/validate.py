"""Check a definition before anything reaches AWS.

Two checks that need no network, run by ``synth`` on every build:

- every ``Get`` names an existing parameter, execution variable, step, and a
  property that step really has (walked through botocore's output shape of
  the step's Describe* API, or its Lambda outputs and property files), and
  the steps form a DAG;
- every job step's ``Arguments`` is valid input for its Create* API according
  to botocore's own ``ParamValidator``, after each runtime expression is
  replaced by a placeholder of the type the API expects at that position;
- every value that reaches an API is within the service's own limits
  (``pipeline.constraints``: lengths, ranges, patterns, enums of botocore's
  shapes), and within the rules the shapes cannot show (``service_rule_findings``).
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterator

from botocore.validate import ParamValidator

from pipeline.constraints import PIPELINE_TYPES, Finding, Landing, Walk, check_value, input_member, named_shape, service_model
from pipeline.dag import DefinitionError, StepNode, is_expression, iter_references, render, steps_of, topological_order
from steps.parameters import PARAMETER_ORDER, PARAMETER_RANGES

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
_STEP_PROPERTY = re.compile(r"Steps\.([^.\[]+)\.?(.*)$")  # Steps.<name>.<property path>
_PATH_TOKEN = re.compile(r"\.?([A-Za-z0-9_]+)|\[(?:'([^']*)'|\"([^\"]*)\"|([0-9]+))\]")


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
    return shape


def property_type(reference: str, nodes: dict[str, StepNode]) -> str | None:
    """The botocore type of a step property ``Steps.<name>.<path>``; None when it cannot be known here
    (a property file, an unknown step: the reference check reports those)."""
    match = _STEP_PROPERTY.match(reference)
    node = nodes.get(match.group(1)) if match else None
    if node is None:
        return None
    try:
        tokens = parse_property_path(match.group(2))
        if not tokens or tokens[0] == "PropertyFiles":
            return None
        if node.type == "Lambda":
            outputs = {o["OutputName"]: o.get("OutputType", "String") for o in node.document.get("OutputParameters", [])}
            return PIPELINE_TYPES.get(outputs.get(tokens[-1]))
        if node.type not in STEP_APIS:
            return None
        shape = service_model("sagemaker").operation_model(STEP_APIS[node.type][1]).output_shape
        return _walk_shape(shape, tokens, reference).type_name
    except DefinitionError:
        return None


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
    if node.type in ("Lambda", "Callback"):
        names = {o["OutputName"] for o in step.get("OutputParameters", [])}
        if head != "OutputParameters" or len(tokens) != 2 or tokens[1] not in names:
            raise DefinitionError(f"{where}: {node.type} step {node.name} has outputs {sorted(names)}")
        return
    if node.type not in STEP_APIS:
        raise DefinitionError(f"{where}: a {node.type} step has no properties")
    if node.type == "Processing" and tokens[:2] == ["ProcessingOutputConfig", "Outputs"] and len(tokens) > 2:
        names = {o["OutputName"] for o in step["Arguments"].get("ProcessingOutputConfig", {}).get("Outputs", [])}
        if isinstance(tokens[2], str) and tokens[2] not in names:
            raise DefinitionError(f"{where}: step {node.name} has no output {tokens[2]!r} (has {sorted(names)})")
    describe = service_model("sagemaker").operation_model(STEP_APIS[node.type][1]).output_shape
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
        match = _STEP_PROPERTY.match(reference)
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
    if is_expression(value):
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
    shape = service_model("sagemaker").operation_model(create).input_shape
    arguments = substitute_expressions(node.document["Arguments"], shape)
    if run_time_name:
        arguments.setdefault(run_time_name, "name-given-at-run-time")
    report = ParamValidator().validate(arguments, shape)
    return report.generate_report() if report.has_errors() else None


# ---------------------------------------------------------------- the service's limits

# Lambda step inputs that the project's handlers pass on to an API unchanged: input -> (service, operation,
# member path, whether "" means "not set" and reaches no API).
LAMBDA_INPUTS = {
    "endpoint_name": ("sagemaker", "CreateEndpoint", ("EndpointName",), False),
    "endpoint_config_name": ("sagemaker", "CreateEndpoint", ("EndpointConfigName",), True),
    "model_package_arn": ("sagemaker", "CreateModel", ("Containers", "*", "ModelPackageName"), False),
    "model_role_arn": ("sagemaker", "CreateModel", ("ExecutionRoleArn",), False),
    "instance_type": ("sagemaker", "CreateEndpointConfig", ("ProductionVariants", "*", "InstanceType"), False),
    "initial_instance_count": ("sagemaker", "CreateEndpointConfig", ("ProductionVariants", "*", "InitialInstanceCount"), False),
    "kms_key_id": ("sagemaker", "CreateEndpointConfig", ("KmsKeyId",), True),
    "data_capture_s3_uri": ("sagemaker", "CreateEndpointConfig", ("DataCaptureConfig", "DestinationS3Uri"), True),
    "data_capture_percentage": ("sagemaker", "CreateEndpointConfig", ("DataCaptureConfig", "InitialSamplingPercentage"), False),
    "min_capacity": ("application-autoscaling", "RegisterScalableTarget", ("MinCapacity",), False),
    "max_capacity": ("application-autoscaling", "RegisterScalableTarget", ("MaxCapacity",), False),
    "target_invocations_per_instance": ("application-autoscaling", "PutScalingPolicy",
                                        ("TargetTrackingScalingPolicyConfiguration", "TargetValue"), False),
}
# A LambdaStep invokes its function synchronously: the request payload is at most 6 MB
# (docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html, "Invocation payload").
LAMBDA_PAYLOAD_LIMIT = 6 * 1024 * 1024
# docs.aws.amazon.com/sagemaker/latest/dg/automatic-model-tuning-limits.html: at most 30 hyperparameters
# searched, 30 values per categorical hyperparameter, 20 metric definitions, 750 training jobs (Bayesian).
# docs.aws.amazon.com/sagemaker/latest/dg/automatic-model-tuning-define-ranges.html: at most 100
# hyperparameters in all, static and searched, counting the _tuning_objective_metric SageMaker adds.
TUNING_MAX_SEARCHED = 30
TUNING_MAX_CATEGORICAL_VALUES = 30
TUNING_MAX_METRICS = 20
TUNING_MAX_BAYESIAN_JOBS = 750
TUNING_MAX_HYPERPARAMETERS = 100


def _where(node: StepNode) -> str:
    return f"step {node.name}"


def _resolved(value: Any, parameters: dict[str, dict]) -> Any:
    """A literal, or a parameter reference's default; None when it is only known at run time."""
    if isinstance(value, dict) and isinstance(value.get("Get"), str) and value["Get"].startswith("Parameters."):
        return parameters.get(value["Get"].split(".", 1)[1], {}).get("DefaultValue")
    return None if isinstance(value, dict) else value


def check_step_fields(walk: Walk, step: dict) -> None:
    """Name, display name and description as ListPipelineExecutionSteps reports them.

    The name is checked as given: names the SDK derives, such as a RegisterModel collection's
    ``<name>-RegisterModel`` or a ModelStep's ``<name>-CreateModel`` (github.com/aws/sagemaker-python-sdk/issues/4765),
    are in the definition by then, and so are job names derived with ``use_custom_job_prefix``, which
    CreatePipeline checks against the job APIs' 63 characters (sagemaker-python-sdk/issues/5099) as
    ``check_job_arguments`` does."""
    for member, shape_name in (("Name", "StepName"), ("DisplayName", "StepDisplayName"), ("Description", "StepDescription")):
        if member in step:
            check_value(walk, step[member], named_shape("sagemaker", shape_name), member)


def check_job_arguments(walk: Walk, node: StepNode) -> None:
    shape = service_model("sagemaker").operation_model(STEP_APIS[node.type][0]).input_shape
    check_value(walk, node.document.get("Arguments", {}), shape, "Arguments")


def check_lambda_step(walk: Walk, node: StepNode) -> None:
    step = node.document
    if "FunctionArn" in step:
        check_value(walk, step["FunctionArn"], input_member("lambda", "Invoke", "FunctionName"), "FunctionArn")
    arguments = step.get("Arguments") or {}
    size = len(json.dumps(arguments).encode())
    if size > LAMBDA_PAYLOAD_LIMIT:
        walk.report("Arguments", f"at most {LAMBDA_PAYLOAD_LIMIT} bytes (a synchronous Lambda payload)", f"{size} bytes")
    for name, value in arguments.items():
        if name not in LAMBDA_INPUTS:
            continue
        service, operation, path, empty_is_unset = LAMBDA_INPUTS[name]
        walk.empty_is_unset = empty_is_unset
        check_value(walk, value, input_member(service, operation, *path), f"Arguments.{name}")
        walk.empty_is_unset = False


def check_tuning_rules(walk: Walk, node: StepNode) -> None:
    arguments = node.document.get("Arguments", {})
    config = arguments.get("HyperParameterTuningJobConfig", {})
    ranges = config.get("ParameterRanges", {})
    searched = [r for kind in ("IntegerParameterRanges", "ContinuousParameterRanges", "CategoricalParameterRanges")
                for r in ranges.get(kind, [])]
    path = "Arguments.HyperParameterTuningJobConfig"
    if len(searched) > TUNING_MAX_SEARCHED:
        walk.report(f"{path}.ParameterRanges", f"at most {TUNING_MAX_SEARCHED} searched hyperparameters", f"{len(searched)}")
    for index, item in enumerate(ranges.get("CategoricalParameterRanges", [])):
        values = item.get("Values", [])
        if isinstance(values, list) and len(values) > TUNING_MAX_CATEGORICAL_VALUES:
            walk.report(f"{path}.ParameterRanges.CategoricalParameterRanges[{index}].Values",
                        f"at most {TUNING_MAX_CATEGORICAL_VALUES} values per categorical hyperparameter", f"{len(values)} values")
    definitions = [arguments.get("TrainingJobDefinition")] + list(arguments.get("TrainingJobDefinitions") or [])
    for index, definition in enumerate(d for d in definitions if d):
        where = "Arguments.TrainingJobDefinition" if index == 0 else f"Arguments.TrainingJobDefinitions[{index - 1}]"
        metrics = definition.get("AlgorithmSpecification", {}).get("MetricDefinitions", [])
        if len(metrics) > TUNING_MAX_METRICS:
            walk.report(f"{where}.AlgorithmSpecification.MetricDefinitions",
                        f"at most {TUNING_MAX_METRICS} metric definitions per tuning job", f"{len(metrics)}")
        total = len(definition.get("StaticHyperParameters", {})) + len(searched) + 1  # + _tuning_objective_metric
        if total > TUNING_MAX_HYPERPARAMETERS:
            walk.report(f"{where}.StaticHyperParameters", f"at most {TUNING_MAX_HYPERPARAMETERS} hyperparameters in all "
                        "(static, searched and the _tuning_objective_metric SageMaker adds)", f"{total}")
    limits = config.get("ResourceLimits", {})
    most, parallel = (_resolved(limits.get(k), walk.parameters) for k in ("MaxNumberOfTrainingJobs", "MaxParallelTrainingJobs"))
    if config.get("Strategy") == "Bayesian" and isinstance(most, int) and most > TUNING_MAX_BAYESIAN_JOBS:
        walk.report(f"{path}.ResourceLimits.MaxNumberOfTrainingJobs",
                    f"at most {TUNING_MAX_BAYESIAN_JOBS} training jobs for a Bayesian search", f"{most}")
    if isinstance(most, int) and isinstance(parallel, int) and parallel > most:
        walk.report(f"{path}.ResourceLimits.MaxParallelTrainingJobs",
                    "no more parallel training jobs than training jobs in all (MaxNumberOfTrainingJobs)",
                    f"{parallel} parallel of {most}")


def check_parameters(walk: Walk, parameters: list[dict]) -> None:
    """Names and values as StartPipelineExecution takes them, and the ranges of steps.parameters."""

    name_shape = named_shape("sagemaker", "PipelineParameterName")
    value_shape = input_member("sagemaker", "StartPipelineExecution", "PipelineParameters", "*", "Value")
    defaults = {}
    for index, parameter in enumerate(parameters):
        name = parameter.get("Name", "")
        walk.where = f"parameter {name}"
        check_value(walk, name, name_shape, "Name")
        for label, value in (("DefaultValue", parameter.get("DefaultValue")),
                             *((f"EnumValues[{i}]", v) for i, v in enumerate(parameter.get("EnumValues") or []))):
            if value is not None:
                check_value(walk, value if isinstance(value, str) else json.dumps(value), value_shape, label)
        if "DefaultValue" in parameter:
            defaults[name] = parameter["DefaultValue"]
            problem = range_problem(name, parameter["DefaultValue"], PARAMETER_RANGES)
            if problem:
                walk.report("DefaultValue", problem[0], problem[1])
    walk.where = "parameters"
    for smaller, larger, why in PARAMETER_ORDER:
        if isinstance(defaults.get(smaller), (int, float)) and isinstance(defaults.get(larger), (int, float)) \
                and defaults[smaller] > defaults[larger]:
            walk.report(f"{smaller}, {larger}", f"{smaller} <= {larger}: {why}",
                        f"defaults {defaults[smaller]} and {defaults[larger]}")


def range_problem(name: str, value: Any, ranges: dict) -> tuple[str, str] | None:
    """(rule, detail) when ``value`` is outside the range of parameter ``name``, else None."""
    if name not in ranges or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    least, most, why = ranges[name]
    if value < least or (most is not None and value > most):
        allowed = f"{least} to {most}" if most is not None else f"{least} or more"
        return f"{allowed}, since {why}", f"{value!r} is outside"
    return None


def constraint_walk(document: dict, nodes: dict[str, StepNode] | None = None) -> Walk:
    """Every finding of the service's limits in ``document``, and where each parameter lands."""
    nodes = nodes if nodes is not None else steps_of(document)
    parameters = {p["Name"]: p for p in document.get("Parameters", []) if "Name" in p}
    walk = Walk("parameters", parameters, reference_type=lambda reference: property_type(reference, nodes))
    check_parameters(walk, document.get("Parameters", []))
    for node in nodes.values():
        walk.where = _where(node)
        check_step_fields(walk, node.document)
        if node.type in STEP_APIS:
            check_job_arguments(walk, node)
        if node.type == "Tuning":
            check_tuning_rules(walk, node)
        if node.type == "Lambda":
            check_lambda_step(walk, node)
    walk.where = "pipeline"
    size = len(render(document).encode())
    definition_shape = input_member("sagemaker", "CreatePipeline", "PipelineDefinition")
    if size > definition_shape.metadata["max"]:
        walk.report("PipelineDefinition", f"at most {definition_shape.metadata['max']} bytes (CreatePipeline)", f"{size} bytes")
    return walk


def parameter_landings(document: dict) -> dict[str, list[Landing]]:
    """Parameter name -> where its references land, with the shape a value must fit there."""
    return constraint_walk(document).landings


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
    for finding in constraint_walk(document, nodes).findings:
        yield str(finding)


def findings_of(document: dict) -> list[Finding]:
    """The service-limit findings alone (each with where, path, rule and detail)."""
    return constraint_walk(document).findings


def validate_definition(document: dict) -> None:
    problems = list(iter_problems(document))
    if problems:
        raise DefinitionError("the pipeline definition is invalid:\n  " + "\n  ".join(problems))

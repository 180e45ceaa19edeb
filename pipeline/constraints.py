"""SageMaker's own limits on every value of a definition that reaches an API.

botocore's ``ParamValidator`` (``pipeline.validate``) checks types, required
members and minimums. The service checks more: the ``min``/``max`` length of
strings, lists and maps, the ``min``/``max`` of numbers, ``pattern`` and
``enum``, all of which botocore's shape metadata carries. This module walks a
value alongside its shape and reports each literal that breaks one of them,
with the step, the JSON path, the rule and the value's length or text.

Runtime expressions are checked where their value can be known:

- ``{"Get": "Parameters.X"}``: the parameter's default and each of its
  ``EnumValues`` against the shape where the reference lands; every landing is
  recorded, so a value given at run time (``dogbreed start``/``local-run``) can
  be checked against the same shapes (``parameter_value_findings``);
- ``Std:Join``: a string; with literals and parameter defaults only, the
  joined text is checked like a literal;
- ``Get`` of a step property (its type from the step's Describe* output shape
  or Lambda output type) or of an execution variable: the type only (a string
  cannot land on a number, and so on); ``Std:JsonGet`` is not checked, as its
  type is only known once the file is read.

Patterns are Java regular expressions, applied by the service to the whole
value (``String.matches``). They are compiled with the ``regex`` module, which
knows Java's ``\\p{...}`` classes; surrogate-pair ranges become the code points
they stand for. Java's ``.`` also refuses ``\\r``, ``\\u0085``, ``\\u2028`` and
``\\u2029``, Python's only ``\\n``: a value with those characters may pass here and
be refused by the service.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import botocore.session
import regex

from pipeline.dag import is_expression

NUMBER_TYPES = ("integer", "long", "float", "double")
SHOWN = 60  # characters of a value shown in a finding

# A pipeline's type names (a parameter's Type, a Lambda step output's OutputType) as the botocore type of the value.
PIPELINE_TYPES = {"String": "string", "Integer": "integer", "Float": "float", "Boolean": "boolean"}


@dataclass(frozen=True)
class Finding:
    where: str  # "step PrepareData", "parameter ImageSize", "pipeline"
    path: str  # "Arguments.AppSpecification.ContainerEntrypoint[2]"
    rule: str  # "at most 256 characters (ContainerEntrypointString)"
    detail: str  # "329 characters"

    def __str__(self) -> str:
        return f"{self.where}, {self.path}: {self.detail}; allowed: {self.rule}"


@dataclass(frozen=True)
class Landing:
    """Where a parameter reference lands: the step, the JSON path and the shape the value must fit."""
    where: str
    path: str
    shape: Any
    empty_is_unset: bool = False  # "" means "not set" there (e.g. no data capture) and reaches no API


@dataclass
class Walk:
    """What a walk knows and what it found."""
    where: str
    parameters: dict[str, dict]
    findings: list[Finding] = field(default_factory=list)
    landings: dict[str, list[Landing]] = field(default_factory=dict)
    empty_is_unset: bool = False  # while set, "" is "not set" rather than a value to check
    reference_type: Callable[[str], str | None] = lambda reference: None  # botocore type of a step property

    def report(self, path: str, rule: str, detail: str) -> None:
        self.findings.append(Finding(self.where, path, rule, detail))


# ---------------------------------------------------------------- shapes

@lru_cache(maxsize=None)
def service_model(service: str):
    return botocore.session.get_session().get_service_model(service)


def input_member(service: str, operation: str, *path: str):
    """The shape of a member of an operation's input, e.g. ('sagemaker', 'CreateEndpoint', 'EndpointName')."""
    shape = service_model(service).operation_model(operation).input_shape
    for name in path:
        shape = shape.member if shape.type_name == "list" else shape.members[name]
    return shape


def named_shape(service: str, name: str):
    return service_model(service).shape_for(name)


_SURROGATE_RANGE = re.compile(r"\\uD8[0-3][0-9A-F]\\uDC00-\\uDBFF\\uDFFF", re.IGNORECASE)
_QUANTIFIED_END = re.compile(r"\$\{\d+(,\d*)?\}")


@lru_cache(maxsize=None)
def compiled_pattern(pattern: str) -> regex.Pattern | None:
    """A botocore (Java) pattern as a ``regex`` pattern; None for one that cannot be translated."""
    translated = _SURROGATE_RANGE.sub(r"\\U00010000-\\U0010FFFF", pattern)
    translated = _QUANTIFIED_END.sub("$", translated)  # Java accepts a quantified anchor, e.g. "(...)*${1,128}"
    try:
        return regex.compile(translated, regex.VERSION0)
    except regex.error:
        return None


def _shown(text: str) -> str:
    return json.dumps(text if len(text) <= SHOWN else text[: SHOWN - 3] + "...")


def _label(shape) -> str:
    return f" ({shape.name})" if getattr(shape, "name", "") else ""


# ---------------------------------------------------------------- literals

def check_string(walk: Walk, path: str, text: str, shape) -> None:
    if text == "" and walk.empty_is_unset:
        return
    metadata = shape.metadata
    if "max" in metadata and len(text) > metadata["max"]:
        walk.report(path, f"at most {metadata['max']} characters{_label(shape)}", f"{len(text)} characters")
    if len(text) < metadata.get("min", 0):
        walk.report(path, f"at least {metadata['min']} characters{_label(shape)}", f"{len(text)} characters {_shown(text)}")
    if shape.enum and text not in shape.enum:
        listed = ", ".join(shape.enum[:12]) + (", ..." if len(shape.enum) > 12 else "")
        walk.report(path, f"one of {listed}{_label(shape)}", f"{_shown(text)} is not among them")
    pattern = metadata.get("pattern")
    if pattern:
        compiled = compiled_pattern(pattern)
        if compiled is not None and not compiled.fullmatch(text):
            walk.report(path, f"values matching '{pattern}'{_label(shape)}", f"{_shown(text)} does not match")


def check_number(walk: Walk, path: str, number: float, shape) -> None:
    metadata = shape.metadata
    if "max" in metadata and number > metadata["max"]:
        walk.report(path, f"at most {metadata['max']}{_label(shape)}", f"{number!r} is more")
    if "min" in metadata and number < metadata["min"]:
        walk.report(path, f"at least {metadata['min']}{_label(shape)}", f"{number!r} is less")


def check_count(walk: Walk, path: str, count: int, shape, noun: str) -> None:
    metadata = shape.metadata
    if "max" in metadata and count > metadata["max"]:
        walk.report(path, f"at most {metadata['max']} {noun}{_label(shape)}", f"{count} {noun}")
    if count < metadata.get("min", 0):
        walk.report(path, f"at least {metadata['min']} {noun}{_label(shape)}", f"{count} {noun}")


def check_value(walk: Walk, value: Any, shape, path: str) -> None:
    """Every constraint of ``shape`` (and of the shapes inside it) that ``value`` breaks."""
    if shape is None:
        return
    if is_expression(value):
        check_expression(walk, value, shape, path)
        return
    kind = shape.type_name
    if kind == "string" and isinstance(value, str):
        check_string(walk, path, value, shape)
    elif kind in NUMBER_TYPES and isinstance(value, (int, float)) and not isinstance(value, bool):
        check_number(walk, path, value, shape)
    elif kind == "list" and isinstance(value, list):
        check_count(walk, path, len(value), shape, "items")
        for index, item in enumerate(value):
            check_value(walk, item, shape.member, f"{path}[{index}]")
    elif kind == "map" and isinstance(value, dict):
        check_count(walk, path, len(value), shape, "entries")
        for key, item in value.items():
            check_value(walk, key, shape.key, f"{path} key {json.dumps(key)}")
            check_value(walk, item, shape.value, f"{path}[{json.dumps(key)}]")
    elif kind == "structure" and isinstance(value, dict):
        for key, item in value.items():
            if key in shape.members:
                check_value(walk, item, shape.members[key], f"{path}.{key}" if path else key)
    elif kind == "blob" and isinstance(value, str):
        check_count(walk, path, len(value.encode()), shape, "bytes")


# ---------------------------------------------------------------- expressions

def check_expression(walk: Walk, expression: dict, shape, path: str) -> None:
    kind, body = next(iter(expression.items()))
    if kind == "Get" and isinstance(body, str) and body.startswith("Parameters."):
        check_parameter_landing(walk, body.split(".", 1)[1], shape, path)
    elif kind == "Std:Join":
        check_type(walk, "string", shape, path, "Std:Join")
        joined = joined_default(walk, body)
        if joined is not None and shape.type_name == "string":
            check_string(walk, f"{path} (joined with the parameters' defaults)", joined, shape)
    elif kind == "Get" and isinstance(body, str) and body.startswith("Execution."):
        check_type(walk, "string", shape, path, body)
    elif kind == "Get" and isinstance(body, str) and body.startswith("Steps."):
        resolved = walk.reference_type(body)
        if resolved is not None:
            check_type(walk, resolved, shape, path, body)


def check_type(walk: Walk, kind: str, shape, path: str, what: str) -> None:
    """A value of type ``kind`` (a botocore type name) cannot land where ``shape`` wants something else."""
    wanted = shape.type_name
    fits = kind == wanted or (kind in NUMBER_TYPES and wanted in NUMBER_TYPES) or (
        kind == "integer" and wanted in ("float", "double"))
    if kind in ("integer", "float") and wanted == "string":
        fits = True  # SageMaker Pipelines renders a number parameter as text where text is expected
    if not fits:
        walk.report(path, f"{_article(wanted)} {wanted}{_label(shape)}", f"{what} gives {_article(kind)} {kind}")


def _article(noun: str) -> str:
    return "an" if noun[:1] in "aeiou" else "a"


def check_parameter_landing(walk: Walk, name: str, shape, path: str) -> None:
    parameter = walk.parameters.get(name)
    if parameter is None:
        return  # pipeline.validate reports unknown parameters
    walk.landings.setdefault(name, []).append(Landing(walk.where, path, shape, walk.empty_is_unset))
    kind = PIPELINE_TYPES.get(parameter.get("Type", "String"), "string")
    check_type(walk, kind, shape, path, f"parameter {name}")
    for label, value in parameter_values_to_check(parameter):
        inner = Walk(walk.where, walk.parameters, empty_is_unset=walk.empty_is_unset)
        check_value(inner, as_shape_type(value, shape), shape, path)
        walk.findings.extend(Finding(f.where, f.path, f.rule, f"parameter {name}'s {label} {value!r}: {f.detail}")
                             for f in inner.findings)


def parameter_values_to_check(parameter: dict) -> list[tuple[str, Any]]:
    values = []
    if "DefaultValue" in parameter:
        values.append(("default", parameter["DefaultValue"]))
    values.extend(("allowed value", value) for value in parameter.get("EnumValues") or [])
    return values


def parameter_text(value: Any) -> str:
    """A parameter value as text, as SageMaker Pipelines writes it (booleans as true/false)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def as_shape_type(value: Any, shape) -> Any:
    """A parameter value as the service passes it where ``shape`` lands (numbers become text in a string)."""
    if shape.type_name == "string" and not isinstance(value, str):
        return parameter_text(value)
    return value


def joined_default(walk: Walk, body: Any) -> str | None:
    """A Std:Join of literals and parameters, joined with the parameters' defaults; None when a part is not known."""
    if not isinstance(body, dict):
        return None
    parts = []
    for item in body.get("Values", []):
        if isinstance(item, dict):
            reference = item.get("Get", "")
            parameter = walk.parameters.get(reference.split(".", 1)[1]) if reference.startswith("Parameters.") else None
            if parameter is None or "DefaultValue" not in parameter:
                return None
            item = parameter["DefaultValue"]
        parts.append(parameter_text(item))
    return str(body.get("On", "")).join(parts)


def parameter_value_findings(name: str, value: Any, landings: list[Landing]) -> list[Finding]:
    """What a run-time value of parameter ``name`` breaks where the definition uses it."""
    findings = []
    for landing in landings:
        walk = Walk(landing.where, {}, empty_is_unset=landing.empty_is_unset)
        check_value(walk, as_shape_type(value, landing.shape), landing.shape, landing.path)
        findings.extend(walk.findings)
    return findings

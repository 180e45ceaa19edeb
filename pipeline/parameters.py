"""``--param NAME=VALUE`` values checked against a definition's parameters (``local-run`` and ``start``).

A value must parse as its parameter's ``Type`` (Integer, Float, Boolean as
true/false in any case, String) and, where the parameter lists
``EnumValues``, be one of them. It must then fit what it is used for, before
anything starts: the range ``steps.parameters.PARAMETER_RANGES`` gives it, the
limits of every API shape its references land on in the definition (an
instance type SageMaker does not know, a count of 0), and the order
``PARAMETER_ORDER`` sets between two parameters. A refused value raises
:class:`ParameterError`, whose fields say which check failed so that each
command can word the refusal for what it checks against.
"""
from __future__ import annotations

from typing import Any, Iterable

from pipeline.constraints import parameter_text, parameter_value_findings
from pipeline.validate import parameter_landings, range_problem
from steps.parameters import PARAMETER_ORDER, PARAMETER_RANGES

MALFORMED = "malformed"  # not NAME=VALUE
UNKNOWN = "unknown"  # no parameter of that name
WRONG_TYPE = "wrong type"
NOT_ALLOWED = "not allowed"  # outside EnumValues
OUT_OF_RANGE = "out of range"  # outside its range, an API's limits, or the order of two parameters


class ParameterError(ValueError):
    """A ``--param`` the definition refuses; ``problem`` is one of MALFORMED, UNKNOWN, WRONG_TYPE, NOT_ALLOWED, OUT_OF_RANGE."""

    def __init__(self, message: str, problem: str, pair: str, parameter: dict | None = None,
                 declared: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.problem = problem
        self.pair = pair
        self.name, _, self.text = pair.partition("=")
        self.parameter = parameter or {}
        self.declared = sorted(declared)


def typed_value(parameter: dict, pair: str) -> Any:
    """The value of ``pair`` (``NAME=VALUE``) as the type of the definition's ``parameter``."""
    name, _, text = pair.partition("=")
    kind = parameter.get("Type", "String")
    try:
        if kind == "Integer":
            value: Any = int(text)
        elif kind == "Float":
            value = float(text)
        elif kind == "Boolean":
            if text.lower() not in ("true", "false"):
                raise ValueError(text)
            value = text.lower() == "true"
        else:
            value = text
    except ValueError:
        raise ParameterError(f"--param {name}={text}: {name} is of type {kind}, and {text!r} is not",
                             WRONG_TYPE, pair, parameter) from None
    allowed = parameter.get("EnumValues")
    if allowed and value not in allowed:
        raise ParameterError(f"--param {name}={text}: {name} takes one of {', '.join(map(str, allowed))}",
                             NOT_ALLOWED, pair, parameter)
    return value


def parameter_values(pairs: Iterable[str], document: dict) -> dict[str, Any]:
    """``NAME=VALUE`` pairs as typed values of the ``document``'s parameters; a later pair wins over an earlier one."""
    declared = {parameter["Name"]: parameter for parameter in document.get("Parameters", [])}
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, _ = pair.partition("=")
        if not sep or not name:
            raise ParameterError(f"--param {pair!r} is not NAME=VALUE", MALFORMED, pair, declared=declared)
        if name not in declared:
            raise ParameterError(f"--param {name}: the definition has no such parameter; it has {', '.join(sorted(declared))}",
                                 UNKNOWN, pair, declared=declared)
        values[name] = typed_value(declared[name], pair)
    check_run_values(values, document)
    return values


def check_run_values(values: dict[str, Any], document: dict) -> None:
    """Refuse a run's parameter values (typed, e.g. from ``parameter_values``) that cannot work, naming the
    parameter and what it allows; parameters not in ``values`` count with their defaults."""

    landings = parameter_landings(document) if values else {}
    for name, value in values.items():
        pair = f"{name}={parameter_text(value)}"
        problem = range_problem(name, value, PARAMETER_RANGES)
        if problem:
            raise ParameterError(f"--param {pair}: {name} must be {problem[0]}", OUT_OF_RANGE, pair)
        findings = parameter_value_findings(name, value, landings.get(name, []))
        if findings:
            raise ParameterError(f"--param {pair}: where the pipeline uses {name}, {findings[0]}", OUT_OF_RANGE, pair)
    defaults = {p["Name"]: p.get("DefaultValue") for p in document.get("Parameters", [])}
    effective = {**defaults, **values}
    for smaller, larger, why in PARAMETER_ORDER:
        low, high = effective.get(smaller), effective.get(larger)
        if (smaller in values or larger in values) and isinstance(low, (int, float)) and isinstance(high, (int, float)) \
                and low > high:
            name = smaller if smaller in values else larger
            pair = f"{name}={parameter_text(effective[name])}"
            raise ParameterError(f"--param {pair}: {smaller} ({parameter_text(low)}) must not exceed {larger} ({parameter_text(high)}): {why}",
                                 OUT_OF_RANGE, pair)

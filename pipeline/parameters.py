"""``--param NAME=VALUE`` values checked against a definition's parameters (``local-run`` and ``start``).

A value must parse as its parameter's ``Type`` (Integer, Float, Boolean as
true/false in any case, String) and, where the parameter lists
``EnumValues``, be one of them. A refused value raises
:class:`ParameterError`, whose fields say which check failed so that each
command can word the refusal for what it checks against.
"""
from __future__ import annotations

from typing import Any, Iterable

MALFORMED = "malformed"  # not NAME=VALUE
UNKNOWN = "unknown"  # no parameter of that name
WRONG_TYPE = "wrong type"
NOT_ALLOWED = "not allowed"  # outside EnumValues


class ParameterError(ValueError):
    """A ``--param`` the definition refuses; ``problem`` is one of MALFORMED, UNKNOWN, WRONG_TYPE, NOT_ALLOWED."""

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
    return values

"""Evaluate a condition step's ``Conditions`` (all must hold, as in SageMaker)."""
from __future__ import annotations

from typing import Any, Callable

from pipeline.local.errors import LocalRunError

COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "Equals": lambda left, right: left == right,
    "GreaterThan": lambda left, right: left > right,
    "GreaterThanOrEqualTo": lambda left, right: left >= right,
    "LessThan": lambda left, right: left < right,
    "LessThanOrEqualTo": lambda left, right: left <= right,
}
SYMBOLS = {"Equals": "==", "GreaterThan": ">", "GreaterThanOrEqualTo": ">=", "LessThan": "<", "LessThanOrEqualTo": "<="}


def _comparable(left: Any, right: Any) -> tuple[Any, Any]:
    """Numbers compare as numbers, also when one side is a numeric string (a property read from JSON or a log)."""
    def number(value: Any) -> float | None:
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return None
        return None

    if isinstance(left, (int, float)) or isinstance(right, (int, float)):
        l_number, r_number = number(left), number(right)
        if l_number is not None and r_number is not None:
            return l_number, r_number
    return left, right


def evaluate(condition: dict, resolve: Callable[[Any], Any], notes: list[str]) -> bool:
    """One resolved condition; appends a readable line per comparison to ``notes``."""
    kind = condition.get("Type")
    if kind in COMPARISONS:
        left, right = _comparable(resolve(condition.get("LeftValue")), resolve(condition.get("RightValue")))
        try:
            outcome = COMPARISONS[kind](left, right)
        except TypeError:
            raise LocalRunError(f"cannot compare {left!r} {SYMBOLS[kind]} {right!r}") from None
        notes.append(f"{left!r} {SYMBOLS[kind]} {right!r}: {outcome}")
        return outcome
    if kind == "In":
        value = resolve(condition.get("QueryValue"))
        values = [resolve(item) for item in condition.get("Values", [])]
        outcome = value in values
        notes.append(f"{value!r} in {values!r}: {outcome}")
        return outcome
    if kind == "Not":
        inner: list[str] = []
        outcome = not evaluate(condition.get("Condition", {}), resolve, inner)
        notes.append(f"not ({'; '.join(inner)}): {outcome}")
        return outcome
    if kind == "Or":
        inner = []
        outcome = any([evaluate(item, resolve, inner) for item in condition.get("Conditions", [])])
        notes.append(f"any of ({'; '.join(inner)}): {outcome}")
        return outcome
    raise LocalRunError(f"condition type {kind!r} is not supported by local-run")


def evaluate_all(conditions: list[dict], resolve: Callable[[Any], Any]) -> tuple[bool, list[str]]:
    notes: list[str] = []
    outcome = all([evaluate(condition, resolve, notes) for condition in conditions])
    return outcome, notes

"""What differs between two pipeline definitions: steps added, removed and changed, as JSON paths.

Used by ``dogbreed diff`` (deployed vs local) and by ``dogbreed upsert`` to say
what an update changed. A condition step is compared without its branches
(their steps are compared on their own), plus the names in each branch, so
moving a step between branches shows as a change of the condition.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from pipeline.dag import steps_of

MISSING = object()
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
VALUE_WIDTH = 100
CONTEXT = 24  # characters kept on each side of the part of two long strings that differs


@dataclass(frozen=True)
class Change:
    path: str
    old: Any
    new: Any

    def describe(self) -> str:
        old, new = render_pair(self.old, self.new)
        return f"{self.path or '(whole value)'}: {old} -> {new}"


@dataclass
class DefinitionDiff:
    added_steps: list[str] = field(default_factory=list)
    removed_steps: list[str] = field(default_factory=list)
    changed_steps: dict[str, list[Change]] = field(default_factory=dict)
    added_parameters: list[str] = field(default_factory=list)
    removed_parameters: list[str] = field(default_factory=list)
    changed_parameters: dict[str, list[Change]] = field(default_factory=dict)
    other: list[Change] = field(default_factory=list)  # top-level fields other than Steps and Parameters

    @property
    def equal(self) -> bool:
        return not (self.added_steps or self.removed_steps or self.changed_steps or self.added_parameters
                    or self.removed_parameters or self.changed_parameters or self.other)

    def summary(self) -> str:
        """One line, e.g. ``2 steps changed (PrepareData, TrainSingleInstance), 1 parameter added (Seed)``."""
        parts = []
        for count_of, verb, noun in (
            (self.changed_steps, "changed", "step"), (self.added_steps, "added", "step"),
            (self.removed_steps, "removed", "step"), (self.changed_parameters, "changed", "parameter"),
            (self.added_parameters, "added", "parameter"), (self.removed_parameters, "removed", "parameter"),
        ):
            if count_of:
                names = list(count_of)
                plural = noun if len(names) == 1 else noun + "s"
                parts.append(f"{len(names)} {plural} {verb} ({', '.join(names)})")
        if self.other:
            parts.append(f"{len(self.other)} other field{'s' if len(self.other) > 1 else ''} changed "
                         f"({', '.join(change.path for change in self.other)})")
        return ", ".join(parts) if parts else "no differences"

    def lines(self) -> list[str]:
        """The report ``dogbreed diff`` prints: one block per step or parameter, a path per change."""
        out: list[str] = []
        for noun, removed, added, changed in (
            ("step", self.removed_steps, self.added_steps, self.changed_steps),
            ("parameter", self.removed_parameters, self.added_parameters, self.changed_parameters),
        ):
            out.extend(f"- {noun} {name}" for name in removed)
            out.extend(f"+ {noun} {name}" for name in added)
            for name, changes in changed.items():
                out.append(f"~ {noun} {name}")
                out.extend(f"    {change.describe()}" for change in changes)
        for change in self.other:
            out.append(f"~ {change.describe()}")
        return out


def render_value(value: Any) -> str:
    if value is MISSING:
        return "(absent)"
    text = json.dumps(value, sort_keys=True, separators=(", ", ": "))
    return text if len(text) <= VALUE_WIDTH else text[: VALUE_WIDTH - 3] + "..."


def render_pair(old: Any, new: Any) -> tuple[str, str]:
    """Both values as JSON; two long strings keep only the part that differs, with some context."""
    if not (isinstance(old, str) and isinstance(new, str)) or max(len(old), len(new)) <= VALUE_WIDTH - 2:
        return render_value(old), render_value(new)
    prefix = len(_common_prefix(old, new))
    suffix = len(_common_prefix(old[prefix:][::-1], new[prefix:][::-1]))
    if prefix + suffix < CONTEXT:
        return render_value(old), render_value(new)
    start = max(0, prefix - CONTEXT)
    boundary = old.find("/", start, prefix)
    if start and boundary != -1:
        start = boundary  # begin at a path separator rather than mid-word

    def cut(text: str) -> str:
        end = min(len(text), len(text) - suffix + CONTEXT)
        middle = json.dumps(text[start:end])[1:-1]
        return '"' + ("..." if start else "") + middle + ("..." if end < len(text) else "") + '"'

    return cut(old), cut(new)


def _common_prefix(a: str, b: str) -> str:
    size = 0
    for x, y in zip(a, b):
        if x != y:
            break
        size += 1
    return a[:size]


def join_path(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _PLAIN_KEY.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def json_changes(old: Any, new: Any, path: str = "") -> Iterator[Change]:
    """Leaf-level differences between two JSON values, each with its path (``A.B[2].C``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys()):
            yield from json_changes(old.get(key, MISSING), new.get(key, MISSING), join_path(path, key))
    elif isinstance(old, list) and isinstance(new, list):
        for index in range(max(len(old), len(new))):
            yield from json_changes(old[index] if index < len(old) else MISSING,
                                    new[index] if index < len(new) else MISSING, join_path(path, index))
    elif old is MISSING or new is MISSING or type(old) is not type(new) or old != new:
        yield Change(path, old, new)


def _comparable_step(document: dict) -> dict:
    if document.get("Type") != "Condition":
        return document
    arguments = dict(document.get("Arguments", {}))
    for branch in ("IfSteps", "ElseSteps"):
        arguments[branch] = [step["Name"] for step in arguments.get(branch, [])]
    return {**document, "Arguments": arguments}


def _by_name(items: list[dict]) -> dict[str, dict]:
    return {item["Name"]: item for item in items}


def diff_definitions(old: dict, new: dict) -> DefinitionDiff:
    """What changes when ``old`` (e.g. deployed) is replaced by ``new`` (e.g. local)."""
    result = DefinitionDiff()
    old_steps, new_steps = steps_of(old), steps_of(new)
    result.removed_steps = [name for name in old_steps if name not in new_steps]
    result.added_steps = [name for name in new_steps if name not in old_steps]
    for name, node in new_steps.items():
        if name in old_steps:
            changes = list(json_changes(_comparable_step(old_steps[name].document), _comparable_step(node.document)))
            if changes:
                result.changed_steps[name] = changes
    old_parameters, new_parameters = _by_name(old.get("Parameters", [])), _by_name(new.get("Parameters", []))
    result.removed_parameters = [name for name in old_parameters if name not in new_parameters]
    result.added_parameters = [name for name in new_parameters if name not in old_parameters]
    for name, parameter in new_parameters.items():
        if name in old_parameters:
            changes = list(json_changes(old_parameters[name], parameter))
            if changes:
                result.changed_parameters[name] = changes
    rest_old = {k: v for k, v in old.items() if k not in ("Steps", "Parameters")}
    rest_new = {k: v for k, v in new.items() if k not in ("Steps", "Parameters")}
    result.other = list(json_changes(rest_old, rest_new))
    return result

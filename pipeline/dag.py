"""Read the DAG out of a definition document: steps, their dependencies, an order.

Dependencies are what SageMaker derives: a ``Get`` of ``Steps.<name>...`` (a
property or a property file) anywhere in a step, an explicit ``DependsOn``,
and membership in a condition step's branches.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

EXPRESSIONS = ("Get", "Std:Join", "Std:JsonGet")  # the runtime expressions a definition's values may be
STEP_REFERENCE = re.compile(r"^Steps\.([^.\[]+)")


class DefinitionError(ValueError):
    """The definition is not a DAG SageMaker could run; the message names the step."""


@dataclass
class StepNode:
    name: str
    type: str
    document: dict
    depends_on: set[str] = field(default_factory=set)
    branch_of: tuple[str, str] | None = None  # (condition step, "if" | "else")

    @property
    def display_name(self) -> str:
        return self.document.get("DisplayName") or self.name


def json_values(value: Any, *, enter: Callable[[Any], bool] = lambda value: True) -> Iterator[Any]:
    """Every value inside a JSON value, itself first, in document order; a dict or list that ``enter``
    refuses is yielded but not looked into. The one walker of the definition's JSON."""
    yield value
    if not enter(value):
        return
    if isinstance(value, dict):
        for item in value.values():
            yield from json_values(item, enter=enter)
    elif isinstance(value, list):
        for item in value:
            yield from json_values(item, enter=enter)


def render(document: dict) -> str:
    """A definition document as the text that is published: pretty-printed JSON with sorted keys."""
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def is_expression(value: Any) -> bool:
    """Whether a JSON value is one runtime expression (``{"Get": ...}``, ``{"Std:Join": ...}``, ``{"Std:JsonGet": ...}``)."""
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in EXPRESSIONS


def _is_get(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"Get"} and isinstance(value["Get"], str)


def iter_references(value: Any) -> Iterator[str]:
    """Every ``Get`` path inside a JSON value."""
    return (item["Get"] for item in json_values(value, enter=lambda item: not _is_get(item)) if _is_get(item))


def strings_in(value: Any) -> Iterator[str]:
    """Every string inside a JSON value, in document order."""
    return (item for item in json_values(value) if isinstance(item, str))


def _own_content(step: dict) -> dict:
    """The step without the nested steps of a condition (they are nodes of their own)."""
    if step.get("Type") != "Condition":
        return step
    arguments = {k: v for k, v in step.get("Arguments", {}).items() if k not in ("IfSteps", "ElseSteps")}
    return {**step, "Arguments": arguments}


def steps_of(document: dict) -> dict[str, StepNode]:
    """All steps, condition branches flattened, each with the steps it depends on."""
    nodes: dict[str, StepNode] = {}

    def add(step: dict, branch_of: tuple[str, str] | None) -> None:
        name = step["Name"]
        if name in nodes:
            raise DefinitionError(f"step {name}: the name is used twice")
        node = StepNode(name, step["Type"], step, set(step.get("DependsOn", [])), branch_of)
        for reference in iter_references(_own_content(step)):
            match = STEP_REFERENCE.match(reference)
            if match:
                node.depends_on.add(match.group(1))
        if branch_of:
            node.depends_on.add(branch_of[0])
        nodes[name] = node
        if step["Type"] == "Condition":
            for key, branch in (("IfSteps", "if"), ("ElseSteps", "else")):
                for child in step["Arguments"].get(key, []):
                    add(child, (name, branch))

    for step in document.get("Steps", []):
        add(step, None)
    for node in nodes.values():
        unknown = node.depends_on - nodes.keys()
        if unknown:
            names = ", ".join(repr(name) for name in sorted(unknown))
            raise DefinitionError(f"step {node.name}: unknown step {names}")
    return nodes


def topological_order(nodes: dict[str, StepNode]) -> list[str]:
    """Steps in an order that runs every step after what it depends on (stable by definition order)."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name):] + [name]
            raise DefinitionError(f"the steps form a cycle: {' -> '.join(cycle)}")
        state[name] = "visiting"
        for dependency in sorted(nodes[name].depends_on, key=list(nodes).index):
            visit(dependency, path + [name])
        state[name] = "done"
        order.append(name)

    for name in nodes:
        visit(name, [])
    return order

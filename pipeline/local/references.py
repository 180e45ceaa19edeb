"""Resolve the runtime expressions of a definition: ``Get``, ``Std:Join`` and ``Std:JsonGet``.

``Get`` reads ``Parameters.<name>``, ``Execution.<variable>`` or
``Steps.<step>.<property path>``. A step's properties are shaped like the
response of its Describe* API (``ModelArtifacts.S3ModelArtifacts``,
``ProcessingOutputConfig.Outputs['train'].S3Output.S3Uri``,
``BestTrainingJob.TunedHyperParameters['epochs']``), a Lambda step's like
``OutputParameters['name']``, a condition's ``Outcome``; property files are
``Steps.<step>.PropertyFiles.<name>``. As in SageMaker, a list can be indexed
by position (``[0]``) or by the name its items carry (``['train']`` finds the
item whose ``OutputName``, ``ChannelName``, ``MetricName`` or ``Name`` is
``train``).

Anything that cannot be resolved raises :class:`UnresolvableReference`,
whose message names the step being resolved and the reference.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

from pipeline.dag import DefinitionError
from pipeline.local.errors import LocalRunError
from pipeline.validate import parse_property_path

ITEM_NAME_KEYS = ("OutputName", "InputName", "ChannelName", "MetricName", "Name", "PropertyFileName", "VariantName")


class UnresolvableReference(LocalRunError):
    """A runtime expression has no value: the message names the step and the reference."""


@dataclass(frozen=True)
class PropertyFile:
    """A JSON file written by a step's output, read for ``Std:JsonGet``."""

    step: str
    name: str
    uri: str
    document: Any


@dataclass
class Scope:
    """Everything a reference can name, filled in as the run goes on (thread-safe)."""

    parameters: dict[str, Any]
    execution: dict[str, str]
    properties: dict[str, Any] = field(default_factory=dict)
    property_files: dict[tuple[str, str], PropertyFile] = field(default_factory=dict)
    not_run: dict[str, str] = field(default_factory=dict)  # step -> why it has no properties
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set_properties(self, step: str, properties: Any) -> None:
        with self._lock:
            self.properties[step] = properties

    def add_property_file(self, item: PropertyFile) -> None:
        with self._lock:
            self.property_files[(item.step, item.name)] = item

    def mark_not_run(self, step: str, why: str) -> None:
        with self._lock:
            self.not_run[step] = why


def parse_path(path: str, where: str) -> list[str | int]:
    """``Outputs['train'].S3Output.S3Uri`` -> ``['Outputs', 'train', 'S3Output', 'S3Uri']``, as ``synth`` checks it."""
    try:
        return parse_property_path(path)
    except DefinitionError as error:
        raise UnresolvableReference(f"{where}: {error}") from None


def _item_names(items: list) -> list[str]:
    names = []
    for item in items:
        if isinstance(item, Mapping):
            names.extend(str(item[key]) for key in ITEM_NAME_KEYS if key in item)
    return names


def walk(value: Any, tokens: list[str | int], where: str, shown: str) -> Any:
    """Follow ``tokens`` into ``value``; ``shown`` names the root in error messages."""
    for token in tokens:
        if isinstance(value, Mapping):
            if token not in value:
                available = ", ".join(sorted(map(str, value))) or "nothing"
                raise UnresolvableReference(f"{where}: {shown} has no {token!r} (it has {available})")
            value = value[token]
        elif isinstance(value, list):
            if isinstance(token, int):
                if not 0 <= token < len(value):
                    raise UnresolvableReference(f"{where}: {shown} has {len(value)} item(s), no item [{token}]")
                value = value[token]
            else:
                matches = [item for item in value if isinstance(item, Mapping)
                           and any(item.get(key) == token for key in ITEM_NAME_KEYS)]
                if not matches:
                    names = ", ".join(_item_names(value)) or "none"
                    raise UnresolvableReference(f"{where}: {shown} has no item named {token!r} (names: {names})")
                value = matches[0]
        else:
            raise UnresolvableReference(f"{where}: {shown} is {type(value).__name__} {value!r}, which has no {token!r}")
        shown = f"{shown}.{token}" if isinstance(token, str) and token.isidentifier() else f"{shown}[{token!r}]"
    return value


def as_text(value: Any) -> str:
    """A value as ``Std:Join`` writes it into a string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if value is None:
        return ""
    return str(value)


def json_path_get(document: Any, path: str, where: str, shown: str) -> Any:
    """``a.b[0].c`` or ``$.a['b-c']`` inside a JSON document (the subset of JsonPath SageMaker's JsonGet takes),
    parsed as synth parses property paths."""
    return walk(document, parse_path(path[2:] if path.startswith("$.") else path, where), where, shown)


class Resolver:
    """Resolves expressions for one step; ``step`` is the step whose arguments are being resolved."""

    def __init__(self, scope: Scope, step: str) -> None:
        self.scope = scope
        self.step = step

    def where(self, reference: str) -> str:
        return f"step {self.step}: cannot resolve {reference}"

    def resolve(self, value: Any) -> Any:
        """``value`` with every expression inside it replaced by its value."""
        if isinstance(value, dict):
            if len(value) == 1:
                (key, inner), = value.items()
                if key == "Get" and isinstance(inner, str):
                    return self.get(inner)
                if key == "Std:Join":
                    return self.join(inner)
                if key == "Std:JsonGet":
                    return self.json_get(inner)
            return {key: self.resolve(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.resolve(item) for item in value]
        return value

    def get(self, reference: str) -> Any:
        kind, _, rest = reference.partition(".")
        where = self.where(reference)
        if kind == "Parameters":
            if rest not in self.scope.parameters:
                raise UnresolvableReference(f"{where}: the definition has no parameter {rest!r}")
            return self.scope.parameters[rest]
        if kind == "Execution":
            if rest not in self.scope.execution:
                raise UnresolvableReference(f"{where}: no execution variable {rest!r} (known: {', '.join(sorted(self.scope.execution))})")
            return self.scope.execution[rest]
        if kind == "Steps":
            return self.step_property(reference, rest, where)
        raise UnresolvableReference(f"{where}: a reference starts with Parameters., Execution. or Steps.")

    def step_property(self, reference: str, rest: str, where: str) -> Any:
        match = re.match(r"([^.\[]+)\.?(.*)$", rest)
        if not match:
            raise UnresolvableReference(f"{where}: no step name")
        name, path = match.group(1), match.group(2)
        tokens = parse_path(path, where)
        if tokens[:1] == ["PropertyFiles"]:
            if len(tokens) != 2:
                raise UnresolvableReference(f"{where}: a property file is named as Steps.<step>.PropertyFiles.<name>")
            return self.property_file(name, str(tokens[1]), where)
        if name in self.scope.not_run:
            raise UnresolvableReference(f"{where}: step {name} did not run ({self.scope.not_run[name]})")
        if name not in self.scope.properties:
            raise UnresolvableReference(f"{where}: step {name} has not finished, so it has no properties yet")
        return walk(self.scope.properties[name], tokens, where, f"step {name}")

    def property_file(self, step: str, name: str, where: str) -> PropertyFile:
        item = self.scope.property_files.get((step, name))
        if item is None:
            why = self.scope.not_run.get(step)
            detail = f"step {step} did not run ({why})" if why else f"step {step} has produced no property file {name!r}"
            raise UnresolvableReference(f"{where}: {detail}")
        return item

    def join(self, inner: Any) -> str:
        if not isinstance(inner, Mapping) or not isinstance(inner.get("Values"), list):
            raise UnresolvableReference(f"step {self.step}: Std:Join needs On and a list of Values, got {inner!r}")
        return str(inner.get("On", "")).join(as_text(self.resolve(item)) for item in inner["Values"])

    def json_get(self, inner: Any) -> Any:
        if not isinstance(inner, Mapping) or "Path" not in inner:
            raise UnresolvableReference(f"step {self.step}: Std:JsonGet needs a Path and a PropertyFile, got {inner!r}")
        path = str(self.resolve(inner["Path"]))
        if "PropertyFile" in inner:
            source = inner["PropertyFile"]
            item = self.resolve(source)
            if not isinstance(item, PropertyFile):
                raise UnresolvableReference(f"step {self.step}: Std:JsonGet's PropertyFile {source!r} is not a property file")
            where = self.where(f"Std:JsonGet {path!r} of {item.step}.PropertyFiles.{item.name}")
            return json_path_get(item.document, path, where, f"{item.name} ({item.uri})")
        raise UnresolvableReference(f"step {self.step}: Std:JsonGet without a PropertyFile is not supported by local-run")

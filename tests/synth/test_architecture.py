"""The rooms of shared/DESIGN.md and who may import what, read from the source with ``ast``.

- no import cycle among the package's modules (``pipeline/``, ``steps/``), counting the imports
  inside functions, so that none can hide one;
- ``steps/`` never imports ``pipeline/`` (it may name its types for a type checker);
- ``code/`` and ``lambda/`` are shipped to other machines and never import the package or each other.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sources import ROOT

PACKAGES = ("pipeline", "steps")
FIRST_PARTY = {"pipeline", "steps", "code", "lambda"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for folder in PACKAGES for path in sorted((ROOT / folder).rglob("*.py"))}


def type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of the imports under ``if TYPE_CHECKING:``, which never run."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            lines |= {child.lineno for statement in node.body for child in ast.walk(statement) if hasattr(child, "lineno")}
    return lines


def imported_names(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports, anywhere in it (a name imported from a package as ``package.name``)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = type_checking_only(tree)
    names: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
            names.append((node.module, node.lineno))
    return names


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: {imported for imported, _ in imported_names(path) if imported in modules and imported != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "pipeline.local.scheduler" in graph["pipeline.local.command"]  # imported inside run_command
    assert "pipeline.commands" in graph["pipeline.aws"]


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph()) == []


def top_level(name: str) -> str:
    return name.partition(".")[0]


def forbidden_imports(folder: str, forbidden: set[str]) -> list[str]:
    """One line per import statement under ``folder`` that reaches a package in ``forbidden``."""
    found: dict[str, None] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name, line in imported_names(path):
            if top_level(name) in forbidden:
                found[f"{path.relative_to(ROOT)}:{line} imports {top_level(name)}"] = None
    return list(found)


def test_steps_never_import_pipeline():
    assert forbidden_imports("steps", {"pipeline"}) == []


@pytest.mark.parametrize("folder", ["code", "lambda"])
def test_shipped_scripts_never_reach_back_into_the_package(folder):
    assert forbidden_imports(folder, FIRST_PARTY - {folder}) == []


def test_the_rooms_rule_catches_an_import_of_the_package(tmp_path, monkeypatch):
    shipped = tmp_path / "lambda"
    shipped.mkdir()
    (shipped / "handler.py").write_text("def handler(event, context):\n    from pipeline.settings import Settings\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert forbidden_imports("lambda", {"pipeline"}) == ["lambda/handler.py:2 imports pipeline"]


# --- facts written on both sides of the shipping boundary ------------------------

def test_the_name_and_role_patterns_are_the_same_in_lambda_and_settings():
    """lambda/ cannot import pipeline/settings.py, so its copies of the patterns are pinned here."""
    import botocore.session

    from lambda_harness import load_handler
    from pipeline import settings

    events, deploy = load_handler("events"), load_handler("deploy_endpoint")
    assert events.NAME_PATTERN.pattern == settings._NAME_63.pattern
    assert deploy.ROLE_ARN.pattern == settings._ROLE.pattern
    assert deploy.S3_URI.pattern.startswith("^s3://" + settings._BUCKET.pattern.strip("^$"))
    endpoint_name = botocore.session.get_session().get_service_model("sagemaker").shape_for("EndpointName")
    assert events.NAME_PATTERN.pattern == f"^{endpoint_name.metadata['pattern']}$"
    assert events.NAME_HINT.startswith(f"1 to {endpoint_name.metadata['max']} ")

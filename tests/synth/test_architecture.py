"""The rooms of shared/DESIGN.md and who may import what, read from the source with ``ast``.

- no import cycle among the package's modules (``pipeline/``, ``steps/``), counting the imports
  inside functions, so that none can hide one;
- ``steps/`` never imports ``pipeline/`` (it may name its types for a type checker);
- ``code/`` and ``lambda/`` are shipped to other machines and never import the package or each other;
- in ``code/`` no module imports a script (an entry point SageMaker runs), so no script imports another,
  and the model archive's ``code/`` folder holds every module the inference script imports.
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


# --- code/: the scripts SageMaker runs and the modules they share ------------------

CODE = ROOT / "code"


def scripts() -> set[str]:
    """The code/ files SageMaker runs as entry points: those with a ``__main__`` guard, and the inference script."""
    import contract

    guarded = {path.stem for path in CODE.glob("*.py") if 'if __name__ == "__main__":' in path.read_text()}
    return guarded | {Path(contract.INFERENCE_SCRIPT).stem}


def inference_files() -> set[str]:
    """The module names of train.py's INFERENCE_FILES, read from its source (importing train.py would load torch)."""
    import contract

    tree = ast.parse((CODE / "train.py").read_text())
    (value,) = [node.value for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(target, "id", None) == "INFERENCE_FILES" for target in node.targets)]
    names = [getattr(contract, item.attr) if isinstance(item, ast.Attribute) else item.value for item in value.elts]
    return {Path(name).stem for name in names if name.endswith(".py")}


def code_imports(name: str) -> set[str]:
    """The code/ modules ``code/<name>.py`` imports."""
    return {top_level(imported) for imported, _ in imported_names(CODE / f"{name}.py")
            if (CODE / f"{top_level(imported)}.py").is_file()} - {name}


def imported_closure(name: str) -> set[str]:
    """``name`` and every code/ module it imports, directly or through another."""
    found, waiting = set(), [name]
    while waiting:
        module = waiting.pop()
        if module not in found:
            found.add(module)
            waiting += code_imports(module)
    return found


@pytest.mark.slow
def test_the_scripts_are_the_entry_points_the_definition_names():
    import json
    import re

    from pipeline.definition import synth
    from pipeline.settings import load_settings

    named = set(re.findall(r"\b(\w+)\.py\b", json.dumps(synth(load_settings({}, environ={})).document)))
    assert scripts() == named == {"preprocess", "extract_features", "train", "evaluate", "inference"}


def test_no_code_module_imports_a_script():
    """A script never imports another, not even through a shared module: what two scripts share is a module of its own."""
    entry_points = scripts()
    found = {path.stem: sorted(code_imports(path.stem) & entry_points) for path in sorted(CODE.glob("*.py"))}
    assert {module: imported for module, imported in found.items() if imported} == {}


def test_the_rule_catches_a_script_that_imports_another(tmp_path, monkeypatch):
    for name, text in {"train.py": 'if __name__ == "__main__":\n    pass\n', "helpers.py": "import train\n",
                       "extract.py": 'import helpers\nif __name__ == "__main__":\n    pass\n'}.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setitem(globals(), "CODE", tmp_path)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert scripts() >= {"train", "extract"} and code_imports("helpers") & scripts() == {"train"}
    assert imported_closure("extract") == {"extract", "helpers", "train"}


def test_the_model_archive_code_folder_holds_every_module_inference_imports():
    """train.py copies INFERENCE_FILES into the model's code/ folder, which the inference container imports from
    (and evaluate.py packs into the archive it registers)."""
    assert imported_closure("inference") == {"inference", "common", "contract", "serving_model"}
    assert imported_closure("inference") <= inference_files()

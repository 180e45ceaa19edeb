"""The definitions under review: tests/golden/ holds both definitions that ``dogbreed synth`` builds with the
default settings, as it writes them (pretty-printed, sorted keys), so that every change to a step shows in the
diff of a review.

One rule masks what changes with every edit of code/ or lambda/: each archive's SHA-256, whole or as the
16-character prefix in its S3 key, becomes a mark naming the archive (``<code sha256[:16]>``, ``<lambda sha256>``).
Nothing else is masked.

The golden files are rewritten only on request: ``make golden``, which runs this file with
``DOGBREED_GOLDEN=update``.

Core install only (no torch), like tests/synth/test_definition.py.
"""
from __future__ import annotations

import copy
import difflib
import json
import os
import re
from typing import Any, NamedTuple

import pytest

from pipeline.assets import Assets
from pipeline.dag import render
from sources import ROOT

GOLDEN_DIR = ROOT / "tests" / "golden"
GOLDEN_FILES = {"definition.json": "definition", "deploy-definition.json": "deploy_definition"}  # file: Synth field
VARIABLE = "DOGBREED_GOLDEN"
REWRITE = f"make golden (or {VARIABLE}=update .venv/bin/python -m pytest tests/synth/test_golden_definition.py)"
MOST_PATHS, MOST_DIFF_LINES, MOST_VALUE_CHARACTERS = 20, 40, 100
MISSING = "<missing>"


class Difference(NamedTuple):
    path: str
    old: Any  # MISSING where the new definition added it
    new: Any  # MISSING where the new definition left it out


def masked(definition: str, assets: Assets) -> str:
    """``definition`` (the JSON text) with each archive's SHA-256, whole or as its 16-character prefix, replaced by a
    mark naming the archive."""
    for asset in assets:
        definition = definition.replace(asset.sha256, f"<{asset.name} sha256>")
        definition = definition.replace(asset.sha256[:16], f"<{asset.name} sha256[:16]>")
    return definition


def rewriting() -> bool:
    """Whether this run rewrites the golden files (``DOGBREED_GOLDEN=update``); any other value is refused."""
    value = os.environ.get(VARIABLE, "")
    if value not in ("", "update"):
        pytest.fail(f"{VARIABLE}={value!r}: set it to 'update' to rewrite tests/golden/, or leave it unset to compare",
                    pytrace=False)
    return value == "update"


def difference_list(old: Any, new: Any, path: str = "") -> list[Difference]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            where = f"{path}.{key}" if path else key
            found += difference_list(old.get(key, MISSING), new.get(key, MISSING), where)
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in difference_list(a, b, f"{path}[{i}]")]
    return [] if old == new else [Difference(path, old, new)]


def comparable(document: dict) -> dict:
    """Steps by name (a condition's branches by the names of their steps), parameters by name, so that a difference
    reads as ``StepName.Arguments...`` rather than as a position in a list."""
    steps: dict[str, dict] = {}

    def collect(items: list[dict]) -> None:
        for step in items:
            step = copy.deepcopy(step)
            if step["Type"] == "Condition":
                for branch in ("IfSteps", "ElseSteps"):
                    collect(step["Arguments"][branch])
                    step["Arguments"][branch] = [s["Name"] for s in step["Arguments"][branch]]
            steps[step["Name"]] = step

    collect(document["Steps"])
    return {**{k: v for k, v in document.items() if k not in ("Steps", "Parameters")},
            "Parameters": {p["Name"]: p for p in document["Parameters"]}, **steps}


def shortened(lines: list[str], most: int) -> list[str]:
    return lines[:most] + ([f"... and {len(lines) - most} more"] if len(lines) > most else [])


def value_text(value: Any) -> str:
    text = value if value is MISSING else json.dumps(value, sort_keys=True)
    return text if len(text) <= MOST_VALUE_CHARACTERS else text[:MOST_VALUE_CHARACTERS] + "..."


def changed_paths(golden: str, built: str) -> list[str]:
    """``path: old -> new`` for each value that differs, steps and parameters by name."""
    try:
        differences = difference_list(comparable(json.loads(golden)), comparable(json.loads(built)))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        return [f"(the golden file is not a pipeline definition: {error})"]
    return [f"  {d.path}: {value_text(d.old)} -> {value_text(d.new)}" for d in differences]


def golden_report(name: str, golden: str, built: str) -> str:
    """Empty when ``built`` is the golden text; else what changed, by path and as a unified diff (both cut short),
    and the command that rewrites the golden file."""
    if golden == built:
        return ""
    diff = list(difflib.unified_diff(golden.splitlines(), built.splitlines(), f"tests/golden/{name}",
                                     "dogbreed synth, default settings", n=2, lineterm=""))
    return "\n".join([
        f"tests/golden/{name} is not the definition synth builds with the default settings (archive hashes masked):",
        *shortened(changed_paths(golden, built), MOST_PATHS),
        *shortened(diff, MOST_DIFF_LINES),
        f"If the change is intended, rewrite it with {REWRITE} and commit it with the change, for review.",
    ])


@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_each_definition_is_its_golden_file(default_synth, name):
    built = masked(getattr(default_synth, GOLDEN_FILES[name]), default_synth.assets)
    path = GOLDEN_DIR / name
    if rewriting() and (not path.is_file() or path.read_text() != built):
        path.parent.mkdir(exist_ok=True)
        path.write_text(built)
    if not path.is_file():
        pytest.fail(f"tests/golden/{name} is missing: {REWRITE} writes it", pytrace=False)
    report = golden_report(name, path.read_text(), built)
    if report:
        pytest.fail(report, pytrace=False)


def test_a_changed_step_is_reported_by_path_in_a_short_diff_with_the_rewrite_command(default_synth):
    golden = masked(default_synth.definition, default_synth.assets)
    changed = copy.deepcopy(default_synth.document)
    train = next(step for step in changed["Steps"] if step["Name"] == "TrainSingleInstance")
    runtime = train["Arguments"]["StoppingCondition"]["MaxRuntimeInSeconds"]
    train["Arguments"]["StoppingCondition"]["MaxRuntimeInSeconds"] = 60
    changed["Parameters"] = [p for p in changed["Parameters"] if p["Name"] != "AccuracyThreshold"]
    report = golden_report("definition.json", golden, masked(render(changed), default_synth.assets))
    assert f"  TrainSingleInstance.Arguments.StoppingCondition.MaxRuntimeInSeconds: {runtime} -> 60" in report
    assert "  Parameters.AccuracyThreshold: {" in report and report.count(" -> <missing>") == 1
    assert f'-          "MaxRuntimeInSeconds": {runtime}' in report.splitlines()
    assert REWRITE in report.splitlines()[-1]
    assert len(report.splitlines()) <= 1 + MOST_PATHS + 1 + MOST_DIFF_LINES + 1 + 1
    assert golden_report("definition.json", golden, golden) == ""


def test_only_the_archive_hashes_are_masked(default_synth):
    code = default_synth.assets.code
    for name, field in GOLDEN_FILES.items():
        text = getattr(default_synth, field)
        golden = masked(text, default_synth.assets)
        assert not any(asset.sha256[:16] in golden for asset in default_synth.assets)
        unmasked = golden.replace("<code sha256[:16]>", code.sha256[:16])
        assert unmasked == text, f"{name}: the mask changed more than the code archive's key"
        # a content-addressed value the rule does not know would change the golden file with each edit of code/
        assert re.findall(r"[0-9a-f]{16,}", golden) == [], name
    assert f"/assets/code/<code sha256[:16]>/{code.filename}" in masked(default_synth.definition, default_synth.assets)


def test_the_rewrite_variable_takes_only_update(monkeypatch):
    monkeypatch.setenv(VARIABLE, "yes")
    with pytest.raises(pytest.fail.Exception, match="DOGBREED_GOLDEN='yes': set it to 'update'"):
        rewriting()
    monkeypatch.setenv(VARIABLE, "update")
    assert rewriting()
    monkeypatch.delenv(VARIABLE)
    assert not rewriting()

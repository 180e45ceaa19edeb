"""What the local-run tests share: ``dogbreed local-run`` in this process, and reading its summary."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from pipeline import cli
from pipeline.local.sample import make_sample
from sources import ROOT

SMALL_MODEL = ["--param", "Backbone=resnet18", "--param", "ImageSize=32"]


def local_run(*arguments: str) -> tuple[int, str, str]:
    """``dogbreed local-run`` in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = cli.main(["local-run", "--no-progress", "--source-dir", str(ROOT), *arguments])
    return status, out.getvalue(), err.getvalue()


def run_edited(tmp_path: Path, document: dict, *arguments: str,
               split_sizes: dict[str, int] | None = None) -> tuple[int, str, str, Path]:
    """``local-run`` of an edited definition on a generated two-class sample: exit status, stdout, stderr, work dir."""
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(document))
    sample = make_sample(tmp_path / "data", classes=2, split_sizes=split_sizes or {"train": 4, "valid": 2, "test": 2})
    workdir = tmp_path / "work"
    status, out, err = local_run("--definition", str(edited), "--data", str(sample.root), "--workdir", str(workdir), *arguments)
    return status, out, err, workdir


def summary_of(workdir: Path) -> dict:
    return json.loads((workdir / "summary.json").read_text())


def steps_by_name(summary: dict) -> dict[str, dict]:
    return {step["name"]: step for step in summary["steps"]}

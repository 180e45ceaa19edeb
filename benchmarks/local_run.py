"""How long ``dogbreed local-run`` takes on the generated sample, step by step.

    python benchmarks/local_run.py [--runs 1] [-- extra local-run arguments]

Runs the command as ``make run`` does (a fresh work dir each time) and prints
one table: each step's duration per run, and the wall time of the command.
The goal: ``make run`` finishes in under 10 minutes on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(extra: list[str]) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory(prefix="local-run-bench-") as folder:
        workdir = Path(folder) / "work"
        command = [str(Path(sys.executable).with_name("dogbreed")), "local-run", "--no-progress", "--workdir", str(workdir), *extra]
        started = time.perf_counter()
        finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if finished.returncode != 0:
            sys.exit(f"local-run failed ({finished.returncode}):\n{finished.stdout[-3000:]}\n{finished.stderr[-2000:]}")
        return seconds, json.loads((workdir / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("extra", nargs="*", help="arguments passed on to local-run (after --)")
    args = parser.parse_args()
    results = [one_run(args.extra) for _ in range(args.runs)]
    names = [step["name"] for step in results[0][1]["steps"]]
    print(f"machine: {os.cpu_count()} cores; local-run {' '.join(args.extra) or '(generated sample, defaults)'}")
    header = "| step | " + " | ".join(f"run {i + 1} s" for i in range(len(results))) + " |"
    print(header)
    print("| --- |" + " ---: |" * len(results))
    for name in names:
        cells = []
        for _, summary in results:
            step = next(item for item in summary["steps"] if item["name"] == name)
            cells.append(f"{step['seconds']:.0f}" if step["seconds"] is not None else step["status"].lower())
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| **whole command (wall)** | " + " | ".join(f"**{seconds:.0f}**" for seconds, _ in results) + " |")


if __name__ == "__main__":
    main()

"""``dogbreed diagnose --local WORKDIR``: the same diagnosis as on SageMaker, from the files a local run keeps.

A local run's work folder holds ``summary.json`` (the execution and every step: status, reason, job name,
log files) and each job's logs under ``jobs/<job>/logs/<host>.log``; a tuning step lists its trials with
their failures. Nothing here starts the runner or moto.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.commands import UsageError
from pipeline.diagnosis import Diagnosis, FailedStep, last_lines
from pipeline.local.jobs import script_error_line
from pipeline.local.results import TuningResult
from pipeline.status import Status

SUMMARY = "summary.json"


def read_summary(workdir: Path) -> dict:
    path = workdir / SUMMARY
    if not workdir.is_dir():
        raise UsageError(f"--local {workdir}: no such folder; give a local-run work folder, e.g. build/local-run/<id>")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--local {workdir}: no {SUMMARY} in it; the run is still going or was interrupted before "
                         "its summary (local-run writes it when the run ends)") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"--local {path} is not JSON ({error}): not a summary local-run wrote") from None


def failed_trial_name(step: dict) -> str:
    return next((trial.name for trial in TuningResult.trials_in(step.get("details", {})) if trial.failure), "")


def explaining_log(step: dict, job_name: str) -> Path | None:
    """The job log that holds the script's error line (any host's), else the job's first log."""
    logs = [Path(log) for log in step.get("logs", []) if job_name in log or not job_name]
    readable = [log for log in logs if log.is_file()]
    for log in readable:
        if script_error_line(log.read_text(errors="replace")):
            return log
    return readable[0] if readable else None


def _relative(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def diagnose_workdir(workdir: Path) -> Diagnosis:
    summary = read_summary(workdir)
    status = summary.get("status", "Unknown")
    diagnosis = Diagnosis(summary.get("pipeline", "?"), f"local run {summary.get('execution_id', workdir.name)}",
                          status, summary.get("failure_reason") or "")
    failed = next((step for step in summary.get("steps", []) if step.get("status") == Status.FAILED), None)
    if failed is not None:
        step = FailedStep(failed["name"], failed.get("type", "Unknown"), failed.get("reason", ""))
        if step.type == "Fail":
            step.fail_message = step.reason
        else:
            step.job_name = failed_trial_name(failed) if step.type == "Tuning" else failed.get("job_name", "")
            log = explaining_log(failed, step.job_name)
            if log is not None:
                diagnosis.log_source = _relative(log)
                diagnosis.log_lines = last_lines(log.read_text(errors="replace"))
        diagnosis.step = step
    if status != Status.SUCCEEDED:
        diagnosis.next_commands = [rerun_command(workdir, summary.get("data", {}))]
    return diagnosis


def rerun_command(workdir: Path, data: dict) -> str:
    """local-run again in the same folder, on the same data (a generated sample there is reused)."""
    generated = data.get("description", "").startswith("generated sample")
    source = "" if generated or not data.get("path") else f" --data {_relative(Path(data['path']))}"
    return f"dogbreed local-run --workdir {_relative(workdir)}{source}   # after the fix"

"""What a local run did, as readable lines and as JSON (``summary.json`` in the work dir)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from pipeline.files import write_json
from pipeline.local.results import (
    ConditionResult,
    OutputsResult,
    ProcessingResult,
    StepResult,
    TrainingResult,
    TuningResult,
)
from pipeline.local.scheduler import RunResult
from pipeline.local.state import StepState
from pipeline.progress import format_duration
from pipeline.status import Status

Result = TypeVar("Result", bound=StepResult)


def _relative(path: str | Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _files(folder: str | None, limit: int = 6) -> list[str]:
    if not folder or not Path(folder).is_dir():
        return []
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    return [str(p) for p in files] if len(files) <= limit else []


def results(result: RunResult, kind: type[Result]) -> list[tuple[StepState, Result]]:
    """The steps whose runner's result is a ``kind``, with it, in the steps' order."""
    return [(state, state.result) for state in result.steps.values() if isinstance(state.result, kind)]


def step_record(state: StepState) -> dict[str, Any]:
    record: dict[str, Any] = {
        "name": state.name,
        "type": state.node.type,
        "status": state.status,
        "seconds": round(state.seconds, 1) if state.seconds is not None else None,
    }
    if state.reason:
        record["reason"] = state.reason
    if state.job_name:
        record["job_name"] = state.job_name
    if state.logs:
        record["logs"] = [str(log) for log in state.logs]
    details = state.result.details() if state.result else {}
    if details:
        record["details"] = details
    return record


def accuracy_of(result: RunResult, accuracy_path: str) -> dict[str, float]:
    """The value at ``accuracy_path`` in each property file of the run, by step."""
    values = {}
    for (step, _), item in result.scope.property_files.items():
        value: Any = item.document
        for part in accuracy_path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            values[step] = float(value)
    return values


def feature_extractions(result: RunResult, header_file: str) -> dict[str, dict[str, Any]]:
    """By step: the features header a processing step wrote (what was extracted, how fast), read from its outputs."""
    found = {}
    for state, processing in results(result, ProcessingResult):
        if state.status != Status.SUCCEEDED:
            continue
        for output in processing.outputs.values():
            header = Path(output) / header_file
            if header.is_file():
                try:
                    document = json.loads(header.read_text())
                except json.JSONDecodeError:
                    continue
                splits = document.get("splits", {})
                found[state.name] = {
                    "path": str(header), "step_seconds": round(state.seconds or 0.0, 1),
                    **{key: document.get(key) for key in ("backbone", "image_size", "weights", "feature_dim")},
                    "images": {split: entry.get("images") for split, entry in splits.items()},
                    "extraction": document.get("extraction", {}),
                }
    return found


def summary_document(result: RunResult, applied: dict[str, str], data: dict[str, Any], accuracy_path: str,
                     features_header: str | None = None) -> dict[str, Any]:
    parameters = dict(result.scope.parameters)
    document: dict[str, Any] = {
        "execution_id": result.execution_id,
        "pipeline": result.pipeline_name,
        "status": result.status,
        "failure_reason": result.failure_reason,
        "seconds": round((result.ended - result.started).total_seconds(), 1),
        "workdir": str(result.workdir),
        "parameters": parameters,
        "parameters_set_by_local_run": applied,
        "data": data,
        "steps": [step_record(state) for state in result.steps.values()],
        "test_accuracy": accuracy_of(result, accuracy_path),
    }
    manifest = result.manifest
    if manifest:
        document["manifest"] = {"path": str(manifest.path), "classes": manifest.document.get("classes"),
                                "dropped": manifest.document.get("dropped", [])}
    for state, tuning in results(result, TuningResult):
        if state.status == Status.SUCCEEDED:
            best = result.properties(state.name)["BestTrainingJob"]
            document.setdefault("tuning", {})[state.name] = {
                "best_training_job": best["TrainingJobName"],
                "hyperparameters": best["TunedHyperParameters"],
                "objective": best["FinalHyperParameterTuningJobObjectiveMetric"],
                "trials": [asdict(trial) for trial in tuning.trials],
                "channels": tuning.channels,
            }
    if features_header:
        document["feature_extraction"] = feature_extractions(result, features_header)
    document["endpoint_invocations"] = result.invocations
    return document


def write_summary(document: dict[str, Any], path: Path) -> None:
    write_json(path, document, default=str)


def _decoded(value: str) -> str:
    try:
        decoded = json.loads(value)
    except (TypeError, json.JSONDecodeError):
        return str(value)
    return str(decoded)


def summary_lines(result: RunResult, document: dict[str, Any]) -> list[str]:
    """The summary printed after the run: steps, choices, results and where the files are."""
    lines = [f"Local run {result.execution_id} of {result.pipeline_name}: {result.status} "
             f"in {format_duration(document['seconds'])}"]
    if result.failure_reason:
        lines.append(f"  {result.failure_reason}")
    lines.append(f"  work dir: {_relative(result.workdir)}")
    lines.append("")
    lines.append("Steps")
    width = max(len(state.name) for state in result.steps.values())
    for state in result.steps.values():
        duration = format_duration(state.seconds) if state.seconds is not None else ""
        remark = state.reason or state.note
        lines.append(f"  {state.name:<{width}}  {state.status:<9}  {duration:>7}  {remark}".rstrip())
    extractions = document.get("feature_extraction") or {}
    for name, extraction in extractions.items():
        counts = " + ".join(f"{count} {split}" for split, count in extraction["images"].items())
        speed = extraction["extraction"].get("images_per_second")
        lines += ["", f"Features ({name}, once for all trials): {counts} images, {extraction['backbone']} at "
                      f"{extraction['image_size']} px, {extraction['feature_dim']} values each, weights {extraction['weights']}",
                  f"  extraction {extraction['extraction'].get('seconds', 0):.1f} s"
                  + (f" ({speed:.0f} images/s)" if speed else "") + f", step {format_duration(extraction['step_seconds'])}: "
                  f"{_relative(extraction['path'])}"]
    for name, tuning in document.get("tuning", {}).items():
        chosen = ", ".join(f"{key}={_decoded(value)}" for key, value in sorted(tuning["hyperparameters"].items()))
        objective = tuning["objective"]
        lines += ["", f"Hyperparameters ({name}, {len(tuning['trials'])} trials): {chosen}",
                  f"  best trial {tuning['best_training_job']}: {objective['MetricName']} {objective['Value']:.4f}"]
        modes = {trial.get("trained_on") for trial in tuning["trials"]} - {None}
        if modes == {"features"}:
            lines.append("  trials, each training only the head on the features above (the backbone is frozen):")
        elif modes == {"images"}:
            lines.append("  trials, each training the whole network on the images with the final trainings' "
                         "augmentation and schedule (the backbone trains):")
        else:
            lines.append(f"  trials (channels {', '.join(tuning['channels']) or '-'}):")
        for trial in tuning["trials"]:
            tuned = " ".join(f"{key}={_decoded(value)}" for key, value in sorted(trial["tuned"].items()))
            outcome = (f"{objective['MetricName']} {trial['objective']:.4f}" if trial["objective"] is not None
                       else f"failed: {trial['failure']}")
            took = format_duration(trial["seconds"]) if trial.get("seconds") is not None else ""
            lines.append(f"    {trial['name']}  {took:>7}  {tuned}  {outcome}")
    models = [(state, training) for state, training in results(result, TrainingResult) if training.model]
    if models:
        lines += ["", "Models"]
        for state, training in models:
            instances = training.instances
            lines.append(f"  {state.name} ({instances} instance{'s' if instances != 1 else ''}): {_relative(training.model)}")
    evaluations = [state for state in result.steps.values() if state.name in document["test_accuracy"]]
    if evaluations:
        lines += ["", "Test accuracy"]
        for state in evaluations:
            lines.append(f"  {state.name}: {document['test_accuracy'][state.name]:.4f}")
            outputs = state.result.outputs if isinstance(state.result, ProcessingResult) else {}
            for output in outputs.values():
                for file in _files(output):
                    lines.append(f"    {_relative(file)}")
    for state, condition in results(result, ConditionResult):
        if condition.notes:
            lines.append(f"  {state.name}: {'; '.join(condition.notes)}")
    checks = [(state, answer) for state, answer in results(result, OutputsResult) if answer.outputs]
    if checks:
        lines += ["", "Lambda and callback steps"]
        for state, answer in checks:
            lines.append(f"  {state.name}: {', '.join(f'{key}={value}' for key, value in answer.outputs.items())}")
    manifest = document.get("manifest")
    data = document.get("data", {})
    lines += ["", "Data"]
    if data:
        lines.append(f"  {data.get('description', '')}: {_relative(data.get('path', ''))}")
    if manifest:
        lines.append(f"  classes: {len(manifest['classes'] or [])}; manifest {_relative(manifest['path'])}")
        for item in manifest["dropped"] or []:
            lines.append(f"  dropped: {item.get('path') or item.get('file')}: {item.get('reason')}")
    if document.get("parameters_set_by_local_run"):
        applied = ", ".join(f"{key}={value}" for key, value in document["parameters_set_by_local_run"].items())
        lines.append(f"  parameters set by local-run: {applied}")
    lines.append(f"  summary: {_relative(result.workdir / 'summary.json')}")
    return lines

"""A hyperparameter tuning job run locally: seeded random trials from the definition's ranges.

Each trial is a training job built from ``TrainingJobDefinition`` with the
static hyperparameters plus the drawn values, named and passed as SageMaker
passes them (the tuned values as strings, categorical values exactly as they
appear in the ranges, ``_tuning_objective_metric`` added). The objective is
the last value the objective's ``MetricDefinitions`` regex finds in a trial's
log, as SageMaker reports a trial's final objective metric. Trials are drawn
at random whatever the strategy: this checks the wiring, it is not a search.
"""
from __future__ import annotations

import hashlib
import math
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pipeline.local.errors import LocalRunError
from pipeline.local.jobs import JobContext, JobFailed, JobResult, timestamp
from pipeline.local.training_job import TrainingSpec, run_training_job
from pipeline.progress import utc_now


@dataclass
class Trial:
    spec: TrainingSpec
    tuned: dict[str, str]
    result: JobResult | None = None
    failure: str = ""

    def objective(self, metric: str) -> float | None:
        values = self.result.metrics.get(metric) if self.result else None
        return values[-1] if values else None


def _scaled(rng: random.Random, low: float, high: float, scaling: str) -> float:
    if scaling == "Logarithmic":
        if low <= 0:
            raise LocalRunError(f"a Logarithmic range needs a minimum above 0, got {low}")
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if scaling == "ReverseLogarithmic":
        if high >= 1:
            raise LocalRunError(f"a ReverseLogarithmic range needs a maximum below 1, got {high}")
        return 1 - math.exp(rng.uniform(math.log(1 - high), math.log(1 - low)))
    return rng.uniform(low, high)


def draw(ranges: Mapping[str, Any], rng: random.Random) -> dict[str, str]:
    """One value per range, as the string SageMaker passes to the trial."""
    values: dict[str, str] = {}
    for item in ranges.get("ContinuousParameterRanges", []):
        value = _scaled(rng, float(item["MinValue"]), float(item["MaxValue"]), item.get("ScalingType", "Auto"))
        values[item["Name"]] = repr(value)
    for item in ranges.get("IntegerParameterRanges", []):
        low, high = int(item["MinValue"]), int(item["MaxValue"])
        scaling = item.get("ScalingType", "Auto")
        value = round(_scaled(rng, low, high, scaling)) if scaling in ("Logarithmic", "ReverseLogarithmic") else rng.randint(low, high)
        values[item["Name"]] = str(min(high, max(low, value)))
    for item in ranges.get("CategoricalParameterRanges", []):
        if not item.get("Values"):
            raise LocalRunError(f"categorical range {item.get('Name')!r} has no values")
        values[item["Name"]] = rng.choice(list(item["Values"]))
    return values


def trial_name(tuning_job: str, index: int, tuned: Mapping[str, str]) -> str:
    """``<tuning job>-<NNN>-<8 hex>``, the shape of SageMaker's trial names."""
    digest = hashlib.sha256(repr(sorted(tuned.items())).encode()).hexdigest()[:8]
    return f"{tuning_job}-{index:03d}-{digest}"


def trial_arguments(definition: Mapping[str, Any], tuned: Mapping[str, str], objective_metric: str) -> dict[str, Any]:
    """CreateTrainingJob arguments of one trial."""
    resources = definition.get("ResourceConfig") or definition.get("HyperParameterTuningResourceConfig") or {}
    if "InstanceConfigs" in resources and "InstanceCount" not in resources:
        raise LocalRunError("tuning with heterogeneous InstanceConfigs is not supported by local-run")
    hyperparameters = {**dict(definition.get("StaticHyperParameters") or {}), **tuned,
                       "_tuning_objective_metric": objective_metric}
    arguments = {key: value for key, value in definition.items()
                 if key not in ("StaticHyperParameters", "HyperParameterRanges", "TuningObjective",
                                "HyperParameterTuningResourceConfig", "DefinitionName")}
    arguments["HyperParameters"] = hyperparameters
    arguments["ResourceConfig"] = {key: value for key, value in resources.items() if key in ("InstanceCount", "InstanceType", "VolumeSizeInGB")}
    return arguments


def run_tuning_job(ctx: JobContext, name: str, arguments: Mapping[str, Any], *, max_jobs: int | None = None,
                   seed: str = "0", parallel_limit: int = 2,
                   on_trial: Callable[[Trial], None] | None = None) -> tuple[dict[str, Any], list[Trial]]:
    """A CreateHyperParameterTuningJob request run locally; DescribeHyperParameterTuningJob-shaped properties and the trials.

    The draws depend on ``seed`` only, so runs of the same definition try the same values.
    """
    created = utc_now()
    config = arguments.get("HyperParameterTuningJobConfig") or {}
    definition = arguments.get("TrainingJobDefinition")
    if not definition:
        raise LocalRunError(f"tuning job {name}: only a single TrainingJobDefinition is supported by local-run")
    objective = config.get("HyperParameterTuningJobObjective") or {}
    metric, direction = objective.get("MetricName"), objective.get("Type", "Minimize")
    names = {item["Name"] for item in definition.get("AlgorithmSpecification", {}).get("MetricDefinitions", [])}
    if metric not in names:
        raise LocalRunError(f"tuning job {name}: the objective metric {metric!r} has no MetricDefinitions regex "
                            f"(defined: {', '.join(sorted(names)) or 'none'})")
    limits = config.get("ResourceLimits") or {}
    count = int(limits.get("MaxNumberOfTrainingJobs", 1))
    if max_jobs is not None:
        count = min(count, max_jobs)
    if count < 1:
        raise LocalRunError(f"tuning job {name}: no trials to run (MaxNumberOfTrainingJobs {limits.get('MaxNumberOfTrainingJobs')}, --max-tuning-jobs {max_jobs})")
    parallel = max(1, min(int(limits.get("MaxParallelTrainingJobs", 1)), parallel_limit, count))
    rng = random.Random(seed)
    trials = []
    for index in range(1, count + 1):
        tuned = draw(config.get("ParameterRanges") or {}, rng)
        trials.append(Trial(TrainingSpec(trial_name(name, index, tuned), trial_arguments(definition, tuned, metric)), tuned))
    threads = max(1, ctx.cpus_per_job // parallel)

    def run(trial: Trial) -> Trial:
        try:
            trial.result = run_training_job(ctx, trial.spec, threads=threads)
        except (JobFailed, LocalRunError) as error:
            trial.failure = str(error)
        if on_trial:
            on_trial(trial)
        return trial

    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix=f"{name}-trial") as pool:
        list(pool.map(run, trials))
    return tuning_properties(ctx, name, arguments, trials, metric, direction, created), trials


def tuning_properties(ctx: JobContext, name: str, arguments: Mapping[str, Any], trials: list[Trial],
                      metric: str, direction: str, created) -> dict[str, Any]:
    scored = [trial for trial in trials if trial.objective(metric) is not None]
    if not scored:
        reasons = "; ".join(f"{t.spec.name}: {t.failure or f'no {metric} in its log'}" for t in trials)
        raise JobFailed(f"No training job succeeded with an objective metric {metric}: {reasons}")
    ranked = sorted(scored, key=lambda t: t.objective(metric), reverse=direction == "Maximize")
    ended = utc_now()

    def summary(trial: Trial) -> dict[str, Any]:
        item: dict[str, Any] = {
            "TrainingJobName": trial.spec.name,
            "TrainingJobArn": ctx.arn("training-job", trial.spec.name),
            "TuningJobName": name,
            "TunedHyperParameters": dict(trial.tuned),
            "TrainingJobStatus": "Completed" if trial.result else "Failed",
            "ObjectiveStatus": "Succeeded" if trial.objective(metric) is not None else "Failed",
        }
        if trial.result:
            item["TrainingStartTime"] = trial.result.properties["TrainingStartTime"]
            item["TrainingEndTime"] = trial.result.properties["TrainingEndTime"]
        if trial.objective(metric) is not None:
            item["FinalHyperParameterTuningJobObjectiveMetric"] = {"Type": direction, "MetricName": metric, "Value": trial.objective(metric)}
        if trial.failure:
            item["FailureReason"] = trial.failure
        return item

    failed = [trial for trial in trials if not trial.result]
    return {
        **arguments,
        "HyperParameterTuningJobName": name,
        "HyperParameterTuningJobArn": ctx.arn("hyper-parameter-tuning-job", name),
        "HyperParameterTuningJobStatus": "Completed",
        "CreationTime": timestamp(created),
        "HyperParameterTuningEndTime": timestamp(ended),
        "LastModifiedTime": timestamp(ended),
        "TrainingJobStatusCounters": {"Completed": len(trials) - len(failed), "InProgress": 0, "RetryableError": 0,
                                      "NonRetryableError": len(failed), "Stopped": 0},
        "ObjectiveStatusCounters": {"Succeeded": len(scored), "Pending": 0, "Failed": len(trials) - len(scored)},
        "BestTrainingJob": summary(ranked[0]),
        "TrainingJobSummaries": [summary(trial) for trial in ranked + [t for t in trials if t not in ranked]],
    }

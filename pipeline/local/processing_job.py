"""A processing job as local processes: CreateProcessingJob's request in, DescribeProcessingJob's answer out.

The processing image runs the entrypoint itself (no toolkit), and so does
local-run: the entrypoint, arguments and environment with every ``/opt/ml``
path moved under each host's root, inputs copied from local S3 first and
outputs uploaded when the job ends.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pipeline.files import write_json
from pipeline.local.errors import LocalRunError
from pipeline.local.jobs import (
    HostProcess,
    JobContext,
    JobResult,
    check_usable_root,
    download_input,
    host_names,
    rewrite_opt_ml,
    run_hosts,
    s3_part,
    thread_limits,
    timestamp,
)
from pipeline.progress import utc_now


def run_processing_job(ctx: JobContext, name: str, arguments: Mapping[str, Any]) -> JobResult:
    """A CreateProcessingJob request run locally; returns DescribeProcessingJob-shaped properties."""
    created = utc_now()
    job_dir = ctx.jobs_dir / name
    cluster = arguments.get("ProcessingResources", {}).get("ClusterConfig", {})
    hosts = host_names(cluster.get("InstanceCount", 1))
    app = arguments.get("AppSpecification", {})
    entrypoint = list(app.get("ContainerEntrypoint") or [])
    if not entrypoint:
        raise LocalRunError(f"processing job {name}: AppSpecification has no ContainerEntrypoint; "
                            "local-run runs scripts, not the image's own entrypoint")
    outputs = arguments.get("ProcessingOutputConfig", {}).get("Outputs", [])
    processes = []
    for host in hosts:
        root = job_dir / host
        check_usable_root(root)
        _processing_inputs(ctx, arguments.get("ProcessingInputs", []), root, hosts, host)
        for output in outputs:
            Path(rewrite_opt_ml(s3_part(output, "S3Output", f"processing output {output.get('OutputName')!r}")["LocalPath"],
                                root)).mkdir(parents=True, exist_ok=True)
        (root / "opt/ml/output").mkdir(parents=True, exist_ok=True)
        write_json(root / "opt/ml/config/resourceconfig.json", {"current_host": host, "hosts": hosts})
        write_json(root / "opt/ml/config/processingjobconfig.json", {**arguments, "ProcessingJobName": name})
        environment = {
            **ctx.environment,
            **thread_limits(ctx.cpus_per_job),
            **rewrite_opt_ml(dict(arguments.get("Environment", {})), root),
        }
        command = rewrite_opt_ml(entrypoint + list(app.get("ContainerArguments") or []), root)
        processes.append(HostProcess(host, command, environment, root, job_dir / "logs" / f"{host}.log", root))
    started = utc_now()
    run_hosts(ctx, processes, arguments.get("StoppingCondition", {}).get("MaxRuntimeInSeconds"))
    for host in hosts:
        _processing_outputs(ctx, outputs, job_dir / host)
    ended = utc_now()
    properties = {
        **arguments,
        "ProcessingJobName": name,
        "ProcessingJobArn": ctx.arn("processing-job", name),
        "ProcessingJobStatus": "Completed",
        "ExitMessage": "",
        "CreationTime": timestamp(created),
        "ProcessingStartTime": timestamp(started),
        "ProcessingEndTime": timestamp(ended),
        "LastModifiedTime": timestamp(ended),
    }
    return JobResult(properties, [process.log for process in processes])


def _processing_inputs(ctx: JobContext, inputs: list, root: Path, hosts: list[str], host: str) -> None:
    for item in inputs:
        source = s3_part(item, "S3Input", f"processing input {item.get('InputName')!r}")
        download_input(ctx.s3, source, Path(rewrite_opt_ml(source["LocalPath"], root)), hosts, host)


def _processing_outputs(ctx: JobContext, outputs: list, root: Path) -> None:
    for item in outputs:
        target = s3_part(item, "S3Output", f"processing output {item.get('OutputName')!r}")
        source = Path(rewrite_opt_ml(target["LocalPath"], root))
        ctx.s3.path(target["S3Uri"]).mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            ctx.s3.upload(source, target["S3Uri"])

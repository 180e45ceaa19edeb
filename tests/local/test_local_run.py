"""``dogbreed local-run`` end to end: the synthesized definition executed on generated images.

One full run (module-scoped, about three minutes on two cores) backs most
assertions: every step runs, the 7-instance training forms one 7-process
torch.distributed group, a corrupt image planted in the data is dropped by
PrepareData while the run succeeds, the endpoint checks reach the local data
plane, and no socket connects anywhere but the loopback. The smaller runs that
check the Fail steps, failures and refusals are in ``test_local_run_failures.py``.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import socket
import tarfile
from pathlib import Path

import pytest

from pipeline.dag import steps_of
from pipeline.local.sample import CORRUPT_NAME, make_sample, plant_corrupt_image
from local_runs import SMALL_MODEL, local_run, steps_by_name, summary_of

pytestmark = pytest.mark.slow

SOCKET_RECORDER = '''
import os, socket, sys
_LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "connections.log")
with open(_LOG, "a") as log:
    log.write(f"{os.getpid()} loaded {' '.join(sys.argv)}\\n")
_connect = socket.socket.connect
def connect(self, address):
    with open(_LOG, "a") as log:
        log.write(f"{os.getpid()} {int(self.family)} {address!r}\\n")
    return _connect(self, address)
socket.socket.connect = connect
'''


def is_loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory):
    """A whole local run on the generated sample with a corrupt file planted, recording every socket connect."""
    base = tmp_path_factory.mktemp("local-run")
    sample = make_sample(base / "data")
    corrupt = plant_corrupt_image(sample.root)
    recorder_dir = base / "recorder"
    recorder_dir.mkdir()
    (recorder_dir / "sitecustomize.py").write_text(SOCKET_RECORDER)
    connections: list[tuple[int, object]] = []
    original_connect = socket.socket.connect

    def recording_connect(self, address):
        connections.append((int(self.family), address))
        return original_connect(self, address)

    workdir = base / "work"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(recorder_dir))  # the container processes inherit it
        patch.setattr(socket.socket, "connect", recording_connect)
        status, out, err = local_run("--data", str(sample.root), "--workdir", str(workdir),
                                     "--max-tuning-jobs", "2", *SMALL_MODEL)
    return {"status": status, "out": out, "err": err, "workdir": workdir, "summary": summary_of(workdir),
            "corrupt": corrupt, "sample": sample, "connections": connections,
            "child_connections": (recorder_dir / "connections.log").read_text().splitlines()
            if (recorder_dir / "connections.log").exists() else []}


def test_full_run_succeeds_and_every_step_runs(full_run):
    assert full_run["status"] == 0, full_run["out"][-3000:] + full_run["err"]
    summary = full_run["summary"]
    assert summary["status"] == "Succeeded"
    definition = json.loads((full_run["workdir"] / "definition.json").read_text())
    steps = steps_by_name(summary)
    assert set(steps) == set(steps_of(definition))  # nested condition branches included
    not_succeeded = {name: step["status"] for name, step in steps.items() if step["status"] != "Succeeded"}
    # Only the failure branches of the quality gates stay out: both models passed the threshold.
    assert not_succeeded == {name: "Skipped" for name in (
        "CheckTwinDeploymentSingleInstance", "AccuracyTooLowSingleInstance", "AccuracyTooLowMultiInstanceAfterSingleInstance",
        "CheckTwinDeploymentMultiInstance", "AccuracyTooLowMultiInstance", "AccuracyTooLowSingleInstanceAfterMultiInstance")}
    assert "Local run" in full_run["out"] and "Succeeded" in full_run["out"]


def test_multi_instance_training_is_one_seven_process_group(full_run):
    step = steps_by_name(full_run["summary"])["TrainMultiInstance"]
    assert step["details"]["instances"] == 7
    logs = [Path(path) for path in step["logs"]]
    assert [log.stem for log in logs] == [f"algo-{i}" for i in range(1, 8)]
    ranks = set()
    for log in logs:
        text = log.read_text()
        found = set(re.findall(r"\[rank (\d+)/(\d+)\]", text))
        assert found and all(world == "7" for _, world in found), f"{log} does not show a 7-process group"
        ranks |= {int(rank) for rank, _ in found}
    assert ranks == set(range(7))
    # Validation metrics are all-reduced: every rank prints the same metric lines.
    metric_lines = [re.findall(r"^epoch=\d+ .*$", log.read_text(), flags=re.MULTILINE) for log in logs]
    assert metric_lines[0] and all(lines == metric_lines[0] for lines in metric_lines)
    with tarfile.open(step["details"]["model"]) as archive:
        info = json.load(archive.extractfile("model_info.json"))
    assert info["world_size"] == 7


def test_training_steps_take_the_best_trial_hyperparameters(full_run):
    summary = full_run["summary"]
    tuning = summary["tuning"]["TuneHyperparameters"]
    assert len(tuning["trials"]) == 2
    objectives = [trial["objective"] for trial in tuning["trials"]]
    assert tuning["objective"]["Value"] == min(objectives)
    best = tuning["hyperparameters"]
    assert set(best) == {"learning_rate", "batch_size", "epochs"}
    for name in ("TrainSingleInstance", "TrainMultiInstance"):
        job = steps_by_name(summary)[name]["job_name"]
        config = full_run["workdir"] / "jobs" / job / "algo-1" / "opt" / "ml" / "input" / "config" / "hyperparameters.json"
        passed = json.loads(config.read_text())
        assert {key: passed[key] for key in best} == best  # as SageMaker gives them, e.g. batch_size '"64"'
        log = (full_run["workdir"] / "jobs" / job / "logs" / "algo-1.log").read_text()
        command = next(line for line in log.splitlines() if " train.py " in line and "--batch_size" in line)
        assert f"--batch_size {json.loads(best['batch_size'])}" in command and f"--epochs {best['epochs']}" in command


def test_without_weights_the_trials_train_the_whole_network_on_the_images(full_run):
    """local-run's default, PretrainedWeights=none: every trial trains the whole network on the train channel, with
    the features channel given (one tuning step either way) and left unread."""
    tuning = full_run["summary"]["tuning"]["TuneHyperparameters"]
    assert {"features", "train", "valid"} <= set(tuning["channels"])
    assert len(tuning["trials"]) == 2 and [t["trained_on"] for t in tuning["trials"]] == ["images", "images"]
    for log in steps_by_name(full_run["summary"])["TuneHyperparameters"]["logs"]:
        text = Path(log).read_text()
        assert re.search(r"training images in \S*/input/data/train\b", text), text[-2000:]
        assert "computed backbone features" not in text
    assert "trials, each training the whole network on the images" in full_run["out"]


def test_training_jobs_run_through_the_training_toolkit(full_run):
    """Each training job says which path ran it; one host always goes through sagemaker-training."""
    summary = full_run["summary"]
    steps = steps_by_name(summary)
    runners = {name: steps[name]["details"]["runner"] for name in ("TrainSingleInstance", "TrainMultiInstance")}
    runners.update({trial["name"]: trial["runner"] for trial in steps["TuneHyperparameters"]["details"]["trials"]})
    single = {name: runner for name, runner in runners.items() if name != "TrainMultiInstance"}
    assert all(runner.startswith("toolkit: sagemaker-training's entry point, one host") for runner in single.values()), single
    namespaces = os.geteuid() == 0 and all(shutil.which(tool) for tool in ("unshare", "nsenter", "ip"))
    multi = runners["TrainMultiInstance"]
    assert multi.startswith("toolkit: " if namespaces else ("toolkit: ", "launcher: ")), multi
    for name in ("TrainSingleInstance", "TrainMultiInstance"):
        log = (full_run["workdir"] / "jobs" / steps[name]["job_name"] / "logs" / "algo-1.log").read_text()
        assert f"runs through the {runners[name].split(':', 1)[0]}" in log
        if runners[name].startswith("toolkit"):
            assert "Reporting training SUCCESS" in log
    if multi.startswith("toolkit"):
        log = (full_run["workdir"] / "jobs" / steps["TrainMultiInstance"]["job_name"] / "logs" / "algo-7.log").read_text()
        assert '"master_hostname": "algo-1"' in log and '"current_host": "algo-7"' in log


def test_corrupt_image_is_dropped_and_listed_in_the_manifest(full_run):
    manifest = full_run["summary"]["manifest"]
    dropped = {item["path"]: item["reason"] for item in manifest["dropped"]}
    relative = full_run["corrupt"].relative_to(full_run["sample"].root).as_posix()
    assert relative.endswith(CORRUPT_NAME) and list(dropped) == [relative]
    assert dropped[relative]
    assert manifest["classes"] == list(full_run["sample"].classes)
    assert f"dropped: {relative}" in full_run["out"]


def test_evaluations_registry_and_endpoint_checks(full_run):
    summary = full_run["summary"]
    steps = steps_by_name(summary)
    classes = set(full_run["sample"].classes)
    for variant in ("SingleInstance", "MultiInstance"):
        accuracy = summary["test_accuracy"][f"Evaluate{variant}"]
        assert 0.7 <= accuracy <= 1.0
        outputs = steps[f"Evaluate{variant}"]["details"]["outputs"]["evaluation"]
        assert (Path(outputs) / "evaluation.json").is_file() and (Path(outputs) / "confusion_matrix.png").is_file()
        archive = Path(steps[f"Evaluate{variant}"]["details"]["outputs"]["model"]) / "model.tar.gz"
        with tarfile.open(archive) as tar:
            assert "serving_model.pt" in tar.getnames()
        assert steps[f"Register{variant}"]["status"] == "Succeeded"
        deploy = steps[f"Deploy{variant}"]["details"]["outputs"]
        check = steps[f"Check{variant}"]["details"]["outputs"]
        assert deploy["action"] == "created"
        assert check["endpoint_name"] == deploy["endpoint_name"]
        assert check["status"] == "InService" and check["top_label"] in classes
    answered = {(item["endpoint"], item["status"]) for item in summary["endpoint_invocations"]}
    assert answered == {("dogbreed-single-instance", 200), ("dogbreed-multi-instance", 200)}
    # the endpoints serve the archive the evaluations wrote: its stored artifact, loaded without building
    logs = sorted((full_run["workdir"] / "endpoints").glob("*/*/container.log"))
    assert len(logs) == 2 and all("(torchscript, stored artifact)" in log.read_text() for log in logs)
    assert "Test accuracy" in full_run["out"] and "model.tar.gz" in full_run["out"]


def test_no_connection_leaves_the_loopback(full_run):
    inet = [(family, address) for family, address in full_run["connections"]
            if family in (socket.AF_INET, socket.AF_INET6)]
    assert inet, "the run made no TCP connection in this process: the recorder did not see moto or the endpoints"
    assert all(is_loopback(address) for _, address in inet), [a for _, a in inet if not is_loopback(a)]
    lines = [line.split(" ", 2) for line in full_run["child_connections"]]
    started = " ".join(line[2] for line in lines if line[1] == "loaded")
    for script in ("preprocess.py", "train.py", "evaluate.py"):
        assert script in started, f"the recorder was not loaded by the {script} processes"
    connects = [line for line in lines if line[1] != "loaded"]
    remote = [line for line in connects if int(line[1]) in (socket.AF_INET, socket.AF_INET6)
              and not re.match(r"^\('(127\.\d+\.\d+\.\d+|::1|localhost)'", line[2])]
    assert remote == []



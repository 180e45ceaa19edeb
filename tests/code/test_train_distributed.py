"""code/train.py as two real processes joined by torch.distributed (gloo) on localhost."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colour_images import make_dataset
from pipeline.local.jobs import free_port
from real_images import write_digits
from test_train import SMALL, TRAIN_SCRIPT, accuracy_on_test_split, clean_env, head_only, metric_lines, write_backbone_weights

import arguments
import common
import contract
import train

pytestmark = pytest.mark.slow

HOSTS = ["algo-1", "algo-2"]


def finished_outputs(processes: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Every process's output; all are killed if one fails, since the others would wait for it."""
    try:
        outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output
    return outputs


def parameter_digests(output: str) -> dict[int, str]:
    return {int(epoch): digest for epoch, digest in re.findall(r"epoch (\d+) took .* parameters (\w+)", output)}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    # 15 validation images: the ranks' validation shards differ in length (8 and 7).
    return make_dataset(tmp_path / "data", classes=3, per_split={"train": 12, "valid": 5})


def test_two_sagemaker_hosts_train_one_model(data: Path, tmp_path: Path) -> None:
    port = str(free_port())
    processes = []
    for host in HOSTS:
        job = tmp_path / host
        env = clean_env(SM_HOSTS=json.dumps(HOSTS), SM_CURRENT_HOST=host, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                        SM_CHANNEL_TRAIN=str(data / "train"), SM_CHANNEL_VALID=str(data / "valid"),
                        SM_MODEL_DIR=str(job / "model"), SM_OUTPUT_DATA_DIR=str(job / "output"))
        args = SMALL + ["--epochs", "2", "--batch-size", "4", "--freeze-backbone", "false", "--learning-rate", "0.02",
                        "--checkpoint-dir", str(job / "checkpoints")]
        processes.append(subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args], env=env, cwd=tmp_path,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    rank0, rank1 = finished_outputs(processes)

    threads = max(1, arguments.usable_cpus() // 2)
    for rank, output in enumerate((rank0, rank1)):
        assert f"[rank {rank}/2] device cpu, {threads} CPU threads" in output
        assert output.count("training 36 images (18 on this rank)") == 2
    assert len(metric_lines(rank0)) == 2 and metric_lines(rank0) == metric_lines(rank1)
    digests = parameter_digests(rank0)
    assert digests == parameter_digests(rank1) and digests[1] != digests[2]

    written = tmp_path / HOSTS[0]
    assert sorted(p.name for p in (written / "checkpoints").iterdir()) == ["checkpoint.pth"]
    assert not (tmp_path / HOSTS[1]).exists()
    model, _, info = common.load_model_dir(written / "model")
    assert train.parameters_digest(model) == digests[info["best_epoch"]]
    assert info["world_size"] == 2


def test_torchrun_ranks_share_cached_features(data: Path, tmp_path: Path) -> None:
    """Under torchrun each rank computes half of the features and gathers the rest."""
    env = clean_env()
    weights = write_backbone_weights(tmp_path / "weights" / "resnet18.pth")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(TRAIN_SCRIPT), *head_only(weights), "--data", str(data),
               "--model-dir", str(tmp_path / "model"), "--epochs", "2", "--batch-size", "4", "--learning-rate", "0.05",
               "--augment", "false", "--cache-features", "true"]
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (output,) = finished_outputs([process])

    lines = metric_lines(output)
    assert len(lines) == 4 and lines[0] == lines[1] and lines[2] == lines[3], output
    assert output.count("computed backbone features of 36 training and 15 validation images") == 2
    assert output.count("(18 on this rank)") == 4
    by_rank = [parameter_digests("\n".join(l for l in output.splitlines() if f"[rank {r}/2]" in l)) for r in (0, 1)]
    assert by_rank[0] == by_rank[1] and len(by_rank[0]) == 2
    state = torch.load(tmp_path / "model" / contract.MODEL_FILE, weights_only=True)
    assert state["fc.weight"].shape == (3, 512)


# ---------------------------------------------------------------------------- 7 instances train as well as 1

REAL_SPLIT = {"train": 20, "valid": 5, "test": 20}  # per class, 10 classes: 200 / 50 / 200 images
# The recipe's defaults (warm-up, cosine, label smoothing, random crops), flips off for digits.
REAL_ARGS = SMALL + ["--epochs", "2", "--batch-size", "32", "--flip", "false", "--patience", "0", "--seed", "3",
                     "--num-threads", "1"]
# Measured: test accuracy 0.675 on 1 process, 0.660 on 7 (seed 3; the runs differ only by float summation
# order, which training amplifies; half of the two epochs is warm-up). benchmarks/model_quality.py measures
# the gap over seeds; the accuracy floor of the recipe is test_train.py's.
ACCURACY_GAP = 0.03


def launch_job(data: Path, job: Path, hosts: int, args: list[str]) -> list[subprocess.Popen]:
    """A training job of ``hosts`` instances as SageMaker starts it: one process per host, SM_HOSTS listing them all."""
    names = [f"algo-{i}" for i in range(1, hosts + 1)]
    port = str(free_port())
    processes = []
    for host in names:
        env = clean_env(SM_CHANNEL_TRAIN=str(data / "train"), SM_CHANNEL_VALID=str(data / "valid"),
                        SM_MODEL_DIR=str(job / "model"), SM_OUTPUT_DATA_DIR=str(job / "output"))
        if hosts > 1:
            env.update(SM_HOSTS=json.dumps(names), SM_CURRENT_HOST=host, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        processes.append(subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args], env=env, cwd=job,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return processes


def test_seven_instances_train_as_well_as_one(tmp_path: Path) -> None:
    """Real scans, whole network from random weights: the global batch rule keeps steps, batches and accuracy."""
    data = write_digits(tmp_path / "digits", per_class=REAL_SPLIT)
    jobs = {count: tmp_path / f"job{count}" for count in (1, 7)}
    for job in jobs.values():
        job.mkdir()
    outputs = {count: finished_outputs(launch_job(data, job, count, REAL_ARGS)) for count, job in jobs.items()}

    histories = {count: json.loads((job / "output" / train.METRICS_HISTORY_FILE).read_text()) for count, job in jobs.items()}
    assert [h["optimizer_steps"] for h in histories[1]] == [7] * 2  # ceil(200 / 32)
    assert [h["optimizer_steps"] for h in histories[7]] == [h["optimizer_steps"] for h in histories[1]]
    # Each global batch of 32 is 5 + 5 + 5 + 5 + 4 + 4 + 4 images; the last one, of 8, is 2 + 1 + ... + 1.
    per_rank = [int(re.findall(r"training 200 images \((\d+) on this rank\)", out)[-1]) for out in outputs[7]]
    assert per_rank == [32, 31, 31, 31, 25, 25, 25]
    assert len({tuple(metric_lines(out)) for out in outputs[7]}) == 1  # every rank reports the same validation
    accuracy = {count: accuracy_on_test_split(job / "model", data / "test") for count, job in jobs.items()}
    assert min(accuracy.values()) >= 0.5, accuracy  # chance is 0.1
    assert abs(accuracy[7] - accuracy[1]) <= ACCURACY_GAP, accuracy
    assert json.loads((jobs[7] / "model" / contract.MODEL_INFO_FILE).read_text())["world_size"] == 7

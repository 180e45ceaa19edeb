"""Processes, devices and seeds of a training job, and each rank's share of the data.

As in torchvision's ``references/classification/utils.py`` (``init_distributed_mode``),
one call reads the environment that torchrun or SageMaker sets and joins the
process group (``process_group``); ``training_device``, ``autocast`` and ``to_device`` place the
work on this process's GPU (mixed precision, channels-last) or the CPU. The rest is what every rank must agree on:
seeds derived from (seed, epoch, rank or index), the shard of a global batch or
of a split each rank takes (``GlobalBatchSampler``, ``shard_indices``), the
collectives that sum or gather over ranks, and ``GlobalBatchNorm2d``, whose
statistics are those of the whole global batch.

Runs inside SageMaker's PyTorch training container: torch, numpy and the standard library only.
"""
from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import math
import os
import random
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler

DEFAULT_MASTER_PORT = "29500"
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


class DistributedSetupError(ValueError):
    """The environment describes no process group this process can join; the message says what to set."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def sagemaker_hosts() -> list[str]:
    raw = os.environ.get("SM_HOSTS")
    if not raw:
        return []
    try:
        hosts = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DistributedSetupError(f"SM_HOSTS is not JSON ({err}): {raw!r}; expected a list such as [\"algo-1\", \"algo-2\"]") from None
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise DistributedSetupError(f"SM_HOSTS must be a JSON list of host names, got {raw!r}")
    return hosts


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def processes_on_this_machine() -> int:
    """How many training processes share this machine's cores.

    torchrun says so in LOCAL_WORLD_SIZE; a local run of an N-host job starts N
    processes with SM_HOSTS listing N hosts and MASTER_ADDR on the loopback.
    """
    if os.environ.get("LOCAL_WORLD_SIZE", "").isdigit():
        return max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
    try:
        hosts = sagemaker_hosts()
    except DistributedSetupError:
        hosts = []
    if len(hosts) > 1 and is_loopback(os.environ.get("MASTER_ADDR", "")):
        return len(hosts)
    return 1


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str) -> DistInfo:
    """Join the process group that torchrun or SageMaker's host list describes, or run alone.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK and MASTER_ADDR/MASTER_PORT. SageMaker
    starts one process per host with SM_HOSTS and SM_CURRENT_HOST; the first host
    is the master unless MASTER_ADDR/MASTER_PORT say otherwise (local runs).
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", 0))
        if world_size > 1:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                    timeout=PROCESS_GROUP_TIMEOUT)
        return DistInfo(rank, world_size, local_rank)
    hosts = sagemaker_hosts()
    if len(hosts) <= 1:
        return DistInfo()
    current = env.get("SM_CURRENT_HOST", "")
    if current not in hosts:
        raise DistributedSetupError(f"SM_CURRENT_HOST {current!r} is not in SM_HOSTS {hosts}; set it to this process's host name")
    rank = hosts.index(current)
    address = env.get("MASTER_ADDR", hosts[0])
    port = env.get("MASTER_PORT", DEFAULT_MASTER_PORT)
    if "SM_NETWORK_INTERFACE_NAME" in env and not is_loopback(address):
        env.setdefault("GLOO_SOCKET_IFNAME", env["SM_NETWORK_INTERFACE_NAME"])
        env.setdefault("NCCL_SOCKET_IFNAME", env["SM_NETWORK_INTERFACE_NAME"])
    local_rank = rank if is_loopback(address) else 0
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank,
                            world_size=len(hosts), timeout=PROCESS_GROUP_TIMEOUT)
    return DistInfo(rank, len(hosts), local_rank)


@contextlib.contextmanager
def process_group() -> Iterator[DistInfo]:
    """This process's place in the group (see ``init_distributed``); the group is left on exit."""
    try:
        yield init_distributed(default_backend())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def training_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", index)
    return torch.device("cpu")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def to_device(inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    inputs = inputs.to(device, non_blocking=True)
    if device.type == "cuda" and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs


def configure_logging(logger: logging.Logger, dist_info: DistInfo) -> None:
    """``logger`` to stdout, each line naming its rank, since the ranks of a local run share one log."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s [rank {dist_info.rank}/{dist_info.world_size}] %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def derived_seed(*parts: int) -> int:
    """A seed that depends on every part (seed, epoch, rank or sample index), the same on every machine."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_slice(size: int, dist_info: DistInfo) -> slice:
    """This rank's contiguous part of a global batch of ``size``: the first ``size % N`` ranks take one more."""
    base, extra = divmod(size, dist_info.world_size)
    start = dist_info.rank * base + min(dist_info.rank, extra)
    return slice(start, start + base + (dist_info.rank < extra))


class GlobalBatchSampler(Sampler):
    """This rank's share of each global batch: the multi-instance rule.

    Every epoch the whole training set is shuffled with (seed, epoch) alone, the
    same permutation for every process count, and cut into global batches of
    ``batch_size``. Each of the N ranks takes a contiguous slice of each global
    batch (sizes differ by at most one), so N processes make the same optimizer
    steps on the same images as one process does; ``global_sizes`` lets the loss
    be weighted so that averaging gradients over ranks gives the global batch's mean.
    The last global batch is dropped when it cannot give every rank an image, or
    when it is a single image and batch norm trains (its statistics need two).

    With ``seeded`` each index comes with a seed derived from (seed, epoch,
    index), so augmentation is the same whatever the rank, worker or restart.
    """

    def __init__(self, length: int, batch_size: int, dist_info: DistInfo, seed: int, batch_norm_trains: bool,
                 seeded: bool) -> None:
        self.length, self.batch_size, self.dist_info, self.seed = length, batch_size, dist_info, seed
        self.seeded, self.epoch = seeded, 0
        last = length % batch_size
        smallest = max(dist_info.world_size, 2 if batch_norm_trains else 1)
        self.drop_last = 0 < last < smallest

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_sizes(self) -> list[int]:
        full, last = divmod(self.length, self.batch_size)
        return [self.batch_size] * full + ([last] if last and not self.drop_last else [])

    def __iter__(self) -> Iterator[list[Any]]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        order = torch.randperm(self.length, generator=generator).tolist()
        start = 0
        for size in self.global_sizes():
            mine = order[start:start + size][rank_slice(size, self.dist_info)]
            start += size
            yield [(index, derived_seed(self.seed, self.epoch, index)) for index in mine] if self.seeded else mine

    def __len__(self) -> int:
        return len(self.global_sizes())


class SeededDataset(Dataset):
    """Applies the wrapped dataset's random transform under the seed its sampler chose."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def shard_indices(length: int, dist_info: DistInfo, pad: bool) -> list[int]:
    """This rank's share of ``range(length)``; padded to the same length on every rank when ``pad``."""
    indices = list(range(dist_info.rank, length, dist_info.world_size))
    if pad:
        per_rank = math.ceil(length / dist_info.world_size)
        indices += indices[: per_rank - len(indices)]
    return indices


def all_reduce_sums(values: Sequence[float], device: torch.device, dist_info: DistInfo) -> list[float]:
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    if dist_info.enabled:
        dist.all_reduce(totals)
    return totals.tolist()


def gathered(tensor: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
    """Every rank's ``tensor`` (all of the same shape), concatenated in rank order."""
    if not dist_info.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist_info.world_size)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def from_main(value: Any, dist_info: DistInfo) -> Any:
    """Rank 0's ``value`` (any picklable object), on every rank."""
    if not dist_info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def summed_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    total = tensor.clone()
    dist.all_reduce(total)
    return total


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: each rank's input gradient is the sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return summed_over_ranks(tensor)

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> torch.Tensor:
        return summed_over_ranks(gradient)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole global batch, over every rank.

    Each rank holds only 1/N of a global batch, often a handful of images: their
    own statistics would make N processes train a different (noisier) model than
    one process. Sums are all-reduced with the autograd-aware collective, so the
    backward pass is exact too. torch's SyncBatchNorm does this on GPUs only; this
    one runs on any backend (gloo on CPU instances, NCCL on GPUs). The state dict
    is BatchNorm2d's, so the saved model loads into a plain ResNet.
    """

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(inputs)
        values = inputs.float()
        wide = values.double()  # sums of squares in float64: E[x^2] - E[x]^2 loses little
        count = torch.full((1,), values.numel() / values.shape[1], dtype=wide.dtype, device=values.device)
        totals = _SumOverRanks.apply(torch.cat([wide.sum((0, 2, 3)), (wide * wide).sum((0, 2, 3)), count]))
        channels = self.num_features
        n = totals[-1]
        mean = (totals[:channels] / n).float()
        variance = (totals[channels:2 * channels] / n - (totals[:channels] / n) ** 2).clamp_min(0).float()
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(variance.detach() * (n / (n - 1).clamp_min(1)), alpha=factor)
        shape = (1, channels, 1, 1)
        normalized = (values - mean.view(shape)) * torch.rsqrt(variance.view(shape) + self.eps)
        if self.affine:
            normalized = normalized * self.weight.view(shape) + self.bias.view(shape)
        return normalized.to(inputs.dtype)


def with_global_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d replaced by a GlobalBatchNorm2d holding the same parameters and statistics."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats).to(child.weight.device)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            with_global_batch_norm(child)
    return module

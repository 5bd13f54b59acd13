"""Several processes, one job: DistributedDataParallel training and sharded prediction.

``torchrun`` (or one ``torchrun`` per node under SLURM) starts one process per GPU and tells each its
place through ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init` reads them, joins the process
group (NCCL on GPUs, gloo on the CPU) and returns a :class:`DistInfo`. Training (``training.py``)
splits each global batch over the ranks, wraps the model in DDP and lets rank 0 alone write files;
prediction (``predict.py``) gives each rank every ``world_size``-th case and lets rank 0 merge the
ranks' reports. In a single process every helper here is a no-op, so the calling code reads the same
with and without DDP. The collectives act only while a process group is initialized; callers make
sure all ranks reach them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from segpipe.core.atomic import read_json, write_json

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its global ``rank`` of ``world_size``, and its GPU on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def from_env(env: Mapping[str, str] | None = None) -> DistInfo:
    """The ``DistInfo`` that torchrun's environment variables describe (single process without them)."""
    env = os.environ if env is None else env
    info = DistInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"RANK={info.rank} is outside WORLD_SIZE={info.world_size}")
    return info


def init(device: str = "auto", timeout: timedelta | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (NCCL if this rank uses a GPU, else gloo) and
    make ``cuda`` mean this rank's GPU (``LOCAL_RANK``). Returns :data:`SINGLE` when not launched so."""
    info = from_env()
    if not info.enabled or dist.is_initialized():
        return info
    if not dist.is_available():
        raise RuntimeError("launched by torchrun, but this torch build has no torch.distributed")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return info


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _tensor_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if _active():
        dist.barrier()


def agree(value: float) -> float:
    """Rank 0's ``value`` on every rank (e.g. its clock, so all ranks stop at the same iteration)."""
    if not _active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_tensor_device())
    dist.broadcast(t, src=0)
    return float(t.item())


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Element-wise sum of ``values`` over the ranks (a copy; float64)."""
    values = np.asarray(values, dtype=np.float64)
    if not _active():
        return values.copy()
    t = torch.from_numpy(values.copy()).to(_tensor_device())
    dist.all_reduce(t)
    return t.cpu().numpy()


def mean_over_ranks(value: float) -> float:
    return float(all_reduce_sum(np.array([value]))[0]) / (dist.get_world_size() if _active() else 1)


@contextlib.contextmanager
def main_first(info: DistInfo) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. to create ``splits.json``); the others run it after."""
    if info.enabled and not info.is_main:
        barrier()
    yield
    if info.enabled and info.is_main:
        barrier()


def device_for(device: torch.device, info: DistInfo) -> torch.device:
    """A CUDA device becomes this rank's GPU (``cuda:LOCAL_RANK``) under DDP."""
    return torch.device("cuda", info.local_rank) if info.enabled and device.type == "cuda" else device


def per_rank_batch(global_batch: int, info: DistInfo) -> int:
    """Each rank's share of the planned (global) batch; it must split evenly, so that DDP's average of
    the ranks' gradients is the gradient of the global batch."""
    if global_batch % info.world_size:
        raise ValueError(
            f"the planned batch size {global_batch} does not split over {info.world_size} processes: start a "
            f"number of processes that divides it, or set a multiple of {info.world_size} as the configuration's "
            "batch_size in plans.json (for a new run)"
        )
    return global_batch // info.world_size


def per_rank_oversample(global_batch: int, fraction: float, info: DistInfo) -> float:
    """This rank's share of foreground-centred patches, so that the global batch has as many, in the
    same places (its last samples), as one process drawing the whole batch would: with a batch of 2
    split over 2 ranks, rank 0 draws anywhere and rank 1 on foreground."""
    if not info.enabled:
        return fraction
    local = global_batch // info.world_size
    anywhere = round(global_batch * (1 - fraction))  # as PatchBatches.make_batch counts them
    forced = min(max((info.rank + 1) * local - anywhere, 0), local)
    return forced / local


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``model`` in DDP under torchrun (rank 0's weights are broadcast to all ranks here); else itself."""
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sync_gradients(model: nn.Module, now: bool) -> contextlib.AbstractContextManager:
    """Around forward + backward: skip DDP's gradient all-reduce unless ``now`` (accumulation steps)."""
    if now or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def shard(items: Sequence[T], info: DistInfo) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th one starting at ``rank``."""
    return list(items[info.rank :: info.world_size])


def rank_report_path(folder: Path, name: str, rank: int) -> Path:
    return folder / f"{name}.rank{rank}.json"


def gather_reports(folder: Path, name: str, report: dict[str, Any], info: DistInfo) -> list[dict[str, Any]]:
    """Write this rank's ``report`` as ``folder/<name>.rank<k>.json``; after all ranks have, rank 0
    reads and returns every rank's report (in rank order), the others an empty list. ``folder`` must be
    shared by the ranks (on several nodes: a shared file system, as for the outputs themselves)."""
    write_json(rank_report_path(folder, name, info.rank), {**report, "rank": info.rank, "world_size": info.world_size})
    barrier()
    if not info.is_main:
        return []
    reports = []
    for rank in range(info.world_size):
        path = rank_report_path(folder, name, rank)
        if not path.exists():
            raise FileNotFoundError(f"{path}: rank {rank} wrote no report (is {folder} shared by all nodes?)")
        reports.append(read_json(path))
    return reports

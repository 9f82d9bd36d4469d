"""Data-parallel training with ``torch.distributed`` (DDP), launched by ``torchrun``.

    torchrun --nproc_per_node 2 -m chatforge.cli train CONFIG      # or: chatforge train CONFIG --nproc 2

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; :func:`init_distributed`
reads them and joins the process group with NCCL on GPUs and gloo on CPU. ``train.batch_size``
stays the *global* batch: each of the N ranks loads batch_size / N examples per step through a
:class:`~torch.utils.data.DistributedSampler`, and DDP averages gradients, so N processes take
the same optimizer steps as one process would over the same global batch (for losses that are
means over equally sized per-rank batches). Only rank 0 tracks, checkpoints and saves the bundle.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = DistributedContext()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer (torchrun sets it)") from None


def launched_distributed() -> bool:
    """True when this process was started by torchrun (or equivalent) with more than one rank."""
    return _env_int("WORLD_SIZE", 1) > 1


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group described by torchrun's environment; a no-op for one process."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return SINGLE
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    log.info("distributed: rank %d/%d (local %d), backend %s", rank, world, local_rank, backend)
    return DistributedContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def distributed_device(device: torch.device, ctx: DistributedContext) -> torch.device:
    """One GPU per rank: cuda -> cuda:LOCAL_RANK; CPU stays CPU."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def per_rank_batch_size(global_batch: int, ctx: DistributedContext) -> int:
    if global_batch % ctx.world_size:
        raise ValueError(
            f"train.batch_size={global_batch} is the global batch and must be divisible by the number "
            f"of processes ({ctx.world_size}); use e.g. {global_batch - global_batch % ctx.world_size or ctx.world_size}"
        )
    return global_batch // ctx.world_size


def broadcast_object(obj: Any, ctx: DistributedContext) -> Any:
    """Rank 0's ``obj`` on every rank (run folder names, tokenizer bytes)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistributedContext) -> None:
    if ctx.enabled:
        dist.barrier()


def cleanup(ctx: DistributedContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """The torchrun command line running ``chatforge <args>`` on ``nproc`` local processes."""

    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "chatforge.cli", *args]

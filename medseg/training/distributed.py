"""Distributed data-parallel training under ``torchrun``: who this process is, and the few collective
steps the Trainer needs (NCCL on GPUs, gloo on CPU).

``torchrun`` (or ``medseg train --nproc N``) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address; without them the run is one process and every function here is a no-op.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from medseg.errors import ConfigError

log = logging.getLogger(__name__)

# Validation runs on rank 0 while the other ranks wait at a barrier: allow it to take long.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job: rank, world size, local rank (its GPU on the node), device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and logs progress."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a small picklable object, e.g. a stop decision)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, items: list) -> list:
        """Every process's ``items`` (picklable), concatenated in rank order, on every process."""
        if not self.enabled:
            return list(items)
        boxes: list = [None] * self.world_size
        dist.all_gather_object(boxes, list(items))
        return [item for box in boxes for item in box]

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group ``torchrun`` describes (NCCL when training on CUDA, else gloo), or a
    one-process context. On CUDA each process takes the GPU of its local rank."""
    if not launched_by_torchrun():
        return DistributedContext(device=device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible): "
                              "start at most one process per GPU (--nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    # Channels-last 1x1x1 convolutions: a size-1 dimension's stride is arbitrary, so DDP's bucket layout
    # check fires without any cost behind it.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    if rank != 0:
        logging.getLogger("medseg").setLevel(logging.WARNING)  # one voice: rank 0 reports progress
    return DistributedContext(rank, world, local, device)


def relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``medseg <argv>`` as ``nproc`` processes on this machine under torchrun (``--standalone``
    rendezvous on a free local port); returns torchrun's exit status."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "medseg", *argv]
    log.info("starting %d training processes: %s", nproc, " ".join(cmd[1:]))
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        # torchrun would give each process 1 thread; share this machine's cores among them instead.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return subprocess.call(cmd, env=env)

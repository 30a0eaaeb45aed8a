"""``ratebp train`` on several processes: the world it runs in, and the launcher of ``--nproc``.

Under ``torchrun`` (or ``--nproc N``, which runs ``torchrun --standalone --nproc-per-node N`` on this
machine) every process trains the same model on its share of each batch (``DistributedDataParallel``);
the process of rank 0 prints and writes the record and the checkpoints. Without them, the world is one
process and nothing of ``torch.distributed`` is used.

Several machines are ``torchrun``'s job::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m ratebp_compile.cli train ...
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .data import CLIError

__all__ = ["World", "join_world", "launch", "COLLECTIVE_TIMEOUT"]

#: Seconds a collective waits for the other processes before the run fails.
COLLECTIVE_TIMEOUT = 600


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process reports and writes files (rank 0)."""
        return self.rank == 0

    def sum(self, values: Sequence[float], device: torch.device) -> List[float]:
        """``values`` summed over the processes (float64)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: float, device: torch.device) -> float:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Every process takes rank 0's buffers (BatchNorm running statistics), as DDP does before a forward."""
        if self.size > 1:
            for b in model.buffers():
                dist.broadcast(b, 0)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def leave(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def join_world(device: torch.device) -> "tuple[World, torch.device]":
    """The world ``torchrun`` started this process in (its environment: ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``), joined (NCCL for CUDA, gloo for the CPU), and this process's device (its own GPU);
    a world of one without them."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise CLIError(f"process {rank} has local rank {local_rank}, but this machine has "
                           f"{torch.cuda.device_count()} CUDA devices: run at most that many per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
    return World(rank, size, local_rank), device


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``ratebp train argv`` on ``nproc`` processes of this machine (``torchrun --standalone``; gloo on the
    loopback interface for CPU runs); returns the exit status (that of the first process that failed)."""
    from torch.distributed.run import main as torchrun

    if nproc < 1:
        raise CLIError(f"--nproc must be at least 1, got {nproc}")
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        with tempfile.TemporaryDirectory(prefix="ratebp-torchrun-") as logs:  # else torchrun leaves one in /tmp
            torchrun(["--standalone", "--nproc-per-node", str(nproc), "--log-dir", logs, "--module",
                      "ratebp_compile.cli", "train", *argv])
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:               # torchrun's ChildFailedError: each failed process's error is above
        print(f"ratebp train: a process failed: {type(e).__name__}", file=sys.stderr)
        return 1
    return 0

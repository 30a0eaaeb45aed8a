"""The collectives of a synchronised BatchNorm: process groups named by a string, and three custom ops.

The compiled graphs refer to a process group by a key (``"WORLD"``: the default group, resolved at each
call; otherwise the name of a group given to ``sync_batchnorm=``), so that ``show`` prints it and the
graphs stay plain Python. The ops are ``torch.library`` custom ops, opaque to the compilers the
``torch.compile`` backend runs on the spike and rate graphs, and each decides at run time whether there
is anyone to talk to: with ``torch.distributed`` not initialised, or a group of one process, they are
local (a model that synchronises its BatchNorms trains on one process as it would without).

- ``global_moments(mean, var, count, group)``: per-channel mean and biased variance of every rank's
  batch from each rank's own (one all-gather, combined exactly in float64 in rank order), and the
  total count. Ranks must hold batches of the same size (a ``DistributedSampler`` gives them that);
  otherwise every rank raises the same error.
- ``sum_over_ranks(x, group)``: the sum of ``x`` over the ranks (an all-reduce); its gradient is the sum
  of the ranks' gradients (an all-reduce in the backward).
- ``sum_gradient_over_ranks(x, group)``: ``x`` itself, whose gradient is the sum of the ranks' gradients.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from .errors import RateBPError

__all__ = ["WORLD", "group_key", "process_group", "world_size", "global_moments", "sum_over_ranks",
           "sum_gradient_over_ranks"]

WORLD = "WORLD"
_GROUPS: Dict[str, object] = {}


def group_key(group) -> Optional[str]:
    """The key of a process group: None for None or False (no group), ``"WORLD"`` for True or the default
    group, else the group's name (the group is kept for the graphs that name it)."""
    if group is None or group is False:
        return None
    if group is True:
        return WORLD
    if isinstance(group, str):
        if group == WORLD or group in _GROUPS:
            return group
        raise RateBPError(f"unknown process group key {group!r}: pass True (the default group) or a ProcessGroup")
    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise RateBPError(f"sync_batchnorm must be None, True or a torch.distributed ProcessGroup, got {group!r}")
    if dist.is_initialized() and group is dist.group.WORLD:
        return WORLD
    key = f"group:{group.group_name}"
    _GROUPS[key] = group
    return key


def process_group(key: str):
    """The group a key names now; None when ``torch.distributed`` is not initialised (then there is no one
    to synchronise with)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.group.WORLD if key == WORLD else _GROUPS[key]


def world_size(key: Optional[str]) -> int:
    """Processes in the group ``key`` names now (1 without a group or without ``torch.distributed``)."""
    group = None if key is None else process_group(key)
    return 1 if group is None else dist.get_world_size(group)


@torch.library.custom_op("ratebp::global_moments", mutates_args=())
def global_moments(mean: torch.Tensor, var: torch.Tensor, count: int, group: str
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean, var, total)`` over every rank's batch from this rank's ``mean`` and biased ``var`` (``[..., C]``)
    of ``count`` samples each; ``total`` is the number of samples of all ranks (float64, 0-dim)."""
    size = world_size(group)
    if size == 1:
        return mean.clone(), var.clone(), torch.tensor(float(count), dtype=torch.float64, device=mean.device)
    local = torch.cat([mean.double().reshape(-1), var.double().reshape(-1),
                       torch.tensor([float(count)], dtype=torch.float64, device=mean.device)])
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local, group=process_group(group))
    gathered = torch.stack(parts)
    counts = gathered[:, -1]
    if not bool((counts == counts[0]).all()):
        raise RateBPError(f"synchronised BatchNorm: the ranks' batches differ in size (samples per channel: "
                          f"{[int(c) for c in counts.tolist()]}); give every rank a batch of the same size "
                          f"(DistributedSampler, drop_last=True)")
    n = mean.numel()
    means, variances = gathered[:, :n], gathered[:, n:2 * n]
    global_mean = means.mean(0)
    global_var = variances.mean(0) + (means - global_mean).square().mean(0)
    total = counts.sum()
    return (global_mean.to(mean.dtype).reshape(mean.shape), global_var.to(var.dtype).reshape(var.shape), total)


@global_moments.register_fake
def _global_moments_fake(mean, var, count, group):
    return torch.empty_like(mean), torch.empty_like(var), mean.new_empty((), dtype=torch.float64)


@torch.library.custom_op("ratebp::sum_over_ranks", mutates_args=())
def sum_over_ranks(x: torch.Tensor, group: str) -> torch.Tensor:
    """The sum of ``x`` over the ranks of ``group``."""
    out = x.clone()
    if world_size(group) > 1:
        dist.all_reduce(out, group=process_group(group))
    return out


@sum_over_ranks.register_fake
def _sum_over_ranks_fake(x, group):
    return torch.empty_like(x)


def _sum_gradients(ctx, grad):
    return sum_over_ranks(grad.contiguous(), ctx.group), None


def _keep_group(ctx, inputs, output):
    ctx.group = inputs[1]


sum_over_ranks.register_autograd(_sum_gradients, setup_context=_keep_group)


@torch.library.custom_op("ratebp::sum_gradient_over_ranks", mutates_args=())
def sum_gradient_over_ranks(x: torch.Tensor, group: str) -> torch.Tensor:
    """``x``, whose gradient is the sum of the ranks' gradients."""
    return x.clone()


@sum_gradient_over_ranks.register_fake
def _sum_gradient_fake(x, group):
    return torch.empty_like(x)


sum_gradient_over_ranks.register_autograd(_sum_gradients, setup_context=_keep_group)

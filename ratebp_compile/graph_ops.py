"""Functions the compiled graphs call: the BatchNorm of both passes, time averaging, the gradient
bridge from the spike pass's outputs into the rate graph, and running-statistics updates.

They are plain functions of tensors and modules so that each appears as one readable node in the
graphs that ``ratebp_compile.show`` prints.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .nn.functional import rate_neuron

__all__ = ["without_grad", "spike_batch_norm", "spike_batch_norm_per_step", "per_step_batch_norm",
           "chunk_batch_norm", "chunk_batch_norm_", "rate_batch_norm", "batch_norm_no_update",
           "update_batch_norm_stats", "time_average", "route_gradient", "rate_neuron", "state_output",
           "dropout_mask"]


def without_grad(fn, *args):
    """``fn(*args)`` with autograd off: how the program runs its spike pass."""
    with torch.no_grad():
        return fn(*args)


def _stat_dims(x: torch.Tensor):
    return [d for d in range(x.dim()) if d != 1]


def spike_batch_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float):
    """Training-mode BatchNorm of the spike pass that also returns the batch statistics it used.

    Returns ``(y, mean, var)`` with the biased variance, both per channel (float32 for half inputs).
    Running statistics are not touched here: the program updates them once the step has succeeded
    (:func:`update_batch_norm_stats`).
    """
    y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    return y, mean, invstd.pow(-2) - eps


def per_step_batch_norm(x: torch.Tensor, bn: nn.Module, T: int) -> torch.Tensor:
    """A BatchNorm that a single-step model calls once per timestep, applied to all T steps at once:
    ``x`` is ``[T·B, ...]``; each step is normalised with its own statistics (training) and, as in the
    step-by-step model, the running statistics are updated once per step."""
    return torch.cat([bn(x_t) for x_t in x.chunk(T)])


def spike_batch_norm_per_step(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                              eps: float, T: int):
    """:func:`spike_batch_norm` of each of the T steps of ``x`` ``[T·B, ...]``: ``(y, means [T, C], vars [T, C])``."""
    outs = [spike_batch_norm(x_t, weight, bias, eps) for x_t in x.chunk(T)]
    return torch.cat([o[0] for o in outs]), torch.stack([o[1] for o in outs]), torch.stack([o[2] for o in outs])


def chunk_batch_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """The spike pass's training-mode BatchNorm on a chunk of the T steps, normalising with the mean and
    (biased) variance of all T steps, computed beforehand (``ratebp_compile.stream``)."""
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


def chunk_batch_norm_(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`chunk_batch_norm` in place, on an ``x`` nothing else reads: x·s + (β − mean·s) with
    s = γ/√(var + ε)."""
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    scale = (var + eps).rsqrt()
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return x.mul_(scale.view(shape)).add_(shift.view(shape))


def rate_batch_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """BatchNorm of the rate pass: normalises with the spike pass's statistics as values and
    differentiates through the rate input's own batch statistics.

    y = (x − m)/√(v + ε)·γ + β, where m has the value of the spike-pass mean and the derivative of
    ``x.mean``, and v has the value of the spike-pass variance and the derivative of ``x.var``.
    """
    dims = _stat_dims(x)
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    mean_x = x.mean(dims, keepdim=True)
    var_x = x.var(dims, unbiased=False, keepdim=True)
    m = mean.view(shape).to(x.dtype) + (mean_x - mean_x.detach())
    v = var.view(shape).to(x.dtype) + (var_x - var_x.detach())
    y = (x - m) / torch.sqrt(v + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def batch_norm_no_update(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         eps: float) -> torch.Tensor:
    """Training-mode BatchNorm on a static tensor in the rate pass (its running statistics are
    updated from the spike pass only)."""
    return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)


@torch.no_grad()
def update_batch_norm_stats(bn: Any, mean: torch.Tensor, var: torch.Tensor, count: int,
                            momentum: Optional[float] = None) -> None:
    """Update a BatchNorm's running statistics from one step's batch statistics, as
    ``nn.BatchNorm*`` does in training (unbiased variance, momentum or cumulative average).

    ``bn`` is an ``nn.BatchNorm*`` module, or a ``(running_mean, running_var)`` pair for the
    functional form with its ``momentum``. Statistics ``[T, C]`` of a per-step BatchNorm update once per
    step, in order.
    """
    if mean.dim() == 2:
        for mean_t, var_t in zip(mean, var):
            update_batch_norm_stats(bn, mean_t, var_t, count, momentum)
        return
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        if not bn.track_running_stats or bn.running_mean is None:
            return
        running_mean, running_var, momentum = bn.running_mean, bn.running_var, bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
    else:
        running_mean, running_var = bn
        if running_mean is None:
            return
    unbiased = var * (count / (count - 1)) if count > 1 else var
    running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def time_average(x: torch.Tensor, axis: int, merged: bool, T: int, dtype: Optional[torch.dtype] = None
                 ) -> torch.Tensor:
    """The rate pass's input: the mean over time, keeping a time dimension of length 1 (stacked)
    or the merged dimension divided by T; in ``dtype`` when given (an input of integers or booleans)."""
    if dtype is not None:
        x = x.to(dtype)
    if merged:
        return x.unflatten(axis, (T, -1)).mean(axis)
    return x.mean(axis, keepdim=True)


class _RouteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spike_value, rate_value, axis, merged, T, scale):
        ctx.axis, ctx.merged, ctx.T, ctx.scale = axis, merged, T, scale
        ctx.rate_shape = rate_value.shape
        return spike_value.detach()

    @staticmethod
    def backward(ctx, grad):
        if ctx.axis is not None:
            if ctx.merged:
                grad = grad.unflatten(ctx.axis, (ctx.T, -1)).sum(ctx.axis)
            else:
                grad = grad.sum(ctx.axis, keepdim=True)
        if ctx.scale != 1.0:
            grad = grad * ctx.scale
        return None, grad.reshape(ctx.rate_shape), None, None, None, None


def dropout_mask(x_seq: torch.Tensor, p: float, channels: bool = False) -> torch.Tensor:
    """A dropout mask for one step of ``x_seq`` ``[T, B, ...]`` (0 or 1/(1 − p); whole channels with
    ``channels``), drawn once and shared by every step — SpikingJelly's ``layer.Dropout``. The spike pass
    draws it and hands it to the rate pass, where mean_t(x_t·mask) = mean_t(x_t)·mask is exact."""
    ones = torch.ones_like(x_seq[0])
    return F.dropout2d(ones, p, training=True) if channels else F.dropout(ones, p, training=True)


class _StateOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, anchor, what):
        ctx.what, ctx.anchor_shape = what, anchor.shape
        return value.detach()

    @staticmethod
    def backward(ctx, grad):
        if grad is not None and bool(grad.ne(0).any()):
            from .errors import RateBPError
            raise RateBPError(f"the loss depends on {ctx.what}, a neuron's state the model returns: the rate-based "
                              f"step computes its value (the spike pass's) but no gradient flows through a "
                              f"neuron's state; compute the loss on spikes (or train with method='bptt')")
        return None, grad.new_zeros(ctx.anchor_shape) if grad is not None else None, None


def state_output(value: torch.Tensor, anchor: Optional[torch.Tensor], what: str) -> torch.Tensor:
    """An output of the training step that is a neuron's state read out (its membrane at every step): the
    spike pass's value; a backward that reaches it with a nonzero gradient raises instead of dropping
    it (``anchor``, any tensor of the step that requires grad, puts the output in the autograd graph)."""
    if anchor is None or not anchor.requires_grad:
        return value
    return _StateOutput.apply(value, anchor, what)


def route_gradient(spike_value: torch.Tensor, rate_value: torch.Tensor, axis: Optional[int] = None,
                   merged: bool = False, T: int = 1, scale: float = 1.0) -> torch.Tensor:
    """An output of the training step: the spike pass's exact ``spike_value``, whose gradient
    enters the rate graph at ``rate_value`` — summed over the T steps of a temporal output (time at
    ``axis``), times ``scale``."""
    if not (isinstance(rate_value, torch.Tensor) and rate_value.requires_grad):
        return spike_value
    return _RouteGradient.apply(spike_value, rate_value, axis, merged, T, scale)

"""Functions the compiled graphs call: the BatchNorm of both passes, time averaging, the gradient
bridge from the spike pass's outputs into the rate graph, and running-statistics updates.

They are plain functions of tensors and modules so that each appears as one readable node in the
graphs that ``ratebp_compile.show`` prints.

A BatchNorm synchronised over a process group (``group``: its key, ``ratebp_compile.collectives``) takes
its statistics over every rank's batch: the spike pass gathers each rank's per-channel moments, the rate
pass and BPTT differentiate through the global batch moments (their gradients summed over the ranks in
the backward, as ``nn.SyncBatchNorm`` does), and running statistics are updated from the global moments
with the global count. Without a group, everything is local.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .collectives import global_moments, sum_gradient_over_ranks, sum_over_ranks, world_size
from .kernels import batchnorm_cpu
from .nn.functional import rate_neuron

__all__ = ["without_grad", "batch_moments", "spike_batch_norm", "spike_batch_norm_per_step", "per_step_batch_norm",
           "chunk_batch_norm", "chunk_batch_norm_", "rate_batch_norm", "batch_norm_no_update", "sync_batch_norm",
           "update_batch_norm_stats", "time_average", "route_gradient", "rate_neuron", "state_output",
           "dropout_mask", "with_strides"]


def without_grad(fn, *args):
    """``fn(*args)`` with autograd off: how the program runs its spike pass."""
    with torch.no_grad():
        return fn(*args)


def with_strides(x: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """``x``'s values in a new tensor with the given strides (a copy, even when ``x`` has them already)."""
    return torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device).copy_(x)


def _stat_dims(x: torch.Tensor):
    return [d for d in range(x.dim()) if d != 1]


def _channel_shape(x: torch.Tensor):
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _count(x: torch.Tensor) -> int:
    """Samples per channel of a BatchNorm input ``[N, C, ...]``."""
    return x.numel() // x.shape[1]


def batch_moments(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a BatchNorm input ``[N, C, ...]``, in float32 for
    half-precision inputs (as ``native_batch_norm`` reports them; ``batch_norm_update_stats`` would round
    them to the input's dtype); on CPU through ``kernels.batchnorm_cpu`` where it takes x."""
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if batchnorm_cpu.usable(x):
        _, mean, var = batchnorm_cpu.batch_norm(x, None, None, 0.0, normalise=False)
        return mean, var
    return torch.batch_norm_update_stats(x, None, None, 0.0)


def spike_batch_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                     group: Optional[str] = None):
    """Training-mode BatchNorm of the spike pass that also returns the batch statistics it used.

    Returns ``(y, mean, var)`` with the biased variance, both per channel (float32 for half inputs), over
    every rank's batch when ``group`` is set. Running statistics are not touched here: the program updates
    them once the step has succeeded (:func:`update_batch_norm_stats`). On CPU, ``kernels.batchnorm_cpu``
    where it takes x (several times faster than ``native_batch_norm``'s statistics; equal to rounding).
    """
    if group is None:
        if batchnorm_cpu.usable(x, weight, bias):
            return batchnorm_cpu.batch_norm(x, weight, bias, eps)
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        return y, mean, invstd.pow(-2) - eps
    mean, var = batch_moments(x)
    mean, var, _ = global_moments(mean, var, _count(x), group)
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps), mean, var


def per_step_batch_norm(x: torch.Tensor, bn: nn.Module, T: int) -> torch.Tensor:
    """A BatchNorm that a single-step model calls once per timestep, applied to all T steps at once:
    ``x`` is ``[T·B, ...]``; each step is normalised with its own statistics (training) and, as in the
    step-by-step model, the running statistics are updated once per step."""
    return torch.cat([bn(x_t) for x_t in x.chunk(T)])


def spike_batch_norm_per_step(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                              eps: float, T: int, group: Optional[str] = None):
    """:func:`spike_batch_norm` of each of the T steps of ``x`` ``[T·B, ...]``: ``(y, means [T, C], vars [T, C])``
    (with a ``group``, the T steps' moments are gathered at once)."""
    if group is None:
        outs = [spike_batch_norm(x_t, weight, bias, eps) for x_t in x.chunk(T)]
        return torch.cat([o[0] for o in outs]), torch.stack([o[1] for o in outs]), torch.stack([o[2] for o in outs])
    steps = x.chunk(T)
    local = [batch_moments(x_t) for x_t in steps]
    means, variances, _ = global_moments(torch.stack([m for m, _ in local]), torch.stack([v for _, v in local]),
                                         _count(steps[0]), group)
    y = torch.cat([F.batch_norm(x_t, m, v, weight, bias, False, 0.0, eps) for x_t, m, v in zip(steps, means, variances)])
    return y, means, variances


def chunk_batch_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """The spike pass's training-mode BatchNorm on a chunk of the T steps, normalising with the mean and
    (biased) variance of all T steps, computed beforehand (``ratebp_compile.stream``)."""
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


def chunk_batch_norm_(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`chunk_batch_norm` in place, on an ``x`` nothing else reads: x·s + (β − mean·s) with
    s = γ/√(var + ε)."""
    shape = _channel_shape(x)
    scale = (var + eps).rsqrt()
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return x.mul_(scale.view(shape)).add_(shift.view(shape))


def _normalise(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], mean: torch.Tensor,
               var: torch.Tensor, eps: float, mean_x: torch.Tensor, var_x: torch.Tensor) -> torch.Tensor:
    """y = (x − m)/√(v + ε)·γ + β, where m has the value of ``mean`` and the derivative of ``mean_x``, and v
    the value of ``var`` and the derivative of ``var_x``.

    In float32 (float64): the values in the paper authors' order of operations, x̂ = (x − m)/√(v + ε), then
    x̂·γ + β; v's derivatives enter through γ's factor √((v + ε)/(v + ε + δv)), of value exactly 1, so that
    autograd keeps x̂ alone of x's size (through x̂'s √(v + ε) it kept x − m as well: a sixth of the
    rate-based step's peak, ResNet-18 width 16, batch 32). A half-precision ``x`` is
    normalised as the BatchNorm normalises it (``F.batch_norm``: in float32, rounded once), and the
    derivatives through m and v enter through a term whose value is exactly zero: −γ·s·δm − ½·γ·s³·(x − m)·δv,
    with s = 1/√(v + ε), δm = mean_x − mean_x (detached), δv likewise.
    """
    shape = _channel_shape(x)
    zero_m, zero_v = mean_x - mean_x.detach(), var_x - var_x.detach()
    if x.dtype not in (torch.float16, torch.bfloat16):
        m = mean.view(shape).to(x.dtype) + zero_m.view(shape).to(x.dtype)
        v_eps = var.view(shape).to(x.dtype) + eps
        x_hat = (x - m) / torch.sqrt(v_eps)
        # v's derivatives (of every order) through a per-channel factor of value exactly 1
        scale = torch.sqrt(v_eps / (v_eps + zero_v.view(shape).to(x.dtype)))
        y = x_hat * (scale if weight is None else weight.view(shape) * scale)
        if bias is not None:
            y = y + bias.view(shape)
        return y
    mean, var = mean.float(), var.float()
    y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
    invstd = (var + eps).rsqrt()
    scale = invstd if weight is None else invstd * weight
    shift = (scale * zero_m.float()).view(shape).to(x.dtype)
    slope = (0.5 * scale * invstd.square() * zero_v.float()).view(shape).to(x.dtype)
    return y - shift - slope * (x - mean.view(shape).to(x.dtype))


def _global_sums(x: torch.Tensor, group: str, reduce) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel: the sum of x, of x² and the count, each passed through ``reduce`` (over the ranks); in
    float32 for half-precision inputs."""
    dims = _stat_dims(x)
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    s1 = x.sum(dims)
    sums = reduce(torch.stack([s1, x.square().sum(dims), torch.full_like(s1, _count(x))]), group)
    return sums[0], sums[1], sums[2]


class _MomentGradients(torch.autograd.Function):
    """Per channel, two zeros ``[C]`` in x's dtype whose gradients are those of x's batch mean and biased
    variance: the rate pass uses those statistics for their derivatives only, so their values are not
    computed (``x.var`` alone took 5% of an eager CPU step). Backward: g_m/N + g_v·2(x − x̄)/N, as
    ``mean``'s and ``var``'s backward compute it, in differentiable ops (double backward works)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1])

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        x, = ctx.saved_tensors
        shape, n = _channel_shape(x), _count(x)
        grad = (2.0 / n) * grad_var.view(shape) * (x - x.mean(_stat_dims(x), keepdim=True))
        return grad + (grad_mean / n).view(shape)


def rate_batch_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    mean: torch.Tensor, var: torch.Tensor, eps: float, group: Optional[str] = None) -> torch.Tensor:
    """BatchNorm of the rate pass: normalises with the spike pass's statistics as values and
    differentiates through the rate input's own batch statistics (over every rank's batch with ``group``:
    one all-reduce of the sums forward, one of their gradients backward).

    y = (x − m)/√(v + ε)·γ + β, where m has the value of the spike-pass mean and the derivative of
    ``x.mean``, and v has the value of the spike-pass variance and the derivative of ``x.var``.
    """
    if group is None:
        mean_x, var_x = _MomentGradients.apply(x)
    else:
        s1, s2, n = _global_sums(x, group, sum_over_ranks)
        mean_x = s1 / n
        var_x = s2 / n - mean_x.square()
    return _normalise(x, weight, bias, mean, var, eps, mean_x, var_x)


def batch_norm_no_update(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         eps: float) -> torch.Tensor:
    """Training-mode BatchNorm on a static tensor in the rate pass (its running statistics are
    updated from the spike pass only)."""
    return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)


def sync_batch_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], running: Any,
                    eps: float, momentum: Optional[float], group: str, steps: Optional[int] = None) -> torch.Tensor:
    """Training-mode BatchNorm with statistics over every rank's batch, with autograd: what a synchronised
    BatchNorm computes in the model's forward (BPTT). ``running``: the ``nn.BatchNorm*`` whose running
    statistics it updates, a ``(running_mean, running_var)`` pair with ``momentum``, or None; ``steps``: T
    for a BatchNorm a single-step model calls once per step (statistics per step).

    Values: the gathered global moments (:func:`spike_batch_norm`); derivatives: through the global batch
    moments, x's sums being summed over the ranks in the backward only (one all-gather forward, one
    all-reduce backward).
    """
    if steps is not None:
        return torch.cat([sync_batch_norm(x_t, weight, bias, running, eps, momentum, group) for x_t in x.chunk(steps)])
    with torch.no_grad():
        mean, var = batch_moments(x)
        mean, var, total = global_moments(mean, var, _count(x), group)
    s1, s2, _ = _global_sums(x, group, sum_gradient_over_ranks)
    mean_x = s1 / total.to(s1.dtype)
    var_x = (s2 - 2 * mean.to(s1.dtype) * s1) / total.to(s1.dtype)    # the value is unused: d/dx = 2(x − mean)/N
    y = _normalise(x, weight, bias, mean, var, eps, mean_x, var_x)
    update_batch_norm_stats(running, mean, var, _count(x), momentum, group)
    return y


@torch.no_grad()
def update_batch_norm_stats(bn: Any, mean: torch.Tensor, var: torch.Tensor, count: int,
                            momentum: Optional[float] = None, group: Optional[str] = None) -> None:
    """Update a BatchNorm's running statistics from one step's batch statistics, as
    ``nn.BatchNorm*`` does in training (unbiased variance, momentum or cumulative average).

    ``bn`` is an ``nn.BatchNorm*`` module, or a ``(running_mean, running_var)`` pair for the
    functional form with its ``momentum`` (None: nothing to update). Statistics ``[T, C]`` of a per-step
    BatchNorm update once per step, in order. ``count`` is this rank's samples per statistic; with a
    ``group`` the statistics are global and so is the count (every rank's batch has the same size).
    """
    if bn is None:
        return
    if mean.dim() == 2:
        for mean_t, var_t in zip(mean, var):
            update_batch_norm_stats(bn, mean_t, var_t, count, momentum, group)
        return
    count *= world_size(group)
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

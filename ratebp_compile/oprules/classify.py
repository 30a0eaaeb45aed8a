"""Classification: whether the rate pass computes an op exactly, approximately or not at all.

- exact: the op treats every timestep alike and is affine in its one temporal operand (conv,
  linear, average pooling, adds, reshapes, scalar scaling, concatenation, fixed-statistics
  BatchNorm), or it averages or sums over time;
- approximate: the op is time-local but not affine (max pooling, activations, products of two
  temporal tensors, dropout): the rate pass applies it to rates;
- refused: the op mixes timesteps (indexing or reducing time other than by mean/sum, cumulative
  ops, convolutions along time, ...) or is unknown while temporal tensors flow through it.
Ops whose inputs are all static are evaluated identically in both passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx

from ..time_layout import Mixed, TimeLayout, is_temporal
from .layout import Context, _module, _norm_dims, _shape, _temporal_inputs, _val, arg, holds_tensors
from .table import OpInfo, is_inplace_method

__all__ = ["OpClass", "classify", "EXACT", "APPROXIMATE", "REFUSED", "STATIC", "NEURON", "BATCHNORM", "STATE"]


# The classes of an op under rate-based backprop (meta["ratebp.class"].kind). STATE: an in-place
# update of a buffer (a BatchNorm's batch counter in a torch.compile graph): spike pass only.
EXACT, APPROXIMATE, REFUSED, STATIC, NEURON, BATCHNORM, STATE = \
    "exact", "approximate", "refused", "static", "neuron", "batchnorm", "state"


@dataclass(frozen=True)
class OpClass:
    kind: str
    reason: str = ""
    sums_over_time: bool = False      # a sum over the time axis: the rate pass (one step) multiplies by T

    def __str__(self):
        return f"{self.kind}: {self.reason}" if self.reason else self.kind



# ---------------------------------------------------------------------------------------------
# Classification.
def _time_reduction(node, info, ctx) -> Optional[str]:
    """'mean' or 'sum' if ``node`` reduces over the time axis of its input, else None."""
    if info.family != "reduce":
        return None
    lay, shape = ctx.layout(node.args[0]), _shape(node.args[0])
    if not isinstance(lay, TimeLayout):
        return None
    dims = _norm_dims(arg(node, 1, "dim"), len(shape))
    if dims is not None and lay.axis not in dims:
        return None
    return info.name


def classify(node: torch.fx.Node, info: Optional[OpInfo], ctx: Context, batchnorm_uses_batch_stats: bool) -> OpClass:
    """Exact, approximate or refused (see the module docstring); ``node``'s layout is already known."""
    out = ctx.layout(node)
    inputs = _temporal_inputs(node, ctx)
    if not holds_tensors(_val(node)):
        return OpClass(STATIC)
    if isinstance(out, Mixed) or (isinstance(out, tuple) and any(isinstance(l, Mixed) for l in out)):
        reason = out.reason if isinstance(out, Mixed) else next(l.reason for l in out if isinstance(l, Mixed))
        return OpClass(REFUSED, reason)
    if not any(is_temporal(l) for l in inputs.values()):
        if is_inplace_method(node) and node.args[0].op in ("placeholder", "get_attr"):
            return OpClass(STATE, "updates a buffer in place: run by the spike pass only")
        if info is not None and info.family == "dropout" and _dropout_active(node, ctx):
            return OpClass(APPROXIMATE, "dropout draws a different mask in the rate pass")
        if is_temporal(out):
            return OpClass(EXACT, "repeats a static tensor over time")
        if batchnorm_uses_batch_stats:
            return OpClass(STATIC, "BatchNorm of a static tensor (running statistics from the spike pass)")
        return OpClass(STATIC)
    name = info.name
    if info.family == "state":
        return OpClass(STATE, "the neuron's membrane after the last step (model state): spike pass only")
    if info.family == "batchnorm":
        if batchnorm_uses_batch_stats:
            return OpClass(BATCHNORM, "statistics over time and batch: rate pass normalises with the spike "
                                      "pass's statistics")
        return OpClass(EXACT, "BatchNorm with fixed statistics")
    reduction = _time_reduction(node, info, ctx)
    if reduction in ("mean", "nanmean"):
        return OpClass(EXACT, "mean over time")
    if reduction in ("sum", "nansum"):
        return OpClass(EXACT, "sum over time (the rate pass multiplies by T)", sums_over_time=True)
    if reduction is not None:
        return OpClass(REFUSED, f"{name} over the time axis mixes timesteps")
    n_temporal = sum(1 for l in inputs.values() if is_temporal(l))
    if info.family == "dropout":
        if _dropout_active(node, ctx):
            return OpClass(APPROXIMATE, "dropout draws a different mask in the rate pass")
        return OpClass(EXACT)
    if info.family == "mul" and n_temporal > 1:
        return OpClass(APPROXIMATE, "product of two temporal tensors")
    if info.family == "div":
        denominator = node.args[1] if len(node.args) > 1 else None
        if is_temporal(ctx.layout(denominator)):
            return OpClass(APPROXIMATE, "division by a temporal tensor")
        return OpClass(EXACT)
    if info.family == "matmul" and n_temporal > 1:
        return OpClass(APPROXIMATE, "product of two temporal tensors")
    if info.family == "like":
        return OpClass(EXACT if info.linear else APPROXIMATE,
                       "" if info.linear else "random values drawn anew in the rate pass")
    if info.linear:
        return OpClass(EXACT)
    return OpClass(APPROXIMATE, f"{name} is not linear: the rate pass applies it to firing rates")


def _dropout_active(node, ctx) -> bool:
    module = _module(node, ctx.gm)
    if module is not None:
        return module.training and module.p > 0
    p = _val(arg(node, 1, "p", 0.5))
    training = _val(arg(node, 2, "training", True))
    return bool(training) and p > 0


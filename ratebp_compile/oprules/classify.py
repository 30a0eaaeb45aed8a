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

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx
from torch.utils import _pytree as pytree

from ..time_layout import Mixed, TimeLayout, is_temporal
from .layout import Context, _module, _norm_dims, _shape, _temporal_inputs, _val, arg, holds_tensors, is_module_state
from .table import VIEW_FAMILIES, OpInfo, is_inplace_method, op_info

__all__ = ["OpClass", "classify", "EXACT", "APPROXIMATE", "REFUSED", "STATIC", "NEURON", "BATCHNORM", "STATE",
           "HOOK"]


# The classes of an op under rate-based backprop (meta["ratebp.class"].kind). STATE: an in-place
# update of a buffer (a BatchNorm's batch counter in a torch.compile graph): spike pass only. HOOK: a
# module's forward hooks (ratebp_compile.hooks): spike pass only.
EXACT, APPROXIMATE, REFUSED, STATIC, NEURON, BATCHNORM, STATE, HOOK = \
    "exact", "approximate", "refused", "static", "neuron", "batchnorm", "state", "hook"


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


_VIEWS = VIEW_FAMILIES + ("broadcast",)
_IN_PLACE_OPERATORS = (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor)


def _written(node: torch.fx.Node, ctx: Context) -> Optional[torch.fx.Node]:
    """The tensor an in-place op writes into — followed through views to the tensor they view — or None for
    an op that writes nothing it was given."""
    in_place = is_inplace_method(node) or (node.op == "call_function" and node.target in _IN_PLACE_OPERATORS) or \
        "out" in node.kwargs
    if not in_place or not node.args or not isinstance(_val(node.args[0]), torch.Tensor):
        return None
    target = node.kwargs["out"] if "out" in node.kwargs else node.args[0]
    while isinstance(target, torch.fx.Node) and target.op in ("call_function", "call_method") and target.args:
        info = op_info(target, ctx.gm)
        if info is None or info.family not in _VIEWS:
            break
        target = target.args[0]
    return target if isinstance(target, torch.fx.Node) else None


def _in_place_state(node: torch.fx.Node, ctx: Context) -> Optional[OpClass]:
    """The class of an op that writes into an input or into module state, else None. A BatchNorm's batch
    counter (in a ``torch.compile`` graph, where BatchNorm's forward is traced) is state the spike pass
    updates; every other write into an input or a module's buffer is refused."""
    target = _written(node, ctx)
    if target is None or target.op not in ("placeholder", "get_attr"):
        return None
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    owner = stack[-1][1] if stack else None
    if isinstance(owner, type) and issubclass(owner, torch.nn.modules.batchnorm._BatchNorm):
        return OpClass(STATE, "updates a buffer in place: run by the spike pass only")
    if target.op == "placeholder" and not is_module_state(target):
        return OpClass(REFUSED, f"writes into the input '{target.target}' in place; the rate pass reads the "
                                f"inputs after the spike pass, so they must stay as given")
    return OpClass(REFUSED, f"updates the module state '{target.target}' in place, i.e. keeps state between "
                            f"calls; a compiled step would update it in the spike pass only, not as the "
                            f"plain model does")


def classify(node: torch.fx.Node, info: Optional[OpInfo], ctx: Context, batchnorm_uses_batch_stats: bool) -> OpClass:
    """Exact, approximate or refused (see the module docstring); ``node``'s layout is already known."""
    out = ctx.layout(node)
    inputs = _temporal_inputs(node, ctx)
    state = _in_place_state(node, ctx)
    if state is not None:
        return state
    if not holds_tensors(_val(node)):
        return OpClass(STATIC)
    if isinstance(out, Mixed) or (isinstance(out, tuple) and any(isinstance(l, Mixed) for l in out)):
        reason = out.reason if isinstance(out, Mixed) else next(l.reason for l in out if isinstance(l, Mixed))
        return OpClass(REFUSED, reason)
    if info is not None and info.family == "shared_mask":
        return OpClass(STATIC, "a dropout mask drawn once for all steps: the spike pass's, reused by the rate pass")
    if not any(is_temporal(l) for l in inputs.values()):
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
    if info.family == "state_trace":
        return OpClass(STATE, "a neuron's state at every step, read out: the spike pass's value, no gradient")
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
    # operands, not distinct nodes: x * x is a product of two temporal tensors
    n_temporal = sum(1 for a in pytree.tree_leaves((node.args, node.kwargs))
                     if isinstance(a, torch.fx.Node) and is_temporal(ctx.layout(a)))
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


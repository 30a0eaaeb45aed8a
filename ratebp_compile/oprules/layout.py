"""Time layout rules: where an op's output keeps its time axis, given its inputs' layouts.

One rule per op family (``infer_time_layout`` calls :func:`output_layout`). A rule returns a
``TimeLayout``, None (static) or ``Mixed(reason)`` when the op mixes timesteps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.fx

from ..time_layout import Layout, Mixed, TimeLayout, is_temporal, reshape_layout, shift_axis
from .table import OpInfo

__all__ = ["Context", "arg", "op_dims", "output_layout", "holds_tensors", "is_module_state"]


# ---------------------------------------------------------------------------------------------
# Argument access.
def arg(node: torch.fx.Node, index: int, name: str, default=None):
    """Argument ``index`` (counting self for methods) or keyword ``name`` of ``node``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_module_state(placeholder: torch.fx.Node) -> bool:
    """A placeholder holding a parameter or buffer: Dynamo lifts module state to graph inputs and marks
    it as static input (``transform``'s graphs reach module state through get_attr instead)."""
    return placeholder.op == "placeholder" and \
        bool((placeholder.meta.get("tensor_dict") or {}).get("_dynamo_static_input_type"))


def _val(x):
    """The value an argument had during shape propagation (nodes → meta['val'])."""
    if isinstance(x, torch.fx.Node):
        return x.meta.get("val")
    if isinstance(x, (list, tuple)):
        return type(x)(_val(v) for v in x)
    return x


def _shape(x) -> Optional[Tuple[int, ...]]:
    v = _val(x)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _norm_dims(dim, ndim: int) -> Optional[Tuple[int, ...]]:
    """Reduction dims as non-negative ints; None means all dims."""
    dim = _val(dim)
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return None
    if isinstance(dim, int):
        dim = (dim,)
    return tuple(_norm_dim(int(d), ndim) for d in dim)


def _module(node, gm):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def op_dims(node, gm) -> Optional[Tuple[int, ...]]:
    """The dimensions a reduction or softmax (function, method or module) works over, non-negative;
    None means all of them."""
    module = _module(node, gm)
    dim = module.dim if module is not None else arg(node, 1, "dim")
    return _norm_dims(dim, len(_shape(node.args[0])))


@dataclass
class Context:
    """What a rule may consult besides the node: the graph module, T, and each node's layout."""

    gm: torch.fx.GraphModule
    T: int
    layouts: Dict[torch.fx.Node, Layout]

    def layout(self, x) -> Layout:
        return self.layouts.get(x) if isinstance(x, torch.fx.Node) else None


def _tensor_inputs(node: torch.fx.Node):
    """The tensor-valued input nodes of ``node``, in argument order (lists flattened)."""
    return [n for n in node.all_input_nodes if isinstance(n.meta.get("val"), torch.Tensor)]


def _temporal_inputs(node, ctx) -> Dict[torch.fx.Node, Layout]:
    return {n: ctx.layout(n) for n in node.all_input_nodes if ctx.layout(n) is not None}



# ---------------------------------------------------------------------------------------------
# Layout rules, one per family. Each returns the output's layout given the inputs' layouts; it is
# only called when at least one input is temporal (and none is Mixed).
def _first_layout(node, ctx) -> TimeLayout:
    return ctx.layout(node.args[0])


def _broadcast_operands_layout(node, ctx, info):
    """Elementwise ops (unary or not): the operands' time axes, aligned by broadcasting, must agree,
    and no static operand may vary along time."""
    out_shape = _shape(node)
    if out_shape is None:
        return None
    R = len(out_shape)
    aligned = set()
    for x in node.all_input_nodes:
        lay, shape = ctx.layout(x), _shape(x)
        if shape is None:
            continue
        if isinstance(lay, TimeLayout):
            aligned.add(shift_axis(lay, R - len(shape)))
    if len(aligned) != 1:
        return Mixed(f"operands keep time in different places ({', '.join(sorted(map(str, aligned)))})")
    (lay,) = aligned
    for x in node.all_input_nodes:
        shape = _shape(x)
        if shape is None or isinstance(ctx.layout(x), TimeLayout):
            continue
        pos = lay.axis - (R - len(shape))
        if pos >= 0 and shape[pos] != 1 and ctx.T > 1:
            return Mixed(f"a static operand of shape {shape} varies along the time axis {lay}")
    return lay


def _batch_first_layout(node, ctx, info):
    lay = _first_layout(node, ctx)
    if lay.axis != 0:
        return Mixed(f"{info.name} treats dimension 0 as the batch, but time is at dimension {lay.axis}")
    return lay


def _feature_last_layout(node, ctx, info):
    lays = [ctx.layout(x) for x in _tensor_inputs(node)[:2 if info.name == "bilinear" else 1]]
    for x in _tensor_inputs(node)[:1]:
        lay, shape = ctx.layout(x), _shape(x)
        if isinstance(lay, TimeLayout) and lay.axis == len(shape) - 1:
            return Mixed(f"{info.name} mixes the last dimension, which holds time")
    temporal = [l for l in lays if isinstance(l, TimeLayout)]
    if len(set(temporal)) > 1:
        return Mixed("operands keep time in different places")
    return temporal[0] if temporal else None


def _layer_norm_layout(node, ctx, info):
    lay, shape = _first_layout(node, ctx), _shape(node.args[0])
    module = _module(node, ctx.gm)
    normalized = module.normalized_shape if module is not None else _val(arg(node, 1, "normalized_shape"))
    k = len(normalized) if isinstance(normalized, (list, tuple, torch.Size)) else 1
    if lay.axis >= len(shape) - k:
        return Mixed(f"{info.name} normalises over the time dimension")
    return lay


def _softmax_layout(node, ctx, info):
    lay, shape = _first_layout(node, ctx), _shape(node.args[0])
    module = _module(node, ctx.gm)
    dim = module.dim if module is not None else _val(arg(node, 1, "dim"))
    if dim is None or _norm_dim(dim, len(shape)) == lay.axis:
        return Mixed(f"{info.name} normalises over the time dimension")
    return lay


def _batchnorm_layout(node, ctx, info):
    lay = _first_layout(node, ctx)
    if lay.axis == 1:
        return Mixed("BatchNorm's channel dimension holds time")
    return lay


def _reduce_layout(node, ctx, info):
    lay, shape = _first_layout(node, ctx), _shape(node.args[0])
    dims = _norm_dims(arg(node, 1, "dim"), len(shape))
    keepdim = bool(_val(arg(node, 2, "keepdim", False)))
    if dims is None or lay.axis in dims:
        out = None
    elif keepdim:
        out = lay
    else:
        out = TimeLayout(lay.axis - sum(d < lay.axis for d in dims), lay.merged)
    val = _val(node)
    return tuple(out for _ in val) if isinstance(val, (tuple, list)) else out


def _reshape_layout(node, ctx, info):
    lay = _first_layout(node, ctx)
    out_shape = _shape(node)
    return reshape_layout(_shape(node.args[0]), out_shape, lay, ctx.T)


def _permute_layout(node, ctx, info):
    lay, shape = _first_layout(node, ctx), _shape(node.args[0])
    n = len(shape)
    name = info.name
    if name == "permute":
        dims = node.args[1:] if len(node.args) > 2 or isinstance(_val(arg(node, 1, "dims")), int) \
            else arg(node, 1, "dims")
        order = [_norm_dim(int(d), n) for d in _val(dims)]
        return TimeLayout(order.index(lay.axis), lay.merged)
    if name == "t":
        return TimeLayout(n - 1 - lay.axis if n == 2 else lay.axis, lay.merged)
    if name in ("transpose", "transpose_", "swapaxes", "swapdims"):
        d0 = _norm_dim(int(_val(arg(node, 1, "dim0"))), n)
        d1 = _norm_dim(int(_val(arg(node, 2, "dim1"))), n)
        axis = {d0: d1, d1: d0}.get(lay.axis, lay.axis)
        return TimeLayout(axis, lay.merged)
    # movedim / moveaxis
    src, dst = _val(arg(node, 1, "source")), _val(arg(node, 2, "destination"))
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [_norm_dim(s, n) for s in src]
    dst = [_norm_dim(d, n) for d in dst]
    order = [None] * n
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter(d for d in range(n) if d not in src)
    order = [o if o is not None else next(rest) for o in order]
    return TimeLayout(order.index(lay.axis), lay.merged)


def _broadcast_layout(node, ctx, info):
    """expand / repeat / broadcast_to: a temporal input keeps its time axis (which must not be
    repeated); a static input repeated to T along a size-1 axis, or T times along an axis (time-major),
    becomes temporal there — the usual way to feed one static frame at every step."""
    x = node.args[0]
    lay, in_shape, out_shape = ctx.layout(x), _shape(x), _shape(node)
    offset = len(out_shape) - len(in_shape)
    if isinstance(lay, TimeLayout):
        lay = shift_axis(lay, offset)
        if out_shape[lay.axis] != in_shape[lay.axis - offset]:
            return Mixed(f"{info.name} repeats the time axis")
        return lay
    return None  # static inputs are handled by _time_source below


def _time_source(node, ctx, info) -> Optional[Layout]:
    """A static tensor repeated over time by expand/repeat/broadcast_to, or None."""
    x = node.args[0]
    in_shape, out_shape = _shape(x), _shape(node)
    if in_shape is None or out_shape is None or ctx.T == 1:
        return None
    offset = len(out_shape) - len(in_shape)
    padded = (1,) * offset + tuple(in_shape)
    grown = [d for d in range(len(out_shape)) if padded[d] != out_shape[d]]
    if not grown:
        return None
    d = grown[0]
    if padded[d] == 1 and out_shape[d] == ctx.T and len(grown) == 1:
        return TimeLayout(d, False)
    if info.name in ("repeat", "tile") and out_shape[d] == ctx.T * padded[d] and len(grown) == 1:
        return TimeLayout(d, True)
    return None


def _getitem_layout(node, ctx, info):
    container, index = node.args
    lay = ctx.layout(container)
    if isinstance(lay, tuple):  # an element of a tuple output (split, max with dim, ...)
        return lay[index] if isinstance(index, int) else Mixed("a slice of a tuple of tensors")
    shape = _shape(container)
    if shape is None:
        return None
    idx = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (torch.fx.Node, list)) and not isinstance(_val(i), (int, slice)) for i in idx):
        return Mixed("advanced (tensor) indexing of a temporal tensor")
    idx = tuple(_val(i) for i in idx)
    n_ellipsis_dims = len(shape) - sum(1 for i in idx if i is not None and i is not Ellipsis)
    in_dim, out_dim = 0, 0
    for i in idx:
        if i is Ellipsis:
            if in_dim <= lay.axis < in_dim + n_ellipsis_dims:
                return TimeLayout(out_dim + lay.axis - in_dim, lay.merged)
            in_dim += n_ellipsis_dims
            out_dim += n_ellipsis_dims
        elif i is None:
            out_dim += 1
        elif isinstance(i, int):
            if in_dim == lay.axis:
                return Mixed(f"indexing selects one timestep (index {i} on the time axis)")
            in_dim += 1
        elif isinstance(i, slice):
            if in_dim == lay.axis and slice(None, None, None) != i and \
                    range(*i.indices(shape[in_dim])) != range(shape[in_dim]):
                return Mixed(f"slicing selects some timesteps ({i} on the time axis)")
            if in_dim == lay.axis:
                return TimeLayout(out_dim, lay.merged)
            in_dim += 1
            out_dim += 1
        else:
            return Mixed(f"unsupported index {i!r}")
    return TimeLayout(out_dim + lay.axis - in_dim, lay.merged)


def _split_layout(node, ctx, info):
    lay, shape = _first_layout(node, ctx), _shape(node.args[0])
    dim = _norm_dim(int(_val(arg(node, 2 if info.name != "unbind" else 1, "dim", 0))), len(shape))
    outs = _val(node)
    if dim == lay.axis:
        return Mixed(f"{info.name} splits the time axis")
    if info.name == "unbind":
        inner = TimeLayout(lay.axis - (dim < lay.axis), lay.merged)
        return tuple(inner for _ in outs)
    return tuple(lay for _ in outs)


def _cat_layout(node, ctx, info):
    tensors = arg(node, 0, "tensors")
    shape = _shape(node)
    dim = _norm_dim(int(_val(arg(node, 1, "dim", 0))), len(shape) - (info.name == "stack"))
    lays = {ctx.layout(t) for t in tensors}
    if None in lays and ctx.T > 1:
        return Mixed(f"{info.name} joins static and temporal tensors")
    if ctx.T == 1:                    # one step: a static tensor is constant over it, like any temporal one
        lays.discard(None)
    if len(lays) != 1:
        return Mixed(f"{info.name} joins tensors that keep time in different places")
    (lay,) = lays
    if info.name == "stack":
        return TimeLayout(lay.axis + (dim <= lay.axis), lay.merged)
    if dim == lay.axis:
        return Mixed("cat along the time axis")
    return lay


def _like_layout(node, ctx, info):
    if info.name.startswith("new_"):
        return None  # a new tensor of an explicit size
    return _first_layout(node, ctx)


# Families whose rule reads the layout of their data argument (args[0]); a temporal tensor anywhere
# else (a weight, a normalized shape, ...) would make the op itself change over time.
_DATA_FIRST = {"batch_first", "feature_last", "layer_norm", "softmax", "batchnorm", "reduce", "reshape",
               "permute", "split", "like"}


def _matmul_layout(node, ctx, info):
    a, b = node.args[0], node.args[1]
    la, lb = ctx.layout(a), ctx.layout(b)
    sa, sb, so = _shape(a), _shape(b), _shape(node)
    if isinstance(la, TimeLayout) and la.axis == len(sa) - 1:
        return Mixed("matmul contracts the time dimension")
    if isinstance(lb, TimeLayout) and (len(sb) == 1 or lb.axis == len(sb) - 2):
        return Mixed("matmul contracts the time dimension")
    candidates = set()
    if isinstance(la, TimeLayout):
        candidates.add(TimeLayout(la.axis + len(so) - len(sa), la.merged) if len(sa) > 1 else None)
    if isinstance(lb, TimeLayout):
        candidates.add(TimeLayout(lb.axis + len(so) - len(sb) if lb.axis < len(sb) - 2 else len(so) - 1,
                                  lb.merged))
    if len(candidates) != 1:
        return Mixed("matmul operands keep time in different places")
    return candidates.pop()


_LAYOUT_RULES: Dict[str, Callable] = {
    "pointwise": _broadcast_operands_layout,
    "dropout": _broadcast_operands_layout,
    "binary": _broadcast_operands_layout,
    "mul": _broadcast_operands_layout,
    "div": _broadcast_operands_layout,
    "batch_first": _batch_first_layout,
    "feature_last": _feature_last_layout,
    "layer_norm": _layer_norm_layout,
    "softmax": _softmax_layout,
    "batchnorm": _batchnorm_layout,
    "reduce": _reduce_layout,
    "reshape": _reshape_layout,
    "permute": _permute_layout,
    "broadcast": _broadcast_layout,
    "getitem": _getitem_layout,
    "split": _split_layout,
    "cat": _cat_layout,
    "stack": _cat_layout,
    "like": _like_layout,
    "matmul": _matmul_layout,
    "meta": lambda node, ctx, info: None,
    "state": lambda node, ctx, info: None,
    "state_trace": _broadcast_operands_layout,    # laid out like the neuron's input
    "shared_mask": lambda node, ctx, info: None,  # one step's shape, the same at every step
}


def holds_tensors(val) -> bool:
    if isinstance(val, torch.Tensor):
        return True
    return isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val)


def output_layout(node: torch.fx.Node, info: Optional[OpInfo], ctx: Context) -> Layout:
    """The time layout of ``node``'s output (see the module docstring)."""
    if not holds_tensors(_val(node)):
        return None  # shapes, flags, checks: no tensor comes out
    inputs = _temporal_inputs(node, ctx)
    mixed = [l for l in inputs.values() if isinstance(l, Mixed)]
    if mixed:
        return Mixed(f"an input mixes timesteps ({mixed[0].reason})")
    if not any(is_temporal(l) for l in inputs.values()):
        if info is not None and info.family == "broadcast":
            return _time_source(node, ctx, info)
        return None
    if info is None:
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        return Mixed(f"'{name}', an op ratebp_compile does not know, receives a temporal tensor")
    if info.family == "einsum":
        return Mixed("einsum on temporal tensors is not supported (write it with matmul/linear)")
    if info.family in _DATA_FIRST and not isinstance(ctx.layout(node.args[0]), TimeLayout):
        return Mixed(f"{info.name} gets a time-varying parameter (an argument other than its input is temporal)")
    lay = _LAYOUT_RULES[info.family](node, ctx, info)
    if isinstance(lay, TimeLayout):
        val = _val(node)
        if isinstance(val, torch.Tensor) and (lay.axis >= val.dim() or val.shape[lay.axis] % ctx.T):
            return Mixed(f"the output's dimension {lay.axis} cannot hold time")
    return lay


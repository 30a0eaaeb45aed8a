"""infer_time_layout: which tensors are temporal, and where their time axis is."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.fx as fx

from ..errors import RateBPError, describe_node
from ..nn.spec import NeuronSpec
from ..oprules import Context, op_info, output_layout
from ..time_layout import Layout, TimeLayout
from .infra import PassResult, at_node, postcondition, require, tensor_val

__all__ = ["infer_time_layout", "INPUT_LAYOUTS"]

# gm.meta["ratebp.input_layouts"]: one entry per placeholder, in order.
INPUT_LAYOUTS = {"TB": TimeLayout(0, False), "T*B": TimeLayout(0, True), "static": None, None: None}


def _neuron_T(node: fx.Node) -> Optional[int]:
    spec: NeuronSpec = node.target
    if spec.time_steps is not None:
        return spec.time_steps
    x = tensor_val(node.args[0])
    return None if x is None else x.shape[0]


def _find_T(gm: fx.GraphModule, placeholders, input_layouts) -> int:
    """T from the neurons and the temporal inputs; all must agree."""
    if not any(isinstance(n.target, NeuronSpec) for n in gm.graph.nodes):
        raise RateBPError("infer_time_layout: the model has no spiking neurons (ratebp_compile.nn.LIF, IF, "
                          "ParametricLIF, a Neuron subclass or a registered class): nothing to train with "
                          "rate-based backpropagation")
    seen: Dict[int, str] = {}
    for ph, lay in zip(placeholders, input_layouts):
        val = tensor_val(ph)
        if isinstance(lay, TimeLayout) and not lay.merged and val is not None:
            seen.setdefault(val.shape[0], f"input '{ph.target}' {tuple(val.shape)}")
    for node in gm.graph.nodes:
        if isinstance(node.target, NeuronSpec):
            T = _neuron_T(node)
            if T is not None:
                seen.setdefault(T, f"{describe_node(node, gm)} (input {tuple(tensor_val(node.args[0]).shape)})")
    if len(seen) > 1:
        detail = "; ".join(f"T={T} from {where}" for T, where in seen.items())
        raise RateBPError(f"infer_time_layout: inconsistent number of timesteps: {detail}")
    return next(iter(seen))


def _canonical(layout: Layout, val, T: int) -> Layout:
    """One name for one memory layout: time merged into a dimension of size T (one sample, B = 1) is that
    dimension holding the T steps, ``TimeLayout(axis)``; so ``[T·1, ...]`` and ``[T, ...]`` compare equal."""
    if isinstance(layout, tuple):
        vals = val if isinstance(val, (tuple, list)) else (None,) * len(layout)
        return tuple(_canonical(l, v, T) for l, v in zip(layout, vals))
    if isinstance(layout, TimeLayout) and layout.merged and isinstance(val, torch.Tensor) and \
            val.shape[layout.axis] == T:
        return TimeLayout(layout.axis)
    return layout


def _fits(got: Layout, expected: TimeLayout, x, T: int) -> bool:
    """Whether a neuron's input with layout ``got`` has the memory layout the neuron expects: the same layout;
    or, with one sample (B = 1), ``[T·1, ...]`` for ``[T, ...]`` and the reverse; or, with T = 1, a static
    tensor of one step."""
    if got == expected:
        return True
    if isinstance(got, TimeLayout):
        return got.axis == 0 and x is not None and x.shape[0] == T
    return got is None and T == 1 and x is not None and (expected.merged or x.shape[0] == 1)


def _check(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op != "output":
            require("ratebp.time" in node.meta, "infer_time_layout", node, "no time layout recorded", gm)


@postcondition(_check)
def infer_time_layout(gm: fx.GraphModule) -> PassResult:
    """Annotate every node with ``meta["ratebp.time"]``: None (static), ``TimeLayout(axis)`` (time is
    dimension ``axis``, size T), ``TimeLayout(axis, merged=True)`` (time-major T·B at ``axis``),
    ``Mixed(reason)`` (timesteps mixed), or a tuple of those for tuple values. Sets
    ``gm.meta["ratebp.T"]``. Adds metadata only.

    Layouts start at the inputs (``gm.meta["ratebp.input_layouts"]``: "TB", "T*B" or "static" per
    placeholder) and at the neurons (a neuron's input and output have time at dimension 0), and flow
    forward through the op rules of ``ratebp_compile.oprules``. T is read off the neurons' inputs and the
    ``[T, B, ...]`` inputs, which must agree.

    Example (T = 2)::

        x: [2, B, 3, 8, 8]          T@0
        flatten = x.flatten(0, 1)   [2·B, 3, 8, 8]      T·@0   (merged, time-major)
        conv = self.conv(flatten)   [2·B, 8, 8, 8]      T·@0
        unflatten = ...(0, (2, -1)) [2, B, 8, 8, 8]     T@0
        lif = lif(unflatten)        [2, B, 8, 8, 8]     T@0
        mean = lif.mean(0)          [B, 8, 8, 8]        static

    Holds before: neurons are normalized; every node has ``meta["val"]``.
    Holds after: every node has ``meta["ratebp.time"]``; each neuron's input has the layout the
    neuron expects (else ``RateBPError``).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    requested = gm.meta.get("ratebp.input_layouts") or ["TB"] * len(placeholders)
    if len(requested) < len(placeholders):
        requested = list(requested) + ["static"] * (len(placeholders) - len(requested))
    try:
        input_layouts = [INPUT_LAYOUTS[k] for k in requested]
    except KeyError as e:
        raise RateBPError(f"input layout must be 'TB', 'T*B' or 'static', got {e.args[0]!r}") from None
    input_layouts = [lay if tensor_val(ph) is not None else None for ph, lay in zip(placeholders, input_layouts)]
    T = _find_T(gm, placeholders, input_layouts)
    gm.meta["ratebp.T"] = T

    layouts: Dict[fx.Node, Layout] = {}
    ctx = Context(gm, T, layouts)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            lay = input_layouts[placeholders.index(node)]
            val = tensor_val(node)
            if isinstance(lay, TimeLayout) and lay.merged and val.shape[0] % T:
                raise RateBPError(f"infer_time_layout: input '{node.target}' has shape {tuple(val.shape)}, "
                                  f"but a [T·B, ...] input with T={T} was expected")
        elif node.op == "get_attr" or node.op == "output":
            lay = None
        elif isinstance(node.target, NeuronSpec):
            expected = TimeLayout(0, node.target.time_steps is not None)
            got = layouts.get(node.args[0])
            if not _fits(got, expected, tensor_val(node.args[0]), T):
                what = "a static tensor" if got is None else f"a tensor with time layout {got}" \
                    if isinstance(got, TimeLayout) else f"a tensor that mixes timesteps ({got.reason})"
                raise RateBPError(
                    f"infer_time_layout: neuron {describe_node(node, gm)} expects "
                    f"{'[T·B, ...]' if expected.merged else '[T, B, ...]'} (time at dimension 0) but receives "
                    f"{what}. Check which inputs are temporal (transform(..., input_layout=...)).")
            lay = expected
        else:
            with at_node("infer_time_layout", node, gm):
                lay = output_layout(node, op_info(node, gm), ctx)
        lay = _canonical(lay, node.meta.get("val"), T)
        layouts[node] = lay
        node.meta["ratebp.time"] = lay
    return PassResult(gm, False)

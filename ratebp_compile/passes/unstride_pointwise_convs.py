"""unstride_pointwise_convs: on CPU, a 1×1 convolution with a stride reads a strided slice of its input
with stride 1, in the graph that runs with autograd."""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..capture import propagate_shapes
from .infra import PassResult, copy_meta, input_device, postcondition, require, tensor_val

__all__ = ["unstride_pointwise_convs"]

PASS = "unstride_pointwise_convs"

#: The functional convolutions (``F.conv2d`` is ``torch.conv2d``) by number of spatial dimensions.
_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_BY_DIMS = {n: fn for fn, n in _FUNCTIONS.items()}
#: The convolution modules whose call is exactly their functional form (``forward`` and ``_conv_forward``
#: not overridden: a subclass that standardises its weights is left alone).
_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


@dataclass
class _Conv:
    """A convolution node's input, weight and bias (nodes, a module's attribute path, or None) and settings:
    stride and dilation per spatial dimension, the padding as ``F.pad``'s list with its mode (None where a
    setting is not a constant this pass reads)."""

    x: Any
    weight: Any
    bias: Any
    stride: Optional[Tuple[int, ...]]
    pads: Optional[List[int]]
    pad_mode: str
    dilation: Optional[Tuple[int, ...]]
    groups: int


def _spatial(value, n: int) -> Optional[Tuple[int, ...]]:
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, (tuple, list)) and len(value) == n and all(isinstance(v, int) for v in value):
        return tuple(value)
    if value == "valid":
        return (0,) * n
    return None                     # "same", or a value only known at run time


def _exact_module(module: nn.Module) -> Optional[int]:
    for cls, n in _MODULES.items():
        if type(module).forward is cls.forward and type(module)._conv_forward is cls._conv_forward:
            return n
    return None


def _as_conv(node: fx.Node, gm: fx.GraphModule) -> Optional[Tuple[_Conv, int]]:
    """``node`` as a convolution, with its number of spatial dimensions (None: not one this pass reads)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        n = _exact_module(module)
        if n is None or len(node.args) != 1 or node.kwargs:
            return None
        if module.padding_mode == "zeros":
            pads, mode = _pads(_spatial(module.padding, n)), "constant"
        else:       # what the module's forward pads with (set from ``padding`` when it was built)
            pads, mode = list(module._reversed_padding_repeated_twice), module.padding_mode
        return _Conv(node.args[0], f"{node.target}.weight", None if module.bias is None else f"{node.target}.bias",
                     _spatial(module.stride, n), pads, mode, _spatial(module.dilation, n), module.groups), n
    if node.op != "call_function" or node.target not in _FUNCTIONS:
        return None
    n = _FUNCTIONS[node.target]
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)
    values = [node.args[i] if i < len(node.args) else node.kwargs.get(name, default)
              for i, (name, default) in enumerate(zip(names, defaults))]
    x, weight, bias, stride, padding, dilation, groups = values
    if not isinstance(groups, int):
        return None
    return _Conv(x, weight, bias, _spatial(stride, n), _pads(_spatial(padding, n)), "constant", _spatial(dilation, n),
                 groups), n


def _weight_shape(conv: _Conv, gm: fx.GraphModule) -> Optional[torch.Size]:
    if isinstance(conv.weight, str):
        return gm.get_parameter(conv.weight).shape
    val = tensor_val(conv.weight)
    return val.shape if val is not None else None


def _strided_pointwise(node: fx.Node, gm: fx.GraphModule) -> Optional[Tuple[_Conv, int]]:
    """``node`` when it is a convolution with a 1×1 kernel and a stride over 1 on some dimension."""
    found = _as_conv(node, gm)
    if found is None:
        return None
    conv, n = found
    shape = _weight_shape(conv, gm)
    if None in (conv.stride, conv.pads, conv.dilation) or shape is None or len(shape) != n + 2:
        return None
    if any(k != 1 for k in shape[2:]) or all(s == 1 for s in conv.stride):
        return None
    return found


def _pads(padding: Optional[Tuple[int, ...]]) -> Optional[List[int]]:
    """``F.pad``'s list for ``padding`` on each spatial dimension (the last dimension's pair first)."""
    return None if padding is None else [p for d in reversed(padding) for p in (d, d)]


def _rewrite(node: fx.Node, conv: _Conv, n: int, gm: fx.GraphModule) -> None:
    graph = gm.graph
    with graph.inserting_before(node):
        x = conv.x
        if any(conv.pads):
            x = copy_meta(graph.call_function(F.pad, (x, conv.pads), {"mode": conv.pad_mode}), node, PASS)
        index = (Ellipsis, *(slice(None, None, s) for s in conv.stride))
        x = copy_meta(graph.call_function(operator.getitem, (x, index)), node, PASS)
        weight, bias = conv.weight, conv.bias
        if isinstance(weight, str):
            weight = copy_meta(graph.get_attr(weight), node, PASS)
        if isinstance(bias, str):
            bias = copy_meta(graph.get_attr(bias), node, PASS)
        new = graph.call_function(_BY_DIMS[n], (x, weight, bias, 1, 0, conv.dilation, conv.groups))
        copy_meta(new, node, PASS)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _autograd_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """The graph whose backward runs the convolutions: a program's rate graph, or BPTT's graph itself."""
    rate = getattr(gm, "rate", None)
    return rate if isinstance(rate, fx.GraphModule) else gm


def _check(gm: fx.GraphModule) -> None:
    graph = _autograd_graph(gm)
    cpu = input_device(graph).type == "cpu"
    for node in graph.graph.nodes:
        if node.meta.get("ratebp.pass") == PASS:
            require("val" in node.meta, PASS, node, "no meta['val']", graph)
        if cpu:
            require(_strided_pointwise(node, graph) is None, PASS, node, "a strided 1×1 convolution is left on CPU",
                    graph)


@postcondition(_check)
def unstride_pointwise_convs(gm: fx.GraphModule) -> PassResult:
    """On CPU, give every convolution with a 1×1 kernel and a stride over 1 (a ResNet shortcut) a strided
    slice of its input, with stride 1: ``conv(x, stride=s)`` → ``conv(x[..., ::s, ::s], stride=1)``, the
    same sums of the same products. The pass works on the graph that runs with autograd (a program's rate
    graph; BPTT's graph) because PyTorch 2.13's CPU convolution backward (oneDNN) gets the weight gradient
    of such a convolution on channels-last input with few input channels wrong now and then, or never
    returns (uxlfoundation/oneDNN issue 6035). Measured on this project's CPU, 100 calls each: 4 input
    channels 5 wrong, 3 input channels 11 wrong or a hang; 8, 12, 16 and 32 channels, 3×3 kernels and
    stride 1 none. The input is channels-last inside ``torch.compile``, whose Inductor lays out a CPU
    graph with convolutions channels-last (a compiled ResNet-18 of width 4: 5 of 29 repeated backward
    passes wrong), and in BPTT's graph when the user's input is. Every strided 1×1 convolution is
    rewritten, whatever its channels: oneDNN's block is 8 or 16 channels depending on the CPU, and the
    slice costs a copy of a fraction of the input.

    A padded one is padded first (``F.pad``, as the module's forward pads: a ``padding_mode`` other than
    zeros with the amounts the module was built with). A module is called in its functional
    form with its own weight and bias; a subclass of ``Conv1d/2d/3d`` that overrides its forward is left
    alone, as is a convolution whose stride or padding is only known at run time.

    Before (the rate graph; ``down`` a ``Conv2d(2, 4, 1, stride=2)``)::

        reshape = x.reshape((3, 2, 6, 6))
        conv = self.conv(reshape)
        down = self.down(reshape)
        add = conv + down

    After::

        reshape = x.reshape((3, 2, 6, 6))
        conv = self.conv(reshape)
        getitem = reshape[(Ellipsis, slice(None, None, 2), slice(None, None, 2))]
        down_weight = self.down.weight
        down_bias = self.down.bias
        conv2d = torch.conv2d(getitem, down_weight, down_bias, 1, 0, (1, 1), 1)
        add = conv + conv2d

    Holds before: a program from build_rate_graph, or a BPTT graph. Holds after: on CPU, no convolution
    this pass reads has a 1×1 kernel and a stride over 1; every node the pass made has ``meta["val"]``; the
    outputs are those before the pass.
    """
    graph = _autograd_graph(gm)
    if input_device(graph).type != "cpu":
        return PassResult(gm, False)
    modified = False
    for node in list(graph.graph.nodes):
        found = _strided_pointwise(node, graph)
        if found is not None:
            _rewrite(node, *found, graph)
            modified = True
    if not modified:
        return PassResult(gm, False)
    graph.graph.lint()
    graph.recompile()
    propagate_shapes(graph, [n.meta.get("val") for n in graph.graph.nodes if n.op == "placeholder"])
    gm.recompile()
    return PassResult(gm, True)

"""Random multi-step SNN specifications, and the module, inputs and loss built from one.

:func:`specs` is a Hypothesis strategy for :class:`~tests.differential.reference.Spec`: a small DAG
of convolutions or linear layers, BatchNorms over time × batch (time folded into the batch),
average pooling, residual adds, concatenations, branches, and neurons of every kind, reset mode and
surrogate, over T = 1…16 steps, with static or time-varying inputs in the ``[T, B, ...]`` or
``[T·B, ...]`` layout. :class:`SpecNet` is the ``nn.Module`` of a spec (torch layers and
``ratebp_compile.nn`` neurons), which the library transforms; the reference walks the same spec
reading that module's parameters. :func:`build_case` makes the module, the input and a random
linear loss from the spec's seed.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from hypothesis import strategies as st
from torch import nn

import ratebp_compile as rc

from .reference import Node, Spec

__all__ = ["specs", "neuron_attrs", "SpecBuilder", "SpecNet", "build_case", "output_shape", "neuron_module",
           "fixture_spec", "SURROGATES", "THRESHOLDS"]

#: (name, width) of the surrogates drawn: every kind, two widths each.
SURROGATES = (("sigmoid", 4.0), ("sigmoid", 2.0), ("atan", 2.0), ("atan", 1.0), ("rectangular", 1.0),
              ("rectangular", 0.6), ("triangle", 1.0), ("triangle", 0.5))
_SURROGATE_CLASSES = {"sigmoid": rc.nn.Sigmoid, "atan": rc.nn.ATan, "rectangular": rc.nn.Rectangular,
                      "triangle": rc.nn.Triangle}
#: Thresholds drawn: irregular numbers, so that no membrane built from spikes (integers), pooled
#: spikes, decays and reset values lands exactly on a threshold (or a rectangular surrogate's edge),
#: where each side's rounding would decide the spike.
THRESHOLDS = (0.5773502692, 0.9510565163, 1.4142135624)
#: Standard deviation of weights times √fan-in: large enough that neurons without a BatchNorm in
#: front of them still fire on spike inputs.
WEIGHT_GAIN = 2.0
MAX_CHANNELS = 4


# ---------------------------------------------------------------------------------------------------
# Drawing specifications
# ---------------------------------------------------------------------------------------------------
@st.composite
def neuron_attrs(draw) -> Dict[str, Any]:
    """A neuron layer: kind (LIF, IF, ParametricLIF), leak, input decay, threshold, reset, surrogate."""
    kind = draw(st.sampled_from(["lif", "if", "plif"]))
    attrs: Dict[str, Any] = {"kind": kind}
    if kind != "if":
        attrs["decay_input"] = draw(st.booleans())
    if kind == "lif":
        key, value = draw(st.sampled_from([("decay", 0.2), ("decay", 0.5), ("decay", 0.9), ("decay", 1.0),
                                           ("tau", 2.0), ("tau", 4.0)]))
        if key == "decay" and value == 1.0 and attrs["decay_input"]:
            value = 0.9                     # λ = 1 with input decay would ignore the input
        attrs[key] = value
    if kind == "plif":
        attrs["init_tau"] = draw(st.sampled_from([1.5, 2.0, 4.0]))
    attrs["v_threshold"] = draw(st.sampled_from(THRESHOLDS))
    attrs["v_reset"] = draw(st.sampled_from([None, 0.0, -0.3, 0.2]))
    attrs["detach_reset"] = draw(st.booleans())
    attrs["surrogate"] = draw(st.sampled_from(SURROGATES))
    return attrs


class SpecBuilder:
    """Builds a spec's nodes in execution order; ``add`` names a node after its position and op."""

    def __init__(self):
        self.nodes: List[Node] = []

    def build(self, T: int, B: int, layout: str = "TB", static: bool = False, output: str = "steps",
              time_chunk: Any = "default", seed: int = 0) -> Spec:
        return Spec(T, B, layout, static, tuple(self.nodes), output, time_chunk, seed)

    def add(self, op: str, inputs: Tuple[Node, ...], shape: Tuple[int, ...], temporal: bool = True,
            **attrs) -> Node:
        node = Node(f"{op}{len(self.nodes)}", op, tuple(i.name for i in inputs), tuple(shape), temporal, attrs)
        self.nodes.append(node)
        return node

    def conv(self, x: Node, out: int, kernel: int, stride: int = 1, bias: bool = True) -> Node:
        c, h, w = x.shape
        pad = kernel // 2
        size = lambda n: (n + 2 * pad - kernel) // stride + 1
        return self.add("conv", (x,), (out, size(h), size(w)), x.temporal, in_channels=c, out_channels=out,
                        kernel=kernel, stride=stride, padding=pad, bias=bias)

    def linear(self, x: Node, out: int, bias: bool = True) -> Node:
        return self.add("linear", (x,), (out,), x.temporal, in_features=x.shape[0], out_features=out, bias=bias)

    def bn(self, x: Node, momentum: Optional[float] = 0.1, affine: bool = True) -> Node:
        return self.add("bn", (x,), x.shape, x.temporal, momentum=momentum, affine=affine)

    def neuron(self, x: Node, attrs: Dict[str, Any]) -> Node:
        return self.add("neuron", (x,), x.shape, True, **attrs)


def _maybe_bn(draw, g: SpecBuilder, x: Node) -> Node:
    if not draw(st.booleans()):
        return x
    momentum = draw(st.sampled_from([0.1, 0.5, None]))
    return g.bn(x, momentum, affine=draw(st.sampled_from([True, True, False])))


def _image_block(draw, g: SpecBuilder, x: Node) -> Node:
    """conv–[BN]–neuron, a residual block, two branches concatenated, average pooling, or a neuron."""
    c, h, _ = x.shape
    kinds = ["conv", "residual", "cat", "neuron"] + (["pool"] if h >= 2 else [])
    kind = draw(st.sampled_from(kinds))
    channels = st.integers(1, MAX_CHANNELS)
    if kind == "conv":
        kernel = draw(st.sampled_from([1, 3]))
        stride = draw(st.sampled_from([1, 2])) if h >= 3 else 1
        y = g.conv(x, draw(channels), kernel, stride, bias=draw(st.booleans()))
        return g.neuron(_maybe_bn(draw, g, y), draw(neuron_attrs()))
    if kind == "residual":
        y = g.neuron(_maybe_bn(draw, g, g.conv(x, c, 3, bias=draw(st.booleans()))), draw(neuron_attrs()))
        y = _maybe_bn(draw, g, g.conv(y, c, 3, bias=draw(st.booleans())))
        shortcut = x if draw(st.booleans()) else _maybe_bn(draw, g, g.conv(x, c, 1, bias=False))
        return g.neuron(g.add("add", (y, shortcut), y.shape, True), draw(neuron_attrs()))
    if kind == "cat":
        a = g.neuron(_maybe_bn(draw, g, g.conv(x, draw(st.integers(1, 2)), 3)), draw(neuron_attrs()))
        b = x if draw(st.booleans()) and c <= 2 else g.neuron(g.conv(x, draw(st.integers(1, 2)), 1),
                                                              draw(neuron_attrs()))
        return g.add("cat", (a, b), (a.shape[0] + b.shape[0],) + a.shape[1:], True)
    if kind == "pool":
        return g.add("avgpool", (x,), (c, h // 2, x.shape[2] // 2), True, kernel=2)
    return g.neuron(x, draw(neuron_attrs()))


def _vector_block(draw, g: SpecBuilder, x: Node) -> Node:
    """linear–[BN]–neuron, a residual block, or two branches concatenated."""
    kind = draw(st.sampled_from(["dense", "residual", "cat"]))
    features = st.integers(2, 6)
    if kind == "dense":
        y = g.linear(x, draw(features), bias=draw(st.booleans()))
        return g.neuron(_maybe_bn(draw, g, y), draw(neuron_attrs()))
    if kind == "residual":
        n = x.shape[0]
        y = g.neuron(_maybe_bn(draw, g, g.linear(x, n)), draw(neuron_attrs()))
        y = g.linear(y, n, bias=draw(st.booleans()))
        return g.neuron(g.add("add", (y, x), y.shape, True), draw(neuron_attrs()))
    a = g.neuron(g.linear(x, draw(st.integers(1, 3))), draw(neuron_attrs()))
    b = g.neuron(_maybe_bn(draw, g, g.linear(x, draw(st.integers(1, 3)))), draw(neuron_attrs()))
    return g.add("cat", (a, b), (a.shape[0] + b.shape[0],), True)


@st.composite
def specs(draw, layout: str) -> Spec:
    """A random network in ``layout`` (``"TB"`` or ``"T*B"``), its T, batch, input and output form."""
    T = draw(st.one_of(st.integers(1, 4), st.integers(5, 16)))
    B = draw(st.integers(2 if T == 1 else 1, 3))
    static = draw(st.booleans())
    g = SpecBuilder()
    if draw(st.booleans()):
        size = draw(st.integers(3, 6))
        x = g.add("input", (), (draw(st.integers(1, 3)), size, size), not static)
    else:
        x = g.add("input", (), (draw(st.integers(2, 6)),), not static)
    image = len(x.shape) == 3
    if static:
        if draw(st.booleans()):             # a layer on the static input, before it is repeated over time
            x = g.conv(x, draw(st.integers(1, 3)), 3) if image else g.linear(x, draw(st.integers(2, 5)))
            if B * math.prod(x.shape[1:]) >= 2:
                x = _maybe_bn(draw, g, x)
        x = g.add("repeat", (x,), x.shape, True, how=draw(st.sampled_from(["repeat", "expand"])))
    if draw(st.integers(0, 3)) == 0:        # a BatchNorm straight on the (repeated) input
        x = g.bn(x, draw(st.sampled_from([0.1, None])))
    for _ in range(draw(st.integers(1, 3))):
        x = (_image_block if image else _vector_block)(draw, g, x)
        image = len(x.shape) == 3
    if image:
        if x.shape[1] > 1 and draw(st.booleans()):
            x = g.add("global_pool", (x,), (x.shape[0], 1, 1), True)
        x = g.add("flatten", (x,), (math.prod(x.shape),), True)
    if draw(st.booleans()) or not any(n.op == "neuron" for n in g.nodes):
        x = g.neuron(_maybe_bn(draw, g, g.linear(x, draw(st.integers(2, 6)))), draw(neuron_attrs()))
    forms = ["steps", "mean", "mean_first"] + (["steps_view"] if layout == "T*B" else [])
    output = draw(st.sampled_from(forms))
    if output == "mean_first":
        x = g.add("mean_time", (x,), x.shape, False)
    g.linear(x, draw(st.integers(2, 4)), bias=draw(st.booleans()))
    chunk = draw(st.sampled_from([2, 3, "default", None]))
    return g.build(T, B, layout, static, output, chunk, draw(st.integers(0, 2 ** 31 - 1)))


# ---------------------------------------------------------------------------------------------------
# The module of a specification
# ---------------------------------------------------------------------------------------------------
def neuron_module(attrs: Dict[str, Any], time_steps: Optional[int]) -> nn.Module:
    """The ``ratebp_compile.nn`` neuron of a neuron node's attributes."""
    name, width = attrs["surrogate"]
    common = dict(v_threshold=attrs["v_threshold"], v_reset=attrs["v_reset"], detach_reset=attrs["detach_reset"],
                  surrogate=_SURROGATE_CLASSES[name](width), time_steps=time_steps)
    if attrs["kind"] == "lif":
        return rc.nn.LIF(tau=attrs.get("tau"), decay=attrs.get("decay"), decay_input=attrs["decay_input"], **common)
    if attrs["kind"] == "if":
        return rc.nn.IF(**common)
    return rc.nn.ParametricLIF(attrs["init_tau"], decay_input=attrs["decay_input"], **common)


def _layer(node: Node, time_steps: Optional[int]) -> Optional[nn.Module]:
    a = node.attrs
    if node.op == "conv":
        return nn.Conv2d(a["in_channels"], a["out_channels"], a["kernel"], a["stride"], a["padding"], bias=a["bias"])
    if node.op == "linear":
        return nn.Linear(a["in_features"], a["out_features"], bias=a["bias"])
    if node.op == "bn":
        cls = nn.BatchNorm2d if len(node.shape) == 3 else nn.BatchNorm1d
        return cls(node.shape[0], momentum=a["momentum"], affine=a["affine"])
    if node.op == "avgpool":
        return nn.AvgPool2d(a["kernel"])
    if node.op == "global_pool":
        return nn.AdaptiveAvgPool2d(1)
    if node.op == "neuron":
        return neuron_module(a, time_steps)
    return None


class SpecNet(nn.Module):
    """The multi-step SNN of a :class:`Spec`: layers in ``self.layers`` under their node names.

    Layout ``"TB"``: temporal tensors are ``[T, B, ...]``; convolutions, BatchNorms and pooling run on
    ``[T·B, ...]`` (statistics over time × batch) and are split back. Layout ``"T*B"``: every temporal
    tensor is ``[T·B, ...]`` and the neurons are built with ``time_steps=T``.
    """

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        time_steps = spec.T if spec.layout == "T*B" else None
        self.layers = nn.ModuleDict()
        for node in spec.nodes:
            layer = _layer(node, time_steps)
            if layer is not None:
                self.layers[node.name] = layer

    def forward(self, x):
        values = {}
        for node in self.spec.nodes:
            values[node.name] = self._node(node, [values[i] for i in node.inputs], x)
        return self._output(values[self.spec.final.name])

    def _node(self, node: Node, args, x):
        T, merged = self.spec.T, self.spec.layout == "T*B"
        stacked = node.temporal and not merged          # this node's tensors are [T, B, ...]
        if node.op == "input":
            return x
        if node.op == "repeat":
            rank = len(node.shape) + 1
            if node.attrs["how"] == "expand":
                y = args[0].unsqueeze(0).expand(T, *[-1] * rank)
                return y.flatten(0, 1) if merged else y
            return args[0].repeat(T, *[1] * (rank - 1)) if merged else args[0].unsqueeze(0).repeat(T, *[1] * rank)
        if node.op == "mean_time":
            return args[0].unflatten(0, (T, -1)).mean(0) if merged else args[0].mean(0)
        if node.op in ("conv", "bn", "avgpool", "global_pool"):
            layer = self.layers[node.name]
            return layer(args[0].flatten(0, 1)).unflatten(0, (T, -1)) if stacked else layer(args[0])
        if node.op in ("linear", "neuron"):
            return self.layers[node.name](args[0])
        if node.op == "flatten":
            return args[0].flatten(2 if stacked else 1)
        if node.op == "add":
            return args[0] + args[1]
        if node.op == "cat":
            return torch.cat(args, dim=2 if stacked else 1)
        raise ValueError(f"unknown op {node.op!r}")

    def _output(self, y):
        spec = self.spec
        if not spec.final.temporal or spec.output == "steps":
            return y
        if spec.layout == "TB":
            return y.mean(0)
        steps = y.view(spec.T, -1, spec.final.shape[0])
        return steps if spec.output == "steps_view" else steps.mean(0)


def output_shape(spec: Spec) -> Tuple[int, ...]:
    """The shape of the module's output."""
    T, B, K = spec.T, spec.B, spec.final.shape[0]
    if not spec.final.temporal or spec.output == "mean":
        return (B, K)
    if spec.output == "steps" and spec.layout == "T*B":
        return (T * B, K)
    return (T, B, K)


def build_case(spec: Spec, dtype: torch.dtype = torch.float32) -> Tuple[SpecNet, torch.Tensor, torch.Tensor]:
    """The module of ``spec`` in training mode with parameters, BatchNorm buffers, input and loss weights
    drawn from ``spec.seed`` (in float32, then converted to ``dtype``): ``(model, x, loss_weights)``."""
    gen = torch.Generator().manual_seed(spec.seed)
    model = SpecNet(spec).train()
    with torch.no_grad():
        for name, layer in model.layers.items():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                fan_in = layer.weight[0].numel()
                layer.weight.normal_(0.0, WEIGHT_GAIN / math.sqrt(fan_in), generator=gen)
                if layer.bias is not None:
                    layer.bias.normal_(0.0, 0.5, generator=gen)
            elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
                if layer.affine:
                    layer.weight.uniform_(0.5, 1.5, generator=gen)
                    layer.bias.normal_(0.0, 0.3, generator=gen)
                layer.running_mean.normal_(0.0, 0.2, generator=gen)
                layer.running_var.uniform_(0.5, 1.5, generator=gen)
                layer.num_batches_tracked.fill_(int(torch.randint(0, 5, (), generator=gen)))
    inp = spec.nodes[0]
    lead = (spec.B,) if spec.static else (spec.T, spec.B)
    x = torch.rand(lead + inp.shape, generator=gen) * 2.0 - 0.5
    if spec.layout == "T*B" and not spec.static:
        x = x.flatten(0, 1)
    weights = torch.randn(output_shape(spec), generator=gen)
    return model.to(dtype), x.to(dtype), weights.to(dtype)


# ---------------------------------------------------------------------------------------------------
# The fixtures' architectures
# ---------------------------------------------------------------------------------------------------
def fixture_spec(meta: Dict[str, Any]) -> Spec:
    """The spec of a reference fixture's network (``meta`` as in fixtures/reference/README.md), with its
    parameters in the fixture's order; time-varying ``[T, B, C, H, W]`` input, time-mean logits out."""
    arch, T, B = meta["arch"], meta["T"], meta["batch"]
    lif = {"kind": "lif", "decay": meta["decay"], "decay_input": False, "v_threshold": meta["v_threshold"],
           "v_reset": None, "detach_reset": True, "surrogate": ("sigmoid", 4.0)}
    g = SpecBuilder()
    x = g.add("input", (), (meta["in_channels"], meta["hw"], meta["hw"]))
    if arch["kind"] == "vgg":
        for entry in arch["feature"]:
            if entry == "A":
                x = g.add("avgpool", (x,), (x.shape[0], x.shape[1] // 2, x.shape[2] // 2), kernel=2)
            elif entry == "AA":
                x = g.add("global_pool", (x,), (x.shape[0], 1, 1))
            else:
                x = g.neuron(g.bn(g.conv(x, entry, 3)), lif)
        x = g.add("flatten", (x,), (math.prod(x.shape),))
        widths = arch["classifier"]
        for i, n in enumerate(widths[1:]):
            x = g.linear(x, n)
            if i < len(widths) - 2:
                x = g.neuron(x, lif)
    else:
        x = g.neuron(g.bn(g.conv(x, arch["widths"][0], 3, bias=False)), lif)
        for stage, (blocks, width) in enumerate(zip(arch["blocks"], arch["widths"])):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                y = g.neuron(g.bn(g.conv(x, width, 3, stride, bias=False)), lif)
                y = g.bn(g.conv(y, width, 3, bias=False))
                shortcut = x if y.shape == x.shape else g.bn(g.conv(x, width, 1, stride, bias=False))
                x = g.neuron(g.add("add", (y, shortcut), y.shape), lif)
        x = g.add("flatten", (g.add("global_pool", (x,), (x.shape[0], 1, 1)),), (x.shape[0],))
        if arch["head"] == "resnet19":
            x = g.neuron(g.linear(x, 2 * x.shape[0]), lif)
        x = g.linear(x, meta["num_classes"])
    return g.build(T, B, output="mean", time_chunk=None)

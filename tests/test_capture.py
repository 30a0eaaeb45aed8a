"""Capture: any topology becomes a graph with neurons as single nodes and shapes on every node;
what cannot be captured is refused with the module or op and the user's source line."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ratebp_compile as rc
from ratebp_compile.capture import capture, propagate_shapes
from ratebp_compile.families import LIFDynamics
from ratebp_compile.nn import LIF
from tests.conftest import assert_model_unchanged, inputs_unchanged, snapshot_model

LINE = re.compile(r"test_capture\.py:\d+")


class Topology(nn.Module):
    """Residual add, two branches joined by cat, a shared module used twice, functional calls,
    nn.Sequential, and both the [T, B, ...] and the [T·B, ...] layouts."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.sn_stem = LIF(decay=0.3)
        self.shared = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.sn_a, self.sn_b = LIF(decay=0.3), LIF(decay=0.3)
        self.weight = nn.Parameter(torch.randn(5, 8) * 0.3)
        self.sn_out = LIF(decay=0.3, time_steps=3)

    def forward(self, x):
        T = x.shape[0]
        h = self.sn_stem(self.stem(x.flatten(0, 1)).unflatten(0, (T, -1)))
        flat = h.flatten(0, 1)
        a = self.sn_a(self.shared(flat).unflatten(0, (T, -1)))
        b = self.sn_b(F.relu(self.shared(flat) + flat).unflatten(0, (T, -1)))   # residual + shared module
        y = torch.cat([a, b], dim=2).mean((3, 4))                               # [T, B, 8]
        y = F.linear(y.flatten(0, 1), self.weight)                              # [T·B, 5]
        return self.sn_out(y).view(T, -1, 5)


def test_topology_capture_shapes_and_single_neuron_nodes():
    m = Topology()
    x = torch.rand(3, 2, 2, 6, 6)
    gm = capture(m, [x])
    neuron_calls = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LIF)]
    assert sorted(n.target for n in neuron_calls) == ["sn_a", "sn_b", "sn_out", "sn_stem"]
    assert sum(1 for n in gm.graph.nodes if n.target == "shared") == 2
    assert not any(n.target is getattr for n in gm.graph.nodes)         # shapes are concrete at capture
    for node in gm.graph.nodes:
        if node.op != "output":
            assert "val" in node.meta, node
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tuple(out.meta["val"].shape) == (3, 2, 5)
    m.train()
    torch.testing.assert_close(gm(x), m(x))


def test_topology_trains_with_transform():
    m = Topology()
    x = torch.rand(3, 2, 2, 6, 6)
    with pytest.warns(rc.ApproximationWarning, match="relu"), inputs_unchanged(x):
        tm = rc.transform(m)
        tm(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert any(p.grad.abs().sum() > 0 for p in m.parameters())


def test_capture_and_propagation_have_no_side_effects():
    m = Topology()
    before = copy.deepcopy(m.state_dict())
    gm = capture(m, [torch.rand(3, 2, 2, 6, 6)])
    propagate_shapes(gm, [torch.rand(3, 2, 2, 6, 6)])
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


class ControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.sn = LIF()

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.sn(x)


class Accumulator(nn.Module):
    def __init__(self):
        super().__init__()
        self.v = None

    def forward(self, x):
        self.v = x if self.v is None else self.v + x
        return self.v


class WithState(nn.Module):
    def __init__(self):
        super().__init__()
        self.acc = Accumulator()
        self.sn = LIF()

    def forward(self, x):
        return self.sn(self.acc(x))


def _foreign_neuron_class():
    base = type("BaseNode", (nn.Module,), {"__module__": "spikingjelly.activation_based.neuron"})
    return type("LIFNode", (base,), {"__module__": "spikingjelly.activation_based.neuron",
                                     "forward": lambda self, x: x})


class WithForeign(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.sn = _foreign_neuron_class()()

    def forward(self, x):
        return self.sn(self.fc(x))


@pytest.mark.parametrize("model,pattern", [
    (ControlFlow, r"control flow.*test_capture\.py:\d+ in forward: if x\.sum\(\) > 0"),
    (WithState, r"module 'acc' \(Accumulator\): its forward sets self\.v at .*test_capture\.py:\d+ in forward"),
    (WithForeign, r"unrecognised stateful module 'sn' \(spikingjelly.*LIFNode\).*register_neuron.*test_capture"),
], ids=["control-flow", "stateful", "foreign-neuron"])
def test_refused_at_capture_with_source_line(model, pattern):
    m = model()
    snap = snapshot_model(m)
    with pytest.raises(rc.RateBPError, match=re.compile(pattern, re.S)):
        rc.transform(m)(torch.rand(3, 2, 3))
    assert_model_unchanged(m, snap)


class _TensorDecayNeuron(nn.Module):
    """Another library's multi-step LIF keeping its decay in a buffer, as snnTorch's Leaky keeps beta."""

    def __init__(self):
        super().__init__()
        self.register_buffer("beta", torch.tensor(0.25))

    def forward(self, x):
        return rc.nn.LIF(decay=float(self.beta))(x)


def test_a_registered_neuron_whose_spec_reads_its_tensors():
    """``to_spec`` runs on the real module, never while tracing or on fake tensors; changing the buffer the
    spec reads recompiles."""
    rc.nn.register_neuron(_TensorDecayNeuron, lambda m: rc.nn.NeuronSpec(LIFDynamics(decay=float(m.beta))))
    model = nn.Sequential(nn.Linear(3, 4), _TensorDecayNeuron(), nn.Linear(4, 2))
    plain = copy.deepcopy(model)
    x = torch.rand(4, 2, 3) * 2
    tm = rc.transform(model)
    with inputs_unchanged(x):
        out = tm(x)
        out.sum().backward()
    torch.testing.assert_close(out.detach(), plain(x))
    model[1].beta.fill_(0.75)                        # in place: the spec the guards recompute changes
    assert "neuron '1' changed" in tm.compiled.guards.check()
    torch.testing.assert_close(tm(x).detach(), plain[2](rc.nn.LIF(decay=0.75)(plain[0](x))))

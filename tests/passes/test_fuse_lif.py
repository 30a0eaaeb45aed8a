"""fuse_lif: supported neurons become fused kernel calls; results equal the unfused graph's."""
import copy

import torch
from torch import nn

from ratebp_compile import kernels
from ratebp_compile.nn import LIF, Neuron, NeuronSpec, ParametricLIF, Sigmoid, spike
from ratebp_compile.passes import BPTT_PIPELINE, fuse_lif
from tests.conftest import assert_close, inputs_unchanged
from tests.passes.util import Tiny, prepare, tiny_input



def _neurons(graph_module):
    return [n for n in graph_module.graph.nodes if isinstance(n.target, NeuronSpec)]


def test_spike_graph_structure_numerics_and_fired():
    model = Tiny().train()
    twin = copy.deepcopy(model)
    x = tiny_input(T=3)
    program, _ = prepare(model, [x], "fuse_lif", inclusive=False)
    unfused, _ = prepare(twin, [x], "fuse_lif", inclusive=False)
    result = fuse_lif(program)
    assert result.modified
    (node,) = _neurons(result.gm.spike)
    assert node.target.fused and node.target.mode == "spike" and node.meta["ratebp.pass"] == "fuse_lif"
    assert "lif_fused_spike_pass(" in result.gm.spike.code
    out, ref = result.gm(x), unfused(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_bptt_graph_with_a_learned_decay():
    model = nn.Sequential(nn.Linear(4, 6), ParametricLIF(v_reset=0.0), nn.Linear(6, 2))
    twin = copy.deepcopy(model)
    x = torch.randn(5, 3, 4)
    gm, _ = prepare(model, [x], "normalize_neurons")
    result = fuse_lif(gm)
    assert result.modified and all(n.target.fused for n in _neurons(result.gm))
    assert [p.__name__ for p in BPTT_PIPELINE] == ["normalize_neurons", "fold_time", "sync_batchnorm", "fuse_lif",
                                                "unstride_pointwise_convs"]
    with inputs_unchanged(x):
        out = result.gm(x)
        out.square().sum().backward()
    ref = nn.Sequential(twin[0], _Unfused(twin[1]), twin[2])(x)    # autograd through the PyTorch loop
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    assert_close(model[1].w.grad, twin[1].w.grad)
    assert_close(model[0].weight.grad, twin[0].weight.grad)


class _Unfused(nn.Module):
    def __init__(self, neuron):
        super().__init__()
        self.neuron = neuron

    def forward(self, x):
        spec = self.neuron.spec()
        return spec(x, *[getattr(self.neuron, p) for p in spec.param_names])


class _Custom(Neuron):
    def step(self, x, state):
        (v,) = state
        h = 0.5 * v + x
        s = spike(h - 1.0, Sigmoid(4.0))
        return s, (h - s.detach(),)


def test_custom_neurons_are_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), _Custom())
    gm, _ = prepare(model, [torch.randn(3, 2, 4)], "normalize_neurons")
    result = fuse_lif(gm)
    assert not result.modified
    assert not any(n.target.fused for n in _neurons(result.gm))


def test_float64_is_fused_and_runs_the_reference():
    model = nn.Sequential(nn.Linear(4, 4), LIF(v_reset=0.0)).double()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    gm, _ = prepare(model, [x], "normalize_neurons")
    assert fuse_lif(gm).modified
    assert not kernels.lif._use_triton(x)
    torch.testing.assert_close(gm(x), _Unfused(model[1])(model[0](x)), rtol=0, atol=0)

"""normalize_neurons: neuron module calls become NeuronSpec nodes; the graph computes the same."""
import torch
from torch import nn

from ratebp_compile.nn import LIF, NeuronSpec, ParametricLIF
from ratebp_compile.passes import normalize_neurons
from tests.conftest import inputs_unchanged
from tests.passes.util import Tiny, prepare, tiny_input


def test_structure_numerics_and_fired():
    model = Tiny().train()
    x = tiny_input()
    gm, _ = prepare(model, [x], "normalize_neurons", inclusive=False)
    result = normalize_neurons(gm)
    assert result.modified
    neurons = [n for n in result.gm.graph.nodes if isinstance(n.target, NeuronSpec)]
    assert len(neurons) == 1
    (node,) = neurons
    assert node.target == LIF(decay=0.5, v_threshold=0.5).spec()
    assert node.meta["ratebp.neuron"] is node.target and node.meta["ratebp.module"] == "sn"
    assert [a.name for a in node.args] == ["unflatten"]
    assert not any(n.op == "call_module" and n.target == "sn" for n in result.gm.graph.nodes)
    assert "lif = ratebp_compile_nn_spec_lif(unflatten)" in result.gm.code
    assert node.meta["ratebp.pass"] == "normalize_neurons"
    assert "util.py" in node.meta["ratebp.source"]
    torch.testing.assert_close(result.gm(x), model(x), rtol=0, atol=0)


def test_learnable_parameters_become_arguments():
    model = nn.Sequential(nn.Linear(4, 4), ParametricLIF(init_tau=3.0))
    x = torch.randn(3, 2, 4)
    gm, _ = prepare(model, [x], "normalize_neurons")
    (node,) = [n for n in gm.graph.nodes if isinstance(n.target, NeuronSpec)]
    assert node.target.__name__ == "plif"
    assert node.args[1].op == "get_attr" and node.args[1].target == "1.w"
    with inputs_unchanged(x):
        out = gm(x)
        out.sum().backward()
    assert model[1].w.grad is not None
    torch.testing.assert_close(out.detach(), model(x).detach())


def test_no_neurons_is_not_modified():
    gm, _ = prepare(nn.Linear(3, 3), [torch.randn(2, 3)], "normalize_neurons", inclusive=False)
    assert not normalize_neurons(gm).modified

"""build_rate_graph: the length-1 graph; gradients equal a hand-written rate-based step."""
import copy
import operator

import pytest
import torch

from ratebp_compile.graph_ops import rate_batch_norm, rate_neuron, route_gradient, time_average
from ratebp_compile.kernels.lif_math import lif_spike_pass
from ratebp_compile.nn import NeuronSpec
from ratebp_compile.passes import build_rate_graph
from tests.conftest import assert_close, inputs_unchanged
from tests.passes.util import Tiny, node_named, prepare, tiny_input


def _reference_rate_step(model, x, grad_out):
    """DESIGN.md's contract written out by hand for Tiny: returns (output, {param name: grad})."""
    T, eps = x.shape[0], model.bn.eps
    w, b = model.bn.weight, model.bn.bias
    with torch.no_grad():                                        # spike pass
        c = model.conv(x.flatten(0, 1))
        mean_s, var_s = c.mean((0, 2, 3)), c.var((0, 2, 3), unbiased=False)
        y = (c - mean_s[:, None, None]) / torch.sqrt(var_s[:, None, None] + eps) * w[:, None, None] + b[:, None, None]
        spikes, r, e = lif_spike_pass(y.unflatten(0, (T, -1)), 0.5, decay_input=False, v_threshold=0.5,
                                      v_reset=None, detach_reset=True, surrogate=model.sn.surrogate.name,
                                      width=model.sn.surrogate.width)
        out = model.fc(spikes.mean((3, 4)))
    cr = model.conv(x.mean(0))                                   # rate pass on the time average
    mr, vr = cr.mean((0, 2, 3)), cr.var((0, 2, 3), unbiased=False)
    m = (mean_s + (mr - mr.detach()))[:, None, None]
    v = (var_s + (vr - vr.detach()))[:, None, None]
    yr = (cr - m) / torch.sqrt(v + eps) * w[:, None, None] + b[:, None, None]
    sr = r + (yr * e - (yr * e).detach())
    out_rate = model.fc(sr.mean((2, 3)))
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(out_rate, list(params.values()), grad_out.sum(0))   # gradients summed over T
    return out, dict(zip(params, grads))


def test_structure_numerics_and_fired():
    model = Tiny().double().train()
    reference = copy.deepcopy(model)
    x = tiny_input(T=4, B=5).double()
    program, _ = prepare(model, [x], "build_rate_graph", inclusive=False)
    result = build_rate_graph(program)
    assert result.modified
    rate = result.gm.rate
    targets = [n.target for n in rate.graph.nodes]
    assert rate_neuron in targets and rate_batch_norm in targets
    assert not any(isinstance(t, NeuronSpec) for t in targets)
    placeholders = [n.target for n in rate.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x", "bn_mean_bn", "bn_var_bn", "r_sn", "e_sn"]
    assert node_named(rate, "reshape_1").args[1] == (1, 5, 3, 5, 5)     # unflatten(0, (T, -1)) at T = 1
    program_targets = [n.target for n in result.gm.graph.nodes]
    assert time_average in program_targets and route_gradient in program_targets

    out = result.gm(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_out, ref_grads = _reference_rate_step(reference, x, grad_out)
    torch.testing.assert_close(out.detach(), ref_out, rtol=0, atol=0)
    for name, p in model.named_parameters():
        assert_close(p.grad, ref_grads[name], name)


def test_sum_over_time_is_scaled_by_T():
    class SumOut(Tiny):
        def forward(self, x):
            return super().forward(x).sum(0)

    model = SumOut().train()
    x = tiny_input(T=3)
    program, _ = prepare(model, [x], "build_rate_graph")
    assert any(n.target is operator.mul and n.args[1] == 3 for n in program.rate.graph.nodes)
    with inputs_unchanged(x):
        program(x).sum().backward()
    g_fc = model.fc.weight.grad.clone()
    # sum over time of the logits = T x their mean: the last layer's gradient is T x that of the mean
    model.zero_grad()
    mean_model = Tiny().train()
    mean_model.load_state_dict(model.state_dict())
    program_mean, _ = prepare(mean_model, [x], "build_rate_graph")
    program_mean(x).mean(0).sum().backward()
    torch.testing.assert_close(g_fc, 3 * mean_model.fc.weight.grad)


@pytest.mark.parametrize("B", [1, 4])
def test_T1_equals_bptt(B):
    model = Tiny().double().train()
    reference = copy.deepcopy(model)
    x = tiny_input(T=1, B=B).double()
    program, _ = prepare(model, [x], "build_rate_graph")
    with inputs_unchanged(x):
        program(x).square().sum().backward()
    reference(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


"""The custom ops as torch sees them: opcheck (schema, fake tensors, autograd, AOT dispatch), and
torch.compile(fullgraph=True) of models that use them without a graph break."""
import pytest
import torch
import torch.nn.functional as F

import ratebp_compile as rc
from ratebp_compile import models
from ratebp_compile.nn import LIF, ParametricLIF

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _x(*shape, requires_grad=False):
    return (torch.randn(*shape, device=DEVICE) + 0.5).requires_grad_(requires_grad)


COMMON = dict(v_threshold=1.0, decay_input=True, detach_reset=False, surrogate="atan", width=2.0, strict=False,
              delayed_reset=False)
# the other tie rule and the delayed reset (detached)
VARIANT = dict(COMMON, detach_reset=True, strict=True, delayed_reset=True)


NEURONS = pytest.mark.parametrize("learned,v_reset,flags", [(False, None, COMMON), (True, 0.0, COMMON),
                                                            (False, None, VARIANT), (True, 0.0, VARIANT)],
                                   ids=["lif-soft", "plif-hard", "lif-soft-strict-delayed", "plif-hard-strict-delayed"])


@NEURONS
def test_opcheck_spike_pass(learned, v_reset, flags):
    decay = torch.tensor(0.4, device=DEVICE) if learned else None
    torch.library.opcheck(torch.ops.ratebp.lif_spike_pass.default,
                          (_x(3, 2, 5), float("nan") if learned else 0.4, decay),
                          dict(flags, v_reset=v_reset, decay_tangent=learned, uint8_spikes=learned))


@NEURONS
def test_opcheck_spike_scan(learned, v_reset, flags):
    from ratebp_compile.kernels.lif import lif_scan_state

    decay = torch.tensor(0.4, device=DEVICE) if learned else None
    x = _x(3, 2, 5)
    torch.library.opcheck(torch.ops.ratebp.lif_spike_scan.default,
                          (x, lif_scan_state(x[0], learned), float("nan") if learned else 0.4, decay),
                          dict(flags, v_reset=v_reset, uint8_spikes=True))


@NEURONS
def test_opcheck_bptt_forward(learned, v_reset, flags):
    decay = torch.tensor(0.4, device=DEVICE, requires_grad=learned) if learned else None
    torch.library.opcheck(torch.ops.ratebp.lif_bptt_forward.default,
                          (_x(3, 2, 5, requires_grad=True), float("nan") if learned else 0.4, decay),
                          dict(flags, v_reset=v_reset))


@pytest.mark.parametrize("decay_grad,with_x,flags", [(False, True, COMMON), (True, True, COMMON),
                                                     (False, False, COMMON), (True, True, VARIANT)])
def test_opcheck_bptt_backward(decay_grad, with_x, flags):
    x = _x(3, 2, 5)
    _, h = torch.ops.ratebp.lif_bptt_forward(x, 0.4, None, **dict(flags, v_reset=None))
    torch.library.opcheck(torch.ops.ratebp.lif_bptt_backward.default,
                          (torch.randn_like(x), h, x if with_x else None, 0.4, torch.tensor(0.4, device=DEVICE)),
                          dict(flags, v_reset=None, decay_grad=decay_grad))


def test_compile_fullgraph_of_neuron_modules_has_no_graph_break():
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), LIF(decay=0.3), torch.nn.Linear(8, 8),
                              ParametricLIF(), torch.nn.Linear(8, 3)).to(DEVICE)
    x = _x(4, 2, 6)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, net(x))
    explanation = torch._dynamo.explain(net)(x)
    assert explanation.graph_break_count == 0
    ops = {str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any(op.startswith("ratebp.lif_bptt_forward") for op in ops)    # one node per neuron


def test_compile_fullgraph_of_the_spike_graph():
    tm = rc.transform(models.vgg11(width=4, num_classes=3).to(DEVICE))
    x = _x(2, 2, 3, 32, 32)
    out = tm(x)
    F.cross_entropy(out.mean(0), torch.tensor([0, 2], device=DEVICE)).backward()
    spike = tm.compiled.step.spike
    assert any(getattr(n.target, "fused", False) for n in spike.graph.nodes)
    compiled = torch.compile(spike, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for a, b in zip(compiled(x), spike(x)):
            torch.testing.assert_close(a, b)

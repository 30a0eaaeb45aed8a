"""build_spike_graph: a program whose no-grad spike graph is the exact forward and emits r, e and
BatchNorm statistics; running statistics are updated last."""
import copy

import torch
from torch.fx import GraphModule

from ratebp_compile.graph_ops import spike_batch_norm, update_batch_norm_stats, without_grad
from ratebp_compile.kernels.lif_math import lif_spike_pass
from ratebp_compile.nn import NeuronSpec
from ratebp_compile.passes import build_spike_graph
from tests.conftest import assert_close
from tests.passes.util import Tiny, prepare, tiny_input


def test_structure_numerics_and_fired():
    model = Tiny().train()
    reference = copy.deepcopy(model)
    x = tiny_input(T=3)
    gm, _ = prepare(model, [x], "build_spike_graph", inclusive=False)
    result = build_spike_graph(gm)
    assert result.modified
    program = result.gm
    assert isinstance(program.spike, GraphModule) and program.meta["ratebp.source"] is gm

    spike_targets = [n.target for n in program.spike.graph.nodes if n.op == "call_function"]
    (spec,) = [t for t in spike_targets if isinstance(t, NeuronSpec)]
    assert spec.mode == "spike"
    assert spike_batch_norm in spike_targets
    assert not any(n.op == "call_module" and n.target == "bn" for n in program.spike.graph.nodes)
    program_targets = [n.target for n in program.graph.nodes]
    assert without_grad in program_targets
    assert program_targets.index(update_batch_norm_stats) > program_targets.index(without_grad)
    aux = [n.meta["ratebp.aux"] for n in program.graph.nodes if "ratebp.aux" in n.meta]
    assert [(s.name, s.role, s.owner) for s in aux] == [("bn_mean_bn", "mean", "bn"), ("bn_var_bn", "var", "bn"),
                                                        ("r_sn", "r", "sn"), ("e_sn", "e", "sn")]
    assert program.meta["ratebp.statistics"] == aux and [n.name for n in program.graph.nodes
                                                         if "ratebp.aux" in n.meta] == [s.name for s in aux]
    assert aux[0].node.target == "bn" and aux[2].node.meta["ratebp.module"] == "sn"     # the source nodes

    out = program(x)
    expected = reference(x)                     # plain train-mode forward: also updates its BN stats
    assert not out.requires_grad
    assert_close(out, expected)
    for name, buf in model.bn.named_buffers():
        assert_close(buf.float(), getattr(reference.bn, name).float(), f"buffer {name}")

    # the statistics the spike graph emits
    outs = program.spike(x)
    c = model.conv(x.flatten(0, 1)).detach()
    assert_close(outs[1], c.mean((0, 2, 3)))
    torch.testing.assert_close(outs[2], c.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)
    y = torch.nn.functional.batch_norm(c, None, None, model.bn.weight, model.bn.bias, True).detach()
    _, r, e = lif_spike_pass(y.unflatten(0, (3, -1)), 0.5, decay_input=False, v_threshold=0.5, v_reset=None,
                             detach_reset=True, surrogate=model.sn.surrogate.name,
                                      width=model.sn.surrogate.width)
    assert_close(outs[3], r.unsqueeze(0))
    assert_close(outs[4], e.unsqueeze(0))

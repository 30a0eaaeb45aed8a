"""sync_batchnorm: the BatchNorms that synchronise become one ``sync_batch_norm`` node (module, per-step and
functional forms), which computes what the BatchNorm did on one process; the graph builders pass its group
on. (Two processes: tests/distributed/test_sync_batchnorm.py.)"""
import copy

import torch
from torch import nn

import ratebp_compile as rc
from ratebp_compile.graph_ops import (rate_batch_norm, spike_batch_norm, spike_batch_norm_per_step, sync_batch_norm,
                                      update_batch_norm_stats)
from ratebp_compile.passes import sync_batchnorm
from ratebp_compile.passes.sync_batchnorm import SYNC_GROUP
from tests.conftest import assert_close, inputs_unchanged
from tests.passes.util import SingleBN, Tiny, prepare, tiny_input


def _before_pass(model, x, group):
    gm, _ = prepare(model, [x], "sync_batchnorm", inclusive=False)
    gm.meta[SYNC_GROUP] = group
    return gm


def test_structure_numerics_and_fired():
    model = Tiny().train()
    reference = copy.deepcopy(model)
    x = tiny_input(T=3)
    result = sync_batchnorm(_before_pass(model, x, "WORLD"))
    assert result.modified
    code = result.gm.code
    assert "bn = self.bn(" not in code
    assert ("sync_batch_norm = ratebp_compile_graph_ops_sync_batch_norm(conv, bn_weight, bn_bias, bn_1, 1e-05, None, "
            "'WORLD', None)") in code
    with inputs_unchanged(x):      # one process: the BatchNorm it was, running statistics included
        out = result.gm(x)
    assert_close(out, reference(x))
    for name, buf in model.bn.named_buffers():
        assert_close(buf.float(), getattr(reference.bn, name).float(), f"buffer {name}")


def test_gradients_on_one_process_are_the_batchnorm_s():
    model = Tiny().train()
    reference = copy.deepcopy(model)
    x = tiny_input(T=3)
    gm = sync_batchnorm(_before_pass(model, x, "WORLD")).gm
    gm(x).square().sum().backward()
    reference(x).square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_nothing_to_sync_leaves_the_graph():
    model = Tiny().train()
    x = tiny_input(T=3)
    result = sync_batchnorm(_before_pass(model, x, None))
    assert not result.modified and "self.bn(" in result.gm.code
    model.bn.eval()           # a module in eval mode never synchronises (as nn.SyncBatchNorm)
    result = sync_batchnorm(_before_pass(model, x, "WORLD"))
    assert not result.modified


def test_nn_syncbatchnorm_synchronises_over_its_own_group_without_the_option():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(Tiny()).train()
    x = tiny_input(T=3)
    result = sync_batchnorm(_before_pass(model, x, None))
    assert result.modified and "'WORLD', None)" in result.gm.code
    model.eval()
    assert not sync_batchnorm(_before_pass(model, x, None)).modified


def test_a_batchnorm_per_step_keeps_its_steps():
    model = SingleBN().train()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 2, 2, 5, 5)
    result = sync_batchnorm(_before_pass(model, x, "WORLD"))
    assert result.modified
    (node,) = [n for n in result.gm.graph.nodes if n.target is sync_batch_norm]
    assert node.args[-1] == 3 and node.args[-2] == "WORLD"
    assert_close(result.gm(x), reference(x))
    assert_close(model.bn.running_var, reference.bn.running_var)
    assert int(model.bn.num_batches_tracked) == 3


def test_the_builders_pass_the_group_on():
    """Through the whole pipeline: the spike pass's BatchNorm, the running-statistics update and the rate pass's
    BatchNorm carry the group; the step equals the unsynchronised one on one process."""
    model = Tiny().train()
    reference = copy.deepcopy(model)
    x = tiny_input(T=3)
    step = rc.transform(model, sync_batchnorm=True)
    with inputs_unchanged(x):
        step(x).sum().backward()
    rc.transform(reference)(x).sum().backward()
    program = step.compiled
    calls = {n.target: n for g in (program.spike, program.rate, program.step) for n in g.graph.nodes
             if n.op == "call_function"}
    assert calls[spike_batch_norm].args[-1] == "WORLD" and calls[rate_batch_norm].args[-1] == "WORLD"
    assert calls[update_batch_norm_stats].args[-1] == "WORLD"
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
    single = rc.transform(SingleBN().train(), sync_batchnorm=True)
    single(torch.randn(3, 2, 2, 5, 5)).sum().backward()
    assert any(n.target is spike_batch_norm_per_step and n.args[-1] == "WORLD" for n in single.compiled.spike.graph.nodes)


def test_option_values():
    assert rc.transform(Tiny(), sync_batchnorm=True).options.sync_batchnorm == "WORLD"
    for bad in ("world", 1, object()):
        try:
            rc.transform(Tiny(), sync_batchnorm=bad)
        except rc.RateBPError as e:
            assert "sync_batchnorm must be None, True or a torch.distributed ProcessGroup" in str(e) or \
                "unknown process group key" in str(e)
        else:
            raise AssertionError(f"{bad!r} accepted")

"""Forward hooks of the user's modules run once per step, with the real tensors of the spike pass (all T
steps), as in the plain model; hooks that would change a module's input or output, backward hooks and
global hooks are refused."""
import copy

import pytest
import torch
from torch import nn

import ratebp_compile as rc
from ratebp_compile.hooks import ModuleHooks
from ratebp_compile.nn import LIF, LIFCell
from tests.conftest import assert_model_unchanged, inputs_unchanged, snapshot_model


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.sn = LIF(decay=0.5, v_threshold=0.4)

    def forward(self, x):
        T = x.shape[0]
        return self.sn(self.bn(self.conv(x.flatten(0, 1))).unflatten(0, (T, -1)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(self.block(x).mean((3, 4)))


def _monitor(model, names):
    """Forward hooks and pre-hooks on ``names``; returns the list of (name, kind, shapes, real tensor?) seen."""
    seen = []
    for name in names:
        module = model.get_submodule(name)

        def hook(m, args, out, name=name):
            seen.append((name, "post", tuple(out.shape), type(out) is torch.Tensor, out.detach().clone()))

        def pre(m, args, name=name):
            seen.append((name, "pre", tuple(args[0].shape), type(args[0]) is torch.Tensor, args[0].detach().clone()))

        module.register_forward_hook(hook)
        module.register_forward_pre_hook(pre)
    return seen


NAMES = ["", "block", "block.conv", "block.bn", "block.sn", "fc"]


@pytest.mark.parametrize("time_chunk", [None, 2], ids=["unstreamed", "streamed"])
@pytest.mark.parametrize("method", ["ratebp", "bptt"])
def test_hooks_run_once_per_step_with_the_plain_models_tensors(method, time_chunk):
    model = Net().double()
    plain = copy.deepcopy(model)
    x = torch.rand(5, 2, 2, 4, 4, dtype=torch.float64)
    expected = _monitor(plain, NAMES)
    plain(x)
    seen = _monitor(model, NAMES)
    tm = rc.transform(model, method=method, time_chunk=time_chunk)
    for _ in range(2):
        seen.clear()
        x_before = x.clone()
        tm(x).sum().backward()
        assert torch.equal(x, x_before)
        assert [s[:4] for s in seen] == [e[:4] for e in expected]          # order, shapes, real tensors
        for (name, kind, *_, got), (*_, want) in zip(seen, expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{name} {kind}")


def test_hook_nodes_are_in_the_spike_graph_and_not_in_the_rate_graph():
    model = Net()
    _monitor(model, ["block.sn", "fc"])
    tm = rc.transform(model)
    tm(torch.rand(3, 2, 2, 4, 4)).sum().backward()
    program = tm.compiled
    in_spike = [n.target for n in program.spike.graph.nodes if isinstance(n.target, ModuleHooks)]
    assert sorted((h.path, h.kind) for h in in_spike) == [("block.sn", "post"), ("block.sn", "pre"),
                                                          ("fc", "post"), ("fc", "pre")]
    assert not any(isinstance(n.target, ModuleHooks) for n in program.rate.graph.nodes)
    assert "forward_hooks" in program.spike.code
    assert [n.meta["ratebp.class"].kind for n in program.source.graph.nodes if isinstance(n.target, ModuleHooks)] \
        == ["hook"] * 4


def test_no_hook_runs_at_capture_or_on_fake_tensors():
    model = Net()
    seen = _monitor(model, NAMES)
    tm = rc.transform(model, example_inputs=[torch.rand(3, 2, 2, 4, 4)])
    rc.show(tm)
    assert seen == []


def test_a_hook_added_after_the_first_step_runs():
    model, x = Net(), torch.rand(3, 2, 2, 4, 4)
    tm = rc.transform(model)
    tm(x).sum().backward()
    seen = _monitor(model, ["block.sn"])
    tm(x).sum().backward()
    assert [s[:2] for s in seen] == [("block.sn", "pre"), ("block.sn", "post")]


def test_a_hook_that_changes_the_output_is_refused_and_changes_nothing():
    model = Net()
    model.block.sn.register_forward_hook(lambda m, args, out: out * 2)
    snap = snapshot_model(model)
    with pytest.raises(rc.RateBPError, match=r"forward hook .*<lambda> of module 'block\.sn' \(LIF\) returns a value"):
        rc.transform(model)(torch.rand(3, 2, 2, 4, 4))
    assert_model_unchanged(model, snap)
    assert model.block.sn._forward_hooks                       # the user's hook is still registered


@pytest.mark.parametrize("register,match", [
    (lambda m: m.fc.register_full_backward_hook(lambda *a: None), "module 'fc' .* has backward hooks"),
    (lambda m: nn.modules.module.register_module_forward_hook(lambda *a: None), "global module forward hook"),
], ids=["backward", "global"])
def test_hooks_it_cannot_honour_are_refused(register, match):
    model = Net()
    handle = register(model)
    try:
        with pytest.raises(rc.RateBPError, match=match):
            rc.transform(model)(torch.rand(3, 2, 2, 4, 4))
    finally:
        handle.remove()


def test_hooks_in_a_single_step_loop_are_refused():
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.sn = LIFCell()

        def forward(self, x):
            return torch.stack([self.sn(self.fc(x_t)) for x_t in x])

    model = Loop()
    model.sn.register_forward_hook(lambda *a: None)
    with pytest.raises(rc.RateBPError, match="hooks .* single-step"):
        rc.transform(model)(torch.rand(3, 2, 3))


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_a_hook_that_changes_its_module_is_refused():
    """The old torch.nn.utils.weight_norm recomputes the weight in a forward pre-hook: the step would keep
    the weight capture saw."""
    model = Net()
    torch.nn.utils.weight_norm(model.fc)
    with pytest.raises(rc.RateBPError, match=r"forward pre-hook .* of module 'fc' \(Linear\) sets self\.weight"):
        rc.transform(model)(torch.rand(3, 2, 2, 4, 4))


def test_parametrized_weight_norm_is_traced():
    model = Net()
    torch.nn.utils.parametrizations.weight_norm(model.fc)
    plain = copy.deepcopy(model)
    x = torch.rand(3, 2, 2, 4, 4)
    out = rc.transform(model)(x)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), plain(x))
    assert model.fc.parametrizations.weight.original0.grad is not None


def test_hooks_under_the_backend_see_the_spike_pass_once():
    """Dynamo traces an observing hook into the graph: it runs once per step on the plain model's values."""
    torch._dynamo.reset()
    model = Net()
    plain = copy.deepcopy(model)
    x = torch.rand(3, 2, 2, 4, 4)
    expected = _monitor(plain, ["block.sn", "fc"])
    plain(x)
    seen = _monitor(model, ["block.sn", "fc"])
    with inputs_unchanged(x):
        torch.compile(model, backend="ratebp", options={"compiler": "eager"})(x).sum().backward()
    torch._dynamo.reset()
    assert [s[:4] for s in seen] == [e[:4] for e in expected]
    for (name, kind, *_, got), (*_, want) in zip(seen, expected):
        torch.testing.assert_close(got, want, msg=f"{name} {kind}")

"""transform(): the semantics contract — exact outputs, gradients routed into the rate graph, the
model's identity, BatchNorm statistics once per step, eval = plain SNN, no state left behind."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ratebp_compile as rc
from ratebp_compile import models
from ratebp_compile.nn import LIF, ParametricLIF
from tests.conftest import assert_model_unchanged, bitwise_equal, snapshot_model
from tests.passes.util import Tiny, tiny_input


def _step(model, x, loss_fn=lambda out: out.mean(0).square().sum(), **kwargs):
    """One training step; the input (and tensor keyword inputs) must come out unchanged."""
    inputs = [x] + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    before = [t.clone() for t in inputs]
    out = model(x, **kwargs)
    loss_fn(out).backward()
    assert all(bitwise_equal(t, b) for t, b in zip(inputs, before)), "the step changed an input"
    return out


def test_outputs_are_the_spike_pass_values():
    model = models.resnet18(width=4)
    plain = copy.deepcopy(model).train()
    x = torch.rand(3, 2, 3, 16, 16)
    out = rc.transform(model)(x)
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), plain(x).detach(), rtol=0, atol=0)


def test_identity_with_the_users_model():
    model = models.SpikingMLP(12, (8,), 3, batch_norm=True, neuron=lambda: ParametricLIF())
    tm = rc.transform(model)
    assert list(tm.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(tm.parameters(), model.parameters()))
    assert all(a is b for a, b in zip(tm.buffers(), model.buffers()))
    opt = torch.optim.SGD(tm.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    _step(tm, torch.rand(4, 5, 12))
    opt.step()
    assert not torch.equal(model.out.weight, before["out.weight"])
    tm.load_state_dict(before)
    assert torch.equal(model.out.weight, before["out.weight"])
    assert tm.out is model.out                               # attributes reach through
    for m in model.modules():                                # the rewrite is in the graph, not in hooks
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def test_batchnorm_statistics_updated_once_per_step_from_the_spike_pass():
    model = Tiny().train()
    plain = copy.deepcopy(model)
    x = tiny_input(T=3)
    tm = rc.transform(model)
    for _ in range(2):
        _step(tm, x)
        plain(x)                                              # the plain SNN's train-mode forward
    for name, buf in model.bn.named_buffers():
        torch.testing.assert_close(buf.float(), getattr(plain.bn, name).float(), msg=name)
    assert model.bn.num_batches_tracked.item() == 2


def test_cumulative_momentum_batchnorm():
    model = Tiny().train()
    model.bn.momentum = None
    plain = copy.deepcopy(model)
    tm = rc.transform(model)
    for seed in range(3):
        x = tiny_input(T=2) + seed
        _step(tm, x)
        plain(x)
    assert model.bn.num_batches_tracked.item() == 3
    for name, buf in model.bn.named_buffers():
        torch.testing.assert_close(buf, getattr(plain.bn, name), rtol=1e-6, atol=1e-7, msg=name)


def test_eval_is_the_plain_snn_and_compiles_nothing():
    model = Tiny()
    tm = rc.transform(model).eval()
    assert not model.training
    x = tiny_input()
    torch.testing.assert_close(tm(x), model(x), rtol=0, atol=0)
    assert tm.compiled is None
    tm.train()
    assert model.training and model.bn.training


def test_no_grad_in_train_mode_runs_the_plain_model():
    model = Tiny().train()
    tm = rc.transform(model)
    with torch.no_grad():
        out = tm(tiny_input())
    assert not out.requires_grad and tm.compiled is None and model.bn.num_batches_tracked.item() == 1


def test_last_layer_gradient_equals_bptt():
    model = models.vgg11(width=4, num_classes=5)
    bptt = copy.deepcopy(model)
    x = torch.rand(4, 3, 3, 32, 32)
    y = torch.randint(0, 5, (3,))
    loss = lambda out: F.cross_entropy(out.mean(0), y)   # noqa: E731
    _step(rc.transform(model), x, loss)
    _step(rc.transform(bptt, method="bptt"), x, loss)
    torch.testing.assert_close(model.classifier[0].weight.grad, bptt.classifier[0].weight.grad)
    torch.testing.assert_close(model.classifier[0].bias.grad, bptt.classifier[0].bias.grad)
    assert not torch.allclose(model.features[0].conv.weight.grad, bptt.features[0].conv.weight.grad)


def test_per_step_losses_sum_their_gradients():
    model = Tiny().double().train()
    x = tiny_input(T=3).double()
    y = torch.randint(0, 4, (3,))
    tm = rc.transform(model)
    _step(tm, x, lambda out: sum(F.cross_entropy(out[t], y) for t in range(3)))
    g_per_step = model.fc.weight.grad.clone()
    model.zero_grad()
    # the same loss through the output's exact values: d/d fc = Σ_t (softmax_t − onehot) ⊗ rate features
    out = tm(x)
    gout = torch.autograd.grad(sum(F.cross_entropy(out[t], y) for t in range(3)), out)[0]
    rate_features = tm.compiled.step.spike(x)[3].mean((3, 4)).squeeze(0)   # r of the neuron
    torch.testing.assert_close(g_per_step, gout.sum(0).T @ rate_features)


def test_upstream_grad_scale_divides_by_T():
    model = Tiny().double().train()
    other = copy.deepcopy(model)
    x = tiny_input(T=4).double()
    _step(rc.transform(model), x)
    _step(rc.transform(other, grad_scale="upstream"), x)
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(q.grad * 4, p.grad)


def test_exception_mid_step_leaves_no_state():
    model = Tiny().train()
    tm = rc.transform(model)
    x = tiny_input()
    _step(tm, x)                                              # compile
    state = copy.deepcopy(model.state_dict())
    attrs = {name: sorted(vars(m)) for name, m in model.named_modules()}

    def boom(*args):
        raise RuntimeError("boom")

    rate = tm.compiled.step.rate
    rate.forward = boom
    with pytest.raises(RuntimeError, match="boom"):
        tm(x)
    del rate.forward
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {name: sorted(vars(m)) for name, m in model.named_modules()} == attrs
    assert torch.is_grad_enabled()
    _step(tm, x)                                              # and the next step works


def test_recompiles_per_input_shape_only():
    tm = rc.transform(Tiny())
    for B in (3, 3, 2, 3):
        _step(tm, tiny_input(T=2, B=B))
    assert len(tm.programs) == 2


def test_dtype_move_keeps_working():
    model = Tiny()
    tm = rc.transform(model)
    _step(tm, tiny_input())
    tm.double()
    assert model.conv.weight.dtype == torch.float64 and model.bn.running_mean.dtype == torch.float64
    out = _step(tm, tiny_input().double())
    assert out.dtype == torch.float64


def test_keyword_inputs():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.sn = LIF()

        def forward(self, x, scale=2.0):
            return self.sn(self.fc(x) * scale)

    model = KW()
    plain = copy.deepcopy(model)
    x = torch.rand(4, 2, 3) * 2
    out = rc.transform(model)(x=x, scale=3.0)
    assert torch.equal(out.detach(), plain(x, 3.0))           # the keyword reached the model
    assert not torch.equal(out.detach(), plain(x))
    out.sum().backward()


def test_bad_options():
    with pytest.raises(rc.RateBPError, match="method"):
        rc.transform(Tiny(), method="eprop")
    with pytest.raises(rc.RateBPError, match="grad_scale"):
        rc.transform(Tiny(), grad_scale="mean")
    with pytest.raises(rc.RateBPError, match="already transformed"):
        rc.transform(rc.transform(Tiny()))
    with pytest.raises(rc.RateBPError, match="time_chunk must be a positive int or None, got 0"):
        rc.transform(Tiny(), time_chunk=0)
    with pytest.raises(rc.RateBPError, match="input_layout must be one of"):
        rc.transform(Tiny(), input_layout="BT", example_inputs=[tiny_input()])


def test_example_inputs_compile_eagerly_and_show():
    tm = rc.transform(Tiny(), example_inputs=[tiny_input()])
    assert tm.compiled is not None
    text = rc.show(tm)
    for needle in ("=== captured graph, annotated", "lif", "neuron", "batchnorm", "=== spike graph",
                   "=== rate graph", "rate_neuron", "rate_batch_norm", "=== passes", "build_rate_graph"):
        assert needle in text, needle
    assert "def forward(self, x):" in rc.show(tm, "captured")
    with pytest.raises(rc.RateBPError, match="unknown stage"):
        rc.show(tm, "nope")


class TinyMerged(Tiny):
    """Tiny in the paper's layout: [T·B, ...] input, the neuron told T."""

    def __init__(self, T):
        super().__init__()
        self.sn = LIF(decay=0.5, v_threshold=0.5, time_steps=T)
        self.T = T

    def forward(self, x):
        y = self.sn(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3))).view(self.T, -1, 4)


def test_merged_layout_model_equals_its_stacked_twin():
    stacked = Tiny().double()
    merged = TinyMerged(3).double()
    merged.load_state_dict(stacked.state_dict())
    x = tiny_input(T=3).double()
    y = torch.randint(0, 4, (3,))
    out_s = _step(rc.transform(stacked), x, lambda out: F.cross_entropy(out.mean(0), y))
    out_m = _step(rc.transform(merged, input_layout="T*B"), x.flatten(0, 1),
                  lambda out: F.cross_entropy(out.mean(0), y))
    torch.testing.assert_close(out_m, out_s, rtol=0, atol=0)
    for (name, p), q in zip(stacked.named_parameters(), merged.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-14, msg=name)


def test_show_bptt_program():
    tm = rc.transform(Tiny(), method="bptt")
    _step(tm, tiny_input())
    text = rc.show(tm)
    assert text.startswith("Tiny: BPTT training step, 1 neurons")
    assert "=== the training step's graph" in text and "LIF fused[λ=0.5 Vth=0.5](unflatten)" in text
    assert "=== passes" in text and "fuse_lif" in text


class _SharedNeuron(nn.Module):
    """One neuron module called twice in a forward."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.sn = LIF(decay=0.5, v_threshold=0.4)
        nn.init.constant_(self.fc1.bias, 0.6)        # the second call fires too

    def forward(self, x):
        return self.fc2(self.sn(self.fc1(self.sn(x))))


@pytest.mark.parametrize("time_chunk", [None, 2])
def test_a_shared_neuron_has_statistics_per_call(time_chunk):
    model = _SharedNeuron().double()
    x = torch.rand(4, 2, 3, dtype=torch.float64) * 2
    plain = copy.deepcopy(model)
    tm = rc.transform(model, time_chunk=time_chunk)
    out = _step(tm, x)
    torch.testing.assert_close(out.detach(), plain(x), rtol=0, atol=0)
    assert [s.name for s in tm.compiled.statistics] == ["r_sn", "e_sn", "r_sn_1", "e_sn_1"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    torch._dynamo.reset()
    twin = copy.deepcopy(plain)
    _step(torch.compile(twin, backend="ratebp", options={"compiler": "eager", "time_chunk": time_chunk}), x)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_an_optional_argument_left_as_none():
    class Optional_(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.sn = LIF()

        def forward(self, x, bias=None, scale: float = 1.0):
            y = self.fc(x) * scale
            if bias is not None:
                y = y + bias
            return self.sn(y)

    model = Optional_()
    plain = copy.deepcopy(model)
    tm = rc.transform(model, input_layout=["TB", "static", "static"])
    x, bias = torch.rand(3, 2, 3) * 2, torch.rand(3)
    torch.testing.assert_close(_step(tm, x).detach(), plain(x))
    torch.testing.assert_close(_step(tm, x, bias=bias).detach(), plain(x, bias))
    torch.testing.assert_close(_step(tm, x, scale=3.0).detach(), plain(x, None, 3.0))
    assert len(tm.programs) == 3                      # one per value of the non-tensor arguments


def test_autocast_state_is_part_of_the_program_key():
    model = Tiny()
    tm = rc.transform(model)
    x = tiny_input()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _step(tm, x)
    full = _step(tm, x)
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32 and len(tm.programs) == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _step(tm, x).dtype == torch.bfloat16
    assert len(tm.programs) == 2


def test_an_empty_batch_is_a_clear_error():
    model = Tiny()
    snap = snapshot_model(model)
    with pytest.raises(rc.RateBPError, match=r"input 'x' is empty \(shape \(2, 0, 2, 5, 5\)\)"):
        rc.transform(model)(tiny_input(B=0))
    assert_model_unchanged(model, snap)


class _CastsItsInput(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)
        self.sn = LIF(v_threshold=0.3)

    def forward(self, x):
        return self.fc2(self.sn(self.fc1(x.to(self.dtype))))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.int64])
@pytest.mark.parametrize("cast", [torch.float32, torch.float64])
def test_a_spike_input_of_integers_cast_inside_the_model(dtype, cast):
    """The time average of 0/1 spikes given as integers is taken in the dtype the model casts them to."""
    model = _CastsItsInput(cast).to(cast)
    twin = copy.deepcopy(model)
    spikes = torch.rand(4, 3, 4) > 0.5
    _step(rc.transform(model), spikes.to(dtype))
    _step(rc.transform(twin), spikes.to(cast))               # the same spikes given as floats
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_a_non_finite_input_gives_the_last_layer_bptts_gradient():
    """The rate pass's neurons have the spike pass's rates as values, whatever their (here NaN) input: the
    layers after the first neuron get BPTT's gradients, finite; the first layer's are NaN in both."""
    model = _CastsItsInput(torch.float32)
    bptt = copy.deepcopy(model)
    x = torch.rand(4, 3, 4)
    x[1, 0, 2] = float("nan")
    _step(rc.transform(model), x)
    _step(rc.transform(bptt, method="bptt"), x)
    torch.testing.assert_close(model.fc2.weight.grad, bptt.fc2.weight.grad)
    torch.testing.assert_close(model.fc2.bias.grad, bptt.fc2.bias.grad)
    assert torch.isfinite(model.fc2.weight.grad).all()
    assert torch.isnan(model.fc1.weight.grad).any() and torch.isnan(bptt.fc1.weight.grad).any()


def test_input_gradients_are_the_rate_gradient_spread_over_the_steps():
    """x.requires_grad: the rate pass's gradient w.r.t. the time-averaged input reaches every step as 1/T of
    it (the same for each step); with T = 1 it is BPTT's."""
    model = Tiny().double()
    x = tiny_input(T=3).double().requires_grad_()
    _step(rc.transform(copy.deepcopy(model)), x)
    assert x.grad.abs().sum() > 0 and torch.equal(x.grad[0], x.grad[1]) and torch.equal(x.grad[1], x.grad[2])
    one = tiny_input(T=1).double().requires_grad_()
    twin = one.detach().clone().requires_grad_()
    _step(rc.transform(copy.deepcopy(model)), one)
    _step(copy.deepcopy(model), twin)
    torch.testing.assert_close(one.grad, twin.grad)


def test_the_step_follows_the_models_own_mode():
    """train()/eval() called on the user's model, not on the transformed module, decide the step too."""
    model = Tiny()
    tm = rc.transform(model)
    model.eval()
    x = tiny_input()
    torch.testing.assert_close(tm(x), model(x), rtol=0, atol=0)
    assert tm.compiled is None
    model.train()
    tm.eval()
    assert not model.training
    model.train()
    _step(tm, x)
    assert tm.compiled is not None

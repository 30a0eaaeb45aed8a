"""The functions compiled graphs call: BatchNorm of both passes (1d/2d/3d shapes), running-statistic
updates, time averaging and the gradient bridge."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ratebp_compile.graph_ops import (rate_batch_norm, route_gradient, spike_batch_norm, time_average,
                                      update_batch_norm_stats)
from ratebp_compile.memory import LiveTensorTracker
from tests.conftest import assert_close

SHAPES = {"1d": (12, 3), "1d-seq": (12, 3, 5), "2d": (12, 3, 4, 4), "3d": (12, 3, 2, 3, 3)}
BN = {"1d": nn.BatchNorm1d, "1d-seq": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}


def _dims(x):
    return [d for d in range(x.dim()) if d != 1]


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_spike_batch_norm_is_training_batchnorm_and_returns_its_statistics(kind):
    x = torch.randn(SHAPES[kind], dtype=torch.float64) * 2 + 1
    bn = BN[kind](3).double()
    nn.init.uniform_(bn.weight)
    nn.init.uniform_(bn.bias)
    y, mean, var = spike_batch_norm(x, bn.weight, bn.bias, bn.eps)
    assert_close(y, bn.train()(x).detach())
    assert_close(mean, x.mean(_dims(x)))
    assert_close(var, x.var(_dims(x), unbiased=False))


def _upstream_rate_bn(x, mean_s, var_s, w, b, eps):
    """The rate-BN rule as the paper's code writes it (mean and variance values substituted)."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    m = x.mean(_dims(x), keepdim=True)
    m = mean_s.view(shape) + (m - m.detach())
    v = ((x - m) ** 2).mean(_dims(x), keepdim=True)
    v = var_s.view(shape) + (v - v.detach())
    return (x - m) / torch.sqrt(v + eps) * w.view(shape) + b.view(shape)


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_rate_batch_norm_values_and_gradients(kind):
    x = (torch.randn(SHAPES[kind], dtype=torch.float64) + 0.5).requires_grad_()
    spike_x = torch.randn((4,) + SHAPES[kind], dtype=torch.float64).flatten(0, 1) * 3
    mean_s, var_s = spike_x.mean(_dims(spike_x)), spike_x.var(_dims(spike_x), unbiased=False)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, dtype=torch.float64, requires_grad=True)
    ours = rate_batch_norm(x, w, b, mean_s, var_s, 1e-5)
    ref = _upstream_rate_bn(x, mean_s, var_s, w, b, 1e-5)
    assert_close(ours, ref)
    # normalised with the spike-pass statistics
    shape = [1, -1] + [1] * (x.dim() - 2)
    assert_close(ours.detach(), ((x - mean_s.view(shape)) / torch.sqrt(var_s.view(shape) + 1e-5) * w.view(shape)
                                 + b.view(shape)).detach())
    g = torch.randn_like(ours)
    assert_close(torch.cat([t.flatten() for t in torch.autograd.grad(ours, (x, w, b), g)]),
                 torch.cat([t.flatten() for t in torch.autograd.grad(ref, (x, w, b), g)]))


def test_rate_batch_norm_values_and_what_it_keeps_for_backward():
    """The values are bitwise those of (x − m)/√(v + ε)·γ + β with the spike pass's statistics, and after the
    forward only two new tensors of x's size are alive: the output and x̂ (x − m is not kept)."""
    torch.manual_seed(0)
    x = (torch.randn(16, 3, 8, 8) + 0.5).requires_grad_()
    mean_s, var_s = torch.rand(3), torch.rand(3) + 0.5
    w, b = torch.rand(3, requires_grad=True), torch.rand(3, requires_grad=True)
    with LiveTensorTracker() as tracker:
        y = rate_batch_norm(x, w, b, mean_s, var_s, 1e-5)
        alive = tracker.current_bytes
    shape = (1, 3, 1, 1)
    plain = (x.detach() - mean_s.view(shape)) / torch.sqrt(var_s.view(shape) + 1e-5) * w.detach().view(shape) + \
        b.detach().view(shape)
    assert torch.equal(y.detach(), plain)
    assert 2 * x.nbytes <= alive < 2.5 * x.nbytes


def test_rate_batch_norm_computes_no_batch_statistics_and_twice_differentiable():
    """The rate input's mean and variance enter for their derivatives only: the forward runs no reduction
    over x (``x.var`` was 5% of an eager CPU step); the backward computes x̄ once; double backward (a
    gradient penalty) equals that through the mean and variance, as the paper's code writes them (the
    gradients are a surrogate's by design, so ``gradcheck`` against finite differences does not apply)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    mean_s, var_s = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    w, b = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    with Ops() as forward:
        y = rate_batch_norm(x, w, b, mean_s, var_s, 1e-5)
    assert not {"mean", "var", "var_mean", "sum"} & set(forward.seen), forward.seen
    with Ops() as backward:
        y.backward(torch.randn_like(y))
    assert backward.seen.count("mean") == 1
    ref = _upstream_rate_bn(x, mean_s, var_s, w, b, 1e-5)
    y = rate_batch_norm(x, w, b, mean_s, var_s, 1e-5)
    g = torch.randn_like(y)
    for ours, theirs in zip(torch.autograd.grad(torch.autograd.grad(y, x, g, create_graph=True)[0].square().sum(), x),
                            torch.autograd.grad(torch.autograd.grad(ref, x, g, create_graph=True)[0].square().sum(), x)):
        assert_close(ours, theirs)


def test_rate_batch_norm_equals_batch_norm_when_statistics_agree():
    x = torch.randn(10, 3, 4, dtype=torch.float64, requires_grad=True)
    mean, var = x.detach().mean((0, 2)), x.detach().var((0, 2), unbiased=False)
    g = torch.randn(10, 3, 4, dtype=torch.float64)
    (ours,) = torch.autograd.grad(rate_batch_norm(x, None, None, mean, var, 1e-5), x, g)
    (ref,) = torch.autograd.grad(F.batch_norm(x, None, None, training=True), x, g)
    assert_close(ours, ref)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_update_batch_norm_stats_matches_batchnorm(momentum):
    bn = nn.BatchNorm2d(3, momentum=momentum).double()
    ref = copy.deepcopy(bn)
    for step in range(3):
        x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * (step + 1) + step
        ref(x)
        update_batch_norm_stats(bn, x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False), x.numel() // 3)
    for name, buf in bn.named_buffers():
        assert_close(buf, getattr(ref, name), name)


def test_update_batch_norm_stats_functional_form_and_untracked():
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    x = torch.randn(8, 3, dtype=torch.float64)
    ref_m, ref_v = rm.clone(), rv.clone()
    F.batch_norm(x, ref_m, ref_v, training=True, momentum=0.2)
    update_batch_norm_stats((rm, rv), x.mean(0), x.var(0, unbiased=False), 8, 0.2)
    assert_close(rm, ref_m)
    assert_close(rv, ref_v)
    bn = nn.BatchNorm1d(3, track_running_stats=False)
    update_batch_norm_stats(bn, x.mean(0).float(), x.var(0).float(), 8)      # nothing to update
    assert bn.running_mean is None


def test_time_average():
    x = torch.arange(24.0).view(4, 3, 2)
    assert_close(time_average(x, 0, False, 4), x.mean(0, keepdim=True))
    assert_close(time_average(x.flatten(0, 1), 0, True, 4), x.mean(0))
    assert_close(time_average(x.permute(1, 0, 2), 1, False, 4), x.mean(0, keepdim=True).permute(1, 0, 2))


@pytest.mark.parametrize("axis,merged", [(None, False), (0, False), (1, False), (0, True)])
def test_route_gradient(axis, merged):
    T = 3
    spike = torch.randn(T * 2, 5) if merged else torch.randn(2, 5) if axis is None else \
        torch.randn(T, 2, 5) if axis == 0 else torch.randn(2, T, 5)
    rate_shape = (2, 5) if merged or axis is None else (1, 2, 5) if axis == 0 else (2, 1, 5)
    rate = torch.randn(rate_shape, requires_grad=True)
    out = route_gradient(spike, rate, axis, merged, T, scale=0.5)
    assert torch.equal(out, spike)
    g = torch.randn_like(out)
    out.backward(g)
    if axis is None:
        expected = g
    elif merged:
        expected = g.view(T, 2, 5).sum(0)
    else:
        expected = g.sum(axis, keepdim=True)
    assert_close(rate.grad, 0.5 * expected)
    assert route_gradient(spike, rate.detach()) is spike

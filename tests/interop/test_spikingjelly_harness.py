"""Self-check of the SpikingJelly interop harness (test-side only; does not import ratebp_compile)."""
from __future__ import annotations

import copy
import math
import sys

import pytest
import torch

from tests.interop.conftest import require_spikingjelly

require_spikingjelly()

from spikingjelly.activation_based import functional, layer, neuron, surrogate  # noqa: E402

from tests.interop import spikingjelly_harness as H  # noqa: E402

MODELS = {e.name: e for e in H.models()}
NAMES = sorted(MODELS)
RATE_NAMES = sorted(n for n, e in MODELS.items() if e.rate_reference)


def _flat(grads):
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


def _assert_clean(model, state):
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any("forward" in vars(m) for m in model.modules())
    for _, m in H.neuron_modules(model):
        assert isinstance(m.v, float), "neuron memories are reset on exit"


@pytest.mark.parametrize("name", NAMES)
def test_forward(name):
    e = MODELS[name]
    model, x = e.build(0), e.make_input(T=e.T, seed=0)
    state = copy.deepcopy(model.state_dict())
    out = H.peer_forward(model, x)
    B = x.shape[1] if e.time_major else x.shape[0]
    if e.output == "rate":
        assert out.shape == (B, e.num_classes)
    else:
        assert out.shape == (e.T, B, e.num_classes)
    assert torch.isfinite(out).all()
    if e.output == "spikes":
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        assert 0.0 < out.mean() < 1.0, "the output layer should fire at this scale"
    assert torch.equal(H.peer_forward(model, x), out), "reset between calls: the same output again"
    _assert_clean(model, state)


@pytest.mark.parametrize("name", NAMES)
def test_bptt_and_rate_grads(name):
    e = MODELS[name]
    model, x = e.build(0), e.make_input(T=e.T, seed=0)
    state = copy.deepcopy(model.state_dict())
    names = {n for n, _ in model.named_parameters()}
    gb, ob = H.peer_bptt_grads(model, x, e.loss)
    assert set(gb) == names
    assert all(gb[n].shape == p.shape for n, p in model.named_parameters())
    fb = _flat(gb)
    assert torch.isfinite(fb).all() and fb.abs().max() > 0
    assert torch.equal(ob, H.peer_forward(model, x))
    if e.rate_reference:
        gr, orate = H.peer_rate_grads(model, x, e.loss)
        assert set(gr) == names
        assert torch.equal(orate, ob), "the rate reference returns the spike pass's output"
        fr = _flat(gr)
        assert torch.isfinite(fr).all() and fr.abs().max() > 0
        # rate-based gradients approximate BPTT's (observed cosine 0.92 .. 1.00 on these models)
        assert torch.nn.functional.cosine_similarity(fb, fr, dim=0) > 0.5
    else:
        with pytest.raises(ValueError):
            H.peer_rate_grads(model, x, e.loss)
    _assert_clean(model, state)


@pytest.mark.parametrize("name", RATE_NAMES)
def test_rate_equals_bptt_at_T1(name):
    # At T = 1 the time average is the input itself and e is the one-step surrogate derivative
    # (Dropout: the same seed draws the same mask in both).
    e = MODELS[name]
    model, x = e.build(0), e.make_input(T=1, seed=0)
    gb, ob = H.peer_bptt_grads(model, x, e.loss)
    gr, orate = H.peer_rate_grads(model, x, e.loss)
    assert torch.equal(ob, orate)
    fb, fr = _flat(gb), _flat(gr)
    torch.testing.assert_close(fr, fb, rtol=1e-5, atol=1e-6 * max(1.0, fb.abs().max().item()))


def test_input_gradient():
    e = MODELS["mlp_lif"]
    model = e.build(0)
    x = e.make_input(T=e.T, seed=0).requires_grad_(True)
    gb, _ = H.peer_bptt_grads(model, x, e.loss)
    gr, _ = H.peer_rate_grads(model, x, e.loss)
    assert gb["__input__"].shape == gr["__input__"].shape == x.shape
    g = gr["__input__"]
    assert torch.equal(g[0], g[-1]), "the rate input is x.mean(0): each step gets 1/T of its gradient"
    assert x.grad is None


@pytest.mark.parametrize("v_reset,detach_reset", [(0.0, False), (-0.1, False), (-0.1, True), (None, False)])
def test_eligibility_matches_hand_derivation(v_reset, detach_reset):
    # LIFNode (tau = 2, decay_input): h_t = v + (x_t - (v - v_r)) / tau, s_t = [h_t >= 1], hard reset
    # v_t = s v_r + (1 - s) h_t (soft: h_t - s), v_0 = v_r (0 for soft); ATan(alpha = 2) surrogate.
    # kappa_t = dh_t/dc for a constant input c: 1/tau + (1 - 1/tau) * dv_{t-1}/dh_{t-1} * kappa_{t-1},
    # e = (1/T) sum_t psi_t kappa_t.
    tau, T = 2.0, 5
    net = torch.nn.Sequential(neuron.LIFNode(tau=tau, v_reset=v_reset, detach_reset=detach_reset,
                                             surrogate_function=surrogate.ATan(), step_mode="m"))
    x = torch.tensor([[1.9, 2.3, 0.7, 3.1, 1.2],
                      [2.6, 0.4, 2.2, 1.8, 4.0],
                      [0.1, 3.0, 2.5, 2.0, 1.1],
                      [2.2, 2.2, 1.9, 0.0, 2.9],
                      [1.5, 2.7, 2.0, 2.6, 0.3]], dtype=torch.float64).unsqueeze(1)   # [T, B=1, 5]
    got = H.peer_rate_eligibility(net, x)["0"]
    vr = 0.0 if v_reset is None else v_reset
    psi = lambda u: 1.0 / (1.0 + (math.pi * u) ** 2)                                # ATan, alpha = 2
    v = torch.full((1, 5), vr, dtype=torch.float64)
    kappa_prev = dvdh_prev = torch.zeros_like(v)
    r = e = torch.zeros_like(v)
    for t in range(T):
        h = v + (x[t] - (v - vr)) / tau
        s = (h >= 1.0).double()
        p = psi(h - 1.0)
        kappa = 1.0 / tau + (1.0 - 1.0 / tau) * dvdh_prev * kappa_prev
        r, e = r + s / T, e + p * kappa / T
        if v_reset is None:
            v, dvdh = h - s, (1.0 if detach_reset else 1.0 - p) * torch.ones_like(h)
        else:
            v = s * v_reset + (1 - s) * h
            dvdh = (1 - s) + (0.0 if detach_reset else (v_reset - h) * p)
        kappa_prev, dvdh_prev = kappa, dvdh
    torch.testing.assert_close(got["r"], r, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got["e"], e, rtol=1e-12, atol=1e-14)


def test_plif_parameter_eligibility():
    # sum over elements of e_w = d(sum_i r_i)/dw with w the module's scalar parameter
    e = MODELS["plif"]
    model, x = e.build(0), e.make_input(T=e.T, seed=0)
    elig = H.peer_rate_eligibility(model, x)
    assert set(elig["1"]) == {"r", "e", "e_w"}
    m = model[1]
    xs = None

    def grab(mod, args, out):
        nonlocal xs
        xs = args[0].detach()
    h = m.register_forward_hook(grab)
    H.peer_forward(model, x)
    h.remove()
    functional.reset_net(model)
    gw, = torch.autograd.grad(m(xs).mean(0).sum(), m.w)
    functional.reset_net(model)
    torch.testing.assert_close(elig["1"]["e_w"].sum(), gw, rtol=1e-5, atol=1e-7)


def test_zoo_import_leaves_no_torchvision():
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed")
    except ImportError:
        pass
    MODELS["zoo_sew_resnet18"].build(0)
    assert "torchvision" not in sys.modules


def test_torchvision_stub_fixture(torchvision_stub):
    from torchvision.models.utils import load_state_dict_from_url  # noqa: F401


# ---- facts about the peer that a conversion relies on ---------------------------------------------

def test_semantics_tie_rule_initial_state_and_reset():
    for step_mode in ("s", "m"):
        n = neuron.IFNode(step_mode=step_mode)
        x = torch.tensor([[1.0, 1.0 - 1e-6]])
        s = n(x.unsqueeze(0) if step_mode == "m" else x)
        assert s.flatten().tolist() == [1.0, 0.0], "Heaviside(0) = 1: fires at h >= v_threshold"
    n = neuron.LIFNode(v_reset=-0.1, step_mode="m")
    assert n.v == -0.1                                   # v starts at v_reset (0.0 for v_reset=None)
    n(torch.zeros(3, 1, 2))
    assert torch.allclose(n.v, torch.full((1, 2), -0.1))  # and leaks toward v_reset
    functional.reset_net(n)
    assert n.v == -0.1 and isinstance(n.v, float)


def test_semantics_surrogate_mapping():
    u = torch.linspace(-2, 2, 401, dtype=torch.float64, requires_grad=True)

    def grad(sg):
        g, = torch.autograd.grad(sg(u).sum(), u)
        return g
    alpha = 2.5
    torch.testing.assert_close(grad(surrogate.Sigmoid(alpha=alpha)),
                               alpha * torch.sigmoid(alpha * u) * (1 - torch.sigmoid(alpha * u)))
    torch.testing.assert_close(grad(surrogate.ATan(alpha=alpha)),
                               alpha / 2 / (1 + (math.pi / 2 * alpha * u) ** 2))
    w = 1 / alpha   # Rect(alpha) = rectangular of width w = 1/alpha: 1/w on |u| < w/2
    torch.testing.assert_close(grad(surrogate.Rect(alpha=alpha)), (u.abs() < w / 2).double() / w)
    # PiecewiseQuadratic(alpha) = triangle of half-width w = 1/alpha: max(0, 1 - |u|/w)/w
    torch.testing.assert_close(grad(surrogate.PiecewiseQuadratic(alpha=alpha)),
                               torch.clamp(1 - u.abs() / w, min=0) / w)
    for sg in (surrogate.Sigmoid(), surrogate.ATan(), surrogate.Rect(), surrogate.PiecewiseQuadratic()):
        assert torch.equal(sg(u.detach()), (u.detach() >= 0).double())


def test_semantics_dropout_mask_shared_over_time():
    d = layer.Dropout(0.5, step_mode="m")
    y = d(torch.ones(3, 4, 8))
    assert all(torch.equal(y[0], y[t]) for t in range(3))
    d = layer.Dropout(0.5, step_mode="s")
    ys = [d(torch.ones(4, 8)) for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys)
    functional.reset_net(d)
    assert d.mask is None

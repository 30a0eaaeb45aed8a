"""Self-checks of the snnTorch harness (independent of ratebp_compile). Skipped without snnTorch."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

snn = pytest.importorskip("snntorch")
from snntorch import surrogate  # noqa: E402

from tests.interop import snntorch_harness as H  # noqa: E402

ALL = H.models() + H.per_step_models()


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _state_ids(model):
    return [(id(m._buffers.get("mem")), id(m._buffers.get("syn")), m.__dict__.get("reset") is None)
            for _, m in H.neuron_modules(model)]


def test_catalogue_covers_the_brief():
    names = {m.name for m in ALL}
    for reset in ("subtract", "zero", "none"):
        for d in (0, 1):
            assert f"leaky_{reset}_delay{d}" in names
    for n in ("leaky_mlp_t5", "leaky_mlp_t5_spike_loss", "leaky_learn_beta", "leaky_learn_threshold",
              "leaky_per_channel_beta",
              "leaky_init_hidden_loop", "synaptic_mlp", "conv_net", "surrogate_sigmoid", "surrogate_fast_sigmoid",
              "surrogate_triangular", "surrogate_straight_through_estimator", "per_step_mlp", "per_step_conv"):
        assert n in names
    assert len(names) == len(ALL)


@pytest.mark.parametrize("pm", ALL, ids=[m.name for m in ALL])
def test_harness_on_model(pm):
    model = pm.driver()
    x = pm.make_input()
    loss_fn = pm.make_loss()
    before = _state_ids(model)

    out_f = H.peer_forward(model, x)
    g_bptt, out_b = H.peer_bptt_grads(model, x, loss_fn)
    g_rate, out_r = H.peer_rate_grads(model, x, loss_fn)

    # outputs: [T, B, K] spikes (plus the membrane), identical in all three
    T, B = x.shape[:2]
    for a, b, c in zip(_as_tuple(out_f), _as_tuple(out_b), _as_tuple(out_r)):
        assert a.shape[:2] == (T, B)
        assert torch.equal(a, b) and torch.equal(a, c)
    spikes = _as_tuple(out_f)[0]
    assert set(spikes.unique().tolist()) <= {0.0, spikes.max().item()}
    assert (len(_as_tuple(out_f)) == 2) == (pm.outputs == "spikes+mem")

    # gradients: same names and shapes, finite, not all zero; the model is left as found
    assert g_bptt.keys() == g_rate.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for k in g_bptt:
        assert g_bptt[k].shape == g_rate[k].shape, k
        assert torch.isfinite(g_bptt[k]).all() and torch.isfinite(g_rate[k]).all(), k
    assert sum(g.abs().sum() for g in g_rate.values()) > 0
    assert all(p.grad is None for p in model.parameters())
    assert _state_ids(model) == before

    # at T = 1 the rate-based gradients are BPTT's
    x1 = x[:1]
    g1_bptt, _ = H.peer_bptt_grads(model, x1, loss_fn)
    g1_rate, _ = H.peer_rate_grads(model, x1, loss_fn)
    for k in g1_bptt:
        torch.testing.assert_close(g1_rate[k], g1_bptt[k], rtol=1e-4, atol=1e-6, msg=k)


def test_rate_and_bptt_input_gradients():
    pm = H.model_by_name("leaky_subtract_delay1")
    model = pm.driver()
    x = pm.make_input().requires_grad_(True)
    g_b, _ = H.peer_bptt_grads(model, x, pm.make_loss())
    g_r, _ = H.peer_rate_grads(model, x, pm.make_loss())
    assert g_b["__input__"].shape == g_r["__input__"].shape == x.shape
    # rate-based: the same gradient, 1/T of the time-averaged input's, at every step
    assert torch.equal(g_r["__input__"][0], g_r["__input__"][-1])
    x1 = x[:1].detach().requires_grad_(True)
    g1_b, _ = H.peer_bptt_grads(model, x1, pm.make_loss())
    g1_r, _ = H.peer_rate_grads(model, x1, pm.make_loss())
    torch.testing.assert_close(g1_r["__input__"], g1_b["__input__"])


class _OneLayer(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.lif = snn.Leaky(**kw)

    def forward(self, x):
        mem = self.lif.init_leaky()
        out = []
        for t in range(x.shape[0]):
            spk, mem = self.lif(x[t], mem)
            out.append(spk)
        return torch.stack(out)


@pytest.mark.parametrize("reset", ["subtract", "zero", "none"])
def test_eligibility_matches_closed_form(reset):
    """Reverse mode over the replayed neuron = (1/T) sum_t psi_t kappa_t with the reset detached:
    kappa_t = beta * kappa_{t-1} + 1 (subtract, none), beta * (1 - r_t) * kappa_{t-1} + 1 (zero)."""
    beta, alpha = 0.8, 2.0
    model = _OneLayer(beta=beta, reset_mechanism=reset)
    T, B, K = 7, 3, 5
    x = torch.rand(T, B, K, generator=torch.Generator().manual_seed(0)) * 1.2
    _, _, sites = H.peer_rate_grads(model, x, lambda o: o.sum(), return_sites=True)
    site, = sites["lif"]

    mem = torch.zeros(B, K)
    kappa = torch.zeros(B, K)
    e = torch.zeros(B, K)
    r = torch.zeros(B, K)
    for t in range(T):
        reset_t = (mem > 1.0).float()
        if reset == "subtract":
            mem = beta * mem + x[t] - reset_t
            kappa = beta * kappa + 1
        elif reset == "zero":
            mem = beta * (1 - reset_t) * mem + x[t]
            kappa = beta * (1 - reset_t) * kappa + 1
        else:
            mem = beta * mem + x[t]
            kappa = beta * kappa + 1
        u = mem - 1.0
        psi = alpha / 2 / (1 + (math.pi / 2 * alpha * u) ** 2)     # snnTorch's ATan backward
        e += psi * kappa / T
        r += (u > 0).float() / T
    torch.testing.assert_close(site.r, r)
    torch.testing.assert_close(site.e, e)


def test_param_eligibility_broadcasts_scalar_parameters():
    model = _OneLayer(beta=0.7, learn_beta=True, learn_threshold=True)
    x = torch.rand(5, 2, 3, generator=torch.Generator().manual_seed(1)) * 1.5
    g, _, sites = H.peer_rate_grads(model, x, lambda o: o.sum(), return_sites=True)
    site, = sites["lif"]
    assert site.e_params["beta"].shape == site.e_params["threshold"].shape == (2, 3)
    # loss = sum over T steps of the outputs: dL/dr = T per element
    torch.testing.assert_close(g["lif.beta"], 5 * site.e_params["beta"].sum())
    torch.testing.assert_close(g["lif.threshold"], 5 * site.e_params["threshold"].sum())


def test_membrane_output_modes():
    pm = H.model_by_name("leaky_mlp_t5")
    model = pm.driver()
    x = pm.make_input()
    loss_fn = lambda out: (out[1] ** 2).mean()           # noqa: E731 - a loss on the membrane only
    g_none, _ = H.peer_rate_grads(model, x, loss_fn, mem_grad="none")
    g_elig, out = H.peer_rate_grads(model, x, loss_fn)
    assert all(g.abs().sum() == 0 for g in g_none.values())
    assert g_elig["fc2.weight"].abs().sum() > 0
    assert torch.equal(out[1], H.peer_forward(model, x)[1])


def test_per_step_net_driven_from_an_outer_loop():
    pm = H.model_by_name("per_step_mlp")
    net = pm.build()
    x = pm.make_input()
    spk, mem = H.run_per_step(net, x)                     # the tutorials' forward_pass
    assert net[3].mem.shape == mem.shape[1:]              # the state stays in the module
    spk2, mem2 = H.peer_forward(net, x, per_step=True)
    assert torch.equal(spk, spk2) and torch.equal(mem, mem2)
    g, _, sites = H.peer_rate_grads(net, x, pm.make_loss(), per_step=True, return_sites=True)
    assert set(g) == {n for n, _ in net.named_parameters()}
    assert set(sites) == {"1", "3"}


def test_recurrent_and_inhibition_are_refused():
    class R(nn.Module):
        def __init__(self):
            super().__init__()
            self.lif = snn.RLeaky(beta=0.9, linear_features=3)

        def forward(self, x):
            return torch.stack([self.lif(x[t])[0] for t in range(x.shape[0])])

    with pytest.raises(NotImplementedError):
        H.peer_rate_grads(R(), torch.rand(3, 2, 3), lambda o: o.sum())
    with pytest.warns(UserWarning, match="Inhibition"):
        inhibited = _OneLayer(beta=0.9, inhibition=True)
    with pytest.raises(NotImplementedError):
        H.peer_rate_grads(inhibited, torch.rand(3, 2, 3), lambda o: o.sum())


def test_peer_facts_the_harness_relies_on():
    # spikes: strictly above threshold; float32 whatever the membrane's dtype
    lif = snn.Leaky(beta=0.5)
    spk, _ = lif(torch.tensor([1.0, 1.0 + 1e-6, 0.5]), torch.zeros(3))
    assert spk.tolist() == [0.0, 1.0, 0.0]
    assert surrogate.atan()(torch.zeros(2, dtype=torch.float64)).dtype == torch.float32
    # the sigmoid surrogate's backward overflows in float32 below threshold - 3.42
    u = torch.tensor([-4.0, -1.0], requires_grad=True)
    g, = torch.autograd.grad(surrogate.sigmoid()(u).sum(), u)
    assert math.isnan(g[0].item()) and math.isfinite(g[1].item())

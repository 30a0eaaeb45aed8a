"""Self-check of the Norse interop harness (test-side only; does not import ratebp_compile)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("norse.torch")

from tests.interop import norse_harness as H  # noqa: E402

MODELS = H.models()
NAMES = sorted(MODELS)


def _flat(grads):
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_and_kind(name):
    e = MODELS[name]
    model, x = e.build(0), e.make_input(T=e.T, seed=0)
    full = H.peer_forward(model, x)
    assert isinstance(full, tuple) == e.returns_tuple
    out = H.primary_output(full)
    assert out.shape[:2] == (e.T, x.shape[1])
    assert torch.isfinite(out).all()
    if e.output == "spikes":
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        assert 0.0 < out.mean() < 1.0, "output layer should fire at this scale"


@pytest.mark.parametrize("name", NAMES)
def test_bptt_and_rate_grads(name):
    e = MODELS[name]
    model, x = e.build(0), e.make_input(T=e.T, seed=0)
    gb, ob = H.peer_bptt_grads(model, x, e.loss)
    gr, orate = H.peer_rate_grads(model, x, e.loss)
    names = {n for n, _ in model.named_parameters()}
    assert set(gb) == set(gr) == names
    # output contract: the rate reference's output is the spike pass's output, bit for bit
    assert torch.equal(orate, ob)
    assert torch.equal(orate, H.primary_output(H.peer_forward(model, x)))
    fb, fr = _flat(gb), _flat(gr)
    assert torch.isfinite(fb).all() and torch.isfinite(fr).all()
    assert fb.abs().max() > 0 and fr.abs().max() > 0
    # rate-based gradients approximate BPTT's (observed cosine 0.84 .. 0.99 on these models)
    assert torch.nn.functional.cosine_similarity(fb, fr, dim=0) > 0.5
    # the harness leaves the model as it found it
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", NAMES)
def test_rate_equals_bptt_at_T1(name):
    # At T = 1 the time average is the input itself and e is the one-step surrogate derivative.
    e = MODELS[name]
    model, x = e.build(0), e.make_input(T=1, seed=0)
    gb, _ = H.peer_bptt_grads(model, x, e.loss)
    gr, _ = H.peer_rate_grads(model, x, e.loss)
    fb, fr = _flat(gb), _flat(gr)
    torch.testing.assert_close(fr, fb, rtol=1e-5, atol=1e-6 * max(1.0, fb.abs().max().item()))


def test_input_gradient_spread_over_time():
    e = MODELS["lif_cell_loop"]
    model = e.build(0)
    x1 = e.make_input(T=1, seed=0).requires_grad_(True)
    gb, _ = H.peer_bptt_grads(model, x1, e.loss)
    gr, _ = H.peer_rate_grads(model, x1, e.loss)
    torch.testing.assert_close(gr["__input__"], gb["__input__"], rtol=1e-5, atol=1e-8)
    xT = e.make_input(T=e.T, seed=0).requires_grad_(True)
    gr, _ = H.peer_rate_grads(model, xT, e.loss)
    g = gr["__input__"]
    assert g.shape == xT.shape and torch.equal(g[0], g[-1])   # 1/T of the rate gradient at every step


def test_eligibility_matches_hand_derivation():
    # LIFBoxCell (defaults: a = dt * tau_mem_inv = 0.1, v_th = 1, v_reset = 0, SuperSpike 1/(1+|u|)^2),
    # two steps, no spike: v1 = a x0, v2 = (1-a) v1' + a x1 with v1' = (1 - z1) v1 + z1 v_reset.
    # The reset is NOT detached: dv1'/dv1 = (1 - z1) + (v_reset - v1) * s(v1 - v_th).
    import norse.torch as nt

    cell = nt.LIFBoxCell()
    x = torch.tensor([[3.0, 5.0]])  # [B=1, 2 neurons]
    seq = [x, 0.5 * x]
    calls, s = [], None
    for xt in seq:
        z, s_new = cell(xt, s)
        calls.append(H._Call(xt, H._detach_tree(s), z.detach()))
        s = s_new
    r, e = H._cell_rate_elig(cell, "cell", calls, "cell")
    a, sg = 0.1, lambda u: 1.0 / (1.0 + u.abs()) ** 2
    v1 = a * seq[0]
    v2 = (1 - a) * v1 + a * seq[1]
    assert torch.all(v1 < 1) and torch.all(v2 < 1)
    dv1r = 1.0 + (0.0 - v1) * sg(v1 - 1)
    expect = 0.5 * (sg(v1 - 1) * a + sg(v2 - 1) * (1 - a) * dv1r * a + sg(v2 - 1) * a)
    torch.testing.assert_close(e, expect, rtol=1e-6, atol=1e-7)
    assert torch.equal(r, torch.zeros_like(r))


def test_recurrent_refused():
    import norse.torch as nt

    class Rec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rec = nt.LIFRecurrent(4, 3)

        def forward(self, x):
            return self.rec(x)[0]

    with pytest.raises(NotImplementedError):
        H.peer_rate_grads(Rec(), torch.rand(3, 2, 4), lambda o: o.sum())

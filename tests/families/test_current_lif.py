"""The current-based LIF family (Norse's LIFCell/LIF), without Norse: its step is the documented
equations; its forward-mode spike pass gives r = mean spikes and e = autograd's d(mean spikes)/dc for
an input held constant in time, for every surrogate, over chunks of time as at once; Norse's four
surrogates are the formulas they claim. (Against Norse itself: tests/interop/test_norse_adapter.py.)"""
import math

import pytest
import torch

from ratebp_compile.families import CurrentLIFDynamics, Family, LIFDynamics
from ratebp_compile.nn import spike
from ratebp_compile.nn.spec import NeuronSpec
from ratebp_compile.nn.surrogate import Circ, HeaviErfc, SuperSpike, Surrogate, Tanh, Tent
from tests.conftest import assert_close
from tests.families.oracle import assert_closed_form_is_forward_mode_ad  # noqa: E402

SURROGATES = [SuperSpike(1.0, 1.0), Tent(0.5), Tent(100.0), Tanh(2.0), Circ(0.3), HeaviErfc(1.5)]
#: (constants, input offset, input scale): defaults, other voltages, other time constants and dt.
SETTINGS = {
    "defaults": (dict(), 1.0, 1.0),
    "voltages": (dict(v_leak=0.2, v_th=0.9, v_reset=-0.1), 1.0, 1.0),
    "taus_dt": (dict(tau_syn_inv=150.0, tau_mem_inv=50.0, dt=2e-3), 1.0, 1.0),
    "rest_below": (dict(v_leak=-0.5, v_th=0.5, v_reset=-0.5, tau_syn_inv=1 / 7e-3, tau_mem_inv=1 / 0.013,
                        dt=3e-4), 3.0, 3.0),
}
CASES = [(name, sg) for name in SETTINGS for sg in SURROGATES[:1]] + [("voltages", sg) for sg in SURROGATES[1:]]


def _ids(case):
    name, sg = case
    return f"{name}-{sg.name}{sg.width:g}"


def _dyn(name, surrogate):
    constants, _, _ = SETTINGS[name]
    return CurrentLIFDynamics(surrogate=surrogate, **constants)


def _input(name, shape, seed=0):
    _, offset, scale = SETTINGS[name]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset


def _reference(dyn, x_seq):
    """The equations of the module docstring, written as the filter form j_t = (1 − b)·j_{t−1} + x_t."""
    a, b = dyn.dt * dyn.tau_mem_inv, dyn.dt * dyn.tau_syn_inv
    v = torch.full_like(x_seq[0], dyn.v_leak)
    j = torch.zeros_like(x_seq[0])
    spikes, vs = [], []
    for x in x_seq:
        j = (1 - b) * j + x
        v = v + a * (dyn.v_leak - v + j)
        z = (v > dyn.v_th).to(v.dtype)
        v = torch.where(z.bool(), torch.full_like(v, dyn.v_reset), v)
        spikes.append(z)
        vs.append(v)
    return torch.stack(spikes), torch.stack(vs)


def test_defaults_are_norses():
    dyn = CurrentLIFDynamics()
    assert (dyn.tau_syn_inv, dyn.tau_mem_inv, dyn.v_leak, dyn.v_th, dyn.v_reset, dyn.dt) == \
        (200.0, 100.0, 0.0, 1.0, 0.0, 0.001)
    assert dyn.surrogate == SuperSpike(1.0, 1.0)
    assert isinstance(dyn, Family) and dyn.name == "current_lif" and dyn.binary
    assert dyn == CurrentLIFDynamics() and hash(dyn) == hash(CurrentLIFDynamics())
    assert dyn != CurrentLIFDynamics(v_th=0.9)


def test_describe_and_label():
    dyn = CurrentLIFDynamics(v_leak=0.2, v_th=0.9, v_reset=-0.1, surrogate=Tanh(2.0))
    assert dyn.describe() == ("CurrentLIF(τ_syn⁻¹=200, τ_mem⁻¹=100, dt=0.001, V_th=0.9 (fires above), hard reset "
                              "to -0.1, rests at 0.2, reset not detached, tanh(2))")
    assert dyn.label() == "a=0.1 b=0.2 Vth=0.9"
    spec = NeuronSpec(dyn)
    assert spec.__name__ == "current_lif" and spec.label() == "CURRENT_LIF[a=0.1 b=0.2 Vth=0.9]"


def test_rejects_what_is_not_a_constant():
    with pytest.raises(TypeError, match="surrogate"):
        CurrentLIFDynamics(surrogate="super")
    with pytest.raises(TypeError, match="v_th must be a float"):
        CurrentLIFDynamics(v_th=torch.tensor(1.0))


@pytest.mark.parametrize("name", list(SETTINGS))
def test_step_is_the_documented_equations(name):
    dyn = _dyn(name, SuperSpike())
    x = _input(name, (12, 3, 64))
    spikes, vs = _reference(dyn, x)
    assert 0.02 < spikes.mean() < 0.6
    assert torch.equal(dyn.multistep(x, ()), spikes)
    state, v = dyn.init_state(x[0]), []
    for t in range(x.shape[0]):
        _, state = dyn.step(x[t], state, ())
        v.append(state[0])
    assert_close(torch.stack(v), vs)


def test_fires_strictly_above_the_threshold_and_resets_to_v_reset():
    # dt·τ_mem⁻¹ = 0.5, dt·τ_syn⁻¹ = 1 (the current is x_t alone): ṽ_1 = 0.5·x_1, exactly 1.0 = V_th at x_1 = 2
    dyn = CurrentLIFDynamics(tau_syn_inv=1.0, tau_mem_inv=0.5, dt=1.0, v_reset=-0.25)
    x = torch.tensor([[2.0, 2.0 + 1e-12, 1.0]], dtype=torch.float64)
    z, (v, i) = dyn.step(x[0], dyn.init_state(x[0]), ())
    assert z.tolist() == [0.0, 1.0, 0.0]
    assert v.tolist() == [1.0, -0.25, 0.5] and i.tolist() == [0.0, 0.0, 0.0]
    # the same membrane in the LIF family's non-strict rule fires
    at = LIFDynamics(decay=0.5, decay_input=True, v_reset=0.0, strict=False).multistep(x, ())
    assert at[0, 0] == 1.0


def test_reset_is_not_detached():
    dyn = CurrentLIFDynamics(tau_syn_inv=1.0, tau_mem_inv=0.5, dt=1.0, v_reset=-0.25, surrogate=Tent(1.0))
    x = torch.tensor([2.5, 2.5], dtype=torch.float64, requires_grad=True)
    z1, state = dyn.step(x[0:1], dyn.init_state(x[0:1]), ())
    z2, _ = dyn.step(x[1:2], state, ())
    (g,) = torch.autograd.grad(z2.sum(), x)
    # ṽ_1 = 1.25 fires; v_1 = (1 − z_1)·ṽ_1 + z_1·v_reset; ṽ_2 = v_1 + 0.5·(−v_1 + x_2) = 0.5·v_1 + 0.5·x_2
    # dz_2/dx_1 = ψ(ṽ_2 − 1)·0.5·(∂v_1/∂x_1) with ∂v_1/∂x_1 = (1 − z_1)·0.5 + (v_reset − ṽ_1)·ψ(ṽ_1 − 1)·0.5
    psi = lambda u: max(0.0, 1 - abs(u))  # noqa: E731
    v1 = -0.25
    u2 = 0.5 * v1 + 0.5 * 2.5 - 1.0
    expected_dx1 = psi(u2) * 0.5 * ((-0.25 - 1.25) * psi(0.25) * 0.5)
    assert z1.item() == 1.0
    assert math.isclose(g[0].item(), expected_dx1, rel_tol=1e-12)
    assert math.isclose(g[1].item(), psi(u2) * 0.5, rel_tol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.parametrize("T", [1, 4, 12])
def test_eligibility_equals_autograd_constant_input(case, T):
    name, surrogate = case
    dyn = _dyn(name, surrogate)
    c = _input(name, (3, 97), seed=T).requires_grad_()
    spikes_ref = dyn.multistep(c.expand(T, *c.shape), ())
    (e_ref,) = torch.autograd.grad(spikes_ref.mean(0).sum(), c)
    spikes, r, e = NeuronSpec(dyn).spike_pass(c.detach().expand(T, *c.shape))
    assert r.shape == e.shape == (1, *c.shape)         # the rate pass's [1, B, ...]
    assert torch.equal(spikes, spikes_ref.detach())
    assert_close(r[0], spikes_ref.detach().mean(0))
    assert_close(e[0], e_ref)
    if T == 12:
        assert spikes.any() and e.abs().sum() > 0


def test_spike_pass_on_varying_input_and_merged_time():
    dyn = _dyn("voltages", Tanh(2.0))
    x = _input("voltages", (6, 4, 33))
    spikes, r, e = NeuronSpec(dyn).spike_pass(x)
    ref = dyn.multistep(x, ())
    assert torch.equal(spikes, ref)
    assert_close(r[0], ref.mean(0))
    merged = NeuronSpec(dyn, time_steps=6)
    spikes_m, r_m, e_m = merged.spike_pass(x.reshape(24, 33))
    assert torch.equal(spikes_m, ref.reshape(24, 33))
    assert_close(r_m, r[0])
    assert_close(e_m, e[0])
    assert torch.equal(merged(x.reshape(24, 33)), ref.reshape(24, 33))


def test_scan_over_chunks_equals_the_whole_spike_pass():
    dyn = _dyn("defaults", Circ(0.3))
    x = _input("defaults", (9, 2, 41))
    spikes, r, e = dyn.spike_pass(x, ())
    state, parts = None, []
    for chunk in x.split([2, 4, 3]):
        s, state = dyn.scan(chunk, state, (), spike_dtype=torch.uint8)
        parts.append(s)
    assert state.steps == 9 and torch.cat(parts).dtype == torch.uint8
    assert torch.equal(torch.cat(parts).double(), spikes)
    for ours, whole in zip(dyn.finish(state, (), x.dtype), (r, e)):
        assert_close(ours, whole)


def test_float32():
    dyn = _dyn("defaults", SuperSpike())
    x = _input("defaults", (8, 2, 50)).float()
    spikes, r, e = NeuronSpec(dyn).spike_pass(x)
    assert spikes.dtype == r.dtype == e.dtype == torch.float32
    assert torch.equal(spikes, dyn.multistep(x, ()))


# -- Norse's surrogates -----------------------------------------------------------------------------------
X = torch.arange(-300, 301, dtype=torch.float64) / 100     # X[300] is exactly 0


@pytest.mark.parametrize("alpha", [0.3, 1.0, 2.5])
def test_surrogate_formulas(alpha):
    assert_close(Tanh(alpha).grad(X), 1 - torch.tanh(alpha * X) ** 2)
    assert_close(Tent(alpha).grad(X), alpha * torch.clamp(1 - X.abs(), min=0))
    assert_close(Circ(alpha).grad(X), alpha ** 3 / (alpha ** 2 + X ** 2) ** 1.5)
    # (Norse divides by √π computed in float32: 3e-8 relative)
    torch.testing.assert_close(HeaviErfc(alpha).grad(X), 2 * torch.exp(-(alpha * X) ** 2) / math.sqrt(math.pi),
                               rtol=4e-8, atol=0)
    for sg in (Tanh(alpha), Tent(alpha), Circ(alpha), HeaviErfc(alpha)):
        assert isinstance(sg, Surrogate) and sg.width == alpha and sg == type(sg)(alpha)
    assert [s.name for s in (Tanh(), Tent(), Circ(), HeaviErfc())] == ["tanh", "tent", "circ", "heavierfc"]
    # peaks: 1, α, 1, 2/√π
    assert Tanh(alpha).grad(X)[300] == 1 and Circ(alpha).grad(X)[300] == 1
    assert Tent(alpha).grad(X)[300] == alpha
    assert math.isclose(HeaviErfc(alpha).grad(X)[300].item(), 2 / math.sqrt(math.pi), rel_tol=4e-8)


@pytest.mark.parametrize("surrogate", SURROGATES, ids=lambda s: f"{s.name}{s.width:g}")
def test_spike_carries_the_surrogate_in_both_modes(surrogate):
    import torch.autograd.forward_ad as fwAD

    x = X.clone().requires_grad_()
    (g,) = torch.autograd.grad(spike(x, surrogate, strict=True).sum(), x)
    assert torch.equal(g, surrogate.grad(X))
    with fwAD.dual_level():
        _, t = fwAD.unpack_dual(spike(fwAD.make_dual(X, torch.ones_like(X)), surrogate, strict=True))
    assert torch.equal(t, surrogate.grad(X))


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_closed_form_equals_forward_mode_ad_through_the_step(case):
    """The closed-form spike pass equals the generic engine (forward-mode AD through ``step``), chunk by chunk,
    on varying input."""
    name, surrogate = case
    assert_closed_form_is_forward_mode_ad(_dyn(name, surrogate), (), _input(name, (10, 3, 53), seed=5), [3, 7])

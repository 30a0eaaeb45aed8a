"""The LIF family: spikes and r equal the BPTT forward; e equals autograd's d(mean spikes)/dc for a
constant input, and forward-mode AD through the family's step, for every reset mode x detach x
surrogate x input decay x resting potential x tie rule x delayed reset."""
import itertools

import pytest
import torch

from ratebp_compile.families import Family, LIFDynamics, ModuleDynamics
from ratebp_compile.nn import ATan, Neuron, ParametricLIF, Rectangular, Sigmoid, Triangle, spike
from ratebp_compile.nn.surrogate import SuperSpike
from tests.conftest import assert_close
from tests.families.oracle import assert_closed_form_is_forward_mode_ad

SURROGATES = [Sigmoid(4.0), ATan(2.0), Rectangular(1.0), Triangle(1.0)]
RESETS = [None, 0.0, -0.25]          # soft, hard to 0, hard to -0.25
CASES = list(itertools.product(RESETS, [True, False], SURROGATES, [False, True]))


def _ids(case):
    reset, detach, sg, decay_input = case
    return f"{'soft' if reset is None else f'hard{reset}'}-{'det' if detach else 'nodet'}-{sg.name}-" \
           f"{'din' if decay_input else 'nodin'}"


def _dyn(decay, **kw):
    return LIFDynamics(decay=decay, **kw)


def _spike_pass(x, decay, **kw):
    return _dyn(decay, **kw).spike_pass(x, ())


def _multistep(x, decay, **kw):
    return _dyn(decay, **kw).multistep(x, ())


def _autograd_eligibility(c, T, decay, **kw):
    c = c.clone().requires_grad_()
    spikes = _multistep(c.expand(T, *c.shape), decay, **kw)
    (g,) = torch.autograd.grad(spikes.mean(0).sum(), c)
    return spikes.detach(), g


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.parametrize("T", [1, 2, 7])
def test_eligibility_equals_autograd_constant_input(case, T):
    v_reset, detach, surrogate, decay_input = case
    kw = dict(decay_input=decay_input, v_threshold=0.9, v_reset=v_reset, detach_reset=detach, surrogate=surrogate)
    c = torch.randn(3, 331, dtype=torch.float64) * 0.7 + 0.6
    spikes_ref, e_ref = _autograd_eligibility(c, T, 0.35, **kw)
    spikes, r, e = _spike_pass(c.expand(T, *c.shape), 0.35, **kw)
    assert torch.equal(spikes, spikes_ref)
    assert_close(r, spikes_ref.mean(0))
    assert_close(e, e_ref)


@pytest.mark.parametrize("case", CASES[::3], ids=[_ids(c) for c in CASES[::3]])
def test_spike_pass_equals_bptt_forward_on_varying_input(case):
    v_reset, detach, surrogate, decay_input = case
    kw = dict(decay_input=decay_input, v_threshold=1.0, v_reset=v_reset, detach_reset=detach, surrogate=surrogate)
    x = torch.randn(6, 4, 77, dtype=torch.float64) + 0.4
    spikes, r, e = _spike_pass(x, 0.6, **kw)
    ref = _multistep(x, 0.6, **kw)
    assert torch.equal(spikes, ref)
    assert_close(r, ref.mean(0))
    assert e.shape == r.shape == x.shape[1:]


@pytest.mark.parametrize("case", CASES[::4], ids=[_ids(c) for c in CASES[::4]])
def test_scan_over_chunks_equals_the_whole_spike_pass(case):
    v_reset, detach, surrogate, decay_input = case
    kw = dict(decay_input=decay_input, v_threshold=1.0, v_reset=v_reset, detach_reset=detach, surrogate=surrogate)
    x = torch.randn(7, 3, 41, dtype=torch.float64) + 0.5
    dyn = LIFDynamics(decay=None, **kw)
    w = torch.tensor(0.3, dtype=torch.float64)
    spikes, r, e, e_w = dyn.spike_pass(x, (w,))
    state, parts = None, []
    for chunk in x.split([2, 4, 1]):
        s, state = dyn.scan(chunk, state, (w,), spike_dtype=torch.uint8)
        parts.append(s)
    assert state.steps == 7 and torch.cat(parts).dtype == torch.uint8
    assert torch.equal(torch.cat(parts).double(), spikes)
    for ours, theirs in zip(dyn.finish(state, (w,), x.dtype), (r, e, e_w)):
        assert_close(ours, theirs)


def test_generic_scan_over_chunks_equals_the_whole_pass():
    dyn = LIFDynamics(decay=None, decay_input=True, v_reset=0.0, detach_reset=False)
    w = torch.tensor(-0.7, dtype=torch.float64)
    x = torch.randn(6, 3, 40, dtype=torch.float64) + 0.5
    spikes, carry = Family.scan(dyn, x, None, (w,))
    whole = (spikes,) + Family.finish(dyn, carry, (w,), x.dtype)
    scan, parts = None, []
    for chunk in x.split([4, 2]):
        s, scan = Family.scan(dyn, chunk, scan, (w,))
        parts.append(s)
    assert torch.equal(torch.cat(parts), whole[0])
    for ours, theirs in zip(Family.finish(dyn, scan, (w,), x.dtype), whole[1:]):
        assert_close(ours, theirs)


def test_half_precision_inputs_accumulate_in_float32():
    x = (torch.randn(8, 1000) + 0.5)
    kw = dict(decay_input=False, v_threshold=1.0, v_reset=None, detach_reset=True, surrogate=Sigmoid(4.0))
    s16, r16, e16 = _spike_pass(x.half(), 0.5, **kw)
    s32, r32, e32 = _spike_pass(x.half().float(), 0.5, **kw)
    assert s16.dtype == torch.float16 and r16.dtype == torch.float16
    assert torch.equal(s16.float(), s32)
    torch.testing.assert_close(e16.float(), e32, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("decay_input", [False, True])
@pytest.mark.parametrize("v_reset,detach", [(None, True), (None, False), (0.0, True), (0.0, False)])
def test_decay_eligibility_equals_autograd(decay_input, v_reset, detach):
    """e_w (ParametricLIF, λ = 1 − sigmoid(w)) is the derivative of each element's r w.r.t. w."""
    dyn = LIFDynamics(decay=None, decay_input=decay_input, v_threshold=1.0, v_reset=v_reset, detach_reset=detach,
                      surrogate=ATan(2.0))
    c = torch.randn(500, dtype=torch.float64) + 0.8
    w = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    spikes = dyn.multistep(c.expand(5, 500), (w,))
    grads = torch.autograd.grad(spikes.mean(0), w, torch.eye(500, dtype=torch.float64), is_grads_batched=True)[0]
    _, _, _, e_w = dyn.spike_pass(c.expand(5, 500), (w.detach(),))
    assert_close(e_w, grads)


class _MyLIF(Neuron):
    """A LIF written as a user would: the generic forward-mode path must give the closed form's e."""

    def __init__(self, decay, v_reset, detach, surrogate):
        super().__init__()
        self.decay, self.v_reset, self.detach, self.surrogate = decay, v_reset, detach, surrogate

    def step(self, x, state):
        (v,) = state
        h = self.decay * v + x
        s = spike(h - 1.0, self.surrogate)
        sr = s.detach() if self.detach else s
        v = h - sr if self.v_reset is None else (1 - sr) * h + sr * self.v_reset
        return s, (v,)


@pytest.mark.parametrize("v_reset,detach", [(None, True), (None, False), (0.0, True), (0.0, False)])
def test_generic_spike_pass_equals_closed_form(v_reset, detach):
    x = torch.randn(5, 2, 61, dtype=torch.float64) + 0.5
    n = _MyLIF(0.3, v_reset, detach, Triangle(0.8))
    spikes, r, e = ModuleDynamics(n).spike_pass(x, ())
    ref = _spike_pass(x, 0.3, decay_input=False, v_threshold=1.0, v_reset=v_reset, detach_reset=detach,
                      surrogate=Triangle(0.8))
    assert torch.equal(spikes, ref[0])
    assert_close(r, ref[1])
    assert_close(e, ref[2])


def test_generic_parameter_eligibility_equals_plif_closed_form():
    n = ParametricLIF(init_tau=3.0, v_reset=0.0, detach_reset=False).double()
    x = torch.randn(6, 3, 40, dtype=torch.float64) + 0.5
    spikes, r, e, e_w = n.spec().spike_pass(x, n.w)
    g_spikes, g_r, g_e, g_e_w = ModuleDynamics(n, ("w",)).spike_pass(x, (n.w,))
    assert torch.equal(spikes, g_spikes)
    assert_close(e.squeeze(0), g_e)
    assert_close(e_w.squeeze(0), g_e_w)


# -- resting potential and tie rule (SpikingJelly rests at v_reset; snnTorch and Norse fire above) --
SETTINGS = [c + (False,) for c in itertools.product([None, 0.0, -0.3], [True, False], [False, True], [0.0, -0.3, 0.2],
                                                    [False, True], [0.35, None])]
# the delayed reset (snnTorch's Leaky), always detached
SETTINGS += list(itertools.product([None, 0.0, -0.3], [True], [False, True], [0.0, -0.3], [False, True], [0.35, None],
                                   [True]))


def _setting_id(case):
    reset, detach, decay_input, rest, strict, decay, delayed = case
    return f"{'soft' if reset is None else f'hard{reset}'}-{'det' if detach else 'nodet'}-" \
           f"{'din' if decay_input else 'nodin'}-rest{rest}-{'gt' if strict else 'ge'}-" \
           f"{'plif' if decay is None else decay}" + ("-delayed" if delayed else "")


@pytest.mark.parametrize("surrogate", [Sigmoid(3.0), SuperSpike(1.5, 2.0)], ids=["kernel-sg", "other-sg"])
@pytest.mark.parametrize("case", SETTINGS, ids=[_setting_id(c) for c in SETTINGS])
def test_closed_form_equals_forward_mode_ad_through_the_step(case, surrogate):
    """For every setting the closed-form scan equals the generic engine (forward-mode AD through
    ``step``), chunked, with the parameter's eligibility — with a surrogate the kernels know and one
    they do not."""
    v_reset, detach, decay_input, rest, strict, decay, delayed = case
    dyn = LIFDynamics(decay=decay, decay_input=decay_input, v_threshold=0.8, v_reset=v_reset, detach_reset=detach,
                      surrogate=surrogate, v_rest=rest, strict=strict, delayed_reset=delayed)
    params = (torch.tensor(0.2, dtype=torch.float64),) if decay is None else ()
    x = torch.randn(6, 2, 50, dtype=torch.float64) * 0.8 + 0.6
    x[:, 0, :5] = 0.8 - rest         # inputs that land exactly on the threshold: the tie rule decides
    spikes = assert_closed_form_is_forward_mode_ad(dyn, params, x, [4, 2])
    assert torch.equal(spikes, dyn.multistep(x, params))


def test_resting_potential_is_where_the_membrane_starts_and_leaks_to():
    """u_0 = u_rest; with no input the membrane stays there; a hard reset goes to v_reset in volts."""
    dyn = LIFDynamics(decay=0.5, v_threshold=1.0, v_reset=-0.2, v_rest=-0.2)
    assert not dyn.multistep(torch.zeros(5, 3), ()).any()
    # from rest -0.2 one input of 1.2 reaches the threshold exactly (fires at >=), not 1.19
    x = torch.tensor([[1.2, 1.19]], dtype=torch.float64)
    assert dyn.multistep(x, ()).tolist() == [[1.0, 0.0]]
    strict = LIFDynamics(decay=0.5, v_threshold=1.0, v_reset=-0.2, v_rest=-0.2, strict=True)
    assert strict.multistep(x, ()).tolist() == [[0.0, 0.0]]


def test_delayed_reset_acts_one_step_later():
    """λ = 0.5, V_th = 1, input 1.5 then nothing: the spike's reset lands at the next step, after the decay
    (soft: 0.75 − 1) or before it (hard to 0: 0.5·0); the membrane kept is the one before reset."""
    x = torch.tensor([[1.5], [0.0], [0.0]], dtype=torch.float64)
    for v_reset, expected in ((None, [1.5, -0.25, -0.125]), (0.0, [1.5, 0.0, 0.0])):
        dyn = LIFDynamics(decay=0.5, v_threshold=1.0, v_reset=v_reset, detach_reset=True, delayed_reset=True)
        state, trace = dyn.init_state(x[0]), []
        for x_t in x:
            s, state = dyn.step(x_t, state, ())
            trace.append(state[0].item())
        assert trace == expected
    now = LIFDynamics(decay=0.5, v_threshold=1.0, detach_reset=True)
    assert now.step(x[0], now.init_state(x[0]), ())[1][0].item() == 0.5
    with pytest.raises(ValueError, match="detach_reset=True"):
        LIFDynamics(decay=0.5, detach_reset=False, delayed_reset=True)
    assert "at the next step" in LIFDynamics(decay=0.5, delayed_reset=True).describe()


def test_fusable_only_where_the_kernels_compute_it():
    from ratebp_compile.nn import IF, LIF
    x = torch.zeros(2, 3)
    assert LIF().spec().fusable(x) and IF().spec().fusable(x.half())
    assert ParametricLIF().spec().fusable(x.bfloat16()) and LIF().spec().fusable(x.double())
    assert LIFDynamics(decay=0.5, v_rest=-0.1).fusable(x)
    assert LIFDynamics(decay=0.5, strict=True, delayed_reset=True).fusable(x)
    assert not LIFDynamics(decay=0.5, surrogate=SuperSpike(1.5, 2.0)).fusable(x)
    assert not LIF().spec().fusable(x.long())

    class Mine(Neuron):
        pass

    assert not Mine().spec().fusable(x)


def test_kernels_import_nothing_from_the_rest_of_the_package():
    import ast
    import pathlib

    import ratebp_compile.kernels as K
    for path in pathlib.Path(K.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and not (node.module or "").startswith("ratebp_compile"), (path.name, node.module)

"""The Leaky family against snnTorch's own ``Leaky``, for every setting: reset mode x reset_delay x
beta (float, learnable scalar, learnable per channel with values at and beyond the clamp, per-channel
buffer) x threshold (float, learnable) x graded spikes factor (1, 0.5, learnable) x the six surrogates
(the full product under RATEBP_SNNTORCH_FULL=1; by default each setting runs with one surrogate, and
every surrogate with every reset mode x delay). Each setting: (a) spikes and the stored membrane
bitwise equal snnTorch's module run step by step; (b) BPTT gradients w.r.t. the input and the learnable
constants equal snnTorch's autograd; (c) the spike pass's r, e and per-element e_params equal snnTorch's
reverse-mode d(mean_t s)/d(c, p) for an input held constant in time. Plus: the tie rule, unpatched
(float32-spike) snnTorch in float64 and in float32, scans over chunks, low-precision spike passes."""
import itertools
import os

import pytest
import torch

snn = pytest.importorskip("snntorch")

from ratebp_compile.families import LeakyDynamics  # noqa: E402
from ratebp_compile.nn.surrogate import ATan  # noqa: E402
from tests.families import snntorch_cases as C  # noqa: E402
from tests.families.oracle import assert_closed_form_is_forward_mode_ad  # noqa: E402

T, B, K = 6, 3, 5
F32 = lambda v: float(torch.as_tensor(v, dtype=torch.float32))  # noqa: E731  (snnTorch stores floats as float32)

BETAS = {
    "float": 0.85,
    "learn": torch.tensor(0.85, dtype=torch.float64),
    "channel": torch.tensor([0.3, 0.6, 0.95, 1.0, 1.2], dtype=torch.float64),   # 1.0: clamp edge; 1.2: clamped
    "buffer": torch.tensor([0.5, 0.7, 0.9, 0.99, 1.0], dtype=torch.float64),
}
THRESHOLDS = {"float": 0.7, "learn": torch.tensor(0.7, dtype=torch.float64)}
GS = {"one": 1.0, "half": 0.5, "learn": torch.tensor(1.5, dtype=torch.float64)}
SETTINGS = list(itertools.product(BETAS, THRESHOLDS, GS))
#: The full product of every setting with every surrogate takes ~20 s; by default each setting runs with
#: one surrogate (cycling through the six), and every surrogate runs with every reset mode x delay and
#: all constants learnable (``test_every_surrogate``). RATEBP_SNNTORCH_FULL=1 runs the full product.
FULL = os.environ.get("RATEBP_SNNTORCH_FULL") == "1"


@pytest.fixture(autouse=True)
def _no_leak():
    with C.no_instance_leak():
        yield


def _setting(reset, delay, sg, bk, tk, gk):
    constants = {"beta": BETAS[bk], "threshold": THRESHOLDS[tk], "graded_spikes_factor": GS[gk]}
    learn = {n for n, k in (("beta", bk), ("threshold", tk), ("graded_spikes_factor", gk)) if k == "learn"} | \
        ({"beta"} if bk == "channel" else set())
    names = tuple(n for n in ("beta", "threshold", "graded_spikes_factor") if isinstance(constants[n], torch.Tensor))
    dyn = LeakyDynamics(**{n: None if n in names else F32(v) for n, v in constants.items()},
                        reset=reset, reset_delay=delay, surrogate=sg, params=names)
    return constants, learn, names, dyn


def _make(constants, learn, reset, delay, factory):
    options = dict(reset_mechanism=reset, reset_delay=delay)
    return lambda over: C.build(snn.Leaky, constants, learn, options, factory(), over)


def _check(reset, delay, s, bk, tk, gk, x, c):
    sg_name, factory, sg = C.SURROGATES[s]
    constants, learn, names, dyn = _setting(reset, delay, sg, bk, tk, gk)
    C.check_setting(_make(constants, learn, reset, delay, factory), dyn, names, 1, x, c,
                    f"{reset}/{delay}/{sg_name}/beta={bk}/th={tk}/g={gk}")


@pytest.mark.parametrize("reset", C.RESETS)
@pytest.mark.parametrize("delay", [True, False])
def test_every_setting_equals_snntorch(reset, delay):
    x = C.inputs((T, B, K), seed=1)
    c = C.inputs((B, K), seed=2, scale=0.6, shift=0.45)
    for i, (bk, tk, gk) in enumerate(SETTINGS):
        for s in (range(len(C.SURROGATES)) if FULL else [i % len(C.SURROGATES)]):
            _check(reset, delay, s, bk, tk, gk, x, c)


@pytest.mark.parametrize("s", range(len(C.SURROGATES)), ids=[name for name, _, _ in C.SURROGATES])
@pytest.mark.parametrize("reset", C.RESETS)
@pytest.mark.parametrize("delay", [True, False])
def test_every_surrogate(reset, delay, s):
    x = C.inputs((T, B, K), seed=10 + s)
    c = C.inputs((B, K), seed=20 + s, scale=0.6, shift=0.45)
    _check(reset, delay, s, "channel", "learn", "learn", x, c)
    _check(reset, delay, s, "float", "float", "one", x, c)


@pytest.mark.parametrize("reset", C.RESETS)
@pytest.mark.parametrize("delay", [True, False])
def test_unpatched_snntorch_differs_only_by_float32_spike_rounding(reset, delay):
    constants, learn, names, dyn = _setting(reset, delay, ATan(2.0), "learn", "learn", "half")
    x, c = C.inputs((T, B, K), seed=3), C.inputs((B, K), seed=4, scale=0.6, shift=0.45)
    C.check_setting(_make(constants, learn, reset, delay, C.SURROGATES[0][1]), dyn, names, 1, x, c,
                    f"unpatched {reset}/{delay}", patched=False)


@pytest.mark.parametrize("reset", C.RESETS)
@pytest.mark.parametrize("delay", [True, False])
def test_tie_at_threshold_does_not_fire(reset, delay):
    """Membranes exactly at θ (also in r_t, from the stored membrane): strict '>' in both."""
    x = torch.tensor([[1.0, 0.5, 2.0], [0.5, 0.5, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.5]], dtype=torch.float64)
    m = snn.Leaky(beta=0.5, threshold=1.0, reset_mechanism=reset, reset_delay=delay)
    ref, states = C.run_peer(m, x, 1)
    dyn = LeakyDynamics(beta=0.5, threshold=1.0, reset=reset, reset_delay=delay)
    assert torch.equal(dyn.multistep(x, ()), ref.to(x.dtype))
    ours = C.our_states(dyn, x, ())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ours, states))
    assert ref[0, 0] == 0 and ours[0][0][0] == 1.0          # m_1 = θ exactly: no spike


def test_scan_over_chunks_equals_the_whole_spike_pass():
    dyn = LeakyDynamics(beta=None, threshold=0.8, reset="subtract", reset_delay=False, graded_spikes_factor=None,
                        params=("graded_spikes_factor", "beta"))
    x = C.inputs((7, 2, 9), seed=5)
    params = (torch.tensor(0.5, dtype=torch.float64), torch.full((9,), 0.9, dtype=torch.float64))
    spikes, r, e, e_g, e_b = dyn.spike_pass(x, params)
    state, parts = None, []
    for chunk in x.split([2, 4, 1]):
        s, state = dyn.scan(chunk, state, params, spike_dtype=None)
        parts.append(s)
    assert torch.equal(torch.cat(parts), spikes)
    for ours, whole in zip(dyn.finish(state, params, x.dtype), (r, e, e_g, e_b)):
        torch.testing.assert_close(ours, whole, **C.TIGHT)


def test_family_construction():
    d = LeakyDynamics(beta=None, threshold=None)
    assert d.params == ("beta", "threshold") and d.binary and d.name == "leaky"
    assert not LeakyDynamics(beta=0.9, graded_spikes_factor=0.5).binary
    assert LeakyDynamics(beta=0.9) == LeakyDynamics(beta=0.9, threshold=1, surrogate=ATan(2.0))
    assert "β=0.9" in LeakyDynamics(beta=0.9).describe() and "immediate" in \
        LeakyDynamics(beta=0.9, reset_delay=False).describe()
    with pytest.raises(ValueError, match="reset"):
        LeakyDynamics(beta=0.9, reset="hard")
    with pytest.raises(ValueError, match="params"):
        LeakyDynamics(beta=None, params=("threshold",))
    with pytest.raises(TypeError, match="surrogate"):
        LeakyDynamics(beta=0.9, surrogate=lambda u: u)


@pytest.mark.parametrize("reset", C.RESETS)
@pytest.mark.parametrize("delay", [True, False])
def test_float32_model_is_bitwise_snntorch(reset, delay):
    """In float32 (snnTorch's own dtype) unpatched snnTorch and the family run the same arithmetic."""
    f32 = {n: v.float() if isinstance(v, torch.Tensor) else v for n, v in
           (("beta", BETAS["channel"]), ("threshold", THRESHOLDS["learn"]), ("graded_spikes_factor", 0.5))}
    names = ("beta", "threshold")
    dyn = LeakyDynamics(beta=None, threshold=None, graded_spikes_factor=0.5, reset=reset, reset_delay=delay,
                        surrogate=C.SURROGATES[2][2])
    make = lambda over: C.build(snn.Leaky, f32, set(names), dict(reset_mechanism=reset, reset_delay=delay),  # noqa
                                C.SURROGATES[2][1](), over)
    x = C.inputs((T, B, K), seed=8, dtype=torch.float32)
    c = C.inputs((B, K), seed=9, scale=0.6, shift=0.45, dtype=torch.float32)
    C.check_setting(make, dyn, names, 1, x, c, f"float32 {reset}/{delay}", patched=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_spike_pass_spikes_equal_the_bptt_forward_in_every_dtype(dtype):
    """The spike pass (forward-mode AD, operands lifted to duals) fires exactly as the BPTT forward."""
    x = C.inputs((6, 3, 5), seed=11, dtype=dtype)
    for dyn, params in [(LeakyDynamics(beta=0.9, threshold=0.7, reset_delay=False, graded_spikes_factor=0.5), ()),
                        (LeakyDynamics(beta=None, threshold=None, reset="zero"),
                         (torch.tensor(0.9, dtype=dtype), torch.tensor(0.7, dtype=dtype)))]:
        spikes, r, e, *e_params = dyn.spike_pass(x, params)
        assert torch.equal(spikes, dyn.multistep(x, params)) and spikes.dtype == dtype
        assert r.shape == e.shape == (3, 5) and len(e_params) == len(params)


@pytest.mark.parametrize("reset", C.RESETS)
@pytest.mark.parametrize("delay", [True, False])
@pytest.mark.parametrize("setting", SETTINGS, ids=["-".join(k) for k in SETTINGS])
def test_closed_form_equals_forward_mode_ad_through_the_step(reset, delay, setting):
    """For every setting the closed-form scan (all directions in one loop) equals the generic engine
    (one forward-mode pass per direction through ``step``), chunk by chunk, with each constant's
    per-element eligibility."""
    constants, _, names, dyn = _setting(reset, delay, ATan(2.0), *setting)
    params = tuple(constants[n] for n in names)
    assert_closed_form_is_forward_mode_ad(dyn, params, C.inputs((T + 3, B, K), seed=3), [4, 5])


@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("beta", [0.5, 1.3], ids=["beta0.5", "beta-clamped"])
def test_as_lif_is_the_same_neuron_and_runs_the_fused_ops(reset, beta):
    """With constants, g = 1 and the delayed reset a Leaky is a LIF with a delayed reset firing above θ:
    step by step the same spikes and the same membranes, bitwise (on a grid where many membranes land
    exactly on θ); the fused ops give the family's spikes, r, e and BPTT gradients."""
    dyn = LeakyDynamics(beta=beta, threshold=1.0, reset=reset, reset_delay=True, surrogate=ATan(2.0))
    lif = dyn.as_lif()
    assert lif is not None and lif.strict and lif.delayed_reset and lif.decay == min(beta, 1.0)
    x = torch.randint(-2, 8, (9, 4, 16), generator=torch.Generator().manual_seed(5)).double() / 4
    ours, theirs = dyn.init_state(x[0]), lif.init_state(x[0])
    ties = 0
    for x_t in x:
        s, ours = dyn.step(x_t, ours, ())
        s_lif, theirs = lif.step(x_t, theirs, ())
        assert torch.equal(s, s_lif) and torch.equal(ours[0], theirs[0])
        ties += int((ours[0] == 1.0).sum())
    assert ties > 10
    assert dyn.fusable(x) and dyn.op_args(()) == lif.op_args(())
    for fused, closed in zip(dyn.fused_spike_pass(x, ()), dyn.spike_pass(x, ())):
        torch.testing.assert_close(fused, closed, rtol=1e-12, atol=1e-12)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    spikes = dyn.fused_multistep(xa, ())
    assert torch.equal(spikes, dyn.multistep(xb, ()))
    (spikes * g).sum().backward()
    (dyn.multistep(xb, ()) * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)


def test_as_lif_only_where_it_is_the_same_neuron():
    assert LeakyDynamics(beta=0.9).as_lif() is not None
    for other in (LeakyDynamics(beta=None), LeakyDynamics(beta=0.9, threshold=None),
                  LeakyDynamics(beta=0.9, graded_spikes_factor=0.5), LeakyDynamics(beta=0.9, reset_delay=False),
                  LeakyDynamics(beta=0.9, reset="none")):
        assert other.as_lif() is None and not other.fusable(torch.zeros(2))

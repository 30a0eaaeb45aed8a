"""The Synaptic family against snnTorch's own ``Synaptic``, for every setting: reset mode x reset_delay x
alpha (float, learnable scalar, learnable per channel with values at and beyond the clamp, per-channel
buffer) x beta (float, learnable per channel) x threshold (float, learnable) x graded spikes factor
(1, 0.5, learnable: set on the module, as Synaptic takes no argument for it) x the six surrogates.
By default each setting runs with one surrogate and one graded spikes factor (cycling), and every
surrogate with every reset mode x delay; RATEBP_SNNTORCH_FULL=1 runs the full product. Each setting:
(a) spikes and both states bitwise equal snnTorch's module run step by step; (b) BPTT gradients equal
snnTorch's autograd; (c) the spike pass's r, e and per-element e_params equal snnTorch's reverse-mode
d(mean_t s)/d(c, p) for an input held constant in time."""
import itertools
import os

import pytest
import torch

snn = pytest.importorskip("snntorch")

from ratebp_compile.families import LeakyDynamics, SynapticDynamics  # noqa: E402
from ratebp_compile.nn.surrogate import ATan  # noqa: E402
from tests.families import snntorch_cases as C  # noqa: E402
from tests.families.oracle import assert_closed_form_is_forward_mode_ad  # noqa: E402

T, B, K = 6, 3, 5
F32 = lambda v: float(torch.as_tensor(v, dtype=torch.float32))  # noqa: E731  (snnTorch stores floats as float32)
NAMES = ("alpha", "beta", "threshold", "graded_spikes_factor")

ALPHAS = {
    "float": 0.7,
    "learn": torch.tensor(0.7, dtype=torch.float64),
    "channel": torch.tensor([0.2, 0.5, 0.8, 1.0, 1.3], dtype=torch.float64),
    "buffer": torch.tensor([0.1, 0.4, 0.6, 0.9, 1.0], dtype=torch.float64),
}
BETAS = {"float": 0.85, "channel": torch.tensor([0.3, 0.6, 0.9, 1.0, -0.2], dtype=torch.float64)}
THRESHOLDS = {"float": 1.1, "learn": torch.tensor(1.1, dtype=torch.float64)}
GS = {"one": 1.0, "half": torch.tensor(0.5), "learn": torch.tensor(1.5, dtype=torch.float64)}
SETTINGS = list(itertools.product(ALPHAS, BETAS, THRESHOLDS))
FULL = os.environ.get("RATEBP_SNNTORCH_FULL") == "1"


@pytest.fixture(autouse=True)
def _no_leak():
    with C.no_instance_leak():
        yield


def _check(reset, delay, s, ak, bk, tk, gk, x, c):
    sg_name, factory, sg = C.SURROGATES[s]
    kinds = dict(zip(NAMES, (ak, bk, tk, gk)))
    constants = {"alpha": ALPHAS[ak], "beta": BETAS[bk], "threshold": THRESHOLDS[tk], "graded_spikes_factor": GS[gk]}
    learn = {n for n, k in kinds.items() if k in ("learn", "channel")}
    # what the adapter passes as parameters: learnable ones and per-element buffers; 0-dim buffers are floats
    names = tuple(n for n in NAMES if n in learn or kinds[n] == "buffer")
    dyn = SynapticDynamics(**{n: None if n in names else F32(v) for n, v in constants.items()},
                           reset=reset, reset_delay=delay, surrogate=sg, params=names)
    options = dict(reset_mechanism=reset, reset_delay=delay)
    make = lambda over: C.build(snn.Synaptic, constants, learn, options, factory(), over)  # noqa: E731
    C.check_setting(make, dyn, names, 2, x, c, f"{reset}/{delay}/{sg_name}/alpha={ak}/beta={bk}/th={tk}/g={gk}")


@pytest.mark.parametrize("reset", C.RESETS)
@pytest.mark.parametrize("delay", [True, False])
def test_every_setting_equals_snntorch(reset, delay):
    x = C.inputs((T, B, K), seed=1, scale=0.6, shift=0.3)
    c = C.inputs((B, K), seed=2, scale=0.4, shift=0.25)
    for i, (ak, bk, tk) in enumerate(SETTINGS):
        if FULL:
            for s, gk in itertools.product(range(len(C.SURROGATES)), GS):
                _check(reset, delay, s, ak, bk, tk, gk, x, c)
        else:
            _check(reset, delay, i % len(C.SURROGATES), ak, bk, tk, list(GS)[i % len(GS)], x, c)


@pytest.mark.parametrize("s", range(len(C.SURROGATES)), ids=[name for name, _, _ in C.SURROGATES])
@pytest.mark.parametrize("reset", C.RESETS)
@pytest.mark.parametrize("delay", [True, False])
def test_every_surrogate(reset, delay, s):
    x = C.inputs((T, B, K), seed=10 + s, scale=0.6, shift=0.3)
    c = C.inputs((B, K), seed=20 + s, scale=0.4, shift=0.25)
    _check(reset, delay, s, "channel", "channel", "learn", "learn", x, c)
    _check(reset, delay, s, "float", "float", "float", "one", x, c)


@pytest.mark.parametrize("delay", [True, False])
def test_zero_reset_zeroes_the_whole_candidate_unlike_leaky(delay):
    """With α = 0 a Synaptic is a Leaky fed the same input, except for the zero reset: Synaptic's zeroes
    β·m + syn (the new input too), Leaky's only β·m."""
    x = torch.tensor([[1.5], [0.3], [0.2], [1.4], [0.1]], dtype=torch.float64)
    syn = SynapticDynamics(alpha=0.0, beta=F32(0.9), reset="zero", reset_delay=delay)
    leaky = LeakyDynamics(beta=F32(0.9), reset="zero", reset_delay=delay)
    ref, states = C.run_peer(snn.Synaptic(alpha=0.0, beta=0.9, reset_mechanism="zero", reset_delay=delay), x, 2)
    assert torch.equal(syn.multistep(x, ()), ref.to(x.dtype))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(C.our_states(syn, x, ()), states))
    m_syn = [s[1].item() for s in C.our_states(syn, x, ())]
    m_leaky = [s[0].item() for s in C.our_states(leaky, x, ())]
    if delay:     # spike at step 1, reset at step 2: Synaptic zeroes x_2 too, Leaky keeps it
        assert m_syn[1] == 0.0 and m_leaky[1] == pytest.approx(0.3)


def test_family_construction():
    d = SynapticDynamics(alpha=None, beta=0.5, threshold=None, params=("threshold", "alpha"))
    assert d.params == ("threshold", "alpha") and d.name == "synaptic" and d.binary
    assert "α learned" in d.describe() and "β=0.5" in d.label()
    with pytest.raises(ValueError, match="params"):
        SynapticDynamics(alpha=None, beta=None, params=("alpha",))


@pytest.mark.parametrize("reset", C.RESETS)
@pytest.mark.parametrize("delay", [True, False])
@pytest.mark.parametrize("setting", SETTINGS, ids=["-".join(k) for k in SETTINGS])
def test_closed_form_equals_forward_mode_ad_through_the_step(reset, delay, setting):
    """The closed-form scan equals the generic engine (forward-mode AD through ``step``), chunk by chunk,
    with each constant's per-element eligibility (g learnable too)."""
    ak, bk, tk = setting
    kinds = dict(zip(NAMES, (ak, bk, tk, "learn")))
    constants = {"alpha": ALPHAS[ak], "beta": BETAS[bk], "threshold": THRESHOLDS[tk],
                 "graded_spikes_factor": GS["learn"]}
    names = tuple(n for n in NAMES if kinds[n] in ("learn", "channel", "buffer"))
    dyn = SynapticDynamics(**{n: None if n in names else F32(v) for n, v in constants.items()},
                           reset=reset, reset_delay=delay, surrogate=ATan(2.0), params=names)
    params = tuple(constants[n] for n in names)
    assert_closed_form_is_forward_mode_ad(dyn, params, C.inputs((9, 3, 5), seed=4), [4, 5])

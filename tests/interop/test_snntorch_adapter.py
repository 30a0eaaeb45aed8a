"""The snnTorch adapter: what each Leaky/Synaptic setting maps to, the call forms, the state reset of
``rc.nn.MultiStep``, the spec run against snnTorch itself, and every refusal with its reason.
Skipped without snnTorch."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

snn = pytest.importorskip("snntorch")
from snntorch import surrogate  # noqa: E402
from snntorch import utils as snn_utils  # noqa: E402

import ratebp_compile as rc  # noqa: E402
from ratebp_compile.families import LeakyDynamics, SynapticDynamics  # noqa: E402
from ratebp_compile.interop import UnsupportedNeuron  # noqa: E402
from ratebp_compile.nn import surrogate as ours  # noqa: E402
from ratebp_compile.nn.spec import call_form, cell_spec, is_single_step, neuron_spec  # noqa: E402
from tests.families import snntorch_cases as C  # noqa: E402

F32 = lambda v: float(torch.as_tensor(v, dtype=torch.float32))  # noqa: E731


@pytest.fixture(autouse=True)
def _no_leak():
    with C.no_instance_leak():
        yield


def _spec(m):
    assert is_single_step(m) and neuron_spec(m) is None
    return cell_spec(m)


# -- what maps to what -------------------------------------------------------------------------------------
def test_default_leaky():
    spec = _spec(snn.Leaky(beta=0.9))
    assert spec.dynamics == LeakyDynamics(beta=F32(0.9), threshold=1.0, reset="subtract", reset_delay=True,
                                          surrogate=ours.ATan(2.0), graded_spikes_factor=1.0)
    assert spec.param_names == () and spec.time_steps is None and spec.binary
    assert cell_spec(snn.Leaky(beta=0.9), time_steps=5).time_steps == 5


@pytest.mark.parametrize("factory, expected", [(f, sg) for _, f, sg in C.SURROGATES] + [
    (lambda: surrogate.atan(), ours.ATan(2.0)), (lambda: surrogate.sigmoid(), ours.Sigmoid(25.0)),
    (lambda: surrogate.fast_sigmoid(), ours.SuperSpike(1.0, 25.0)),
    (lambda: surrogate.triangular(), ours.SignedStep(1.0)),
    (lambda: None, ours.ATan(2.0))], ids=[n for n, _, _ in C.SURROGATES] + ["atan()", "sigmoid()", "fast_sigmoid()",
                                          "triangular()", "default"])
def test_surrogates(factory, expected):
    assert _spec(snn.Leaky(beta=0.5, spike_grad=factory())).dynamics.surrogate == expected


def test_constants_floats_and_parameters():
    spec = _spec(snn.Leaky(beta=torch.rand(4), threshold=0.5, learn_threshold=True, graded_spikes_factor=2.0,
                           learn_graded_spikes_factor=True, reset_mechanism="zero", reset_delay=False))
    d = spec.dynamics
    assert spec.param_names == d.params == ("beta", "threshold", "graded_spikes_factor")
    assert d.beta is None and d.threshold is None and d.graded_spikes_factor is None and not spec.binary
    assert d.reset == "zero" and not d.reset_delay
    # a 0-dim buffer is a float (its exact value, float64 here); a graded factor as a float
    spec = _spec(snn.Leaky(beta=torch.tensor(0.3, dtype=torch.float64), graded_spikes_factor=0.5, learn_beta=False))
    assert spec.dynamics.beta == 0.3 and spec.dynamics.graded_spikes_factor == 0.5 and spec.param_names == ()
    assert not spec.binary
    # Synaptic: alpha learned, beta per channel, g set on the module
    m = snn.Synaptic(alpha=0.6, beta=torch.full((3,), 0.8), learn_alpha=True, reset_mechanism="none")
    m.graded_spikes_factor = torch.tensor(0.25)
    spec = _spec(m)
    assert spec.param_names == ("alpha", "beta")
    assert spec.dynamics == SynapticDynamics(alpha=None, beta=None, threshold=1.0, reset="none",
                                             graded_spikes_factor=0.25, params=("alpha", "beta"))


def test_deepcopy_keeps_its_update():
    m = copy.deepcopy(snn.Leaky(beta=0.9, reset_mechanism="zero"))
    assert _spec(m).dynamics.reset == "zero"


@pytest.mark.parametrize("merged", [False, True])
def test_spec_runs_as_snntorch(merged):
    m = snn.Leaky(beta=torch.tensor([0.5, 0.9, 1.0], dtype=torch.float64), learn_beta=True, threshold=0.8,
                  reset_delay=False, spike_grad=surrogate.fast_sigmoid(5))
    x = C.inputs((7, 2, 3), seed=3).requires_grad_()
    with C.float64_spikes():
        ref, _ = C.run_peer(m, x, 1)
    spec = cell_spec(m, time_steps=7 if merged else None)
    params = [getattr(m, n) for n in spec.param_names]
    out = spec(x.flatten(0, 1), *params).view(x.shape) if merged else spec(x, *params)
    assert torch.equal(out, ref)
    for a, b in zip(C.grads(out, [x, m.beta]), C.grads(ref, [x, m.beta])):
        torch.testing.assert_close(a, b, **C.TIGHT)
    spikes, r, e, e_beta = spec.with_mode("spike")(x.detach().flatten(0, 1) if merged else x.detach(), *params)
    assert torch.equal(spikes.view(x.shape), ref.detach()) and r.shape == e.shape == e_beta.shape == (
        (2, 3) if merged else (1, 2, 3))
    chunk, carry = spec.scan(x.detach()[:4], None, *params)        # a binary neuron streams 1-byte spikes
    assert spec.binary and chunk.dtype == torch.uint8 and torch.equal(chunk.double(), ref.detach()[:4])


# -- call forms, rest, state reset -------------------------------------------------------------------------
def test_call_forms():
    assert call_form(snn.Leaky(beta=0.9)).state_args == 1
    assert call_form(snn.Leaky(beta=0.9)).outputs == ("spikes", "state")
    assert call_form(snn.Leaky(beta=0.9, init_hidden=True)).state_args == 0
    assert call_form(snn.Leaky(beta=0.9, init_hidden=True)).outputs == ()
    assert call_form(snn.Leaky(beta=0.9, init_hidden=True, output=True)).outputs == ("spikes", "state")
    assert call_form(snn.Synaptic(alpha=0.5, beta=0.9)).state_args == 2
    assert call_form(snn.Synaptic(alpha=0.5, beta=0.9)).outputs == ("spikes", "state", "state")
    assert call_form(snn.Synaptic(alpha=0.5, beta=0.9, init_hidden=True)).outputs == ()
    assert call_form(snn.Synaptic(alpha=0.5, beta=0.9, init_hidden=True, output=True)).spikes_index == 0


def test_at_rest():
    at_rest = call_form(snn.Leaky(beta=0.9)).at_rest
    fresh = snn.Leaky(beta=0.9)
    assert at_rest(None) and at_rest(fresh.init_leaky()) and at_rest(torch.zeros(0)) and at_rest(torch.zeros(2, 3))
    fresh(torch.ones(2, 3))
    assert at_rest(fresh.init_leaky()) and fresh.init_leaky().shape == (2, 3)   # zeros of the last batch's shape
    assert all(at_rest(s) for s in snn.Synaptic(alpha=0.5, beta=0.9).init_synaptic())
    assert not at_rest(torch.tensor([0.0, 0.1])) and not at_rest(0.0) and not at_rest(torch.zeros(2, device="meta"))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fake = torch.zeros(3)
    assert not at_rest(fake)
    # traced: init_leaky() / reset_mem() is zeros_like(<the buffer>), computed in the graph
    graph = torch.fx.symbolic_trace(lambda x: (torch.zeros_like(x), x.new_zeros(3), x + 1)).graph
    zeros_like, new_zeros, plus = [n for n in graph.nodes if n.op in ("call_function", "call_method")][:3]
    assert at_rest(zeros_like) and at_rest(new_zeros) and not at_rest(plus)


def test_stored_at_rest():
    stored_at_rest = call_form(snn.Leaky(beta=0.9, init_hidden=True)).stored_at_rest
    m = snn.Leaky(beta=0.9, init_hidden=True)
    assert stored_at_rest(m)                                  # fresh: mem = zeros(0)
    m(torch.ones(2, 3) * 2)
    assert not stored_at_rest(m)
    m.reset_mem()
    assert stored_at_rest(m)
    s = snn.Synaptic(alpha=0.5, beta=0.9)
    s(torch.full((2,), 0.5))                                  # mem 0.5 < θ, syn 0.5
    assert not stored_at_rest(s)
    s.mem = torch.zeros(2)
    assert not stored_at_rest(s)                              # syn still holds current
    rc.nn.MultiStep(s)(torch.zeros(1, 2))                     # resets syn and mem, then one step on zeros
    assert stored_at_rest(s)


def test_multistep_resets_its_own_neurons_only():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), snn.Leaky(beta=0.8, init_hidden=True), nn.Linear(6, 3),
                        snn.Synaptic(alpha=0.5, beta=0.8, init_hidden=True, output=True))
    other = snn.Leaky(beta=0.8, init_hidden=True)
    other(torch.ones(2, 2))
    other_mem = other.mem
    x = torch.rand(5, 2, 4) * 2
    model = rc.nn.MultiStep(net)
    first = model(x)
    second = model(x)                       # from rest again, although net's neurons hold state now
    assert isinstance(first, tuple) and len(first) == 3 and first[0].shape == (5, 2, 3)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert other.mem is other_mem            # snnTorch's reset_hidden would have zeroed it too
    snn_utils.reset(net)
    manual = [net(x_t) for x_t in x]
    assert torch.equal(torch.stack([o[0] for o in manual]), first[0])


# -- refusals ----------------------------------------------------------------------------------------------
class MyLeaky(snn.Leaky):
    pass


def _refused(m, *fragments):
    with pytest.raises(UnsupportedNeuron) as info:
        cell_spec(m)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return str(info.value)


def test_recurrent_refused():
    _refused(snn.RLeaky(beta=0.9, linear_features=4), "recurrent", "weight layer", "rate-based")
    _refused(snn.RSynaptic(alpha=0.5, beta=0.9, all_to_all=False), "recurrent")


def test_subclasses_and_replaced_methods_refused():
    _refused(MyLeaky(beta=0.9), "subclass of snnTorch's Leaky", "MyLeaky")
    _refused(snn.DeltaLeaky(beta=0.9), "subclass of snnTorch's Leaky")
    m = snn.Leaky(beta=0.9)
    m.fire = lambda mem: mem
    _refused(m, "fire", "replaced")


def test_other_snntorch_neurons_refused():
    _refused(snn.Alpha(alpha=0.9, beta=0.8), "Alpha", "Leaky, Synaptic")
    with pytest.raises(UnsupportedNeuron, match="LeakyParallel"):
        neuron_spec(snn.LeakyParallel(input_size=3, hidden_size=4, beta=0.9))


def test_settings_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _refused(snn.Leaky(beta=0.9, inhibition=True), "inhibition", "elementwise")
    _refused(snn.Leaky(beta=0.9, state_quant=lambda u: u), "state_quant")
    _refused(snn.Leaky(beta=0.9, surrogate_disable=True), "surrogate_disable")
    _refused(snn.Synaptic(alpha=0.5, beta=0.9, surrogate_disable=True), "surrogate_disable")


def test_unknown_surrogates_refused():
    _refused(snn.Leaky(beta=0.9, spike_grad=lambda u: (u > 0).float()), "<lambda>",
             "not one of the snnTorch surrogates")
    _refused(snn.Leaky(beta=0.9, spike_grad=surrogate.spike_rate_escape()), "spike_rate_escape")
    _refused(snn.Leaky(beta=0.9, spike_grad=surrogate.custom_surrogate(lambda a, b, c: b)), "custom_surrogate")


def test_reset_mechanism_changed_after_construction_refused():
    m = snn.Leaky(beta=0.9)
    m.reset_mechanism = "zero"
    _refused(m, "'subtract'", "'zero'", "after construction")
    m = snn.Synaptic(alpha=0.5, beta=0.9, reset_mechanism="none")
    m.reset_mechanism = "subtract"
    _refused(m, "'none'", "'subtract'")
    m = snn.Leaky(beta=0.9)
    m.state_function = m._base_int.__get__(snn.Leaky(beta=0.5))
    _refused(m, "state_function")

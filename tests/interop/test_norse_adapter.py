"""The Norse adapter against Norse 1.1 itself: for every setting, the spec's forward is Norse's cell run
step by step (spikes exactly; the membrane and current bit for bit where the constants round alike), its
BPTT gradient is Norse's autograd, its spike-pass eligibility is Norse's reverse-mode d(mean spikes)/dc
for an input held constant in time; LIFBoxCell likewise through the LIF family; Norse's surrogates are
ours; and what the adapter refuses, with the reasons."""
import pytest
import torch

pytest.importorskip("norse")
nt = pytest.importorskip("norse.torch")

from norse.torch.functional.reset import reset_subtract  # noqa: E402
from norse.torch.functional.threshold import threshold  # noqa: E402

from ratebp_compile import interop  # noqa: E402
from ratebp_compile.families import CurrentLIFDynamics, LIFDynamics  # noqa: E402
from ratebp_compile.interop import UnsupportedNeuron  # noqa: E402
from ratebp_compile.interop import norse as adapter  # noqa: E402
from ratebp_compile.nn.spec import CallForm, NeuronSpec, call_form, cell_spec, is_single_step, neuron_spec  # noqa: E402
from ratebp_compile.nn.surrogate import Circ, HeaviErfc, SuperSpike, Tanh, Tent  # noqa: E402
from tests.conftest import assert_close  # noqa: E402

F32, F64 = torch.float32, torch.float64

#: LIFCell/LIF settings: (LIFParameters fields, dt, input offset, input scale).
CELL = {
    "defaults": (dict(), 0.001, 1.0, 1.0),
    "voltages": (dict(v_leak=0.2, v_th=0.9, v_reset=-0.1), 0.001, 1.0, 1.0),
    "taus_dt": (dict(tau_syn_inv=150.0, tau_mem_inv=50.0), 0.002, 1.0, 1.0),
    "rest_below": (dict(v_leak=-0.5, v_th=0.5, v_reset=-0.5, tau_syn_inv=1 / 7e-3, tau_mem_inv=1 / 0.013), 3e-4,
                   3.0, 3.0),
    "odd_taus": (dict(tau_syn_inv=333.0, tau_mem_inv=77.7), 0.001, 1.0, 1.0),
    "super_alpha": (dict(method="super", alpha=7.0), 0.001, 1.0, 1.0),
    "triangle": (dict(v_leak=0.2, v_th=0.9, v_reset=-0.1, method="triangle", alpha=0.5), 0.001, 1.0, 1.0),
    "triangle_100": (dict(method="triangle"), 0.001, 1.0, 1.0),
    "tanh": (dict(v_leak=0.2, v_th=0.9, v_reset=-0.1, method="tanh", alpha=2.0), 0.001, 1.0, 1.0),
    "circ": (dict(v_leak=0.2, v_th=0.9, v_reset=-0.1, method="circ", alpha=0.3), 0.001, 1.0, 1.0),
    "heavi_erfc": (dict(v_leak=0.2, v_th=0.9, v_reset=-0.1, method="heavi_erfc", alpha=1.5), 0.001, 1.0, 1.0),
    # voltages that float32 holds exactly (Norse's LIF layer starts at v_leak rounded to float32)
    "dyadic_voltages": (dict(v_leak=0.25, v_th=0.875, v_reset=-0.125), 0.001, 1.0, 1.0),
    "dyadic_tanh": (dict(v_leak=0.25, v_th=0.875, v_reset=-0.125, method="tanh", alpha=2.0), 0.001, 1.0, 1.0),
}
#: LIFBoxCell settings: (LIFBoxParameters fields, dt, input offset, input scale).
BOX = {
    "defaults": (dict(), 0.001, 3.0, 3.0),
    "voltages": (dict(v_leak=0.2, v_th=0.9, v_reset=-0.1), 0.001, 3.0, 3.0),
    "tau_dt": (dict(tau_mem_inv=250.0), 0.002, 1.0, 1.5),
    "odd_tau": (dict(tau_mem_inv=77.7), 0.001, 3.0, 3.0),
    "subtract": (dict(reset_method=reset_subtract), 0.001, 3.0, 3.0),
    "subtract_th": (dict(v_th=0.7, reset_method=reset_subtract), 0.001, 3.0, 3.0),
    "triangle": (dict(v_leak=0.2, v_th=0.9, v_reset=-0.1, method="triangle", alpha=0.5), 0.001, 3.0, 3.0),
    "tanh": (dict(method="tanh", alpha=2.0), 0.001, 3.0, 3.0),
    "circ": (dict(method="circ", alpha=0.3), 0.001, 3.0, 3.0),
    "heavi_erfc": (dict(method="heavi_erfc", alpha=1.5), 0.001, 3.0, 3.0),
}
_NUMERIC = ("tau_syn_inv", "tau_mem_inv", "v_leak", "v_th", "v_reset", "alpha")
_DEFAULTS = dict(tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, v_th=1.0, v_reset=0.0, alpha=100.0)


def _params(cls, fields, dtype):
    """Norse parameters with every numeric field a 0-dim tensor of ``dtype`` (float32 is Norse's default)."""
    names = [f for f in _NUMERIC if f in cls._fields]
    values = {f: torch.tensor(fields.get(f, _DEFAULTS[f]), dtype=dtype) for f in names}
    values.update({k: v for k, v in fields.items() if k not in _NUMERIC})
    return cls(**values)


def _cell(name, pdtype=F32):
    fields, dt, _, _ = CELL[name]
    return nt.LIFCell(_params(nt.LIFParameters, fields, pdtype), dt=dt)


def _box(name, pdtype=F32):
    fields, dt, _, _ = BOX[name]
    return nt.LIFBoxCell(_params(nt.LIFBoxParameters, fields, pdtype), dt=dt)


def _input(setting, shape, dtype, seed=0):
    _, _, offset, scale = setting
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale + offset).to(dtype)


def _assert_same_bptt(z, z_ref, x, w):
    """Our spikes ``z`` equal Norse's ``z_ref`` exactly, and the gradients of Σ w·z w.r.t. ``x`` agree."""
    (g_ref,) = torch.autograd.grad((z_ref * w).sum(), x, retain_graph=True)
    assert torch.equal(z, z_ref)
    (g,) = torch.autograd.grad((z * w).sum(), x)
    assert g.abs().sum() > 0
    assert_close(g, g_ref)


def _norse_run(cell, x_seq):
    state, zs = None, []
    for t in range(x_seq.shape[0]):
        z, state = cell(x_seq[t], state)
        zs.append(z)
    return torch.stack(zs), state


def _our_run(dyn, x_seq):
    state, zs = dyn.init_state(x_seq[0]), []
    for t in range(x_seq.shape[0]):
        z, state = dyn.step(x_seq[t], state, ())
        zs.append(z)
    return torch.stack(zs), state


# -- (a) forward ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CELL))
@pytest.mark.parametrize("xdtype,pdtype", [(F32, F32), (F64, F64), (F64, F32)], ids=["x32-p32", "x64-p64", "x64-p32"])
def test_lif_cell_forward_is_norses(name, xdtype, pdtype):
    cell = _cell(name, pdtype)
    spec = cell_spec(cell)
    assert isinstance(spec.dynamics, CurrentLIFDynamics) and spec.time_steps is None
    x = _input(CELL[name], (12, 3, 40), xdtype)
    with torch.no_grad():
        z_ref, s_ref = _norse_run(cell, x)
        z, (v, i) = _our_run(spec.dynamics, x)
        assert torch.equal(spec(x), z_ref)
    assert 0.02 < z_ref.mean() < 0.6
    assert torch.equal(z, z_ref)
    if xdtype == pdtype or xdtype == F32:
        # the same coefficients (dt rounded as Norse's dt·τ⁻¹ rounds it): bit for bit
        assert torch.equal(v, s_ref.v) and torch.equal(i, s_ref.i)
    else:
        # float64 input, float32 constants: Norse's dt·τ⁻¹ is a float32 product, ours exact (≤ 1 float32 ulp)
        torch.testing.assert_close(v, s_ref.v, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(i, s_ref.i, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["defaults", "dyadic_voltages", "taus_dt", "dyadic_tanh"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_lif_layer_forward_and_bptt_are_norses(name, dtype):
    fields, dt, _, _ = CELL[name]
    lif = nt.LIF(_params(nt.LIFParameters, fields, dtype), dt=dt)
    spec = neuron_spec(lif)
    assert spec == NeuronSpec(cell_spec(_cell(name, dtype)).dynamics)
    assert not is_single_step(lif)
    x = _input(CELL[name], (10, 2, 30), dtype).requires_grad_()
    w = torch.randn(10, 2, 30, dtype=dtype, generator=torch.Generator().manual_seed(5))
    z_ref, state = lif(x)
    assert isinstance(state, nt.LIFFeedForwardState)
    _assert_same_bptt(spec(x), z_ref, x, w)


def test_lif_layer_starts_at_v_leak_rounded_to_float32():
    # Norse's LIF starts at torch.full(..., v_leak, dtype=float32): a float64 v_leak of 0.2 starts at
    # float32(0.2); the family starts at v_leak itself. Spikes agree; gradients to ~1e-5 relative.
    lif = nt.LIF(_params(nt.LIFParameters, dict(v_leak=0.2, v_th=0.9, v_reset=-0.1), F64))
    x = _input(CELL["voltages"], (10, 2, 30), F64).requires_grad_()
    z_ref, _ = lif(x)
    (g_ref,) = torch.autograd.grad(z_ref.sum(), x)
    z = neuron_spec(lif)(x)
    (g,) = torch.autograd.grad(z.sum(), x)
    assert torch.equal(z, z_ref)
    assert not torch.equal(g, g_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("name", list(BOX))
@pytest.mark.parametrize("xdtype,pdtype", [(F32, F32), (F64, F64), (F64, F32)], ids=["x32-p32", "x64-p64", "x64-p32"])
def test_lif_box_cell_forward_is_norses(name, xdtype, pdtype):
    cell = _box(name, pdtype)
    dyn = cell_spec(cell).dynamics
    assert isinstance(dyn, LIFDynamics) and dyn.decay_input and dyn.strict and not dyn.detach_reset
    x = _input(BOX[name], (12, 3, 40), xdtype)
    with torch.no_grad():
        z_ref, s_ref = _norse_run(cell, x)
        z, (v,) = _our_run(dyn, x)
    assert 0.02 < z_ref.mean() < 0.8
    assert torch.equal(z, z_ref)
    v = v + dyn.v_rest          # the family measures the membrane from rest
    if pdtype == F32 and dyn.v_rest == 0.0:
        # a = dt·τ⁻¹ is Norse's float32 product, so 1 − (1 − a) = a exactly: bit for bit
        assert torch.equal(v, s_ref.v)
    else:
        # λ = 1 − a then 1 − λ, and the shift to rest: rounding-level
        assert_close(v, s_ref.v.to(v.dtype))


def test_lif_box_cell_maps_onto_the_lif_family():
    cell = nt.LIFBoxCell(_params(nt.LIFBoxParameters, dict(v_leak=0.2, v_th=0.9, v_reset=-0.1, method="tanh",
                                                            alpha=2.0), F64), dt=0.002)
    assert cell_spec(cell).dynamics == LIFDynamics(decay=1 - 0.002 * 100.0, decay_input=True, v_threshold=0.9,
                                                   v_reset=-0.1, detach_reset=False, surrogate=Tanh(2.0),
                                                   v_rest=0.2, strict=True)
    soft = cell_spec(nt.LIFBoxCell(nt.LIFBoxParameters(reset_method=reset_subtract)))
    assert soft.dynamics.v_reset is None and soft.dynamics.v_rest == 0.0
    # float32 tensors (Norse's defaults): a is Norse's own float32 product dt·τ⁻¹
    assert 1 - cell_spec(nt.LIFBoxCell()).dynamics.decay == float(0.001 * torch.tensor(100.0))
    # plain floats work too (Norse's LIFBoxCell then needs an explicit initial state)
    floats = nt.LIFBoxCell(nt.LIFBoxParameters(tau_mem_inv=100.0, v_leak=0.0, v_th=1.0, v_reset=0.0, alpha=100.0))
    assert cell_spec(floats).dynamics.decay == 1 - 0.1


def test_strictly_above_the_threshold():
    # a = dt·τ_mem⁻¹ = 0.5 and (LIFCell) b = dt·τ_syn⁻¹ = 1: the first membrane is exactly V_th = 1 at x = 2
    x = torch.tensor([[2.0, 2.0 + 1e-12, 1.0]], dtype=F64)
    cell = nt.LIFCell(_params(nt.LIFParameters, dict(tau_syn_inv=1.0, tau_mem_inv=0.5), F64), dt=1.0)
    box = nt.LIFBoxCell(_params(nt.LIFBoxParameters, dict(tau_mem_inv=0.5), F64), dt=1.0)
    for m in (cell, box):
        z_ref, s_ref = _norse_run(m, x)
        assert z_ref.tolist() == [[0.0, 1.0, 0.0]] and s_ref.v[0].item() == 1.0
        assert torch.equal(cell_spec(m)(x), z_ref)
    # ≥ would fire at the tie
    assert LIFDynamics(decay=0.5, decay_input=True, v_reset=0.0).multistep(x, ())[0, 0] == 1.0


# -- (b) BPTT --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CELL))
def test_lif_cell_bptt_is_norses(name):
    cell = _cell(name, F64)
    spec = cell_spec(cell, time_steps=10)       # a cell folded over T steps: [T·B, ...]
    x = _input(CELL[name], (10, 3, 30), F64).requires_grad_()
    w = torch.randn(10, 3, 30, dtype=F64, generator=torch.Generator().manual_seed(3))
    z_ref, _ = _norse_run(cell, x)
    _assert_same_bptt(spec(x.reshape(30, 30)).reshape(10, 3, 30), z_ref, x, w)


@pytest.mark.parametrize("name", list(BOX))
def test_lif_box_cell_bptt_is_norses(name):
    cell = _box(name, F64)
    spec = cell_spec(cell)
    x = _input(BOX[name], (10, 3, 30), F64).requires_grad_()
    w = torch.randn(10, 3, 30, dtype=F64, generator=torch.Generator().manual_seed(3))
    z_ref, _ = _norse_run(cell, x)
    _assert_same_bptt(spec(x), z_ref, x, w)


def test_bptt_in_float32_with_norses_default_constants():
    cell = nt.LIFCell()
    x = _input(CELL["defaults"], (10, 3, 30), F32).requires_grad_()
    z_ref, _ = _norse_run(cell, x)
    (g_ref,) = torch.autograd.grad(z_ref.sum(), x)
    z = cell_spec(cell)(x)
    assert torch.equal(z, z_ref)
    (g,) = torch.autograd.grad(z.sum(), x)
    assert_close(g, g_ref)


# -- (c) eligibility -------------------------------------------------------------------------------------
def _norse_eligibility(cell, c, T):
    c = c.clone().requires_grad_()
    z, _ = _norse_run(cell, c.expand(T, *c.shape))
    (g,) = torch.autograd.grad(z.mean(0).sum(), c)
    return z.detach(), g


@pytest.mark.parametrize("kind,name", [("cell", n) for n in CELL] + [("box", n) for n in BOX])
@pytest.mark.parametrize("T", [1, 12])
def test_eligibility_equals_norses_autograd_constant_input(kind, name, T):
    cell = _cell(name, F64) if kind == "cell" else _box(name, F64)
    c = _input(CELL[name] if kind == "cell" else BOX[name], (3, 50), F64, seed=T)
    z_ref, e_ref = _norse_eligibility(cell, c, T)
    spikes, r, e = NeuronSpec(cell_spec(cell).dynamics).spike_pass(c.expand(T, *c.shape))
    assert torch.equal(spikes, z_ref)
    assert_close(r[0], z_ref.mean(0))
    assert_close(e[0], e_ref)
    if T == 12:
        assert z_ref.any() and e_ref.abs().sum() > 0


# -- surrogates ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,ours", [("super", lambda a: SuperSpike(1.0, 1.0)), ("triangle", Tent),
                                         ("tanh", Tanh), ("circ", Circ), ("heavi_erfc", HeaviErfc)])
@pytest.mark.parametrize("alpha", [0.3, 2.0, 100.0])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_surrogates_are_norses(method, ours, alpha, dtype):
    a = torch.tensor(alpha, dtype=dtype)           # Norse's alpha, in the input's dtype
    assert adapter.surrogate_of(method, a) == ours(float(a))
    x = (torch.arange(-400, 401, dtype=F64) / 200).to(dtype).requires_grad_()
    z = threshold(x, method, a)
    (g_ref,) = torch.autograd.grad(z.sum(), x)
    assert torch.equal(z, (x > 0).to(dtype))
    assert torch.equal(ours(float(a)).grad(x.detach()), g_ref)


def test_surrogate_alpha_of_float32_on_float64_input_is_rounding_level():
    # Norse squares a float32 alpha in float32 (Circ); ours squares the same value exactly
    a = torch.tensor(0.3)
    x = (torch.arange(-400, 401, dtype=F64) / 200).requires_grad_()
    (g_ref,) = torch.autograd.grad(threshold(x, "circ", a).sum(), x)
    torch.testing.assert_close(Circ(float(a)).grad(x.detach()), g_ref, rtol=1e-6, atol=0)


# -- registration and call forms -------------------------------------------------------------------------
def test_registration_and_call_forms():
    form = CallForm(state_args=1, outputs=("spikes", "state"))
    for m in (nt.LIFCell(), nt.LIFBoxCell()):
        assert is_single_step(m) and call_form(m) == form and neuron_spec(m) is None
        assert call_form(m).at_rest(None) and not call_form(m).at_rest(nt.LIFBoxFeedForwardState(torch.zeros(2)))
    lif = nt.LIF()
    assert not is_single_step(lif) and call_form(lif) == form and cell_spec(lif) is None
    assert "norse" in interop._loaded
    assert cell_spec(nt.LIFCell(), time_steps=4).time_steps == 4


@pytest.mark.parametrize("make", [lambda: nt.LICell(), lambda: nt.LI(), lambda: nt.LIBoxCell(),
                                  lambda: nt.LILinearCell(3, 4)], ids=["LICell", "LI", "LIBoxCell", "LILinearCell"])
def test_leaky_integrators_are_refused_not_traced_into(make):
    """A voltage readout: not supported yet, and refused (traced into, its loop would be misread)."""
    assert "non-spiking leaky integrator" in _refusal(make())


# -- (d) refusals ----------------------------------------------------------------------------------------
def _refusal(m):
    with pytest.raises(UnsupportedNeuron) as info:
        if is_single_step(m):
            cell_spec(m)
        else:
            neuron_spec(m)
    return str(info.value)


class _MyLIFCell(nt.LIFCell):
    pass


def _replaced_step(m):
    m.activation = lambda x, s, p, dt: (x, s)
    return m


@pytest.mark.parametrize("make,message", [
    (lambda: _MyLIFCell(), "subclass of Norse's LIFCell"),
    (lambda: nt.LIFCell(nt.LIFParameters(v_th=torch.tensor([1.0, 1.2]))), "v_th is a tensor of shape (2,)"),
    (lambda: nt.LIF(nt.LIFParameters(v_leak=torch.zeros(3))), "v_leak is a tensor of shape (3,)"),
    (lambda: nt.LIFCell(nt.LIFParameters(tau_mem_inv=torch.nn.Parameter(torch.tensor(100.0)))),
     "tau_mem_inv requires grad"),
    (lambda: nt.LIFCell(nt.LIFParameters(method="triangle", alpha=torch.tensor([1.0, 2.0]))),
     "alpha is a tensor of shape (2,)"),
    (lambda: nt.LIFCell(nt.LIFParameters(method="heaviside")), "method='heaviside' gives the spikes no gradient"),
    (lambda: nt.LIFCell(nt.LIFParameters(method="adjoint")), "method='adjoint'"),
    (lambda: nt.LIF(nt.LIFParameters(method="adjoint")), "method='adjoint'"),
    (lambda: nt.LIFCell(nt.LIFParameters(method="fancy")), "method 'fancy' is not a surrogate"),
    (lambda: _replaced_step(nt.LIFCell()), "its step function is <lambda>"),
    (lambda: nt.LIFCell(dt=torch.tensor([1e-3, 2e-3])), "dt is a tensor of shape (2,)"),
    (lambda: nt.LIF(record_states=True), "record_states=True"),
    (lambda: nt.LIFBoxCell(nt.LIFBoxParameters(v_leak=torch.tensor(0.2), reset_method=reset_subtract)),
     "reset_subtract subtracts v_th=1"),
    (lambda: nt.LIFBoxCell(nt.LIFBoxParameters(reset_method=lambda z, v, r, th: v)),
     "neither Norse's reset_value nor reset_subtract"),
    (lambda: nt.LIFBoxCell(nt.LIFBoxParameters(method="heaviside")), "method='heaviside'"),
    (lambda: nt.LIFBoxCell(nt.LIFBoxParameters(v_th=torch.ones(4))), "v_th is a tensor of shape (4,)"),
], ids=["subclass", "tensor_v_th", "LIF_tensor_v_leak", "learned_tau", "tensor_alpha", "heaviside", "adjoint_cell",
        "adjoint_LIF", "unknown_method", "replaced_step", "tensor_dt", "record_states", "subtract_with_leak",
        "custom_reset", "box_heaviside", "box_tensor_v_th"])
def test_refusals(make, message):
    assert message in _refusal(make())


@pytest.mark.parametrize("make", [lambda: nt.LIFRecurrentCell(3, 4), lambda: nt.LIFRecurrent(3, 4),
                                  lambda: nt.LSNNRecurrentCell(3, 4), lambda: nt.LIFAdExRecurrent(3, 4),
                                  lambda: nt.CobaLIFCell(3, 4), lambda: nt.LIFCorrelation(3, 4)],
                         ids=["LIFRecurrentCell", "LIFRecurrent", "LSNNRecurrentCell", "LIFAdExRecurrent",
                              "CobaLIFCell", "LIFCorrelation"])
def test_recurrent_neurons_are_refused(make):
    message = _refusal(make())
    assert message.startswith("recurrent: ") and "outside the rate-based method" in message


def test_recurrent_sequential_is_refused():
    message = _refusal(nt.RecurrentSequential(torch.nn.Linear(2, 2), nt.LIFBoxCell()))
    assert message.startswith("recurrent: RecurrentSequential feeds its output back")


@pytest.mark.parametrize("make", [lambda: nt.LSNNCell(), lambda: nt.LIFAdExCell(), lambda: nt.LIFExCell(),
                                  lambda: nt.LIFRefracCell(), lambda: nt.IAFCell(), lambda: nt.LIFAdEx()],
                         ids=["LSNNCell", "LIFAdExCell", "LIFExCell", "LIFRefracCell", "IAFCell", "LIFAdEx"])
def test_other_spiking_neurons_are_refused(make):
    assert "has no neuron family here (supported: LIFCell, LIF, LIFBoxCell)" in _refusal(make())

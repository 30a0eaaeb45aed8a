"""Norse 1.1 (``norse.torch``): its ``LIFCell``, ``LIF`` and ``LIFBoxCell`` neurons, exactly as Norse
computes them.

What maps to what:

- ``LIFCell(p=LIFParameters(tau_syn_inv, tau_mem_inv, v_leak, v_th, v_reset, method, alpha), dt)``
  (one step per call: ``z, s = cell(x, s)``, s None at the first step) and ``LIF(p, dt)`` (multi-step:
  ``z, s = lif(x)`` on ``[T, B, ...]``): ``families.CurrentLIFDynamics`` (a synaptic current feeding the
  membrane; its docstring has the equations: strict ``>``, hard reset to v_reset not detached, from
  v = v_leak, i = 0).
- ``LIFBoxCell(p=LIFBoxParameters(tau_mem_inv, v_leak, v_th, v_reset, method, alpha, reset_method), dt)``:
  ``families.LIFDynamics`` with λ = 1 − a (a = dt·tau_mem_inv, computed as Norse computes it, in the
  parameter's dtype), ``decay_input=True``, resting at v_leak, ``strict=True``, the reset not detached;
  ``reset_value`` → a hard reset to v_reset, ``reset_subtract`` (ṽ − z·v_th) → the soft reset (only where
  v_leak = 0: the family's soft reset subtracts V_th − v_leak).
- The constants are read from ``m.p`` and ``m.dt``: Python numbers or 0-dim tensors (one value for the
  layer). The coefficient dt·τ⁻¹ Norse computes in the dtype of its τ⁻¹ tensors (float32 unless given
  otherwise), i.e. from dt rounded to that dtype: the spec's ``dt`` is that rounded dt, so that a float32
  forward is bit for bit Norse's.
- Surrogates (``p.method``, ``p.alpha``): ``"super"`` → ``SuperSpike(1, 1)`` (Norse ignores alpha);
  ``"triangle"`` → ``Tent(α)``; ``"tanh"`` → ``Tanh(α)``; ``"circ"`` → ``Circ(α)``; ``"heavi_erfc"`` →
  ``HeaviErfc(α)``.

Refused, with the reason: subclasses and instances whose step function was replaced, a constant that
is a tensor with more than one value or one that requires grad (a learned constant: the compiled
neuron treats them as constants), ``method="heaviside"`` (no gradient), ``method="adjoint"`` (its
backward is the adjoint equations, not a surrogate), any other method, ``LIF(record_states=True)`` (it
returns every step's state, which the compiled neuron does not compute), a ``LIFBoxCell`` reset other
than ``reset_value``/``reset_subtract``, the recurrent neurons (``LIFRecurrent*`` and every
``SNNRecurrent``/``SNNRecurrentCell``, ``CobaLIFCell``, ``LIFCorrelation``, ``RecurrentSequential``) and
Norse's other spiking neurons (``LIFAdEx*``, ``LIFEx*``, ``LIFRefracCell``, ``IAF*``, ``Izhikevich*``,
``LSNN*``). The non-spiking leaky integrators (``LICell``, ``LI``, ``LIBoxCell``,
``LILinearCell``) are refused too: their output is a membrane voltage (not supported yet).
"""
from __future__ import annotations

from numbers import Number

import torch

from ..families import CurrentLIFDynamics, LIFDynamics
from ..nn import surrogate as ours
from ..nn.spec import CallForm, NeuronSpec, register_neuron
from . import UnsupportedNeuron

try:
    import norse.torch as _nt
    from norse.torch.functional import lif as _f_lif
    from norse.torch.functional import lif_box as _f_lif_box
    from norse.torch.functional import reset as _f_reset
    from norse.torch.module import snn as _snn
    from norse.torch.module import sequential as _sequential
except ImportError:          # Norse is not installed, or a class only claims to come from it
    _nt = None

__all__ = ["surrogate_of"]

_METHODS = ("super", "triangle", "tanh", "circ", "heavi_erfc")

_RECURRENT = ("recurrent: it feeds a step's spikes into the next step through its recurrent weights, outside "
              "the rate-based method, whose eligibility needs an elementwise neuron; use LIFCell/LIF and write "
              "the recurrent connection as a layer of the network")

#: Norse's other spiking neurons: no family here (yet).
_OTHER = ("IAFCell", "IAF", "IzhikevichCell", "Izhikevich", "LIFAdExCell", "LIFAdEx", "LIFAdExRefracCell",
          "LIFExCell", "LIFEx", "LIFRefracCell", "LSNNCell", "LSNN")
#: Recurrent neurons that are not SNNRecurrent/SNNRecurrentCell subclasses (input and recurrent weights).
_OTHER_RECURRENT = ("CobaLIFCell", "LIFCorrelation")


def _constant(value, what: str) -> float:
    """A Norse constant as a float: a Python number or a 0-dim tensor that does not require grad."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise UnsupportedNeuron(f"its {what} is a tensor of shape {tuple(value.shape)}; only one value for the "
                                    f"whole layer (a number or a 0-dim tensor) is supported")
        if value.requires_grad:
            raise UnsupportedNeuron(f"its {what} requires grad (a learned constant); the compiled neuron treats "
                                    f"its constants as constants")
        if value.dtype == torch.bool or value.dtype.is_complex:
            raise UnsupportedNeuron(f"its {what} is a {value.dtype} tensor")
        return float(value.detach().cpu())
    if isinstance(value, Number) and not isinstance(value, (bool, complex)):
        return float(value)
    raise UnsupportedNeuron(f"its {what} is {value!r}, not a number or a 0-dim tensor")


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


def _field(p, name: str):
    """A field of a Norse parameter namedtuple (UnsupportedNeuron if the object has none)."""
    try:
        return getattr(p, name)
    except AttributeError:
        raise UnsupportedNeuron(f"its parameters {type(p).__name__} have no {name!r}") from None


def surrogate_of(method, alpha) -> ours.Surrogate:
    """Our surrogate for Norse's ``threshold(x, method, alpha)``, or UnsupportedNeuron."""
    if method == "heaviside":
        raise UnsupportedNeuron("method='heaviside' gives the spikes no gradient at all; the rate-based method "
                                "needs a surrogate (use 'super', 'triangle', 'tanh', 'circ' or 'heavi_erfc')")
    if method == "adjoint":
        raise UnsupportedNeuron("method='adjoint' trains with the adjoint (EventProp-like) equations, not a "
                                "surrogate gradient; it has no rate-based equivalent")
    if method not in _METHODS:
        raise UnsupportedNeuron(f"its method {method!r} is not a surrogate Norse's threshold knows "
                                f"(supported: {', '.join(_METHODS)})")
    if method == "super":
        return ours.SuperSpike(1.0, 1.0)      # Norse's SuperSpike ignores alpha: 1/(|x| + 1)²
    a = _constant(alpha, "alpha")
    return {"triangle": ours.Tent, "tanh": ours.Tanh, "circ": ours.Circ, "heavi_erfc": ours.HeaviErfc}[method](a)


def _check_plain(m, cls, activation) -> None:
    if type(m) is not cls:
        raise UnsupportedNeuron(f"it is a subclass of Norse's {cls.__name__}, which may change its dynamics; "
                                f"register it with ratebp_compile.nn.register_neuron")
    if getattr(m, "activation", None) is not activation:
        name = getattr(getattr(m, "activation", None), "__name__", repr(getattr(m, "activation", None)))
        raise UnsupportedNeuron(f"its step function is {name}, not Norse's {activation.__name__}"
                                + (" (method='adjoint' was chosen at construction)" if "adjoint" in name else ""))


def _rounded_dt(dt, *taus) -> float:
    """dt as Norse's products ``dt * tau_inv`` see it: Norse computes them in the dtype the operands promote to
    (float32 for a Python dt and float32 τ⁻¹ tensors), i.e. from dt rounded to that dtype. With that dt the
    spec's dt·τ⁻¹, exact in double, rounds to the input's dtype as Norse's product does (bit for bit in
    float32). Where the two products promote differently, or nothing is a tensor, dt as it is."""
    value = _constant(dt, "dt")
    if not any(isinstance(v, torch.Tensor) for v in (dt,) + taus):
        return value
    dtypes = {torch.result_type(_detached(dt), _detached(t)) for t in taus}
    if len(dtypes) != 1:
        return value
    (dtype,) = dtypes
    return float(torch.tensor(value, dtype=dtype)) if dtype.is_floating_point else value


def _current_lif(m) -> CurrentLIFDynamics:
    p = m.p
    values = {name: _constant(_field(p, name), name) for name in ("tau_syn_inv", "tau_mem_inv", "v_leak", "v_th",
                                                                   "v_reset")}
    return CurrentLIFDynamics(**values, dt=_rounded_dt(m.dt, p.tau_syn_inv, p.tau_mem_inv),
                              surrogate=surrogate_of(_field(p, "method"), _field(p, "alpha")))


def _refuse_adjoint(m) -> None:
    """``method="adjoint"`` chose the adjoint step at construction: say so before anything else."""
    if getattr(getattr(m, "p", None), "method", None) == "adjoint":
        surrogate_of("adjoint", None)


def _lif_cell(m) -> NeuronSpec:
    _refuse_adjoint(m)
    _check_plain(m, _nt.LIFCell, _f_lif.lif_feed_forward_step)
    return NeuronSpec(_current_lif(m))


def _lif(m) -> NeuronSpec:
    _refuse_adjoint(m)
    _check_plain(m, _nt.LIF, _f_lif.lif_feed_forward_step)
    if getattr(m, "record_states", False):
        raise UnsupportedNeuron("record_states=True returns the membrane and current of every step, which the "
                                "compiled neuron does not compute")
    return NeuronSpec(_current_lif(m))


def _lif_box_cell(m) -> NeuronSpec:
    _check_plain(m, _nt.LIFBoxCell, _f_lif_box.lif_box_feed_forward_step)
    p = m.p
    surrogate = surrogate_of(_field(p, "method"), _field(p, "alpha"))
    v_leak, v_th = _constant(_field(p, "v_leak"), "v_leak"), _constant(_field(p, "v_th"), "v_th")
    reset_method = _field(p, "reset_method")
    if reset_method is _f_reset.reset_value:
        v_reset = _constant(_field(p, "v_reset"), "v_reset")
    elif reset_method is _f_reset.reset_subtract:
        if v_leak != 0.0:
            raise UnsupportedNeuron(f"reset_subtract subtracts v_th={v_th:g} from the membrane, which with "
                                    f"v_leak={v_leak:g} is not the soft reset of a neuron resting at v_leak (that "
                                    f"subtracts v_th - v_leak)")
        v_reset = None
    else:
        name = getattr(reset_method, "__qualname__", repr(reset_method))
        raise UnsupportedNeuron(f"its reset_method {name} is neither Norse's reset_value nor reset_subtract")
    # a = dt·tau_mem_inv exactly as Norse computes it (in the dtype dt and tau_mem_inv promote to); then
    # 1 − λ = 1 − (1 − a) is a again wherever 1 − a is exact in double (any float32 a ≥ 2⁻³⁰)
    dt, tau = m.dt, _field(p, "tau_mem_inv")
    _constant(dt, "dt"), _constant(tau, "tau_mem_inv")
    a = _constant(_detached(dt) * _detached(tau), "dt·tau_mem_inv")
    dynamics = LIFDynamics(decay=1.0 - a, decay_input=True, v_threshold=v_th, v_reset=v_reset, detach_reset=False,
                           surrogate=surrogate, v_rest=v_leak, strict=True)
    return NeuronSpec(dynamics)


def _recurrent(m) -> NeuronSpec:
    raise UnsupportedNeuron(_RECURRENT)


def _recurrent_sequential(m) -> NeuronSpec:
    raise UnsupportedNeuron("recurrent: RecurrentSequential feeds its output back into the next step's input, "
                            "outside the rate-based method, whose eligibility needs an elementwise neuron; write the "
                            "network with SequentialState and any recurrent connection as a layer")


def _other(m) -> NeuronSpec:
    raise UnsupportedNeuron(f"Norse's {type(m).__name__} has no neuron family here "
                            f"(supported: LIFCell, LIF, LIFBoxCell)")


def _leaky_integrator(m) -> NeuronSpec:
    raise UnsupportedNeuron(f"Norse's {type(m).__name__} is a non-spiking leaky integrator (a readout whose output is "
                            f"a membrane voltage): not supported yet; read out spike counts or rates through a layer "
                            f"instead")


def _single_step(m) -> bool:
    return True


def _call_form(m) -> CallForm:
    """``z, s = cell(x, s)`` (s None at the first step); ``z, s = lif(x)`` or ``lif(x, None)``."""
    return CallForm(state_args=1, outputs=("spikes", "state"))


if _nt is not None:
    register_neuron(_nt.LIFCell, _lif_cell, single_step=_single_step, call_form=_call_form)
    register_neuron(_nt.LIFBoxCell, _lif_box_cell, single_step=_single_step, call_form=_call_form)
    register_neuron(_nt.LIF, _lif, call_form=_call_form)
    # every recurrent cell and layer (LIFRecurrent*, LIFAdExRecurrent*, LSNNRecurrent*, LIFMCRecurrentCell, ...)
    # is found along its MRO
    register_neuron(_snn.SNNRecurrentCell, _recurrent, single_step=_single_step, call_form=_call_form)
    register_neuron(_snn.SNNRecurrent, _recurrent, call_form=_call_form)
    register_neuron(_sequential.RecurrentSequential, _recurrent_sequential)
    for _name in ("LICell", "LIBoxCell", "LILinearCell", "LI", "LIBox"):
        _cls = getattr(_nt, _name, None)
        if isinstance(_cls, type) and issubclass(_cls, torch.nn.Module):
            register_neuron(_cls, _leaky_integrator, single_step=None if issubclass(_cls, _snn.SNN) else _single_step,
                            call_form=_call_form)
    for _names, _refuse in ((_OTHER, _other), (_OTHER_RECURRENT, _recurrent)):
        for _name in _names:
            _cls = getattr(_nt, _name, None)
            if isinstance(_cls, type) and issubclass(_cls, torch.nn.Module):
                _cell = not issubclass(_cls, _snn.SNN)        # everything but the multi-step layers
                register_neuron(_cls, _refuse, single_step=_single_step if _cell else None, call_form=_call_form)

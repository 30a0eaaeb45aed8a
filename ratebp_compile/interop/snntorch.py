"""snnTorch 1.0: its ``Leaky`` and ``Synaptic`` neurons, exactly as snnTorch computes them.

What maps to what:

- ``Leaky(beta, threshold, spike_grad, reset_mechanism, reset_delay, graded_spikes_factor, ...)``:
  ``families.LeakyDynamics``; ``Synaptic(alpha, beta, ...)``: ``families.SynapticDynamics`` (their
  docstrings have the equations: r_t from the stored membrane, detached; strict ``>``; β and α clamped
  to [0, 1]; the immediate reset of ``reset_delay=False`` not detached; Synaptic's zero reset zeroes
  the whole candidate membrane). Both are single-step neurons (a cell: one step per call, the state
  kept in the module's ``mem``/``syn`` buffers) — folded with the loop that calls them.
- beta, alpha, threshold, graded_spikes_factor: a learnable ``nn.Parameter`` (``learn_beta=True``, ...)
  or a buffer with one value per element (``beta=torch.rand(K)``) is a parameter of the spec
  (``param_names``: the module attributes, passed as tensors); a 0-dim buffer is a float.
- The update is the one snnTorch chose at construction (``state_function``): ``_base_sub`` →
  "subtract", ``_base_zero`` → "zero", ``_base_int`` → "none".
- Surrogates, recognised from ``spike_grad``'s closure (its qualname and closure values):
  ``atan(α)`` → ``ATan(α)``; ``sigmoid(k)`` → ``Sigmoid(k)``; ``fast_sigmoid(k)`` →
  ``SuperSpike(1, k)``; ``triangular(c)`` → ``SignedStep(c)`` (snnTorch's "triangular" backward is a
  signed step); ``straight_through_estimator()`` → ``StraightThrough()``; ``heaviside()`` →
  ``StepGrad()``.
- Call forms: ``lif(x, mem)`` → ``(spk, mem)``; ``syn_lif(x, syn, mem)`` → ``(spk, syn, mem)``;
  ``init_hidden=True``: ``lif(x)`` → ``spk`` (or ``(spk, mem)`` / ``(spk, syn, mem)`` with
  ``output=True``). A state argument means "from rest" when it is None or holds only zeros — what
  ``init_leaky()`` / ``reset_mem()`` / ``init_synaptic()`` return (``torch.zeros(0)`` on a fresh
  module, which snnTorch replaces by zeros shaped like the input).
- ``rc.nn.MultiStep(net)`` resets each neuron's own state buffers (not snnTorch's class-wide
  ``reset_hidden``, which zeroes every instance in the process).

Refused, with the reason: subclasses (e.g. ``DeltaLeaky``) and instances with replaced methods,
``inhibition=True`` (couples the neurons of a layer), ``state_quant``, ``surrogate_disable=True``,
a surrogate other than the six above (``custom_surrogate``, a lambda, ...), a ``state_function``
that disagrees with ``reset_mechanism_val`` (the ``reset_mechanism`` property was changed after
construction: snnTorch then applies one mode in the update and the other in the immediate reset),
the recurrent ``RLeaky`` and ``RSynaptic``, and snnTorch's other neurons (``Alpha``, ``Lapicque``,
``SLSTM``, ``LeakyParallel``, ...).
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Tuple

import torch
from torch import fx

from ..families import LeakyDynamics, SynapticDynamics
from ..nn import surrogate as ours
from ..nn.multistep import register_state_reset
from ..nn.spec import CallForm, NeuronSpec, register_neuron
from . import UnsupportedNeuron

try:
    import snntorch as _snn
    from snntorch import surrogate as _surrogate
except ImportError:          # snnTorch is not installed, or a class only claims to come from it
    _snn = None

__all__ = ["surrogate_of", "at_rest", "stored_at_rest"]

#: snnTorch's surrogate factories: (the autograd Function their closure calls, the closure's parameter,
#: our surrogate for that parameter).
_FACTORIES: Dict[str, Tuple[str, str, Callable[[float], ours.Surrogate]]] = {
    "atan": ("ATan", "alpha", lambda a: ours.ATan(a)),
    "sigmoid": ("Sigmoid", "slope", lambda k: ours.Sigmoid(k)),
    "fast_sigmoid": ("FastSigmoid", "slope", lambda k: ours.SuperSpike(1.0, k)),
    "triangular": ("Triangular", "threshold", lambda c: ours.SignedStep(c)),
    "straight_through_estimator": ("StraightThroughEstimator", "", lambda _: ours.StraightThrough()),
    "heaviside": ("Heaviside", "", lambda _: ours.StepGrad()),
}

#: Methods whose per-instance replacement would change the dynamics.
_METHODS = ("forward", "fire", "mem_reset", "_base_state_function", "_base_state_reset_zero", "_base_sub",
            "_base_zero", "_base_int")

_RECURRENT = ("it is recurrent: it feeds a step's spikes into the next step through a weight layer (its "
              "recurrent Linear/Conv2d or one-to-one weights), outside the rate-based method, whose "
              "eligibility needs an elementwise neuron; use snnTorch's Leaky/Synaptic and write the "
              "recurrent connection as a layer of the network")


def surrogate_of(fn) -> ours.Surrogate:
    """Our surrogate for a snnTorch ``spike_grad`` (the closure its surrogate factories return), or
    UnsupportedNeuron."""
    qualname = getattr(fn, "__qualname__", type(fn).__qualname__)
    factory, _, rest = qualname.partition(".")
    known = ", ".join(_FACTORIES)
    if getattr(fn, "__module__", None) != _surrogate.__name__ or rest != "<locals>.inner" or factory not in _FACTORIES:
        raise UnsupportedNeuron(f"its spike_grad {qualname} is not one of the snnTorch surrogates this compiler "
                                f"knows ({known}), so its gradient cannot be reproduced")
    cls_name, param, make = _FACTORIES[factory]
    try:
        closure = inspect.getclosurevars(fn)
    except TypeError as e:
        raise UnsupportedNeuron(f"its spike_grad {qualname} cannot be inspected ({e})") from None
    if closure.globals.get(cls_name) is not getattr(_surrogate, cls_name, None):
        raise UnsupportedNeuron(f"its spike_grad {qualname} does not call snnTorch's surrogate.{cls_name}")
    if not param:
        return make(None)
    try:
        value = float(closure.nonlocals[param])
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise UnsupportedNeuron(f"its spike_grad {qualname} has no numeric {param!r}") from None
    return make(value)


#: Graph calls whose result holds only zeros, whatever their arguments (a traced ``init_leaky()`` /
#: ``reset_mem()`` is ``zeros_like(<the module's buffer>)``).
_ZEROS_FUNCTIONS = (torch.zeros_like, torch.zeros)
_ZEROS_METHODS = ("new_zeros", "zero_")


def at_rest(value) -> bool:
    """Whether a state value handed to a first call means "from rest": None, a tensor holding only
    zeros (empty included: a fresh module's ``init_leaky()`` is ``torch.zeros(0)``, which snnTorch
    replaces by zeros shaped like the input), or a graph node that computes zeros (``zeros_like``,
    ``zeros``, ``new_zeros``, ``zero_``: ``init_leaky()`` / ``reset_mem()`` / ``init_synaptic()`` traced).
    A tensor whose values are unknown (fake or meta) is not."""
    if value is None:
        return True
    if isinstance(value, fx.Node):
        return (value.op == "call_function" and value.target in _ZEROS_FUNCTIONS) or \
            (value.op == "call_method" and value.target in _ZEROS_METHODS)
    if not isinstance(value, torch.Tensor):
        return False
    try:
        if value.numel() == 0:
            return True
        if value.device.type == "meta":
            return False
        return not bool(torch.count_nonzero(value.detach()))
    except Exception:          # a fake tensor, a symbolic size: the values are not known here
        return False


def _check_plain(m, cls) -> None:
    if type(m) is not cls:
        raise UnsupportedNeuron(f"it is a subclass of snnTorch's {cls.__name__} ({type(m).__qualname__}), which may "
                                f"change its dynamics; register it with ratebp_compile.nn.register_neuron")
    missing = [name for name in ("reset_delay", "state_function", "reset_mechanism_val", "graded_spikes_factor",
                                 "threshold", "beta") if not hasattr(m, name)]
    if missing:
        raise UnsupportedNeuron(f"it has no {', '.join(missing)}: this adapter follows snnTorch 1.0's neurons, and "
                                f"this one comes from another version")
    replaced = [name for name in _METHODS if name in vars(m)]
    if replaced:
        raise UnsupportedNeuron(f"its method(s) {', '.join(replaced)} were replaced on the instance, which may "
                                f"change its dynamics")
    if getattr(m, "surrogate_disable", False):
        raise UnsupportedNeuron("surrogate_disable=True makes its spike a plain comparison with no gradient (for "
                                "inference only); the compiled training step needs a surrogate gradient")
    if getattr(m, "inhibition", False):
        raise UnsupportedNeuron("inhibition=True lets only the neuron with the largest membrane of each row spike, "
                                "which couples the neurons of a layer; the rate-based method needs an elementwise "
                                "neuron")
    if getattr(m, "state_quant", False):
        raise UnsupportedNeuron("state_quant quantises its state at every step, which the compiled step does not "
                                "do")


def _reset_mode(m, cls) -> str:
    fn = getattr(m, "state_function", None)
    modes = {cls._base_sub: "subtract", cls._base_zero: "zero", cls._base_int: "none"}
    owner = getattr(fn, "__self__", None)
    # bound to this module (or to the module whose attributes it shares: the stand-in torch.compile's graphs
    # hold for a module, see torch._dynamo.utils.nn_module_proxy)
    if (owner is not m and getattr(owner, "__dict__", None) is not vars(m)) or \
            getattr(fn, "__func__", None) not in modes:
        raise UnsupportedNeuron("its state_function is not one of snnTorch's own updates (_base_sub, _base_zero, "
                                "_base_int) bound to it")
    mode = modes[fn.__func__]
    try:
        stored = ("subtract", "zero", "none")[int(m.reset_mechanism_val)]
    except (IndexError, TypeError, ValueError, RuntimeError):
        stored = None
    if stored != mode:
        raise UnsupportedNeuron(f"its update resets by {mode!r} (chosen when it was constructed) but its "
                                f"reset_mechanism_val says {stored!r}: reset_mechanism was changed after "
                                f"construction, and snnTorch then applies one mode in the update and the other in "
                                f"the reset_delay=False reset; construct the neuron with the reset_mechanism wanted")
    return mode


def _constants(m, names) -> Tuple[dict, Tuple[str, ...]]:
    """Each constant as a float (a 0-dim non-learnable buffer) or None (a parameter of the spec: a
    Parameter, a tensor requiring grad, or a tensor with one value per element), and the parameters'
    names."""
    values, params = {}, []
    for name in names:
        v = getattr(m, name)
        if isinstance(v, torch.Tensor):
            if isinstance(v, torch.nn.Parameter) or v.requires_grad or v.dim() > 0:
                if not v.dtype.is_floating_point:
                    raise UnsupportedNeuron(f"its {name} is a {v.dtype} tensor; a parameter must be floating-point")
                values[name] = None
                params.append(name)
                continue
            v = v.item()
        try:
            values[name] = float(v)
        except (TypeError, ValueError):
            raise UnsupportedNeuron(f"its {name} is {type(v).__name__}, not a number or tensor") from None
    return values, tuple(params)


def _spec(m, cls, family) -> NeuronSpec:
    _check_plain(m, cls)
    reset = _reset_mode(m, cls)
    surrogate = surrogate_of(m.spike_grad)
    values, params = _constants(m, family.CONSTANTS)
    dynamics = family(**values, reset=reset, reset_delay=bool(m.reset_delay), surrogate=surrogate, params=params)
    return NeuronSpec(dynamics, param_names=params)


def _leaky(m) -> NeuronSpec:
    return _spec(m, _snn.Leaky, LeakyDynamics)


def _synaptic(m) -> NeuronSpec:
    return _spec(m, _snn.Synaptic, SynapticDynamics)


def _recurrent(m) -> NeuronSpec:
    raise UnsupportedNeuron(_RECURRENT)


def _other(m) -> NeuronSpec:
    raise UnsupportedNeuron(f"snnTorch's {type(m).__name__} has no neuron family here (supported: Leaky, Synaptic)")


def stored_at_rest(m) -> bool:
    """Whether the state ``m`` holds (``mem``, and ``syn``/``spk`` where it has them) is at rest: empty
    (a fresh module) or zeros (after ``reset_mem()``, ``utils.reset`` or ``rc.nn.MultiStep``'s reset)."""
    return all(at_rest(getattr(m, name)) for name in ("spk", "syn", "mem") if name in m._buffers)


#: ``CallForm`` grew ``stored_at_rest`` (the state a call without state arguments starts from).
_HAS_STORED = "stored_at_rest" in getattr(CallForm, "__dataclass_fields__", {})


def _call_form(state_args: int, states_out: int):
    """``lif(x, *state)`` → ``(spk, *state)``; with ``init_hidden=True`` ``lif(x)`` → ``spk``, or the
    tuple with ``output=True``. A call without state arguments starts from the state the module holds
    (even with ``init_hidden=False``). (RLeaky/RSynaptic take the previous spikes as a state argument
    too but do not return them separately; they are refused anyway.)"""
    extra = dict(stored_at_rest=stored_at_rest) if _HAS_STORED else {}

    def form(m) -> CallForm:
        outputs = ("spikes",) + ("state",) * states_out
        if getattr(m, "init_hidden", False):
            return CallForm(state_args=0, outputs=outputs if getattr(m, "output", False) else (), at_rest=at_rest,
                            **extra)
        return CallForm(state_args=state_args, outputs=outputs, at_rest=at_rest, **extra)
    return form


def _state_reset(*names: str):
    def reset(m) -> None:
        for name in names:
            value = getattr(m, name, None)
            if isinstance(value, torch.Tensor):
                setattr(m, name, torch.zeros_like(value))
    return reset


def _single_step(m) -> bool:
    return True


if _snn is not None:
    # A neuron's class is looked up along its MRO, so snnTorch's other neurons (Alpha, Lapicque, SLSTM, ...)
    # meet the catch-all's refusal, and Leaky's subclasses (DeltaLeaky, ...) Leaky's subclass refusal.
    register_neuron(_snn.SpikingNeuron, _other, single_step=_single_step)
    if hasattr(_snn, "LeakyParallel"):
        register_neuron(_snn.LeakyParallel, _other)
    register_neuron(_snn.Leaky, _leaky, single_step=_single_step, call_form=_call_form(1, 1))
    register_neuron(_snn.Synaptic, _synaptic, single_step=_single_step, call_form=_call_form(2, 2))
    register_neuron(_snn.RLeaky, _recurrent, single_step=_single_step, call_form=_call_form(2, 1))
    register_neuron(_snn.RSynaptic, _recurrent, single_step=_single_step, call_form=_call_form(3, 2))
    register_state_reset(_snn.Leaky, _state_reset("mem"))
    register_state_reset(_snn.Synaptic, _state_reset("syn", "mem"))
    register_state_reset(_snn.RLeaky, _state_reset("spk", "mem"))
    register_state_reset(_snn.RSynaptic, _state_reset("spk", "syn", "mem"))

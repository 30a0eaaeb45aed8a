"""SpikingJelly's LIF, IF and ParametricLIF neurons: 2.x (``spikingjelly.activation_based``) and 0.0.0.0.14
(``spikingjelly.clock_driven``, the API of the rate-based paper's code: ``LIFNode`` & co. take one step per
call, ``MultiStepLIFNode`` & co. the sequence).

What maps to what (``docs/porting.md`` has the table and the defaults that differ from ``rc.nn``):

- ``LIFNode(tau, decay_input, v_threshold, v_reset, surrogate_function, detach_reset, step_mode)``:
  the LIF family with λ = 1 − 1/τ, resting at ``v_reset`` (0 for a soft reset): SpikingJelly charges
  h = v + (x − (v − v_reset))/τ (or v − (v − v_reset)/τ + x), which is a leak toward ``v_reset``, and
  starts each sequence there. It fires at h ≥ V_th, as ``rc.nn`` does.
- ``IFNode``: the same with λ = 1. ``ParametricLIFNode``: λ = 1 − sigmoid(w), its parameter ``w``.
- ``step_mode='m'``: a multi-step neuron on ``[T, B, ...]``; ``step_mode='s'``: a single-step neuron
  (a cell), folded with the loop that calls it.
- Surrogates: ``Sigmoid(α)``, ``ATan(α)`` as ours; ``Rect(α)`` is ``Rectangular(1/α)``,
  ``PiecewiseQuadratic(α)`` is ``Triangle(1/α)``, ``PiecewiseLeakyReLU(w, c=0)`` is ``Rectangular(2w)``
  (these run as the fused kernels); ``PiecewiseLeakyReLU`` with c ≠ 0, ``PiecewiseExp``, ``SoftSign``,
  ``SuperSpike`` and ``Erf`` have their formulas in ``rc.nn.surrogate`` (PyTorch spike pass).

- ``layer.Dropout``/``Dropout2d`` on a sequence (0.0.0.0.14: ``MultiStepDropout*``): rewritten for the
  capture as ``x_seq * dropout_mask(x_seq, p)``, one mask for all steps, drawn by the spike pass and
  reused by the rate pass (``register_rewrite``).

Refused, with the reason: subclasses of these neurons (they may change the dynamics), other
surrogates or a surrogate with ``spiking=False``, ``store_v_seq=True`` (the compiled step computes no
membrane to store), a neuron or a Dropout holding its state from an earlier call (SpikingJelly keeps
it until ``functional.reset_net``), a single-step Dropout. The layers ``layer.*`` and containers
(``SeqToANNContainer``, ``MultiStepContainer``) are ordinary modules: the capture traces through them.
"""
from __future__ import annotations

import importlib
import importlib.metadata

import torch
import torch.fx

from ..families import LIFDynamics
from ..graph_ops import dropout_mask
from ..nn import surrogate as ours
from ..nn.multistep import register_state_reset
from ..nn.spec import NeuronOp, NeuronSpec, register_neuron, register_neuron_op
from . import UnsupportedNeuron, register_op_traced, register_rewrite

__all__ = []

torch.fx.wrap("dropout_mask")      # one node in a traced graph: the mask is drawn once, by the spike pass


def _api(package: str, min_major: int = 0):
    """(neuron, layer, surrogate) of one of SpikingJelly's APIs, or None: ``activation_based`` as of 2.x
    (0.0.0.0.x ship an early, different version of it), ``clock_driven`` (0.0.0.0.x)."""
    try:
        major = int(importlib.metadata.version("spikingjelly").split(".")[0])
        if major < min_major:
            return None
        return tuple(importlib.import_module(f"spikingjelly.{package}.{name}")
                     for name in ("neuron", "layer", "surrogate"))
    except (ImportError, importlib.metadata.PackageNotFoundError, ValueError):
        return None            # not installed, or a class that only claims to come from SpikingJelly


_APIS = {"activation_based": _api("activation_based", min_major=2), "clock_driven": _api("clock_driven")}


def surrogate_of(sg) -> ours.Surrogate:
    """Our surrogate for a SpikingJelly surrogate module, or UnsupportedNeuron."""
    if not getattr(sg, "spiking", False):
        raise UnsupportedNeuron(f"its surrogate {type(sg).__name__} has spiking=False: its forward is the smooth "
                                f"primitive function, not a spike")
    kind = type(sg)
    clock_driven = kind.__module__.startswith("spikingjelly.clock_driven")
    api = _APIS["clock_driven" if clock_driven else "activation_based"]
    if api is None:
        raise UnsupportedNeuron(f"its surrogate {kind.__qualname__} comes from a SpikingJelly API not supported here")
    _surrogate = api[2]
    if kind is _surrogate.Sigmoid:
        return ours.Sigmoid(float(sg.alpha))
    if kind is _surrogate.ATan:
        return ours.ATan(float(sg.alpha))
    if kind is getattr(_surrogate, "Rect", None):
        return ours.Rectangular(1.0 / float(sg.alpha))
    if kind is _surrogate.PiecewiseQuadratic:
        return ours.Triangle(1.0 / float(sg.alpha))
    if kind is _surrogate.PiecewiseLeakyReLU and not clock_driven:    # 0.0.0.0.14's is 1/w inside, not 1/(2w)
        w, c = float(sg.w), float(sg.c)
        return ours.Rectangular(2.0 * w) if c == 0.0 else ours.PiecewiseLeakyReLU(w, c)
    if kind is _surrogate.PiecewiseExp:
        return ours.PiecewiseExp(float(sg.alpha))
    if kind is _surrogate.SoftSign:
        return ours.SoftSign(float(sg.alpha))
    if kind is getattr(_surrogate, "SuperSpike", None):
        return ours.SuperSpike(float(sg.alpha), 1.0)
    if kind is _surrogate.Erf:
        return ours.Erf(float(sg.alpha))
    raise UnsupportedNeuron(f"its surrogate {kind.__qualname__} has no equivalent here (supported: Sigmoid, ATan, "
                            f"Rect, PiecewiseQuadratic, PiecewiseLeakyReLU, PiecewiseExp, SoftSign, SuperSpike, Erf)")


def _check_plain(m, classes) -> None:
    if type(m) not in classes:
        raise UnsupportedNeuron(f"it is a subclass of SpikingJelly's {type(m).__mro__[1].__name__}, which may "
                                f"change its dynamics; register it with ratebp_compile.nn.register_neuron")
    if getattr(m, "store_v_seq", False):
        raise UnsupportedNeuron("store_v_seq=True records the membrane of every step, which the compiled step "
                                "does not compute")
    if getattr(m, "_neuron_precision", None) is not None:
        raise UnsupportedNeuron("a neuron precision is set; the compiled step runs in the input's dtype")
    if isinstance(m.v, torch.Tensor):
        raise UnsupportedNeuron("it holds a membrane potential from an earlier call (SpikingJelly keeps it until "
                                "functional.reset_net(model)); reset the network before each batch")


def _spec(m, decay, params=()) -> NeuronSpec:
    _check_plain(m, _NEURONS)
    if getattr(m, "backend", "torch") not in ("torch", "cupy"):
        raise UnsupportedNeuron(f"backend={m.backend!r}: only the 'torch' and 'cupy' backends compute the "
                                f"differentiable neuron")
    v_reset = None if m.v_reset is None else float(m.v_reset)
    dynamics = LIFDynamics(decay=decay, decay_input=bool(getattr(m, "decay_input", False)),
                           v_threshold=float(m.v_threshold), v_reset=v_reset, detach_reset=bool(m.detach_reset),
                           surrogate=surrogate_of(m.surrogate_function), v_rest=v_reset or 0.0)
    return NeuronSpec(dynamics, param_names=params)


def _lif(m) -> NeuronSpec:
    return _spec(m, 1.0 - 1.0 / float(m.tau))


def _if(m) -> NeuronSpec:
    return _spec(m, 1.0)


def _plif(m) -> NeuronSpec:
    return _spec(m, None, ("w",))


def _sequence_dropout(channels: bool):
    """The rewrite of a SpikingJelly dropout layer on a sequence: one mask drawn for the whole sequence
    and shared by every step (``graph_ops.dropout_mask``: the spike pass draws it with the same random
    numbers SpikingJelly would, the rate pass reuses it, which is exact)."""
    def rewrite(module, x_seq):
        if getattr(module, "step_mode", "m") != "m":
            raise UnsupportedNeuron("a single-step Dropout draws its mask at the first step of a loop and keeps it "
                                    "as module state; not supported yet (use step_mode='m')")
        memories = getattr(module, "_memories", None)          # read as a whole: the guards watch it
        if (memories.get("mask") if isinstance(memories, dict) else module.mask) is not None:
            raise UnsupportedNeuron("it holds the dropout mask of an earlier call (SpikingJelly keeps it until "
                                    "functional.reset_net(model)); reset the network before each batch")
        if not module.training or module.p == 0:
            return x_seq
        return x_seq * dropout_mask(x_seq, float(module.p), channels)
    return rewrite


def _single_step_dropout(module, x):
    raise UnsupportedNeuron("a single-step Dropout draws its mask at the first step of a loop and keeps it as "
                            "module state; not supported yet (use MultiStepDropout)")


def _runs_its_op(m) -> bool:
    """Whether SpikingJelly runs neuron ``m`` (on float32 input) as its custom op, which torch.compile records:
    for one of its built-in surrogates (``_ops.surrogate._surrogate_spec``); other surrogates run its PyTorch
    reference, which Dynamo would inline."""
    try:
        from spikingjelly._ops.surrogate import _surrogate_spec
    except ImportError:
        return True
    return _surrogate_spec(m.surrogate_function) is not None


def _single_step(m) -> bool:
    return getattr(m, "step_mode", "s") == "s"


_NEURONS: tuple = ()
if _APIS["activation_based"] is not None:
    _neuron, _layer, _ = _APIS["activation_based"]
    _NEURONS += (_neuron.LIFNode, _neuron.IFNode, _neuron.ParametricLIFNode)
    register_neuron(_neuron.LIFNode, _lif, single_step=_single_step)
    register_neuron(_neuron.IFNode, _if, single_step=_single_step)
    register_neuron(_neuron.ParametricLIFNode, _plif, single_step=_single_step)
    for _cls in (_neuron.LIFNode, _neuron.IFNode, _neuron.ParametricLIFNode):
        register_op_traced(_cls, _runs_its_op)     # Dynamo records them as SpikingJelly's custom ops (below)
    register_rewrite(_layer.Dropout, _sequence_dropout(channels=False))
    register_rewrite(_layer.Dropout2d, _sequence_dropout(channels=True))
if _APIS["clock_driven"] is not None:
    # 0.0.0.0.14: IFNode, LIFNode, ParametricLIFNode take one step per call; their MultiStep* subclasses
    # the whole sequence (backend 'torch' loops the single step, 'cupy' runs CUDA kernels: same math)
    _neuron, _layer, _ = _APIS["clock_driven"]
    _NEURONS += (_neuron.LIFNode, _neuron.IFNode, _neuron.ParametricLIFNode, _neuron.MultiStepLIFNode,
                 _neuron.MultiStepIFNode, _neuron.MultiStepParametricLIFNode)
    for single, multi, to_spec in ((_neuron.LIFNode, _neuron.MultiStepLIFNode, _lif),
                                   (_neuron.IFNode, _neuron.MultiStepIFNode, _if),
                                   (_neuron.ParametricLIFNode, _neuron.MultiStepParametricLIFNode, _plif)):
        register_neuron(multi, to_spec)
        register_neuron(single, to_spec, single_step=lambda m: True)
    register_rewrite(_layer.Dropout, _single_step_dropout)
    register_rewrite(_layer.Dropout2d, _single_step_dropout)
    register_rewrite(_layer.MultiStepDropout, _sequence_dropout(channels=False))
    register_rewrite(_layer.MultiStepDropout2d, _sequence_dropout(channels=True))
for _cls in _NEURONS:
    register_state_reset(_cls, lambda m: m.reset())


# -- the neurons as torch.compile records them: SpikingJelly's own custom ops ---------------------------
# (``functional.lif_multi_step`` & co. call them for a built-in surrogate with a scalar alpha; their
# arguments carry every constant; output 1 is the membrane after the last step, which Dynamo writes
# back to the module, output 2 the membranes before reset, internal to its backward)
_OP_SURROGATES = {0: ours.Sigmoid, 1: ours.ATan, 2: lambda a: ours.Triangle(1.0 / a), 3: ours.PiecewiseExp,
                  4: ours.SoftSign, 5: lambda a: ours.SuperSpike(a, 1.0), 6: ours.Erf}


def _op_form(args: dict, decay, params=(), decay_input: bool = False) -> NeuronOp:
    if args.get("store_v_seq"):
        raise UnsupportedNeuron("store_v_seq=True records the membrane of every step, which the compiled step "
                                "does not compute")
    surrogate = _OP_SURROGATES.get(int(args["surrogate_id"]))
    if surrogate is None:
        raise UnsupportedNeuron(f"its surrogate (SpikingJelly's op id {args['surrogate_id']}) has no equivalent here")
    reset = args["reset"]
    v_reset = None if reset is None else float(reset)
    dynamics = LIFDynamics(decay=decay, decay_input=decay_input, v_threshold=float(args["threshold"]),
                           v_reset=v_reset, detach_reset=bool(args["detach_reset"]),
                           surrogate=surrogate(float(args["alpha"])), v_rest=v_reset or 0.0)
    return NeuronOp(NeuronSpec(dynamics, param_names=("w",) if params else ()), x="x", params=tuple(params),
                    state="v", rest=v_reset or 0.0, outputs=("spikes", "membrane", "internal"))


register_neuron_op("sj_lif::forward", lambda a: _op_form(a, 1.0 - 1.0 / float(a["tau"]),
                                                         decay_input=bool(a["decay_input"])))
register_neuron_op("sj_if::forward", lambda a: _op_form(a, 1.0))
register_neuron_op("sj_plif::forward", lambda a: _op_form(a, None, ("w",), decay_input=bool(a["decay_input"])))

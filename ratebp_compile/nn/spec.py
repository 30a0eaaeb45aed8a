"""``NeuronSpec``: what the compiler knows about one neuron layer.

After ``normalize_neurons`` every neuron in a graph is a ``call_function`` node whose target is a
``NeuronSpec`` and whose arguments are ``(x, *learnable_parameters)``. A spec pairs the neuron's
dynamics — an instance of one of ``ratebp_compile.families`` — with how it sits in the graph (its
time layout, its parameters, which execution the node runs). The spec is callable — it runs the
neuron's multi-step forward with autograd (BPTT) — so every stage of the pipeline stays an
executable graph; ``spike_pass`` runs the same neuron without autograd and also returns the rate r
and the eligibility e in the shape the rate pass needs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Type

import torch

from ..families import Family

__all__ = ["NeuronSpec", "CallForm", "NeuronOp", "FinalMembrane", "StateTrace", "register_neuron", "register_neuron_op",
           "neuron_op", "neuron_spec", "cell_spec", "call_form", "starts_from_stored", "is_single_step",
           "registered_neuron_types"]


@dataclass(frozen=True)
class NeuronSpec:
    """A neuron layer as the compiler sees it.

    dynamics:     the neuron's family and constants (``ratebp_compile.families``).
    time_steps:   None: the input is ``[T, B, ...]``; an int T: the input is ``[T·B, ...]``.
    param_names:  the neuron module's learnable parameters, passed as node arguments after x.
    mode:         what calling the spec does: "bptt" (the multi-step forward with autograd, spikes
                  out) or "spike" (``spike_pass``: spikes, r, e, e_params out, no autograd).
    fused:        run as the fused kernels' custom ops (``ratebp_compile.kernels``; set by ``fuse_lif``).
    """

    dynamics: Family
    time_steps: Optional[int] = None
    param_names: Tuple[str, ...] = ()
    mode: str = "bptt"
    fused: bool = False

    def __post_init__(self):
        if not isinstance(self.dynamics, Family):
            raise TypeError(f"NeuronSpec needs the neuron's dynamics (an instance of a ratebp_compile.families "
                            f"family, e.g. LIFDynamics(decay=0.5)), got {self.dynamics!r}")
        if self.mode not in ("bptt", "spike"):
            raise ValueError(f"NeuronSpec mode must be 'bptt' or 'spike', got {self.mode!r}")
        if self.fused and not hasattr(self.dynamics, "fused_scan"):
            raise ValueError(f"{type(self.dynamics).__name__} has no fused kernels")

    # fx names a call_function node and its generated-code global after the target's __name__.
    @property
    def __name__(self) -> str:  # noqa: A003
        return self.dynamics.name + ("_fused" if self.fused else "") + ("_spike_pass" if self.mode == "spike" else "")

    def with_mode(self, mode: str) -> "NeuronSpec":
        return dataclasses.replace(self, mode=mode)

    def with_fused(self) -> "NeuronSpec":
        return dataclasses.replace(self, fused=True)

    def fusable(self, x) -> bool:
        """Whether this neuron on input ``x`` can run as fused kernels (the family decides)."""
        return self.dynamics.fusable(x)

    def describe(self) -> str:
        """One line for ``show`` and error messages."""
        layout = "[T·B, ...], T=%d" % self.time_steps if self.time_steps else "[T, B, ...]"
        return f"{self.dynamics.describe()} on {layout}" + (", fused kernel" if self.fused else "")

    def label(self) -> str:
        """A few characters for graph drawings: ``LIF fused[λ=0.5 Vth=1]``."""
        return self.dynamics.name.upper() + (" fused" if self.fused else "") + \
            (" spike pass" if self.mode == "spike" else "") + f"[{self.dynamics.label()}]"

    @property
    def binary(self) -> bool:
        """Whether the spikes are always 0 or 1, so that 1 byte stores one."""
        return self.dynamics.binary

    # -- time layout ---------------------------------------------------------------------------
    def _unmerge(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_steps is None:
            return x
        return x.view(self.time_steps, x.shape[0] // self.time_steps, *x.shape[1:])

    def rate_shape(self, x_shape: torch.Size) -> Tuple[int, ...]:
        """Shape of r and e (and of the neuron's output in the rate pass) for an input of ``x_shape``."""
        if self.time_steps is None:
            return (1,) + tuple(x_shape[1:])
        return (x_shape[0] // self.time_steps,) + tuple(x_shape[1:])

    def empty_outputs(self, x: torch.Tensor, *params: torch.Tensor):
        """Uninitialised outputs of the right shapes and dtypes for input ``x`` (for shape
        propagation): spikes like ``x`` in "bptt" mode; ``(spikes, r, e, *e_params)`` in "spike" mode."""
        spikes = torch.empty_like(x)
        if self.mode == "bptt":
            return spikes
        stats = [x.new_empty(self.rate_shape(x.shape)) for _ in range(2 + len(self.param_names))]
        return (spikes, *stats)

    # -- the two executions --------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, *params: torch.Tensor):
        """``mode="bptt"``: the multi-step forward with autograd (spikes, shaped like x);
        ``mode="spike"``: :meth:`spike_pass`."""
        if self.mode == "spike":
            return self.spike_pass(x, *params)
        run = self.dynamics.fused_multistep if self.fused else self.dynamics.multistep
        return run(self._unmerge(x), params).reshape(x.shape)

    def spike_pass(self, x: torch.Tensor, *params: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Forward without autograd: ``(spikes like x, r, e, *e_params)`` with r, e, e_params in
        ``rate_shape(x.shape)``; e_params[i] is the per-element eligibility of ``params[i]``."""
        run = self.dynamics.fused_spike_pass if self.fused else self.dynamics.spike_pass
        spikes, *stats = run(self._unmerge(x), params)
        shape = self.rate_shape(x.shape)
        return (spikes.reshape(x.shape),) + tuple(t.reshape(shape) for t in stats)

    # -- the spike pass over chunks of time --------------------------------------------------------
    def scan(self, x_seq: torch.Tensor, carry, *params: torch.Tensor):
        """The spike pass over the chunk of steps ``x_seq`` ``[n, ...]`` (time unmerged), resumed from
        ``carry`` (None at the first chunk): returns ``(spikes [n, ...], carry)``. Spikes are uint8 for
        a :attr:`binary` neuron, else ``x_seq``'s dtype. Chunk by chunk it computes exactly what
        :meth:`spike_pass` computes at once; :meth:`scan_finish` gives r, e and e_params."""
        if self.fused:
            return self.dynamics.fused_scan(x_seq, carry, params)
        return self.dynamics.scan(x_seq, carry, params, spike_dtype=torch.uint8 if self.binary else None)

    def scan_finish(self, carry, steps: int, shape, dtype: torch.dtype, *params: torch.Tensor):
        """``(r, e, *e_params)`` shaped ``shape`` from the carry of :meth:`scan` after ``steps`` steps."""
        if self.fused:
            return self.dynamics.fused_finish(carry, steps, params, shape, dtype)
        return tuple(t.to(dtype).reshape(shape) for t in self.dynamics.finish(carry, params, dtype))


@dataclass(frozen=True)
class CallForm:
    """How a neuron module's call exchanges values with the code around it, beyond "input in, spikes out".

    state_args: how many arguments after the input carry state in (snnTorch's ``lif(x, mem)``: 1;
                ``Synaptic``'s ``lif(x, syn, mem)``: 2; Norse's ``cell(x, s)``: 1).
    outputs:    the role of each element of a tuple output, "spikes" or "state" (the state handed to the
                next call, in the order of the state arguments); empty when the call returns the spikes
                alone.
    at_rest:    whether a value given as a state argument to the first call of a loop (or to a
                multi-step neuron) means "from rest" (default: None only). Anything else is refused:
                the compiled step always starts from rest.
    stored_at_rest: whether the state the module holds is at rest, for a first call that passes no
                state (the module then starts from what it holds). Default: always (a neuron that
                keeps no state, or whose ``to_spec`` checks it).
    """

    state_args: int = 0
    outputs: Tuple[str, ...] = ()
    at_rest: Callable[[object], bool] = field(default=lambda value: value is None, compare=False)
    stored_at_rest: Callable[[torch.nn.Module], bool] = field(default=lambda module: True, compare=False)

    def __post_init__(self):
        if any(role not in ("spikes", "state") for role in self.outputs) or \
                (self.outputs and self.outputs.count("spikes") != 1):
            raise ValueError(f"CallForm outputs are one 'spikes' and any number of 'state', got {self.outputs}")

    @property
    def spikes_index(self) -> Optional[int]:
        """The index of the spikes in a tuple output (None: the output is the spikes)."""
        return self.outputs.index("spikes") if self.outputs else None


PLAIN_CALL = CallForm()

_REGISTRY: Dict[Type[torch.nn.Module], Callable[[torch.nn.Module], NeuronSpec]] = {}
_SINGLE_STEP: Dict[Type[torch.nn.Module], Callable[[torch.nn.Module], bool]] = {}
_CALL_FORM: Dict[Type[torch.nn.Module], Callable[[torch.nn.Module], CallForm]] = {}


def register_neuron(cls: Type[torch.nn.Module], to_spec: Callable[[torch.nn.Module], NeuronSpec],
                    single_step: Optional[Callable[[torch.nn.Module], bool]] = None,
                    call_form: Optional[Callable[[torch.nn.Module], CallForm]] = None) -> None:
    """Teach the compiler a neuron class it does not know (from another library, say).

    ``to_spec(module)`` returns the module's :class:`NeuronSpec` — or raises
    ``ratebp_compile.interop.UnsupportedNeuron`` saying why a setting cannot be honoured. It runs on the
    real module (it may read its tensors). The module is a multi-step neuron (``[T, B, ...]`` in, spikes
    of the same shape out, from rest), unless ``single_step(module)`` is true: then it takes one step
    ``[B, ...]`` per call and keeps its state between calls (a cell), and ``to_spec`` describes the
    same dynamics run over T steps from rest. ``call_form(module)`` (default: input in, spikes out)
    says which arguments and outputs of a call carry state (:class:`CallForm`). SpikingJelly's,
    snnTorch's and Norse's neurons are registered by ``ratebp_compile.interop`` when a model first
    uses them.
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TypeError(f"register_neuron expects an nn.Module subclass, got {cls!r}")
    _REGISTRY[cls] = to_spec
    for table, value in ((_SINGLE_STEP, single_step), (_CALL_FORM, call_form)):
        if value is not None:
            table[cls] = value
        else:
            table.pop(cls, None)


def registered_neuron_types() -> Tuple[type, ...]:
    return tuple(_REGISTRY)


def _registered_class(module: torch.nn.Module) -> Optional[type]:
    from ..interop import load_for

    load_for(module)
    return next((cls for cls in type(module).__mro__ if cls in _REGISTRY), None)


def is_single_step(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a neuron that takes one step per call and keeps its state between calls."""
    from .neuron import _Cell

    if isinstance(module, _Cell):
        return True
    cls = _registered_class(module)
    return cls is not None and cls in _SINGLE_STEP and bool(_SINGLE_STEP[cls](module))


def neuron_spec(module: torch.nn.Module) -> Optional[NeuronSpec]:
    """The spec of ``module`` if it is a multi-step neuron the compiler knows, else None (single-step
    neurons included: see :func:`cell_spec`)."""
    from .neuron import Neuron

    if is_single_step(module):
        return None
    if isinstance(module, Neuron):
        return module.spec()
    cls = _registered_class(module)
    return None if cls is None else _REGISTRY[cls](module)


def cell_spec(module: torch.nn.Module, time_steps: Optional[int] = None) -> Optional[NeuronSpec]:
    """The spec of a single-step neuron called on ``time_steps`` consecutive steps from rest, as one
    neuron on ``[T·B, ...]`` (``time_steps`` None: its dynamics on ``[T, B, ...]``); None for any
    other module."""
    from .neuron import _Cell

    if not is_single_step(module):
        return None
    if isinstance(module, _Cell):
        return module.multistep_spec(time_steps)
    return dataclasses.replace(_REGISTRY[_registered_class(module)](module), time_steps=time_steps)


def starts_from_stored(module: torch.nn.Module, state_args_given: int) -> bool:
    """Whether a call of neuron ``module`` that passes ``state_args_given`` state arguments starts from the
    state the module holds: it passes fewer than its call form takes, or the form takes none (snnTorch's
    ``init_hidden=True``; for a neuron that keeps no state the form's ``stored_at_rest`` is always true)."""
    form = call_form(module)
    return state_args_given < form.state_args or form.state_args == 0


def call_form(module: torch.nn.Module) -> CallForm:
    """How a call of neuron ``module`` exchanges state (:class:`CallForm`); input in, spikes out for
    ``rc.nn``'s neurons and for classes registered without one."""
    cls = _registered_class(module)
    return _CALL_FORM[cls](module) if cls is not None and cls in _CALL_FORM else PLAIN_CALL


# -- neurons as other libraries' custom ops (what torch.compile records) ------------------------------
@dataclass(frozen=True)
class NeuronOp:
    """A neuron that appears in a torch.compile graph as one call of a library's custom op, read from the
    op's arguments (by name): the neuron's ``spec``; the argument holding its input ``x`` and those
    holding its learnable ``params``; the argument carrying its initial ``state`` (None: none), which
    must be the resting potential ``rest`` filled like one step of the input; and the role of each of
    the op's outputs: "spikes", "membrane" (the membrane after the last step, which Dynamo hands back
    to the module), or "internal" (must go unused)."""

    spec: NeuronSpec
    x: str
    params: Tuple[str, ...] = ()
    state: Optional[str] = None
    rest: float = 0.0
    outputs: Tuple[str, ...] = ("spikes",)


_NEURON_OPS: Dict[str, Callable[[dict], NeuronOp]] = {}


def register_neuron_op(qualified_name: str, parse: Callable[[dict], NeuronOp]) -> None:
    """Teach the compiler a neuron op of another library (``"sj_lif::forward"``): ``parse(args)`` gets the
    op's arguments by name and returns its :class:`NeuronOp` (or raises ``interop.UnsupportedNeuron``)."""
    _NEURON_OPS[qualified_name] = parse


def neuron_op(target) -> Optional[Callable[[dict], NeuronOp]]:
    """The parser of a registered neuron op ``target`` (an op overload or packet), loading the adapter of
    the library that defines it; None for any other target."""
    from ..interop import load_for_op

    packet = getattr(target, "_overloadpacket", target)
    name = getattr(packet, "_qualified_op_name", None)
    if not isinstance(name, str):
        return None
    load_for_op(name)
    return _NEURON_OPS.get(name)


@dataclass(frozen=True)
class FinalMembrane:
    """Graph call target: the membrane of neuron ``spec`` after the last step of its input, from rest,
    without autograd (``FinalMembrane(spec)(x, *params)``), for a library that hands it back to the
    module after each sequence."""

    spec: NeuronSpec

    @property
    def __name__(self) -> str:  # noqa: A003
        return self.spec.dynamics.name + "_final_membrane"

    def __call__(self, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return self.spec.dynamics.final_membrane(self.spec._unmerge(x), params)


@dataclass(frozen=True)
class StateTrace:
    """Graph call target: element ``index`` of neuron ``spec``'s state after every step, from rest, laid out
    like the neuron's spikes (``StateTrace(spec, 0)(x, *params)``): the membrane a neuron returns at each
    step (snnTorch's ``spk, mem = lif(x, mem)``) when the model reads it. BPTT differentiates through it;
    in the rate-based step it is a value of the spike pass only, through which no gradient flows
    (``where`` names the neuron for that error)."""

    spec: NeuronSpec
    index: int = 0
    where: str = ""

    @property
    def __name__(self) -> str:  # noqa: A003
        return self.spec.dynamics.name + "_state_trace"

    def __call__(self, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return self.spec.dynamics.state_trace(self.spec._unmerge(x), params, self.index).reshape(x.shape)

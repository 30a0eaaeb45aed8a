"""``NeuronSpec``: what the compiler knows about one neuron layer.

After ``normalize_neurons`` every neuron in a graph is a ``call_function`` node whose target is a
``NeuronSpec`` and whose arguments are ``(x, *learnable_parameters)``. The spec is callable — it runs
the neuron's multi-step forward with autograd (BPTT) — so every stage of the pipeline stays an
executable graph; ``spike_pass`` runs the same neuron without autograd and also returns the rate r
and the eligibility e in the shape the rate pass needs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Type

import torch

from . import functional as RF
from .surrogate import Surrogate

__all__ = ["NeuronSpec", "register_neuron", "neuron_spec", "registered_neuron_types"]

KINDS = ("lif", "if", "plif", "custom")


@dataclass(frozen=True)
class NeuronSpec:
    """A neuron layer as the compiler sees it.

    kind:         "lif", "if", "plif" (learnable decay λ = 1 − sigmoid(w)) or "custom" (any
                  ``ratebp_compile.nn.Neuron`` subclass: dynamics given by its ``step``).
    decay:        λ for "lif" (1.0 for "if"); None where it is learned or unknown.
    time_steps:   None: the input is ``[T, B, ...]``; an int T: the input is ``[T·B, ...]``.
    param_names:  the neuron module's learnable parameters, passed as node arguments after x.
    module:       the neuron module itself (custom neurons run it).
    mode:         what calling the spec does: "bptt" (the multi-step forward with autograd, spikes
                  out) or "spike" (``spike_pass``: spikes, r, e, e_params out, no autograd).
    fused:        run as the fused kernels' custom ops (``ratebp_compile.kernels``; set by ``fuse_lif``).
    """

    kind: str
    decay: Optional[float] = None
    decay_input: bool = False
    v_threshold: float = 1.0
    v_reset: Optional[float] = None
    detach_reset: bool = True
    surrogate: Optional[Surrogate] = None
    time_steps: Optional[int] = None
    param_names: Tuple[str, ...] = ()
    module: Optional[torch.nn.Module] = field(default=None, repr=False)
    mode: str = "bptt"
    fused: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown neuron kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "custom" and self.module is None:
            raise ValueError("a custom NeuronSpec needs the neuron module")
        if self.kind in ("lif", "if") and self.decay is None:
            raise ValueError(f"a {self.kind!r} NeuronSpec needs its decay")
        if self.mode not in ("bptt", "spike"):
            raise ValueError(f"NeuronSpec mode must be 'bptt' or 'spike', got {self.mode!r}")

    # fx names a call_function node and its generated-code global after the target's __name__.
    @property
    def __name__(self) -> str:  # noqa: A003
        return self.kind + ("_fused" if self.fused else "") + ("_spike_pass" if self.mode == "spike" else "")

    def with_mode(self, mode: str) -> "NeuronSpec":
        return dataclasses.replace(self, mode=mode)

    def with_fused(self) -> "NeuronSpec":
        return dataclasses.replace(self, fused=True)

    def describe(self) -> str:
        """One line for ``show`` and error messages."""
        if self.kind == "custom":
            return f"{type(self.module).__name__} (custom neuron, eligibility by forward-mode AD)"
        parts = []
        if self.kind == "lif":
            parts.append(f"λ={self.decay:g}" + (", decay_input" if self.decay_input else ""))
        elif self.kind == "plif":
            parts.append("λ learned" + (", decay_input" if self.decay_input else ""))
        parts.append(f"V_th={self.v_threshold:g}")
        parts.append("soft reset" if self.v_reset is None else f"hard reset to {self.v_reset:g}")
        parts.append("reset detached" if self.detach_reset else "reset not detached")
        parts.append(f"{self.surrogate.name}({self.surrogate.width:g})")
        layout = "[T·B, ...], T=%d" % self.time_steps if self.time_steps else "[T, B, ...]"
        return f"{self.kind.upper()}({', '.join(parts)}) on {layout}" + (", fused kernel" if self.fused else "")

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

    def _lif_kwargs(self):
        return dict(decay_input=self.decay_input, v_threshold=self.v_threshold, v_reset=self.v_reset,
                    detach_reset=self.detach_reset, surrogate=self.surrogate)

    def decay_of(self, params: Tuple[torch.Tensor, ...]):
        """λ as a float, or as a tensor computed from the learnable parameter (ParametricLIF)."""
        if self.kind == "plif":
            return RF.decay_from_logit(params[0])[0]
        return self.decay

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
        if self.fused:
            from ..kernels import lif as kernels
            return kernels.fused_bptt(self, x, *params)
        if self.kind == "custom":
            return self.module(x)
        spikes = RF.lif_multistep(self._unmerge(x), self.decay_of(params), **self._lif_kwargs())
        return spikes.view(x.shape)

    def spike_pass(self, x: torch.Tensor, *params: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Forward without autograd: ``(spikes like x, r, e, *e_params)`` with r, e, e_params in
        ``rate_shape(x.shape)``; e_params[i] is the per-element eligibility of ``params[i]``."""
        if self.fused:
            from ..kernels import lif as kernels
            return kernels.fused_spike_pass(self, x, *params)
        x_seq = self._unmerge(x)
        if self.kind == "custom":
            spikes, r, e, *e_params = RF.generic_spike_pass(self.module, x_seq, self.param_names)
        elif self.kind == "plif":
            lam, dlam_dw = RF.decay_from_logit(params[0].detach())
            spikes, r, e, e_lam = RF.lif_spike_pass(x_seq, lam, decay_tangent=True, **self._lif_kwargs())
            e_params = [e_lam * dlam_dw]
        else:
            spikes, r, e = RF.lif_spike_pass(x_seq, self.decay, **self._lif_kwargs())
            e_params = []
        shape = self.rate_shape(x.shape)
        return (spikes.view(x.shape), r.reshape(shape), e.reshape(shape)) + tuple(t.reshape(shape) for t in e_params)


    # -- the spike pass over chunks of time --------------------------------------------------------
    @property
    def binary(self) -> bool:
        """Whether the spikes are always 0 or 1 (the LIF family), so that 1 byte stores one."""
        return self.kind != "custom"

    def scan(self, x_seq: torch.Tensor, carry, *params: torch.Tensor):
        """The spike pass over the chunk of steps ``x_seq`` ``[n, ...]`` (time unmerged), resumed from
        ``carry`` (None at the first chunk): returns ``(spikes [n, ...], carry)``. Spikes are uint8 for
        a :attr:`binary` neuron, else ``x_seq``'s dtype. Chunk by chunk it computes exactly what
        :meth:`spike_pass` computes at once; :meth:`scan_finish` gives r, e and e_params."""
        if self.fused:
            from ..kernels import lif as kernels
            return kernels.fused_spike_scan(self, x_seq, carry, *params)
        if self.kind == "custom":
            return RF.generic_spike_scan(self.module, x_seq, carry or RF.GenericScan(), self.param_names)
        if carry is None:
            carry = RF.LIFScan.start(x_seq[0], decay_tangent=self.kind == "plif")
        decay = self.decay_of(params)
        decay = decay.detach() if isinstance(decay, torch.Tensor) else decay
        return RF.lif_spike_scan(x_seq, carry, decay, spike_dtype=torch.uint8, **self._lif_kwargs())

    def scan_finish(self, carry, steps: int, shape, dtype: torch.dtype, *params: torch.Tensor):
        """``(r, e, *e_params)`` shaped ``shape`` from the carry of :meth:`scan` after ``steps`` steps."""
        if self.fused:
            from ..kernels import lif as kernels
            return kernels.lif_scan_finish(carry, steps, params[0] if self.kind == "plif" else None, shape, dtype)
        if self.kind == "custom":
            out = carry.finish(self.param_names)
        elif self.kind == "plif":
            r, e, e_lam = carry.finish(dtype)
            out = (r, e, e_lam * RF.decay_from_logit(params[0].detach())[1])
        else:
            out = carry.finish(dtype)
        return tuple(t.to(dtype).reshape(shape) for t in out)


_REGISTRY: Dict[Type[torch.nn.Module], Callable[[torch.nn.Module], NeuronSpec]] = {}


def register_neuron(cls: Type[torch.nn.Module], to_spec: Callable[[torch.nn.Module], NeuronSpec]) -> None:
    """Teach the compiler a neuron class it does not know (from another library, say).

    ``to_spec(module)`` returns the module's :class:`NeuronSpec`; the module must be a multi-step
    neuron (``[T, B, ...]`` in, spikes of the same shape out) with no state kept between calls.
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TypeError(f"register_neuron expects an nn.Module subclass, got {cls!r}")
    _REGISTRY[cls] = to_spec


def registered_neuron_types() -> Tuple[type, ...]:
    return tuple(_REGISTRY)


def neuron_spec(module: torch.nn.Module) -> Optional[NeuronSpec]:
    """The spec of ``module`` if it is a multi-step neuron the compiler knows, else None (single-step
    cells included: see ``multistep_spec``)."""
    from .neuron import Neuron, _Cell

    if isinstance(module, _Cell):
        return None
    if isinstance(module, Neuron):
        return module.spec()
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls](module)
    return None

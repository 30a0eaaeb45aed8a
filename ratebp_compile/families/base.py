"""``Family``: the contract one neuron family fulfils, and the forward-mode engine that gives any
family its eligibility from its step function.

A family is a frozen dataclass of the dynamics' constants (so that two neurons with the same
dynamics compare equal, and a spec can be a guard). It defines

* ``init_state(x0) -> state`` and ``step(x_t, state, params) -> (s_t, state)``: one differentiable
  step, firing through ``ratebp_compile.nn.spike`` (the surrogate is the derivative of the firing
  step, in reverse and in forward mode); ``params`` are the neuron's learnable tensors, in the
  order of ``NeuronSpec.param_names``;

and from these it inherits every execution the compiler needs:

* ``multistep(x_seq, params)``: the multi-step forward with autograd (BPTT), spikes ``[T, ...]``;
* ``scan(x_seq, carry, params)`` / ``finish(carry, params, dtype)``: the spike pass without autograd,
  over one chunk of time at a time, then ``(r, e, *e_params)``: the rate r = mean_t s_t, the
  eligibility e = ∂r/∂c for an input perturbation c held constant in time, and for each parameter p
  the per-element ∂r/∂p.

The inherited ``scan`` computes e by forward-mode AD through ``step`` (one tangent pass for the
input, one per parameter). A family with a closed form (``lif``) overrides ``scan``/``finish``, and
one with fused kernels answers ``fusable`` and provides the ``fused_*`` executions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD

__all__ = ["Family", "GenericScan"]

Params = Tuple[torch.Tensor, ...]


@dataclass
class GenericScan:
    """The forward-mode spike pass's state between chunks of time: the neuron's state, and for each
    tangent direction (None: the input; else a parameter's index) the state's tangent and the sum of
    the spikes' tangents so far; the sum of the spikes; ``steps``."""

    state: Optional[tuple] = None
    tangents: Dict[Optional[int], Optional[tuple]] = field(default_factory=dict)
    sums: Dict[Optional[int], torch.Tensor] = field(default_factory=dict)
    r: Optional[torch.Tensor] = None
    steps: int = 0


def _dual_state(state: tuple, tangents: Optional[tuple]) -> tuple:
    if tangents is None:
        return state
    return tuple(s if t is None else fwAD.make_dual(s, t) for s, t in zip(state, tangents))


def _split_state(state: tuple) -> Tuple[tuple, tuple]:
    primal, tangent = zip(*(fwAD.unpack_dual(s) if isinstance(s, torch.Tensor) else (s, None) for s in state))
    return tuple(primal), tuple(tangent)


class Family:
    """Base class of the neuron families (see the module docstring)."""

    #: The stem of the node names of this family's neurons in a graph.
    name: ClassVar[str] = "neuron"
    #: Whether spikes are always 0 or 1 (then 1 byte stores one in a streamed spike pass).
    binary: ClassVar[bool] = True

    # -- the dynamics --------------------------------------------------------------------------
    def init_state(self, x0: torch.Tensor) -> tuple:
        raise NotImplementedError

    def step(self, x_t: torch.Tensor, state: tuple, params: Params) -> Tuple[torch.Tensor, tuple]:
        raise NotImplementedError

    def describe(self) -> str:
        """One line for ``show`` and error messages."""
        raise NotImplementedError

    def label(self) -> str:
        """A few characters for graph drawings (inside the brackets of ``LIF[...]``)."""
        return ""

    # -- executions ----------------------------------------------------------------------------
    def multistep(self, x_seq: torch.Tensor, params: Params) -> torch.Tensor:
        """The forward over ``x_seq`` ``[T, ...]`` with autograd: spikes ``[T, ...]``."""
        state = self.init_state(x_seq[0])
        spikes = []
        for t in range(x_seq.shape[0]):
            s, state = self.step(x_seq[t], state, params)
            spikes.append(s)
        return torch.stack(spikes)

    @torch.no_grad()
    def scan(self, x_seq: torch.Tensor, carry: Optional[GenericScan], params: Params,
             spike_dtype: Optional[torch.dtype] = None):
        """The spike pass over the steps ``x_seq`` ``[n, ...]`` from ``carry`` (None: from rest): returns
        ``(spikes [n, ...], carry)``.

        e is the tangent of r = mean_t s_t for the input tangent 1 at every step (a perturbation held
        constant in time); ``.detach()`` inside ``step`` stops tangents exactly as it stops gradients.
        For each parameter, one more pass gives the tangent of r for a unit perturbation of every
        element of that parameter: its per-element eligibility (the rate pass reduces it to the
        parameter's shape, as the parameter broadcasts against the input).
        """
        scan = GenericScan() if carry is None else carry
        if scan.state is None:
            scan.state = tuple(self.init_state(x_seq[0]))
        start_state, spikes = scan.state, None
        for direction in (None,) + tuple(range(len(params))):
            with fwAD.dual_level():
                # every tensor dual (zero tangents where there is none): in torch 2.13 forward-mode AD of an op
                # between a dual tensor and a plain one takes a slow generic path
                run_params = tuple(fwAD.make_dual(p.detach(), torch.ones_like(p) if i == direction
                                                  else torch.zeros_like(p)) for i, p in enumerate(params))
                state = _dual_state(start_state, scan.tangents.get(direction) or
                                    tuple(torch.zeros_like(v) if isinstance(v, torch.Tensor) else None
                                          for v in start_state))
                run_spikes, acc = [], scan.sums.get(direction)
                for t in range(x_seq.shape[0]):
                    x_t = x_seq[t]
                    x_t = fwAD.make_dual(x_t, torch.ones_like(x_t) if direction is None else torch.zeros_like(x_t))
                    s, state = self.step(x_t, state, run_params)
                    primal, tangent = fwAD.unpack_dual(s)
                    run_spikes.append(primal)
                    if tangent is not None:
                        tangent = tangent.expand_as(primal)
                        acc = tangent.clone() if acc is None else acc + tangent
                if acc is None:
                    acc = torch.zeros_like(run_spikes[0])
                end_state, scan.tangents[direction] = _split_state(tuple(state))
            scan.sums[direction] = acc
            if direction is None:
                spikes = torch.stack(run_spikes)
                scan.state = end_state
        total = spikes.sum(0)
        scan.r = total if scan.r is None else scan.r + total
        scan.steps += x_seq.shape[0]
        return (spikes if spike_dtype is None else spikes.to(spike_dtype)), scan

    def finish(self, carry: GenericScan, params: Params, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
        """``(r, e, *e_params)`` averaged over the steps scanned, in ``dtype``."""
        out = (carry.r, carry.sums[None]) + tuple(carry.sums[i] for i in range(len(params)))
        return tuple((t / carry.steps).to(dtype) for t in out)

    def spike_pass(self, x_seq: torch.Tensor, params: Params) -> Tuple[torch.Tensor, ...]:
        """``(spikes [T, ...], r, e, *e_params)`` over all of ``x_seq`` at once."""
        spikes, carry = self.scan(x_seq, None, params)
        return (spikes,) + self.finish(carry, params, x_seq.dtype)

    @torch.no_grad()
    def final_membrane(self, x_seq: torch.Tensor, params: Params) -> torch.Tensor:
        """The membrane after the last step of ``x_seq`` from rest, in the neuron's own volts: what a
        library that keeps its state hands back to the module after a sequence."""
        state = self.init_state(x_seq[0])
        for t in range(x_seq.shape[0]):
            _, state = self.step(x_seq[t], state, params)
        return self.membrane(state)

    def state_trace(self, x_seq: torch.Tensor, params: Params, index: int) -> torch.Tensor:
        """Element ``index`` of the state after each step of ``x_seq`` from rest, ``[T, ...]``: what a
        neuron that returns its state hands back at every step (snnTorch's ``spk, mem = lif(x, mem)``).
        Differentiable (BPTT); the spike pass runs it without autograd."""
        state, trace = self.init_state(x_seq[0]), []
        for t in range(x_seq.shape[0]):
            _, state = self.step(x_seq[t], state, params)
            trace.append(state[index].expand_as(x_seq[t]))
        return torch.stack(trace)

    def membrane(self, state: tuple) -> torch.Tensor:
        """The membrane potential in a state of :meth:`step` (its first element unless said otherwise)."""
        return state[0]

    # -- fused kernels -------------------------------------------------------------------------
    def fusable(self, x) -> bool:
        """Whether this neuron on input ``x`` (a tensor or fake tensor) runs as fused kernels."""
        return False

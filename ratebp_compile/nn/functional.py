"""Functional neuron dynamics: the BPTT forward and the spike pass (spikes, rate r, eligibility e).

The LIF family (LIF, IF, ParametricLIF) shares one update, per element, for t = 0 … T−1 with v₋₁ = 0:

    h_t = λ·v_{t−1} + c_t                (decay_input=False; IF is λ = 1)
    h_t = λ·v_{t−1} + (1 − λ)·c_t        (decay_input=True)
    s_t = Θ(h_t − V_th)                  (ψ_t = surrogate'(h_t − V_th) in backward)
    v_t = h_t − V_th·s_t                 (soft reset, v_reset=None)
    v_t = (1 − s_t)·h_t + s_t·v_reset    (hard reset)

with the spike detached inside the reset when ``detach_reset``.

The spike pass computes, without autograd, r = (1/T)·Σ s_t and e = (1/T)·Σ ψ_t·κ_t with
κ_t = ∂h_t/∂c the sensitivity of the membrane to an input held constant in time:
κ_0 = k₀, κ_{t+1} = k₀ + λ·(∂v_t/∂h_t)·κ_t with k₀ = 1 (or 1 − λ with decay_input) and

    ∂v/∂h = 1                               soft reset, detached
            1 − V_th·ψ                      soft reset, not detached
            1 − s                           hard reset, detached
            1 − s − (h − v_reset)·ψ         hard reset, not detached

For a learnable decay the same forward-mode recurrence gives μ_t = ∂h_t/∂λ and e_λ = (1/T)·Σ ψ_t·μ_t.
Any other elementwise neuron gets e from forward-mode AD through its own step function
(:func:`generic_spike_pass`), with the surrogate standing in for the Heaviside derivative.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.utils.stateless import _reparametrize_module

from .surrogate import Surrogate, spike

__all__ = ["lif_step", "lif_multistep", "lif_spike_pass", "lif_spike_scan", "LIFScan", "generic_spike_pass",
           "generic_spike_scan", "GenericScan", "rate_neuron", "charge", "reset", "dv_dh", "decay_from_logit"]

Decay = Union[float, torch.Tensor]


def decay_from_logit(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(λ, dλ/dw) of a learned decay (ParametricLIF): λ = 1 − sigmoid(w), dλ/dw = −σ(w)(1 − σ(w))."""
    sig = torch.sigmoid(w)
    return 1.0 - sig, -sig * (1.0 - sig)


def charge(v: torch.Tensor, c: torch.Tensor, decay: Decay, decay_input: bool) -> torch.Tensor:
    """h_t from v_{t−1} and the input current c_t."""
    if decay_input:
        return v + (c - v) * (1.0 - decay)
    return v * decay + c


def reset(h, s, v_threshold: float, v_reset: Optional[float]):
    """v_t from h_t and the spike s_t: soft (subtract V_th) or hard (to v_reset)."""
    if v_reset is None:
        return h - s * v_threshold
    return (1.0 - s) * h + s * v_reset


def lif_step(v: torch.Tensor, c: torch.Tensor, decay: Decay, *, decay_input: bool, v_threshold: float,
             v_reset: Optional[float], detach_reset: bool, surrogate: Surrogate) -> Tuple[torch.Tensor, torch.Tensor]:
    """One differentiable LIF step: returns ``(s_t, v_t)`` from ``v_{t-1}`` and the input current ``c_t``."""
    h = charge(v, c, decay, decay_input)
    s = spike(h - v_threshold, surrogate)
    return s, reset(h, s.detach() if detach_reset else s, v_threshold, v_reset)


def lif_multistep(x_seq: torch.Tensor, decay: Decay, *, decay_input: bool, v_threshold: float,
                  v_reset: Optional[float], detach_reset: bool, surrogate: Surrogate) -> torch.Tensor:
    """The multi-step LIF over ``x_seq`` ``[T, ...]`` with autograd (BPTT); returns spikes ``[T, ...]``."""
    v = torch.zeros_like(x_seq[0])
    spikes = []
    for t in range(x_seq.shape[0]):
        s, v = lif_step(v, x_seq[t], decay, decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset,
                        detach_reset=detach_reset, surrogate=surrogate)
        spikes.append(s)
    return torch.stack(spikes)


def dv_dh(h, s, psi, v_threshold: float, v_reset: Optional[float], detach_reset: bool):
    """∂v_t/∂h_t through the reset, for each reset mode and detach setting (see the module docstring)."""
    if v_reset is None:
        return 1.0 if detach_reset else 1.0 - v_threshold * psi
    if detach_reset:
        return 1.0 - s
    return 1.0 - s - (h - v_reset) * psi


@dataclass
class LIFScan:
    """The LIF spike pass's loop state after some steps, to resume it on the next chunk of time.

    ``v`` the membrane; ``kappa`` = ∂h/∂c and ``dvdh`` of the last step; ``mu`` = ∂h/∂λ (learned decay);
    ``r``, ``e``, ``e_lam``: the sums over the steps so far of s_t, ψ_t·κ_t and ψ_t·μ_t; ``steps``.
    Floats stand for tensors that are still constant (at the start, or ∂v/∂h = 1 throughout)."""

    v: torch.Tensor
    r: torch.Tensor
    e: torch.Tensor
    e_lam: Optional[torch.Tensor] = None
    kappa: Union[float, torch.Tensor] = 0.0
    mu: Union[float, torch.Tensor] = 0.0
    dvdh: Union[float, torch.Tensor] = 0.0
    steps: int = 0

    @classmethod
    def start(cls, like: torch.Tensor, decay_tangent: bool = False) -> "LIFScan":
        """The state before step 0 for per-step inputs shaped like ``like`` (accumulating in float32
        for half inputs)."""
        v = torch.zeros(like.shape, dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)
        return cls(v, torch.zeros_like(v), torch.zeros_like(v), torch.zeros_like(v) if decay_tangent else None)

    def finish(self, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
        """``(r, e)`` — plus ``e_λ`` when the decay tangent is tracked — averaged over the steps, in ``dtype``."""
        out = (self.r / self.steps, self.e / self.steps) + (() if self.e_lam is None else (self.e_lam / self.steps,))
        return tuple(t.to(dtype) for t in out)


@torch.no_grad()
def lif_spike_scan(x_seq: torch.Tensor, state: LIFScan, decay: Decay, *, decay_input: bool, v_threshold: float,
                   v_reset: Optional[float], detach_reset: bool, surrogate: Surrogate,
                   spike_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, LIFScan]:
    """Run the spike pass over the steps ``x_seq`` ``[n, ...]`` from ``state``: returns the spikes
    ``[n, ...]`` (in ``spike_dtype``, default ``x_seq``'s) and the state after the last step. The decay
    tangent is tracked when ``state.e_lam`` is a tensor."""
    k0 = (1.0 - decay) if decay_input else 1.0
    tangent = state.e_lam is not None
    v, kappa, mu, dvdh = state.v, state.kappa, state.mu, state.dvdh
    spikes = torch.empty(x_seq.shape, dtype=spike_dtype or x_seq.dtype, device=x_seq.device)
    for t in range(x_seq.shape[0]):
        c = x_seq[t].to(v.dtype)
        kappa = k0 + decay * dvdh * kappa
        if tangent:
            mu = (v - c if decay_input else v) + decay * dvdh * mu
        h = charge(v, c, decay, decay_input)
        u = h - v_threshold
        s = (u >= 0).to(v.dtype)
        psi = surrogate.grad(u)
        state.r += s
        state.e += psi * kappa
        if tangent:
            state.e_lam += psi * mu
        dvdh = dv_dh(h, s, psi, v_threshold, v_reset, detach_reset)
        v = reset(h, s, v_threshold, v_reset)
        spikes[t] = s
    state.v, state.kappa, state.mu, state.dvdh = v, kappa, mu, dvdh
    state.steps += x_seq.shape[0]
    return spikes, state


def lif_spike_pass(x_seq: torch.Tensor, decay: Decay, *, decay_input: bool, v_threshold: float,
                   v_reset: Optional[float], detach_reset: bool, surrogate: Surrogate,
                   decay_tangent: bool = False, spike_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, ...]:
    """The exact LIF forward over ``x_seq`` ``[T, ...]`` without autograd, in closed form.

    Returns ``(spikes [T, ...], r [...], e [...])``, plus ``e_λ = ∂r/∂λ`` when ``decay_tangent``; spikes
    in ``spike_dtype`` (default ``x_seq``'s). Accumulation is in float32 for half-precision inputs.
    """
    spikes, state = lif_spike_scan(x_seq, LIFScan.start(x_seq[0], decay_tangent), decay, decay_input=decay_input,
                                   v_threshold=v_threshold, v_reset=v_reset, detach_reset=detach_reset,
                                   surrogate=surrogate, spike_dtype=spike_dtype)
    return (spikes,) + state.finish(x_seq.dtype)


@dataclass
class GenericScan:
    """The forward-mode spike pass's state between chunks of time: the neuron's state, and for each
    tangent direction (None: the input; else a parameter's name) the state's tangent and the sum of the
    spikes' tangents so far; the sum of the spikes; ``steps``."""

    state: Optional[tuple] = None
    tangents: Dict[Optional[str], Optional[tuple]] = field(default_factory=dict)
    sums: Dict[Optional[str], torch.Tensor] = field(default_factory=dict)
    r: Optional[torch.Tensor] = None
    steps: int = 0

    def finish(self, param_names: Sequence[str] = ()) -> Tuple[torch.Tensor, ...]:
        """``(r, e, *e_params)`` averaged over the steps."""
        return (self.r / self.steps, self.sums[None] / self.steps) + \
            tuple(self.sums[name] / self.steps for name in param_names)


def _dual_state(state: tuple, tangents: Optional[tuple]) -> tuple:
    if tangents is None:
        return state
    return tuple(s if t is None else fwAD.make_dual(s, t) for s, t in zip(state, tangents))


def _split_state(state: tuple) -> Tuple[tuple, tuple]:
    primal, tangent = zip(*(fwAD.unpack_dual(s) if isinstance(s, torch.Tensor) else (s, None) for s in state))
    return tuple(primal), tuple(tangent)


@torch.no_grad()
def generic_spike_scan(neuron: torch.nn.Module, x_seq: torch.Tensor, scan: GenericScan,
                       param_names: Sequence[str] = ()) -> Tuple[torch.Tensor, GenericScan]:
    """Run the spike pass of any elementwise neuron module that defines ``init_state(x_0) -> state``
    and ``step(x_t, state) -> (s_t, state)`` over the steps ``x_seq`` ``[n, ...]`` from ``scan``;
    returns the spikes ``[n, ...]`` and the state after the last step.

    e is the tangent of r = mean_t s_t for the input tangent 1 at every step (a perturbation held
    constant in time); ``.detach()`` inside ``step`` stops tangents exactly as it stops gradients.
    For each parameter in ``param_names``, one more pass gives the tangent of r for a unit
    perturbation of every element of that parameter: the per-element eligibility of an elementwise
    neuron's parameter (which broadcasts against the per-step input the same way in the rate pass).
    """
    if scan.state is None:
        scan.state = tuple(neuron.init_state(x_seq[0]))
    start_state = scan.state
    spikes = None
    for direction in (None,) + tuple(param_names):
        with fwAD.dual_level():
            overrides = {}
            if direction is not None:
                p = neuron.get_parameter(direction)
                overrides[direction] = fwAD.make_dual(p.detach(), torch.ones_like(p))
            with _reparametrize_module(neuron, overrides):
                state = _dual_state(start_state, scan.tangents.get(direction))
                run_spikes, acc = [], scan.sums.get(direction)
                for t in range(x_seq.shape[0]):
                    x_t = x_seq[t]
                    if direction is None:
                        x_t = fwAD.make_dual(x_t, torch.ones_like(x_t))
                    s, state = neuron.step(x_t, state)
                    primal, tangent = fwAD.unpack_dual(s)
                    run_spikes.append(primal)
                    if tangent is not None:
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
    return spikes, scan


def generic_spike_pass(neuron: torch.nn.Module, x_seq: torch.Tensor,
                       param_names: Sequence[str] = ()) -> Tuple[torch.Tensor, ...]:
    """Spike pass of any elementwise neuron (see :func:`generic_spike_scan`) over all of ``x_seq``
    ``[T, ...]``: returns ``(spikes, r, e, *e_params)``."""
    spikes, scan = generic_spike_scan(neuron, x_seq, GenericScan(), param_names)
    return (spikes,) + scan.finish(param_names)


class _RateNeuron(torch.autograd.Function):
    """Value r; gradient grad·e into x and Σ grad·e_p (reduced to p's shape) into each parameter p."""

    @staticmethod
    def forward(ctx, x, r, e, n_params, *params_and_eligibilities):
        params, e_params = params_and_eligibilities[:n_params], params_and_eligibilities[n_params:]
        ctx.save_for_backward(e, *e_params)
        ctx.param_shapes = [p.shape for p in params]
        return r.clone()

    @staticmethod
    def backward(ctx, grad):
        e, *e_params = ctx.saved_tensors
        grads_p = [(grad * e_p).sum_to_size(shape) for e_p, shape in zip(e_params, ctx.param_shapes)]
        return (grad * e, None, None, None, *grads_p, *(None for _ in e_params))


def rate_neuron(x: torch.Tensor, r: torch.Tensor, e: torch.Tensor,
                params: Sequence[torch.Tensor] = (), e_params: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """The neuron of the rate pass: value ``r`` exactly, Jacobian ``diag(e)`` w.r.t. ``x``.

    For learnable neuron parameters p with per-element eligibilities e_p, the gradient reaching p is
    Σ grad·e_p (broadcast as p broadcasts against the input). Nothing flows into r or e. The value is r
    whatever x holds: a non-finite rate input (from a non-finite model input) does not reach the layers
    after the neuron, whose gradients are then those of BPTT.
    """
    return _RateNeuron.apply(x, r, e, len(params), *params, *e_params)

"""The LIF family's arithmetic in plain PyTorch: the numerical spec of the fused kernels, their CPU
path and their test oracle.

Per element, for t = 0 … T−1 from v₋₁ = 0 (membrane potentials are measured from the resting
potential; ``ratebp_compile.families.lif`` maps a neuron that rests elsewhere onto this form):

    h_t = λ·v_{t−1} + c_t                (decay_input=False; IF is λ = 1)
    h_t = λ·v_{t−1} + (1 − λ)·c_t        (decay_input=True)
    s_t = Θ(h_t − V_th)                  (ψ_t = surrogate'(h_t − V_th) in backward)
    v_t = h_t − V_th·s_t                 (soft reset, v_reset=None)
    v_t = (1 − s_t)·h_t + s_t·v_reset    (hard reset)

with Θ(u) = [u ≥ 0] (or [u > 0] where ``strict``) and the spike detached inside the reset when
``detach_reset``.

With ``delayed_reset`` (snnTorch's ``reset_delay=True``) a spike's reset acts one step later, and the
membrane the neuron keeps is the one before reset: from r_t = Θ(v_{t−1} − V_th), the reset signal (the
previous step's spike, detached),

    h_t = λ·v_{t−1} + c_t − V_th·r_t                       soft reset, outside the decay
    h_t = λ·((1 − r_t)·v_{t−1} + r_t·v_reset) + c_t        hard reset
    v_t = h_t

(decay_input scales c_t as above). The delayed reset is always detached; its derivatives are those of
the detached reset one step earlier, so κ, μ and the BPTT backward below are unchanged except that μ
and ∂h_t/∂λ read the potential the step charges from, v'_{t−1} (v_{t−1}, or the hard-reset one).

The spike pass computes, without autograd, r = (1/T)·Σ s_t and e = (1/T)·Σ ψ_t·κ_t with
κ_t = ∂h_t/∂c the sensitivity of the membrane to an input held constant in time:
κ_0 = k₀, κ_{t+1} = k₀ + λ·(∂v_t/∂h_t)·κ_t with k₀ = 1 (or 1 − λ with decay_input) and

    ∂v/∂h = 1                               soft reset, detached
            1 − V_th·ψ                      soft reset, not detached
            1 − s                           hard reset, detached
            1 − s − (h − v_reset)·ψ         hard reset, not detached

For a learnable decay the same forward-mode recurrence gives μ_t = ∂h_t/∂λ and e_λ = (1/T)·Σ ψ_t·μ_t.

Surrogates are named here by string (the kernels' compile-time constant is the index in
``SURROGATE_NAMES``); ``ratebp_compile.nn.surrogate`` builds its classes on :func:`surrogate_grad`. The
scan also takes any other ψ as a callable (``surrogate=psi``; then ``width`` is unused).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

__all__ = ["SURROGATE_NAMES", "surrogate_grad", "decay_from_logit", "charge", "reset", "dv_dh", "fire", "step",
           "charged_from", "check_delayed_reset", "LIFScan", "lif_spike_scan", "lif_spike_pass"]

Decay = Union[float, torch.Tensor]

#: The surrogates the kernels implement, by their index (the kernels' ``SURROGATE`` constant).
SURROGATE_NAMES = ("sigmoid", "atan", "rectangular", "triangle")


def surrogate_grad(name: str, width: float, u: torch.Tensor) -> torch.Tensor:
    """ψ(u), the pseudo-derivative of Θ(u): sigmoid α·σ(αu)(1 − σ(αu)) and atan (α/2)/(1 + (π/2·α·u)²)
    with α = ``width``; rectangular 1/w on |u| < w/2; triangle max(0, 1 − |u|/w)/w."""
    if name == "sigmoid":
        s = torch.sigmoid(u * width)
        return (1.0 - s) * s * width
    if name == "atan":
        return (width / 2.0) / (1.0 + (u * (math.pi / 2.0 * width)).square())
    if name == "rectangular":
        return (u.abs() < width / 2.0).to(u.dtype) / width
    if name == "triangle":
        return torch.clamp(1.0 - u.abs() / width, min=0.0) / width
    raise ValueError(f"the kernels have no surrogate {name!r}; expected one of {SURROGATE_NAMES}")


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


def fire(u: torch.Tensor, strict: bool = False) -> torch.Tensor:
    """Θ(u) in u's dtype: 1 where u ≥ 0 (u > 0 when ``strict``), else 0."""
    return ((u > 0) if strict else (u >= 0)).to(u.dtype)


def charged_from(v, v_threshold: float, v_reset: Optional[float], strict: bool, delayed_reset: bool):
    """``(v', r)``: the potential step t charges from and the delayed reset r_t acting at it (0.0 without
    ``delayed_reset``, where ``v`` — the membrane after the previous step's reset — is charged as it is)."""
    if not delayed_reset:
        return v, 0.0
    r = fire(v - v_threshold, strict)
    return (v if v_reset is None else reset(v, r, v_threshold, v_reset)), r


def step(v, c, decay: Decay, *, decay_input: bool, v_threshold: float, v_reset: Optional[float], strict: bool,
         delayed_reset: bool):
    """One step from the membrane ``v`` the neuron keeps: ``(v', h, s, v_next)`` — the potential it charges
    from (:func:`charged_from`), the membrane before reset, the spike, the membrane it keeps."""
    v_in, r = charged_from(v, v_threshold, v_reset, strict, delayed_reset)
    h = charge(v_in, c, decay, decay_input)
    if delayed_reset and v_reset is None:
        h = h - r * v_threshold
    s = fire(h - v_threshold, strict)
    return v_in, h, s, (h if delayed_reset else reset(h, s, v_threshold, v_reset))


def check_delayed_reset(delayed_reset: bool, detach_reset: bool) -> None:
    """Refuse a delayed reset that is not detached (no neuron defines one)."""
    if delayed_reset and not detach_reset:
        raise ValueError("a delayed reset is detached: delayed_reset=True needs detach_reset=True")


def dv_dh(h, s, psi, v_threshold: float, v_reset: Optional[float], detach_reset: bool):
    """∂v_t/∂h_t through the reset, for each reset mode and detach setting (see the module docstring)."""
    if v_reset is None:
        return 1.0 if detach_reset else 1.0 - v_threshold * psi
    if detach_reset:
        return 1.0 - s
    return 1.0 - s - (h - v_reset) * psi


@dataclass
class LIFScan:
    """The spike pass's loop state after some steps, to resume it on the next chunk of time.

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
                   v_reset: Optional[float], detach_reset: bool, surrogate, width: float, strict: bool = False,
                   delayed_reset: bool = False,
                   spike_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, LIFScan]:
    """Run the spike pass over the steps ``x_seq`` ``[n, ...]`` from ``state``: returns the spikes
    ``[n, ...]`` (in ``spike_dtype``, default ``x_seq``'s) and the state after the last step. The decay
    tangent is tracked when ``state.e_lam`` is a tensor."""
    check_delayed_reset(delayed_reset, detach_reset)
    k0 = (1.0 - decay) if decay_input else 1.0
    tangent = state.e_lam is not None
    v, kappa, mu, dvdh = state.v, state.kappa, state.mu, state.dvdh
    spikes = torch.empty(x_seq.shape, dtype=spike_dtype or x_seq.dtype, device=x_seq.device)
    for t in range(x_seq.shape[0]):
        c = x_seq[t].to(v.dtype)
        v_in, h, s, v_next = step(v, c, decay, decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset,
                                  strict=strict, delayed_reset=delayed_reset)
        kappa = k0 + decay * dvdh * kappa
        if tangent:
            mu = (v_in - c if decay_input else v_in) + decay * dvdh * mu
        u = h - v_threshold
        psi = surrogate(u) if callable(surrogate) else surrogate_grad(surrogate, width, u)
        state.r += s
        state.e += psi * kappa
        if tangent:
            state.e_lam += psi * mu
        dvdh = dv_dh(h, s, psi, v_threshold, v_reset, detach_reset)
        v = v_next
        spikes[t] = s
    state.v, state.kappa, state.mu, state.dvdh = v, kappa, mu, dvdh
    state.steps += x_seq.shape[0]
    return spikes, state


def lif_spike_pass(x_seq: torch.Tensor, decay: Decay, *, decay_input: bool, v_threshold: float,
                   v_reset: Optional[float], detach_reset: bool, surrogate, width: float, strict: bool = False,
                   delayed_reset: bool = False, decay_tangent: bool = False,
                   spike_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, ...]:
    """The exact forward over ``x_seq`` ``[T, ...]`` without autograd, in closed form.

    Returns ``(spikes [T, ...], r [...], e [...])``, plus ``e_λ = ∂r/∂λ`` when ``decay_tangent``; spikes
    in ``spike_dtype`` (default ``x_seq``'s). Accumulation is in float32 for half-precision inputs.
    """
    spikes, state = lif_spike_scan(x_seq, LIFScan.start(x_seq[0], decay_tangent), decay, decay_input=decay_input,
                                   v_threshold=v_threshold, v_reset=v_reset, detach_reset=detach_reset,
                                   surrogate=surrogate, width=width, strict=strict, delayed_reset=delayed_reset,
                                   spike_dtype=spike_dtype)
    return (spikes,) + state.finish(x_seq.dtype)

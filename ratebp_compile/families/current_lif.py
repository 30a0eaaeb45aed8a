"""The current-based LIF family: Norse's ``LIFCell`` / ``LIF`` (a synaptic current i feeding a membrane
v), exactly as Norse 1.1 computes it (``lif_feed_forward_step``).

Per element, with x_t the input at step t, a = dt·τ_mem⁻¹, b = dt·τ_syn⁻¹, H(u) = [u > 0] (strict: a
membrane exactly at the threshold does not fire) and ψ the surrogate derivative of H:

    j_t = i_{t−1} + x_t                              the input jumps the current first
    ṽ_t = v_{t−1} + a·((v_leak − v_{t−1}) + j_t)     the membrane integrates the NEW current
    i_t = j_t + (−b)·j_t                             then the current decays: (1 − b)·j_t
    z_t = H(ṽ_t − V_th)
    v_t = (1 − z_t)·ṽ_t + z_t·v_reset                hard reset, z_t NOT detached

from v_0 = v_leak, i_0 = 0. So j_t = (1 − b)·j_{t−1} + x_t is a linear filter of the input feeding a
box LIF that leaks toward v_leak; x_t reaches the membrane in the same step with gain a. The
operations are written in Norse's order (the coefficients as (dt·τ⁻¹) products, the current's decay
as j + (−dt·τ_syn⁻¹)·j), so that with the same coefficients the forward is bit for bit Norse's.

The state is ``(v, i)``, the order of Norse's ``LIFFeedForwardState(v, i)``. There are no learnable
parameters: Norse keeps its constants in a ``LIFParameters`` namedtuple, not as module parameters.

The eligibility has a closed form: the same recurrence carries the sensitivities to an input c held
constant in time (dj = di + 1, dṽ = dv + a·(dj − dv), di' = (1 − b)·dj, dz = ψ·dṽ,
dv' = (1 − z)·dṽ + (v_reset − ṽ)·dz) and e = mean_t dz_t — what forward-mode AD through ``step`` gives
(``Family.scan``, the test oracle), without its cost.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..nn.surrogate import SuperSpike, Surrogate, spike
from .base import Family

__all__ = ["CurrentLIFDynamics"]


@dataclass
class _Carry:
    """The closed-form spike pass's state between chunks of time: the membrane and current, their
    sensitivities to a constant input, the sums of the spikes and of their sensitivities, the steps."""

    v: torch.Tensor
    i: torch.Tensor
    dv: torch.Tensor
    di: torch.Tensor
    r: torch.Tensor
    e: torch.Tensor
    steps: int = 0


@dataclass(frozen=True)
class CurrentLIFDynamics(Family):
    """The constants of one current-based LIF neuron (Norse's ``LIFParameters`` and ``dt``; its defaults).

    tau_syn_inv:  τ_syn⁻¹, the current's inverse time constant (b = dt·τ_syn⁻¹).
    tau_mem_inv:  τ_mem⁻¹, the membrane's inverse time constant (a = dt·τ_mem⁻¹).
    v_leak:       the potential the membrane starts at and leaks toward.
    v_th:         the threshold (fires where ṽ > v_th).
    v_reset:      the potential a spike resets the membrane to (the reset is not detached).
    dt:           the integration step.
    surrogate:    ψ; Norse's default ``method="super"`` is ``SuperSpike(1, 1)`` (its alpha is unused).
    """

    tau_syn_inv: float = 200.0
    tau_mem_inv: float = 100.0
    v_leak: float = 0.0
    v_th: float = 1.0
    v_reset: float = 0.0
    dt: float = 0.001
    surrogate: Surrogate = field(default_factory=lambda: SuperSpike(1.0, 1.0))

    name = "current_lif"

    def __post_init__(self):
        if not isinstance(self.surrogate, Surrogate):
            raise TypeError(f"surrogate must be a ratebp_compile.nn.surrogate.Surrogate, got {self.surrogate!r}")
        for f in ("tau_syn_inv", "tau_mem_inv", "v_leak", "v_th", "v_reset", "dt"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"CurrentLIFDynamics.{f} must be a float, got {value!r}")

    # -- Family --------------------------------------------------------------------------------
    def init_state(self, x0):
        return (torch.full_like(x0, self.v_leak), torch.zeros_like(x0))

    def step(self, x_t, state, params):
        """One step from ``(v_{t−1}, i_{t−1})``: ``(z_t, (v_t, i_t))``."""
        v, i = state
        j = i + x_t
        v_decayed = v + self.dt * self.tau_mem_inv * ((self.v_leak - v) + j)
        i = j + -self.dt * self.tau_syn_inv * j
        z = spike(v_decayed - self.v_th, self.surrogate, strict=True)
        v = (1 - z) * v_decayed + z * self.v_reset
        return z, (v, i)

    # -- closed-form spike pass ----------------------------------------------------------------
    @torch.no_grad()
    def scan(self, x_seq, carry, params, spike_dtype=None):
        if carry is None:
            v, i = self.init_state(x_seq[0])
            carry = _Carry(v, i, torch.zeros_like(v), torch.zeros_like(v), torch.zeros_like(v), torch.zeros_like(v))
        a, nb = self.dt * self.tau_mem_inv, -self.dt * self.tau_syn_inv      # as ``step`` computes them
        v, i, dv, di = carry.v, carry.i, carry.dv, carry.di
        spikes = torch.empty(x_seq.shape, dtype=spike_dtype or x_seq.dtype, device=x_seq.device)
        for t in range(x_seq.shape[0]):
            j, dj = i + x_seq[t], di + 1.0
            v_decayed = v + a * ((self.v_leak - v) + j)
            dv_decayed = dv + a * (dj - dv)
            i, di = j + nb * j, dj + nb * dj
            u = v_decayed - self.v_th
            z = (u > 0).to(u.dtype)
            dz = self.surrogate.grad(u) * dv_decayed
            v = (1 - z) * v_decayed + z * self.v_reset
            dv = (1 - z) * dv_decayed + (self.v_reset - v_decayed) * dz
            carry.r += z
            carry.e += dz
            spikes[t] = z
        carry.v, carry.i, carry.dv, carry.di = v, i, dv, di
        carry.steps += x_seq.shape[0]
        return spikes, carry

    def finish(self, carry, params, dtype):
        return ((carry.r / carry.steps).to(dtype), (carry.e / carry.steps).to(dtype))

    def describe(self) -> str:
        parts = [f"τ_syn⁻¹={self.tau_syn_inv:g}", f"τ_mem⁻¹={self.tau_mem_inv:g}", f"dt={self.dt:g}",
                 f"V_th={self.v_th:g} (fires above)", f"hard reset to {self.v_reset:g}"]
        if self.v_leak:
            parts.append(f"rests at {self.v_leak:g}")
        parts.append("reset not detached")
        parts.append(f"{self.surrogate.name}({self.surrogate.width:g})")
        return f"CurrentLIF({', '.join(parts)})"

    def label(self) -> str:
        return f"a={self.dt * self.tau_mem_inv:g} b={self.dt * self.tau_syn_inv:g} Vth={self.v_th:g}"

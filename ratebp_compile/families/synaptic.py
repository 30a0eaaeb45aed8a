"""The Synaptic family: snnTorch's ``Synaptic`` neuron (a synaptic current and a membrane), exactly as
snnTorch 1.0 computes it.

Per element, with the notation of ``families.leaky`` (x_t input, m_t the stored membrane, θ, g,
H(u) = [u > 0], r_t = H(m_{t−1} − θ) detached) and α = clamp(alpha, 0, 1), β = clamp(beta, 0, 1),
syn_0 = m_0 = 0:

    syn_t = α·syn_{t−1} + x_t                      (every mode: a reset never touches the current)

    m̃_t = β·m_{t−1} + syn_t − r_t·θ              reset "subtract"
    m̃_t = (β·m_{t−1} + syn_t) − (β·m_{t−1} + syn_t)·r_t
                                                    reset "zero": the whole candidate is zeroed, the new
                                                    current included (unlike Leaky's zero reset)
    m̃_t = β·m_{t−1} + syn_t                        reset "none"

    s_t = g·H(m̃_t − θ)                             (snnTorch gives Synaptic g = 1; a g set afterwards
                                                    on the module is honoured)

and m_t from m̃_t as for Leaky: m_t = m̃_t with reset_delay=True; with reset_delay=False
m_t = m̃_t − (s_t/g − r_t)·θ ("subtract"), m̃_t − (s_t/g − r_t)·m̃_t ("zero"), m̃_t ("none"), not
detached.

alpha, beta, threshold and g are each a float or (None) a parameter, passed to ``step`` in the order
``params`` names them. The state is ``(syn, m)``, the order of snnTorch's outputs ``(spk, syn, mem)``.
The eligibility has a closed form (``leaky.closed_form_scan``: the current's and the membrane's
sensitivities carried through the same recurrence), tested against forward-mode AD through ``step``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from ..nn.surrogate import ATan, Surrogate
from .base import Family
from .leaky import SnnTorchConstants, fire_and_reset, reset_signal

__all__ = ["SynapticDynamics"]


@dataclass(frozen=True)
class SynapticDynamics(SnnTorchConstants, Family):
    """The constants of one snnTorch ``Synaptic`` neuron (see the module docstring for the equations).

    alpha:                 α (the current's decay) before clamping to [0, 1]; None: a parameter.
    beta:                  β (the membrane's decay) before clamping to [0, 1]; None: a parameter.
    threshold, reset, reset_delay, surrogate, graded_spikes_factor, params: as ``LeakyDynamics``'s
    (canonical parameter order alpha, beta, threshold, graded_spikes_factor).
    """

    alpha: Optional[float] = None
    beta: Optional[float] = None
    threshold: Optional[float] = 1.0
    reset: str = "subtract"
    reset_delay: bool = True
    surrogate: Surrogate = field(default_factory=lambda: ATan(2.0))
    graded_spikes_factor: Optional[float] = 1.0
    params: Tuple[str, ...] = ()

    name = "synaptic"
    CONSTANTS = ("alpha", "beta", "threshold", "graded_spikes_factor")
    CLAMPED = ("alpha", "beta")

    def __post_init__(self):
        self._validate()

    def init_state(self, x0):
        return (torch.zeros_like(x0), torch.zeros_like(x0))

    def step(self, x_t, state, params):
        """One step from ``(syn_{t−1}, m_{t−1})``: ``(s_t, (syn_t, m_t))``."""
        c = self.constants(params)
        syn, m = state
        alpha, beta, th = c["alpha"], c["beta"], c["threshold"]
        r = reset_signal(m, th)
        syn = alpha * syn + x_t
        h = beta * m + syn
        if self.reset == "subtract":
            h = h - r * th
        elif self.reset == "zero":
            h = h - h * r
        s, m = fire_and_reset(self, h, r, th, c["graded_spikes_factor"])
        return s, (syn, m)

    # -- closed-form spike pass ----------------------------------------------------------------
    def _candidate(self, x_t, c, dc, state, dstate, r, directions):
        """m̃_t and its sensitivities, and the new current with its: ``(h, dh, ((syn,), (dsyn,)))``."""
        (syn, m), (dsyn, dm) = state, dstate
        syn_next = c["alpha"] * syn + x_t
        dsyn_next = {d: dc["alpha"][d] * syn + c["alpha"] * dsyn[d] + (1.0 if d is None else 0.0)
                     for d in directions}
        h = c["beta"] * m + syn_next
        dh = {d: dc["beta"][d] * m + c["beta"] * dm[d] + dsyn_next[d] for d in directions}
        if self.reset == "subtract":
            h = h - r * c["threshold"]
            dh = {d: dh[d] - r * dc["threshold"][d] for d in directions}
        elif self.reset == "zero":
            h = h - h * r
            dh = {d: dh[d] - dh[d] * r for d in directions}
        return h, dh, ((syn_next,), (dsyn_next,))

    def describe(self) -> str:
        return f"Synaptic({self._describe_constant('α', 'alpha')}, {self._describe_constant('β', 'beta')}, " \
               f"{self._describe_constant('θ', 'threshold')}, {self._describe_tail()}, fires above θ)"

    def label(self) -> str:
        return f"{self._describe_constant('α', 'alpha')} {self._describe_constant('β', 'beta')} " \
               f"{self._describe_constant('θ', 'threshold')}"

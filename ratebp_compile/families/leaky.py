"""The Leaky family: snnTorch's ``Leaky`` neuron, exactly as snnTorch 1.0 computes it.

Per element, with x_t the input current, m_t the membrane the neuron stores (and returns) after step
t, m_0 = 0, θ the threshold, β = clamp(beta, 0, 1), g the graded spikes factor, H(u) = [u > 0]
(strict: a membrane exactly at the threshold does not fire) and ψ the surrogate derivative of H:

    r_t = H(m_{t−1} − θ)                          the reset signal, detached (no gradient, no tangent)

    m̃_t = β·m_{t−1} + x_t − r_t·θ                 reset "subtract"
    m̃_t = β·(1 − r_t)·m_{t−1} + x_t               reset "zero" (zeroes the old membrane, keeps x_t)
    m̃_t = β·m_{t−1} + x_t                          reset "none"

    s_t = g·H(m̃_t − θ)

    m_t = m̃_t                                      reset_delay=True (snnTorch's default): the reset a
                                                    spike causes acts at the next step, through r_{t+1}
    m_t = m̃_t − (s_t/g − r_t)·θ                   reset_delay=False, "subtract"
    m_t = m̃_t − (s_t/g − r_t)·m̃_t                 reset_delay=False, "zero"
    m_t = m̃_t                                      reset_delay=False, "none"

With reset_delay=True the stored membrane is the pre-reset one that produced s_t, and r_t = s_{t−1}/g.
With reset_delay=False the immediate reset is *not* detached (s_t carries ψ: ∂m_t/∂m̃_t = 1 − ψ·θ at a
spike for "subtract"), and r_t reads the post-reset membrane (1 only where it is still above θ).
β gets a gradient only while 0 ≤ beta ≤ 1 (the clamp's derivative, inclusive at both ends); θ gets one
through the firing step and through −r_t·θ and −(s_t/g − r_t)·θ; g through s_t = g·H (it cancels in
s_t/g, which snnTorch computes literally, and so does this family).

beta, threshold and g are each a float or, where the field is None, one of the neuron's parameters
(tensors broadcast against the input: a learned scalar, or one value per channel), passed to ``step``
in the order ``params`` names them. The state is ``(m,)``: r_t is a function of m_{t−1}, so nothing
else is needed. The eligibility has a closed form (:func:`closed_form_scan`: the sensitivities to the
input and to each learnable constant carried through the same recurrence, in one loop), tested against
forward-mode AD through ``step`` (``Family.scan``).

Fused kernels: with β, θ constant, g = 1 and the delayed "subtract" or "zero" reset (snnTorch's
defaults but for learn_beta), the neuron is a LIF with a delayed reset firing strictly above θ
(:meth:`LeakyDynamics.as_lif`: λ = clamp(β), soft or hard-to-0 reset, detached) and runs the LIF
family's fused ops wherever that one would.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, Optional, Tuple, Union

import torch

from ..nn.surrogate import ATan, Surrogate, spike
from .base import Family, Params
from .lif import LIFDynamics

__all__ = ["LeakyDynamics", "SnnTorchConstants", "RESETS", "reset_signal", "fire_and_reset"]

RESETS = ("subtract", "zero", "none")

Value = Union[float, torch.Tensor]


def _clamp01(v: Value) -> Value:
    """clamp(v, 0, 1), as snnTorch applies it to beta and alpha at every step."""
    if isinstance(v, torch.Tensor):
        return v.clamp(0, 1)
    return min(max(v, 0.0), 1.0)


def reset_signal(m: torch.Tensor, threshold: Value) -> torch.Tensor:
    """r_t = H(m_{t−1} − θ), detached: 1 where the stored membrane is above the threshold."""
    u = (m - threshold).detach()
    return (u > 0).to(u.dtype)


def fire_and_reset(dyn, h: torch.Tensor, r: torch.Tensor, threshold: Value, g: Value):
    """``(s_t, m_t)`` from the candidate membrane m̃_t = ``h``: the spike g·H(m̃_t − θ), then (with
    ``reset_delay=False``) snnTorch's immediate reset by (s_t/g − r_t)."""
    s = spike(h - threshold, dyn.surrogate, strict=True)
    unit = not isinstance(g, torch.Tensor) and g == 1.0       # s·1 and s/1 are s, value and derivative
    if not unit:
        s = s * g
    if dyn.reset_delay or dyn.reset == "none":
        return s, h
    do_reset = (s if unit else s / g) - r
    if dyn.reset == "subtract":
        return s, h - do_reset * threshold
    return s, h - do_reset * h


@dataclass
class _Carry:
    """The closed-form spike pass's state between chunks: the state and its sensitivity to each direction
    (None: the input; else a constant's name), the sums of the spikes and of their sensitivities, the steps."""

    state: tuple
    dstate: tuple
    r: torch.Tensor
    e: Dict[Optional[str], torch.Tensor]
    steps: int = 0


@torch.no_grad()
def closed_form_scan(dyn, x_seq, carry, params, spike_dtype=None):
    """The spike pass of a snnTorch family with its eligibilities in closed form: the recurrence carries,
    next to the state, its sensitivity to each direction — an input held constant in time, and each learnable
    constant (one per element) — so that e = mean_t ds_t, with ds = g·ψ·(dm̃ − dθ) + dg·H (and the immediate
    reset's terms). What forward-mode AD through ``step`` computes (``Family.scan``, the test oracle); the
    family gives the candidate membrane (``_candidate``)."""
    raw = dict(zip(dyn.params, params))
    c = dyn.constants(tuple(p.detach() for p in params))
    directions = (None,) + tuple(dyn.params)
    # d(constant)/d(direction): 1 for a constant's own direction (through the clamp for β and α), else 0
    dc = {}
    for name in dyn.CONSTANTS:
        own = 1.0
        if name in dyn.CLAMPED and name in raw:
            own = ((raw[name] >= 0) & (raw[name] <= 1)).to(x_seq.dtype)
        dc[name] = {d: own if d == name else 0.0 for d in directions}
    th, g = c["threshold"], c["graded_spikes_factor"]
    unit = not isinstance(g, torch.Tensor) and g == 1.0
    if carry is None:
        state = tuple(dyn.init_state(x_seq[0]))
        carry = _Carry(state, tuple({d: torch.zeros_like(v) for d in directions} for v in state),
                       torch.zeros_like(state[-1]), {d: torch.zeros_like(state[-1]) for d in directions})
    state, dstate = carry.state, carry.dstate
    spikes = torch.empty(x_seq.shape, dtype=spike_dtype or x_seq.dtype, device=x_seq.device)
    for t in range(x_seq.shape[0]):
        m = state[-1]
        r = ((m - th) > 0).to(m.dtype)
        h, dh, rest = dyn._candidate(x_seq[t], c, dc, state, dstate, r, directions)
        u = h - th
        fired = (u > 0).to(u.dtype)
        psi = dyn.surrogate.grad(u)
        du = {d: dh[d] - dc["threshold"][d] for d in directions}
        s = fired if unit else fired * g
        for d in directions:
            ds = psi * du[d] if unit else g * psi * du[d]
            carry.e[d] += ds + dc["graded_spikes_factor"][d] * fired
        if dyn.reset_delay or dyn.reset == "none":
            m, dm = h, dh
        else:
            do_reset = (fired if unit else s / g) - r
            if dyn.reset == "subtract":
                m = h - do_reset * th
                dm = {d: dh[d] - psi * du[d] * th - do_reset * dc["threshold"][d] for d in directions}
            else:
                m = h - do_reset * h
                dm = {d: dh[d] - psi * du[d] * h - do_reset * dh[d] for d in directions}
        state, dstate = (rest[0] + (m,), rest[1] + (dm,)) if rest else ((m,), (dm,))
        carry.r += s
        spikes[t] = s
    carry.state, carry.dstate = state, dstate
    carry.steps += x_seq.shape[0]
    return spikes, carry


def closed_form_finish(dyn, carry, params, dtype):
    """``(r, e, *e_params)`` averaged over the steps scanned, in ``dtype``."""
    out = (carry.r, carry.e[None]) + tuple(carry.e[name] for name in dyn.params)
    return tuple((t / carry.steps).to(dtype) for t in out)


class SnnTorchConstants:
    """What snnTorch's Leaky and Synaptic families share: constants that are floats or parameters."""

    #: The constants that may be parameters, in their canonical order.
    CONSTANTS: ClassVar[Tuple[str, ...]] = ()
    #: Those clamped to [0, 1] at every step.
    CLAMPED: ClassVar[Tuple[str, ...]] = ()

    def _candidate(self, x_t, c, dc, state, dstate, r, directions):
        """m̃_t and its sensitivities (see :func:`closed_form_scan`); each family defines its own."""
        raise NotImplementedError

    scan = closed_form_scan

    def finish(self, carry, params, dtype):
        return closed_form_finish(self, carry, params, dtype)

    def _validate(self) -> None:
        if self.reset not in RESETS:
            raise ValueError(f"reset must be one of {RESETS}, got {self.reset!r}")
        if not isinstance(self.surrogate, Surrogate):
            raise TypeError(f"surrogate must be a ratebp_compile.nn.surrogate.Surrogate, got {self.surrogate!r}")
        object.__setattr__(self, "reset_delay", bool(self.reset_delay))
        for name in self.CONSTANTS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))
        learned = tuple(n for n in self.CONSTANTS if getattr(self, n) is None)
        params = tuple(self.params) if self.params else learned
        if len(set(params)) != len(params) or set(params) != set(learned):
            raise ValueError(f"params must name each constant that is a parameter (None) once: {learned}, got "
                             f"{params}")
        object.__setattr__(self, "params", params)

    def constants(self, params: Params) -> Dict[str, Value]:
        """Each constant: its float, or its parameter (from ``params``, in the order of ``self.params``);
        beta (and alpha) clamped to [0, 1]."""
        given = dict(zip(self.params, params))
        out = {}
        for name in self.CONSTANTS:
            value = given[name] if name in given else getattr(self, name)
            out[name] = _clamp01(value) if name in self.CLAMPED else value
        return out

    @property
    def binary(self) -> bool:  # type: ignore[override]
        """Spikes are 0/1 only with a graded spikes factor of exactly 1."""
        return self.graded_spikes_factor == 1.0

    def _describe_constant(self, symbol: str, name: str) -> str:
        value = getattr(self, name)
        return f"{symbol} learned" if value is None else f"{symbol}={value:g}"

    def _describe_tail(self) -> str:
        parts = [f"{self.reset} reset" + ("" if self.reset == "none" else
                                          (" (next step)" if self.reset_delay else " (immediate)"))]
        if self.graded_spikes_factor != 1.0:
            parts.append(self._describe_constant("g", "graded_spikes_factor"))
        parts.append(f"{self.surrogate.name}({self.surrogate.width:g})")
        return ", ".join(parts)


@dataclass(frozen=True)
class LeakyDynamics(SnnTorchConstants, Family):
    """The constants of one snnTorch ``Leaky`` neuron (see the module docstring for the equations).

    beta:                  β before clamping to [0, 1]; None where it is a parameter.
    threshold:             θ; None where it is a parameter.
    reset:                 "subtract", "zero" or "none" (the update snnTorch chose at construction).
    reset_delay:           True: a spike's reset acts at the next step; False: at once (not detached).
    surrogate:             ψ, the derivative of the firing step (snnTorch's default: atan(2)).
    graded_spikes_factor:  g, the spike's amplitude; None where it is a parameter.
    params:                the names of the constants that are parameters, in the order ``step`` receives
                           them (default: their canonical order beta, threshold, graded_spikes_factor).
    """

    beta: Optional[float] = None
    threshold: Optional[float] = 1.0
    reset: str = "subtract"
    reset_delay: bool = True
    surrogate: Surrogate = field(default_factory=lambda: ATan(2.0))
    graded_spikes_factor: Optional[float] = 1.0
    params: Tuple[str, ...] = ()

    name = "leaky"
    CONSTANTS = ("beta", "threshold", "graded_spikes_factor")
    CLAMPED = ("beta",)

    def __post_init__(self):
        self._validate()

    def init_state(self, x0):
        return (torch.zeros_like(x0),)

    def step(self, x_t, state, params):
        """One step from ``(m_{t−1},)``: ``(s_t, (m_t,))``."""
        c = self.constants(params)
        (m,) = state
        beta, th = c["beta"], c["threshold"]
        r = reset_signal(m, th)
        keep = 1 - r
        if self.reset == "zero":
            m = keep * m
        h = beta * m + x_t
        if self.reset == "subtract":
            h = h - r * th
        s, m = fire_and_reset(self, h, r, th, c["graded_spikes_factor"])
        return s, (m,)

    # -- closed-form spike pass ----------------------------------------------------------------
    def _candidate(self, x_t, c, dc, state, dstate, r, directions):
        """m̃_t and its sensitivities, from ``(m,)`` and its sensitivities ``({direction: dm},)``."""
        (m,), (dm,) = state, dstate
        keep = 1 - r
        m0, dm0 = (keep * m, {d: keep * v for d, v in dm.items()}) if self.reset == "zero" else (m, dm)
        h = c["beta"] * m0 + x_t
        dh = {d: dc["beta"][d] * m0 + c["beta"] * dm0[d] + (1.0 if d is None else 0.0) for d in directions}
        if self.reset == "subtract":
            h = h - r * c["threshold"]
            dh = {d: dh[d] - r * dc["threshold"][d] for d in directions}
        return h, dh, ()

    # -- fused kernels -------------------------------------------------------------------------
    def as_lif(self) -> Optional[LIFDynamics]:
        """The same neuron in the LIF family, where there is one: β, θ constants, g = 1, the reset
        delayed and "subtract" (soft) or "zero" (hard to 0); else None. Step by step the LIF computes
        the same values in the same order (β·m + x − r·θ; β·((1 − r)·m) + x)."""
        if self.beta is None or self.threshold is None or self.graded_spikes_factor != 1.0 or \
                not self.reset_delay or self.reset == "none":
            return None
        return LIFDynamics(decay=_clamp01(self.beta), v_threshold=self.threshold,
                           v_reset=None if self.reset == "subtract" else 0.0, detach_reset=True,
                           surrogate=self.surrogate, strict=True, delayed_reset=True)

    def fusable(self, x) -> bool:
        lif = self.as_lif()
        return lif is not None and lif.fusable(x)

    def op_args(self, params: Params) -> tuple:
        return self.as_lif().op_args(params)

    def fused_multistep(self, x_seq, params):
        return self.as_lif().fused_multistep(x_seq, params)

    def fused_spike_pass(self, x_seq, params):
        return self.as_lif().fused_spike_pass(x_seq, params)

    def fused_scan(self, x_seq, carry, params):
        return self.as_lif().fused_scan(x_seq, carry, params)

    def fused_finish(self, carry, steps: int, params, shape, dtype):
        return self.as_lif().fused_finish(carry, steps, params, shape, dtype)

    def describe(self) -> str:
        return f"Leaky({self._describe_constant('β', 'beta')}, {self._describe_constant('θ', 'threshold')}, " \
               f"{self._describe_tail()}, fires above θ)"

    def label(self) -> str:
        return f"{self._describe_constant('β', 'beta')} {self._describe_constant('θ', 'threshold')}"

"""The LIF family: LIF, IF, ParametricLIF, and the same dynamics as other libraries define them.

Per element, from rest, with the membrane u measured in volts:

    h_t = u_rest + λ·(u_{t−1} − u_rest) + c_t            (decay_input=False; IF is λ = 1)
    h_t = u_rest + λ·(u_{t−1} − u_rest) + (1 − λ)·c_t    (decay_input=True)
    s_t = Θ(h_t − V_th)        Θ(x) = [x ≥ 0], or [x > 0] where ``strict``
    u_t = h_t − V_th'·s_t      soft reset (v_reset=None; V_th' = V_th − u_rest)
    u_t = (1 − s_t)·h_t + s_t·v_reset                     hard reset

With ``delayed_reset`` (snnTorch's ``Leaky``, whose ``LeakyDynamics`` runs the fused kernels as this
family) a spike's reset acts one step later and the membrane kept is the one before reset: with
r_t = Θ(u_{t−1} − V_th) (no gradient), h_t = u_rest + λ·(u_{t−1} − u_rest) + c_t − V_th'·r_t (soft) or
h_t = u_rest + λ·((1 − r_t)·u_{t−1} + r_t·v_reset − u_rest) + c_t (hard), and u_t = h_t.

u_0 = u_rest before the first step. ``rc.nn.LIF`` rests at 0; SpikingJelly's neurons rest at their
``v_reset`` (0 for a soft reset), Norse's box neuron at ``v_leak``. Measured from rest (v = u − u_rest)
the dynamics are exactly those of ``kernels.lif_math`` with V_th − u_rest and v_reset − u_rest, which
is how this family runs them: the fused kernels and the closed-form spike pass need no rest term.

The eligibility has a closed form (``kernels.lif_math``'s docstring): the spike pass runs
``lif_math.lif_spike_scan`` on CPU (or the kernels' reference) and the fused custom ops where
:meth:`LIFDynamics.fusable` says so. A learned decay is λ = 1 − sigmoid(w) with w the neuron's first
parameter (ParametricLIF; SpikingJelly's ParametricLIFNode uses the same parametrisation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from ..kernels import lif as ops
from ..kernels import lif_math as M
from ..nn.surrogate import Sigmoid, Surrogate, spike
from .base import Family, Params

__all__ = ["LIFDynamics", "spec_from_op_args"]


@dataclass(frozen=True)
class LIFDynamics(Family):
    """The constants of one LIF-family neuron.

    decay:        λ; None where it is learned (λ = 1 − sigmoid(w), w the first parameter).
    decay_input:  scale the input by 1 − λ.
    v_threshold:  V_th, in the neuron's own volts.
    v_reset:      None for a soft reset (subtract V_th − u_rest), else the potential a spike resets to.
    detach_reset: treat the spike in the reset as a constant for gradients.
    surrogate:    ψ, the pseudo-derivative of the firing step.
    v_rest:       u_rest, the potential the membrane starts at and leaks toward.
    strict:       fire only above the threshold (h > V_th) instead of at or above it.
    delayed_reset: a spike's reset acts at the next step; the membrane kept is the one before reset
                  (needs detach_reset: the delayed reset has no gradient).
    """

    decay: Optional[float] = 0.5
    decay_input: bool = False
    v_threshold: float = 1.0
    v_reset: Optional[float] = None
    detach_reset: bool = True
    surrogate: Surrogate = field(default_factory=lambda: Sigmoid(4.0))
    v_rest: float = 0.0
    strict: bool = False
    delayed_reset: bool = False

    def __post_init__(self):
        if not isinstance(self.surrogate, Surrogate):
            raise TypeError(f"surrogate must be a ratebp_compile.nn.surrogate.Surrogate, got {self.surrogate!r}")
        M.check_delayed_reset(self.delayed_reset, self.detach_reset)

    @property
    def learned_decay(self) -> bool:
        return self.decay is None

    @property
    def name(self) -> str:  # type: ignore[override]
        if self.learned_decay:
            return "plif"
        return "if" if self.decay == 1.0 and not self.decay_input else "lif"

    # -- measured from rest --------------------------------------------------------------------
    # (no arithmetic when u_rest is 0: under torch.compile a threshold may be a symbolic float, which the
    # backend specialises only where the fused op reads it directly)
    @property
    def _threshold(self) -> float:
        return self.v_threshold - self.v_rest if self.v_rest else self.v_threshold

    @property
    def _reset_to(self) -> Optional[float]:
        if self.v_reset is None or not self.v_rest:
            return self.v_reset
        return self.v_reset - self.v_rest

    def _lam(self, params: Params):
        """λ (a float, or a tensor for a learned decay) and dλ/dw."""
        if self.learned_decay:
            return M.decay_from_logit(params[0])
        return self.decay, 0.0

    # -- Family --------------------------------------------------------------------------------
    def init_state(self, x0):
        return (torch.zeros_like(x0),)

    def step(self, x_t, state, params):
        """One differentiable step from (v_{t−1},) measured from rest: ``(s_t, (v_t,))``."""
        lam, _ = self._lam(params)
        threshold = self._threshold
        v_in, r = M.charged_from(state[0], threshold, self._reset_to, self.strict, self.delayed_reset)
        h = M.charge(v_in, x_t, lam, self.decay_input)
        if self.delayed_reset and self._reset_to is None:
            h = h - r * threshold
        s = spike(h - threshold, self.surrogate, strict=self.strict)
        if self.delayed_reset:
            return s, (h,)
        return s, (M.reset(h, s.detach() if self.detach_reset else s, threshold, self._reset_to),)

    def membrane(self, state):
        return state[0] + self.v_rest if self.v_rest else state[0]

    def describe(self) -> str:
        if self.learned_decay:
            parts = ["λ learned" + (", decay_input" if self.decay_input else "")]
        elif self.name == "lif":
            parts = [f"λ={self.decay:g}" + (", decay_input" if self.decay_input else "")]
        else:
            parts = []
        parts.append(f"V_th={self.v_threshold:g}" + (" (fires above)" if self.strict else ""))
        parts.append(("soft reset" if self.v_reset is None else f"hard reset to {self.v_reset:g}") +
                     (" at the next step" if self.delayed_reset else ""))
        if self.v_rest:
            parts.append(f"rests at {self.v_rest:g}")
        parts.append("reset detached" if self.detach_reset else "reset not detached")
        parts.append(f"{self.surrogate.name}({self.surrogate.width:g})")
        return f"{self.name.upper()}({', '.join(parts)})"

    def label(self) -> str:
        decay = f"λ={self.decay:g}" if self.decay is not None else "λ learned"
        return f"{decay} Vth={self.v_threshold:g}"

    # -- closed-form spike pass ----------------------------------------------------------------
    def _kernel_surrogate(self) -> bool:
        return self.surrogate.name in M.SURROGATE_NAMES

    def _math_kwargs(self):
        psi = self.surrogate.name if self._kernel_surrogate() else self.surrogate.grad
        return dict(decay_input=self.decay_input, v_threshold=self._threshold, v_reset=self._reset_to,
                    detach_reset=self.detach_reset, surrogate=psi, width=float(self.surrogate.width),
                    strict=self.strict, delayed_reset=self.delayed_reset)

    def scan(self, x_seq, carry, params, spike_dtype=None):
        if carry is None:
            carry = M.LIFScan.start(x_seq[0], decay_tangent=self.learned_decay)
        lam, _ = self._lam(tuple(p.detach() for p in params))
        return M.lif_spike_scan(x_seq, carry, lam, spike_dtype=spike_dtype, **self._math_kwargs())

    def finish(self, carry, params, dtype):
        out = carry.finish(dtype)
        if self.learned_decay:
            r, e, e_lam = out
            out = (r, e, (e_lam * M.decay_from_logit(params[0].detach())[1]).to(dtype))
        return out

    # -- fused kernels -------------------------------------------------------------------------
    def fusable(self, x) -> bool:
        """The fused ops compute this neuron on floating-point input (float32/16/bf16 run the Triton
        kernels on CUDA, other cases the ops' PyTorch reference) when its surrogate is one of the
        kernels' four."""
        return self._kernel_surrogate() and isinstance(x, torch.Tensor) and x.dtype.is_floating_point

    def op_args(self, params: Params) -> tuple:
        """The fused ops' arguments after the input: (decay, decay_logit, V_th, v_reset, decay_input,
        detach_reset, surrogate, width, strict, delayed_reset), measured from rest."""
        return (float(self.decay if self.decay is not None else math.nan), params[0] if self.learned_decay else None,
                self._threshold, self._reset_to, self.decay_input, self.detach_reset, self.surrogate.name,
                float(self.surrogate.width), self.strict, self.delayed_reset)

    @classmethod
    def from_op_args(cls, args: dict) -> "LIFDynamics":
        """The dynamics a neuron op's arguments describe (``args`` by name, as in :meth:`op_args`; the
        ops work from rest, so u_rest is 0)."""
        from ..nn.surrogate import SURROGATES

        learned = args["decay_logit"] is not None
        return cls(decay=None if learned else float(args["decay"]), decay_input=bool(args["decay_input"]),
                   v_threshold=float(args["v_threshold"]),
                   v_reset=None if args["v_reset"] is None else float(args["v_reset"]),
                   detach_reset=bool(args["detach_reset"]),
                   surrogate=SURROGATES[args["surrogate"]](float(args["width"])), strict=bool(args["strict"]),
                   delayed_reset=bool(args["delayed_reset"]))

    def fused_multistep(self, x_seq, params) -> torch.Tensor:
        spikes, _ = torch.ops.ratebp.lif_bptt_forward(x_seq, *self.op_args(params))
        return spikes

    def fused_spike_pass(self, x_seq, params) -> Tuple[torch.Tensor, ...]:
        spikes, r, e, e_w = torch.ops.ratebp.lif_spike_pass(x_seq, *self.op_args(params), self.learned_decay, False)
        return (spikes, r, e) + ((e_w,) if self.learned_decay else ())

    def fused_scan(self, x_seq, carry, params):
        """The chunk ``x_seq`` ``[n, ...]`` → (1-byte spikes, state); ``carry`` None starts the scan."""
        if carry is None:
            carry = ops.lif_scan_state(x_seq[0], self.learned_decay)
        return torch.ops.ratebp.lif_spike_scan(x_seq, carry, *self.op_args(params), True), carry

    def fused_finish(self, carry, steps: int, params, shape, dtype):
        return ops.lif_scan_finish(carry, steps, params[0] if self.learned_decay else None, shape, dtype)

    def fused_cell_step(self, x_t, v, params):
        """(spike, v_next) of one step as ``ratebp::lif_cell_step`` (a single-step cell under torch.compile)."""
        return torch.ops.ratebp.lif_cell_step(x_t, v, *self.op_args(params))


def spec_from_op_args(args: dict, time_steps: Optional[int] = None):
    """The ``NeuronSpec`` of the neuron whose fused op (``ratebp::lif_bptt_forward`` or
    ``ratebp::lif_cell_step``, as torch.compile records it) has arguments ``args`` (by name)."""
    from ..nn.spec import NeuronSpec

    dynamics = LIFDynamics.from_op_args(args)
    return NeuronSpec(dynamics, time_steps=time_steps, param_names=("w",) if dynamics.learned_decay else ())

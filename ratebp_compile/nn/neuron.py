"""Spiking neuron modules.

Multi-step neurons (``LIF``, ``IF``, ``ParametricLIF`` and subclasses of ``Neuron``) take the whole
sequence ``[T, B, ...]`` — or ``[T·B, ...]`` when built with ``time_steps=T`` — loop over time inside
and keep no state between calls. Single-step cells (``LIFCell``, ``IFCell``, ``ParametricLIFCell``)
take one step ``[B, ...]`` per call and keep the membrane potential until ``reset()``.

The decay λ of a LIF is given either as ``decay`` or as the time constant ``tau`` (λ = 1 − 1/τ).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..families import LIFDynamics, ModuleDynamics
from ..marks import neuron_mode
from .multistep import register_state_reset
from .spec import NeuronSpec
from .surrogate import Sigmoid, Surrogate

__all__ = ["Neuron", "LIFFamily", "LIF", "IF", "ParametricLIF", "LIFCell", "IFCell", "ParametricLIFCell"]


def _resolve_decay(tau: Optional[float], decay: Optional[float], default_tau: float = 2.0) -> float:
    if tau is not None and decay is not None:
        raise ValueError("give either tau or decay, not both (decay = 1 - 1/tau)")
    if decay is None:
        tau = default_tau if tau is None else float(tau)
        if not tau >= 1.0:
            raise ValueError(f"tau must be >= 1 (decay = 1 - 1/tau in [0, 1)), got {tau}")
        return 1.0 - 1.0 / tau
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    return decay


def _check_surrogate(surrogate) -> Surrogate:
    if not isinstance(surrogate, Surrogate):
        raise TypeError(f"surrogate must be a ratebp_compile.nn.surrogate.Surrogate (Sigmoid(4.0), ATan(2.0), "
                        f"Rectangular(1.0), Triangle(1.0), ...), got {surrogate!r}")
    return surrogate


class Neuron(nn.Module):
    """Base class of multi-step neurons; subclass it to define your own elementwise neuron.

    A subclass defines ``init_state(x0) -> state`` (a tuple of tensors shaped like one step) and
    ``step(x_t, state) -> (spike_t, state)``, firing with ``ratebp_compile.nn.spike(u, surrogate)``.
    ``forward`` runs the steps over ``[T, B, ...]`` with autograd; the compiler derives the
    neuron's eligibility by forward-mode AD through ``step``. ``time_steps=T`` makes the neuron take
    ``[T·B, ...]`` (time-major) instead.
    """

    def __init__(self, time_steps: Optional[int] = None):
        super().__init__()
        if time_steps is not None and (not isinstance(time_steps, int) or time_steps < 1):
            raise ValueError(f"time_steps must be a positive int or None, got {time_steps!r}")
        self.time_steps = time_steps

    def init_state(self, x0: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return (torch.zeros_like(x0),)

    def step(self, x_t: torch.Tensor, state: Tuple[torch.Tensor, ...]):
        raise NotImplementedError(f"{type(self).__name__} must define step(x_t, state) -> (spike, state)")

    def _sequence(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__} expects [T, B, ...] (or [T*B, ...] with time_steps), "
                             f"got a tensor of shape {tuple(x.shape)}")
        if self.time_steps is None:
            return x
        if x.shape[0] % self.time_steps:
            raise ValueError(f"{type(self).__name__}(time_steps={self.time_steps}) got a first dimension of "
                             f"{x.shape[0]}, which is not a multiple of T")
        return x.view(self.time_steps, x.shape[0] // self.time_steps, *x.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_seq = self._sequence(x)
        state = self.init_state(x_seq[0])
        spikes = []
        for t in range(x_seq.shape[0]):
            s, state = self.step(x_seq[t], state)
            spikes.append(s)
        return torch.stack(spikes).view(x.shape)

    def spec(self) -> NeuronSpec:
        names = tuple(n for n, p in self.named_parameters() if p.requires_grad)
        return NeuronSpec(ModuleDynamics(self, names), time_steps=self.time_steps, param_names=names)


class LIFFamily(Neuron):
    """Shared arguments of LIF, IF and ParametricLIF (and their cells): a neuron whose dynamics
    (``ratebp_compile.families.lif``) are a function of its attributes."""

    def __init__(self, decay_input: bool, v_threshold: float, v_reset: Optional[float], detach_reset: bool,
                 surrogate: Surrogate, time_steps: Optional[int]):
        super().__init__(time_steps)
        self.decay_input = bool(decay_input)
        self.v_threshold = float(v_threshold)
        self.v_reset = None if v_reset is None else float(v_reset)
        self.detach_reset = bool(detach_reset)
        self.surrogate = _check_surrogate(surrogate)

    _param_names: Tuple[str, ...] = ()

    def _decay(self) -> Optional[float]:
        """λ, or None where it is learned."""
        raise NotImplementedError

    def _dynamics(self) -> LIFDynamics:
        return LIFDynamics(decay=self._decay(), decay_input=self.decay_input, v_threshold=self.v_threshold,
                           v_reset=self.v_reset, detach_reset=self.detach_reset, surrogate=self.surrogate)

    def _params(self) -> Tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self._param_names)

    def step(self, x_t, state):
        return self._dynamics().step(x_t, state, self._params())

    def spec(self) -> NeuronSpec:
        return NeuronSpec(self._dynamics(), time_steps=self.time_steps, param_names=self._param_names)

    def forward(self, x):
        self._sequence(x)                  # checks the shape
        if torch.compiler.is_compiling():
            x = neuron_mode(x, self.training)
        spec = self.spec()
        if spec.fusable(x):                # the fused BPTT custom op (one node for torch.compile)
            spec = spec.with_fused()
        return spec(x, *self._params())

    def extra_repr(self):
        reset = "soft" if self.v_reset is None else f"hard({self.v_reset:g})"
        out = (f"v_threshold={self.v_threshold:g}, reset={reset}, detach_reset={self.detach_reset}, "
               f"surrogate={self.surrogate}")
        return out + (f", time_steps={self.time_steps}" if self.time_steps else "")


class LIF(LIFFamily):
    """Leaky integrate-and-fire over ``[T, B, ...]``: h_t = λ·v_{t−1} + c_t, fire at V_th, reset.

    Args:
        tau, decay: the leak, as a time constant (λ = 1 − 1/τ) or directly as λ (default τ = 2).
        decay_input: h_t = λ·v_{t−1} + (1 − λ)·c_t instead.
        v_threshold: V_th.
        v_reset: None for a soft reset (subtract V_th), a float for a hard reset to that value.
        detach_reset: treat the spike in the reset as a constant for gradients.
        surrogate: the pseudo-derivative of the firing step (default ``Sigmoid(alpha=4.0)``).
        time_steps: take ``[T·B, ...]`` with this T instead of ``[T, B, ...]``.
    """

    def __init__(self, tau: Optional[float] = None, decay: Optional[float] = None, *, decay_input: bool = False,
                 v_threshold: float = 1.0, v_reset: Optional[float] = None, detach_reset: bool = True,
                 surrogate: Surrogate = Sigmoid(4.0), time_steps: Optional[int] = None):
        super().__init__(decay_input, v_threshold, v_reset, detach_reset, surrogate, time_steps)
        self.decay = _resolve_decay(tau, decay)

    def _decay(self):
        return self.decay

    def extra_repr(self):
        return f"decay={self.decay:g}, decay_input={self.decay_input}, " + super().extra_repr()


class IF(LIFFamily):
    """Integrate-and-fire over ``[T, B, ...]``: h_t = v_{t−1} + c_t (a LIF with λ = 1)."""

    def __init__(self, *, v_threshold: float = 1.0, v_reset: Optional[float] = None, detach_reset: bool = True,
                 surrogate: Surrogate = Sigmoid(4.0), time_steps: Optional[int] = None):
        super().__init__(False, v_threshold, v_reset, detach_reset, surrogate, time_steps)

    def _decay(self):
        return 1.0


class ParametricLIF(LIFFamily):
    """LIF with a learnable leak (Fang et al., 2021): 1/τ = sigmoid(w), λ = 1 − sigmoid(w).

    ``init_tau`` sets w = −log(τ − 1). As in that paper ``decay_input`` defaults to True:
    h_t = λ·v_{t−1} + (1 − λ)·c_t. Other arguments as for :class:`LIF`.
    """

    def __init__(self, init_tau: float = 2.0, *, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: Optional[float] = None, detach_reset: bool = True, surrogate: Surrogate = Sigmoid(4.0),
                 time_steps: Optional[int] = None):
        super().__init__(decay_input, v_threshold, v_reset, detach_reset, surrogate, time_steps)
        if not init_tau > 1.0:
            raise ValueError(f"init_tau must be > 1, got {init_tau}")
        self.w = nn.Parameter(torch.tensor(-math.log(init_tau - 1.0)))

    _param_names = ("w",)

    def _decay(self):
        return None

    def extra_repr(self):
        return f"tau={1.0 / torch.sigmoid(self.w.detach()).item():.4g}, decay_input={self.decay_input}, " + \
            super().extra_repr()


class _Cell:
    """Mixin that turns a multi-step LIF-family neuron into a single-step cell: ``forward(x_t)`` takes
    one step ``[B, ...]`` and keeps the membrane potential in ``self.v`` until ``reset()``."""

    v: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.v = None

    def forward(self, x_t: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            x_t = neuron_mode(x_t, self.training)
        dynamics = self._dynamics()
        if dynamics.fusable(x_t):          # one custom-op node per step for torch.compile
            s, self.v = dynamics.fused_cell_step(x_t, self.v, self._params())
            return s
        s, (self.v,) = self.step(x_t, (torch.zeros_like(x_t) if self.v is None else self.v,))
        return s

    def spec(self) -> NeuronSpec:
        raise TypeError(f"{type(self).__name__} is a single-step neuron; its multi-step spec is that of "
                        f"{type(self).__mro__[2].__name__} (see multistep_spec)")

    def multistep_spec(self, T: int) -> NeuronSpec:
        """The spec of this cell called on T consecutive steps, as one neuron on ``[T·B, ...]``, starting
        from rest (as after ``reset()``)."""
        return dataclasses.replace(super().spec(), time_steps=T)


class LIFCell(_Cell, LIF):
    """Single-step :class:`LIF` (same arguments, ``time_steps`` excepted)."""


class IFCell(_Cell, IF):
    """Single-step :class:`IF`."""


class ParametricLIFCell(_Cell, ParametricLIF):
    """Single-step :class:`ParametricLIF`."""


register_state_reset(_Cell, _Cell.reset)

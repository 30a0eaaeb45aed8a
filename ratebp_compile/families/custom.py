"""User-defined neurons: a subclass of ``ratebp_compile.nn.Neuron`` whose dynamics are its own
``init_state`` and ``step``.

The family holds the module itself (its step reads the module's attributes) and the names of the
learnable parameters the compiler passes as node arguments; the step runs with those parameters
substituted, so that tangents and gradients reach them. The eligibility comes from forward-mode AD
through the step (``Family.scan``). Spikes need not be binary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

import torch
from torch.nn.utils.stateless import _reparametrize_module

from .base import Family

__all__ = ["ModuleDynamics"]


@dataclass(frozen=True, eq=False)
class ModuleDynamics(Family):
    """The dynamics of one neuron module with ``init_state(x0)`` and ``step(x_t, state)``; equal only to
    itself's family (two modules may hold different attributes)."""

    module: torch.nn.Module = field(repr=False)
    param_names: Tuple[str, ...] = ()

    name = "custom"
    binary = False

    def __eq__(self, other):
        return isinstance(other, ModuleDynamics) and other.module is self.module and \
            other.param_names == self.param_names

    def __hash__(self):
        return hash((id(self.module), self.param_names))

    def init_state(self, x0):
        return tuple(self.module.init_state(x0))

    def step(self, x_t, state, params):
        with _reparametrize_module(self.module, dict(zip(self.param_names, params))):
            return self.module.step(x_t, state)

    def multistep(self, x_seq, params):
        return self.module(x_seq) if self.module.time_steps is None else \
            self.module(x_seq.flatten(0, 1)).view(x_seq.shape)

    def describe(self) -> str:
        return f"{type(self.module).__name__} (custom neuron, eligibility by forward-mode AD)"

    def label(self) -> str:
        return type(self.module).__name__

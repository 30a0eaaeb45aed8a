"""Neuron families: one module per family, holding its dynamics, its eligibility, its kernels and
its description (``base`` has the contract and the forward-mode engine every family inherits).

- ``lif``: LIF, IF, ParametricLIF — and the same dynamics resting elsewhere than 0 or firing only
  above the threshold, as SpikingJelly and Norse define them; closed-form eligibility; fused kernels.
- ``leaky``, ``synaptic``: snnTorch's Leaky and Synaptic neurons, exactly as snnTorch computes them;
  closed-form eligibility (the sensitivities carried through their own recurrence).
- ``current_lif``: Norse's current-based LIF (``LIFCell``, ``LIF``: a synaptic current feeding the
  membrane), exactly as Norse computes it; closed-form eligibility.
- ``custom``: any ``ratebp_compile.nn.Neuron`` subclass, by forward-mode AD through its ``step``.

Every closed form is tested against the forward-mode engine for every setting of its family.

A ``NeuronSpec`` pairs a family's dynamics with how the neuron sits in a graph (its time layout and
parameters). Adding a family is one module here plus its tests.
"""
from .base import Family, GenericScan
from .current_lif import CurrentLIFDynamics
from .custom import ModuleDynamics
from .leaky import LeakyDynamics
from .lif import LIFDynamics
from .synaptic import SynapticDynamics

__all__ = ["Family", "GenericScan", "LIFDynamics", "ModuleDynamics", "LeakyDynamics", "SynapticDynamics",
           "CurrentLIFDynamics"]

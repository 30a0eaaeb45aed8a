"""Spiking neurons and surrogate gradients (``ratebp_compile.nn``)."""
from .functional import rate_neuron
from .multistep import MultiStep, register_state_reset
from .neuron import IF, LIF, IFCell, LIFCell, Neuron, ParametricLIF, ParametricLIFCell
from .spec import NeuronSpec, neuron_spec, register_neuron
from .surrogate import ATan, Rectangular, Sigmoid, Surrogate, Triangle, spike

__all__ = [
    "Neuron", "LIF", "IF", "ParametricLIF", "LIFCell", "IFCell", "ParametricLIFCell", "MultiStep",
    "register_state_reset",
    "NeuronSpec", "neuron_spec", "register_neuron",
    "Surrogate", "Sigmoid", "ATan", "Rectangular", "Triangle", "spike",
    "rate_neuron",
]

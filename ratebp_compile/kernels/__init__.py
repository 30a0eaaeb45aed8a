"""Fused neuron kernels registered as ``torch.library`` custom ops (namespace ``ratebp``).

The ops are always registered; they run the Triton kernels on CUDA tensors when Triton is installed
(``triton_available()``), and their PyTorch reference otherwise.
"""
from __future__ import annotations

from . import lif, lif_cell
from ._triton import AVAILABLE as _TRITON
from ._triton import REASON as UNAVAILABLE_REASON

__all__ = ["triton_available", "supports", "lif", "lif_cell", "UNAVAILABLE_REASON"]


def triton_available() -> bool:
    """Whether the Triton kernels can run (Triton installed)."""
    return _TRITON


def supports(spec, x) -> bool:
    """Whether neuron ``spec`` on input ``x`` runs as the fused ops (see ``lif.supports_lif``)."""
    return lif.supports_lif(spec, x)

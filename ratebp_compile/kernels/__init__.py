"""Fused neuron kernels registered as ``torch.library`` custom ops (namespace ``ratebp``).

The ops are always registered; they run the Triton kernels on CUDA tensors when Triton is installed
(``triton_available()``), the spike pass's C loop on CPU tensors (``lif_cpu``), and their PyTorch reference
(``lif_math``) otherwise. ``batchnorm_cpu`` is the spike pass's training-mode BatchNorm on CPU; both C
libraries are built on first use by ``clib``. This package is a leaf: it works on tensors and scalars
and imports nothing else from ``ratebp_compile``; which neuron runs as which op is decided by the
neuron's family (``ratebp_compile.families``).
"""
from __future__ import annotations

from . import lif, lif_cell, lif_math
from ._triton import AVAILABLE as _TRITON
from ._triton import REASON as UNAVAILABLE_REASON

__all__ = ["triton_available", "lif", "lif_cell", "lif_math", "UNAVAILABLE_REASON"]


def triton_available() -> bool:
    """Whether the Triton kernels can run (Triton installed)."""
    return _TRITON

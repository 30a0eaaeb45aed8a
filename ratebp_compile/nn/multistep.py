"""``MultiStep``: a per-step model (one timestep per call, neuron state kept between calls) as a
sequence model (the whole ``[T, B, ...]`` sequence per call, from rest).

Many SNNs are written to be driven one step at a time from the training loop::

    for t in range(T):
        out.append(net(x[t]))            # net's neurons keep their membrane between calls

A compiled step sees one call, so it cannot see that state; the compiler refuses such a model.
``MultiStep(net)`` makes it a sequence model in one line: each call resets the neurons' state, runs
``net`` over the time axis and stacks the per-step outputs (a tuple output is stacked element by
element). Eager, it computes exactly what the user's loop computed after a reset; compiled, its
loop is unrolled and folded into the multi-step form (``passes.fold_time``).
"""
from __future__ import annotations

from typing import Callable, Dict, Type

import torch
from torch import nn

__all__ = ["MultiStep", "register_state_reset"]

_RESETS: Dict[Type[nn.Module], Callable[[nn.Module], None]] = {}


def register_state_reset(cls: Type[nn.Module], reset: Callable[[nn.Module], None]) -> None:
    """How to put a single-step neuron of class ``cls`` back at rest (``ratebp_compile.interop``
    registers those of SpikingJelly and snnTorch; ``rc.nn``'s cells use their ``reset()``)."""
    _RESETS[cls] = reset


def _reset_state(module: nn.Module) -> None:
    from ..interop import load_for

    for m in module.modules():
        load_for(m)
        for cls in type(m).__mro__:
            if cls in _RESETS:
                _RESETS[cls](m)
                break


class MultiStep(nn.Module):
    """Run a per-step module over the time axis: ``[T, B, ...]`` in, the per-step outputs stacked along
    dim 0 out, every neuron from rest at the start of each call. ``module``'s parameters and
    ``state_dict`` keys are reached through ``.module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"MultiStep wraps an nn.Module, got {type(module).__name__}")
        self.module = module

    def forward(self, x_seq: torch.Tensor):
        if isinstance(x_seq, torch.Tensor) and x_seq.dim() < 2:
            raise ValueError(f"MultiStep expects a sequence [T, B, ...], got a tensor of shape {tuple(x_seq.shape)}")
        _reset_state(self.module)
        outs = [self.module(x_t) for x_t in x_seq]
        n = _tuple_length(outs[0])
        if n is not None:
            return tuple(torch.stack([out[i] for out in outs]) for i in range(n))
        return torch.stack(outs)


def _tuple_length(out):
    """The length of a tuple output — also of one the compiler is tracing (a ``torch.fx`` proxy that knows
    its value) — else None."""
    if isinstance(out, tuple):
        return len(out)
    val = getattr(getattr(out, "node", None), "meta", {}).get("val")
    return len(val) if isinstance(val, tuple) else None

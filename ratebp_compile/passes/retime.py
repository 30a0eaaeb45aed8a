"""Copying graph nodes for a different number of timesteps: the rate graph (1 step) and the chunks
of a streamed spike pass (n steps) both run the spike graph's ops on fewer steps than T.

Ops that take a shape (reshape, view, flatten, unflatten, expand, repeat, ...) carry T in their
arguments; :func:`retimed_shape_op` rebuilds them from the recorded output shape with time of length
``steps``. Other values computed from shapes are the spike pass's constants (:func:`is_constant`).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.fx as fx

from ..oprules import OpInfo
from ..time_layout import TimeLayout, rate_shape
from .infra import tensor_val

__all__ = ["is_constant", "retimes", "retimed_shape_op", "retimed_value"]

_CONSTANT_TYPES = (int, float, bool, str, torch.dtype, torch.device, torch.Size, torch.memory_format)


def is_constant(val) -> bool:
    """A Python value (a size, a dtype, ...) rather than a tensor: the spike pass's value is used as is."""
    if isinstance(val, (list, tuple)):
        return len(val) > 0 and all(isinstance(v, _CONSTANT_TYPES) for v in val)
    return isinstance(val, _CONSTANT_TYPES)


def retimed_value(node: fx.Node, T: int, steps: int = 1, dtype: Optional[torch.dtype] = None):
    """``node``'s recorded value on ``steps`` of the T steps (an empty tensor, for shape propagation; in
    ``dtype`` if given); a value without a time axis as it is."""
    val, lay = node.meta.get("val"), node.meta.get("ratebp.time")
    if isinstance(val, torch.Tensor) and isinstance(lay, TimeLayout):
        return val.new_empty(rate_shape(val.shape, lay, T, steps), dtype=dtype or val.dtype)
    return val


def retimes(node: fx.Node, info) -> bool:
    """Whether ``node`` takes a shape that has T in it: a reshape or broadcast with a temporal result."""
    return info is not None and isinstance(node.meta.get("ratebp.time"), TimeLayout) and \
        info.family in ("reshape", "broadcast")


def retimed_shape_op(node: fx.Node, info: OpInfo, x: Any, T: int, steps: int) -> Tuple[str, tuple]:
    """``(method, args)`` of the call that computes ``node`` (a reshape or broadcast, see :func:`retimes`)
    on ``steps`` timesteps instead of T, from ``x``, its first argument as mapped into the new graph."""
    out = rate_shape(node.meta["val"].shape, node.meta.get("ratebp.time"), T, steps)
    if info.family == "broadcast" and info.name in ("repeat", "tile"):
        source = node.args[0]
        x_shape = rate_shape(tensor_val(source).shape, source.meta.get("ratebp.time"), T, steps)
        padded = (1,) * (len(out) - len(x_shape)) + tuple(x_shape)
        return "repeat", (x, tuple(o // i for o, i in zip(out, padded)))
    return ("expand" if info.family == "broadcast" else "reshape"), (x, out)

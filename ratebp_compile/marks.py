"""Marks in the graphs Dynamo captures for the ``ratebp`` backend: functions Dynamo keeps as single nodes
(``allow_in_graph``) that pass their tensor through and carry a setting the backend reads and removes.

- ``step_settings``: a transformed module's settings, on each of its tensor inputs;
- ``neuron_mode``: a neuron module's training flag, on its input (``model.train()``/``eval()`` set it for
  every neuron), which tells the backend whether the graph is a training step (``options.step_kind``).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch._subclasses.fake_tensor import FakeTensor

from .errors import RateBPError

__all__ = ["step_settings", "neuron_mode"]


@torch._dynamo.allow_in_graph
def step_settings(x: torch.Tensor, layout: str, step: str, grad_scale: str, memory_budget: Union[int, float, None],
                  time_chunk: Optional[int], cache_size: int, sync_batchnorm: Optional[str]) -> torch.Tensor:
    """Marks a transformed module's input with its settings and the step a call runs ("ratebp", "bptt" or
    "plain"). Dynamo runs this on fake tensors; anything else running it means another backend compiled
    a transformed module."""
    if isinstance(x, FakeTensor):
        return x
    raise RateBPError("a module returned by ratebp_compile.transform was compiled with a torch.compile backend "
                      "other than 'ratebp': use torch.compile(model, backend='ratebp'), or compile the original model")


@torch._dynamo.allow_in_graph
def neuron_mode(x: torch.Tensor, training: bool) -> torch.Tensor:
    """Marks a neuron's input with the neuron's training flag (a neuron calls it only while Dynamo traces
    it). The ``ratebp`` backend removes it; under any other backend it is the identity."""
    return x

"""The neuron of the rate pass.

A neuron's dynamics and its spike pass (spikes, rate r, eligibility e) belong to its family
(``ratebp_compile.families``); what every family shares is how the rate pass uses r and e:
:func:`rate_neuron`, the value r with Jacobian diag(e).
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["rate_neuron"]


class _RateNeuron(torch.autograd.Function):
    """Value r; gradient grad·e into x and Σ grad·e_p (reduced to p's shape) into each parameter p."""

    @staticmethod
    def forward(ctx, x, r, e, n_params, *params_and_eligibilities):
        params, e_params = params_and_eligibilities[:n_params], params_and_eligibilities[n_params:]
        ctx.save_for_backward(e, *e_params)
        ctx.param_shapes = [p.shape for p in params]
        return r.clone()

    @staticmethod
    def backward(ctx, grad):
        e, *e_params = ctx.saved_tensors
        grads_p = [(grad * e_p).sum_to_size(shape) for e_p, shape in zip(e_params, ctx.param_shapes)]
        return (grad * e, None, None, None, *grads_p, *(None for _ in e_params))


def rate_neuron(x: torch.Tensor, r: torch.Tensor, e: torch.Tensor,
                params: Sequence[torch.Tensor] = (), e_params: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """The neuron of the rate pass: value ``r`` exactly, Jacobian ``diag(e)`` w.r.t. ``x``.

    For learnable neuron parameters p with per-element eligibilities e_p, the gradient reaching p is
    Σ grad·e_p (broadcast as p broadcasts against the input). Nothing flows into r or e. The value is r
    whatever x holds: a non-finite rate input (from a non-finite model input) does not reach the layers
    after the neuron, whose gradients are then those of BPTT.
    """
    return _RateNeuron.apply(x, r, e, len(params), *params, *e_params)

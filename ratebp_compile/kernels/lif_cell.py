"""One step of a LIF-family neuron as a custom op: what a single-step cell (``LIFCell``, ``IFCell``,
``ParametricLIFCell``) computes per call.

``ratebp::lif_cell_step(x, v, ...) -> (spike, v_next)`` is ``lif_math.step`` with its BPTT gradient
registered, so that torch.compile (Dynamo) keeps
each cell call as one node, with the membrane passed from step to step as an explicit value — which
is how ``fold_time`` recognises a single-step model's time loop in a Dynamo graph. One step is a
handful of elementwise ops that PyTorch (and Inductor) already fuse, so there is no Triton kernel:
the op's implementation is its PyTorch reference, on every device.

In order: the custom op with its fake and autograd implementations; the reference;
``final_membrane`` (the state a folded loop hands back to the model). A cell runs as this op exactly
when its multi-step neuron runs as the fused ops (``ratebp_compile.families.lif`` decides).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import lif_math as M
from .lif import _lam

__all__ = ["lif_cell_step", "lif_cell_step_reference", "final_membrane"]


# =============================================================================================
# Custom op
# =============================================================================================
@torch.library.custom_op("ratebp::lif_cell_step", mutates_args=())
def lif_cell_step(x: torch.Tensor, v: Optional[torch.Tensor], decay: float, decay_logit: Optional[torch.Tensor],
                  v_threshold: float, v_reset: Optional[float], decay_input: bool, detach_reset: bool, surrogate: str,
                  width: float, strict: bool, delayed_reset: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step: (spike, the membrane kept — after reset, or before it with ``delayed_reset``) from the input
    current ``x`` and the membrane ``v`` (None: at rest). λ is 1 − sigmoid(``decay_logit``) when given
    (ParametricLIF), else ``decay``."""
    M.check_delayed_reset(delayed_reset, detach_reset)
    spike, v_next, _ = lif_cell_step_reference(x, v, decay, decay_logit, v_threshold, v_reset, decay_input, strict,
                                               delayed_reset)
    return spike, v_next


@lif_cell_step.register_fake
def _(x, v, decay, decay_logit, v_threshold, v_reset, decay_input, detach_reset, surrogate, width, strict,
      delayed_reset):
    return torch.empty_like(x), torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, v, decay, decay_logit, v_threshold, v_reset, decay_input, detach_reset, surrogate, width, strict, \
        delayed_reset = inputs
    ctx.args = (decay, v_threshold, v_reset, decay_input, detach_reset, surrogate, width, strict, delayed_reset)
    ctx.v_was_none = v is None
    ctx.save_for_backward(x, v, decay_logit)


def _backward(ctx, grad_spike, grad_v_next):
    """δh = g_s·ψ + g_v·∂v_next/∂h; δx = δh (·(1 − λ) with input decay); δv = λ·δh·∂v'/∂v;
    δw = Σ δh·∂h/∂λ·dλ/dw with ∂h/∂λ = v' (− x with input decay), v' the potential the step charged
    from.
    With a delayed reset the membrane kept is h (∂v_next/∂h = 1) and a hard reset zeroes ∂v'/∂v where it
    acts (1 − r); the reset itself is detached."""
    x, v, decay_logit = ctx.saved_tensors
    decay, v_threshold, v_reset, decay_input, detach_reset, surrogate, width, strict, delayed_reset = ctx.args
    lam, dlam_dw = _lam(decay, decay_logit, x.dtype)
    v0 = torch.zeros_like(x) if v is None else v
    v_in, r = M.charged_from(v0, v_threshold, v_reset, strict, delayed_reset)
    s, _, h = lif_cell_step_reference(x, v0, decay, decay_logit, v_threshold, v_reset, decay_input, strict,
                                      delayed_reset)
    u = h - v_threshold
    psi = M.surrogate_grad(surrogate, width, u)
    g_h = psi * (grad_spike if grad_spike is not None else 0.0)
    if grad_v_next is not None:
        g_h = g_h + (grad_v_next if delayed_reset else
                     grad_v_next * M.dv_dh(h, s, psi, v_threshold, v_reset, detach_reset))
    grad_x = g_h * (1.0 - lam) if decay_input else g_h
    grad_v = None
    if not ctx.v_was_none:
        grad_v = g_h * lam * ((1.0 - r) if delayed_reset and v_reset is not None else 1.0)
    grad_logit = None
    if decay_logit is not None and ctx.needs_input_grad[3]:
        dh_dlam = (v_in - x) if decay_input else v_in
        grad_logit = ((g_h * dh_dlam).sum() * dlam_dw).reshape(decay_logit.shape).to(decay_logit.dtype)
    return grad_x, grad_v, None, grad_logit, None, None, None, None, None, None, None, None


lif_cell_step.register_autograd(_backward, setup_context=_setup)


# =============================================================================================
# Reference
# =============================================================================================
@torch.no_grad()
def lif_cell_step_reference(x, v, decay, decay_logit, v_threshold, v_reset, decay_input, strict=False,
                            delayed_reset=False):
    """(spike, v_next, h): ``lif_math.step``."""
    lam, _ = _lam(decay, decay_logit, x.dtype)
    _, h, spike, v_next = M.step(torch.zeros_like(x) if v is None else v, x, lam, decay_input=decay_input,
                                 v_threshold=v_threshold, v_reset=v_reset, strict=strict, delayed_reset=delayed_reset)
    return spike, v_next, h


# =============================================================================================
# The state a folded loop hands back
# =============================================================================================
@torch.no_grad()
def final_membrane(x: torch.Tensor, T: int, decay: float, decay_logit: Optional[torch.Tensor], v_threshold: float,
                   v_reset: Optional[float], decay_input: bool, strict: bool = False,
                   delayed_reset: bool = False) -> torch.Tensor:
    """The membrane a cell holds after the T steps of ``x`` (``[T·B, ...]``), starting from rest: the
    state a folded single-step loop hands back to the model (torch.compile writes it to ``cell.v``)."""
    v = None
    for x_t in x.chunk(T):
        _, v, _ = lif_cell_step_reference(x_t, v, decay, decay_logit, v_threshold, v_reset, decay_input, strict,
                                          delayed_reset)
    return v

"""ratebp::lif_cell_step: one step of a cell, with its BPTT gradient, against autograd through
the LIF family's step (``families.lif``) over a chain of steps — every reset mode x detach x surrogate x input decay,
and the strict tie rule and delayed reset."""
import itertools
import math

import pytest
import torch

from ratebp_compile.kernels.lif_cell import final_membrane
from ratebp_compile.families import LIFDynamics
from ratebp_compile.nn.surrogate import SURROGATES
from tests.conftest import assert_close

RESETS = [None, 0.0, -0.2]
CASES = [c + ((False, False),) for c in itertools.product(RESETS, [True, False], sorted(SURROGATES), [False, True],
                                                          [False, True])]
# (strict, delayed_reset); a delayed reset is detached
VARIANT_CASES = list(itertools.product(RESETS, [True], ["atan", "sigmoid"], [False, True], [False, True],
                                       [(True, False), (False, True), (True, True)]))


def _ids(c):
    v_reset, detach, sg, decay_input, logit, (strict, delayed) = c
    return f"{'soft' if v_reset is None else f'hard{v_reset}'}-{'det' if detach else 'nodet'}-{sg}-" \
           f"{'din' if decay_input else 'nodin'}-{'logit' if logit else 'const'}" + ("-strict" if strict else "") + \
           ("-delayed" if delayed else "")


@pytest.mark.parametrize("case", CASES + VARIANT_CASES, ids=[_ids(c) for c in CASES + VARIANT_CASES])
def test_chain_of_steps_equals_autograd(case):
    v_reset, detach, sg, decay_input, use_logit, (strict, delayed) = case
    width = {"sigmoid": 4.0, "atan": 2.0, "rectangular": 0.8, "triangle": 1.2}[sg]
    xs = (torch.randn(4, 3, 11, dtype=torch.float64) + 0.6).requires_grad_()
    w = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
    decay = math.nan if use_logit else 0.35
    # ours: the op, step by step
    v, spikes = None, []
    for t in range(4):
        s, v = torch.ops.ratebp.lif_cell_step(xs[t], v, decay, w if use_logit else None, 0.9, v_reset, decay_input,
                                              detach, sg, width, strict, delayed)
        spikes.append(s)
    ours = torch.stack(spikes)
    g = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * g).sum() + v.square().sum(), [xs, w] if use_logit else [xs])
    # oracle: autograd through the PyTorch step
    dyn = LIFDynamics(decay=None if use_logit else 0.35, decay_input=decay_input, v_threshold=0.9, v_reset=v_reset,
                      detach_reset=detach, surrogate=SURROGATES[sg](width), strict=strict, delayed_reset=delayed)
    (v_ref,), ref = dyn.init_state(xs[0]), []
    for t in range(4):
        s, (v_ref,) = dyn.step(xs[t], (v_ref,), (w,) if use_logit else ())
        ref.append(s)
    ref = torch.stack(ref)
    ref_grads = torch.autograd.grad((ref * g).sum() + v_ref.square().sum(), [xs, w] if use_logit else [xs])
    assert torch.equal(ours.detach(), ref.detach())
    assert_close(v.detach(), v_ref.detach())
    for a, b in zip(grads, ref_grads):
        assert_close(a, b)


def test_opcheck():
    x = torch.randn(2, 5) + 0.5
    v = torch.randn(2, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.ratebp.lif_cell_step.default,
                          (x.requires_grad_(), v, math.nan, torch.tensor(0.3, requires_grad=True), 1.0, 0.0, True,
                           False, "atan", 2.0, False, False))
    torch.library.opcheck(torch.ops.ratebp.lif_cell_step.default,
                          (x, None, 0.5, None, 1.0, None, False, True, "sigmoid", 4.0, True, False))
    torch.library.opcheck(torch.ops.ratebp.lif_cell_step.default,
                          (x, v, math.nan, torch.tensor(0.3, requires_grad=True), 1.0, 0.0, False, True, "atan", 2.0,
                           True, True))


@pytest.mark.parametrize("delayed", [False, True], ids=["reset-now", "reset-delayed"])
def test_final_membrane_is_the_loops_last_state(delayed):
    x = torch.randn(5 * 3, 4) + 0.5
    v = None
    for x_t in x.chunk(5):
        _, v = torch.ops.ratebp.lif_cell_step(x_t, v, 0.4, None, 1.0, 0.0, False, True, "sigmoid", 4.0, True, delayed)
    torch.testing.assert_close(final_membrane(x, 5, 0.4, None, 1.0, 0.0, False, True, delayed), v, rtol=0, atol=0)

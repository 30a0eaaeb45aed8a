"""Mixed precision: the rate-based step under ``torch.autocast`` (bfloat16, float16 with a GradScaler), through
``transform`` and the backend. Its gradients are no further from its float32 gradients than BPTT's are from
theirs; a program is compiled per autocast state and reused when that state comes back."""
import copy

import pytest
import torch
import torch.nn.functional as F

import ratebp_compile as rc
from ratebp_compile import models
from tests.conftest import inputs_unchanged


def _setup():
    torch.manual_seed(0)
    model = models.ZOO["convnet"](num_classes=10, in_channels=1, width=8)
    x = torch.rand(4, 16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    return model, x, y


def _gradient(step, model, x, y, dtype=None, scaler=None):
    with inputs_unchanged(x), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = step(x)
        loss = F.cross_entropy(out.mean(0).float(), y)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters()])
    if scaler is not None:
        grads = grads / scaler.get_scale()
    for p in model.parameters():
        p.grad = None
    return out, grads


def _error(g, reference):
    return float((g - reference).norm() / reference.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradients_are_no_further_off_than_bptt_s(dtype):
    """bfloat16, and float16 with a GradScaler (gradients unscaled before comparing)."""
    model, x, y = _setup()
    errors = {}
    for method in ("ratebp", "bptt"):
        m = copy.deepcopy(model)
        step = rc.transform(m, method=method)
        _, reference = _gradient(step, m, x, y)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if dtype is torch.float16 else None
        out, g = _gradient(step, m, x, y, dtype, scaler)
        assert out.dtype == dtype and torch.isfinite(g).all()
        errors[method] = _error(g, reference)
    assert 0 < errors["ratebp"] <= errors["bptt"] < 0.2, errors


def test_a_program_per_autocast_state():
    model, x, y = _setup()
    step = rc.transform(model)
    _, g32 = _gradient(step, model, x, y)
    _gradient(step, model, x, y, torch.bfloat16)
    assert len(step.programs) == 2
    _, again = _gradient(step, model, x, y)            # float32 again: the first program, the same gradients
    assert len(step.programs) == 2 and step._compiles == 2
    assert torch.equal(again, g32)


def test_backend_under_autocast_equals_transform():
    model, x, y = _setup()
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="ratebp", options={"compiler": "eager"})
    inner = compiled._orig_mod
    step = rc.transform(model)
    for dtype in (torch.bfloat16, None, torch.bfloat16):      # Dynamo guards on the autocast state
        out_c, g_c = _gradient(compiled, inner, x, y, dtype)
        out_t, g_t = _gradient(step, model, x, y, dtype)
        assert out_c.dtype == out_t.dtype
        torch.testing.assert_close(out_c, out_t)
        torch.testing.assert_close(g_c, g_t, rtol=1e-5, atol=1e-6)


def test_a_synchronised_batchnorm_under_autocast():
    """One process: with ``sync_batchnorm=True`` the step under bfloat16 autocast is the local one: the same
    outputs (the moments of half-precision inputs kept in float32 and the normalisation computed as the local
    BatchNorm computes it), gradients within bfloat16 rounding of the sums."""
    model, x, y = _setup()
    for method in ("ratebp", "bptt"):
        for chunk in (None, 2):
            a, b = copy.deepcopy(model), copy.deepcopy(model)
            out_a, g_a = _gradient(rc.transform(a, method=method, time_chunk=chunk, sync_batchnorm=True), a, x, y,
                                   torch.bfloat16)
            out_b, g_b = _gradient(rc.transform(b, method=method, time_chunk=chunk), b, x, y, torch.bfloat16)
            assert out_a.dtype == out_b.dtype == torch.bfloat16
            assert torch.equal(out_a, out_b), (method, chunk)
            assert _error(g_a, g_b) < 0.01, (method, chunk, _error(g_a, g_b))     # against 0.08 from float32
            for n, buf in a.named_buffers():
                torch.testing.assert_close(buf, dict(b.named_buffers())[n], rtol=1e-3, atol=1e-4)

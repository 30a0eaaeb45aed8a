"""What the peer-library tests share: one training step through ``rc.transform`` and the comparison of
gradients with the peer's (scaled by each parameter's largest gradient)."""
import warnings

import torch

import ratebp_compile as rc
from tests.conftest import inputs_unchanged

# float32 arithmetic in another order than the peer's: a membrane within rounding of the threshold may fire in
# one and not the other (the outputs must then differ); values to this tolerance
RTOL, ATOL = 1e-4, 1e-5


def train_step(model, x, loss_fn, method, **options):
    """One training step: ``(output, {parameter name: grad})``; the inputs must stay unchanged and the only
    approximation warned about is max pooling of firing rates (the rate pass pools rates)."""
    model.zero_grad(set_to_none=True)
    tm = rc.transform(model, method=method, **options)
    with inputs_unchanged(x), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", rc.ApproximationWarning)
        out = tm(x)
        loss_fn(out).backward()
    assert all(issubclass(w.category, rc.ApproximationWarning) and "max_pool" in str(w.message) for w in caught)
    assert tm.programs, "the compiled step ran"
    out = tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
    return out, {n: (p.grad if p.grad is not None else torch.zeros_like(p))
                 for n, p in model.named_parameters() if p.requires_grad}


def compiled_step(model, x, loss_fn, method):
    """:func:`train_step` through ``torch.compile(model, backend="ratebp")`` (its "eager" compiler: the same
    graphs, without Inductor's compile time)."""
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="ratebp", options={"compiler": "eager", "method": method})
    with inputs_unchanged(x), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", rc.ApproximationWarning)
        out = compiled(x)
        loss_fn(out).backward()
    assert all(issubclass(w.category, rc.ApproximationWarning) and "max_pool" in str(w.message) for w in caught)
    out = tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
    return out, {n: (p.grad if p.grad is not None else torch.zeros_like(p))
                 for n, p in model.named_parameters() if p.requires_grad}


def assert_outputs_close(ours, theirs):
    """A model's output (or tuple of outputs) against the peer's, in the output's dtype."""
    for a, b in zip(ours, theirs) if isinstance(ours, tuple) else [(ours, theirs)]:
        torch.testing.assert_close(a, b.to(a.dtype), rtol=RTOL, atol=ATOL)


def assert_grads_close(ours, theirs, what):
    assert ours.keys() <= theirs.keys(), (what, sorted(ours.keys() - theirs.keys()))
    for name, g in ours.items():
        scale = theirs[name].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(g / scale, theirs[name] / scale, rtol=RTOL, atol=ATOL, msg=f"{what}: {name}")

"""Run the pipeline up to a pass on a small model, for the pass tests."""
from __future__ import annotations

import torch
from torch import nn

from ratebp_compile.capture import capture
from ratebp_compile.nn import LIF, LIFCell
from ratebp_compile.passes import PIPELINE, run_pipeline


class Tiny(nn.Module):
    """conv – BN (over T·B) – LIF – mean over space – linear; ``[T, B, 2, 5, 5]`` → ``[T, B, 4]``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.sn = LIF(decay=0.5, v_threshold=0.5)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        T = x.shape[0]
        y = self.bn(self.conv(x.flatten(0, 1)))
        y = self.sn(y.unflatten(0, (T, -1)))
        return self.fc(y.mean((3, 4)))


class SingleBN(nn.Module):
    """BatchNorm inside the loop (statistics per step) and the outputs summed over the steps."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.sn = LIFCell(decay=0.3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        out = 0
        for x_t in x:
            out = out + self.fc(self.sn(self.bn(self.conv(x_t))).mean((2, 3)))
        return out / x.shape[0]


def prepare(model: nn.Module, args, upto: str, input_layouts=None, inclusive: bool = True, time_chunk=None,
            memory_budget=None):
    """Capture ``model``, propagate shapes on ``args`` and run PIPELINE up to ``upto``.

    Returns ``(gm, history)``; with ``inclusive=False`` the pass ``upto`` itself is not run, so a
    test can call it and look at its PassResult. ``time_chunk`` and ``memory_budget`` are stream_time's
    (None, None: never streamed)."""
    gm = capture(model, list(args))
    gm.meta["ratebp.input_layouts"] = input_layouts or ["TB"] * len(args)
    gm.meta["ratebp.time_chunk"] = time_chunk
    gm.meta["ratebp.memory_budget"] = memory_budget
    names = [p.__name__ for p in PIPELINE]
    stop = names.index(upto) + (1 if inclusive else 0)
    history = []
    gm = run_pipeline(gm, PIPELINE[:stop], history)
    return gm, history


def node_named(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def tiny_input(T=2, B=3):
    return torch.rand(T, B, 2, 5, 5) * 2


def step_with_and_without(pass_fn, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **options):
    """One training step (cross-entropy of the time-averaged output) of ``transform(model, **options)``, in
    which ``pass_fn`` fired, and one of a copy of ``model`` transformed without it; the input left as it was
    by both. Returns ``(out, out_without, [(name, grad, grad_without), ...])``."""
    import copy

    import torch.nn.functional as F

    import ratebp_compile as rc
    from ratebp_compile import passes

    twin = copy.deepcopy(model)
    x_before = x.clone()
    tm = rc.transform(model, **options)
    out = tm(x)
    F.cross_entropy(out.mean(0), y).backward()
    assert any(r.name == pass_fn.__name__ and r.modified for r in tm.compiled.history)
    pipeline = list(passes.PIPELINE)
    try:
        passes.PIPELINE.remove(pass_fn)
        ref = rc.transform(twin, **options)
        out_without = ref(x)
        F.cross_entropy(out_without.mean(0), y).backward()
    finally:
        passes.PIPELINE[:] = pipeline
    assert not any(r.name == pass_fn.__name__ for r in ref.compiled.history)
    assert torch.equal(x, x_before)
    return out, out_without, [(name, p.grad, q.grad) for (name, p), q in zip(model.named_parameters(),
                                                                              twin.parameters())]

"""Data-parallel training as a contract: ``DistributedDataParallel(rc.transform(model))`` — and
``torch.compile`` of the model inside it with ``backend="ratebp"`` — on 2 gloo processes gives, for a model
without BatchNorm, the gradients one process computes on the concatenated batch (each rank's loss a mean
over its half: DDP's average of the two is the mean over the whole batch), for both methods; gradient
accumulation under ``no_sync()`` and ``find_unused_parameters`` included. Every rank ends with the same
gradients, and no step changes its input."""

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ratebp_compile as rc
from tests.conftest import inputs_unchanged
from tests.distributed.world import run

T, B, WORLD = 4, 8, 2                     # B: the whole batch, B // WORLD per rank


class _Branches(nn.Module):
    """An MLP with a layer it does not use in this step (``find_unused_parameters``)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.lif1 = nn.Linear(6, 12), rc.nn.LIF(decay=0.6)
        self.fc2, self.lif2 = nn.Linear(12, 4), rc.nn.ParametricLIF()
        self.unused = nn.Linear(12, 4)

    def forward(self, x):
        return self.lif2(self.fc2(self.lif1(self.fc1(x))))


def _mlp():
    return nn.Sequential(nn.Linear(6, 12), rc.nn.LIF(decay=0.6), nn.Linear(12, 4), rc.nn.ParametricLIF())


class _Conv(nn.Module):
    """Conv → LIF → average pool → Linear → LIF on ``[T, B, C, H, W]`` (layers applied to time × batch)."""

    def __init__(self):
        super().__init__()
        self.conv, self.lif1 = nn.Conv2d(2, 4, 3, padding=1), rc.nn.LIF(decay=0.5)
        self.fc, self.lif2 = nn.Linear(4 * 3 * 3, 4), rc.nn.LIF(decay=0.5)

    def forward(self, x):
        T = x.shape[0]
        h = self.lif1(self.conv(x.flatten(0, 1)).unflatten(0, (T, -1)))
        h = nn.functional.avg_pool2d(h.flatten(0, 1), 2).flatten(1)
        return self.lif2(self.fc(h).unflatten(0, (T, -1)))


def _leaky():
    """snnTorch's tutorial loop (under torch.compile each Leaky call is a module call in Dynamo's graph)."""
    from tests.interop.snntorch_harness import LeakyMLP

    return LeakyMLP(beta=0.8)


class _Wide(nn.Module):
    """1.4 MB of parameters: more than DDP's first gradient bucket (1 MB), so DDPOptimizer splits its graph."""

    def __init__(self):
        super().__init__()
        self.fc1, self.lif1 = nn.Linear(6, 600), rc.nn.LIF(decay=0.6)
        self.fc2, self.lif2 = nn.Linear(600, 600), rc.nn.LIF(decay=0.5)
        self.fc3, self.lif3 = nn.Linear(600, 4), rc.nn.LIF(decay=0.5)

    def forward(self, x):
        return self.lif3(self.fc3(self.lif2(self.fc2(self.lif1(self.fc1(x))) * 0.05)))


MODELS = {"mlp": (_mlp, (6,)), "conv": (_Conv, (2, 6, 6)), "branches": (_Branches, (6,)), "leaky": (_leaky, (12,)),
          "wide": (_Wide, (6,))}


def _build(name):
    torch.manual_seed(0)
    model = MODELS[name][0]()
    with torch.no_grad():                         # inputs that make every layer fire
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.abs_().mul_(1.5)
    return model


def _data(name, micro_batches=1):
    """``micro_batches`` pairs (x ``[T, B, ...]``, target ``[B, 4]``) of the whole batch."""
    g = torch.Generator().manual_seed(1)
    shape = MODELS[name][1]
    return [(torch.rand((T, B) + shape, generator=g) * 2, torch.rand(B, 4, generator=g))
            for _ in range(micro_batches)]


def _loss(out, target):
    return (out.mean(0) - target).square().sum(-1).mean()


def _shard(t, rank):
    per = B // WORLD
    return t[:, rank * per:(rank + 1) * per] if t.dim() > 2 else t[rank * per:(rank + 1) * per]


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def _ddp_step(rank, world_size, name, method, entry, micro_batches=1, optimize_ddp=True):
    """One (accumulated) step on this rank's half of each micro-batch."""
    torch._dynamo.config.optimize_ddp = optimize_ddp
    model = _build(name)
    torch._dynamo.reset()
    options = {"compiler": "eager", "method": method}
    inner = rc.transform(model, method=method) if entry == "transform" else \
        torch.compile(model, backend="ratebp", options=options) if entry == "compile inside" else model
    ddp = DDP(inner, find_unused_parameters=name == "branches")
    if entry == "compile":
        ddp = torch.compile(ddp, backend="ratebp", options=options)
    for k, (x, target) in enumerate(_data(name, micro_batches)):
        x = _shard(x, rank)
        last = k == micro_batches - 1
        with inputs_unchanged(x), (ddp.no_sync() if not last else _nothing()):
            _loss(ddp(x), _shard(target, rank)).backward()
    return _grads(model)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _single_process(name, method, micro_batches=1):
    model = _build(name)
    step = rc.transform(model, method=method)
    for x, target in _data(name, micro_batches):
        _loss(step(x), target).backward()
    return _grads(model)


def _assert_same(ranks, expected):
    for rank, grads in enumerate(ranks):
        assert grads.keys() == expected.keys()
        for n, g in grads.items():
            if expected[n] is None:
                assert g is None, (rank, n)
                continue
            torch.testing.assert_close(g, expected[n], rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {n}")
        assert sum(float(g.abs().sum()) for g in grads.values() if g is not None) > 0


@pytest.mark.parametrize("method", ["ratebp", "bptt"])
@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_ddp_of_a_transformed_model_equals_one_process(name, method):
    _assert_same(run(_ddp_step, WORLD, name=name, method=method, entry="transform"), _single_process(name, method))


@pytest.mark.parametrize("method", ["ratebp", "bptt"])
def test_no_sync_accumulation_and_unused_parameters(method):
    """Two micro-batches, the first under ``no_sync()``; a layer the step does not use."""
    _assert_same(run(_ddp_step, WORLD, name="branches", method=method, entry="transform", micro_batches=2),
                 _single_process("branches", method, micro_batches=2))


@pytest.mark.parametrize("method", ["ratebp", "bptt"])
@pytest.mark.parametrize("name,entry", [("conv", "compile"), ("leaky", "compile"), ("mlp", "compile inside")])
def test_torch_compile_and_ddp_equal_one_process(name, entry, method):
    """torch.compile of DDP (a model class with its own forward), or DDP of the compiled model."""
    if name == "leaky":
        pytest.importorskip("snntorch")
    _assert_same(run(_ddp_step, WORLD, name=name, method=method, entry=entry), _single_process(name, method))


def test_torch_compile_of_ddp_of_a_container_is_refused():
    """Inside DDP, Dynamo compiles the neurons of an ``nn.Sequential`` one by one, and the layers between them
    would run outside the rate-based step (with a Tanh between two LIFs, gradients 15% off): refused."""
    with pytest.raises(AssertionError, match=r"inside DistributedDataParallel Dynamo compiles a LIF on its own"):
        run(_ddp_step, WORLD, name="mlp", method="ratebp", entry="compile")


def test_ddp_graph_splitting_is_refused_and_one_graph_trains():
    """A model over DDP's first bucket: DDPOptimizer splits the graph at the buckets, which the rate-based step
    cannot train piecewise (refused, with Dynamo's hint); with ``torch._dynamo.config.optimize_ddp = False`` the
    graph stays whole and the step equals one process."""
    with pytest.raises(AssertionError, match=r"DDPOptimizer intentional graph-break.*optimize_ddp = False"):
        run(_ddp_step, WORLD, name="wide", method="ratebp", entry="compile")
    _assert_same(run(_ddp_step, WORLD, name="wide", method="ratebp", entry="compile", optimize_ddp=False),
                 _single_process("wide", "ratebp"))

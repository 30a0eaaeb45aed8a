"""Synchronised BatchNorm on 2 gloo processes: a step of ``DistributedDataParallel(rc.transform(model,
sync_batchnorm=True))`` — or of ``torch.compile`` of it with ``backend="ratebp"`` — equals one process on the
concatenated batch: each rank's outputs are its half of the one process's, every gradient and the running
statistics are the one process's. For a conv net with BatchNorm2d and an MLP with BatchNorm1d (over time and
batch), a single-step model with a BatchNorm per step, streamed and not, both methods. Without sync each
rank's BatchNorm is its local one; ``nn.SyncBatchNorm`` (which DDP refuses on CPU) synchronises by itself."""

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ratebp_compile as rc
from tests.conftest import inputs_unchanged
from tests.distributed.world import run

T, B, WORLD = 4, 8, 2                     # B: the whole batch, B // WORLD per rank


class _Conv(nn.Module):
    """conv → BatchNorm2d → LIF → Linear → BatchNorm1d → LIF, layers on ``[T·B, ...]``."""

    def __init__(self, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn, self.lif1 = nn.Conv2d(2, 4, 3, padding=1), norm(4), rc.nn.LIF(decay=0.5)
        self.fc, self.bn1, self.lif2 = nn.Linear(4 * 6 * 6, 4), nn.BatchNorm1d(4), rc.nn.LIF(decay=0.5)

    def forward(self, x):
        T = x.shape[0]
        h = self.lif1(self.bn(self.conv(x.flatten(0, 1))).unflatten(0, (T, -1)))
        return self.lif2(self.bn1(self.fc(h.flatten(2).flatten(0, 1))).unflatten(0, (T, -1)))


class _MLP(nn.Module):
    """Linear → BatchNorm1d → LIF twice; the second BatchNorm normalises with a momentum of None."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn1, self.lif1 = nn.Linear(6, 12), nn.BatchNorm1d(12), rc.nn.LIF(decay=0.6)
        self.fc2, self.bn2, self.lif2 = nn.Linear(12, 4), nn.BatchNorm1d(4, momentum=None), rc.nn.LIF(decay=0.5)

    def forward(self, x):
        T = x.shape[0]
        h = self.lif1(self.bn1(self.fc1(x.flatten(0, 1))).unflatten(0, (T, -1)))
        return self.lif2(self.bn2(self.fc2(h.flatten(0, 1))).unflatten(0, (T, -1)))


class _PerStep(nn.Module):
    """A single-step loop: Linear → BatchNorm1d → LIF cell at each step (one BatchNorm call per step)."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.cell = nn.Linear(6, 4), nn.BatchNorm1d(4), rc.nn.LIFCell(decay=0.5)

    def forward(self, x):
        self.cell.reset()
        return torch.stack([self.cell(self.bn(self.fc(x_t))) for x_t in x])


def _spikingjelly():
    """SpikingJelly's multi-step conv net: its ``layer.BatchNorm2d`` and ``layer.BatchNorm1d`` (which PyTorch's
    ``convert_sync_batchnorm`` would replace by an ``nn.SyncBatchNorm`` without their multi-step mode)."""
    from spikingjelly.activation_based import functional, layer, neuron

    net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1), layer.BatchNorm2d(4), neuron.LIFNode(),
                        layer.Flatten(), layer.Linear(4 * 6 * 6, 4), layer.BatchNorm1d(4), neuron.LIFNode())
    functional.set_step_mode(net, "m")
    return net


MODELS = {"conv": (_Conv, (2, 6, 6)), "mlp": (_MLP, (6,)), "per_step": (_PerStep, (6,)),
          "spikingjelly": (_spikingjelly, (2, 6, 6)),
          "syncbn": (lambda: nn.SyncBatchNorm.convert_sync_batchnorm(_Conv()), (2, 6, 6))}


def _build(name):
    torch.manual_seed(0)
    return MODELS[name][0]()


def _data(name):
    g = torch.Generator().manual_seed(1)
    return torch.randn((T, B) + MODELS[name][1], generator=g) * 2, torch.rand(B, 4, generator=g)


def _loss(out, target):
    return (out.mean(0) - target).square().sum(-1).mean()


def _shard(t, rank, per=B // WORLD):
    return t[:, rank * per:(rank + 1) * per] if t.dim() > 2 else t[rank * per:(rank + 1) * per]


def _state(model, out):
    return {"out": out.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}}


def _step(rank, world_size, name, method, time_chunk, entry="transform", sync=True, ddp=True, compiler="eager"):
    model = _build(name)
    torch._dynamo.reset()
    if entry == "transform":
        step = rc.transform(model, method=method, time_chunk=time_chunk, sync_batchnorm=sync or None)
    else:
        step = model
    if ddp:
        step = DDP(step)
    if entry == "compile":
        step = torch.compile(step, backend="ratebp", options={"compiler": compiler, "method": method,
                                                              "time_chunk": time_chunk, "sync_batchnorm": sync or None})
    x, target = (_shard(t, rank) for t in _data(name))
    with inputs_unchanged(x):
        out = step(x)
        _loss(out, target).backward()
    if not ddp:                 # average the gradients as DDP does
        for p in model.parameters():
            torch.distributed.all_reduce(p.grad)
            p.grad /= world_size
    return _state(model, out)


def _single_process(name, method, time_chunk, rank=None):
    """One process on the whole batch, or (``rank``) on that rank's half."""
    model = _build(name) if name != "syncbn" else _build("conv")
    x, target = _data(name)
    if rank is not None:
        x, target = _shard(x, rank), _shard(target, rank)
    out = rc.transform(model, method=method, time_chunk=time_chunk)(x)
    _loss(out, target).backward()
    return _state(model, out)


def _assert_state(got, expected, what):
    torch.testing.assert_close(got["out"], expected["out"], rtol=1e-5, atol=1e-6, msg=f"{what}: outputs")
    assert got["grads"].keys() == expected["grads"].keys()
    for n, g in got["grads"].items():
        torch.testing.assert_close(g, expected["grads"][n], rtol=1e-5, atol=1e-6, msg=f"{what}: gradient of {n}")
    for n, b in got["buffers"].items():
        torch.testing.assert_close(b, expected["buffers"][n], rtol=1e-5, atol=1e-6, msg=f"{what}: buffer {n}")


_LAST_BN = {"per_step": "bn", "spikingjelly": "5"}     # the running mean compared with rank 0's own


def _assert_equals_one_process(ranks, name, method, time_chunk):
    whole = _single_process(name, method, time_chunk)
    assert float(whole["out"].sum()) > 0 and all(float(g.abs().sum()) > 0 for g in whole["grads"].values())
    for rank, got in enumerate(ranks):
        expected = dict(whole, out=_shard(whole["out"], rank))
        _assert_state(got, expected, f"rank {rank}")
    local = _single_process(name, method, time_chunk, rank=0)     # what rank 0 alone would compute: different
    key = f"{_LAST_BN.get(name, 'bn1')}.running_mean"
    assert not torch.allclose(local["buffers"][key], whole["buffers"][key])


@pytest.mark.parametrize("time_chunk", [None, 2])
@pytest.mark.parametrize("method", ["ratebp", "bptt"])
@pytest.mark.parametrize("name", ["conv", "mlp"])
def test_synchronised_batchnorm_equals_one_process(name, method, time_chunk):
    ranks = run(_step, WORLD, name=name, method=method, time_chunk=time_chunk)
    _assert_equals_one_process(ranks, name, method, time_chunk)


@pytest.mark.parametrize("method,time_chunk", [("ratebp", None), ("ratebp", 2), ("bptt", None)])
def test_a_batchnorm_per_step_synchronises_each_step(method, time_chunk):
    ranks = run(_step, WORLD, name="per_step", method=method, time_chunk=time_chunk)
    _assert_equals_one_process(ranks, "per_step", method, time_chunk)


@pytest.mark.parametrize("time_chunk", [None, 2])
@pytest.mark.parametrize("method", ["ratebp", "bptt"])
def test_under_torch_compile(method, time_chunk):
    """``torch.compile(DDP(model), backend="ratebp", options={"sync_batchnorm": True})``: the BatchNorms of
    Dynamo's graph (``F.batch_norm``) synchronise."""
    ranks = run(_step, WORLD, name="conv", method=method, time_chunk=time_chunk, entry="compile")
    _assert_equals_one_process(ranks, "conv", method, time_chunk)


@pytest.mark.parametrize("method", ["ratebp", "bptt"])
def test_with_inductor(method):
    """The collectives are custom ops: Inductor compiles the spike and rate graphs (or BPTT's step) around them."""
    ranks = run(_step, WORLD, name="conv", method=method, time_chunk=None, entry="compile", compiler="inductor")
    _assert_equals_one_process(ranks, "conv", method, None)


@pytest.mark.parametrize("method", ["ratebp", "bptt"])
@pytest.mark.parametrize("entry", ["transform", "compile"])
def test_nn_syncbatchnorm_synchronises_by_itself(entry, method):
    """A model converted with ``nn.SyncBatchNorm.convert_sync_batchnorm`` synchronises without the option (DDP
    refuses ``nn.SyncBatchNorm`` on CPU: the gradients are averaged by hand here); under torch.compile each of
    its calls is a module call the backend rewrites (its own forward refuses CPU tensors)."""
    ranks = run(_step, WORLD, name="syncbn", method=method, time_chunk=None, entry=entry, sync=False, ddp=False)
    _assert_equals_one_process(ranks, "syncbn", method, None)


@pytest.mark.parametrize("method", ["ratebp", "bptt"])
def test_spikingjelly_batchnorms_synchronise(method):
    pytest.importorskip("spikingjelly")
    ranks = run(_step, WORLD, name="spikingjelly", method=method, time_chunk=None)
    _assert_equals_one_process(ranks, "spikingjelly", method, None)


@pytest.mark.parametrize("method", ["ratebp", "bptt"])
def test_without_sync_each_rank_normalises_locally(method):
    ranks = run(_step, WORLD, name="conv", method=method, time_chunk=None, sync=False, ddp=False)
    for rank, got in enumerate(ranks):
        local = _single_process("conv", method, None, rank=rank)
        torch.testing.assert_close(got["out"], local["out"])
        for n, b in got["buffers"].items():
            torch.testing.assert_close(b, local["buffers"][n], msg=n)


def _plain_step(rank, world_size, entry):
    """Training mode with autograd off runs the plain model: its BatchNorms would not synchronise."""
    model = _build("conv")
    x, _ = _data("conv")
    step = rc.transform(model, sync_batchnorm=True) if entry == "transform" else \
        torch.compile(model, backend="ratebp", options={"compiler": "eager", "sync_batchnorm": True})
    snapshot = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad(), pytest.raises(Exception, match=r"sync_batchnorm: in training mode with autograd "
                                                         r"off the model runs as it is.*BatchNorms \((bn; bn1|function 'batch_norm' at .*test_sync)"):
        step(_shard(x, rank))
    unchanged = all(torch.equal(b, snapshot[n]) for n, b in model.named_buffers())
    with torch.no_grad():
        step.eval()(_shard(x, rank))          # eval mode: running statistics, nothing to synchronise
    return unchanged


@pytest.mark.parametrize("entry", ["transform", "compile"])
def test_a_plain_step_that_would_not_synchronise_is_refused(entry):
    assert run(_plain_step, WORLD, entry=entry) == [True, True]


def _uneven(rank, world_size):
    model = _build("conv")
    x, _ = _data("conv")
    step = rc.transform(model, sync_batchnorm=True)
    snapshot = {n: b.clone() for n, b in model.named_buffers()}
    with pytest.raises(rc.RateBPError, match=r"the ranks' batches differ in size \(samples per channel: "
                                             r"\[432, 576\]\)"):
        step(x[:, :3 + rank])
    return all(torch.equal(b, snapshot[n]) for n, b in model.named_buffers())


def test_batches_of_different_sizes_are_refused_on_every_rank():
    assert run(_uneven, WORLD) == [True, True]

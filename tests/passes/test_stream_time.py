"""stream_time: the spike pass over chunks of time — stages per neuron, 1-byte spikes, BatchNorm
statistics from a pass of their own — computes what the unstreamed spike pass computes."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ratebp_compile as rc
from ratebp_compile import models
from ratebp_compile.graph_ops import chunk_batch_norm, chunk_batch_norm_, spike_batch_norm
from ratebp_compile.memory import format_bytes
from ratebp_compile.nn import LIF, Neuron, NeuronSpec, ParametricLIF, Sigmoid, spike
from ratebp_compile.passes import stream_time
from ratebp_compile.stream import StreamStage
from tests.passes.util import SingleBN, Tiny, prepare, tiny_input


def _stages(program):
    return {name: m for name, m in program.spike.named_children() if isinstance(m, StreamStage)}


def _step(model, x, time_chunk, input_layout="TB", loss=lambda out: out.sum(), **options):
    """One training step through transform; returns (outputs, grads by name, buffers by name, module)."""
    tm = rc.transform(model, time_chunk=time_chunk, input_layout=input_layout, **options).train()
    x_before = x.clone()
    out = tm(x)
    loss(out).backward()
    assert torch.equal(x, x_before), "the step changed its input"
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, {k: b.clone() for k, b in model.named_buffers()}, tm


def _assert_same_step(model, x, chunk=2, **kw):
    """The step with the spike pass streamed equals the unstreamed step (float64: to rounding)."""
    ref = _step(copy.deepcopy(model), x, None, **kw)
    got = _step(model, x, chunk, **kw)
    program = got[3].compiled.step
    assert _stages(program), program.meta["ratebp.streamed"]
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    assert got[1].keys() == ref[1].keys()
    for k in ref[1]:
        torch.testing.assert_close(got[1][k], ref[1][k], rtol=1e-9, atol=1e-11, msg=k)
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], rtol=1e-10, atol=1e-12, msg=k)
    return program


def test_structure_numerics_and_fired():
    model = Tiny().double().train()
    twin = copy.deepcopy(model)
    x = tiny_input(T=5).double()
    program, _ = prepare(model, [x], "stream_time", inclusive=False, time_chunk=2)
    unstreamed, _ = prepare(twin, [x], "stream_time")
    result = stream_time(program)
    assert result.modified
    spike = result.gm.spike
    assert not any(isinstance(n.target, NeuronSpec) for n in spike.graph.nodes)     # all inside stages
    stages = _stages(result.gm)
    assert sorted(stages) == ["stream_fc", "stream_sn"]      # the neuron, and the model's per-step output
    sn = stages["stream_sn"]
    assert sn.bounds == [(0, 2), (2, 2), (4, 1)] and sn.batchnorms == ["spike_batch_norm"]
    assert sorted(sn.value_graphs) == ["1", "2"] and sorted(sn.stats_graphs) == ["0_1", "0_2"]
    value_code = sn.value_graphs["2"].code
    assert "chunk_batch_norm_(" in value_code and ".reshape((2, 3, 3, 5, 5))" in value_code
    assert "conv" in sn.stats_graphs["0_2"].code and "batch_norm" not in sn.stats_graphs["0_2"].code
    first_code = sn.first_graphs["2"].code          # the first chunk: from the BatchNorm input the stats pass kept
    assert "kept_spike_batch_norm" in first_code and "conv" not in first_code and "chunk_batch_norm_(" in first_code
    spikes = next(n for n in spike.graph.nodes if n.name == "getitem_3")   # the neuron's spikes
    assert spikes.meta["val"].dtype == torch.uint8
    assert result.gm.meta["ratebp.streamed"].startswith("in chunks of at most 2 of the T = 5 steps")
    with torch.no_grad():
        got, ref = spike(x), unstreamed.spike(x)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    out, out_ref = result.gm(x), unstreamed(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("T,chunk", [(4, 4), (3, None)])
def test_not_fired_when_T_fits_in_a_chunk_or_streaming_is_off(T, chunk):
    program, _ = prepare(Tiny(), [tiny_input(T=T)], "stream_time", inclusive=False, time_chunk=chunk)
    spike = program.spike
    result = stream_time(program)
    assert not result.modified and result.gm.spike is spike
    assert result.gm.meta["ratebp.streamed"].startswith("all T steps at once")


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "vggsnn", "convnet"])
def test_zoo_models_train_identically_streamed(name):
    model = models.ZOO[name](num_classes=10, in_channels=3, width=4).double()
    x = torch.rand(5, 2, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([1, 7])
    program = _assert_same_step(model, x, loss=lambda out: F.cross_entropy(out.mean(0), y))
    neurons = [m for m in _stages(program).values() if m.neuron is not None]
    assert len(neurons) == sum(1 for m in model.modules() if isinstance(m, LIF))


def test_residual_block_reads_stored_spikes_twice_and_stores_them_once():
    """A block input feeds the block's first conv and its shortcut: the stored spikes are read by two
    stages (views of them are recomputed, not stored)."""
    model = models.resnet18(num_classes=10, in_channels=3, width=4).double()
    program = _assert_same_step(model, torch.rand(5, 2, 3, 16, 16, dtype=torch.float64))
    spike = program.spike
    stage_inputs = [a for n in spike.graph.nodes if n.op == "call_module" for a in n.args]
    first_spikes = next(n for n in spike.graph.nodes if n.name == "getitem_3")
    assert stage_inputs.count(first_spikes) == 2
    whole = [m for m in _stages(program).values() if m.neuron is None]
    assert len(whole) == 1 and whole[0].value_shape == (5, 2, 10)    # only the per-step logits: in float


def test_a_chunk_graph_casts_only_the_stored_spikes_it_reads():
    """1-byte spikes are cast to the compute dtype in the chunk graphs that read them, once each; a chunk
    graph that computes from kept BatchNorm inputs, or a statistics graph that does not need the block's
    input, casts nothing of it (the cast would be a whole chunk's copy for nothing)."""
    model = models.resnet18(num_classes=10, in_channels=3, width=4).double()
    program = _assert_same_step(model, torch.rand(5, 2, 3, 16, 16, dtype=torch.float64))
    casts = 0
    for stage in _stages(program).values():
        for graphs in (stage.value_graphs, stage.stats_graphs, stage.first_graphs):
            for gm in graphs.values():
                for node in gm.graph.nodes:
                    if node.op == "call_method" and node.target == "to":
                        assert node.args[0].op == "placeholder" and node.users, gm.code
                        casts += 1
                placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
                assert sum(1 for n in gm.graph.nodes if n.target == "to") <= len(placeholders)
    assert casts > 0
    block = _stages(program)["stream_layers_0_0_sn2"]   # conv2 on the block's first spikes, plus the shortcut
    assert [n.target for n in block.first_graphs["2"].graph.nodes if n.op == "call_method" and n.target == "to"] \
        == ["to"]                   # the shortcut's spikes only: conv2's input is kept from the statistics pass


class SharedConvolution(nn.Module):
    """One convolution feeding two neurons (stored once), a reduction over time of spikes (cast back
    from 1 byte), a learned decay and a custom neuron."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.a = ParametricLIF(v_reset=0.0, detach_reset=False)
        self.b = _Custom()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        T = x.shape[0]
        y = self.bn(self.conv(x.flatten(0, 1))).unflatten(0, (T, -1))
        a = self.a(y)
        s = torch.cat([a, self.b(y)], 2).mean((3, 4))
        return self.fc(s).mean(0) + s.mean(0).sum(1, keepdim=True) + a.mean((0, 2, 3, 4)).unsqueeze(1)


class _Custom(Neuron):
    def step(self, x, state):
        (v,) = state
        h = 0.6 * v + x
        s = spike(h - 0.8, Sigmoid(4.0))
        return s, (h - 0.8 * s.detach(),)


def test_shared_values_custom_and_learned_neurons():
    model = SharedConvolution().double()
    program = _assert_same_step(model, torch.rand(5, 3, 2, 4, 4, dtype=torch.float64) * 2)
    stages = _stages(program)
    bn = stages["stream_spike_batch_norm"]
    assert bn.neuron is None and bn.batchnorms == ["spike_batch_norm"]       # the BatchNorm's output, stored once
    assert not stages["stream_a"].batchnorms and not stages["stream_b"].batchnorms
    assert stages["stream_a"].neuron.dynamics.name == "plif" and stages["stream_b"].neuron.dynamics.name == "custom"
    code = program.spike.code
    assert ".to(torch.float64)" in code         # 1-byte spikes cast back for the reduction over time


def test_merged_time_batch_layout():
    model = models.vgg11(width=4, num_classes=3).double()
    merged = models.vgg11(width=4, num_classes=3, neuron=lambda: LIF(time_steps=5)).double()
    merged.load_state_dict(model.state_dict())
    x = torch.rand(5 * 2, 3, 16, 16, dtype=torch.float64)

    class Wrap(nn.Module):      # vgg11 takes [T, B, ...]: feed it the merged input as a view
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x_flat):
            return self.net(x_flat.unflatten(0, (5, -1)))

    _assert_same_step(Wrap(model), x, input_layout="T*B")


def test_per_step_batchnorm_of_a_single_step_model():
    program = _assert_same_step(SingleBN().double(), torch.rand(5, 4, 2, 5, 5, dtype=torch.float64) * 2)
    (sn,) = [m for m in _stages(program).values() if m.neuron is not None]
    assert sn.per_step == [True] and not sn.stats_graphs      # statistics per step: no extra pass


def test_dropout_draws_once_per_element():
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), LIF(decay=0.5, v_threshold=0.3), nn.Linear(6, 2))
    tm = rc.transform(model, time_chunk=2).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # dropout's approximation warning
        tm(torch.rand(5, 3, 4)).sum().backward()
    stages = _stages(tm.compiled.step)
    dropout = [m for m in stages.values() if any(isinstance(d, nn.Dropout) for d in m.value_graphs["2"].modules())]
    assert len(dropout) == 1 and dropout[0].neuron is None      # computed by a stage of its own, stored whole


class _DeadBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.sn = LIF()

    def forward(self, x):
        self.bn(self.fc(x).flatten(0, 1))             # statistics updated, output unused
        return self.sn(self.fc(x))


def test_graphs_it_cannot_stream_run_unstreamed_with_a_warning():
    model = _DeadBN().double()
    x = torch.rand(5, 3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="runs all 5 steps at once.*is not used"):
        out, grads, _, tm = _step(model, x, 2)
    assert not _stages(tm.compiled.step)
    assert "is not used" in tm.compiled.step.meta["ratebp.streamed"]
    ref = _step(copy.deepcopy(model), x, None)
    torch.testing.assert_close(out, ref[0])
    with pytest.warns(UserWarning, match="runs all 5 steps at once.*is not used"):     # over a budget alike
        out, _, _, tm = _step(copy.deepcopy(model), x, None, memory_budget=1024)
    assert not _stages(tm.compiled.step) and "is not used" in tm.compiled.step.meta["ratebp.streamed"]
    torch.testing.assert_close(out, ref[0])


class _InputBN(nn.Module):
    """The input goes straight into a BatchNorm over time and batch: the statistics pass's first chunk
    is a view of the caller's tensor, which the stage must not normalise in place."""

    def __init__(self, layout):
        super().__init__()
        self.layout = layout
        self.bn = nn.BatchNorm2d(1) if layout != "TB-1d" else nn.BatchNorm1d(5)
        self.sn = LIF(decay=0.5, time_steps=5 if layout == "T*B" else None)
        self.head = nn.Conv2d(1, 2, 3) if layout != "TB-1d" else nn.Linear(5, 2)

    def forward(self, x):
        if self.layout == "T*B":
            return self.head(self.sn(self.bn(x)))
        T = x.shape[0]
        y = self.sn(self.bn(x.flatten(0, 1)).unflatten(0, (T, -1)))
        return self.head(y.flatten(0, 1))


@pytest.mark.parametrize("layout,shape", [("TB", (5, 2, 1, 6, 6)), ("T*B", (10, 1, 6, 6)), ("TB-1d", (5, 2, 5))])
def test_a_batchnorm_on_the_input_leaves_the_input_alone(layout, shape):
    model = _InputBN(layout).double()
    x = torch.randn(shape, dtype=torch.float64)
    program = _assert_same_step(model, x, input_layout="T*B" if layout == "T*B" else "TB")
    sn = _stages(program)["stream_sn"]
    code = sn.first_graphs["2"].code
    assert "input_spike_batch_norm" in code and "chunk_batch_norm(" in code and "chunk_batch_norm_(" not in code


def test_a_batchnorm_on_the_input_through_the_backend():
    model, x = _InputBN("TB"), torch.randn(5, 2, 1, 6, 6)
    ref = _step(copy.deepcopy(model), x, None)
    x_before = x.clone()
    out = torch.compile(model, backend="ratebp", options={"time_chunk": 2})(x)
    out.sum().backward()
    assert torch.equal(x, x_before)
    torch.testing.assert_close(out.detach(), ref[0])
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[1][k], msg=k)


def test_chunk_batch_norm_in_place_equals_out_of_place():
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    ref = chunk_batch_norm(x, w, b, mean, var, 1e-5)
    y = x.clone()
    assert chunk_batch_norm_(y, w, b, mean, var, 1e-5) is y
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(chunk_batch_norm_(x.clone(), None, None, mean, var, 1e-5),
                               chunk_batch_norm(x, None, None, mean, var, 1e-5))


class _StaticBN(nn.Module):
    """A BatchNorm of the static input, before the input is repeated over T: computed once, outside the
    stages."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.fc = nn.Linear(3, 2)
        self.sn = LIF(v_threshold=0.3)

    def forward(self, img):
        return self.sn(self.fc(self.bn(img).unsqueeze(0).expand(5, -1, -1)))


def test_a_batchnorm_of_a_static_input_before_the_repeat():
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # streamed, not refused to the unstreamed form
        program = _assert_same_step(_StaticBN().double(), torch.randn(4, 3, dtype=torch.float64),
                                    input_layout="static")
    assert [n.target for n in program.spike.graph.nodes].count(spike_batch_norm) == 1    # outside the stages


# ---------------------------------------------------------------------------------------------------
# The memory budget: streamed only when the spike pass would exceed it, in the fewest chunks that fit
# ---------------------------------------------------------------------------------------------------
BUDGET_MODELS = {
    "resnet18": (lambda: models.resnet18(width=8), (16, 8, 3, 32, 32)),
    "vgg11": (lambda: models.vgg11(width=4), (12, 4, 3, 32, 32)),
    "convnet28": (lambda: models.ZOO["convnet28"](num_classes=10, in_channels=1, width=8), (10, 8, 1, 28, 28)),
    "mlp": (lambda: models.ZOO["mlp"](num_classes=10, in_channels=40, width=64), (20, 16, 40)),
}


def _spike_peak(tm, x) -> int:
    """The peak of the tensors the program's spike pass creates, measured."""
    from ratebp_compile.memory import LiveTensorTracker

    with torch.no_grad(), LiveTensorTracker() as tracker:
        tm.compiled.step.spike(x)
    return tracker.peak_bytes


def _budget_case(name, dtype=torch.float32):
    make, shape = BUDGET_MODELS[name]
    torch.manual_seed(0)
    return make().to(dtype).train(), torch.rand(*shape, dtype=dtype)


@pytest.mark.parametrize("name", sorted(BUDGET_MODELS))
def test_spike_pass_never_exceeds_its_memory_budget(name):
    """From one step's worth to all steps' worth, the budget picks the fewest chunks whose estimate fits,
    the measured peak stays within it, and the step computes what the unstreamed step computes (float64:
    to rounding, spikes alike)."""
    from ratebp_compile.passes.stream_time import estimate_peak_bytes

    model, x = _budget_case(name, torch.float64)
    T = x.shape[0]
    y = torch.randint(0, 10, (x.shape[1],))
    loss = lambda out: F.cross_entropy(out.mean(0), y)        # noqa: E731
    ref = _step(copy.deepcopy(model), x, None, loss=loss, memory_budget=None)
    assert ref[3].compiled.step.meta["ratebp.streamed"] == "all T steps at once (no memory budget)"
    unstreamed, _ = prepare(copy.deepcopy(model), [x], "compact_spikes", inclusive=False)   # what stream_time sees
    full = estimate_peak_bytes(unstreamed.spike, T)
    assert _spike_peak(ref[3], x) <= full
    one = estimate_peak_bytes(unstreamed.spike, T, 1)
    assert one < full
    chunks_seen = set()
    for budget in (one, (2 * one + full) // 3, (one + 2 * full) // 3, full - 1):
        twin = copy.deepcopy(model)
        tm = rc.transform(twin, memory_budget=budget)
        x_before = x.clone()
        out = tm(x)
        loss(out).backward()
        assert torch.equal(x, x_before), "the step changed its input"
        program = tm.compiled.step
        bounds = next(iter(_stages(program).values())).bounds
        chunk = max(length for _, length in bounds)
        fits = [k for k in range(2, T + 1) if estimate_peak_bytes(unstreamed.spike, T, -(-T // k)) <= budget]
        assert len(bounds) == min(fits), (budget, bounds, fits)        # the fewest chunks that fit
        chunks_seen.add(chunk)
        assert program.meta["ratebp.streamed"].startswith(f"in chunks of at most {chunk} of the T = {T} steps")
        assert f"memory budget {format_bytes(budget)}" in program.meta["ratebp.streamed"]
        assert _spike_peak(tm, x) <= budget, budget
        torch.testing.assert_close(out.detach(), ref[0], rtol=1e-10, atol=1e-12)
        for k, p in twin.named_parameters():
            torch.testing.assert_close(p.grad, ref[1][k], rtol=1e-9, atol=1e-11, msg=k)
    assert len(chunks_seen) >= 3, chunks_seen


@pytest.mark.parametrize("name", sorted(BUDGET_MODELS))
def test_every_chunk_keeps_its_budget_in_float32(name):
    """Float32, where the stages store 1-byte spikes and convolutions run on channels-last memory: a budget
    equal to the estimate of each chunk the budget can pick holds the measured peak (the ResNet went over by
    64 bytes, one stage's statistics, one step at a time before the estimate counted them once more)."""
    from ratebp_compile.passes.stream_time import estimate_peak_bytes

    model, x = _budget_case(name)
    T = x.shape[0]
    unstreamed, _ = prepare(copy.deepcopy(model), [x], "compact_spikes", inclusive=False)
    estimates = sorted({estimate_peak_bytes(unstreamed.spike, T, -(-T // k)) for k in range(2, T + 1)})
    for budget in estimates:
        tm = rc.transform(copy.deepcopy(model), memory_budget=budget)
        x_before = x.clone()
        tm(x).sum().backward()
        assert torch.equal(x, x_before), "the step changed its input"
        program = tm.compiled.step
        assert program.meta["ratebp.streamed"].startswith("in chunks of at most"), program.meta["ratebp.streamed"]
        if name in ("resnet18", "vgg11"):
            code = next(iter(_stages(program).values())).value_graphs
            assert any("channels_last" in gm.code for gm in code.values())
        assert _spike_peak(tm, x) <= budget, (budget, program.meta["ratebp.streamed"])


def test_a_budget_that_fits_runs_all_steps_at_once():
    model, x = _budget_case("resnet18")
    tm = rc.transform(model)                        # the default: a quarter of the machine's memory
    tm(x).sum().backward()
    program = tm.compiled.step
    assert not _stages(program)
    assert program.meta["ratebp.streamed"].startswith("all T steps at once (estimated peak ")
    assert "≤ memory budget" in program.meta["ratebp.streamed"]


def test_a_fraction_is_of_the_device_memory(monkeypatch):
    """A float budget is that fraction of the device's memory, read when the step is compiled."""
    import importlib

    from ratebp_compile.passes.stream_time import estimate_peak_bytes

    module = importlib.import_module("ratebp_compile.memory")
    model, x = _budget_case("vgg11")
    ref = rc.transform(copy.deepcopy(model), memory_budget=None)
    ref(x)
    need = estimate_peak_bytes(ref.compiled.step.spike, x.shape[0])
    monkeypatch.setattr(module, "device_memory_bytes", lambda device: 4 * (need - 1))
    tm = rc.transform(copy.deepcopy(model), memory_budget=0.25)
    tm(x)
    assert _stages(tm.compiled.step)
    assert _spike_peak(tm, x) <= need - 1
    monkeypatch.setattr(module, "device_memory_bytes", lambda device: None)     # a device of unknown memory
    tm = rc.transform(model, memory_budget=0.25)
    tm(x)
    assert tm.compiled.step.meta["ratebp.streamed"] == "all T steps at once (the memory of cpu is unknown: no budget)"


def test_a_budget_below_one_step_warns_and_runs_step_by_step():
    model, x = _budget_case("mlp")
    with pytest.warns(UserWarning, match="even one step at a time, over the memory budget"):
        tm = rc.transform(model, memory_budget=1024)
        tm(x).sum().backward()
    assert max(length for _, length in next(iter(_stages(tm.compiled.step).values())).bounds) == 1


def test_time_chunk_overrides_the_budget():
    model, x = _budget_case("mlp")
    tm = rc.transform(model, memory_budget=None, time_chunk=5)
    tm(x)
    assert tm.compiled.step.meta["ratebp.streamed"] == "in chunks of at most 5 of the T = 20 steps (4 chunks; " \
                                                       "time_chunk = 5)"


class _Convolutions(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the convolutions run under it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.convolution.default
        return func(*args, **(kwargs or {}))


def test_batchnorm_inputs_kept_rather_than_recomputed_when_they_fit():
    """Streamed under a budget with room for one stage's BatchNorm inputs of all T steps, every stage keeps
    them from the statistics pass: each convolution runs once per chunk (not twice), the measured peak stays
    within the budget, and the step equals the unstreamed one. With less room they are recomputed."""
    from ratebp_compile.passes.stream_time import estimate_peak_bytes, kept_bytes

    model, x = _budget_case("resnet18", torch.float64)
    T = x.shape[0]
    unstreamed, _ = prepare(copy.deepcopy(model), [x], "compact_spikes", inclusive=False)
    two_chunks, kept = estimate_peak_bytes(unstreamed.spike, T, T // 2), kept_bytes(unstreamed.spike)
    assert 0 < kept
    convs_per_step = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    y = torch.randint(0, 10, (x.shape[1],))
    loss = lambda out: F.cross_entropy(out.mean(0), y)        # noqa: E731
    ref = _step(copy.deepcopy(model), x, None, loss=loss, memory_budget=None)
    for budget, keeps in ((two_chunks + kept, True), (two_chunks, False)):
        twin = copy.deepcopy(model)
        out, grads, _, tm = _step(twin, x, None, loss=loss, memory_budget=budget)
        program = tm.compiled.step
        assert program.meta["ratebp.streamed"].startswith(f"in chunks of at most {T // 2} of the T = {T} steps")
        assert program.meta["ratebp.streamed"].endswith("BatchNorm inputs kept, not recomputed)") == keeps
        stages = [m for m in _stages(program).values() if m.batchnorms]
        assert stages and all(m.keep_all == keeps for m in stages)
        if keeps:
            assert all(not m.value_graphs and sorted(m.first_graphs) == [str(T // 2)] for m in stages)
        counter = _Convolutions()
        with torch.no_grad(), counter:
            program.spike(x)
        assert counter.count == convs_per_step * (2 if keeps else 3)     # twice on the second chunk otherwise
        assert _spike_peak(tm, x) <= budget
        torch.testing.assert_close(out, ref[0], rtol=1e-10, atol=1e-12)
        for k in ref[1]:
            torch.testing.assert_close(grads[k], ref[1][k], rtol=1e-9, atol=1e-11, msg=k)

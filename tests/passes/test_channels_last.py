"""channels_last: on CPU the spike pass runs its 2-D convolutions, and the neurons between them, on
channels-last memory — the same values, to the convolutions' rounding, with no copy back and forth."""
import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import ratebp_compile as rc
from ratebp_compile import models
from ratebp_compile.nn import LIF, ParametricLIF
from ratebp_compile.nn.spec import NeuronSpec
from ratebp_compile.passes import channels_last
from ratebp_compile.stream import StreamStage
from tests.passes.test_compact_spikes import Residual
from tests.passes.test_stream_time import SharedConvolution
from tests.passes.util import Tiny, prepare, step_with_and_without

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the pass needs oneDNN")

EXPECTED = """
def forward(self, x):
    flatten = x.flatten(0, 1);  x = None
    contiguous = flatten.contiguous(memory_format = torch.channels_last);  flatten = None
    conv = self.conv(contiguous);  contiguous = None
    bn_weight = self.bn.weight
    bn_bias = self.bn.bias
    spike_batch_norm = ratebp_compile_graph_ops_spike_batch_norm(conv, bn_weight, bn_bias, 1e-05);  conv = bn_weight = bn_bias = None
    getitem = spike_batch_norm[0]
    getitem_1 = spike_batch_norm[1]
    getitem_2 = spike_batch_norm[2];  spike_batch_norm = None
    unflatten = getitem.unflatten(0, (2, -1));  getitem = None
    permute = unflatten.permute(0, 1, 3, 4, 2);  unflatten = None
    lif_spike_pass = ratebp_compile_nn_spec_lif_fused_spike_pass(permute);  permute = None
    getitem_3 = lif_spike_pass[0]
    permute_1 = getitem_3.permute(0, 1, 4, 2, 3);  getitem_3 = None
    getitem_4 = lif_spike_pass[1]
    permute_2 = getitem_4.permute(0, 1, 4, 2, 3);  getitem_4 = None
    getitem_5 = lif_spike_pass[2];  lif_spike_pass = None
    permute_3 = getitem_5.permute(0, 1, 4, 2, 3);  getitem_5 = None
    mean = permute_1.mean((3, 4));  permute_1 = None
    fc = self.fc(mean);  mean = None
    contiguous_1 = permute_2.contiguous();  permute_2 = None
    contiguous_2 = permute_3.contiguous();  permute_3 = None
    return (fc, getitem_1, getitem_2, contiguous_1, contiguous_2)
"""


class _Recorder(fx.Interpreter):
    """Runs a spike graph and keeps, as they ran, every convolution's input, the input of every ``contiguous``
    the pass put before one, and every neuron's input."""

    def __init__(self, gm):
        super().__init__(gm)
        self.conv_inputs, self.converted, self.neuron_inputs = [], [], []

    def run_node(self, n):
        if n.op == "call_module" and isinstance(self.module.get_submodule(n.target), nn.Conv2d):
            self.conv_inputs.append(self.env[n.args[0]])
        if n.op == "call_method" and n.target == "contiguous" and n.kwargs:
            self.converted.append(self.env[n.args[0]])
        if n.op == "call_function" and isinstance(n.target, NeuronSpec):
            self.neuron_inputs.append(self.env[n.args[0]])
        return super().run_node(n)


def _spike_run(spike, x):
    recorder = _Recorder(spike)
    with torch.no_grad():
        return recorder.run(x), recorder


def test_structure_numerics_and_fired():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 2, 5, 5)
    x_before = x.clone()
    program, _ = prepare(Tiny().train(), [x], "channels_last", inclusive=False)
    before, _ = _spike_run(program.spike, x)
    result = channels_last(program)
    assert result.modified
    assert result.gm.spike.code.strip() == EXPECTED.strip()
    after, ran = _spike_run(result.gm.spike, x)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        assert a.shape == b.shape and a.stride() == b.stride()    # what the rate pass and the user see
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ran.conv_inputs[0].is_contiguous(memory_format=torch.channels_last)
    assert not ran.converted[0].is_contiguous(memory_format=torch.channels_last)    # the input: converted
    assert all(t.is_contiguous() for t in ran.neuron_inputs)      # the kernel reads it without a copy
    assert torch.equal(x, x_before)


class _TransposedOut(nn.Module):
    """Returns its spikes with two dimensions swapped: an output that is dense but not contiguous."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.sn = LIF(decay=0.5, v_threshold=0.5)

    def forward(self, x):
        T = x.shape[0]
        return self.sn(self.bn(self.conv(x.flatten(0, 1))).unflatten(0, (T, -1))).transpose(3, 4)


def test_a_dense_output_in_another_order_gets_its_strides_back():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 2, 5, 6)
    program, _ = prepare(_TransposedOut().train(), [x], "channels_last", inclusive=False)
    before, _ = _spike_run(program.spike, x)
    assert not before[0].is_contiguous()
    assert channels_last(program).modified
    assert "with_strides" in program.spike.code
    after, _ = _spike_run(program.spike, x)
    for a, b in zip(after, before):
        assert a.shape == b.shape and a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_resnet_stays_channels_last_from_one_convolution_to_the_next():
    """In a ResNet every convolution's input already is channels-last when it runs (the ``contiguous`` the
    pass put before it has nothing to do but for the first), and every neuron's permuted input is
    contiguous: no activation is copied from one memory order to the other."""
    torch.manual_seed(0)
    x = torch.rand(3, 2, 3, 16, 16)
    program, _ = prepare(models.resnet18(width=4).train(), [x], "channels_last", inclusive=False)
    before, _ = _spike_run(program.spike, x)
    result = channels_last(program)
    assert result.modified
    after, ran = _spike_run(result.gm.spike, x)
    convs = [n for n in result.gm.spike.graph.nodes if n.op == "call_module"
             and isinstance(result.gm.spike.get_submodule(n.target), nn.Conv2d)]
    assert len(ran.conv_inputs) == len(convs) == len(ran.converted) == 20
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in ran.conv_inputs)
    assert not ran.converted[0].is_contiguous(memory_format=torch.channels_last)    # the network's input
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in ran.converted[1:])
    assert len(ran.neuron_inputs) == 17 and all(t.is_contiguous() for t in ran.neuron_inputs)
    for a, b in zip(after, before):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _FlatView(nn.Module):
    """conv – BN – LIF, then the spikes flattened by ``view``, which needs their ``[T, B, C, H, W]`` order."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.sn = LIF(decay=0.5, v_threshold=0.5)
        self.fc = nn.Linear(4 * 25, 3)

    def forward(self, x):
        T, B = x.shape[:2]
        s = self.sn(self.bn(self.conv(x.flatten(0, 1))).view(T, B, 4, 5, 5))
        return self.fc(s.view(T, B, -1))


@pytest.mark.parametrize("case", ["no convolution", "float64", "float64, streamed", "hooked", "view"])
def test_not_fired(case):
    """A spike pass without a 2-D convolution, one in float64 (which oneDNN does not take), streamed or not,
    one with a forward hook (which would see channels-last tensors: a ``view`` in it could fail) and one
    with a ``view`` that channels-last spikes could not take are left as they are. (Streamed, such a
    ``view`` is a ``reshape`` of a chunk, which takes any memory order: see below.)"""
    if case == "view":
        model, x, chunk = _FlatView(), torch.rand(3, 2, 2, 5, 5), None
    elif case == "float64, streamed":
        model, x, chunk = models.resnet18(width=4).double(), torch.rand(3, 2, 3, 16, 16, dtype=torch.float64), 2
    elif case == "hooked":
        model, x, chunk = Tiny(), torch.rand(2, 3, 2, 5, 5), None
        model.conv.register_forward_hook(lambda module, args, output: None)
    elif case == "no convolution":
        model, x, chunk = Residual(), torch.rand(3, 2, 4), None
    else:
        model, x, chunk = Tiny().double(), torch.rand(2, 3, 2, 5, 5, dtype=torch.float64), None
    program, _ = prepare(model.train(), [x], "channels_last", inclusive=False, time_chunk=chunk)
    assert (chunk is not None) == bool(_stages(program.spike))
    code = program.spike.code
    stages = _stages(program.spike)
    result = channels_last(program)
    assert not result.modified and result.gm.spike.code == code
    assert "channels_last" not in code
    assert _stages(result.gm.spike) == stages and not any("channels_last" in gm.code for gm in _chunk_graphs(stages))


def _stages(spike) -> dict:
    return {name: m for name, m in spike.named_children() if isinstance(m, StreamStage)}


def _chunk_graphs(stages: dict) -> list:
    return [gm for s in stages.values() for d in (s.value_graphs, s.stats_graphs, s.first_graphs)
            for gm in d.values()]


STREAMED_CHUNK = """
def forward(self, getitem_3, mean_spike_batch_norm_1, var_spike_batch_norm_1):
    to = getitem_3.to(torch.float32);  getitem_3 = None
    reshape = to.reshape((4, 4, 16, 16));  to = None
    contiguous = reshape.contiguous(memory_format = torch.channels_last);  reshape = None
    layers_0_0_conv1 = getattr(getattr(self.layers, "0"), "0").conv1(contiguous);  contiguous = None
    layers_0_0_bn1_weight = getattr(getattr(self.layers, "0"), "0").bn1.weight
    layers_0_0_bn1_bias = getattr(getattr(self.layers, "0"), "0").bn1.bias
    chunk_batch_norm = ratebp_compile_graph_ops_chunk_batch_norm_(layers_0_0_conv1, layers_0_0_bn1_weight, layers_0_0_bn1_bias, mean_spike_batch_norm_1, var_spike_batch_norm_1, 1e-05);  layers_0_0_conv1 = layers_0_0_bn1_weight = layers_0_0_bn1_bias = mean_spike_batch_norm_1 = var_spike_batch_norm_1 = None
    reshape_1 = chunk_batch_norm.reshape((2, 2, 4, 16, 16));  chunk_batch_norm = None
    return (reshape_1,)
"""


def test_a_streamed_spike_pass_runs_its_stages_on_channels_last_memory(monkeypatch):
    """Streamed, every chunk graph's convolution gets channels-last input — already so but for the network's
    input, since each neuron's stage stores its spikes in the order its input came in — and each fused
    neuron runs on a contiguous (permuted) chunk. The spike graph's outputs are those before, with their
    strides; the program's former stages are left as they were (the pass rewrote copies)."""
    torch.manual_seed(0)
    model = models.resnet18(width=4).train()
    x = torch.rand(5, 2, 3, 16, 16)
    x_before = x.clone()
    program, _ = prepare(model, [x], "channels_last", inclusive=False, time_chunk=2)
    old_stages = _stages(program.spike)
    old_code = [gm.code for gm in _chunk_graphs(old_stages)]
    before, _ = _spike_run(program.spike, x)
    result = channels_last(program)
    assert result.modified
    new_stages = _stages(result.gm.spike)
    assert new_stages.keys() == old_stages.keys() and not set(new_stages.values()) & set(old_stages.values())
    assert [gm.code for gm in _chunk_graphs(old_stages)] == old_code
    assert new_stages["stream_layers_0_0_sn1"].value_graphs["2"].code.strip() == STREAMED_CHUNK.strip()

    conv_inputs, scanned, stored = [], [], {}
    hooks = [m.register_forward_pre_hook(lambda m, args: conv_inputs.append(args[0]))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [s.register_forward_hook(lambda m, args, out, name=name: stored.__setitem__(name, out))
              for name, s in new_stages.items()]
    real_scan = NeuronSpec.scan
    monkeypatch.setattr(NeuronSpec, "scan", lambda spec, x_seq, *a: scanned.append(x_seq) or real_scan(spec, x_seq, *a))
    try:
        after, _ = _spike_run(result.gm.spike, x)
    finally:
        for h in hooks:
            h.remove()
    assert len(conv_inputs) > 20 and all(t.is_contiguous(memory_format=torch.channels_last) for t in conv_inputs)
    assert len(scanned) == 17 * 3 and all(t.is_contiguous() for t in scanned)    # 17 neurons, 3 chunks
    spatial = [out for out in stored.values() if out[0].dim() == 5]
    assert len(spatial) == 17
    for out in spatial:
        spikes, r, e = out[:3]
        assert spikes.dtype == torch.uint8 and spikes.permute(0, 1, 3, 4, 2).is_contiguous()
        assert r.is_contiguous() and e.is_contiguous()
    assert len(after) == len(before)
    for a, b in zip(after, before):
        assert a.shape == b.shape and a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.equal(x, x_before)


class _Merged(nn.Module):
    """Two conv – BN – LIF layers on time and batch merged, ``[T·B, C, H, W]``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.sn1 = LIF(decay=0.5, v_threshold=0.5, time_steps=5)
        self.sn2 = LIF(decay=0.5, v_threshold=0.5, time_steps=5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        s = self.sn2(self.bn2(self.conv2(self.sn1(self.bn1(self.conv1(x))))))
        return self.fc(s.mean((2, 3)))


@pytest.mark.parametrize("name", ["resnet18", "learned decay", "flat view", "shared", "merged"])
def test_a_streamed_training_step_matches_the_step_without_it(name):
    """Streamed, through transform: the step without the pass, to rounding. Also for the model whose
    ``view`` of spikes needs their former order unstreamed (streamed it is a ``reshape`` of each chunk),
    one whose convolution's output is stored whole and read by a learned-decay LIF and a neuron without
    fused kernels (which runs on its input as it comes), and one with time and batch merged; and with
    learned decays, whose e_params a permuted stage gives back in the former order too."""
    torch.manual_seed(1)
    y, options = torch.tensor(1), {}          # y: the class of the mean output, or one per sample
    if name == "resnet18":
        model, x, y = models.resnet18(width=4), torch.rand(5, 3, 3, 16, 16), torch.tensor([1, 2, 0])
    elif name == "learned decay":
        model, x, y = models.resnet18(width=4, neuron=lambda: ParametricLIF(init_tau=1.5)), \
            torch.rand(5, 3, 3, 16, 16), torch.tensor([1, 2, 0])
    elif name == "flat view":
        model, x, y = _FlatView(), torch.rand(5, 3, 2, 5, 5), torch.tensor([1, 2, 0])
    elif name == "shared":
        model, x = SharedConvolution(), torch.rand(5, 3, 2, 4, 4) * 2
    else:
        model, x, options = _Merged(), torch.rand(5 * 2, 2, 5, 5), {"input_layout": "T*B"}
    out, out_without, grads = step_with_and_without(channels_last, model.train(), x, y, time_chunk=2, **options)
    torch.testing.assert_close(out, out_without, rtol=1e-5, atol=1e-5)
    for param, grad, grad_without in grads:
        torch.testing.assert_close(grad, grad_without, rtol=1e-4, atol=1e-6, msg=lambda m: f"{param}: {m}")


def test_a_streamed_step_with_kept_batchnorm_inputs_matches_the_step_without_it():
    """Under a budget with room for the BatchNorm inputs of all T steps, every chunk is computed from the
    channels-last inputs kept from the statistics pass: the step without the pass, to rounding."""
    from ratebp_compile.passes.stream_time import estimate_peak_bytes, kept_bytes

    torch.manual_seed(2)
    model, x, y = models.resnet18(width=4).train(), torch.rand(4, 3, 3, 16, 16), torch.tensor([1, 2, 0])
    unstreamed, _ = prepare(copy.deepcopy(model), [x], "compact_spikes", inclusive=False)
    budget = estimate_peak_bytes(unstreamed.spike, 4, 2) + kept_bytes(unstreamed.spike) // 2    # 2 chunks, kept
    tm = rc.transform(copy.deepcopy(model), memory_budget=budget)
    tm(x)
    assert tm.compiled.step.meta["ratebp.streamed"].endswith("BatchNorm inputs kept, not recomputed)")
    out, out_without, grads = step_with_and_without(channels_last, model, x, y, memory_budget=budget)
    torch.testing.assert_close(out, out_without, rtol=1e-5, atol=1e-5)
    for name, grad, grad_without in grads:
        torch.testing.assert_close(grad, grad_without, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_a_model_with_such_a_view_trains_as_before():
    """The model whose ``view`` needs the former memory order: its step runs, with the pass not fired, and
    leaves its input as it was."""
    torch.manual_seed(0)
    model = _FlatView().train()
    x = torch.rand(3, 2, 2, 5, 5)
    x_before = x.clone()
    tm = rc.transform(model)
    F.cross_entropy(tm(x).mean(0), torch.tensor([0, 2])).backward()
    assert not next(r for r in tm.compiled.history if r.name == "channels_last").modified
    assert all(p.grad is not None for p in model.parameters())
    assert torch.equal(x, x_before)


def test_the_training_step_matches_the_step_without_it():
    """Through transform: the outputs and gradients of the step without the pass, to rounding; the input is
    left as it was."""
    torch.manual_seed(1)
    out, out_without, grads = step_with_and_without(channels_last, models.resnet18(width=4).train(),
                                                    torch.rand(4, 3, 3, 16, 16), torch.tensor([1, 2, 3]))
    torch.testing.assert_close(out, out_without, rtol=1e-5, atol=1e-5)
    for name, grad, grad_without in grads:
        torch.testing.assert_close(grad, grad_without, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_fresh_steps_give_the_same_gradients():
    """Four fresh compilations of one model on one batch: bitwise the same gradients. An end-to-end check:
    with a rate pass that saw channels-last statistics, one run in three differed on an idle machine
    (PyTorch's convolution backward on a channels-last input with a contiguous gradient, a failure that
    depends on the threads' timing). The deterministic guard is that the spike graph's outputs keep their
    strides (the tests above)."""
    torch.manual_seed(1)
    model = models.resnet18(width=4).train()
    x = torch.rand(4, 3, 3, 16, 16)
    y = torch.tensor([1, 2, 3])
    grads = []
    for _ in range(4):
        twin = copy.deepcopy(model)
        F.cross_entropy(rc.transform(twin)(x).mean(0), y).backward()
        grads.append([p.grad for p in twin.parameters()])
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))

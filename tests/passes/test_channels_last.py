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
from ratebp_compile.nn import LIF
from ratebp_compile.nn.spec import NeuronSpec
from ratebp_compile.passes import channels_last
from ratebp_compile.passes.channels_last import _dense_order
from tests.passes.test_compact_spikes import Residual
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


@pytest.mark.parametrize("case", ["streamed", "no convolution", "float64", "hooked", "view"])
def test_not_fired(case):
    """A streamed spike pass, one without a 2-D convolution, one in float64 (which oneDNN does not take), one
    with a forward hook (which would see channels-last tensors: a ``view`` in it could fail) and one with a
    ``view`` that channels-last spikes could not take are left as they are."""
    if case == "view":
        model, x, chunk = _FlatView(), torch.rand(3, 2, 2, 5, 5), None
    elif case == "hooked":
        model, x, chunk = Tiny(), torch.rand(2, 3, 2, 5, 5), None
        model.conv.register_forward_hook(lambda module, args, output: None)
    elif case == "streamed":
        model, x, chunk = models.resnet18(width=4), torch.rand(3, 2, 3, 16, 16), 2
    elif case == "no convolution":
        model, x, chunk = Residual(), torch.rand(3, 2, 4), None
    else:
        model, x, chunk = Tiny().double(), torch.rand(2, 3, 2, 5, 5, dtype=torch.float64), None
    program, _ = prepare(model.train(), [x], "channels_last", inclusive=False, time_chunk=chunk)
    code = program.spike.code
    result = channels_last(program)
    assert not result.modified and result.gm.spike.code == code
    assert "channels_last" not in code


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


def test_dense_order():
    x = torch.empty(4, 2, 3, 5, 5)
    assert _dense_order(x) is None                                                   # contiguous already
    last = torch.empty(8, 3, 5, 5).contiguous(memory_format=torch.channels_last).unflatten(0, (4, 2))
    assert _dense_order(last) == [0, 1, 3, 4, 2]
    assert _dense_order(x.transpose(0, 1)) is None                                   # time not outermost
    assert _dense_order(torch.empty(4, 2, 10)[:, :, ::2]) is None                    # not dense


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

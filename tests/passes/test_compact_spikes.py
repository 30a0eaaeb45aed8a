"""compact_spikes: in an unstreamed spike pass, spikes read again after other layers wait in 1 byte — the
spike graph computes the same values in less memory."""
import pytest
import torch
from torch import nn

from ratebp_compile import models
from ratebp_compile.memory import LiveTensorTracker
from ratebp_compile.nn import LIF
from ratebp_compile.passes import compact_spikes
from tests.passes.util import prepare, step_with_and_without


class Residual(nn.Module):
    """Two LIF layers and a skip connection around the second: the first layer's spikes are read twice."""

    def __init__(self):
        super().__init__()
        self.fc0, self.sn0 = nn.Linear(4, 6), LIF(decay=0.5, v_threshold=0.5)
        self.fc1, self.sn1 = nn.Linear(6, 6), LIF(decay=0.5, v_threshold=0.5)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        s0 = self.sn0(self.fc0(x))
        s1 = self.sn1(self.fc1(s0))
        return self.fc2(s1 + s0)


EXPECTED = """
def forward(self, x):
    fc0 = self.fc0(x);  x = None
    lif_spike_pass = ratebp_compile_nn_spec_lif_fused_spike_pass(fc0);  fc0 = None
    getitem = lif_spike_pass[0]
    to = getitem.to(torch.uint8);  getitem = None
    getitem_1 = lif_spike_pass[1]
    getitem_2 = lif_spike_pass[2];  lif_spike_pass = None
    to_1 = to.to(torch.float32)
    fc1 = self.fc1(to_1);  to_1 = None
    lif_spike_pass_1 = ratebp_compile_nn_spec_lif_fused_spike_pass(fc1);  fc1 = None
    getitem_3 = lif_spike_pass_1[0]
    getitem_4 = lif_spike_pass_1[1]
    getitem_5 = lif_spike_pass_1[2];  lif_spike_pass_1 = None
    to_2 = to.to(torch.float32);  to = None
    add = getitem_3 + to_2;  getitem_3 = to_2 = None
    fc2 = self.fc2(add);  add = None
    return (fc2, getitem_1, getitem_2, getitem_4, getitem_5)
"""


def _spike_run(program, x):
    with torch.no_grad(), LiveTensorTracker() as tracker:
        out = program.spike(x)
    return out, tracker.peak_bytes


def test_structure_numerics_and_fired():
    x = torch.rand(3, 2, 4) * 2
    x_before = x.clone()
    program, _ = prepare(Residual(), [x], "compact_spikes", inclusive=False)
    before, _ = _spike_run(program, x)
    result = compact_spikes(program)
    assert result.modified
    assert result.gm.spike.code.strip() == EXPECTED.strip()
    after, _ = _spike_run(result.gm, x)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        assert torch.equal(a, b)
    assert torch.equal(x, x_before)


def test_resnet_block_sums_in_place_and_peaks_lower():
    """In a ResNet the block's input waits in 1 byte for the shortcut, and the restored shortcut is added
    into the BatchNorm's output: the spike pass peaks at 2¼ layers' activations, not 3 (here, at T = 8, the
    neurons' per-step state adds a little to both)."""
    torch.manual_seed(0)
    x = torch.rand(8, 4, 3, 32, 32)
    program, _ = prepare(models.resnet18(width=8).train(), [x], "compact_spikes", inclusive=False)
    before, peak_before = _spike_run(program, x)
    result = compact_spikes(program)
    assert result.modified
    code = result.gm.spike.code
    assert code.count(".to(torch.uint8)") == 8      # each block's input: read by its first convolution and shortcut
    assert ".add_(" in code
    after, peak_after = _spike_run(result.gm, x)
    for a, b in zip(after, before):
        assert torch.equal(a, b)
    assert peak_after <= 0.85 * peak_before, (peak_after, peak_before)


@pytest.mark.parametrize("model,time_chunk", [(lambda: models.vgg11(width=4), None),
                                              (lambda: models.resnet18(width=4), 2)], ids=["chain", "streamed"])
def test_not_fired_for_spikes_read_once_or_a_streamed_pass(model, time_chunk):
    program, _ = prepare(model().train(), [torch.rand(3, 2, 3, 16, 16)], "compact_spikes", inclusive=False,
                         time_chunk=time_chunk)
    spike = program.spike
    result = compact_spikes(program)
    assert not result.modified and result.gm.spike is spike
    assert ".to(torch.uint8)" not in spike.code


def test_the_training_step_is_unchanged():
    """Through transform: the same outputs and gradients as the step without the pass (it is exact)."""
    torch.manual_seed(1)
    out, out_without, grads = step_with_and_without(compact_spikes, models.resnet18(width=4).train(),
                                                    torch.rand(4, 3, 3, 16, 16), torch.tensor([1, 2, 3]))
    assert torch.equal(out, out_without)
    for name, grad, grad_without in grads:
        assert torch.equal(grad, grad_without), name


def test_spikes_a_forward_hook_sees_are_left_alone():
    """A forward hook receives the spikes themselves and may write into them; a 1-byte copy would hide that
    from the layers reading them after, so hooked spikes are not compacted."""
    model = Residual()
    seen = []
    model.sn0.register_forward_hook(lambda module, args, output: seen.append(output.sum().item()))
    x = torch.rand(3, 2, 4) * 2
    program, _ = prepare(model, [x], "compact_spikes", inclusive=False)
    spike = program.spike
    result = compact_spikes(program)
    assert not result.modified and result.gm.spike is spike
    assert ".to(torch.uint8)" not in spike.code

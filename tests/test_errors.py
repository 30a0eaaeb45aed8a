"""Bad input: a clear RateBPError naming the module or op and the user's source line, and the model
left exactly as it was. (Capture-time refusals: tests/test_capture.py; refused ops:
tests/passes/test_classify_ops.py.)"""
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ratebp_compile as rc
from ratebp_compile import models
from ratebp_compile.nn import LIF
from tests.conftest import assert_model_unchanged, snapshot_model


def test_wrong_input_rank_names_the_check_and_line():
    model = models.resnet18(width=4)
    snap = snapshot_model(model)
    tm = rc.transform(model)
    with pytest.raises(rc.RateBPError, match=re.compile(
            r"expect_rank.*resnet\.py:\d+ in forward.*expected input x_seq \[T, B, C, H, W\] \(5 dimensions\), "
            r"got shape \(2, 3, 32, 32\)", re.S)):
        tm(torch.rand(2, 3, 32, 32))
    assert_model_unchanged(model, snap)


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.sn = LIF()

    def forward(self, x):
        return self.sn(self.fc(x))


def test_input_without_time_axis():
    model = OneLayer()
    snap = snapshot_model(model)
    with pytest.raises(rc.RateBPError, match=r"input 'x' has shape \(4,\).*\[T, B, ...\] input"):
        rc.transform(model)(torch.rand(4))
    assert_model_unchanged(model, snap)


def test_shape_error_inside_the_model_names_the_op():
    model = OneLayer()
    with pytest.raises(rc.RateBPError, match=r"module 'fc' \(Linear\) at .*test_errors\.py:\d+ .*fails"):
        rc.transform(model)(torch.rand(3, 2, 5))


def test_mixing_op_leaves_model_unchanged():
    class Readout(OneLayer):
        def forward(self, x):
            return super().forward(x)[-1]

    model = Readout()
    snap = snapshot_model(model)
    with pytest.raises(rc.RateBPError, match=r"test_errors\.py:\d+ in forward.*selects one timestep"):
        rc.transform(model)(torch.rand(3, 2, 4))
    assert_model_unchanged(model, snap)


def test_max_pool_between_neurons_warns_once_and_works():
    model = models.SpikingVGG([4, "M", 8, "AA"], [8, 3])
    tm = rc.transform(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            out = tm(torch.rand(2, 2, 3, 8, 8))
            F.cross_entropy(out.mean(0), torch.tensor([0, 2])).backward()
    approx = [w for w in caught if issubclass(w.category, rc.ApproximationWarning)]
    assert len(approx) == 1
    assert re.search(r"module 'features\.1\.layer' \(MaxPool2d\) at .*vgg\.py:\d+", str(approx[0].message))
    assert model.features[0].conv.weight.grad is not None


class TorchBatchNorm(nn.Module):
    """torch.batch_norm (not F.batch_norm): its arguments are ordered differently, and the rate pass does
    not know it, so it must be refused rather than copied into the rate graph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.sn = LIF()

    def forward(self, x):
        y = self.fc(x).flatten(0, 1)
        y = torch.batch_norm(y, self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var, True, 0.1,
                             1e-5, False)
        return self.sn(y.unflatten(0, (x.shape[0], -1)))


def test_an_unknown_batch_norm_form_is_refused_by_name():
    model = TorchBatchNorm()
    snap = snapshot_model(model)
    with pytest.raises(rc.RateBPError, match=r"'batch_norm', an op ratebp_compile does not know"):
        rc.transform(model)(torch.rand(3, 2, 4))
    assert_model_unchanged(model, snap)

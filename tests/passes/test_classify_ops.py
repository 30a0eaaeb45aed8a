"""classify_ops: exact / approximate (warned, with source line) / refused (one error listing all)."""
import re

import pytest
import torch
from torch import nn

import ratebp_compile as rc
from ratebp_compile.nn import LIF
from ratebp_compile.passes import classify_ops
from tests.passes.util import prepare


class Many(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.sn1, self.sn2 = LIF(), LIF()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        T = x.shape[0]
        y = self.pool(self.conv(x.flatten(0, 1))).unflatten(0, (T, -1))
        a = self.sn1(y)
        b = self.sn2(torch.relu(y))
        z = a * b + 2 * a
        return self.fc(z.mean((3, 4))).sum(0)


def test_classes_warnings_and_metadata_only():
    model = Many().train()
    x = torch.rand(3, 2, 2, 6, 6)
    gm, _ = prepare(model, [x], "classify_ops", inclusive=False)
    code = gm.code
    with pytest.warns(rc.ApproximationWarning) as record:
        result = classify_ops(gm)
    assert not result.modified and result.gm.code == code
    kinds = {n.name: n.meta["ratebp.class"].kind for n in gm.graph.nodes
             if n.op in ("call_function", "call_method", "call_module")}
    assert kinds == {"flatten": "exact", "conv": "exact",
                     "pool": "approximate", "unflatten": "exact", "lif": "neuron", "relu": "approximate",
                     "lif_1": "neuron", "mul": "approximate", "mul_1": "exact", "add": "exact", "mean": "exact",
                     "fc": "exact", "sum_1": "exact"}
    messages = [str(w.message) for w in record]
    assert len(messages) == 3
    for op, pattern in [("pool", r"module 'pool' \(MaxPool2d\)"), ("relu", r"function 'relu'"),
                        ("mul", r"product of two temporal tensors")]:
        assert any(re.search(pattern, m) and re.search(r"test_classify_ops\.py:\d+", m) for m in messages), op
    assert len(gm.meta["ratebp.approximations"]) == 3
    torch.testing.assert_close(gm(x), model(x))


class LastStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.sn = LIF()

    def forward(self, x):
        return self.sn(x)[-1]


class TemporalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.sn = LIF()
        self.conv = nn.Conv1d(4, 4, 3, padding=1)

    def forward(self, x):                       # x: [T, B, 4]
        return self.conv(self.sn(x).permute(1, 2, 0))


class MaxOverTime(nn.Module):
    def __init__(self):
        super().__init__()
        self.sn = LIF()

    def forward(self, x):
        return self.sn(x).amax(0)


class CumSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.sn = LIF()

    def forward(self, x):
        return self.sn(x).cumsum(0)


@pytest.mark.parametrize("model,pattern", [
    (LastStep, r"function 'getitem' at .*test_classify_ops\.py:\d+ in forward: return self\.sn\(x\)\[-1\]: "
               r"indexing selects one timestep"),
    (TemporalConv, r"module 'conv' \(Conv1d\) at .*test_classify_ops\.py:\d+.*time is at dimension 2"),
    (MaxOverTime, r"method '\.amax\(\)' at .*test_classify_ops\.py:\d+.*amax over the time axis"),
    (CumSum, r"method '\.cumsum\(\)' at .*test_classify_ops\.py:\d+.*does not know"),
], ids=["last-step", "conv-over-time", "max-over-time", "cumsum"])
def test_ops_that_mix_timesteps_are_refused(model, pattern):
    with pytest.raises(rc.RateBPError, match=re.compile("classify_ops: .*" + pattern, re.S)):
        prepare(model(), [torch.rand(3, 2, 4)], "classify_ops")


def test_all_refusals_are_reported_together():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.sn = LIF()

        def forward(self, x):
            s = self.sn(x)
            return s[0], s.cumsum(0)

    with pytest.raises(rc.RateBPError) as info:
        prepare(Two(), [torch.rand(3, 2, 4)], "classify_ops")
    assert "getitem" in str(info.value) and "cumsum" in str(info.value)


class Square(nn.Module):
    """The same temporal tensor twice in a product: still a product of two temporal tensors."""

    def __init__(self):
        super().__init__()
        self.sn = LIF()

    def forward(self, x):
        s = self.sn(x)
        return s * s


def test_a_product_of_a_temporal_tensor_with_itself_is_approximate():
    with pytest.warns(rc.ApproximationWarning, match=r"function 'mul' at .*test_classify_ops\.py:\d+ in forward: "
                                                     r"return s \* s: product of two temporal tensors"):
        gm, _ = prepare(Square(), [torch.rand(3, 2, 4)], "classify_ops")
    (mul,) = [n for n in gm.graph.nodes if n.name == "mul"]
    assert mul.meta["ratebp.class"].kind == "approximate"

"""State kept between calls is refused at capture, naming the module, the attribute and the line; the model
is left as it was. What the forward reads is recorded for the guards."""
import re

import pytest
import torch
from torch import nn

import ratebp_compile as rc
from ratebp_compile.capture import capture
from ratebp_compile.nn import LIF
from tests.conftest import assert_model_unchanged, snapshot_model


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.sn = LIF()
        self.history = []
        self.seen = {}
        self.register_buffer("count", torch.zeros(()))


class StoresLast(Base):
    def forward(self, x):
        self.last = x
        return self.sn(self.fc(x))


class Appends(Base):
    def forward(self, x):
        self.history.append(x.mean())
        return self.sn(self.fc(x))


class FillsDict(Base):
    def forward(self, x):
        self.seen["x"] = x
        return self.sn(self.fc(x))


class CountsInPlace(Base):
    def forward(self, x):
        self.count.add_(1)
        return self.sn(self.fc(x))


class CountsByAssignment(Base):
    def forward(self, x):
        self.count += 1
        return self.sn(self.fc(x))


class WritesItsInput(Base):
    def forward(self, x):
        x.flatten(0, 1).mul_(2)
        return self.sn(self.fc(x))


@pytest.mark.parametrize("model,pattern", [
    (StoresLast, r"module '<root>' \(StoresLast\): its forward sets self\.last at .*test_statewatch\.py:\d+ in forward"),
    (Appends, r"module '<root>' \(Appends\): its forward changes the list self\.history"),
    (FillsDict, r"module '<root>' \(FillsDict\): its forward changes the dict self\.seen"),
    (CountsInPlace, r"method '\.add_\(\)' at .*test_statewatch\.py:\d+ in forward: self\.count\.add_\(1\): updates "
                    r"the module state 'count' in place"),
    (CountsByAssignment, r"its forward sets self\.count at .*test_statewatch\.py:\d+"),
    (WritesItsInput, r"method '\.mul_\(\)' at .*test_statewatch\.py:\d+.*writes into the input 'x' in place"),
], ids=["attribute", "list", "dict", "buffer-in-place", "buffer-assigned", "input-in-place"])
def test_state_kept_between_calls_is_refused(model, pattern):
    m = model()
    snap = snapshot_model(m)
    x = torch.rand(3, 2, 3)
    x_before = x.clone()
    with pytest.raises(rc.RateBPError, match=re.compile(pattern, re.S)):
        rc.transform(m)(x)
    assert_model_unchanged(m, snap)
    assert m.history == [] and m.seen == {} and type(m) is model      # containers and class restored
    assert torch.equal(x, x_before)


def test_reads_are_recorded_per_module():
    class Reads(nn.Module):
        scale = 3.0                                  # class data: read through self

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.sn = LIF()
            self.offset = 0.5
            self.unused = 1.0

        def forward(self, x):
            return self.sn(self.fc(x) * self.scale + self.offset)

    m = Reads()
    gm = capture(m, [torch.rand(3, 2, 3)])
    reads = {type(k).__name__: v for k, v in gm.meta["ratebp.reads"].items()}
    assert reads["Reads"] == {"scale", "offset"}
    assert {"in_features", "out_features"}.isdisjoint(reads.get("Linear", set()))
    assert "LIF" not in reads                         # neurons: guarded through their spec
    assert type(m) is Reads and type(m.fc) is nn.Linear

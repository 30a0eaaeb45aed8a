"""Guards: a transformed model that changes after its first step trains the changed model — the program is
compiled again — never the one that was captured."""
import copy
import io

import pytest
import torch
from torch import nn

import ratebp_compile as rc
from ratebp_compile.guards import Guards
from ratebp_compile.nn import ATan, LIF
from tests.conftest import assert_close


class Net(nn.Module):
    """linear – LIF – linear, with a Python attribute the forward reads."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.sn = LIF(decay=0.5, v_threshold=0.6)
        self.fc2 = nn.Linear(6, 3)
        self.gain = 2.0

    def forward(self, x):
        return self.fc2(self.sn(self.fc1(x) * self.gain))


def _x():
    return torch.rand(4, 3, 4, generator=torch.Generator().manual_seed(1)) * 2


def _step(tm, x):
    """One step; checks that the input is unchanged; returns the outputs."""
    before = x.clone()
    out = tm(x)
    out.square().sum().backward()
    assert torch.equal(x, before)
    return out.detach()


def _fresh_step(model, x):
    """The step of a fresh transform of a copy of ``model``: what the changed model must train as."""
    ref = copy.deepcopy(model)
    ref.zero_grad()
    out = _step(rc.transform(ref), x)
    return out, {k: p.grad for k, p in ref.named_parameters()}


def _assert_trains_as_fresh(model, tm, x):
    expected, grads = _fresh_step(model, x)
    model.zero_grad()
    out = _step(tm, x)
    assert_close(out, expected)
    for k, p in model.named_parameters():
        assert_close(p.grad, grads[k], k)


@pytest.mark.parametrize("change", [
    lambda m: setattr(m.sn, "v_threshold", 0.2),
    lambda m: setattr(m.sn, "decay", 0.9),
    lambda m: setattr(m.sn, "surrogate", ATan(2.0)),
    lambda m: setattr(m.sn, "v_reset", 0.0),
    lambda m: setattr(m, "gain", 0.5),
], ids=["threshold", "decay", "surrogate", "reset", "python-attribute"])
def test_a_changed_configuration_recompiles(change):
    model, x = Net(), _x()
    tm = rc.transform(model)
    _step(tm, x)
    first = tm.compiled
    change(model)
    assert "changed" in first.guards.check()
    _assert_trains_as_fresh(model, tm, x)
    assert tm.compiled is not first and len(tm.programs) == 1


def test_setting_an_attribute_through_the_transformed_module_reaches_the_model():
    model, x = Net(), _x()
    tm = rc.transform(model)
    _step(tm, x)
    tm.gain = 0.25
    assert model.gain == 0.25 and "gain" not in vars(tm)
    _assert_trains_as_fresh(model, tm, x)


def test_a_swapped_layer_trains_and_is_a_parameter():
    model, x = Net(), _x()
    tm = rc.transform(model)
    _step(tm, x)
    old = model.fc2
    model.fc2 = nn.Linear(6, 3)
    assert tm.fc2 is model.fc2 and any(p is model.fc2.weight for p in tm.parameters())
    assert not any(p is old.weight for p in tm.parameters())
    _assert_trains_as_fresh(model, tm, x)
    assert old.weight.grad is not None and model.fc2.weight.grad is not None
    tm.fc1 = nn.Linear(4, 6)                          # and a layer swapped on the transformed module
    assert model.fc1 is tm.fc1
    _assert_trains_as_fresh(model, tm, x)


def test_load_state_dict_with_assign_trains_the_new_parameters():
    model, x = Net(), _x()
    tm = rc.transform(model)
    _step(tm, x)
    state = {k: v.clone() * 0.5 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    assert model.fc1.weight.grad is None               # new Parameter objects
    _assert_trains_as_fresh(model, tm, x)
    assert model.fc1.weight.grad is not None


def test_a_dtype_change_of_the_model_alone_recompiles():
    model, x = Net(), _x()
    tm = rc.transform(model)
    _step(tm, x)
    model.double()                                     # on the model, not through the transformed module
    assert "changed dtype" in tm.compiled.guards.check()
    assert _step(tm, x.double()).dtype == torch.float64


def test_guards_hold_between_ordinary_steps():
    model, x = Net(), _x()
    tm = rc.transform(model)
    opt = torch.optim.SGD(tm.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        _step(tm, x)
        opt.step()
        assert tm.compiled.guards.check() is None
    assert len(tm.programs) == 1


def test_guards_record_what_the_forward_read():
    model, x = Net(), _x()
    tm = rc.transform(model)
    _step(tm, x)
    guards: Guards = tm.compiled.guards
    read = {(guards.paths[m], name) for m, name, *_ in guards.attributes}
    assert ("<root>", "gain") in read and ("fc1", "in_features") not in read
    assert {(guards.paths[m], spec.dynamics.v_threshold) for m, _, spec in guards.neurons} == {("sn", 0.6)}


def test_the_program_cache_is_bounded_and_a_model_that_keeps_recompiling_warns_once():
    model = Net()
    tm = rc.transform(model, cache_size=2)
    with pytest.warns(rc.RecompileWarning, match="compiled 3 times") as record:
        for T in (2, 3, 4, 5):
            _step(tm, torch.rand(T, 3, 4))
    assert len(tm.programs) == 2 and len(record) == 1
    assert [p.source.meta["ratebp.T"] for p in tm.programs] == [4, 5]


def test_pickling_after_a_step_drops_the_programs():
    model, x = Net(), _x()
    tm = rc.transform(model)
    _step(tm, x)
    buffer = io.BytesIO()
    torch.save(tm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.programs == [] and loaded.fc1 is loaded.model.fc1
    _assert_trains_as_fresh(loaded.model, loaded, x)
    twin = copy.deepcopy(tm)
    assert twin.programs == [] and twin.fc1 is twin.model.fc1 and twin.fc1 is not model.fc1


def test_a_list_the_forward_reads_changed_in_place_recompiles():
    class Scaled(Net):
        def __init__(self):
            super().__init__()
            self.gains = [2.0, 1.0]

        def forward(self, x):
            return self.fc2(self.sn(self.fc1(x) * self.gains[0]) * self.gains[1])

    model, x = Scaled(), _x()
    tm = rc.transform(model)
    _step(tm, x)
    model.gains[0] = 0.5                                  # the same list, another value
    assert "'<root>.gains'" in tm.compiled.guards.check()
    _assert_trains_as_fresh(model, tm, x)

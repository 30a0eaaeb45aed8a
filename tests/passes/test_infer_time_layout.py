"""infer_time_layout: static / time at axis k / merged T·B, per node; T from neurons and inputs."""
import copy

import pytest
import torch
from torch import nn

import ratebp_compile as rc
from ratebp_compile.nn import LIF
from ratebp_compile.passes import infer_time_layout
from ratebp_compile.time_layout import TimeLayout
from tests.passes.util import Tiny, prepare, tiny_input

S, M = TimeLayout(0), TimeLayout(0, True)


def test_layouts_of_tiny_model_and_fired():
    model = Tiny().train()
    x = tiny_input(T=2)
    gm, _ = prepare(model, [x], "infer_time_layout", inclusive=False)
    code_before = gm.code
    result = infer_time_layout(gm)
    assert not result.modified and result.gm.code == code_before       # metadata only
    layouts = {n.name: n.meta["ratebp.time"] for n in result.gm.graph.nodes if n.op != "output"}
    assert layouts == {"x": S, "flatten": M, "conv": M, "bn": M, "unflatten": S, "lif": S, "mean": S, "fc": S}
    assert result.gm.meta["ratebp.T"] == 2
    torch.testing.assert_close(result.gm(x), model(x), rtol=0, atol=0)


class Static(nn.Module):
    """A static frame repeated over T inside the model; time reduced by sum at the end."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.sn = LIF()

    def forward(self, img):
        x = img.unsqueeze(0).expand(5, -1, -1)
        return self.sn(self.fc(x)).sum(0).transpose(0, 1)


def test_static_input_becomes_temporal_by_expand():
    gm, _ = prepare(Static(), [torch.randn(2, 4)], "infer_time_layout", input_layouts=["static"])
    layouts = {n.name: n.meta["ratebp.time"] for n in gm.graph.nodes if n.op != "output"}
    assert layouts == {"img": None, "unsqueeze": None, "expand": S, "fc": S, "lif": S, "sum_1": None,
                       "transpose": None}
    assert gm.meta["ratebp.T"] == 5


class Paper(nn.Module):
    """The paper's layout: [T·B, ...] everywhere, neurons told T."""

    def __init__(self, T):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.sn = LIF(time_steps=T)
        self.T = T

    def forward(self, x):
        return self.sn(self.fc(x)).view(self.T, -1, 6).permute(1, 2, 0)


def test_merged_input_and_permute():
    gm, _ = prepare(Paper(3), [torch.randn(3 * 2, 4)], "infer_time_layout", input_layouts=["T*B"])
    layouts = {n.name: n.meta["ratebp.time"] for n in gm.graph.nodes if n.op != "output"}
    assert layouts == {"x": M, "fc": M, "lif": M, "view": S, "permute": TimeLayout(2)}
    assert gm.meta["ratebp.T"] == 3


def test_neuron_given_a_static_tensor_is_an_error():
    with pytest.raises(rc.RateBPError, match=r"neuron .*'lif'.* expects \[T, B, ...\].*receives a static tensor"):
        prepare(nn.Sequential(nn.Linear(4, 4), LIF()), [torch.randn(3, 2, 4)], "infer_time_layout",
                input_layouts=["static"])


def test_inconsistent_T_is_an_error():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.sn = LIF(time_steps=4)

        def forward(self, x):
            return self.sn(x.flatten(0, 1))

    with pytest.raises(rc.RateBPError, match="inconsistent number of timesteps: T=3 .* T=4"):
        prepare(Two(), [torch.randn(3, 4, 2)], "infer_time_layout")


def test_model_without_neurons_is_an_error():
    with pytest.raises(rc.RateBPError, match="no spiking neurons"):
        prepare(nn.Linear(3, 3), [torch.randn(2, 2, 3)], "infer_time_layout")


class Merged(nn.Module):
    """A [T, B, ...] input flattened for a neuron told T: with B = 1, [T·1, ...] has the shape of [T, ...]."""

    def __init__(self, T):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.sn = LIF(time_steps=T)

    def forward(self, x):
        return self.sn(self.fc(x.flatten(0, 1)))


@pytest.mark.parametrize("B", [2, 1])
def test_one_sample_is_not_mistaken_for_time(B):
    gm, _ = prepare(Merged(3), [torch.rand(3, B, 4)], "infer_time_layout")
    assert gm.meta["ratebp.T"] == 3
    lif = next(n for n in gm.graph.nodes if isinstance(n.target, rc.nn.NeuronSpec))
    assert lif.meta["ratebp.time"] == (M if B > 1 else S)       # [T·1, ...] is [T, ...]: one layout
    rc.transform(Merged(3))(torch.rand(3, B, 4)).sum().backward()


class RepeatedStatic(nn.Module):
    def __init__(self, T):
        super().__init__()
        self.T = T
        self.fc = nn.Linear(4, 3)
        self.sn = LIF()

    def forward(self, img):
        return self.sn(self.fc(img).unsqueeze(0).repeat(self.T, 1, 1))


@pytest.mark.parametrize("T", [2, 1])
def test_a_static_input_repeated_over_one_step(T):
    model = RepeatedStatic(T)
    gm, _ = prepare(model, [torch.rand(2, 4)], "infer_time_layout", input_layouts=["static"])
    assert gm.meta["ratebp.T"] == T
    bptt = copy.deepcopy(model)
    img = torch.rand(2, 4) * 3
    rc.transform(model, input_layout="static")(img).sum().backward()
    bptt(img).sum().backward()
    if T == 1:                                     # one step: rate-based gradients are BPTT's
        for p, q in zip(model.parameters(), bptt.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


class JoinedWithItsInput(nn.Module):
    """A static input repeated to [T·B, F] and added to the spikes computed from it: with B = 1, [T·1, F] has
    the shape of [T, F], and both must get the same layout."""

    def __init__(self, T):
        super().__init__()
        self.T = T
        self.fc = nn.Linear(3, 3)
        self.sn1, self.sn2 = LIF(time_steps=T), LIF(time_steps=T)

    def forward(self, img):
        x = img.repeat(self.T, 1)
        return self.sn2(self.sn1(self.fc(x)) + x)


@pytest.mark.parametrize("B", [2, 1])
def test_a_merged_dimension_of_one_sample_is_the_time_dimension(B):
    gm, _ = prepare(JoinedWithItsInput(3), [torch.rand(B, 3)], "infer_time_layout", input_layouts=["static"])
    add = next(n for n in gm.graph.nodes if n.name == "add")
    assert add.meta["ratebp.time"] == (S if B == 1 else M)
    rc.transform(JoinedWithItsInput(3), input_layout="static")(torch.rand(B, 3)).sum().backward()


def test_one_step_joins_a_static_tensor_with_spikes():
    """T = 1: a static input (repeated over the one step) concatenated with spikes computed from it."""
    class Joined(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.sn = LIF()

        def forward(self, img):
            x = img.unsqueeze(0).repeat(1, 1, 1)
            return torch.cat([self.sn(self.fc(x)), x], 2)

    gm, _ = prepare(Joined(), [torch.rand(2, 3)], "infer_time_layout", input_layouts=["static"])
    cat = next(n for n in gm.graph.nodes if n.name == "cat")
    assert cat.meta["ratebp.time"] == S

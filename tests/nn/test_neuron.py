"""Neuron modules: arguments, layouts, single-step cells, specs."""
import pytest
import torch

from ratebp_compile.nn import (IF, LIF, ATan, IFCell, LIFCell, Neuron, NeuronSpec, ParametricLIF, ParametricLIFCell,
                               Sigmoid, neuron_spec, register_neuron)
from ratebp_compile.families import LIFDynamics, ModuleDynamics
from tests.conftest import assert_close


def test_tau_and_decay():
    assert LIF(tau=2.0).decay == 0.5
    assert LIF(decay=0.2).decay == 0.2
    assert LIF().decay == 0.5
    with pytest.raises(ValueError, match="either tau or decay"):
        LIF(tau=2.0, decay=0.5)
    with pytest.raises(ValueError, match="tau must be"):
        LIF(tau=0.5)
    with pytest.raises(ValueError, match="decay must lie"):
        LIF(decay=1.5)
    with pytest.raises(TypeError, match="Surrogate"):
        LIF(surrogate="sigmoid")


def test_lif_forward_matches_functional_and_merged_layout():
    x = torch.randn(4, 3, 5, 6) + 0.5
    n = LIF(decay=0.25, v_reset=0.0, surrogate=ATan(2.0))
    ref = LIFDynamics(decay=0.25, decay_input=False, v_threshold=1.0, v_reset=0.0, detach_reset=True,
                      surrogate=ATan(2.0)).multistep(x, ())
    assert torch.equal(n(x), ref)
    merged = LIF(decay=0.25, v_reset=0.0, surrogate=ATan(2.0), time_steps=4)
    assert torch.equal(merged(x.flatten(0, 1)), ref.flatten(0, 1))
    with pytest.raises(ValueError, match="not a multiple of T"):
        merged(torch.zeros(6, 2))
    with pytest.raises(ValueError, match=r"expects \[T, B, ...\]"):
        n(torch.zeros(3))


def test_if_is_lif_without_leak():
    x = torch.randn(5, 7) + 0.3
    assert torch.equal(IF(v_threshold=0.8)(x), LIF(decay=1.0, v_threshold=0.8)(x))


@pytest.mark.parametrize("make_cell,make_multi", [
    (lambda: LIFCell(decay=0.3, v_reset=0.0), lambda: LIF(decay=0.3, v_reset=0.0)),
    (lambda: IFCell(v_threshold=0.5), lambda: IF(v_threshold=0.5)),
    (lambda: ParametricLIFCell(init_tau=3.0), lambda: ParametricLIF(init_tau=3.0)),
])
def test_cells_equal_multistep_and_reset(make_cell, make_multi):
    x = torch.randn(6, 2, 9) + 0.5
    cell, multi = make_cell(), make_multi()
    outs = [cell(x[t]) for t in range(6)]
    assert torch.equal(torch.stack(outs), multi(x))
    assert cell.v is not None
    cell.reset()
    assert cell.v is None
    assert torch.equal(cell(x[0]), multi(x[:1])[0])


def test_plif_decay_is_learnable_and_gets_bptt_grad():
    n = ParametricLIF(init_tau=2.0)
    assert torch.isclose(torch.sigmoid(n.w), torch.tensor(0.5))
    x = torch.randn(4, 3, 8) + 1.0
    n(x).sum().backward()
    assert n.w.grad is not None and n.w.grad.abs() > 0


def test_specs():
    spec = LIF(decay=0.2, v_threshold=1.5, v_reset=0.0, detach_reset=False, surrogate=ATan(3.0)).spec()
    assert spec == NeuronSpec(LIFDynamics(decay=0.2, v_threshold=1.5, v_reset=0.0, detach_reset=False,
                                          surrogate=ATan(3.0)))
    assert spec.__name__ == "lif" and spec.with_mode("spike").__name__ == "lif_spike_pass"
    assert "hard reset to 0" in spec.describe()
    assert IF().spec().__name__ == "if" and IF().spec().dynamics.decay == 1.0
    plif = ParametricLIF()
    assert plif.spec().__name__ == "plif" and plif.spec().param_names == ("w",)
    with pytest.raises(TypeError, match="single-step"):
        LIFCell().spec()


def test_spec_call_and_spike_pass_shapes():
    n = LIF(decay=0.4)
    spec = n.spec()
    x = torch.randn(3, 2, 5)
    assert torch.equal(spec(x), n(x))
    spikes, r, e = spec.spike_pass(x)
    assert spikes.shape == x.shape and r.shape == e.shape == (1, 2, 5)
    merged = LIF(decay=0.4, time_steps=3).spec()
    spikes, r, e = merged.spike_pass(x.flatten(0, 1))
    assert r.shape == (2, 5)
    assert_close(r, spec.spike_pass(x)[1].squeeze(0))


class _Adaptive(Neuron):
    """An adaptive-threshold neuron defined by its step."""

    def __init__(self):
        super().__init__()
        self.beta = torch.nn.Parameter(torch.tensor(0.2))

    def init_state(self, x0):
        return torch.zeros_like(x0), torch.zeros_like(x0)

    def step(self, x, state):
        from ratebp_compile.nn import spike
        v, a = state
        h = 0.5 * v + x
        s = spike(h - 1.0 - self.beta * a, Sigmoid(4.0))
        return s, (h - s.detach() * (1.0 + self.beta * a), 0.8 * a + s)


def test_custom_neuron_eligibilities_equal_autograd():
    n = _Adaptive().double()
    c = (torch.randn(64, dtype=torch.float64) + 0.9).requires_grad_()
    spikes = n(c.expand(5, 64))
    (e_ref,) = torch.autograd.grad(spikes.mean(0).sum(), c)
    # d r_i / d beta per element: beta is shared, so one batched gradient per element
    eye = torch.eye(64, dtype=torch.float64)
    (e_beta_ref,) = torch.autograd.grad(n(c.detach().expand(5, 64)).mean(0), n.beta, eye, is_grads_batched=True)
    spec = n.spec()
    assert isinstance(spec.dynamics, ModuleDynamics) and spec.param_names == ("beta",)
    _, r, e, e_beta = spec.spike_pass(c.detach().expand(5, 64), n.beta)
    assert_close(e.squeeze(0), e_ref)
    assert_close(e_beta.squeeze(0), e_beta_ref)


def test_register_neuron():
    class Foreign(torch.nn.Module):
        def forward(self, x):
            return LIF(decay=0.5)(x)

    register_neuron(Foreign, lambda m: NeuronSpec(LIFDynamics(decay=0.5, surrogate=Sigmoid(4.0))))
    assert neuron_spec(Foreign()).__name__ == "lif"
    assert neuron_spec(torch.nn.ReLU()) is None
    with pytest.raises(TypeError):
        register_neuron(object, lambda m: None)

"""``dynamo_neurons``: another library's neuron is one module call in the graph Dynamo builds for the
ratebp backend, and only there; what Dynamo does not guard (the neuron's settings, a state left by an
eager call) the backend does."""
import warnings

import pytest
import torch

import ratebp_compile as rc
from ratebp_compile import backend as B
from tests.conftest import inputs_unchanged

snn = pytest.importorskip("snntorch")


def _net_and_input(seed=0):
    """snnTorch's tutorial shape (explicit membranes through the loop inside ``forward``), its second layer
    resetting to zero."""
    from tests.interop.snntorch_harness import N_IN, LeakyMLP

    torch.manual_seed(seed)
    return LeakyMLP(beta=0.9, lif2={"beta": 0.8, "reset_mechanism": "zero"}), torch.rand(5, 4, N_IN) * 1.5


def _graphs(monkeypatch):
    """The graphs the ratebp backend receives from Dynamo (recorded, then compiled as usual)."""
    seen = []
    complete = B._complete_outputs

    def record(gm):
        seen.append(gm)
        return complete(gm)
    monkeypatch.setattr(B, "_complete_outputs", record)
    return seen


def _neuron_calls(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def _step(model, x, fn):
    model.zero_grad(set_to_none=True)
    with inputs_unchanged(x), warnings.catch_warnings():
        warnings.simplefilter("error", rc.ApproximationWarning)
        out = fn(x)
        out.sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def _assert_same_step(a, b):
    assert torch.equal(a[0], b[0])
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-7)


def test_neurons_are_module_calls_for_ratebp_only(monkeypatch):
    net, x = _net_and_input()
    seen = _graphs(monkeypatch)
    torch._dynamo.reset()
    ours = _step(net, x, torch.compile(net, backend="ratebp", options={"compiler": "eager"}))
    assert [_neuron_calls(gm) for gm in seen] == [["lif1", "lif2"] * 5]
    _assert_same_step(ours, _step(net, x, rc.transform(net)))

    other = []

    def spy(gm, example_inputs):
        other.append(gm)
        return gm.forward
    torch._dynamo.reset()
    theirs = _step(net, x, torch.compile(net, backend=spy))
    assert other and not any(_neuron_calls(gm) for gm in other)           # inlined, as always
    assert torch.equal(theirs[0], ours[0])


def test_evaluation_traces_the_library_and_training_again_compiles(monkeypatch):
    """Out of a training step the neuron is traced as Dynamo always does (its Python forward); the training
    flag is guarded, so switching back to train() compiles the rate-based step again."""
    net, x = _net_and_input(1)
    seen = _graphs(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="ratebp", options={"compiler": "eager"})
    net.eval()
    with torch.no_grad():
        assert torch.equal(compiled(x), net(x))
    assert not any(_neuron_calls(gm) for gm in seen)     # a plain graph: the backend compiles it as it is
    seen.clear()
    net.train()
    _assert_same_step(_step(net, x, compiled), _step(net, x, rc.transform(net)))
    assert [_neuron_calls(gm) for gm in seen] == [["lif1", "lif2"] * 5]


def test_a_changed_neuron_setting_builds_the_step_again():
    """Dynamo does not see a neuron's settings; the backend's guards do: after the change the step equals
    ``transform``'s of the changed model (without them the gradients would be the old model's)."""
    net, x = _net_and_input(2)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="ratebp", options={"compiler": "eager"})
    _assert_same_step(_step(net, x, compiled), _step(net, x, rc.transform(net)))
    for change in (lambda: net.lif1.beta.fill_(0.5), lambda: setattr(net.lif2, "threshold", torch.tensor(0.6))):
        change()
        _assert_same_step(_step(net, x, compiled), _step(net, x, rc.transform(net)))


@pytest.mark.parametrize("entry", ["transform", "backend"])
def test_a_state_left_off_rest_is_refused(entry):
    """``init_hidden`` neurons start from the state they hold: after an eager call (which replaces it) or a
    change in place it is not at rest, and the compiled step (which starts from rest) refuses instead of
    training another model."""

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.lif = torch.nn.Linear(6, 4), snn.Leaky(beta=0.9, init_hidden=True)

        def forward(self, x):
            return torch.stack([self.lif(self.fc(x_t)) for x_t in x])

    torch.manual_seed(3)
    net, x = Hidden(), torch.rand(5, 2, 6) * 2
    torch._dynamo.reset()
    compiled = rc.transform(net) if entry == "transform" else \
        torch.compile(net, backend="ratebp", options={"compiler": "eager"})
    _assert_same_step(_step(net, x, compiled), _step(net, x, rc.transform(net)))
    net.lif.reset_mem()
    with torch.no_grad():
        net(x)                                               # leaves lif.mem at its last value
    with pytest.raises(rc.RateBPError, match=r"'lif' \(Leaky\).*not at rest"):
        compiled(x)
    net.lif.mem = torch.zeros(2, 4)
    _step(net, x, compiled)                                  # at rest again: trains
    net.lif.mem.fill_(0.5)                                   # the same tensor, changed in place
    with pytest.raises(rc.RateBPError, match=r"'lif' \(Leaky\).*not at rest"):
        compiled(x)


def test_a_neuron_with_a_hook_is_refused_naming_it():
    """Its hooks must run, so the call cannot be one node: refused (``transform`` runs hooks as nodes)."""
    net, x = _net_and_input(4)
    net.lif1.register_forward_hook(lambda m, i, o: None)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="ratebp", options={"compiler": "eager"})
    with pytest.raises(Exception, match=r"module 'lif1' \(snntorch.*Leaky\) at .*snntorch_harness.py:\d+ cannot "
                                        r"be traced as one neuron: it has hooks"):
        compiled(x)

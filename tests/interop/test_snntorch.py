"""snnTorch models, unmodified, through ``rc.transform`` and ``torch.compile(backend="ratebp")``: outputs
equal snnTorch's own forward, ``method="bptt"`` gradients equal its own BPTT, rate-based gradients equal
an independent eager rate-based computation built on snnTorch's own autograd (``snntorch_harness``)."""
import copy

import pytest
import torch

import ratebp_compile as rc
from tests.interop.common import assert_grads_close, assert_outputs_close, compiled_step, train_step

pytest.importorskip("snntorch")

from tests.interop import snntorch_harness as H  # noqa: E402

MODELS = {m.name: m for m in H.models()}
# tutorial 5 returns the output membrane too and trains on it: BPTT differentiates through it; the rate-based
# step computes its value and refuses a loss that depends on it (test_a_loss_on_the_membrane_is_refused)
MEMBRANE_LOSS = {"leaky_mlp_t5"}
REFERENCES = {"bptt": H.peer_bptt_grads, "ratebp": H.peer_rate_grads}
CASES = [(n, "bptt") for n in MODELS] + [(n, "ratebp") for n in MODELS if n not in MEMBRANE_LOSS]


# both entry points: rc.transform, and torch.compile(backend="ratebp") where Dynamo records each neuron call as
# a module call (dynamo_neurons)
ENTRY_POINTS = pytest.mark.parametrize("step", [train_step, compiled_step], ids=["transform", "backend"])


@ENTRY_POINTS
@pytest.mark.parametrize("name,method", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_step_equals_the_reference(name, method, step):
    """BPTT equals snnTorch's own; rate-based equals an independent eager rate-based computation."""
    spec = MODELS[name]
    model, x, loss = spec.build(), spec.make_input(), spec.make_loss()
    theirs, peer_out = REFERENCES[method](copy.deepcopy(model), x, loss)
    out, ours = step(model, x, loss, method)
    assert_outputs_close(out, peer_out)
    assert_grads_close(ours, theirs, name)


@pytest.mark.parametrize("name", sorted(MEMBRANE_LOSS))
def test_a_loss_on_the_membrane_is_refused_by_the_rate_based_step(name):
    spec = MODELS[name]
    model, x, loss = spec.build(), spec.make_input(), spec.make_loss()
    _, peer_out = H.peer_bptt_grads(copy.deepcopy(model), x, loss)
    out = rc.transform(model)(x)
    assert_outputs_close(out, peer_out)                 # spikes and membranes: snnTorch's values
    with pytest.raises(rc.RateBPError, match=r"the loss depends on the state of module 'lif2' \(Leaky\)"):
        loss(out).backward()


def test_the_tutorials_per_step_loop_is_refused_and_multistep_trains_it():
    """Tutorial 7 drives a per-step net (its last Leaky has ``output=True``: spikes and membrane) from the
    training loop; transformed as it is it would read the batch as time. ``rc.nn.MultiStep(net)`` makes it a
    sequence model: both outputs are snnTorch's, the gradients of a loss on the spikes too."""
    spec = next(m for m in H.per_step_models() if m.name == "per_step_conv")
    net, x = spec.build(), spec.make_input()
    with pytest.raises(rc.RateBPError, match=r"single-step neuron called once per forward.*MultiStep"):
        rc.transform(net)(x[0])
    loss = lambda out: out[0].sum()                         # noqa: E731
    for method in ("bptt", "ratebp"):
        reference = H.peer_bptt_grads if method == "bptt" else H.peer_rate_grads
        theirs, peer_out = reference(copy.deepcopy(net), x, loss, per_step=True)
        out, ours = train_step(rc.nn.MultiStep(net), x, loss, method)
        assert_outputs_close(out, peer_out)
        assert out[0].sum() > 0
        assert_grads_close({k.removeprefix("module."): v for k, v in ours.items()}, theirs, method)


def test_recurrent_neurons_are_refused_naming_module_and_line():
    import snntorch as snn

    class Recurrent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.rlif = torch.nn.Linear(4, 6), snn.RLeaky(beta=0.9, linear_features=6)

        def forward(self, x):
            spk, mem = self.rlif.init_rleaky()
            out = []
            for x_t in x:
                spk, mem = self.rlif(self.fc(x_t), spk, mem)
                out.append(spk)
            return torch.stack(out)

    with pytest.raises(rc.RateBPError, match=r"module 'rlif' .*recurrent.*test_snntorch\.py:\d+.*porting\.md"):
        rc.transform(Recurrent())(torch.rand(3, 2, 4))

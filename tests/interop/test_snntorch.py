"""snnTorch models, unmodified, through ``rc.transform``: outputs equal snnTorch's own forward,
``method="bptt"`` gradients equal its own BPTT, rate-based gradients equal an independent eager
rate-based computation built on snnTorch's own autograd (``snntorch_harness``)."""
import copy

import pytest
import torch

import ratebp_compile as rc
from tests.conftest import inputs_unchanged
from tests.interop.common import ATOL, RTOL, assert_grads_close, train_step

pytest.importorskip("snntorch")

from tests.interop import snntorch_harness as H  # noqa: E402

MODELS = {m.name: m for m in H.models()}
# the output membrane is read (tutorial 5 records it): refused, see test_membrane_outputs_are_refused
MEMBRANE = {"leaky_mlp_t5", "leaky_mlp_t5_spike_loss"}
RUNNABLE = [n for n in MODELS if n not in MEMBRANE]


@pytest.mark.parametrize("name", RUNNABLE)
def test_bptt_equals_snntorchs_own_bptt(name):
    spec = MODELS[name]
    model, x, loss = spec.build(), spec.make_input(), spec.make_loss()
    theirs, peer_out = H.peer_bptt_grads(copy.deepcopy(model), x, loss)
    out, ours = train_step(model, x, loss, "bptt")
    torch.testing.assert_close(out, peer_out.to(out.dtype), rtol=RTOL, atol=ATOL)
    assert_grads_close(ours, theirs, name)


@pytest.mark.parametrize("name", RUNNABLE)
def test_rate_based_equals_an_independent_eager_rate_computation(name):
    spec = MODELS[name]
    model, x, loss = spec.build(), spec.make_input(), spec.make_loss()
    theirs, peer_out = H.peer_rate_grads(copy.deepcopy(model), x, loss)
    out, ours = train_step(model, x, loss, "ratebp")
    torch.testing.assert_close(out, peer_out.to(out.dtype), rtol=RTOL, atol=ATOL)
    assert_grads_close(ours, theirs, name)


@pytest.mark.parametrize("name", sorted(MEMBRANE))
def test_membrane_outputs_are_refused(name):
    spec = MODELS[name]
    model, x = spec.build(), spec.make_input()
    state = copy.deepcopy(model.state_dict())
    with inputs_unchanged(x), pytest.raises(rc.RateBPError, match=r"the state of module 'lif2' \(Leaky\).*is read by "
                                                                   r".*spikes only.*porting\.md"):
        rc.transform(model)(x)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_tutorials_per_step_loop_is_refused_and_multistep_trains_it():
    """Tutorial 7 drives a per-step net from the training loop; transformed as it is it would read the batch
    as time. ``rc.nn.MultiStep(net)`` makes it a sequence model."""
    spec = next(m for m in H.per_step_models() if m.name == "per_step_conv")
    net, x = spec.build(), spec.make_input()
    with pytest.raises(rc.RateBPError, match=r"single-step neuron called once per forward.*MultiStep"):
        rc.transform(net)(x[0])
    theirs, (peer_spikes, _) = H.peer_bptt_grads(copy.deepcopy(net), x, lambda out: out[0].sum(), per_step=True)
    out, ours = train_step(rc.nn.MultiStep(_SpikesOf(net)), x, lambda out: out.sum(), "bptt")
    torch.testing.assert_close(out, peer_spikes, rtol=RTOL, atol=ATOL)
    assert out.sum() > 0
    assert_grads_close({k.removeprefix("module.net."): v for k, v in ours.items()}, theirs, "per_step_conv")


class _SpikesOf(torch.nn.Module):
    """The per-step net's spikes (its last Leaky has output=True: it also returns its membrane)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x_t):
        return self.net(x_t)[0]


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

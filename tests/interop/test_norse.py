"""Norse models, unmodified, through ``rc.transform`` and ``torch.compile(backend="ratebp")``: outputs
equal Norse's own forward, ``method="bptt"`` gradients equal its own BPTT, rate-based gradients equal an
independent eager rate-based computation built on Norse's own autograd (``norse_harness``); what cannot
be compiled is refused naming module and line."""
import copy

import pytest
import torch

import ratebp_compile as rc
from tests.interop.common import ATOL, RTOL, assert_grads_close, compiled_step, train_step

pytest.importorskip("norse")

from tests.interop import norse_harness as H  # noqa: E402

MODELS = H.models()
REFUSED = {
    "seqstate_bare": r"module '1' \(LIF\).*is used other than for its spikes \(by output",
    "li_readout": r"module 'out' .*LICell\) cannot be compiled: .*non-spiking leaky integrator.*Called at .*norse_harness",
    "seqstate_li": r"module 'net.3' .*LI\) cannot be compiled: .*non-spiking leaky integrator",
    "tutorial_convnet": r"module 'out' .*LILinearCell\) cannot be compiled",
    "shared_cell": r"called different numbers of times",
    "explicit_state": r"module 'lif1' \(LIFCell\).*starts from a state that is not at rest",
}
RUNNABLE = [n for n in MODELS if n not in REFUSED]
# through the backend the same refusals read the Dynamo graph: a neuron's line in place of the call's, the
# state list the model returns taken apart
BACKEND_REFUSED = dict(REFUSED, li_readout=r"module 'out' \(LICell\) at .*norse_harness.* cannot be compiled: "
                                            r".*non-spiking leaky integrator",
                       seqstate_bare=r"module '1' \(LIF\).*is used other than for its spikes")


@pytest.mark.parametrize("step", [train_step, compiled_step], ids=["transform", "backend"])
@pytest.mark.parametrize("name", RUNNABLE)
@pytest.mark.parametrize("method", ["bptt", "ratebp"])
def test_step_equals_norses_own(name, method, step):
    """Through ``rc.transform`` and ``torch.compile(backend="ratebp")`` (each neuron call a module call)."""
    e = MODELS[name]
    model, x = e.build(0), e.make_input(e.T, 0)
    reference = H.peer_bptt_grads if method == "bptt" else H.peer_rate_grads
    theirs, peer_out = reference(copy.deepcopy(model), x, e.loss)
    out, ours = step(model, x, e.loss, method)
    torch.testing.assert_close(out, H.primary_output(peer_out), rtol=RTOL, atol=ATOL)
    assert out.sum() > 0
    assert_grads_close(ours, theirs, name)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_cannot_be_compiled_is_refused(name):
    e = MODELS[name]
    model, x = e.build(0), e.make_input(e.T, 0)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(rc.RateBPError, match=REFUSED[name]):
        rc.transform(model)(x)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_cannot_be_compiled_is_refused_by_the_backend(name):
    """The same refusals through ``torch.compile(model, backend="ratebp")`` (Dynamo wraps them)."""
    e = MODELS[name]
    model, x = e.build(0), e.make_input(e.T, 0)
    state = copy.deepcopy(model.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="ratebp", options={"compiler": "eager"})
    with pytest.raises(Exception, match=BACKEND_REFUSED[name]) as caught:
        compiled(x)
    assert isinstance(caught.value, rc.RateBPError) or isinstance(caught.value.__cause__, rc.RateBPError) or \
        "RateBPError" in str(caught.value)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

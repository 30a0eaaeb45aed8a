"""SpikingJelly 2.x models, unmodified, through ``rc.transform``: outputs equal SpikingJelly's own
forward, ``method="bptt"`` gradients equal its own BPTT, rate-based gradients equal an independent
eager rate-based computation built on SpikingJelly's own autograd (``spikingjelly_harness``)."""
import copy
import warnings

import pytest
import torch

import ratebp_compile as rc
from ratebp_compile.dynamo_neurons import records_as_call
from tests.conftest import inputs_unchanged
from tests.interop.common import ATOL, RTOL, assert_grads_close, compiled_step, train_step
from tests.interop.conftest import require_spikingjelly

require_spikingjelly()

from spikingjelly.activation_based import functional, layer, neuron, surrogate  # noqa: E402

from tests.interop import spikingjelly_harness as H  # noqa: E402

MODELS = {m.name: m for m in H.models()}
#: SpikingJelly's own BPTT for every model; the independent rate-based reference where it applies (no BatchNorm)
REFERENCES = {"bptt": H.peer_bptt_grads, "ratebp": H.peer_rate_grads}
CASES = [(n, "bptt") for n in MODELS] + [(n, "ratebp") for n, m in MODELS.items() if m.rate_reference]


def _step(model, x, loss_fn, method, time_major=True, seed=0):
    """One training step from reset neurons (SpikingJelly requires reset_net before each batch), drawing
    layer.Dropout's mask from the random numbers the harness gives SpikingJelly (``seed``)."""
    functional.reset_net(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return train_step(model, x, loss_fn, method, input_layout="TB" if time_major else "static")


@pytest.mark.parametrize("name,method", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_step_equals_the_reference(name, method):
    """BPTT equals SpikingJelly's own; rate-based equals an independent eager rate-based computation."""
    spec = MODELS[name]
    model = spec.build(0)
    peer = copy.deepcopy(model)
    x = spec.make_input(spec.T, H.B_DEFAULT, 0)
    theirs, peer_out = REFERENCES[method](peer, x, spec.loss)
    out, ours = _step(model, x, spec.loss, method, spec.time_major)
    torch.testing.assert_close(out, peer_out, rtol=RTOL, atol=ATOL)
    assert_grads_close(ours, theirs, name)


@pytest.mark.parametrize("name", [n for n, m in MODELS.items() if not m.rate_reference])
def test_rate_based_step_trains_models_with_batchnorm(name):
    """Models with BatchNorm (the zoo): the rate-based step runs, its output is SpikingJelly's."""
    spec = MODELS[name]
    model = spec.build(0)
    x = spec.make_input(spec.T, H.B_DEFAULT, 0)
    peer_out = H.peer_forward(copy.deepcopy(model), x)
    out, grads = _step(model, x, spec.loss, "ratebp", spec.time_major)
    torch.testing.assert_close(out, peer_out, rtol=RTOL, atol=ATOL)
    assert all(torch.isfinite(g).all() for g in grads.values())


def _mlp(node):
    return torch.nn.Sequential(layer.Linear(4, 6), node)


@pytest.mark.parametrize("node,pattern", [
    (lambda: neuron.LIFNode(step_mode="m", store_v_seq=True), r"store_v_seq=True"),
    (lambda: neuron.LIFNode(step_mode="m", surrogate_function=surrogate.S2NN()), r"S2NN has no equivalent"),
    (lambda: neuron.LIFNode(step_mode="m", surrogate_function=surrogate.Sigmoid(spiking=False)), r"spiking=False"),
    (lambda: type("MyLIF", (neuron.LIFNode,), {})(step_mode="m"), r"subclass of SpikingJelly's LIFNode"),
], ids=["store_v_seq", "s2nn", "not-spiking", "subclass"])
def test_settings_without_an_equivalent_are_refused_naming_module_and_line(node, pattern):
    model = _mlp(node())
    state = copy.deepcopy(model.state_dict())
    x = torch.rand(3, 2, 4)
    with inputs_unchanged(x), pytest.raises(rc.RateBPError, match=rf"module '1' .*{pattern}.*porting\.md"):
        rc.transform(model)(x)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_neuron_holding_state_from_an_earlier_call_is_refused():
    """SpikingJelly keeps the membrane until reset_net: a compiled step starting from rest would differ."""
    model = _mlp(neuron.LIFNode(step_mode="m"))
    x = torch.rand(3, 2, 4) * 3
    model(x)                                       # eager call, no reset_net afterwards
    with pytest.raises(rc.RateBPError, match=r"membrane potential from an earlier call.*reset_net"):
        rc.transform(model)(x)
    functional.reset_net(model)
    rc.transform(model)(x)


def test_dropout_shares_one_mask_over_time_in_both_passes():
    """layer.Dropout draws one mask per sequence: the spike pass draws it (as SpikingJelly would, from the
    same random numbers), the rate pass reuses it; a single-step Dropout, or one holding an earlier mask,
    is refused."""
    model = torch.nn.Sequential(layer.Linear(4, 6), neuron.LIFNode(step_mode="m"), layer.Dropout(0.5, step_mode="m"))
    gm = rc.transform(model)
    x = torch.rand(3, 2, 4)
    gm(x)
    program = gm.programs[0]
    assert [s.role for s in program.statistics].count("mask") == 1
    single = torch.nn.Sequential(layer.Linear(4, 6), layer.Dropout(0.5))          # step_mode 's'
    with pytest.raises(rc.RateBPError, match=r"module '1' .*Dropout\) cannot be compiled: a single-step Dropout"):
        rc.transform(single)(x[0])
    held = torch.nn.Sequential(layer.Linear(4, 6), neuron.LIFNode(step_mode="m"), layer.Dropout(0.5, step_mode="m"))
    compiled = rc.transform(held)
    compiled(x)
    held(x)                                        # eager, no reset_net: the mask stays
    held[1].reset()
    with pytest.raises(rc.RateBPError, match=r"holds the dropout mask of an earlier call"):
        compiled(x)                                # the guard sees it: recompiles, and refuses


# -- torch.compile(model, backend="ratebp"): Dynamo records SpikingJelly's neurons as its own custom ops ----
# (those it runs as its PyTorch reference — a surrogate outside its built-in list —, single-step neurons the cell
# step does not cover and layer.Dropout are module calls in Dynamo's graph, compiled as transform compiles them)
@pytest.mark.parametrize("method", ["ratebp", "bptt"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_backend_equals_the_references_and_hands_back_the_membrane(name, method):
    """Every model through the backend: outputs and gradients as the references; each neuron SpikingJelly's
    op describes holds the exact last membrane afterwards (Dynamo writes it back), one that is a module call
    the state it started from (as after ``transform``)."""
    spec = MODELS[name]
    model = spec.build(0)
    peer = copy.deepcopy(model)
    x = spec.make_input(spec.T, H.B_DEFAULT, 0)
    if method == "ratebp" and not spec.rate_reference:     # BatchNorm: the same step through transform
        peer_out, theirs = _step(copy.deepcopy(model), x, spec.loss, "ratebp", spec.time_major)
    else:
        reference = H.peer_rate_grads if method == "ratebp" else H.peer_bptt_grads
        theirs, peer_out = reference(copy.deepcopy(model), x, spec.loss)
    functional.reset_net(peer)
    with torch.no_grad():
        peer(x)                                      # SpikingJelly's own forward leaves each neuron's last v
    torch._dynamo.reset()
    functional.reset_net(model)
    module_calls = {path for path, m in H.neuron_modules(model) if records_as_call(m)}
    compiled = torch.compile(model, backend="ratebp", options={
        "compiler": "eager", "method": method, "input_layout": "TB" if spec.time_major else "static"})
    with inputs_unchanged(x), warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", rc.ApproximationWarning)
        torch.manual_seed(0)                         # Dropout masks: the random numbers the references drew
        out = compiled(x)
        spec.loss(out).backward()
    torch.testing.assert_close(out, peer_out, rtol=RTOL, atol=ATOL)
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, theirs, name)
    for (path, ours), theirs_v in zip(H.neuron_modules(model), [m.v for _, m in H.neuron_modules(peer)]):
        if path in module_calls:
            assert ours.v == (ours.v_reset or 0.0), path
        else:
            torch.testing.assert_close(ours.v, theirs_v, rtol=RTOL, atol=ATOL, msg=path)   # Dynamo wrote it back


def test_backend_dropout_follows_its_settings_and_refuses_a_held_mask():
    """Under torch.compile too: a changed ``p`` builds the step again (Dynamo does not see it; the backend's
    guards do), and a mask left by an eager call is refused, not silently replaced."""
    model = torch.nn.Sequential(layer.Linear(4, 6), neuron.LIFNode(step_mode="m"), layer.Dropout(0.5, step_mode="m"))
    x = torch.rand(3, 2, 4) * 2

    def seeded(fn):
        functional.reset_net(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return fn(x).detach()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="ratebp", options={"compiler": "eager"})
    assert torch.equal(seeded(compiled), seeded(rc.transform(model)))
    model[2].p = 0.2
    assert torch.equal(seeded(compiled), seeded(rc.transform(model)))
    functional.reset_net(model)
    model(x)                                       # eager: the Dropout keeps its mask
    model[1].reset()
    with pytest.raises(rc.RateBPError, match=r"holds the dropout mask of an earlier call"):
        compiled(x)


def test_backend_refuses_a_step_that_does_not_start_from_rest():
    spec = MODELS["mlp_lif"]
    model = spec.build(0)
    x = spec.make_input(spec.T, H.B_DEFAULT, 0)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="ratebp", options={"compiler": "eager"})
    spec.loss(compiled(x)).backward()
    with pytest.raises(Exception, match=r"not at rest.*reset the network before each batch"):
        compiled(x)                                  # no functional.reset_net(model) in between
    functional.reset_net(model)
    spec.loss(compiled(x)).backward()


def test_a_monitor_hook_on_a_spikingjelly_neuron_sees_its_spikes():
    """SpikingJelly's monitors (``monitor.OutputMonitor``) are forward hooks on its neurons: they run once
    per step on the spike pass's spikes, as in SpikingJelly's own forward."""
    spec = MODELS["mlp_lif"]
    model, peer = spec.build(0), spec.build(0)
    x = spec.make_input(spec.T, H.B_DEFAULT, 0)
    records = {"ours": [], "theirs": []}
    for net, key in ((model, "ours"), (peer, "theirs")):
        for _, m in H.neuron_modules(net):
            m.register_forward_hook(lambda mod, inp, out, key=key: records[key].append(out.detach().clone()))
    functional.reset_net(peer)
    peer(x)
    _step(model, x, spec.loss, "ratebp")
    assert len(records["ours"]) == len(records["theirs"]) == len(H.neuron_modules(model))
    for ours, theirs in zip(records["ours"], records["theirs"]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_dropout_mask_is_drawn_once_when_the_spike_pass_is_streamed():
    torch.manual_seed(0)
    net = torch.nn.Sequential(layer.Linear(4, 16), neuron.LIFNode(step_mode="m"), layer.Dropout(0.5, step_mode="m"),
                              layer.Linear(16, 3), neuron.IFNode(step_mode="m"))
    x = torch.rand(6, 5, 4) * 4
    results = []
    for chunk in (None, 2):
        model = copy.deepcopy(net)
        out, grads = _step(model, x, lambda out: out.sum(), "ratebp", seed=3) if chunk is None else \
            _step_streamed(model, x, chunk)
        results.append((out, grads))
    assert torch.equal(results[0][0], results[1][0])
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=0, atol=1e-6, msg=name)


def _step_streamed(model, x, chunk):
    functional.reset_net(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        tm = rc.transform(model, time_chunk=chunk)
        out = tm(x)
        out.sum().backward()
    assert tm.programs[0].step.meta["ratebp.streamed"].startswith("in chunks of at most 2")
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_backend_compiles_a_single_step_neuron_without_a_cell_step_as_transform_does():
    """Under torch.compile a single-step neuron the cell step does not cover (here: resting at -0.1) is a
    module call, compiled as ``transform`` compiles it; it keeps the state it started from."""
    class Loop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.sn = torch.nn.Linear(4, 6), neuron.LIFNode(v_reset=-0.1)

        def forward(self, x):
            return torch.stack([self.sn(self.fc(x_t)) for x_t in x])

    torch.manual_seed(0)
    model, x = Loop(), torch.rand(3, 2, 4) * 3
    loss = lambda out: out.sum()                    # noqa: E731
    ours = compiled_step(model, x, loss, "ratebp")
    assert model.sn.v == -0.1
    theirs = train_step(model, x, loss, "ratebp")
    assert torch.equal(ours[0], theirs[0]) and ours[0].sum() > 0
    assert_grads_close(ours[1], theirs[1], "single-step, v_reset -0.1")

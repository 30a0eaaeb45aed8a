"""fold_time: a single-step model (stateful cells in a Python time loop) folds into the multi-step
form; a single-step model and its multi-step twin train identically through both entry points."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ratebp_compile as rc
from ratebp_compile.graph_ops import per_step_batch_norm
from ratebp_compile.families import LIFDynamics
from ratebp_compile.nn import LIF, LIFCell, NeuronSpec, ParametricLIF, ParametricLIFCell, Sigmoid
from ratebp_compile.nn.spec import CallForm, StateTrace
from ratebp_compile.passes import fold_time
from tests.conftest import inputs_unchanged
from tests.passes.util import SingleBN, prepare


class Multi(nn.Module):
    def __init__(self, neuron=LIF, **kw):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.sn = neuron(**kw)
        self.fc = nn.Linear(4, 3)
        self.sn2 = neuron(**kw)
        self.out = nn.Linear(3, 5)

    def forward(self, x):
        T = x.shape[0]
        y = self.sn(self.conv(x.flatten(0, 1)).unflatten(0, (T, -1)))
        return self.out(self.sn2(self.fc(y.mean((3, 4)))))


class Single(Multi):
    """The same network written step by step, snnTorch-style."""

    def forward(self, x):
        outs = []
        for t in range(x.shape[0]):
            y = self.sn(self.conv(x[t]))
            outs.append(self.out(self.sn2(self.fc(y.mean((2, 3))))))
        return torch.stack(outs)


def _twins(neuron_pair=(LIF, LIFCell), **kw):
    multi = Multi(neuron_pair[0], **kw).double()
    single = Single(neuron_pair[1], **kw).double()
    single.load_state_dict(multi.state_dict())
    return multi, single


def test_structure_numerics_and_fired():
    _, single = _twins(decay=0.3)
    x = torch.rand(3, 2, 2, 5, 5, dtype=torch.float64) * 2
    gm, _ = prepare(single, [x], "fold_time", inclusive=False)
    assert sum(n.op == "call_module" and n.target == "sn" for n in gm.graph.nodes) == 3
    result = fold_time(gm)
    assert result.modified
    nodes = list(result.gm.graph.nodes)
    neurons = [n for n in nodes if isinstance(n.target, NeuronSpec)]
    assert [n.target.time_steps for n in neurons] == [3, 3]
    assert [n.meta["ratebp.module"] for n in neurons] == ["sn", "sn2"]
    assert not any(n.op == "call_module" and n.target in ("sn", "sn2") for n in nodes)
    code = result.gm.code
    assert "flatten = x.flatten(0, 1)" in code and ".unflatten(0, (3, -1))" in code
    assert sum(n.target == "conv" for n in nodes) == 1                      # one conv for all steps
    plain = copy.deepcopy(single)
    torch.testing.assert_close(result.gm(x), plain(x), rtol=1e-12, atol=1e-12)


def test_multi_step_models_are_not_modified():
    multi, _ = _twins()
    gm, _ = prepare(multi, [torch.rand(3, 2, 2, 5, 5, dtype=torch.float64)], "fold_time", inclusive=False)
    assert not fold_time(gm).modified


@pytest.mark.parametrize("pair,kw", [
    ((LIF, LIFCell), dict(decay=0.3)),
    ((LIF, LIFCell), dict(decay=0.5, v_reset=0.0, detach_reset=False)),
    ((ParametricLIF, ParametricLIFCell), dict(init_tau=3.0)),
], ids=["lif", "lif-hard-nodetach", "plif"])
@pytest.mark.parametrize("entry", ["transform", "bptt", "compile"])
def test_single_step_model_equals_its_multi_step_twin(pair, kw, entry):
    multi, single = _twins(pair, **kw)
    x = torch.rand(4, 3, 2, 5, 5, dtype=torch.float64) * 2
    y = torch.randint(0, 5, (3,))
    runs = {"transform": lambda m: rc.transform(m), "bptt": lambda m: rc.transform(m, method="bptt"),
            "compile": lambda m: torch.compile(m, backend="ratebp", options={"compiler": "eager"})}
    torch._dynamo.reset()
    outs = []
    for model in (multi, single):
        with inputs_unchanged(x):
            out = runs[entry](model)(x)
            F.cross_entropy(out.mean(0), y).backward()
        outs.append(out)
        torch._dynamo.reset()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-12)
    for (name, p), q in zip(multi.named_parameters(), single.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("entry", ["transform", "compile"])
def test_one_step_loop_equals_bptt(entry):
    _, single = _twins(decay=0.3)
    x = torch.rand(1, 3, 2, 5, 5, dtype=torch.float64) * 2
    plain = copy.deepcopy(single)
    torch._dynamo.reset()
    run = rc.transform(single) if entry == "transform" else \
        torch.compile(single, backend="ratebp", options={"compiler": "eager"})
    with inputs_unchanged(x):
        run(x).square().sum().backward()
    plain(x).square().sum().backward()
    torch._dynamo.reset()
    for p, q in zip(plain.parameters(), single.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)


def test_compiled_single_step_model_leaves_the_cells_state_as_eager_does():
    _, single = _twins(decay=0.3)
    eager = copy.deepcopy(single)
    x = torch.rand(4, 3, 2, 5, 5, dtype=torch.float64)
    torch._dynamo.reset()
    with inputs_unchanged(x):
        torch.compile(single, backend="ratebp", options={"compiler": "eager"})(x).sum().backward()
    eager(x)
    for name in ("sn", "sn2"):
        torch.testing.assert_close(getattr(single, name).v, getattr(eager, name).v, rtol=0, atol=0)
    torch._dynamo.reset()
    transformed = copy.deepcopy(single)
    transformed.sn.reset(), transformed.sn2.reset()
    with inputs_unchanged(x):
        rc.transform(transformed)(x).sum().backward()
    assert transformed.sn.v is None                                   # transform leaves no state behind


def test_per_step_batchnorm_and_sum_over_steps():
    model = SingleBN().double()
    x = torch.rand(3, 4, 2, 5, 5, dtype=torch.float64) * 2
    y = torch.randint(0, 5, (4,))
    gm, _ = prepare(model, [x], "fold_time")
    assert any(n.target is per_step_batch_norm for n in gm.graph.nodes)
    assert ".sum(unflatten, 0)" in rc.show(rc.transform(copy.deepcopy(model), example_inputs=[x]), "annotated")
    plain, bptt, rate = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    F.cross_entropy(plain(x), y).backward()
    with inputs_unchanged(x):
        F.cross_entropy(rc.transform(bptt, method="bptt")(x), y).backward()
        out = rc.transform(rate)(x)
        F.cross_entropy(out, y).backward()
    torch.testing.assert_close(out, copy.deepcopy(model)(x), rtol=1e-12, atol=1e-12)    # the loop's outputs
    for p, q in zip(plain.parameters(), bptt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)
    for a, b, c in zip(plain.buffers(), bptt.buffers(), rate.buffers()):   # running stats: once per step
        torch.testing.assert_close(b, a, rtol=0, atol=1e-14)
        torch.testing.assert_close(c, a, rtol=0, atol=1e-14)


def test_per_step_batchnorm_T1_equals_bptt():
    model = SingleBN().double()
    x = torch.rand(1, 4, 2, 5, 5, dtype=torch.float64) * 2
    y = torch.randint(0, 5, (4,))
    plain, rate = copy.deepcopy(model), copy.deepcopy(model)
    F.cross_entropy(plain(x), y).backward()
    with inputs_unchanged(x):
        F.cross_entropy(rc.transform(rate)(x), y).backward()
    for p, q in zip(plain.parameters(), rate.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.rec, self.sn = nn.Linear(3, 4), nn.Linear(4, 4), LIFCell()

    def forward(self, x):
        s, outs = torch.zeros(x.shape[1], 4), []
        for x_t in x:
            s = self.sn(self.fc(x_t) + self.rec(s))
            outs.append(s)
        return torch.stack(outs)


class LastStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.sn = nn.Linear(3, 4), LIFCell()

    def forward(self, x):
        for x_t in x:
            s = self.sn(self.fc(x_t))
        return s


class SoftmaxBody(nn.Module):
    """A softmax module over the features inside the loop: per sample, so it folds."""

    def __init__(self, multi=False):
        super().__init__()
        self.fc, self.sm, self.sn = nn.Linear(3, 3), nn.Softmax(dim=-1), (LIF() if multi else LIFCell())

    def forward(self, x):
        if isinstance(self.sn, LIFCell):
            return torch.stack([self.sn(self.sm(self.fc(x_t) * 4)) for x_t in x])
        return self.sn(self.sm(self.fc(x) * 4))


def test_softmax_module_over_features_folds():
    single = SoftmaxBody().double()
    multi = SoftmaxBody(multi=True).double()
    multi.load_state_dict(single.state_dict())
    x = torch.rand(4, 2, 3, dtype=torch.float64)
    with inputs_unchanged(x):
        with pytest.warns(rc.ApproximationWarning, match="softmax"):
            out_single = rc.transform(single)(x)
        with pytest.warns(rc.ApproximationWarning, match="softmax"):
            out_multi = rc.transform(multi)(x)
        out_single.sum().backward(), out_multi.sum().backward()
    torch.testing.assert_close(out_single, out_multi, rtol=0, atol=1e-12)
    for (name, p), q in zip(multi.named_parameters(), single.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


class Uneven(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.a, self.b = nn.Linear(3, 3), LIFCell(), LIFCell()

    def forward(self, x):
        outs = [self.a(self.fc(x_t)) for x_t in x]
        return torch.stack(outs) + self.b(self.fc(x[0]))


@pytest.mark.parametrize("model,pattern", [
    (Recurrent, r"recurrent connection"),
    (LastStep, r"used after the loop on its own"),
    (Uneven, r"called different numbers of times \(a: 3, b: 1\)"),
], ids=["recurrent", "last-step", "uneven"])
def test_loops_that_cannot_be_folded_are_refused(model, pattern):
    m = model()
    state = copy.deepcopy(m.state_dict())
    with pytest.raises(rc.RateBPError, match=pattern):
        rc.transform(m)(torch.rand(3, 2, 3))
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert all(c.v is None for c in m.modules() if isinstance(c, LIFCell))



class SelectLoop(nn.Module):
    """The loop reads its steps with ``x.select(0, t)`` (SpikingJelly's MultiStepContainer does)."""

    def __init__(self):
        super().__init__()
        self.fc, self.sn = nn.Linear(3, 4), LIFCell(decay=0.3, v_threshold=0.4)

    def forward(self, x):
        return torch.stack([self.sn(self.fc(x.select(0, t))) for t in range(x.shape[0])])


def test_steps_read_with_select_fold():
    model = SelectLoop().double()
    x = torch.rand(4, 2, 3, dtype=torch.float64) * 2
    plain = copy.deepcopy(model)
    expected = plain(x)
    gm, _ = prepare(model, [x], "fold_time")
    assert not any(n.op == "call_method" and n.target == "select" for n in gm.graph.nodes)
    assert any(isinstance(n.target, NeuronSpec) and n.target.time_steps == 4 for n in gm.graph.nodes)
    with inputs_unchanged(x):
        out = rc.transform(model, method="bptt")(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert expected.sum() > 0


# -- neurons whose calls carry their state explicitly (snnTorch's ``spk, mem = lif(x, mem)``) --------
class ExplicitStateLIF(nn.Module):
    """A single-step LIF that takes and returns its membrane: ``s, v = neuron(x, v)`` (v None: at rest)."""

    def __init__(self):
        super().__init__()
        self.dynamics = LIFDynamics(decay=0.5, v_threshold=0.6, v_reset=None, surrogate=Sigmoid(4.0))

    def forward(self, x, v=None):
        s, (v,) = self.dynamics.step(x, (torch.zeros_like(x) if v is None else v,), ())
        return s, v


rc.nn.register_neuron(ExplicitStateLIF, lambda m: NeuronSpec(m.dynamics), single_step=lambda m: True,
                      call_form=lambda m: CallForm(state_args=1, outputs=("spikes", "state")))


class ExplicitLoop(nn.Module):
    def __init__(self, record_membrane=False, start=None):
        super().__init__()
        self.fc, self.sn, self.out = nn.Linear(3, 5), ExplicitStateLIF(), nn.Linear(5, 2)
        self.record_membrane, self.start = record_membrane, start

    def forward(self, x):
        v = self.start
        spikes, membranes = [], []
        for x_t in x:
            s, v = self.sn(self.fc(x_t), v)
            spikes.append(self.out(s))
            membranes.append(v)
        if self.record_membrane:
            return torch.stack(spikes), torch.stack(membranes)
        return torch.stack(spikes)


@pytest.mark.parametrize("method", ["bptt", "ratebp"])
def test_explicit_state_chain_folds_into_one_neuron(method):
    model = ExplicitLoop().double()
    x = torch.rand(4, 3, 3, dtype=torch.float64) * 2
    plain = copy.deepcopy(model)
    expected = plain(x)
    gm, _ = prepare(copy.deepcopy(model), [x], "fold_time")
    specs = [n.target for n in gm.graph.nodes if isinstance(n.target, NeuronSpec)]
    assert len(specs) == 1 and specs[0].time_steps == 4                  # the rewrite fired: one neuron
    assert not any(n.op == "call_module" and n.target == "sn" for n in gm.graph.nodes)
    with inputs_unchanged(x):
        out = rc.transform(model, method=method)(x)
        out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    if method == "bptt":
        expected.sum().backward()
        for p, q in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    assert expected.abs().sum() > 0


@pytest.mark.parametrize("method", ["bptt", "ratebp"])
def test_the_membrane_a_model_returns_is_read_out(method):
    """Recording the membrane (tutorial 5 returns it): exact values; BPTT differentiates through it; the
    rate-based step refuses a loss that depends on it, at backward, and trains one on the spikes."""
    model = ExplicitLoop(record_membrane=True).double()
    x = torch.rand(4, 3, 3, dtype=torch.float64) * 2
    plain = copy.deepcopy(model)
    spikes_ref, mem_ref = plain(x)
    gm, _ = prepare(copy.deepcopy(model), [x], "fold_time")
    traces = [n for n in gm.graph.nodes if isinstance(n.target, StateTrace)]
    assert len(traces) == 1 and traces[0].target.index == 0 and "'sn'" in traces[0].target.where
    tm = rc.transform(model, method=method)
    with inputs_unchanged(x):
        spikes, mem = tm(x)
        torch.testing.assert_close(spikes, spikes_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(mem, mem_ref, rtol=0, atol=1e-12)
        if method == "bptt":
            (spikes.sum() + mem.square().sum()).backward()
            (spikes_ref.sum() + mem_ref.square().sum()).backward()
            for p, q in zip(model.parameters(), plain.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
        else:
            with pytest.raises(rc.RateBPError, match=r"the loss depends on the state of module 'sn'"):
                (spikes.sum() + mem.square().sum()).backward()
            spikes, mem = tm(x)
            (spikes.sum() + 0.0 * mem.detach().sum()).backward()
            assert all(p.grad is not None for p in model.parameters())


def test_a_read_out_state_is_never_streamed():
    """A chunked spike pass would restart the read-out from rest at each chunk: it runs all steps at once."""
    model = ExplicitLoop(record_membrane=True).double()
    x = torch.rand(6, 3, 3, dtype=torch.float64) * 2
    _, mem_ref = copy.deepcopy(model)(x)
    with pytest.warns(UserWarning, match=r"all 6 steps at once.*reads the state of module 'sn'"):
        _, mem = rc.transform(model, time_chunk=2)(x)
    torch.testing.assert_close(mem, mem_ref, rtol=0, atol=1e-12)


def test_a_read_out_state_combined_with_other_values_is_refused():
    class Mixed(ExplicitLoop):
        def forward(self, x):
            spikes, mem = super().forward(x)
            return spikes, self.out(mem)         # a layer on the membrane: its weights could get no gradient

    with pytest.raises(rc.RateBPError, match=r"module 'out' .*combines the state of module 'sn'.*with.*no gradient "
                                             r"flows through it"):
        rc.transform(Mixed(record_membrane=True))(torch.rand(4, 3, 3))


@pytest.mark.parametrize("model,pattern", [
    (lambda: ExplicitLoop(start=torch.full((3, 5), 0.3)), r"module 'sn'.*starts from a state that is not at rest"),
], ids=["state-not-at-rest"])
def test_explicit_state_used_outside_the_neuron_is_refused(model, pattern):
    m = model()
    snap = copy.deepcopy(m.state_dict())
    x = torch.rand(4, 3, 3)
    with inputs_unchanged(x), pytest.raises(rc.RateBPError, match=pattern):
        rc.transform(m)(x)
    assert all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())


class StoredStateLIF(ExplicitStateLIF):
    """Like ExplicitStateLIF, but a call that passes no state continues from the one the module stored."""

    stored = None

    def forward(self, x, v=None):
        s, self.stored = super().forward(x, self.stored if v is None else v)
        return s, self.stored


rc.nn.register_neuron(StoredStateLIF, lambda m: NeuronSpec(m.dynamics), single_step=lambda m: True,
                      call_form=lambda m: CallForm(state_args=1, outputs=("spikes", "state"),
                                                   stored_at_rest=lambda m: m.stored is None))


class StoredLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.sn = nn.Linear(3, 5), StoredStateLIF()

    def forward(self, x):
        return torch.stack([self.sn(self.fc(x_t))[0] for x_t in x])


def test_state_the_module_carries_itself_folds_and_must_start_at_rest():
    model = StoredLoop().double()
    x = torch.rand(4, 3, 3, dtype=torch.float64) * 2
    plain = copy.deepcopy(model)
    expected = plain(x)
    with inputs_unchanged(x):
        out = rc.transform(model, method="bptt")(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert expected.sum() > 0 and model.sn.stored is None      # the compiled step leaves the module's state alone
    model.sn.stored = torch.ones(3, 5, dtype=torch.float64)      # as an eager call would leave it
    with pytest.raises(rc.RateBPError, match=r"starts from the state the module holds, which is not at rest"):
        rc.transform(model)(x)


def test_a_compiled_step_refuses_a_stored_state_left_by_an_eager_call():
    """The guard: a neuron the forward calls without its state must still be at rest at every step."""
    model = StoredLoop().double()
    x = torch.rand(4, 3, 3, dtype=torch.float64) * 2
    tm = rc.transform(model, method="bptt")
    tm(x)
    model(x)                                                     # the plain model leaves its state behind
    with pytest.raises(rc.RateBPError, match=r"neuron 'sn' \(StoredStateLIF\) holds a state that is not at rest"):
        tm(x)
    model.sn.stored = None
    tm(x)


class LoopAfterMultiStep(nn.Module):
    """A multi-step layer, then a loop reading its output step by step (SpikingJelly's MultiStepContainer
    after multi-step layers; Norse's multi-step LIF, then cells)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.sn1 = nn.Linear(3, 5), LIF(decay=0.4, v_threshold=0.5)
        self.fc2, self.sn2 = nn.Linear(5, 2), LIFCell(decay=0.3, v_threshold=0.3)

    def forward(self, x):
        h = self.sn1(self.fc1(x))                                   # [T, B, 5]
        return torch.stack([self.sn2(self.fc2(h[t])) for t in range(x.shape[0])])


@pytest.mark.parametrize("method", ["bptt", "ratebp"])
def test_a_loop_over_an_intermediate_sequence_folds(method):
    model = LoopAfterMultiStep().double()
    with torch.no_grad():
        model.fc2.weight.abs_()
    x = torch.rand(4, 3, 3, dtype=torch.float64) * 3
    plain = copy.deepcopy(model)
    expected = plain(x)
    gm, _ = prepare(copy.deepcopy(model), [x], "fold_time")
    assert sorted(n.target.time_steps or 0 for n in gm.graph.nodes if isinstance(n.target, NeuronSpec)) == [0, 4]
    with inputs_unchanged(x):
        out = rc.transform(model, method=method)(x)
        out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert expected.sum() > 0
    if method == "bptt":
        expected.sum().backward()
        for p, q in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)

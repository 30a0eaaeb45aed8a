"""torch.compile(model, backend="ratebp"): the same training step as transform, through Dynamo."""
import copy

import pytest
import torch
import torch.nn.functional as F

import ratebp_compile as rc
from ratebp_compile import backend as rb
from ratebp_compile.stream import StreamStage
from tests.conftest import inputs_unchanged
from tests.models.test_zoo import ZOO
from tests.passes.util import Tiny, tiny_input


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _step(run, x, y):
    with inputs_unchanged(x):
        out = run(x)
        F.cross_entropy(out.mean(0), y).backward()
    return out


def _assert_same_step(model, x, y, options, rtol=0.0, atol=0.0):
    ref = copy.deepcopy(model)
    out_ref = _step(rc.transform(ref), x, y)
    out = _step(torch.compile(model, backend="ratebp", options=options), x, y)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=name)
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_gradients_equal_transform(name):
    model = ZOO[name]()
    x = torch.rand(2, 2, 3, 32, 32)
    _assert_same_step(model, x, torch.tensor([1, 3]), {"compiler": "aot_eager"}, rtol=1e-5, atol=1e-6)


def test_inductor_default():
    _assert_same_step(Tiny(), tiny_input(T=3), torch.tensor([0, 1, 3]), None, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_has_no_graph_break(name):
    explanation = torch._dynamo.explain(ZOO[name]())(torch.rand(2, 2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_no_recompilation_between_steps():
    model = ZOO["resnet18"]()
    opt = torch.compile(model, backend="ratebp", options={"compiler": "eager"})
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(3, 2, 3, 32, 32), torch.tensor([0, 4])
    _step(opt, x, y)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            sgd.zero_grad()
            _step(opt, torch.rand(3, 2, 3, 32, 32), y)
            sgd.step()


def test_transform_then_compile_builds_the_step_once():
    model = Tiny()
    tm = rc.transform(model, grad_scale="upstream", cache_size=3)
    ref = copy.deepcopy(model)
    x, y = tiny_input(T=4), torch.tensor([0, 1, 2])
    _step(rc.transform(ref, grad_scale="upstream"), x, y)
    _step(torch.compile(tm, backend="ratebp", options={"compiler": "eager"}), x, y)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    compiled = rb.compiled_for(model)
    assert compiled.options.grad_scale == "upstream" and compiled.options.cache_size == 3
    assert sum(r.name == "build_rate_graph" for r in compiled.history) == 1
    assert tm.compiled is None                       # transform's own pipeline never ran


def test_transformed_module_needs_the_ratebp_backend():
    tm = rc.transform(Tiny())
    with pytest.raises(Exception, match="backend other than 'ratebp'"):
        torch.compile(tm, backend="eager")(tiny_input())


def test_eval_and_no_grad_compile_the_plain_snn():
    model = Tiny()
    opt = torch.compile(model, backend="ratebp", options={"compiler": "eager"})
    x = tiny_input()
    model.eval()
    torch.testing.assert_close(opt(x), model(x), rtol=0, atol=0)
    model.train()
    before = model.bn.num_batches_tracked.clone()
    with torch.no_grad():
        out = opt(x)
    assert not out.requires_grad and model.bn.num_batches_tracked == before + 1


def test_options_are_checked():
    with pytest.raises(Exception, match=r"ratebp backend: unknown option\(s\) \['compilr'\]"):
        torch.compile(Tiny(), backend="ratebp", options={"compilr": "eager"})(tiny_input())
    with pytest.raises(Exception, match="compiler must be one of .*got 'tvm'"):
        torch.compile(Tiny(), backend="ratebp", options={"compiler": "tvm"})(tiny_input())
    with pytest.raises(Exception, match="time_chunk must be a positive int"):
        torch.compile(Tiny(), backend="ratebp", options={"time_chunk": 0})(tiny_input())


def test_bptt_method_option():
    model = Tiny()
    ref = copy.deepcopy(model)
    x, y = tiny_input(T=3), torch.tensor([1, 2, 0])
    _step(torch.compile(model, backend="ratebp", options={"compiler": "eager", "method": "bptt"}), x, y)
    _step(ref.train(), x, y)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_streamed_spike_pass_through_the_backend(compiler):
    """time_chunk reaches the backend's pipeline (as an option, or from a transformed module); the streamed
    step equals transform's."""
    model = Tiny()
    ref = copy.deepcopy(model)
    x, y = tiny_input(T=5), torch.tensor([0, 1, 2])
    out_ref = _step(rc.transform(ref, time_chunk=2), x, y)
    out = _step(torch.compile(model, backend="ratebp", options={"compiler": compiler, "time_chunk": 2}), x, y)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    program = rb.compiled_for(model).step
    assert program.meta["ratebp.streamed"].startswith("in chunks of at most 2")
    # on CPU the chunk graphs run as they are (Inductor's code for them is slower than ATen's); the rate
    # graph is compiled
    stages = [m for m in program.spike.modules() if isinstance(m, StreamStage)]
    graphs = [g for s in stages for d in (s.value_graphs, s.stats_graphs, s.first_graphs) for g in d.values()]
    assert stages and graphs and not any(isinstance(g, rb.CompiledGraph) for g in graphs)
    assert isinstance(program.rate, rb.CompiledGraph)
    torch._dynamo.reset()
    tm = rc.transform(copy.deepcopy(model), time_chunk=3)
    _step(torch.compile(tm, backend="ratebp", options={"compiler": "eager"}), x, y)
    assert rb.compiled_for(tm.model).step.meta["ratebp.streamed"].startswith("in chunks of at most 3")


def test_memory_budget_through_the_backend():
    """memory_budget reaches the backend's pipeline (as an option, or from a transformed module): under a
    budget the spike pass is streamed as transform streams it, and the step equals transform's."""
    model = Tiny()
    ref = copy.deepcopy(model)
    x, y = tiny_input(T=5), torch.tensor([0, 1, 2])
    tm = rc.transform(ref, memory_budget=1024)       # under one step's worth: step by step, with a warning
    with pytest.warns(UserWarning, match="over the memory budget of 1.0 KiB"):
        out_ref = _step(tm, x, y)
    with pytest.warns(UserWarning, match="over the memory budget of 1.0 KiB"):
        out = _step(torch.compile(model, backend="ratebp", options={"compiler": "aot_eager", "memory_budget": 1024}),
                    x, y)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert rb.compiled_for(model).step.meta["ratebp.streamed"] == tm.compiled.step.meta["ratebp.streamed"]
    assert tm.compiled.step.meta["ratebp.streamed"].startswith("in chunks of at most 1 of the T = 5 steps")
    torch._dynamo.reset()
    twin = rc.transform(copy.deepcopy(model), memory_budget=None)
    _step(torch.compile(twin, backend="ratebp", options={"compiler": "eager"}), x, y)
    assert rb.compiled_for(twin.model).step.meta["ratebp.streamed"] == "all T steps at once (no memory budget)"


def test_a_graph_break_that_splits_the_snn_is_a_clear_error():
    """BatchNorm(momentum=None) makes Dynamo break the graph (float(num_batches_tracked)): the piece before
    the break has no neurons, so no rate-based step can be built. The error says why and where; the
    model is left as it was."""
    model = Tiny()
    model.bn.momentum = None
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(Exception, match=r"Dynamo broke the graph at .*util\.py:\d+ in forward: y = self\.bn.*"
                                        r"num_batches_tracked.*Tensor\.item\(\).*without spiking neurons.*"
                                        r"BatchNorm\(momentum=None\)"):
        _step(torch.compile(model, backend="ratebp"), tiny_input(), torch.tensor([0, 1, 2]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_a_custom_neuron_under_the_backend_is_a_clear_error():
    from tests.nn.test_neuron import _Adaptive

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), _Adaptive())
    with pytest.raises(Exception, match=r"ending at .*test_neuron\.py:\d+ in init_state.*has no spiking neurons.*"
                                        r"custom Neuron subclass"):
        torch.compile(model, backend="ratebp")(torch.rand(3, 2, 4)).sum().backward()


@pytest.mark.parametrize("transformed", [False, True], ids=["model", "transformed"])
def test_frozen_batchnorms_in_a_training_model_get_the_rate_based_step(transformed):
    """The step follows the model's mode (its neurons'), not its BatchNorms': frozen statistics in a model
    being trained is fine-tuning, and trains rate-based as with transform."""
    model = Tiny().train()
    model.bn.eval()
    ref = copy.deepcopy(model)
    x, y = tiny_input(T=3), torch.tensor([0, 1, 2])
    _step(rc.transform(ref), x, y)
    run = rc.transform(model) if transformed else model
    _step(torch.compile(run, backend="ratebp", options={"compiler": "eager"}), x, y)
    program = rb.compiled_for(model)
    assert program is not None and program.method == "ratebp"
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert torch.equal(model.bn.running_mean, ref.bn.running_mean)


def test_neurons_in_different_modes_are_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), rc.nn.LIF(), torch.nn.Linear(3, 3), rc.nn.LIF())
    model[3].eval()
    with pytest.raises(Exception, match="1 of the model's 2 neurons are in training mode"):
        torch.compile(model, backend="ratebp")(torch.rand(3, 2, 3))


@pytest.mark.parametrize("attribute", ["v_threshold", "decay"])
def test_models_that_differ_in_a_neuron_float_compile_in_one_process(attribute):
    """Dynamo turns a float that differs between compiles into a graph input (the decay through
    ``sym_float``); the program is specialised to its value, and built again for another."""
    x, y = tiny_input(T=3), torch.tensor([0, 1, 2])
    compiled = None
    for value in (1.0, 0.5, 0.3) if attribute == "v_threshold" else (0.6, 0.3, 0.2):
        model = Tiny()
        setattr(model.sn, attribute, value)
        ref = copy.deepcopy(model)
        _step(rc.transform(ref), x, y)
        compiled = torch.compile(model, backend="ratebp", options={"compiler": "eager"})
        _step(compiled, x, y)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=f"{value} {name}")
    model.zero_grad()
    setattr(model.sn, attribute, 0.7)                           # changed on a compiled model, between steps
    ref = copy.deepcopy(model)
    _step(rc.transform(ref), x, y)
    _step(compiled, x, y)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_a_graph_break_between_neurons_is_a_clear_error():
    """A break that leaves neurons on both sides: the piece after it would see its inputs without their time
    layout. Refused at the first piece, naming the break; nothing ran."""
    class Split(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 6)
            self.sn1, self.sn2 = rc.nn.LIF(), rc.nn.LIF()
            self.bn = torch.nn.BatchNorm1d(6, momentum=None)

        def forward(self, x):
            T = x.shape[0]
            y = self.sn1(self.fc(x))
            return self.sn2(self.bn(y.flatten(0, 1)).unflatten(0, (T, -1)))

    model = Split()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(Exception, match=r"Dynamo broke the graph at .*test_backend\.py:\d+ in forward: return "
                                        r"self\.sn2\(self\.bn.*splitting the SNN in two"):
        torch.compile(model, backend="ratebp")(torch.rand(3, 2, 4)).sum().backward()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_syncbatchnorm_is_one_module_call_the_backend_rewrites(monkeypatch):
    """Under the backend an ``nn.SyncBatchNorm`` in training is one module call (its forward, which refuses CPU
    tensors once torch.distributed is initialised, is not traced), rewritten by the ``sync_batchnorm`` pass;
    recording it does not touch its running statistics. On one process it is the local BatchNorm."""
    from ratebp_compile.graph_ops import sync_batch_norm

    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(Tiny()).train()
    reference = copy.deepcopy(model)
    x = tiny_input(T=3)
    graphs = []
    original = rb._complete_outputs
    monkeypatch.setattr(rb, "_complete_outputs", lambda gm: (graphs.append(gm), original(gm))[1])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="ratebp", options={"compiler": "eager"})
    with inputs_unchanged(x):
        out = compiled(x)
        out.sum().backward()
    assert [n.target for n in graphs[0].graph.nodes if n.op == "call_module"] == ["bn"]
    program = rb.compiled_for(model)
    record = next(r for r in program.history if r.name == "sync_batchnorm")
    assert record.modified and any(n.target is sync_batch_norm for n in record.graph.graph.nodes)
    expected = rc.transform(reference)(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    assert int(model.bn.num_batches_tracked) == 1
    torch.testing.assert_close(model.bn.running_var, reference.bn.running_var)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    # Dynamo does not see the module's settings: the backend guards them (a changed ε builds the step again)
    model.bn.eps = reference.bn.eps = 0.5
    torch.testing.assert_close(compiled(x), rc.transform(reference)(x))

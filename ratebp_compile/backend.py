"""The ``ratebp`` backend for ``torch.compile``: the rate-based training step through Dynamo.

    opt = torch.compile(snn, backend="ratebp")                     # works after `pip install`, no import
    opt = torch.compile(snn, backend="ratebp", options={"compiler": "eager", "input_layout": "T*B"})
    opt = torch.compile(ratebp_compile.transform(snn), backend="ratebp")      # the same step

Dynamo captures the forward (neuron modules appear as their fused custom op, their inputs marked with the
neuron's training flag, ``marks.neuron_mode``; SpikingJelly's as its own custom ops; snnTorch's, Norse's
and other registered neurons as one module call each, ``dynamo_neurons``, whose settings the backend
guards itself); the backend runs the same pipeline as ``transform`` on that graph and returns the
program, whose spike graph (no autograd) and rate graph (through AOTAutograd) are compiled by the
``compiler`` option: "inductor" (default), "aot_eager" or "eager" (debugging); a streamed spike pass keeps
its loop over the chunks, and its chunk graphs are compiled on CUDA only (``_compile_chunk_graphs``
says why). Gradients equal
``transform``'s. Which step a graph gets follows the rule ``transform`` uses (``options.step_kind``):
the compiled step in training mode — the neurons' mode — with autograd on, the plain SNN otherwise. The
whole SNN must reach the backend as one graph: a training graph that a graph break cut (before or after the
break) or that has no neurons is refused with the break's cause and source line.

Options (``options.StepOptions``, parsed there): ``compiler``, ``method`` ("ratebp" | "bptt"),
``input_layout`` (as for ``transform``; module parameters and buffers are always static), ``grad_scale``
("bptt" | "upstream"), ``memory_budget``, ``time_chunk``, ``cache_size`` and ``sync_batchnorm`` (as for ``transform``; the
BatchNorms of Dynamo's graph are ``F.batch_norm`` calls, which it synchronises). A transformed module
brings its own settings: when Dynamo traces it, it traces the user's model with those settings and the
step it decided on marked on its inputs (``marks.step_settings``). Dynamo guards the model; a Python number
Dynamo turns into a graph input (a neuron's threshold that differs between two compiled models) is
specialised: each value gets its own program.
"""
from __future__ import annotations

import collections
import logging
import operator
import sys
import traceback
import weakref
from typing import Any, Deque, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
from torch import nn

from .capture import propagate_shapes
from .dynamo_neurons import install as _install_neuron_calls
from .errors import RateBPError, describe_node, user_frame
from .guards import Guards, neuron_config
from .interop import PORTING, UnsupportedNeuron, rewrite_for
from .marks import neuron_mode, step_settings
from .nn.spec import call_form, neuron_op, starts_from_stored
from .oprules import arg, is_module_state
from .options import StepOptions, step_kind
from .passes.batchnorm_parts import is_batchnorm, uses_batch_statistics
from .passes.infra import input_device, snapshot
from .passes.sync_batchnorm import refuse_local_batchnorms
from .program import Program, compile_program
from .statewatch import StateWatch
from .stream import StreamStage

__all__ = ["ratebp_backend", "compiled_for"]

log = logging.getLogger(__name__)

#: Programs the backend built lately, with weak references to the parameters and buffers they were built
#: for (graph inputs), so that ``show`` finds a compiled model's program.
_RECENT: Deque[Tuple[tuple, Program]] = collections.deque(maxlen=32)


def compiled_for(model: nn.Module) -> Optional[Program]:
    """The newest program the backend compiled for ``model``'s parameters (None if none)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for state, program in reversed(_RECENT):
        live = [ref() for ref in state]
        if any(t is l for t in tensors for l in live if l is not None):
            return program
    return None


def _compile_graph(gm: fx.GraphModule, example_inputs: List[Any], compiler: str):
    if compiler == "eager":
        return gm
    if compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs)


class CompiledGraph(nn.Module):
    """A graph of the program, compiled at its first call (with the real inputs of that call)."""

    def __init__(self, graph_module: fx.GraphModule, compiler: str):
        super().__init__()
        self.graph_module = graph_module
        self.compiler = compiler
        self._fn = None

    def forward(self, *args):
        if self._fn is None:
            self._fn = _compile_graph(self.graph_module, list(args), self.compiler)
        return self._fn(*args)


def _neuron_config(gm: fx.GraphModule, node: fx.Node):
    """The spec of the neuron a ``call_module`` node calls (None: not a neuron); a setting the compiler cannot
    honour is refused naming the module and the user's line."""
    module = gm.get_submodule(node.target)
    try:
        return neuron_config(module)
    except UnsupportedNeuron as e:
        raise RateBPError(f"ratebp backend: {describe_node(node, gm)} ({type(module).__module__}."
                          f"{type(module).__qualname__}) cannot be compiled: {e} See {PORTING}.") from None


def _neuron_modules(gm: fx.GraphModule) -> List[nn.Module]:
    """The neurons of other libraries that ``gm`` calls as modules (``dynamo_neurons``), once each."""
    modules = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and _neuron_config(gm, node) is not None:
            module = gm.get_submodule(node.target)
            if not any(module is m for m in modules):
                modules.append(module)
    return modules


def _is_element(node, source: fx.Node, index: int) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem and \
        node.args == (source, index)


def _reuse_state_tuples(gm: fx.GraphModule) -> None:
    """A state tuple Dynamo takes apart and builds again between two calls of a neuron module
    (``LIFFeedForwardState(s[0], s[1])`` for Norse's ``s``) → ``s`` itself, as the model passes it: the
    form ``transform``'s capture gives the call, where the state is visibly the previous call's."""
    rebuilt = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or _neuron_config(gm, node) is None:
            continue
        args = list(node.args)
        for i, a in enumerate(args):
            if isinstance(a, fx.Node) and a.op == "call_function" and isinstance(a.target, type) and \
                    issubclass(a.target, tuple) and not a.kwargs and a.args and \
                    isinstance(a.args[0], fx.Node) and a.args[0].target is operator.getitem:
                source = a.args[0].args[0]
                if all(_is_element(e, source, j) for j, e in enumerate(a.args)) and \
                        isinstance(source, fx.Node) and isinstance(source.meta.get("example_value"), a.target):
                    args[i] = source
                    rebuilt.append(a)
        node.args = tuple(args)
    for tup in dict.fromkeys(rebuilt):           # the rebuilt tuple and the elements only it read
        if not tup.users:
            elements = list(tup.args)
            gm.graph.erase_node(tup)
            for e in elements:
                if not e.users:
                    gm.graph.erase_node(e)
    gm.recompile()


def _complete_outputs(gm: fx.GraphModule) -> None:
    """Give every call of a neuron module that returns a tuple (``spk, mem = lif(x, mem)``) a ``getitem`` node
    for each element, used or not, as ``transform``'s capture does: Dynamo leaves out the unused ones (the
    last step's membrane), which would make the last step of a loop look unlike the others."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or _neuron_config(gm, node) is None:
            continue
        outputs = call_form(gm.get_submodule(node.target)).outputs
        present = {u.args[1] for u in node.users if u.target is operator.getitem}
        for index in range(len(outputs)):
            if index not in present:
                with gm.graph.inserting_after(node):
                    gm.graph.call_function(operator.getitem, (node, index))
    gm.recompile()


def _read_marks(gm: fx.GraphModule) -> Tuple[Dict[fx.Node, tuple], List[bool]]:
    """Remove the ``marks`` from ``gm``: returns ``{marked placeholder: (layout, step, grad_scale, memory_budget,
    time_chunk, cache_size, sync_batchnorm)}`` of a transformed module's inputs and the training flags of the neurons."""
    settings, modes = {}, [m.training for m in _neuron_modules(gm)]
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (step_settings, neuron_mode):
            x, *values = node.args
            if node.target is step_settings:
                settings[x] = tuple(values)
            else:
                modes.append(bool(values[0]))
            node.replace_all_uses_with(x)
            gm.graph.erase_node(node)
    if settings or modes:
        gm.recompile()
    return settings, modes


def _training(gm: fx.GraphModule, modes: List[bool]) -> bool:
    """Whether the model was in training mode: its neurons' flag (``train()``/``eval()`` set them all); a
    graph without neurons is a training graph unless its BatchNorms all use running statistics."""
    if modes and not all(m == modes[0] for m in modes):
        raise RateBPError(f"ratebp backend: {sum(modes)} of the model's {len(modes)} neurons are in training mode "
                          f"and the others in eval mode; put the whole model in one mode (model.train() or "
                          f"model.eval())")
    return modes[0] if modes else not _uses_running_statistics(gm)


def _uses_running_statistics(gm: fx.GraphModule) -> bool:
    """Every BatchNorm in the graph normalises with running statistics: the model is in eval mode."""
    norms = [n for n in gm.graph.nodes if is_batchnorm(n, gm)]
    return bool(norms) and not any(arg(n, 5, "training", False) for n in norms)


def _has_neurons(gm: fx.GraphModule) -> bool:
    """Dynamo records every neuron of ``ratebp_compile.nn`` as one of the package's custom ops, SpikingJelly's
    as its own, and other libraries' as module calls (``dynamo_neurons``)."""
    def ours(target) -> bool:
        op = target.default if isinstance(target, torch._ops.OpOverloadPacket) else target
        return isinstance(op, torch._ops.OpOverload) and op.namespace == "ratebp"

    return bool(_neuron_modules(gm)) or \
        any(n.op == "call_function" and (ours(n.target) or neuron_op(n.target) is not None) for n in gm.graph.nodes)


def _where(stack) -> str:
    """`` at file:line in function: code`` for the innermost frame of the user's code in a Dynamo user
    stack, followed by the innermost frame when that is in a library."""
    if not stack:
        return ""
    inner = stack[-1]
    inner = f"{inner.filename}:{inner.lineno} in {inner.name}: {(inner.line or '').strip()}"
    user = user_frame("".join(traceback.format_list(stack)))
    return f" at {user} (inside {inner})" if user and user != inner else f" at {user or inner}"


def _part_of_a_ddp_model() -> Optional[str]:
    """The class of the module whose forward Dynamo is compiling, when that module is only a part of the model a
    ``DistributedDataParallel`` wraps (else None). DDP's forward runs as plain Python, and so does the forward of
    a ``torch.nn`` container it wraps (``nn.Sequential``): Dynamo compiles the first frames of other code it
    reaches — each neuron on its own —, and the layers between them run outside the compiled step."""
    from torch._dynamo.symbolic_convert import tls
    from torch.nn.parallel import DistributedDataParallel

    tx = getattr(tls, "current_tx", None)
    root = tx.f_locals.get("self") if tx is not None else None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is DistributedDataParallel.forward.__code__:
            model = frame.f_locals["self"].module
            model = getattr(model, "_orig_mod", model)
            inside = {id(model), id(getattr(model, "_model", None))}        # a transformed module's model
            if root is not None and id(root) not in inside:
                return type(root).__qualname__
            return None
        frame = frame.f_back
    return None


def _incomplete_graph_error(gm: fx.GraphModule) -> Optional[RateBPError]:
    """The error for a training graph that is not the whole SNN — one piece of a model Dynamo split at a graph
    break (before the break, or resuming after it), or a graph without neurons — else None. The rate-based
    step needs the whole SNN in one graph: a piece's inputs and outputs would lose their time layout."""
    reason = getattr(gm, "compile_subgraph_reason", None)         # set by Dynamo on the graphs it compiles
    stack = reason.user_stack if reason is not None else None
    hint = (" BatchNorm(momentum=None) breaks the graph (it reads num_batches_tracked as a Python number), and "
            "so does the forward of a custom Neuron subclass; torch._dynamo.explain(model)(x) lists every break. "
            "ratebp_compile.transform(model) does not go through Dynamo.")
    if reason is not None and reason.graph_break:
        cause = reason.reason.strip().splitlines()[0] if reason.reason.strip() else "no reason given"
        what = "leaving a part of the model without spiking neurons" if not _has_neurons(gm) else \
            "splitting the SNN in two"
        return RateBPError(f"ratebp backend: Dynamo broke the graph{_where(stack)} ({cause}), {what}; the "
                           f"rate-based step needs the whole SNN in one graph." + hint)
    if stack and stack[0].name.startswith("torch_dynamo_resume_in_"):
        return RateBPError(f"ratebp backend: this graph resumes the model after a graph break ({stack[0].name}); the "
                           f"rate-based step needs the whole SNN in one graph." + hint)
    if not _has_neurons(gm):
        return RateBPError(f"ratebp backend: the graph Dynamo passed, ending{_where(stack)}, has no spiking neurons: "
                           f"the model has none, or a graph break split it, and the rate-based step needs the whole "
                           f"SNN in one graph." + hint)
    return None


def _signature(args: Sequence[Any], scalars: Sequence[int]) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else ("value", a) for a in args) \
        + tuple(args[i].item() for i in scalars)


def _scalar_inputs(gm: fx.GraphModule) -> List[int]:
    """The graph inputs that are Python numbers Dynamo made inputs ("automatic dynamic": a neuron's threshold
    that differs between two compiled models, say): 0-dim tensors read only through ``.item()``. The
    program is specialised to their values (:func:`_specialise_scalars`); a new value builds a new one."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, p in enumerate(placeholders) if not is_module_state(p) and p.users and
            all(u.op == "call_method" and u.target == "item" for u in p.users) and
            isinstance(p.meta.get("example_value"), torch.Tensor) and p.meta["example_value"].dim() == 0]


#: Functions of Python numbers Dynamo records on a scalar input (a float attribute read as a SymFloat):
#: computed once the input is specialised to its value.
_NUMBER_FUNCTIONS = (torch.sym_float, torch.sym_int, torch.sym_max, torch.sym_min, torch.sym_not, operator.add,
                     operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg, operator.pow)


def _specialise_scalars(gm: fx.GraphModule, args: Sequence[Any], scalars: Sequence[int]) -> None:
    """Replace ``.item()`` of the scalar inputs by their values in ``args``, and compute the functions of
    numbers applied to them (``sym_float(decay.item())``: a neuron's decay that differs between two models
    compiled in one process)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i in scalars:
        for use in list(placeholders[i].users):
            use.replace_all_uses_with(args[i].item())
            gm.graph.erase_node(use)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _NUMBER_FUNCTIONS and not node.all_input_nodes and \
                all(isinstance(a, (int, float, bool)) for a in node.args):
            node.replace_all_uses_with(node.target(*node.args, **node.kwargs))
            gm.graph.erase_node(node)
    gm.recompile()


class _Rewritten(nn.Module):
    """``rewrite(module, x)`` as a module, for ``torch.fx`` to trace."""

    def __init__(self, module: nn.Module, rewrite):
        super().__init__()
        self.module, self.rewrite = module, rewrite

    def forward(self, x):
        return self.rewrite(self.module, x)


def _expand_rewrites(gm: fx.GraphModule) -> Dict[nn.Module, Set[str]]:
    """Replace each call of a layer that has a rewrite (``interop.register_rewrite``: SpikingJelly's Dropout,
    one mask per sequence) by the traced rewrite, as ``transform``'s capture does; returns the attributes
    each rewrite read (``statewatch``), which the programs specialise on."""
    reads: Dict[nn.Module, Set[str]] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        rewrite = rewrite_for(module)
        if rewrite is None:
            continue
        what = f"{describe_node(node, gm)} ({type(module).__module__}.{type(module).__qualname__})"
        if len(node.args) != 1 or node.kwargs:
            raise RateBPError(f"ratebp backend: {what} is called with {len(node.args)} arguments and "
                              f"{len(node.kwargs)} keywords; its compiled form takes the input alone")
        watch = StateWatch(module, lambda m: m is module, lambda: what)
        try:
            with watch.watching():
                traced = fx.symbolic_trace(_Rewritten(module, rewrite))
        except UnsupportedNeuron as e:
            raise RateBPError(f"ratebp backend: {what} cannot be compiled: {e} See {PORTING}.") from None
        reads[module] = set(watch.reads.get(module, ()))
        x = next(n for n in traced.graph.nodes if n.op == "placeholder")
        with gm.graph.inserting_before(node):
            out = gm.graph.graph_copy(traced.graph, {x: node.args[0]})
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
    gm.recompile()
    return reads


#: The settings of an ``nn.SyncBatchNorm`` the programs specialise on (its tensors are read when the step runs).
_SYNCBATCHNORM_SETTINGS = frozenset({"eps", "momentum", "process_group", "track_running_stats"})


def _syncbatchnorm_reads(gm: fx.GraphModule) -> Dict[nn.Module, Set[str]]:
    """The settings of each ``nn.SyncBatchNorm`` Dynamo calls as a module (``dynamo_neurons``): Dynamo, which does
    not trace its forward, does not guard them, and the ``sync_batchnorm`` pass reads them."""
    return {m: set(_SYNCBATCHNORM_SETTINGS) for m in (gm.get_submodule(n.target) for n in gm.graph.nodes
                                                       if n.op == "call_module")
            if isinstance(m, nn.SyncBatchNorm)}


def _module_guards(gm: fx.GraphModule, reads: Dict[nn.Module, Set[str]]) -> Optional[Guards]:
    """Guards on the modules ``gm`` calls (``dynamo_neurons``), checked with ``check_neurons`` and
    ``check_attributes``: the neurons' specs and hooks, the state of those called without one (it must stay
    at rest), and the attributes the rewritten layers' rewrites read (``reads``); None when there are none.
    Dynamo guards the modules' identity and training flags, and their tensors are read when the step runs."""
    if not _neuron_modules(gm) and not reads:
        return None
    stored = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if neuron_config(module) is not None and starts_from_stored(module, len(node.args) - 1):
                stored.append(module)
    return Guards(gm, reads, stored_state=stored)


def _compile_chunk_graphs(spike: fx.GraphModule, compiler: str) -> None:
    """A streamed spike pass keeps its loop over the chunks in Python. On CUDA each chunk graph is compiled.
    On CPU they run as they are: each is a convolution (an external call, compiled or not) and one to three
    element-wise ops, and Inductor's code for them was slower than ATen's — its cast of the 1-byte spikes
    to float 5× slower (a 128×16×32×32 chunk, 1.3 against 0.25 ms), and its layout optimisation converts
    every chunk to channels-last for the convolution. The anchor bench's ResNet-18 at T = 16, chunks of 8,
    2 threads: with the chunk graphs compiled the step took 1.04–1.07× the eager step, without 0.92–0.95×.
    What remains is the compiled rate graph's gain, 14–19 ms a step whatever T, since the streamed spike pass
    is the same in both steps: 0.93–0.98× the eager step at T = 8, 16 and 32 on 1 and 2 threads, each with a
    95% interval below 1 over 160 paired steps (benchmarks/bench_compile.py; BENCHMARKS.md)."""
    if input_device(spike).type == "cpu":
        return
    for stage in spike.modules():
        if isinstance(stage, StreamStage):
            for graphs in (stage.value_graphs, stage.stats_graphs, stage.first_graphs):
                for key in list(graphs):
                    graphs[key] = CompiledGraph(graphs[key], compiler)


class RateBPCompiledFunction:
    """The callable the backend returns for a training graph: the program for each concrete input
    signature is built at its first call (Dynamo may have made some sizes symbolic; the rate graph is
    specialised to the sizes of the step, as with ``transform``)."""

    def __init__(self, gm: fx.GraphModule, options: StepOptions, layouts: List[str]):
        self.gm = gm
        self.options = options
        self.layouts = layouts
        self.scalars = _scalar_inputs(gm)
        self.programs: "collections.OrderedDict[tuple, Program]" = collections.OrderedDict()
        # what the programs specialised on of the modules Dynamo calls (set by _build)
        self.guards: Optional[Guards] = None

    def __call__(self, *args):
        if self.guards is not None:
            changed = self.guards.check_neurons() or self.guards.check_attributes()
            if changed is not None:              # Dynamo does not see the settings of a module it calls
                log.debug("ratebp backend: %s; building the programs again", changed)
                self.programs.clear()
                self.guards = None
        sig = _signature(args, self.scalars)
        program = self.programs.get(sig)
        if program is None:
            program = self.programs[sig] = self._build(list(args), sig)
            while len(self.programs) > self.options.cache_size:
                self.programs.popitem(last=False)
        else:
            self.programs.move_to_end(sig)
        return program(*args)

    def _build(self, args: List[Any], sig: tuple) -> Program:
        gm = snapshot(self.gm)
        self.guards = _module_guards(gm, {**_expand_rewrites(gm), **_syncbatchnorm_reads(gm)})
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        _specialise_scalars(gm, args, self.scalars)
        gm.meta["ratebp.model"] = "torch.compile graph"
        propagate_shapes(gm, args)
        program = compile_program(gm, self.options, self.layouts)
        state = tuple(weakref.ref(a) for a, p in zip(args, placeholders) if is_module_state(p))
        _RECENT.append((state, program))
        log.debug("ratebp backend: built the %s program for %s", self.options.method, sig)
        compiler = self.options.compiler
        step = program.step
        if self.options.method == "bptt":
            program.compiled = CompiledGraph(step, compiler)
        elif any(isinstance(m, StreamStage) for m in step.spike.modules()):
            _compile_chunk_graphs(step.spike, compiler)
        else:
            step.spike = CompiledGraph(step.spike, compiler)
        if self.options.method == "ratebp":
            step.rate = CompiledGraph(step.rate, compiler)
        return program


def ratebp_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Optional[Dict[str, Any]] = None,
                   mode: Optional[str] = None):
    """``torch.compile`` backend: see the module docstring."""
    if mode not in (None, "default"):
        raise RateBPError(f"the ratebp backend takes no mode (got {mode!r}); use options={{'compiler': ...}}")
    opts = StepOptions.parse(options, "ratebp backend")
    settings, modes = _read_marks(gm)
    _reuse_state_tuples(gm)
    _complete_outputs(gm)
    if settings:            # a transformed module: its settings, and the step it decided on
        _, kind, grad_scale, memory_budget, time_chunk, cache_size, sync_batchnorm = next(iter(settings.values()))
        if kind != "plain":
            opts = opts.replace(method=kind, grad_scale=grad_scale, memory_budget=memory_budget, time_chunk=time_chunk,
                                cache_size=cache_size, sync_batchnorm=sync_batchnorm)
    else:
        kind = step_kind(opts.method, _training(gm, modes), torch.is_grad_enabled())
    if kind == "plain":
        log.debug("ratebp backend: plain SNN graph")
        refuse_local_batchnorms([describe_node(n, gm) for n in gm.graph.nodes
                                 if is_batchnorm(n, gm) and uses_batch_statistics(n, gm)], opts.sync_batchnorm)
        return _compile_graph(gm, list(example_inputs), opts.compiler)
    part = _part_of_a_ddp_model()
    if part is not None:
        raise RateBPError(f"ratebp backend: inside DistributedDataParallel Dynamo compiles a {part} on its own, not "
                          f"the model: DDP's forward and the forward of a torch.nn container it wraps (nn.Sequential) "
                          f"run as plain Python, so the layers between the compiled parts would run outside the "
                          f"rate-based step. Compile the model inside DDP — DDP(torch.compile(model, "
                          f"backend=\"ratebp\")) — or give it a forward of your own (a module class).")
    error = _incomplete_graph_error(gm)
    if error is not None:
        raise error
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    scalars = {placeholders[i] for i in _scalar_inputs(gm)}
    user_inputs = [p for p in placeholders if not is_module_state(p) and p not in scalars and
                   isinstance(p.meta.get("example_value"), torch.Tensor)]
    layouts = opts.layouts(len(user_inputs))
    by_input = {p: settings.get(p, (lay,))[0] for p, lay in zip(user_inputs, layouts)}
    return RateBPCompiledFunction(gm, opts, [by_input.get(p, "static") for p in placeholders])


def _register() -> None:
    """Make ``backend="ratebp"`` known to Dynamo when the package is not installed with its entry point
    (a source checkout on the path); an installed package is found through the entry point."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "ratebp" in entry_points(group="torch_dynamo_backends").names or "ratebp" in _COMPILER_FNS:
        return
    register_backend(ratebp_backend, name="ratebp")


_register()
_install_neuron_calls()

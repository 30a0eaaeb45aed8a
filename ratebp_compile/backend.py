"""The ``ratebp`` backend for ``torch.compile``: the rate-based training step through Dynamo.

    opt = torch.compile(snn, backend="ratebp")                     # works after `pip install`, no import
    opt = torch.compile(snn, backend="ratebp", options={"compiler": "eager", "input_layout": "T*B"})
    opt = torch.compile(ratebp_compile.transform(snn), backend="ratebp")      # the same step

Dynamo captures the forward (neuron modules appear as their fused custom op); the backend runs the same
pipeline as ``transform`` on that graph and returns the program, whose spike graph (no autograd) and
rate graph (through AOTAutograd) are compiled by ``options["compiler"]``: "inductor" (default),
"aot_eager" or "eager" (debugging). Gradients equal ``transform``'s; with autograd off, or a graph whose
BatchNorms use running statistics (eval mode), it compiles the plain SNN. The whole SNN must reach the
backend as one graph: a training graph without neurons (a piece of the model Dynamo split off at a graph
break) is refused with the break's cause and source line.

Options: ``compiler``, ``method`` ("ratebp" | "bptt"), ``input_layout`` (as for ``transform``; module
parameters and buffers are always static), ``grad_scale`` ("bptt" | "upstream"), ``time_chunk`` (as for
``transform``). A transformed module brings its own settings (``method``, ``input_layout``, ``grad_scale``,
``time_chunk``): when Dynamo traces it, it traces the user's model with those settings marked on its
inputs (``step_settings``).
"""
from __future__ import annotations

import collections
import logging
import traceback
import weakref
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from .capture import propagate_shapes
from .errors import RateBPError, user_frame
from .oprules import arg
from .passes import GRAD_SCALES, METHODS, PassRecord, compile_step
from .passes.batchnorm_parts import is_batchnorm
from .passes.infer_time_layout import input_layouts
from .passes.infra import is_module_state, snapshot
from .stream import DEFAULT_TIME_CHUNK, StreamStage, check_time_chunk

__all__ = ["ratebp_backend", "step_settings", "compiled_for", "COMPILERS"]

log = logging.getLogger(__name__)

COMPILERS = ("inductor", "aot_eager", "eager")
_OPTION_VALUES = {"compiler": COMPILERS, "method": METHODS, "grad_scale": GRAD_SCALES}
_DEFAULTS = {"compiler": "inductor", "method": "ratebp", "input_layout": "TB", "grad_scale": "bptt",
             "time_chunk": DEFAULT_TIME_CHUNK}


@torch._dynamo.allow_in_graph
def step_settings(x: torch.Tensor, layout: str, method: str, grad_scale: str,
                  time_chunk: Optional[int]) -> torch.Tensor:
    """Marks a transformed module's input, in the graph Dynamo captures, with the module's settings. The
    ``ratebp`` backend reads and removes these marks. Dynamo runs this on fake tensors to learn its
    output; anything else running it means another backend compiled a transformed module."""
    if isinstance(x, FakeTensor):
        return x
    raise RateBPError("a module returned by ratebp_compile.transform was compiled with a backend other than "
                      "'ratebp': use torch.compile(model, backend='ratebp'), or compile the original model")


@dataclass
class BackendCompiled:
    """What the backend compiled for one Dynamo graph (``ratebp_compile.show`` reads it)."""

    program: fx.GraphModule
    history: List[PassRecord]          # history[0] is Dynamo's graph as captured
    options: Dict[str, Any]
    state: tuple           # weak references to the model's parameters and buffers (graph inputs)

    def belongs_to(self, tensors) -> bool:
        live = [ref() for ref in self.state]
        return any(t is l for t in tensors for l in live if l is not None)


_RECENT: Deque[BackendCompiled] = collections.deque(maxlen=32)


def compiled_for(model: nn.Module) -> Optional[BackendCompiled]:
    """The newest program the backend compiled for ``model``'s parameters (None if none)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for entry in reversed(_RECENT):
        if entry.belongs_to(tensors):
            return entry
    return None


def _options(options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    opts = dict(_DEFAULTS)
    for key, value in (options or {}).items():
        if key not in _DEFAULTS:
            raise RateBPError(f"unknown ratebp backend option {key!r}; known: {sorted(_DEFAULTS)}")
        if key in _OPTION_VALUES and value not in _OPTION_VALUES[key]:
            raise RateBPError(f"ratebp backend option {key}={value!r}; expected one of {_OPTION_VALUES[key]}")
        if key == "time_chunk":
            check_time_chunk(value)
        opts[key] = value
    return opts


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


def _read_step_settings(gm: fx.GraphModule) -> Dict[fx.Node, tuple]:
    """Remove ``step_settings`` marks; returns {marked placeholder: (layout, method, grad_scale, time_chunk)}."""
    marks = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is step_settings:
            x, *settings = node.args
            marks[x] = tuple(settings)
            node.replace_all_uses_with(x)
            gm.graph.erase_node(node)
    if marks:
        gm.recompile()
    return marks


def _uses_running_statistics(gm: fx.GraphModule) -> bool:
    """Every BatchNorm in the graph normalises with running statistics: the model is in eval mode."""
    norms = [n for n in gm.graph.nodes if is_batchnorm(n, gm)]
    return bool(norms) and not any(arg(n, 5, "training", False) for n in norms)


def _has_neurons(gm: fx.GraphModule) -> bool:
    """Dynamo records every neuron of ``ratebp_compile.nn`` as one of the package's custom ops."""
    def ours(target) -> bool:
        op = target.default if isinstance(target, torch._ops.OpOverloadPacket) else target
        return isinstance(op, torch._ops.OpOverload) and op.namespace == "ratebp"

    return any(n.op == "call_function" and ours(n.target) for n in gm.graph.nodes)


def _where(stack) -> str:
    """`` at file:line in function: code`` for the innermost frame of the user's code in a Dynamo user
    stack, followed by the innermost frame when that is in a library."""
    if not stack:
        return ""
    inner = stack[-1]
    inner = f"{inner.filename}:{inner.lineno} in {inner.name}: {(inner.line or '').strip()}"
    user = user_frame("".join(traceback.format_list(stack)))
    return f" at {user} (inside {inner})" if user and user != inner else f" at {user or inner}"


def _no_neurons_error(gm: fx.GraphModule) -> RateBPError:
    """The error for a training graph without neurons: a model without any, or one piece of a model
    that Dynamo split at a graph break (the rate-based step needs the whole SNN in one graph)."""
    reason = getattr(gm, "compile_subgraph_reason", None)         # set by Dynamo on the graphs it compiles
    stack = reason.user_stack if reason is not None else None
    hint = (" BatchNorm(momentum=None) breaks the graph (it reads num_batches_tracked as a Python number), and "
            "so does the forward of a custom Neuron subclass; torch._dynamo.explain(model)(x) lists every break. "
            "ratebp_compile.transform(model) does not go through Dynamo.")
    if reason is None or not reason.graph_break:
        return RateBPError(f"ratebp backend: the graph Dynamo passed, ending{_where(stack)}, has no spiking neurons: "
                           f"the model has none, or a graph break split it, and the rate-based step needs the whole "
                           f"SNN in one graph." + hint)
    cause = reason.reason.strip().splitlines()[0] if reason.reason.strip() else "no reason given"
    return RateBPError(f"ratebp backend: Dynamo broke the graph{_where(stack)} ({cause}), leaving a part of the "
                       f"model without spiking neurons; the rate-based step needs the whole SNN in one graph." + hint)


def _signature(args: Sequence[Any]) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else ("value", a) for a in args)


class RateBPCompiledFunction:
    """The callable the backend returns for a training graph: the program for each concrete input
    signature is built at its first call (Dynamo may have made some sizes symbolic; the rate graph is
    specialised to the sizes of the step, as with ``transform``)."""

    def __init__(self, gm: fx.GraphModule, opts: Dict[str, Any], layouts: List[str]):
        self.gm = gm
        self.opts = opts
        self.layouts = layouts
        self.programs: Dict[tuple, nn.Module] = {}

    def __call__(self, *args):
        sig = _signature(args)
        program = self.programs.get(sig)
        if program is None:
            program = self.programs[sig] = self._build(list(args), sig)
        return program(*args)

    def _build(self, args: List[Any], sig: tuple):
        gm = snapshot(self.gm)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        gm.meta["ratebp.model"] = "torch.compile graph"
        propagate_shapes(gm, args)
        program, history = compile_step(gm, input_layouts=self.layouts, method=self.opts["method"],
                                        grad_scale=self.opts["grad_scale"], time_chunk=self.opts["time_chunk"])
        state = tuple(weakref.ref(a) for a, p in zip(args, placeholders) if is_module_state(p))
        _RECENT.append(BackendCompiled(program, history, self.opts, state))
        log.debug("ratebp backend: built the %s program for %s", self.opts["method"], sig)
        if self.opts["method"] == "bptt":
            return CompiledGraph(program, self.opts["compiler"])
        if any(isinstance(m, StreamStage) for m in program.spike.modules()):
            # a streamed spike pass keeps its loop over the chunks; each chunk graph is compiled
            for stage in program.spike.modules():
                if isinstance(stage, StreamStage):
                    for graphs in (stage.value_graphs, stage.stats_graphs, stage.first_graphs):
                        for key in list(graphs):
                            graphs[key] = CompiledGraph(graphs[key], self.opts["compiler"])
        else:
            program.spike = CompiledGraph(program.spike, self.opts["compiler"])
        program.rate = CompiledGraph(program.rate, self.opts["compiler"])
        return program


def ratebp_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Optional[Dict[str, Any]] = None,
                   mode: Optional[str] = None):
    """``torch.compile`` backend: see the module docstring."""
    if mode not in (None, "default"):
        raise RateBPError(f"the ratebp backend takes no mode (got {mode!r}); use options={{'compiler': ...}}")
    opts = _options(options)
    marks = _read_step_settings(gm)
    if marks:
        _, method, grad_scale, time_chunk = next(iter(marks.values()))
        opts.update(method=method, grad_scale=grad_scale, time_chunk=time_chunk)
    if opts["method"] == "plain" or not torch.is_grad_enabled() or _uses_running_statistics(gm):
        log.debug("ratebp backend: plain SNN graph (%s)", "eval" if torch.is_grad_enabled() else "no grad")
        return _compile_graph(gm, list(example_inputs), opts["compiler"])
    if not _has_neurons(gm):
        raise _no_neurons_error(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    user_inputs = [p for p in placeholders if not is_module_state(p) and
                   isinstance(p.meta.get("example_value"), torch.Tensor)]
    layouts = input_layouts(opts["input_layout"], len(user_inputs))
    if len(layouts) != len(user_inputs):
        raise RateBPError(f"input_layout lists {len(layouts)} layouts for {len(user_inputs)} tensor inputs")
    by_input = {p: marks.get(p, (lay,))[0] for p, lay in zip(user_inputs, layouts)}
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

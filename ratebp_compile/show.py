"""``show``: what the compiler made of a model.

    rc.show(model)                       # a transformed module, or torch.compile(m, backend="ratebp")
    rc.show(model, "rate")               # one stage
    rc.show(model, format="svg")         # the annotated graph as SVG (format="dot": Graphviz source)

Stages: ``"captured"`` (the user's forward as traced, as code), ``"annotated"`` (its nodes with kind,
shape and time layout: what the compiler decided about each op), ``"spike"`` (the exact forward, no
autograd), ``"rate"`` (the length-1 graph that is differentiated), ``"program"`` (the training step that
runs them), ``"memory"`` (bytes kept for backward, rate-based vs BPTT), ``"history"`` (the passes) and
each pass's name (the graph's code after it). ``stage=None`` shows the summary, the annotated graph,
the spike and rate graphs, memory and history. The "time" column reads: ``T@k`` time at dimension k,
``T·@k`` time merged into dimension k (``[T·B, ...]``), blank: no time axis.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.fx as fx

from .errors import RateBPError, user_frame
from .passes.stream_time import STREAMED
from .program import CPU_MEMORY, Program
from .render import node_kind, op_label, to_dot, to_svg
from .stream import StreamStage

__all__ = ["show"]

MiB = 2 ** 20


def _resolve(obj) -> Program:
    """The program behind ``obj``."""
    from .backend import compiled_for
    from .runtime import RateBPModule

    if isinstance(obj, Program):
        return obj
    module = getattr(obj, "_orig_mod", obj)                 # torch.compile's OptimizedModule
    if isinstance(module, RateBPModule):
        if module.compiled is not None:
            return module.compiled
        module = module.model
    if isinstance(module, torch.nn.Module):
        found = compiled_for(module)
        if found is not None:
            return found
        raise RateBPError("nothing compiled yet for this model: run one training step first (or pass "
                          "example_inputs to transform)")
    raise RateBPError(f"show expects a module returned by ratebp_compile.transform or torch.compile(..., "
                      f"backend='ratebp'), got {type(obj).__name__}")


def _header(title: str) -> str:
    return f"=== {title} " + "=" * max(0, 76 - len(title))


def _args(node: fx.Node) -> str:
    def fmt(a):
        if isinstance(a, fx.Node):
            return a.name
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in a) + "]"
        return repr(a) if not isinstance(a, float) else f"{a:g}"
    return ", ".join([fmt(a) for a in node.args] + [f"{k}={fmt(v)}" for k, v in node.kwargs.items()])


def _shape(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return "[" + ", ".join(map(str, val.shape)) + "]"
    if isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return "(" + ", ".join("[" + ", ".join(map(str, v.shape)) + "]" for v in val) + ")"
    return ""


def graph_table(gm: fx.GraphModule, width: int = 60) -> str:
    """One line per node: name, what it computes, shape, time layout, kind; then the approximations."""
    rows = [("node", "computes", "shape", "time", "kind")]
    notes: List[str] = []
    for node in gm.graph.nodes:
        if node.op == "output":
            rows.append(("output", _args(node)[:width], "", "", ""))
            continue
        lay = node.meta.get("ratebp.time")
        what = op_label(node, gm) if node.op in ("placeholder", "get_attr") else f"{op_label(node, gm)}({_args(node)})"
        if len(what) > width:
            what = what[:width - 1] + "…"
        kind = node_kind(node)
        rows.append((node.name, what, _shape(node), "" if lay is None else str(lay), "input" if kind == "io" else kind))
        cls = node.meta.get("ratebp.class")
        if cls is not None and cls.kind == "approximate":
            where = user_frame(node.stack_trace) or node.meta.get("ratebp.source") or ""
            notes.append(f"  {node.name}: {cls.reason}" + (f"  [{where}]" if where else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if notes:
        lines += ["", "approximated (the rate pass applies these to firing rates):"] + notes
    return "\n".join(lines)


def _graph(gm) -> fx.GraphModule:
    """A program's submodule may be wrapped for compilation; the graph is inside."""
    return getattr(gm, "graph_module", gm)


def memory_summary(compiled: Program) -> str:
    """Bytes autograd keeps for backward: the rate pass vs BPTT on the same inputs (estimated on fake
    tensors: the rate graph, and the captured graph with its neurons as the fused BPTT op)."""
    cached = getattr(compiled, "_memory_summary", None)
    if cached is not None:
        return cached
    from .memory import saved_bytes_on_fake
    from .passes import fuse_lif
    from .passes.infra import snapshot

    program = compiled.step
    source = compiled.source
    if source is None:
        text = "(method='bptt': the program is BPTT itself)"
    else:
        rate = _graph(program.rate)
        rate_inputs = [n.meta["val"] for n in rate.graph.nodes if n.op == "placeholder"]
        bptt = fuse_lif(snapshot(source)).gm
        bptt_inputs = [n.meta["val"] for n in source.graph.nodes if n.op == "placeholder"]
        rate_bytes, bptt_bytes = saved_bytes_on_fake(rate, rate_inputs), saved_bytes_on_fake(bptt, bptt_inputs)
        T = program.meta.get("ratebp.T")
        streamed = any(isinstance(m, StreamStage) for m in _graph(program.spike).modules())
        transient = ("one layer's tensors for one chunk of time, plus 1-byte spikes of all T steps"
                     if streamed else "one layer's [T·B, ...] tensors")
        text = (f"kept for backward, parameters excluded (T = {T}):\n"
                f"  rate-based: {rate_bytes / MiB:9.2f} MiB   (independent of T)\n"
                f"  BPTT:       {bptt_bytes / MiB:9.2f} MiB   ({bptt_bytes / max(rate_bytes, 1):.1f}× the rate-based step)\n"
                f"The spike pass keeps nothing for backward; its transient peak is {transient}.")
    if CPU_MEMORY in program.meta:
        text += f"\nCPU: {program.meta[CPU_MEMORY]}."
    compiled._memory_summary = text
    return text


def spike_table(program) -> str:
    """The spike graph; when it is streamed, each stage's ops (run on one chunk of time at a time)."""
    spike = _graph(program.spike)
    lines = [graph_table(spike), "", f"time: {program.meta.get(STREAMED, 'all T steps at once')}"]
    for name, stage in spike.named_children():
        if isinstance(stage, StreamStage):
            lines.append(f"  {name}: {stage.description}")
    return "\n".join(lines)


def _stages(compiled: Program) -> Dict[str, Callable[[], str]]:
    program = compiled.step
    source = compiled.source
    by_name = {r.name: r for r in compiled.history}
    bptt = "(method='bptt': there is no spike/rate split)"
    return {
        "captured": lambda: by_name["capture"].code.strip(),
        "annotated": lambda: graph_table(source) if source is not None else "(method='bptt': not annotated)",
        "spike": lambda: spike_table(program) if hasattr(program, "spike") else bptt,
        "rate": lambda: graph_table(_graph(program.rate)) if hasattr(program, "rate") else bptt,
        "program": lambda: graph_table(program),
        "memory": lambda: memory_summary(compiled),
        "history": lambda: "\n".join(f"{r.name:<22} modified={str(r.modified):<5} {r.seconds * 1e3:8.1f} ms"
                                     for r in compiled.history),
    }


def _summary(compiled: Program) -> str:
    source = compiled.source or compiled.step
    neurons = [n for n in source.graph.nodes if node_kind(n) == "neuron"]
    approximated = [n for n in source.graph.nodes if node_kind(n) == "approximate"]
    model = source.meta.get("ratebp.model", "model")
    if compiled.source is None:
        return f"{model}: BPTT training step, {len(neurons)} neurons"
    return (f"{model}: rate-based training step, T = {source.meta.get('ratebp.T')}, {len(neurons)} neurons, "
            f"{len(approximated)} approximated ops")


_TITLES = {"captured": "captured forward", "annotated": "captured graph, annotated",
           "spike": "spike graph: the exact forward, no autograd", "rate": "rate graph: length 1 in time, with autograd",
           "program": "the training step's graph", "memory": "memory", "history": "passes"}


def show(obj, stage: Optional[str] = None, format: str = "text") -> str:
    """What the compiler made of a transformed or compiled model (see the module docstring)."""
    compiled = _resolve(obj)
    stages = _stages(compiled)
    by_name = {r.name: r for r in compiled.history}
    if stage is not None and stage not in stages and stage not in by_name:
        raise RateBPError(f"unknown stage {stage!r}; expected one of {sorted(set(stages) | set(by_name))}")
    if format in ("dot", "svg"):
        program = compiled.step
        graphs = {"annotated": compiled.source or program, "program": program,
                  "captured": by_name["capture"].graph}
        if hasattr(program, "spike"):
            graphs.update(spike=_graph(program.spike), rate=_graph(program.rate))
        graphs.update({r.name: r.graph for r in compiled.history})
        key = stage or "annotated"
        if key not in graphs:
            raise RateBPError(f"stage {key!r} has no graph to draw; drawable: {sorted(graphs)}")
        dot = to_dot(graphs[key], f"{_summary(compiled)} — {_TITLES.get(key, key)}")
        return dot if format == "dot" else to_svg(dot)
    if format != "text":
        raise RateBPError(f"format must be 'text', 'dot' or 'svg', got {format!r}")
    if stage is not None:
        if stage in stages:
            return _header(_TITLES[stage]) + "\n" + stages[stage]() + "\n"
        return _header(f"after {stage}") + "\n" + by_name[stage].code.strip() + "\n"
    names = ("annotated", "spike", "rate", "memory", "history") if compiled.spike is not None \
        else ("program", "history")
    parts = [_summary(compiled)]
    for name in names:
        parts += [_header(_TITLES[name]), stages[name]()]
    return "\n".join(parts) + "\n"

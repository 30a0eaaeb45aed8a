"""Graphs as Graphviz DOT (plain text, always available) and SVG (through Graphviz's ``dot`` program).

One DOT node per graph node, labelled with its name, op, shape and time layout and coloured by its
class: neurons orange, approximated ops red, time-spanning BatchNorms purple, refused ops dark red,
static ops and shape arithmetic grey and small. Nodes are grouped into boxes by the module whose
``forward`` produced them (a ResNet's blocks, say), so that a deep network reads block by block.
"""
from __future__ import annotations

import html
import shutil
import subprocess
from typing import Dict, List, Optional

import torch
import torch.fx as fx

from .errors import RateBPError, user_frame
from .graph_ops import rate_batch_norm, rate_neuron, spike_batch_norm
from .nn.neuron import Neuron, _Cell
from .nn.spec import NeuronSpec
from .stream import StreamStage

__all__ = ["to_dot", "to_svg", "node_kind", "op_label"]

# fill colour, font colour, pen width per node kind
_STYLE = {
    "neuron": ("#f4a261", "black", 2.0),
    "approximate": ("#e63946", "white", 2.0),
    "batchnorm": ("#b8a1d9", "black", 1.0),
    "refused": ("#6a040f", "white", 2.0),
    "exact": ("#ffffff", "black", 1.0),
    "static": ("#e9ecef", "#495057", 0.5),
    "state": ("#e9ecef", "#495057", 0.5),
    "hook": ("#ffe8a3", "black", 1.0),
    "io": ("#a8dadc", "black", 1.5),
    "": ("#ffffff", "black", 1.0),
}


def node_kind(node: fx.Node) -> str:
    """neuron / batchnorm / exact / approximate / refused / static / state / hook / io, or "" if unknown."""
    if node.op in ("placeholder", "output"):
        return "io"
    if isinstance(node.target, NeuronSpec) or node.target is rate_neuron or \
            (node.op == "call_module" and "ratebp.neuron" in node.meta):          # a streamed neuron's stage
        return "neuron"
    if node.target in (spike_batch_norm, rate_batch_norm):
        return "batchnorm"
    cls = node.meta.get("ratebp.class")
    if cls is not None:
        return cls.kind
    if node.op == "get_attr":
        return "static"
    return ""


def op_label(node: fx.Node, gm: Optional[fx.GraphModule] = None) -> str:
    """A short description of what ``node`` computes."""
    if isinstance(node.target, NeuronSpec):
        return node.target.label()
    if node.op == "call_module":
        module = gm.get_submodule(node.target) if gm is not None else None
        if isinstance(module, StreamStage):
            what = "stored" if module.neuron is None else module.neuron.label()
            return f"stream[{what}, {len(module.bounds)} chunks]"
        return f"{type(module).__name__}" if module is not None else str(node.target)
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "get_attr":
        return f"self.{node.target}"
    return node.op


def _shape(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return "×".join(map(str, val.shape)) or "scalar"
    return ""


_CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")


def _is_leaf(cls) -> bool:
    """A layer or neuron called as a whole (not a container whose forward holds other nodes)."""
    module = getattr(cls, "__module__", "") if isinstance(cls, type) else str(cls)
    name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
    if isinstance(cls, type) and issubclass(cls, (Neuron, _Cell)):
        return True
    return module.startswith("torch.nn") and name not in _CONTAINERS


def _cluster(node: fx.Node) -> str:
    """The module whose forward created ``node`` (for a layer or neuron call, the module calling it)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    while stack and _is_leaf(stack[-1][1]):
        stack = stack[:-1]
    return str(stack[-1][0]) if stack else ""


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


_LEGEND = (("neuron", "neuron"), ("batchnorm", "BatchNorm over time·batch"), ("exact", "exact"),
           ("approximate", "approximated"), ("refused", "refused"), ("static", "static / shapes"),
           ("hook", "the user's forward hooks"), ("io", "input / output"))


def _legend(title: str) -> str:
    """The title and a colour key, as a Graphviz HTML label (not nodes)."""
    cells = "".join(f'<TD BGCOLOR="{_STYLE[k][0]}"><FONT COLOR="{_STYLE[k][1]}" POINT-SIZE="10">{_escape(text)}</FONT>'
                    f"</TD>" for k, text in _LEGEND)
    return (f'<TABLE BORDER="0" CELLSPACING="4"><TR><TD COLSPAN="{len(_LEGEND)}">{_escape(title)}</TD></TR>'
            f"<TR>{cells}</TR></TABLE>")


def to_dot(gm: fx.GraphModule, title: str = "") -> str:
    """The DOT source of ``gm``'s graph (see the module docstring)."""
    nodes: List[fx.Node] = list(gm.graph.nodes)
    ids = {n: f"n{i}" for i, n in enumerate(nodes)}
    clusters: Dict[str, List[fx.Node]] = {}
    for n in nodes:
        clusters.setdefault(_cluster(n), []).append(n)
    lines = ["digraph ratebp {",
             f'  graph [rankdir=TB, fontname="Helvetica", fontsize=14, labelloc=t, label=<{_legend(title)}>, '
             'nodesep=0.15, ranksep=0.25, newrank=true];',
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, margin="0.08,0.03"];',
             '  edge [arrowsize=0.5, color="#6c757d"];']

    def node_line(n: fx.Node) -> str:
        kind = node_kind(n)
        fill, font, pen = _STYLE.get(kind, _STYLE[""])
        shape, lay = _shape(n), n.meta.get("ratebp.time")
        detail = " ".join(x for x in (shape, "" if lay is None else str(lay)) if x)
        small = kind in ("static", "state") and not detail
        label = f"{n.name}\\n{op_label(n, gm)}" + (f"\\n{detail}" if detail else "")
        cls = n.meta.get("ratebp.class")
        tooltip = " | ".join(x for x in (kind, str(cls) if cls is not None else "", user_frame(n.stack_trace) or "")
                             if x)
        size = ", fontsize=7, height=0.2" if small else ""
        return (f'  {ids[n]} [label="{_escape(label)}", fillcolor="{fill}", fontcolor="{font}", penwidth={pen}, '
                f'tooltip="{_escape(tooltip)}"{size}];')

    for i, (path, members) in enumerate(clusters.items()):
        if path:
            lines.append(f'  subgraph cluster_{i} {{ label="{_escape(path)}"; style="rounded,dashed"; '
                         'color="#adb5bd"; fontsize=11;')
            lines += ["  " + node_line(n) for n in members]
            lines.append("  }")
        else:
            lines += [node_line(n) for n in members]
    for n in nodes:
        for inp in n.all_input_nodes:
            lines.append(f"  {ids[inp]} -> {ids[n]};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_svg(dot_source: str) -> str:
    """Render DOT source to SVG with Graphviz's ``dot`` program."""
    dot = shutil.which("dot")
    if dot is None:
        raise RateBPError("format='svg' needs Graphviz's `dot` program on PATH (apt install graphviz, "
                          "brew install graphviz or conda install graphviz); format='dot' needs nothing")
    result = subprocess.run([dot, "-Tsvg"], input=dot_source, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RateBPError(f"Graphviz failed: {result.stderr.strip()[:500]}")
    return result.stdout

"""The pass contract, the pipeline runner and helpers shared by the passes.

A pass is ``def <verb>_<object>(gm: GraphModule) -> PassResult``. The runner calls the passes of a
pipeline in order, checks the graph after each (``gm.graph.lint()`` plus the pass's own
``postcondition`` if it declares one), and records a :class:`PassRecord` per pass — name, whether it
modified the graph, wall time and the graph's code afterwards — which ``ratebp_compile.show`` prints.

Metadata keys written by the passes (all start with ``ratebp.``):
    ratebp.neuron   NeuronSpec of a neuron node (normalize_neurons)
    ratebp.time     time layout of the node's value (infer_time_layout)
    ratebp.class    OpClass of the node (classify_ops)
    ratebp.pass     the pass that created the node
    ratebp.source   the user's source line of the node it replaces
Graph-level facts live in ``gm.meta``: ``ratebp.T``, ``ratebp.input_layouts``.
"""
from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
import torch.fx as fx

from ..errors import RateBPError, describe_node, user_frame

__all__ = ["PassResult", "PassRecord", "run_pipeline", "copy_meta", "constant_value", "PassFn", "at_node"]

log = logging.getLogger(__name__)

DUMP_ENV = "RATEBP_DUMP_GRAPHS"   # set to a directory: every stage's code is written there


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    graph: fx.GraphModule = field(repr=False)

    @property
    def code(self) -> str:
        return self.graph.code


PassFn = Callable[[fx.GraphModule], PassResult]


def constant_value(gm: fx.GraphModule, value):
    """The real value of a constant node argument: a ``get_attr`` node's attribute of ``gm`` (a tensor the
    traced code created), anything else as it is (None, numbers, nodes computed in the graph)."""
    if isinstance(value, fx.Node) and value.op == "get_attr":
        obj = gm
        for part in value.target.split("."):
            obj = getattr(obj, part)
        return obj
    return value


def copy_meta(new: fx.Node, old: fx.Node, pass_name: str, val=None) -> fx.Node:
    """Give a node a pass created the ``stack_trace`` of the node it replaces, ``ratebp.pass``,
    ``ratebp.source`` and ``val`` (its value during shape propagation) when known."""
    new.stack_trace = old.stack_trace
    if "nn_module_stack" in old.meta:
        new.meta["nn_module_stack"] = old.meta["nn_module_stack"]
    new.meta["ratebp.pass"] = pass_name
    source = user_frame(old.stack_trace) or old.meta.get("ratebp.source")
    if source:
        new.meta["ratebp.source"] = source
    if val is not None:
        new.meta["val"] = val
    return new


def run_pipeline(gm: fx.GraphModule, pipeline: Sequence[PassFn], history: Optional[List[PassRecord]] = None
                 ) -> fx.GraphModule:
    """Run ``pipeline`` on ``gm``; append one :class:`PassRecord` per pass to ``history``. A pass that fails
    with anything but a :class:`RateBPError` (a bug: an invariant it relied on did not hold) raises one that
    names the pass — and the node, where the pass said which it was working on (:func:`at_node`)."""
    dump_dir = os.environ.get(DUMP_ENV)
    for pass_fn in pipeline:
        name = pass_fn.__name__
        start = time.perf_counter()
        try:
            result = pass_fn(gm)
        except RateBPError:
            raise
        except Exception as e:
            raise RateBPError(f"internal error in pass {name}: {type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {name} returned {type(result).__name__}, not PassResult")
        gm = result.gm
        try:
            gm.graph.lint()
        except Exception as e:
            raise RateBPError(f"internal error: pass {name} left an invalid graph: {e}") from e
        post = getattr(pass_fn, "postcondition", None)
        if post is not None:
            post(gm)
        log.debug("pass %s: modified=%s in %.1f ms", name, result.modified, seconds * 1e3)
        if history is not None:
            history.append(PassRecord(name, result.modified, seconds, snapshot(gm)))
        if dump_dir:
            os.makedirs(dump_dir, exist_ok=True)
            index = len(history) if history is not None else 0
            with open(os.path.join(dump_dir, f"{index:02d}_{name}.py"), "w") as f:
                f.write(gm.code)
    return gm


@contextmanager
def at_node(pass_name: str, node: fx.Node, gm: Optional[fx.GraphModule] = None):
    """Wrap a pass's work on one node: an unexpected exception becomes a :class:`RateBPError` naming the
    pass, the node and the user's source line (a :class:`RateBPError` passes through)."""
    try:
        yield
    except RateBPError:
        raise
    except Exception as e:
        raise RateBPError(f"internal error in pass {pass_name} at {describe_node(node, gm)}: "
                          f"{type(e).__name__}: {e}") from e


def postcondition(check: Callable[[fx.GraphModule], None]):
    """Attach ``check(gm)`` to a pass; the runner calls it after the pass."""

    def attach(pass_fn):
        pass_fn.postcondition = check
        return pass_fn

    return attach


def require(condition: bool, pass_name: str, node: Optional[fx.Node], message: str, gm=None) -> None:
    """Raise an internal-invariant error naming the pass and node when ``condition`` is false."""
    if not condition:
        where = f" at {describe_node(node, gm)}" if node is not None else ""
        raise RateBPError(f"internal error after pass {pass_name}{where}: {message}")


def check_values(gm: fx.GraphModule, pass_name: str) -> None:
    """Every node that computes a value carries ``meta["val"]`` (the output node and references
    to submodules do not)."""
    for node in gm.graph.nodes:
        if node.op == "output" or (node.op == "get_attr" and
                                   isinstance(getattr_path(gm, node.target), torch.nn.Module)):
            continue
        require("val" in node.meta, pass_name, node, "no meta['val']", gm)


def identifier(path: str) -> str:
    """A module path or node name as a Python identifier (``layers.0.sn`` → ``layers_0_sn``)."""
    return re.sub(r"\W", "_", path)


def unique_name(name: str, taken) -> str:
    """``name``, or ``name_1``, ``name_2``, ... — the first not in ``taken``."""
    candidate, i = name, 0
    while candidate in taken:
        i += 1
        candidate = f"{name}_{i}"
    return candidate


def getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm``'s graph (sharing its modules and parameters) that later passes cannot change."""
    graph = fx.Graph()
    env = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    copy = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copy.meta.update(gm.meta)
    return copy


def tensor_val(node) -> Optional[torch.Tensor]:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def input_device(gm: fx.GraphModule) -> torch.device:
    """The device of the graph's first tensor input (CPU if it has none)."""
    return next((tensor_val(n).device for n in gm.graph.nodes
                 if n.op == "placeholder" and tensor_val(n) is not None), torch.device("cpu"))

"""stream_time: run the spike pass over chunks of time, so that its memory stops growing with T."""
from __future__ import annotations

import logging
import operator
import warnings
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx

from ..capture import propagate_shapes
from ..errors import describe_node
from ..graph_ops import chunk_batch_norm, chunk_batch_norm_, spike_batch_norm, spike_batch_norm_per_step
from ..memory import budget_on_device, format_bytes, graph_peak_bytes
from ..nn.spec import NeuronSpec, StateTrace
from ..oprules import APPROXIMATE, is_view, op_info
from ..oprules.table import is_inplace_method
from ..stream import StageInput, StreamStage, chunk_bounds
from ..time_layout import TimeLayout, is_temporal, rate_shape
from .infra import (PassResult, check_values, copy_meta, getattr_path, identifier, input_device, postcondition,
                    require, tensor_val, unique_name)
from .retime import is_constant, retimed_shape_op, retimed_value, retimes

__all__ = ["stream_time", "estimate_peak_bytes", "kept_bytes", "reuse_dead_inputs", "TIME_CHUNK", "MEMORY_BUDGET", "STREAMED"]

log = logging.getLogger(__name__)

PASS = "stream_time"
TIME_CHUNK = "ratebp.time_chunk"     # program.meta: steps per chunk, whatever the memory; None: by the budget
MEMORY_BUDGET = "ratebp.memory_budget"   # program.meta: the spike pass's budget (bytes or a fraction); None: none
STREAMED = "ratebp.streamed"         # program.meta: how the spike pass runs, in one line (for show)



KEPT = "kept_"       # placeholder prefix of a chunk graph input the stage computed itself and nothing else reads


class _CannotStream(Exception):
    """The spike graph has something the streamed form does not handle; it then runs unstreamed."""


def _neuron(node: fx.Node) -> Optional[NeuronSpec]:
    return node.target if node.op == "call_function" and isinstance(node.target, NeuronSpec) else None


def _batchnorm(node: fx.Node) -> Optional[str]:
    """"batch" for a BatchNorm with statistics over time and batch, "step" for one per step, else None."""
    if node.op != "call_function":
        return None
    return {spike_batch_norm: "batch", spike_batch_norm_per_step: "step"}.get(node.target)


def _group(bn: fx.Node) -> Optional[str]:
    """The process group a spike-pass BatchNorm synchronises over (``graph_ops.spike_batch_norm``'s last
    argument), or None."""
    index = 4 if _batchnorm(bn) == "batch" else 5
    return bn.args[index] if len(bn.args) > index else None


def _is_getitem_of(node: fx.Node, pred) -> bool:
    return node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
        and pred(node.args[0])


class _Planner:
    """Which nodes of the spike graph are computed per chunk inside a stage ("stream"), which are
    stored whole for all T steps, and the stage (sink) that computes each stored value."""

    def __init__(self, spike: fx.GraphModule):
        self.spike = spike
        self.nodes = list(spike.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.kind: Dict[fx.Node, str] = {}
        for node in self.nodes:
            self.kind[node] = self._kind(node)
        self.whole: Set[fx.Node] = set()      # stream nodes computed by a stage of their own
        self.cones: Dict[fx.Node, List[fx.Node]] = {}

    def _kind(self, node: fx.Node) -> str:
        if node.op in ("placeholder", "get_attr", "output"):
            return node.op
        if _neuron(node):
            return "neuron"
        if _is_getitem_of(node, _neuron):
            return "neuron_out"
        temporal = is_temporal(node.meta.get("ratebp.time"))
        if _batchnorm(node) and is_temporal(node.args[0].meta.get("ratebp.time")):
            return "stream"
        if _is_getitem_of(node, _batchnorm) and is_temporal(node.args[0].args[0].meta.get("ratebp.time")):
            return "stream" if node.args[1] == 0 else "bn_stat"
        return "stream" if temporal else "static"      # a BatchNorm of a static tensor included

    def _free(self, node: fx.Node) -> bool:
        """A view: recomputed rather than stored."""
        return is_view(node, self.spike)

    def _random(self, node: fx.Node) -> bool:
        info = op_info(node, self.spike)
        cls = node.meta.get("ratebp.class")
        return info is not None and info.family in ("dropout", "like") and cls is not None and \
            cls.kind == APPROXIMATE

    def _store_whole(self, node: fx.Node, why: str) -> None:
        if not isinstance(tensor_val(node), torch.Tensor):
            raise _CannotStream(f"{describe_node(node, self.spike)} returns several values and {why}")
        self.whole.add(node)

    def sinks(self) -> List[fx.Node]:
        return sorted([n for n in self.nodes if self.kind[n] == "neuron"] + list(self.whole), key=self.order.get)

    def cone(self, sink: fx.Node) -> List[fx.Node]:
        """The stream nodes a stage computes per chunk to produce ``sink``, in graph order."""
        start = sink.args[0] if self.kind[sink] == "neuron" else sink
        seen, stack = set(), [start]
        while stack:
            n = stack.pop()
            if n in seen or self.kind.get(n) != "stream" or (n in self.whole and n is not sink):
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        return sorted(seen, key=self.order.get)

    def plan(self) -> None:
        for node in self.nodes:
            kind = self.kind[node]
            if kind == "neuron" and not isinstance(node.args[0].meta.get("ratebp.time"), TimeLayout):
                raise _CannotStream(f"{describe_node(node, self.spike)} has an input without a time axis")
            if kind == "bn_stat" and any(u.op != "output" for u in node.users):
                raise _CannotStream(f"the statistics of {describe_node(node.args[0], self.spike)} are used in the model")
            if kind in ("static", "output"):
                for a in node.all_input_nodes:
                    if self.kind[a] == "stream":
                        self._store_whole(a, "its value is needed for all steps at once")
            if kind == "stream" and self._random(node):
                self._store_whole(node, "draws random values")
            if kind == "stream" and isinstance(node.target, StateTrace):
                raise _CannotStream(f"the model reads the state of {node.target.where} at every step, which "
                                    f"chunks of time would restart from rest")
        while True:       # a value two stages would compute is computed once and stored
            self.cones = {s: self.cone(s) for s in self.sinks()}
            owner: Dict[fx.Node, fx.Node] = {}
            shared = set()
            for sink, cone in self.cones.items():
                for n in cone:
                    if n in owner and not self._free(n):
                        shared.add(n)
                    owner.setdefault(n, sink)
            if not shared:
                break
            last = max(shared, key=self.order.get)       # the others may stop being shared once it is stored
            if _batchnorm(last):
                self._store_whole(next(u for u in last.users if u.args[1] == 0), "")
            else:
                self._store_whole(last, "is used by several neurons")
        for node in self.nodes:
            unused = not any(node in cone for cone in self.cones.values())
            if _batchnorm(node) and self.kind[node] == "stream" and unused:
                raise _CannotStream(f"the output of {describe_node(node, self.spike)} is not used")
        for cone in self.cones.values():
            for node in cone:
                if is_inplace_method(node):
                    target = node.args[0]
                    while target in cone and self._free(target):
                        target = target.args[0]
                    if target not in cone:
                        raise _CannotStream(f"{describe_node(node, self.spike)} updates in place a tensor "
                                            f"computed elsewhere")


class _StageBuilder:
    """The chunk graphs and the ``StreamStage`` of one sink."""

    def __init__(self, spike: fx.GraphModule, planner: _Planner, sink: fx.Node, T: int,
                 bounds, stored_dtype: Dict[fx.Node, torch.dtype], keep: bool = False):
        self.spike, self.planner, self.sink, self.T = spike, planner, sink, T
        self.keep = keep
        self.bounds = bounds
        self.cone = planner.cones[sink]
        self.in_cone = set(self.cone)
        self.neuron = _neuron(sink)
        self.batchnorms = [n for n in self.cone if _batchnorm(n)]
        self.batch_bns = [n for n in self.batchnorms if _batchnorm(n) == "batch"]
        start = sink.args[0] if self.neuron else sink
        self.value_node = start
        leaves: List[fx.Node] = []
        for n in (self.cone or [start]):
            for a in (n.all_input_nodes if n in self.in_cone else [n]):
                if a not in self.in_cone and a not in leaves and a.op != "get_attr" and \
                        not is_constant(a.meta.get("val")):
                    leaves.append(a)
        self.leaves = leaves
        self.stored_dtype = stored_dtype

    def stage_inputs(self) -> List[StageInput]:
        return [StageInput(leaf.name, lay if isinstance(lay, TimeLayout) else None)
                for leaf in self.leaves for lay in [leaf.meta.get("ratebp.time")]]

    def _needed(self, targets: Sequence[fx.Node], given: Set[fx.Node] = frozenset()) -> List[fx.Node]:
        seen, stack = set(), list(targets)
        while stack:
            n = stack.pop()
            if n in seen or n not in self.in_cone or n in given:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        return sorted(seen, key=self.planner.order.get)

    def chunk_graph(self, targets: Sequence[fx.Node], known: Sequence[fx.Node], n: int,
                    per_step_stats: bool, kept: Sequence[fx.Node] = ()) -> fx.GraphModule:
        """A graph computing ``targets`` on a chunk of ``n`` steps from the stage inputs and the statistics
        of the batch-statistic BatchNorms ``known`` — and, for the BatchNorms ``kept``, their inputs on
        this chunk, computed already by the statistics pass."""
        g = fx.Graph()
        env: Dict[fx.Node, object] = {}
        stored: Dict[fx.Node, fx.Node] = {}       # 1-byte spikes: cast to the compute dtype where first read
        for leaf in self.leaves:
            if leaf in self.stored_dtype:
                stored[leaf] = g.placeholder(leaf.name)
            else:
                env[leaf] = g.placeholder(leaf.name)
        stats = {}
        for bn in known:
            stats[bn] = (g.placeholder(f"mean_{bn.name}"), g.placeholder(f"var_{bn.name}"))
        for bn in kept:         # left over from the statistics pass: the stage's own only if computed there
            owned = bn.args[0] in self.in_cone and _fresh(bn.args[0], self.spike)
            env[bn.args[0]] = g.placeholder(f"{KEPT if owned else 'input_'}{bn.name}")

        def mapped(a: fx.Node):
            if a in env:
                return env[a]
            if a in stored:
                env[a] = g.call_method("to", (stored[a], tensor_val(a).dtype))
                return env[a]
            if a.op == "get_attr":
                env[a] = g.get_attr(a.target)
                return env[a]
            val = a.meta.get("val")
            if is_constant(val):
                return val
            raise _CannotStream(f"internal: {a.name} is not available in the stage of {self.sink.name}")

        copies: Dict[fx.Node, fx.Node] = {}
        for node in self._needed(targets, {bn.args[0] for bn in kept}):
            bn = _batchnorm(node)
            if bn == "batch":
                x, w, b, eps = node.args[:4]        # a group's statistics are global already (pass 1)
                new = g.call_function(chunk_batch_norm, (mapped(x), *(mapped(v) if isinstance(v, fx.Node) else v
                                                                      for v in (w, b)), *stats[node], eps))
            elif bn == "step":
                x, w, b, eps, _, *group = node.args
                new = g.call_function(spike_batch_norm_per_step, (mapped(x), *(mapped(v) if isinstance(v, fx.Node)
                                                                                else v for v in (w, b)), eps, n, *group))
            elif _is_getitem_of(node, lambda s: _batchnorm(s) == "batch"):
                env[node] = env[node.args[0]]
                continue
            else:
                info = op_info(node, self.spike) if node.op != "get_attr" else None
                if retimes(node, info):
                    method, args = retimed_shape_op(node, info, mapped(node.args[0]), self.T, n)
                    new = g.call_method(method, args)
                else:
                    new = g.node_copy(node, mapped)
            copy_meta(new, node, PASS)
            new.meta["ratebp.time"] = node.meta.get("ratebp.time")
            env[node] = copies[node] = new
        outputs = [mapped(t) for t in targets]
        if per_step_stats:
            for bn in self.batchnorms:
                if _batchnorm(bn) == "step":
                    outputs += [g.call_function(operator.getitem, (env[bn], i)) for i in (1, 2)]
        g.output(tuple(outputs))
        gm = fx.GraphModule(self.spike, g, class_name="Chunk")
        self._check_shapes(gm, copies, known, n, kept)
        reuse_dead_inputs(gm.graph, self.spike)
        gm.recompile()
        return gm

    def _check_shapes(self, gm: fx.GraphModule, copies: Dict[fx.Node, fx.Node], known, n: int, kept) -> None:
        """Shape-propagate a chunk graph and check that every temporal value has n of the T steps."""
        args = [retimed_value(leaf, self.T, n, self.stored_dtype.get(leaf)) for leaf in self.leaves]
        for bn in known:
            bn_stat = [u for u in bn.users if u.args[1] in (1, 2)]
            mean = next(u for u in bn_stat if u.args[1] == 1).meta["val"]
            args += [mean, mean]
        args += [retimed_value(bn.args[0], self.T, n) for bn in kept]
        try:
            propagate_shapes(gm, args)
        except Exception as e:       # an op whose arguments hold T in a way retiming does not rewrite
            raise _CannotStream(f"an op fails on a chunk of {n} steps ({type(e).__name__}: {e})") from None
        for old, new in copies.items():
            lay, val, got = old.meta.get("ratebp.time"), tensor_val(old), tensor_val(new)
            if isinstance(lay, TimeLayout) and val is not None and got is not None and \
                    tuple(got.shape) != rate_shape(val.shape, lay, self.T, n):
                raise _CannotStream(f"{describe_node(old, self.spike)} gives shape {tuple(got.shape)} on a chunk of "
                                    f"{n} steps; expected {rate_shape(val.shape, lay, self.T, n)}")

    def build(self) -> StreamStage:
        lengths = sorted({length for _, length in self.bounds})
        value_graphs, stats_graphs, first_graphs = {}, {}, {}
        valued = self.bounds
        keep = self.keep and bool(self.batch_bns)
        if self.batch_bns:          # the first chunk's BatchNorm inputs are left over from the statistics pass
            for n in (lengths if keep else [self.bounds[0][1]]):         # or every chunk's, kept
                first_graphs[str(n)] = self.chunk_graph([self.value_node], self.batch_bns, n, per_step_stats=True,
                                                        kept=self.batch_bns)
            valued = [] if keep else self.bounds[1:]
        for n in sorted({length for _, length in valued}):
            value_graphs[str(n)] = self.chunk_graph([self.value_node], self.batch_bns, n, per_step_stats=True)
        for n in lengths:
            for j, bn in enumerate(self.batchnorms):
                if _batchnorm(bn) == "batch":
                    known = self.batch_bns[:self.batch_bns.index(bn)]
                    stats_graphs[f"{j}_{n}"] = self.chunk_graph([bn.args[0]], known, n, per_step_stats=False)
        value = self.value_node
        val = tensor_val(value)
        return StreamStage(
            self.T, self.bounds, self.stage_inputs(), self.neuron, tuple(val.shape), value.meta["ratebp.time"],
            val.dtype, [bn.name for bn in self.batchnorms], [_batchnorm(bn) == "step" for bn in self.batchnorms],
            value_graphs, stats_graphs, first_graphs, self.describe(), [_group(bn) for bn in self.batchnorms], keep)

    def describe(self) -> str:
        passes = len(self.batch_bns) + 1
        ops = ", ".join(n.name for n in self.cone if not _is_getitem_of(n, _batchnorm)) or self.value_node.name
        what = f"neuron {self.sink.name}" if self.neuron else f"{self.sink.name} stored whole"
        kept = ", BatchNorm inputs kept" if self.keep and self.batch_bns else ""
        return f"{what}: {ops}; {len(self.bounds)} chunks, {passes} pass{'es' if passes > 1 else ''}{kept}"


_FRESH_FAMILIES = ("batch_first", "feature_last", "batchnorm", "binary", "mul", "div", "matmul")
_IN_PLACE = {operator.add: "add_", torch.add: "add_", "add": "add_", operator.sub: "sub_", torch.sub: "sub_",
             "sub": "sub_", operator.mul: "mul_", torch.mul: "mul_", "mul": "mul_"}
_COMMUTATIVE = ("add_", "mul_")


def _fresh(n, spike: fx.GraphModule) -> bool:
    """Whether ``n`` (a node of a chunk graph, or of the spike graph computed in one) returns a tensor of
    its own rather than a view of, or an update to, a tensor it was given: only such a tensor may be
    overwritten. A stage input never is (it may be the caller's tensor, or a value other stages read)."""
    if not isinstance(n, fx.Node):
        return False
    if n.op == "placeholder":
        return n.target.startswith(KEPT)
    if n.target in (chunk_batch_norm, chunk_batch_norm_) or _batchnorm(n) == "batch" or \
            _is_getitem_of(n, lambda s: _batchnorm(s) == "batch"):
        return True
    info = op_info(n, spike) if n.op in ("call_function", "call_method", "call_module") else None
    if info is None or info.family not in _FRESH_FAMILIES or is_inplace_method(n):
        return False
    return n.op == "call_module" or info.name not in ("pad", "interpolate", "upsample")


def reuse_dead_inputs(g: fx.Graph, spike: fx.GraphModule) -> None:
    """Run the BatchNorms of a chunk graph (or of the spike graph) and its adds, subtractions and products
    in place on an input that the graph computed itself and reads nowhere else, so that it needs fewer
    buffers at once."""
    def dead_after(n, user) -> bool:
        return _fresh(n, spike) and len(n.users) == 1 and user in n.users

    for node in list(g.nodes):
        if node.target is chunk_batch_norm and dead_after(node.args[0], node):
            node.target = chunk_batch_norm_
            continue
        method = _IN_PLACE.get(node.target) if node.op in ("call_function", "call_method") else None
        if method is None or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        out = tensor_val(node)
        for first, second in ((a, b), (b, a)) if method in _COMMUTATIVE else ((a, b),):
            val = tensor_val(first) if isinstance(first, fx.Node) else None
            if out is not None and val is not None and dead_after(first, node) and \
                    val.shape == out.shape and val.dtype == out.dtype:
                node.op, node.target, node.args = "call_method", method, (first, second)
                break


def _build(spike: fx.GraphModule, T: int, chunk: int, keep: bool = False) -> fx.GraphModule:
    planner = _Planner(spike)
    planner.plan()
    bounds = chunk_bounds(T, chunk)
    stored_dtype: Dict[fx.Node, torch.dtype] = {}
    for node in planner.nodes:
        if planner.kind[node] == "neuron_out" and node.args[1] == 0 and _neuron(node.args[0]).binary:
            stored_dtype[node] = torch.uint8
    g = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    root: Dict[str, object] = {}
    whole: Dict[fx.Node, fx.Node] = {}      # stored 1-byte spikes cast back for a consumer outside the stages

    def outside(a: fx.Node):
        if a in stored_dtype:
            if a not in whole:
                whole[a] = g.call_method("to", (env[a], tensor_val(a).dtype))
                copy_meta(whole[a], a, PASS)
            return whole[a]
        return env[a]

    sinks = set(planner.sinks())
    for node in planner.nodes:
        kind = planner.kind[node]
        if node.op == "placeholder":
            env[node] = g.node_copy(node)
        elif node.op == "output":
            g.output(fx.map_arg(node.args[0], outside))
        elif node in sinks:
            builder = _StageBuilder(spike, planner, node, T, bounds, stored_dtype, keep)
            stage = builder.build()
            if builder.neuron:
                name = "stream_" + identifier(node.meta.get("ratebp.module") or node.name)
            else:          # a stored BatchNorm output is named after the BatchNorm
                name = "stream_" + (node.args[0].name if _is_getitem_of(node, _batchnorm) else node.name)
            name = unique_name(name, root)          # a neuron module called twice has two stages
            root[name] = stage
            params = list(node.args[1:]) if builder.neuron else []
            call = g.call_module(name, tuple(env[a] for a in builder.leaves) + tuple(env[p] for p in params))
            copy_meta(call, node, PASS)
            if builder.neuron:
                call.meta["ratebp.neuron"] = builder.neuron
            # the stage's outputs, named after the nodes they stand for
            sources: List[Optional[fx.Node]] = [None] * _n_outputs(stage)
            if builder.neuron:
                for user in node.users:                    # spikes, r, e, e_params
                    sources[user.args[1]] = user
                offset = 3 + len(builder.neuron.param_names)
            else:
                sources[0] = node
                offset = 1
            for i, bn in enumerate(builder.batchnorms):
                for user in bn.users:
                    if user.args[1] in (1, 2):
                        sources[offset + 2 * i + user.args[1] - 1] = user
            for i, source in enumerate(sources):
                item = g.create_node("call_function", operator.getitem, (call, i),
                                     name=source.name if source is not None else None)
                if source is not None:
                    env[source] = copy_meta(item, source, PASS)
        elif kind in ("stream", "neuron_out", "bn_stat"):
            continue                                       # computed inside a stage
        else:
            env[node] = g.node_copy(node, outside)
            if node.op == "get_attr":
                root[node.target] = getattr_path(spike, node.target)
    for node in list(g.nodes):
        if node.op == "get_attr" and not node.users:      # used only inside the stages
            g.erase_node(node)
            root.pop(node.target, None)
    for node in g.nodes:
        if node.op == "call_module" and node.target not in root:
            root[node.target] = spike.get_submodule(node.target)
    streamed = fx.GraphModule(root, g, class_name="StreamedSpikeGraph")
    streamed.meta.update(spike.meta)
    propagate_shapes(streamed, [n.meta.get("val") for n in planner.nodes if n.op == "placeholder"])
    return streamed


#: Per-step tensors a neuron's spike pass holds while it runs besides its outputs, in its accumulation
#: dtype: the loop state (membrane, sensitivities, sums) and one step's temporaries of the PyTorch
#: reference loop, with room to spare (the C loop and the Triton kernel need a block's worth).
_NEURON_SCRATCH_STEPS = 10


def _scratch(node: fx.Node, T: int) -> int:
    """What a node needs while it runs besides its outputs: a neuron's loop state and temporaries."""
    if _neuron(node) is None:
        return 0
    x = tensor_val(node.args[0])
    return _NEURON_SCRATCH_STEPS * (x.numel() // T) * torch.promote_types(x.dtype, torch.float32).itemsize


def estimate_peak_bytes(spike: fx.GraphModule, T: int, chunk: Optional[int] = None) -> int:
    """The peak bytes of the tensors the spike pass creates (``graph_peak_bytes`` of its values, plus the
    neurons' scratch): over all T steps at once, or — with ``chunk`` — streamed in chunks of at most that
    many steps, where a temporal value takes a chunk's share of its bytes except the values stored whole
    for all steps and the spikes, kept for all steps in 1 byte each (besides a chunk in the compute dtype).
    Computed on the unstreamed spike graph, so that choosing a chunk builds nothing.

    Streamed, the graph's order is a model of the stages' order (stage by stage, each batch-statistic
    BatchNorm's statistics made in a first pass), not a bound: the stages' measured peak came within 64
    bytes of it (ResNet-18, float32, one step at a time: one stage's statistics more than the graph holds
    at that point). So the streamed estimate counts every BatchNorm's mean and variance once more, a few
    bytes per channel (tests/passes/test_stream_time.py measures every chunk of four networks)."""
    if chunk is None or chunk >= T:
        return graph_peak_bytes(spike, lambda n: _scratch(n, T))
    planner = _Planner(spike)
    planner.plan()
    n = max(length for _, length in chunk_bounds(T, chunk))

    def resize(node: fx.Node, t: torch.Tensor) -> int:
        nbytes = t.untyped_storage().nbytes()
        neuron = _neuron(node)
        if neuron is not None:
            steps = tensor_val(node.args[0])
            if t.numel() != steps.numel():               # r, e: one step's shape
                return nbytes
            return (t.numel() if neuron.binary else 0) + -(-nbytes * n // T)
        if planner.kind.get(node) != "stream" or node in planner.whole or t.dim() < 2:
            return nbytes                                 # static, stored whole, or a BatchNorm's statistics
        return -(-nbytes * n // T)

    return graph_peak_bytes(spike, lambda node: _scratch(node, T), resize) + _statistics_bytes(spike)


def _statistics_bytes(spike: fx.GraphModule) -> int:
    """The bytes of the per-channel means and variances of the spike pass's batch-statistic BatchNorms."""
    return sum(t.untyped_storage().nbytes() for node in spike.graph.nodes if _batchnorm(node) == "batch"
               for t in node.meta["val"][1:])


def _budget(program: fx.GraphModule) -> Tuple[Optional[int], str]:
    """The spike pass's memory budget in bytes on its device, or None and why there is none (none given,
    or a fraction of a device whose memory is unknown)."""
    budget = program.meta.get(MEMORY_BUDGET)
    if budget is None:
        return None, "no memory budget"
    device = input_device(program.spike)
    nbytes = budget_on_device(budget, device)
    if nbytes is None:
        return None, f"the memory of {device} is unknown: no budget"
    return nbytes, ""


def kept_bytes(spike: fx.GraphModule) -> int:
    """What keeping the BatchNorm inputs of one stage costs, at most: all T steps of the inputs of the
    batch-statistic BatchNorms in one neuron's cone (kept, the convolutions before them run once)."""
    planner = _Planner(spike)
    planner.plan()
    return max((sum(tensor_val(n.args[0]).numel() * tensor_val(n.args[0]).element_size()
                    for n in cone if _batchnorm(n) == "batch") for cone in planner.cones.values()), default=0)


def _chunk_for_budget(spike: fx.GraphModule, T: int, budget: int) -> Tuple[Optional[int], bool, str]:
    """The chunk the budget allows (None: all T steps at once), whether the BatchNorm inputs are kept
    rather than recomputed, and why, in words: the fewest chunks whose estimated peak fits (one step at a
    time when none does), keeping the BatchNorm inputs when that fits too."""
    need = estimate_peak_bytes(spike, T)
    if need <= budget:
        return None, False, f"estimated peak {format_bytes(need)} ≤ memory budget {format_bytes(budget)}"
    lo, hi = 2, T                      # number of chunks: the estimate falls as it grows
    while lo < hi:
        count = (lo + hi) // 2
        if estimate_peak_bytes(spike, T, -(-T // count)) <= budget:
            hi = count
        else:
            lo = count + 1
    chunk = -(-T // lo)
    est = estimate_peak_bytes(spike, T, chunk)
    if est > budget:
        warnings.warn(f"ratebp_compile: the spike pass needs about {format_bytes(est)} even one step at a time, "
                      f"over the memory budget of {format_bytes(budget)}; it runs one step at a time", stacklevel=3)
    n = max(length for _, length in chunk_bounds(T, chunk))
    extra = kept_bytes(spike) * (T - n) // T          # the estimate holds one chunk's share already
    keep = 0 < extra and est + extra <= budget
    why = f"estimated peak {format_bytes(est + extra if keep else est)}, {format_bytes(need)} at once; memory " \
          f"budget {format_bytes(budget)}"
    return chunk, keep, why + ("; BatchNorm inputs kept, not recomputed" if keep else "")


def _n_outputs(stage: StreamStage) -> int:
    neuron = stage.neuron
    return 1 + (2 + len(neuron.param_names) if neuron is not None else 0) + 2 * len(stage.batchnorms)


def _check(program: fx.GraphModule) -> None:
    if not any(isinstance(m, StreamStage) for m in program.spike.modules()):
        return
    for node in program.spike.graph.nodes:
        require(not isinstance(node.target, NeuronSpec), PASS, node, "a neuron outside the stages", program.spike)
    check_values(program.spike, PASS)


@postcondition(_check)
def stream_time(program: fx.GraphModule) -> PassResult:
    """Run the spike pass over chunks of time when it would exceed its memory budget, so that only one
    chunk's activations are alive at once: the spike pass's memory stops growing with T.

    The budget (``program.meta["ratebp.memory_budget"]``: bytes, or a fraction of the device's memory) is
    checked against :func:`estimate_peak_bytes`, computed from the spike graph's values without running
    anything. Within it the spike pass runs all T steps at once, the fastest schedule; over it, in the
    fewest chunks whose estimate fits (one step at a time, with a warning, when none does), keeping each
    stage's BatchNorm inputs for all T steps rather than computing them twice when that fits too
    (:func:`kept_bytes`).
    ``program.meta["ratebp.time_chunk"]`` forces chunks of that many steps whatever the memory.

    The spike graph is cut into *stages*, one per neuron (and one per value other code needs for all
    steps at once: a model output, the input of a reduction over time). A stage runs its *cone* — the
    per-step ops feeding its neuron — chunk by chunk, feeds each chunk to the neuron's resumable scan
    and stores the spikes, 1 byte each, for the later stages. A BatchNorm with statistics over time and
    batch in a cone costs one more pass over the chunks (its input's per-channel moments first, last
    chunk to first, then normalisation with them): the ops before it run twice on every chunk but the
    first, unless the stage keeps the BatchNorm's input of every chunk from the first pass. Values two
    stages need are stored once; views are recomputed. Within the budget, with T at
    most one chunk, or for a graph the streamed form does not handle (warned), nothing changes;
    ``program.meta["ratebp.streamed"]`` says which schedule runs and why, with the estimate.

    Before (the program's spike graph, T = 16)::

        conv0 = self.conv0(flatten)
        spike_batch_norm = spike_batch_norm(conv0, bn0_weight, bn0_bias, 1e-05)
        getitem = spike_batch_norm[0]; bn_mean = spike_batch_norm[1]; bn_var = spike_batch_norm[2]
        unflatten = getitem.unflatten(0, (16, -1))
        lif_spike_pass = lif_fused_spike_pass(unflatten)
        getitem_3 = lif_spike_pass[0]; r = lif_spike_pass[1]; e = lif_spike_pass[2]
        flatten_1 = getitem_3.flatten(0, 1)
        conv1 = self.conv1(flatten_1) ...

    After (over the budget: 2 chunks of 8; or time_chunk = 8)::

        stream_lif_spike_pass = self.stream_lif_spike_pass(x_seq)
        #   StreamStage(neuron lif_spike_pass: flatten, conv0, spike_batch_norm, unflatten; 2 chunks, 2 passes)
        getitem_3 = stream_lif_spike_pass[0]        # spikes [16, B, ...], uint8
        r = stream_lif_spike_pass[1]; e = stream_lif_spike_pass[2]
        bn_mean = stream_lif_spike_pass[3]; bn_var = stream_lif_spike_pass[4]
        stream_lif_spike_pass_1 = self.stream_lif_spike_pass_1(getitem_3) ...

    where the stage's chunk graph for 8 steps is::

        def forward(self, x_seq, mean_spike_batch_norm, var_spike_batch_norm):
            flatten = x_seq.reshape((8·B, 3, 32, 32))
            conv0 = self.conv0(flatten)
            chunk_batch_norm = chunk_batch_norm(conv0, self.bn0.weight, self.bn0.bias, mean_..., var_..., 1e-05)
            unflatten = chunk_batch_norm.reshape((8, B, 16, 32, 32))
            return (unflatten,)

    Holds before: a program from build_spike_graph (after fuse_lif). Holds after: when streamed, no
    neuron runs outside a stage and every node of the spike graph has ``meta["val"]``; the spike
    graph's outputs are those of the unstreamed one (BatchNorm statistics to rounding).
    """
    T = program.meta["ratebp.T"]
    chunk, keep = program.meta.get(TIME_CHUNK), False
    try:          # the estimate plans the stages too: a graph they cannot express fails it as it fails _build
        if chunk is not None:
            why = f"time_chunk = {chunk}"
        else:
            budget, why = _budget(program)
            if budget is not None:
                chunk, keep, why = (None, False, "T = 1") if T == 1 else _chunk_for_budget(program.spike, T, budget)
        if chunk is None:
            program.meta[STREAMED] = f"all T steps at once ({why})"
            return PassResult(program, False)
        if T <= chunk:
            program.meta[STREAMED] = f"all T steps at once (T = {T} ≤ {why})"
            return PassResult(program, False)
        streamed = _build(program.spike, T, chunk, keep)
    except _CannotStream as e:
        reason = str(e)
        program.meta[STREAMED] = f"all T steps at once: {reason}"
        warnings.warn(f"ratebp_compile: the spike pass runs all {T} steps at once (its memory grows with T), "
                      f"not in chunks of time: {reason}", stacklevel=2)
        return PassResult(program, False)
    program.spike = streamed
    program.meta[STREAMED] = f"in chunks of at most {chunk} of the T = {T} steps ({len(chunk_bounds(T, chunk))} " \
                             f"chunks; {why})"
    program.recompile()
    log.debug("stream_time: %s", program.meta[STREAMED])
    return PassResult(program, True)

"""fold_time: a single-step model's unrolled time loop → the multi-step form."""
from __future__ import annotations

import operator
from typing import Dict, FrozenSet, List, Optional

import networkx as nx
import torch
import torch.fx as fx
from networkx.algorithms.isomorphism import DiGraphMatcher

from ..errors import RateBPError, describe_node
from ..families.lif import spec_from_op_args
from ..graph_ops import per_step_batch_norm
from ..hooks import ModuleHooks
from ..interop import PORTING
from ..kernels.lif import op_arguments
from ..kernels.lif_cell import final_membrane
from ..nn.spec import StateTrace, call_form, cell_spec, is_single_step
from ..oprules import is_module_state, op_info
from ..oprules.layout import op_dims
from .batchnorm_parts import is_batchnorm
from .infra import PassResult, constant_value, copy_meta, postcondition, require

__all__ = ["fold_time"]

PASS = "fold_time"
Steps = FrozenSet[int]
_NO_STEPS: Steps = frozenset()

# Op families that treat dimension 0 of a per-step tensor as the batch and each sample alike: on the
# steps stacked time-major along dimension 0 they compute every step at once.
_PER_SAMPLE = {"pointwise", "dropout", "binary", "mul", "div", "batch_first", "feature_last", "layer_norm", "like",
               "meta"}


def _is_cell_op(node) -> bool:
    """A cell's step as traced by torch.compile: ``ratebp.lif_cell_step(x, v, ...)``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and \
        getattr(node.target, "_overloadpacket", node.target) is torch.ops.ratebp.lif_cell_step


def _state_output(op: fx.Node) -> Optional[fx.Node]:
    """The ``v_next`` of a cell-step op node (its output 1), if used."""
    return next((u for u in op.users if u.target is operator.getitem and u.args[1] == 1), None)


def _cell_module(node, gm: fx.GraphModule):
    """The single-step neuron module ``node`` calls, or None."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        if is_single_step(module):
            return module
    return None


#: A state argument the call does not pass: the module starts from the state it holds.
_STORED = object()


def _state_args(node: fx.Node, gm: fx.GraphModule) -> List[object]:
    """The state a cell call receives from the previous step: a cell-step op's membrane, or the state
    arguments of a neuron module whose calls carry their state explicitly (``lif(x, mem)``); ``_STORED``
    for one the call leaves out."""
    if _is_cell_op(node):
        return [op_arguments(node)["v"]]
    module = _cell_module(node, gm)
    if module is None:
        return []
    form = call_form(module)
    return [node.args[1 + i] if 1 + i < len(node.args) else _STORED for i in range(form.state_args)]


def _output_role(node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
    """"spikes" or "state" for an element ``call[i]`` of a cell call's tuple output, else None."""
    if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[0], fx.Node):
        return None
    call, index = node.args
    if _is_cell_op(call):
        return "spikes" if index == 0 else "state"
    module = _cell_module(call, gm)
    if module is None or not call_form(module).outputs:
        return None
    return call_form(module).outputs[index]


def _cells(gm: fx.GraphModule) -> Dict[str, List[fx.Node]]:
    """Each single-step neuron's calls, in order: a cell module's calls (``transform``'s capture), or a
    chain of cell-step ops linked through their membranes (torch.compile's graph)."""
    calls: Dict[str, List[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and is_single_step(gm.get_submodule(node.target)):
            calls.setdefault(node.target, []).append(node)
        elif _is_cell_op(node) and op_arguments(node)["v"] is None:
            chain = [node]
            while True:
                v_next = _state_output(chain[-1])
                following = [u for u in (v_next.users if v_next is not None else ()) if _is_cell_op(u)]
                if not following:
                    break
                chain.append(following[0])
            calls[f"cell:{node.name}"] = chain
    return calls


def _data_inputs(node: fx.Node, gm: Optional[fx.GraphModule] = None) -> List[fx.Node]:
    """The inputs of ``node``, without the state a cell call receives from the previous step."""
    if _is_cell_op(node):
        v = op_arguments(node)["v"]
        return [a for a in node.all_input_nodes if a is not v]
    if gm is not None and _cell_module(node, gm) is not None:
        state = _state_args(node, gm)
        return [a for a in node.all_input_nodes if not any(a is v for v in state)]
    return node.all_input_nodes


def _selection(node: fx.Node):
    """``(source, t)`` if ``node`` selects index t along dimension 0 (``x[t]``, ``for x_t in x``,
    ``x.select(0, t)``), else None."""
    if (node.op == "call_method" and node.target == "select") or \
            (node.op == "call_function" and node.target is torch.select):
        args = list(node.args) + [node.kwargs.get(k) for k in ("dim", "index")][len(node.args) - 1:]
        source, dim, index = args[:3]
        return (source, index) if dim == 0 and isinstance(index, int) and isinstance(source, fx.Node) else None
    if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[0], fx.Node):
        return None
    source, index = node.args
    first = index[0] if isinstance(index, tuple) and len(index) == 1 else index
    return (source, first) if isinstance(first, int) else None


def _label(node: fx.Node, selects: bool, gm: fx.GraphModule) -> tuple:
    """What must agree between a node of one step and its counterpart in another."""
    val = node.meta.get("val")
    shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
    if selects:
        return ("select", node.args[0].name, shape)
    state = _state_args(node, gm)                         # not the state from the previous step
    args = [a for i, a in enumerate(node.args) if not (_is_cell_op(node) and i == 1) and
            not (_cell_module(node, gm) is not None and 1 <= i <= len(state))]
    consts = [repr(a) for a in args if not isinstance(a, (fx.Node, list, tuple))]
    return (node.op, str(node.target), tuple(consts), shape)


def _step_graph(nodes: List[fx.Node], labels, gm: fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    members = set(nodes)
    for n in nodes:
        g.add_node(n, label=labels[n])
    for n in nodes:
        for position, a in enumerate(_data_inputs(n, gm)):
            if a in members:
                g.add_edge(a, n, position=position)
    return g


def _same_value(a: fx.Node, b: fx.Node) -> bool:
    """Two static nodes computing the same thing (a loop recomputes its static part at every step)."""
    if a is b:
        return True
    if a.op != b.op or a.target != b.target or len(a.args) != len(b.args) or a.kwargs.keys() != b.kwargs.keys():
        return False
    pairs = list(zip(a.args, b.args)) + [(a.kwargs[k], b.kwargs[k]) for k in a.kwargs]

    def same(x, y):
        if isinstance(x, fx.Node) and isinstance(y, fx.Node):
            return _same_value(x, y)
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            return len(x) == len(y) and all(same(i, j) for i, j in zip(x, y))
        return not isinstance(x, fx.Node) and not isinstance(y, fx.Node) and x == y
    return a.op not in ("placeholder",) and all(same(x, y) for x, y in pairs)


class _Folder:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.cells = _cells(gm)
        counts = {target: len(calls) for target, calls in self.cells.items()}
        if len(set(counts.values())) != 1:
            raise RateBPError(f"{PASS}: the single-step neurons are called different numbers of times "
                              f"({', '.join(f'{t}: {c}' for t, c in counts.items())}); every cell must be called "
                              f"once per timestep")
        self.T = next(iter(counts.values()))
        layouts = gm.meta.get("ratebp.input_layouts") or []
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.temporal_inputs = {p for p, lay in zip(placeholders, layouts) if lay == "TB"}
        self.steps: Dict[fx.Node, Steps] = {}
        self.selects: Dict[fx.Node, int] = {}
        self.per_sample: set = set()      # values computed from the inputs (not from parameters alone)
        self.chains: set = set()          # additions of a sum over the steps
        self.env: Dict[fx.Node, object] = {}
        self.merged: Dict[fx.Node, fx.Node] = {}
        self.readouts: Dict[fx.Node, tuple] = {}   # a state output the model reads -> (module, state index)

    # -- which timestep each node belongs to ------------------------------------------------------
    def assign_steps(self) -> None:
        call_step = {n: k for calls in self.cells.values() for k, n in enumerate(calls)}
        for node in self.gm.graph.nodes:
            inputs: Steps = frozenset().union(*[self.steps[a] for a in _data_inputs(node, self.gm)]) \
                if node.all_input_nodes else _NO_STEPS
            t = self._selected_step(node)
            if t is not None:
                self.selects[node] = t
                inputs = frozenset({t % self.T})
            if node in call_step:
                k = call_step[node]
                if inputs - {k}:
                    raise RateBPError(f"{PASS}: {describe_node(node, self.gm)} is the neuron's call number {k} but "
                                      f"uses values of timestep(s) {sorted(inputs - {k})}: a recurrent connection "
                                      f"across timesteps cannot be trained with rate-based backprop")
                inputs = frozenset({k})
            self.steps[node] = inputs
            if (node.op == "placeholder" and not is_module_state(node)) or \
                    any(a in self.per_sample for a in node.all_input_nodes):
                self.per_sample.add(node)
        for node in self.gm.graph.nodes:          # sums over the steps: o_0 + o_1 + ... (or sum(outs))
            if self._is_add(node) and len(self.steps[node]) > 1 and \
                    not any(self._is_add(u) and len(self.steps[u]) > 1 for u in node.users):
                self.chains |= self._chain(node)

    def _selected_step(self, node: fx.Node) -> Optional[int]:
        """t if ``node`` selects timestep t of a ``[T, B, ...]`` sequence: an input, or a value computed
        from the inputs before the loop (a multi-step layer's output the loop then reads step by step)."""
        selection = _selection(node)
        if selection is None:
            return None
        source, t = selection
        if source in self.temporal_inputs:
            return t
        val = source.meta.get("val")
        if source in self.per_sample and not self.steps.get(source) and isinstance(val, torch.Tensor) and \
                val.dim() > 1 and val.shape[0] == self.T and 0 <= t < self.T:
            return t
        return None

    @staticmethod
    def _is_add(node) -> bool:
        return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (operator.add, torch.add)

    def _chain(self, node: fx.Node) -> set:
        nodes = {node}
        for a in node.args[:2]:
            if self._is_add(a) and len(a.users) == 1:
                nodes |= self._chain(a)
        return nodes

    def _sum_terms(self, node: fx.Node) -> list:
        terms = []
        for a in node.args[:2]:
            terms.extend(self._sum_terms(a) if a in self.chains else [a])
        return terms

    # -- state carried from call to call ------------------------------------------------------------
    def check_state_chains(self) -> None:
        """A neuron whose calls carry their state explicitly (``spk, mem = lif(x, mem)``) must start from
        rest and hand its state to its own next call: the folded neuron keeps it internal. The model may
        also read that state (record the membrane it returns): a read-out of the spike pass, without
        gradient (:class:`StateTrace`), where each state output is one element of the neuron's state."""
        gm = self.gm
        for calls in self.cells.values():
            module = _cell_module(calls[0], gm)
            if module is None:
                continue                            # cell-step ops: chained by construction
            form = call_form(module)
            for k, call in enumerate(calls):
                outputs = {u.args[1]: u for u in call.users if _output_role(u, gm) == "state"}
                state_out = [outputs.get(i) for i, role in enumerate(form.outputs) if role == "state"]
                following = calls[k + 1] if k + 1 < len(calls) else None
                for j, out in enumerate(state_out):
                    readers = [u for u in (out.users if out is not None else ())
                               if not (u is following and _state_args(following, gm)[j] is out)]
                    if not readers:
                        continue
                    if not self._readable(module, len(state_out)):
                        raise RateBPError(
                            f"{PASS}: the state of {describe_node(call, gm)} is read by "
                            f"{describe_node(readers[0], gm)}: the compiled step keeps this neuron's state inside "
                            f"it. Use its spikes. See {PORTING}.")
                    self.readouts[out] = (module, j)
                if k == 0:
                    given = _state_args(call, gm)
                    if (not given or any(v is _STORED for v in given)) and not form.stored_at_rest(module):
                        raise RateBPError(
                            f"{PASS}: {describe_node(call, gm)} starts from the state the module holds, which is "
                            f"not at rest (left by an earlier call): the compiled step always starts from rest; "
                            f"reset the neurons before each batch. See {PORTING}.")
                    for value in given:
                        if value is not _STORED and not form.at_rest(constant_value(gm, value)):
                            raise RateBPError(
                                f"{PASS}: {describe_node(call, gm)} starts from a state that is not at rest "
                                f"({describe_node(value, gm) if isinstance(value, fx.Node) else repr(value)}): the "
                                f"compiled step always starts from rest (pass no state, None, or the library's "
                                f"initial state). See {PORTING}.")
                elif form.state_args:
                    previous = {u.args[1]: u for u in calls[k - 1].users if _output_role(u, gm) == "state"}
                    expected = [previous.get(i) for i, role in enumerate(form.outputs) if role == "state"]
                    given, before = _state_args(call, gm), _state_args(calls[k - 1], gm)
                    implicit = all(v is _STORED for v in given + before)    # the module carries it itself
                    if not implicit and any(a is not b for a, b in zip(given, expected)):
                        raise RateBPError(
                            f"{PASS}: {describe_node(call, gm)} at timestep {k} does not continue from the state its "
                            f"call at timestep {k - 1} returned; only a neuron's own state can be carried from "
                            f"step to step. See {PORTING}.")

    @staticmethod
    def _readable(module, state_outputs: int) -> bool:
        """Whether each state output of ``module``'s calls is one element of its family's state (snnTorch's
        ``mem``), so that the model may read it."""
        dynamics = cell_spec(module).dynamics
        return state_outputs == len(dynamics.init_state(torch.zeros(1)))

    # -- the T bodies must be copies of one another ------------------------------------------------
    def match_bodies(self) -> List[Dict[fx.Node, fx.Node]]:
        bodies = [[n for n in self.gm.graph.nodes
                   if self.steps[n] == frozenset({k}) and n not in self.chains and n.op != "output"]
                  for k in range(self.T)]
        labels = {n: _label(n, n in self.selects, self.gm) for body in bodies for n in body}
        template = _step_graph(bodies[0], labels, self.gm)
        mappings = [{n: n for n in bodies[0]}]
        for k in range(1, self.T):
            other = _step_graph(bodies[k], labels, self.gm)
            matcher = DiGraphMatcher(template, other, node_match=lambda a, b: a["label"] == b["label"],
                                     edge_match=lambda a, b: a["position"] == b["position"])
            if not matcher.is_isomorphic():
                raise RateBPError(f"{PASS}: timestep {k} of the loop does not compute what timestep 0 computes "
                                  f"({len(bodies[k])} vs {len(bodies[0])} ops); only loops whose body is the same at "
                                  f"every step can be folded")
            for n0, nk in matcher.mapping.items():      # what a body reads from outside must agree too
                for a0, ak in zip(_data_inputs(n0, self.gm), _data_inputs(nk, self.gm)):
                    if self.steps[a0] == _NO_STEPS and not _same_value(a0, ak):
                        raise RateBPError(f"{PASS}: {describe_node(nk, self.gm)} at timestep {k} reads "
                                          f"{ak.name} where timestep 0 reads {a0.name}")
            mappings.append(matcher.mapping)
        return mappings

    # -- the folded graph ------------------------------------------------------------------------
    def _is_step_specific(self, node: fx.Node) -> bool:
        """Cells, their steps' outputs, and ``x[t]``: the nodes folding changes even at T = 1."""
        return node in self.selects or _is_cell_op(node) or _cell_module(node, self.gm) is not None or \
            _output_role(node, self.gm) is not None

    def fold_one_step(self) -> fx.Graph:
        """T = 1: every op already runs on the one step; cells become neurons of one step and ``x[0]``
        the merged ``[1·B, ...]`` input."""
        g = self.graph = fx.Graph()
        self.image = {n: n for n in self.gm.graph.nodes}
        for node in self.gm.graph.nodes:
            if node.op == "output":
                g.output(fx.node.map_arg(node.args[0], self._env))
            elif self._is_step_specific(node):
                self.merged[node] = self._fold_node(g, node)
                if self.merged[node] is not None:
                    self.env[node] = self.merged[node]
            else:
                self.env[node] = g.node_copy(node, self._env)
        return g

    def fold(self, mappings) -> fx.Graph:
        g = self.graph = fx.Graph()
        self.image = {nk: n0 for m in mappings for n0, nk in m.items()}    # any step's node -> step 0's
        for node in self.gm.graph.nodes:
            steps = self.steps[node]
            if node.op == "output":
                g.output(fx.node.map_arg(node.args[0], self._env))
            elif not steps:
                self.env[node] = g.node_copy(node, self._env)
            elif node in self.chains:
                if not any(u in self.chains for u in node.users):      # the whole sum
                    self.env[node] = self._fold_sum(g, node)
            elif len(steps) == 1:
                if self.image.get(node) is node:
                    self.merged[node] = self._fold_node(g, node)
            else:
                self.env[node] = self._combine(g, node)
        return g

    def _env(self, a: fx.Node):
        if a not in self.env and self._is_last_state(a):
            self.env[a] = self._final_membrane(a)
        if a not in self.env:
            raise RateBPError(f"{PASS}: {describe_node(a, self.gm)} belongs to timestep {sorted(self.steps[a])} "
                              f"but is used after the loop on its own (e.g. the last step's output); use all "
                              f"steps (torch.stack / torch.cat / a sum over the steps)")
        return self.env[a]

    def _is_last_state(self, a: fx.Node) -> bool:
        return a.target is operator.getitem and a.args[1] == 1 and _is_cell_op(a.args[0]) and \
            any(calls[-1] is a.args[0] for calls in self.cells.values())

    def _final_membrane(self, a: fx.Node) -> fx.Node:
        """The membrane a cell holds after the loop (torch.compile hands it back to ``cell.v``)."""
        template = self.image[a.args[0]]
        args = op_arguments(template)
        node = self.graph.call_function(final_membrane, (
            self._per_step(self.graph, args["x"], template), self.T, args["decay"],
            self._env(args["decay_logit"]) if isinstance(args["decay_logit"], fx.Node) else None,
            args["v_threshold"], args["v_reset"], args["decay_input"], args["strict"], args["delayed_reset"]))
        return copy_meta(node, a, PASS)

    def _per_step(self, g: fx.Graph, a: fx.Node, node: fx.Node):
        """The all-steps value of argument ``a`` of body node ``node``."""
        if a in self.merged:
            return self.merged[a]
        value = self._env(a)
        val, out = a.meta.get("val"), node.meta.get("val")
        if a in self.per_sample and isinstance(val, torch.Tensor) and isinstance(out, torch.Tensor) and \
                val.dim() == out.dim() and val.dim() > 0 and val.shape[0] == out.shape[0] > 1:
            # a per-sample value computed outside the loop (a shared encoder's output) is the same at every step
            return copy_meta(g.call_method("repeat", (value, (self.T,) + (1,) * (val.dim() - 1))), node, PASS)
        return value

    def _fold_node(self, g: fx.Graph, node: fx.Node) -> fx.Node:
        T, gm = self.T, self.gm
        arg = lambda a: self._per_step(g, a, node)      # noqa: E731
        if node in self.selects:                  # x[t] -> every step of x, time-major: x.flatten(0, 1)
            return copy_meta(g.call_method("flatten", (self._env(node.args[0]), 0, 1)), node, PASS)
        if node.op == "call_module" and is_single_step(gm.get_submodule(node.target)):
            spec = cell_spec(gm.get_submodule(node.target), T)
            params = [g.get_attr(f"{node.target}.{p}") for p in spec.param_names]
            new = copy_meta(g.call_function(spec, (arg(node.args[0]), *params)), node, PASS)
            new.meta.update({"ratebp.neuron": spec, "ratebp.module": node.target})
            return new
        if _is_cell_op(node):
            args = op_arguments(node)
            spec = spec_from_op_args(args, time_steps=T)
            params = [self._env(args["decay_logit"])] if args["decay_logit"] is not None else []
            new = copy_meta(g.call_function(spec, (arg(args["x"]), *params)), node, PASS)
            new.meta.update({"ratebp.neuron": spec, "ratebp.module": f"cell:{node.name}"})
            return new
        role = _output_role(node, gm)
        if role == "spikes":                      # the folded neuron's spikes
            return self.merged[self.image.get(node.args[0], node.args[0])]
        if role == "state":                       # passed to the next step: internal to the folded neuron ...
            read = next((self.readouts[n] for n in self.readouts if self.image.get(n, n) is node), None)
            if read is None:
                return None
            module, index = read                  # ... and read by the model: its value at every step
            neuron = self.merged[self.image.get(node.args[0], node.args[0])]
            where = describe_node(node.args[0], gm)
            return copy_meta(g.call_function(StateTrace(neuron.target, index, where), neuron.args), node, PASS)
        if node.op == "call_module" and is_batchnorm(node, gm):
            return copy_meta(g.call_function(per_step_batch_norm, (arg(node.args[0]), g.get_attr(node.target), T)),
                             node, PASS)
        info = op_info(node, gm) if node.op != "get_attr" else None
        val = node.meta.get("val")
        if info is not None and info.family in ("reshape", "broadcast") and isinstance(val, torch.Tensor) \
                and val.dim() > 0:
            if info.name in ("repeat", "tile"):
                return copy_meta(g.call_method("repeat", (arg(node.args[0]),) + tuple(node.args[1:])), node, PASS)
            method = "expand" if info.name in ("expand", "expand_as", "broadcast_to") else "reshape"
            return copy_meta(g.call_method(method, (arg(node.args[0]), (T * val.shape[0],) + tuple(val.shape[1:]))),
                             node, PASS)
        if info is None or (info.family not in _PER_SAMPLE and not self._per_sample_reduction(node, info, gm)):
            raise RateBPError(f"{PASS}: cannot fold {describe_node(node, gm)} into one op over all timesteps "
                              f"(it does not treat the samples of a step independently)")
        return copy_meta(g.node_copy(node, arg), node, PASS)

    @staticmethod
    def _per_sample_reduction(node: fx.Node, info, gm: fx.GraphModule) -> bool:
        """A reduction over dimensions other than the batch's."""
        if info.family not in ("reduce", "softmax"):
            return False
        dims = op_dims(node, gm)
        return dims is not None and 0 not in dims

    def _over_steps(self, values) -> Optional[fx.Node]:
        """Step 0's node if ``values`` are one value of the same body node per step, in step order."""
        templates = [self.image.get(v) if isinstance(v, fx.Node) else None for v in values]
        if len(values) == self.T and templates[0] is not None and all(t is templates[0] for t in templates) and \
                [min(self.steps[v]) for v in values] == list(range(self.T)):
            return templates[0]
        return None

    def _fold_sum(self, g: fx.Graph, node: fx.Node) -> fx.Node:
        terms = self._sum_terms(node)
        per_step = sorted((t for t in terms if isinstance(t, fx.Node) and self.steps[t]), key=lambda v: min(self.steps[v]))
        template = self._over_steps(per_step)
        if template is None:
            raise RateBPError(f"{PASS}: {describe_node(node, self.gm)} adds values of different timesteps that are "
                              f"not one value per step")
        steps = g.call_method("unflatten", (self.merged[template], 0, (self.T, -1)))
        total = copy_meta(g.call_method("sum", (steps, 0)), node, PASS)
        for extra in (t for t in terms if t not in per_step and not (isinstance(t, (int, float)) and t == 0)):
            total = copy_meta(g.call_function(operator.add, (total, self._env(extra) if isinstance(extra, fx.Node)
                                                             else extra)), node, PASS)
        return total

    def _combine(self, g: fx.Graph, node: fx.Node) -> object:
        """A node after the loop: stack/cat of one value per step, or an op on such results."""
        if node.op == "call_function" and node.target in (torch.stack, torch.cat) and \
                isinstance(node.args[0], (list, tuple)):
            template = self._over_steps(node.args[0])
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if template is not None and dim == 0:
                merged = self.merged[template]
                if node.target is torch.cat:
                    return merged
                return copy_meta(g.call_method("unflatten", (merged, 0, (self.T, -1))), node, PASS)
        if all(a in self.env for a in node.all_input_nodes):
            return g.node_copy(node, self._env)
        raise RateBPError(f"{PASS}: {describe_node(node, self.gm)} uses values of several timesteps in a way that "
                          f"cannot be folded (a recurrent connection, or outputs joined other than by "
                          f"torch.stack / torch.cat along dim 0 or a sum over the steps)")


def _check(gm: fx.GraphModule) -> None:
    require(not _cells(gm), PASS, None, "a single-step neuron was left in the graph")


@postcondition(_check)
def fold_time(gm: fx.GraphModule) -> PassResult:
    """Fold the T unrolled copies of a single-step model's per-step body into one multi-step body.

    A single-step model calls its stateful neurons (``LIFCell``, ``IFCell``, ``ParametricLIFCell``) once
    per timestep from a Python loop, which capture unrolls. Each node is assigned the timestep it
    belongs to (from the cells' call order and from ``x[t]`` selections of ``[T, B, ...]`` inputs); the T
    per-step bodies must be copies of one another (matched with networkx's graph isomorphism). The
    folded graph computes every step at once on ``[T·B, ...]`` (time-major): ``x[t]`` becomes
    ``x.flatten(0, 1)``, each cell a multi-step neuron with ``time_steps=T`` (starting from rest, as
    after ``reset()``), each BatchNorm a per-step BatchNorm (``per_step_batch_norm``: statistics and
    running-statistic updates per step, as in the loop), every other op applied to all steps at once;
    ``torch.stack(outs)`` becomes ``unflatten(0, (T, -1))``, ``torch.cat(outs)`` the ``[T·B, ...]`` value,
    ``o_0 + o_1 + ...`` a sum over time.

    Before (T = 2, ``sn`` a LIFCell)::

        getitem = x[0];   fc = self.fc(getitem);   sn = self.sn(fc)
        getitem_1 = x[1]; fc_1 = self.fc(getitem_1); sn_1 = self.sn(fc_1)
        stack = torch.stack([sn, sn_1])

    After::

        flatten = x.flatten(0, 1)              # [2·B, ...]
        fc = self.fc(flatten)
        lif = lif(fc)                          # NeuronSpec(LIFDynamics(...), time_steps=2)
        unflatten = lif.unflatten(0, (2, -1))  # [2, B, ...]

    In a torch.compile graph a cell's steps are ``ratebp.lif_cell_step(x, v, ...)`` ops chained through the
    membrane ``v``; the chain folds the same way, and the membrane after the last step, which Dynamo
    hands back to ``cell.v``, becomes ``final_membrane(...)`` (computed by the spike pass, no gradient).

    A neuron whose calls pass their state (``CallForm``: snnTorch's ``spk, mem = lif(x, mem)``, Norse's
    ``z, s = cell(x, s)``) folds the same way when each call continues from the state the previous one
    returned and the first starts from rest; the state the model reads (``mem_rec.append(mem)``) becomes
    a read-out of the folded neuron (T = 2, ``sn`` an snnTorch Leaky)::

        sn = self.sn(fc, zeros_like);  getitem = sn[0];  getitem_1 = sn[1]
        sn_1 = self.sn(fc_1, getitem_1);  getitem_2 = sn_1[0];  getitem_3 = sn_1[1]
        stack = torch.stack([getitem_1, getitem_3])

    becomes::

        leaky = leaky(fc)                                 # NeuronSpec(LeakyDynamics(...), time_steps=2)
        leaky_state_trace = leaky_state_trace(fc)         # StateTrace: the membrane after every step
        unflatten = leaky_state_trace.unflatten(0, (2, -1))

    A loop may read its steps from an input ``[T, B, ...]`` or from a sequence computed before it (a
    multi-step layer's output: ``h[t]``, ``h.select(0, t)``).

    Holds before: neurons are normalized; cells are ``call_module`` nodes or cell-step op chains; every
    node has ``meta["val"]``.
    Holds after: no single-step neuron is left; the graph computes what the loop computed (the cells'
    state starting from rest). Without cells the pass changes nothing. Refused: a model whose neurons
    are called once per forward (a per-step model: ``rc.nn.MultiStep``), a state not at rest at the
    first step, a state handed to another call than the neuron's next one.
    """
    if not _cells(gm):
        return PassResult(gm, False)
    hooked = [n for n in gm.graph.nodes if isinstance(n.target, ModuleHooks)]
    if hooked:
        raise RateBPError(f"fold_time: forward hooks in a single-step model ({hooked[0].target.describe()}) are not "
                          f"supported: the loop's T calls become one multi-step call, so a hook would no longer see "
                          f"one step per call. Remove the hooks while training, or write the model multi-step.")
    folder = _Folder(gm)
    folder.assign_steps()
    folder.check_state_chains()
    if folder.T == 1 and not folder.selects:
        first = next(iter(folder.cells.values()))[0]
        raise RateBPError(
            f"{PASS}: {describe_node(first, gm)} is a single-step neuron called once per forward: this model takes "
            f"one timestep per call and keeps its neurons' state between calls, so a compiled step would read the "
            f"batch axis of its input as time. Make it a sequence model: ratebp_compile.nn.MultiStep(model) runs it "
            f"over the time axis of [T, B, ...] inputs (one call per batch). See {PORTING}.")
    graph = folder.fold(folder.match_bodies()) if folder.T > 1 else folder.fold_one_step()
    folded = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    folded.graph.eliminate_dead_code()          # the loop's copies of its static part
    folded.recompile()
    folded.meta.update(gm.meta)
    from ..capture import propagate_shapes
    propagate_shapes(folded, [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])
    return PassResult(folded, True)

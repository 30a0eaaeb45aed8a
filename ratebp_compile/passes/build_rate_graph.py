"""build_rate_graph: the length-1 graph with autograd, and the gradient bridge into it."""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..capture import propagate_shapes
from ..errors import RateBPError, describe_node
from ..graph_ops import (batch_norm_no_update, dropout_mask, rate_batch_norm, rate_neuron, route_gradient,
                         state_output, time_average, update_batch_norm_stats)
from ..hooks import ModuleHooks
from ..nn.spec import NeuronSpec, StateTrace
from ..oprules import BATCHNORM, STATE, op_info
from ..time_layout import TimeLayout
from .batchnorm_parts import batchnorm_parts, is_batchnorm, uses_batch_statistics
from .build_spike_graph import OUTPUT_INDEX, SOURCE, STATISTICS, Statistic
from .infra import PassResult, at_node, check_values, copy_meta, postcondition, require
from .retime import is_constant, retimed_shape_op, retimed_value, retimes

__all__ = ["build_rate_graph"]

PASS = "build_rate_graph"


#: Op families that only move a read-out state's values on its way to an output (no arithmetic, no parameters).
_MOVES_DATA = {"reshape", "permute", "getitem", "split", "cat", "stack", "like", "meta", "broadcast"}


class _RateBuilder:
    def __init__(self, source: fx.GraphModule, statistics: List[Statistic]):
        self.source = source
        self.T = source.meta["ratebp.T"]
        self.g = fx.Graph()
        self.env: Dict[fx.Node, object] = {}
        self.statistics = statistics
        self.inputs: Dict[Tuple[fx.Node, str], fx.Node] = {}      # (source node, role) -> placeholder
        self.readouts: Dict[fx.Node, str] = {}     # a neuron's state read out, and what derives from it -> its name
        self.readout_outputs: Dict[int, str] = {}  # index of a rate output that is such a read-out -> its name

    def mapped(self, n):
        return self.env[n]

    def new(self, node: fx.Node, op: str, target, args, kwargs=None) -> fx.Node:
        created = self.g.create_node(op, target, args, kwargs or {})
        copy_meta(created, node, PASS)
        created.meta["ratebp.time"] = node.meta.get("ratebp.time")
        return created

    def build(self) -> fx.Graph:
        nodes = list(self.source.graph.nodes)
        for node in nodes:
            if node.op == "placeholder":     # no default values: the aux inputs follow
                self.env[node] = self.g.placeholder(node.target, type_expr=node.type)
                self.env[node].meta.update(node.meta)
        for stat in self.statistics:
            self.inputs[stat.node, stat.role] = self.g.placeholder(stat.name)
        for node in nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                leaves = [l for l in tree_flatten(node.args[0])[0] if isinstance(l, fx.Node)]
                self.readout_outputs = {i: self.readouts[l] for i, l in enumerate(leaves) if l in self.readouts}
                self.g.output(tuple(self.env[l] for l in leaves))
                continue
            with at_node(PASS, node, self.source):
                self.env[node] = self.rewrite(node)
        return self.g

    def rewrite(self, node: fx.Node):
        if isinstance(node.target, ModuleHooks):
            return None                      # hooks see the spike pass's values, once per step
        val = node.meta.get("val")
        if node.op != "get_attr" and is_constant(val):
            return val                       # shapes and other Python values: the spike pass's values
        cls = node.meta.get("ratebp.class")
        if cls is not None and cls.kind == STATE:
            # buffers are updated in place once, by the spike pass; state read-outs (a cell's final
            # membrane, a neuron's state at every step) have the spike pass's value and no gradient
            if isinstance(node.target, StateTrace):
                self.readouts[node] = f"the state of {node.target.where}"
            return self.env[node.args[0]] if node.op == "call_method" else None
        read = [a for a in node.all_input_nodes if a in self.readouts]
        if read:         # a read-out reshaped or stacked on its way to an output: no rate value either
            info = op_info(node, self.source) if node.op != "get_attr" else None
            others = [a for a in node.all_input_nodes if a not in self.readouts and not is_constant(a.meta.get("val"))]
            if others or info is None or info.family not in _MOVES_DATA:
                raise RateBPError(f"{PASS}: {describe_node(node, self.source)} combines {self.readouts[read[0]]} with "
                                  f"{describe_node(others[0], self.source) if others else 'its parameters or other values'}"
                                  f": a neuron's state is read out with the spike pass's value and no gradient flows "
                                  f"through it, so it may only be returned (reshaped, stacked) as an output of its own "
                                  f"(compute the loss on spikes)")
            self.readouts[node] = self.readouts[read[0]]
            return None
        if node.target is dropout_mask:
            return self.inputs[node, "mask"]        # the spike pass's mask: the same at every step
        if isinstance(node.target, NeuronSpec):
            spec: NeuronSpec = node.target
            x, *params = [self.env[a] for a in node.args]
            e_params = [self.inputs[node, f"e_{p}"] for p in spec.param_names]
            return self.new(node, "call_function", rate_neuron,
                            (x, self.inputs[node, "r"], self.inputs[node, "e"], params, e_params))
        if is_batchnorm(node, self.source) and uses_batch_statistics(node, self.source):
            parts = batchnorm_parts(node, self.source)
            w = parts.materialize(parts.weight, self.g, self.mapped)
            b = parts.materialize(parts.bias, self.g, self.mapped)
            if cls.kind == BATCHNORM or parts.group is not None:     # synchronised: over every rank's batch
                mean, var = self.inputs[node, "mean"], self.inputs[node, "var"]
                if parts.per_step:      # statistics averaged over the steps
                    mean = self.new(node, "call_method", "mean", (mean, 0))
                    var = self.new(node, "call_method", "mean", (var, 0))
                group = (parts.group,) if parts.group is not None else ()
                return self.new(node, "call_function", rate_batch_norm,
                                (self.env[parts.x], w, b, mean, var, parts.eps, *group))
            return self.new(node, "call_function", batch_norm_no_update, (self.env[parts.x], w, b, parts.eps))
        info = op_info(node, self.source) if node.op != "get_attr" else None
        if retimes(node, info):       # shape-taking ops get the rate pass's shape: time of length 1
            method, args = retimed_shape_op(node, info, self.env[node.args[0]], self.T, 1)
            return self.new(node, "call_method", method, args)
        copied = self.g.node_copy(node, self.mapped)
        copied.meta["ratebp.pass"] = PASS
        if cls is not None and cls.sums_over_time:
            return self.new(node, "call_function", operator.mul, (copied, self.T))
        return copied


_CASTS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}


def _cast_dtype(node: fx.Node) -> Optional[torch.dtype]:
    """The floating dtype ``node`` casts its first argument to (``x.float()``, ``x.to(torch.float64)``, ...)."""
    if node.op != "call_method":
        return None
    if node.target in _CASTS:
        return _CASTS[node.target]
    if node.target in ("to", "type"):
        dtype = node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 else None)
        return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
    return None


def _average_dtype(placeholder: fx.Node) -> Optional[torch.dtype]:
    """The dtype of a temporal input's time average when the input is not floating point (0/1 spikes as uint8
    or bool, counts): the floating dtype the model casts it to when every use is that one cast, else the
    default dtype (what ``x * 0.5`` would give). None for a floating-point input (averaged in its dtype)."""
    val = placeholder.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype.is_floating_point:
        return None
    casts = {_cast_dtype(u) for u in placeholder.users}
    return casts.pop() if len(casts) == 1 and None not in casts else torch.get_default_dtype()


def _check(program: fx.GraphModule) -> None:
    require(isinstance(getattr(program, "rate", None), fx.GraphModule), PASS, None, "no rate submodule")
    for node in program.rate.graph.nodes:
        require(not isinstance(node.target, NeuronSpec), PASS, node, "a neuron was left in the rate graph", program)
    check_values(program, PASS)
    check_values(program.rate, PASS)


@postcondition(_check)
def build_rate_graph(program: fx.GraphModule) -> PassResult:
    """Add the rate pass to the program: the same network applied once, with autograd, to the
    time-averaged inputs (a length-1 sequence), and route every output's gradient into it.

    In the rate graph (built from the annotated source graph):
    - a neuron returns its spike-pass rate r with Jacobian diag(e): ``rate_neuron(x, r, e, ...)``;
    - a BatchNorm with statistics over time and batch normalises with the spike-pass statistics and
      differentiates through its input's own: ``rate_batch_norm``; other training-mode BatchNorms
      do not update running statistics again;
    - reshape/expand/repeat get the rate pass's shapes; a sum over time is multiplied by T;
    - in-place updates of buffers (a BatchNorm's batch counter) are left to the spike pass;
    - shapes and other Python values computed from tensors are the spike pass's constants;
    - every other op is the original op, applied to rates.
    In the program, each output keeps the spike pass's value; ``route_gradient`` sends its gradient
    (summed over time for a temporal output) into the rate graph's corresponding output.

    Before (the program from build_spike_graph, T = 2)::

        without_grad = without_grad(spike, x)
        getitem = without_grad[0]; r_sn = without_grad[1]; e_sn = without_grad[2]; ...
        update_batch_norm_stats(bn, bn_mean_bn, bn_var_bn, 1568)
        return getitem

    After — the rate graph::

        def forward(self, x, r_sn, e_sn, bn_mean_bn, bn_var_bn):
            flatten = x.flatten(0, 1)                     # x: [1, B, 3, 8, 8]
            conv = self.conv(flatten)
            rate_batch_norm = rate_batch_norm(conv, self.bn.weight, self.bn.bias, bn_mean_bn, bn_var_bn, 1e-05)
            reshape = rate_batch_norm.reshape((1, B, 8, 8, 8))
            rate_neuron = rate_neuron(reshape, r_sn, e_sn, [], [])
            mean = rate_neuron.mean(0)
            return (mean,)

    and the program::

        without_grad = without_grad(spike, x)
        getitem = without_grad[0]; r_sn = ...
        time_average = time_average(x, 0, False, 2)
        rate = self.rate(time_average, r_sn, e_sn, bn_mean_bn, bn_var_bn)
        getitem_1 = rate[0]
        route_gradient = route_gradient(getitem, getitem_1, None, False, 2, 1.0)
        update_batch_norm_stats(bn, bn_mean_bn, bn_var_bn, 1568)
        return route_gradient

    Holds before: a program from build_spike_graph. Holds after: the program has submodules ``spike``
    and ``rate``; the rate graph has no NeuronSpec nodes; every output is a ``route_gradient`` of a
    spike output and a rate output. With ``program.meta["ratebp.upstream_grad_scale"]`` set, the
    gradients entering the rate graph are divided by T, as the paper authors' code does.
    """
    source: fx.GraphModule = program.meta[SOURCE]
    T = source.meta["ratebp.T"]
    g = program.graph
    statistics = program.meta[STATISTICS]
    by_name = {n.name: n for n in g.nodes}
    aux_nodes = [by_name[stat.name] for stat in statistics]
    builder = _RateBuilder(source, statistics)
    rate_graph = builder.build()
    for node in list(rate_graph.nodes):          # a module a rewritten node referred to (a BatchNorm's)
        if node.op == "get_attr" and not node.users:
            rate_graph.erase_node(node)
    rate = fx.GraphModule(source, rate_graph, class_name="RateGraph")
    program.add_submodule("rate", rate)

    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    source_placeholders = [n for n in source.graph.nodes if n.op == "placeholder"]
    first_update = next((n for n in g.nodes if n.target is update_batch_norm_stats), None)
    output = next(n for n in g.nodes if n.op == "output")
    scale = 1.0 / T if program.meta.get("ratebp.upstream_grad_scale") else 1.0
    dtypes = [_average_dtype(src) for src in source_placeholders]
    rate_values = [retimed_value(src, T, dtype=dtype) for src, dtype in zip(source_placeholders, dtypes)]
    propagate_shapes(rate, rate_values + [n.meta["val"] for n in aux_nodes])
    rate_outputs = [a.meta["val"] if isinstance(a, fx.Node) else a
                    for a in next(n for n in rate.graph.nodes if n.op == "output").args[0]]
    with g.inserting_before(first_update or output):
        rate_inputs = []
        for ph, src, val, dtype in zip(placeholders, source_placeholders, rate_values, dtypes):
            lay = src.meta.get("ratebp.time")
            if isinstance(lay, TimeLayout):
                avg = g.call_function(time_average, (ph, lay.axis, lay.merged, T) + ((dtype,) if dtype else ()))
                copy_meta(avg, src, PASS, val)
                rate_inputs.append(avg)
            else:
                rate_inputs.append(ph)
        call = g.call_module("rate", (*rate_inputs, *aux_nodes))
        call.meta.update({"ratebp.pass": PASS, "val": tuple(rate_outputs)})
        routed = {}
        for out in [n for n in g.nodes if OUTPUT_INDEX in n.meta]:
            i = out.meta[OUTPUT_INDEX]
            rate_out = g.call_function(operator.getitem, (call, i))
            rate_out.meta["val"] = rate_outputs[i]
            lay = out.meta.get("ratebp.time")
            axis, merged = (lay.axis, lay.merged) if isinstance(lay, TimeLayout) else (None, False)
            if i in builder.readout_outputs:      # the spike pass's value; a gradient reaching it is an error
                j = next((j for j, v in enumerate(rate_outputs)
                          if isinstance(v, torch.Tensor) and j not in builder.readout_outputs), None)
                anchor = None if j is None else g.call_function(operator.getitem, (call, j))
                if anchor is not None:
                    anchor.meta["val"] = rate_outputs[j]
                routed[out] = g.call_function(state_output, (out, anchor, builder.readout_outputs[i]))
            else:
                routed[out] = g.call_function(route_gradient, (out, rate_out, axis, merged, T, scale))
            copy_meta(routed[out], out, PASS, out.meta.get("val"))
    leaves, spec = tree_flatten(output.args[0])
    output.args = (tree_unflatten([routed.get(l, l) for l in leaves], spec),)
    program.recompile()
    return PassResult(program, True)

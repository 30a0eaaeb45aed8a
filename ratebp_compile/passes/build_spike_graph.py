"""build_spike_graph: the exact forward over all T steps, without autograd, as a program."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Dict, List, Set

import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..capture import propagate_shapes
from ..graph_ops import (dropout_mask, spike_batch_norm, spike_batch_norm_per_step, update_batch_norm_stats,
                         without_grad)
from ..nn.spec import NeuronSpec
from .batchnorm_parts import batchnorm_parts, is_batchnorm, uses_batch_statistics
from .infra import (PassResult, at_node, check_values, copy_meta, identifier, postcondition, require,
                    unique_name)

__all__ = ["build_spike_graph", "Statistic", "SOURCE", "STATISTICS", "AUX", "OUTPUT_INDEX"]

PASS = "build_spike_graph"
SOURCE = "ratebp.source"            # program.meta: the annotated source graph
STATISTICS = "ratebp.statistics"    # program.meta: the Statistics, in the order the spike graph outputs them
AUX = "ratebp.aux"                  # program node meta: the Statistic the node holds
OUTPUT_INDEX = "ratebp.output"      # program node meta: index of a spike-pass output leaf


@dataclass(frozen=True)
class Statistic:
    """One value the spike pass hands the rate pass: a neuron's rate (role ``"r"``), eligibility (``"e"``)
    or the eligibility of one of its parameters (``"e_<param>"``), the batch ``"mean"`` or ``"var"`` of
    a BatchNorm with statistics over time and batch, or a dropout ``"mask"`` shared by all steps."""

    name: str           # unique in the program: the step graph's node and the rate graph's input
    role: str
    owner: str          # the neuron or BatchNorm module's path (a node's name for a functional BatchNorm)
    node: fx.Node = field(compare=False, repr=False)      # the source graph's neuron or BatchNorm node


def _statistic(node: fx.Node, role: str, owner: str, taken: Set[str]) -> Statistic:
    """The statistic ``role`` of ``node``, named after its owner; a module called more than once (a shared
    neuron) gets one name per call."""
    name = unique_name(f"{'bn_' if role in ('mean', 'var') else ''}{role}_{identifier(owner)}", taken)
    taken.add(name)
    return Statistic(name, role, owner, node)


def _getitem(graph: fx.Graph, node: fx.Node, i: int, meta_from: fx.Node, val=None) -> fx.Node:
    item = graph.call_function(operator.getitem, (node, i))
    return copy_meta(item, meta_from, PASS, val)


def _build(source: fx.GraphModule):
    """The spike graph, its statistics (Statistic, spike graph node) and the BatchNorm updates to schedule."""
    g = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    aux: List[tuple] = []
    taken: Set[str] = set()
    bn_updates: List[tuple] = []      # (parts, count, mean Statistic, var Statistic): count of this rank
    output_leaves, output_spec = None, None
    for node in source.graph.nodes:
        with at_node(PASS, node, source):
            if node.op == "output":
                leaves, output_spec = tree_flatten(node.args[0])
                output_leaves = leaves
                g.output(tuple(env[l] for l in leaves if isinstance(l, fx.Node)) + tuple(n for _, n in aux))
            elif isinstance(node.target, NeuronSpec):
                spec: NeuronSpec = node.target
                call = g.call_function(spec.with_mode("spike"), tuple(env[a] for a in node.args))
                copy_meta(call, node, PASS)
                call.meta["ratebp.neuron"] = spec
                call.meta["ratebp.module"] = node.meta.get("ratebp.module")
                env[node] = _getitem(g, call, 0, node, node.meta.get("val"))
                env[node].meta["ratebp.time"] = node.meta["ratebp.time"]
                owner = node.meta.get("ratebp.module", node.name)
                roles = ["r", "e"] + [f"e_{p}" for p in spec.param_names]
                for i, role in enumerate(roles, start=1):
                    aux.append((_statistic(node, role, owner, taken), _getitem(g, call, i, node)))
            elif is_batchnorm(node, source) and uses_batch_statistics(node, source):
                parts = batchnorm_parts(node, source)
                args = (env[parts.x], parts.materialize(parts.weight, g, env.__getitem__),
                        parts.materialize(parts.bias, g, env.__getitem__), parts.eps)
                group = (parts.group,) if parts.group is not None else ()
                if parts.per_step:
                    call = g.call_function(spike_batch_norm_per_step, args + (parts.per_step,) + group)
                else:
                    call = g.call_function(spike_batch_norm, args + group)
                copy_meta(call, node, PASS)
                env[node] = _getitem(g, call, 0, node, node.meta.get("val"))
                env[node].meta["ratebp.time"] = node.meta["ratebp.time"]
                mean, var = (_statistic(node, role, parts.module or node.name, taken) for role in ("mean", "var"))
                aux += [(mean, _getitem(g, call, 1, node)), (var, _getitem(g, call, 2, node))]
                x = node.args[0].meta["val"]
                count = x.numel() // x.shape[1] // (parts.per_step or 1)      # samples per statistic
                bn_updates.append((parts, count, mean, var))
            elif node.target is dropout_mask:       # drawn once, handed to the rate pass
                env[node] = g.node_copy(node, env.__getitem__)
                aux.append((_statistic(node, "mask", node.name, taken), env[node]))
            else:
                env[node] = g.node_copy(node, env.__getitem__)
    return g, aux, bn_updates, output_leaves, output_spec


def _check(program: fx.GraphModule) -> None:
    require(isinstance(getattr(program, "spike", None), fx.GraphModule), PASS, None, "no spike submodule")
    for node in program.spike.graph.nodes:
        spec = node.target if isinstance(node.target, NeuronSpec) else None
        require(spec is None or spec.mode == "spike", PASS, node, "a neuron still runs its BPTT forward", program)
    check_values(program, PASS)
    check_values(program.spike, PASS)


@postcondition(_check)
def build_spike_graph(gm: fx.GraphModule) -> PassResult:
    """Turn the annotated source graph into a *program* whose submodule ``spike`` is the exact
    forward of all T steps, run without autograd.

    In the spike graph every neuron runs its spike pass (returning spikes, r, e and, for learnable
    neuron parameters, their eligibilities) and every BatchNorm that uses batch statistics also
    returns the mean and variance it used. The spike graph outputs the model's outputs followed by
    those statistics. The program runs it, then updates the BatchNorms' running statistics — last,
    so that a step that fails changes nothing.

    Before (T = 2)::

        def forward(self, x):
            flatten = x.flatten(0, 1)
            conv = self.conv(flatten)
            bn = self.bn(conv)
            unflatten = bn.unflatten(0, (2, -1))
            lif = lif(unflatten)
            return lif.mean(0)

    After — the spike graph::

        def forward(self, x):
            flatten = x.flatten(0, 1)
            conv = self.conv(flatten)
            spike_batch_norm = ratebp_compile_graph_ops_spike_batch_norm(conv, self.bn.weight, self.bn.bias, 1e-05)
            getitem = spike_batch_norm[0]; getitem_1 = spike_batch_norm[1]; getitem_2 = spike_batch_norm[2]
            unflatten = getitem.unflatten(0, (2, -1))
            lif_spike_pass = ratebp_compile_nn_spec_lif_spike_pass(unflatten)
            getitem_3 = lif_spike_pass[0]; getitem_4 = lif_spike_pass[1]; getitem_5 = lif_spike_pass[2]
            mean = getitem_3.mean(0)
            return (mean, getitem_4, getitem_5, getitem_1, getitem_2)      # outputs, r_sn, e_sn, bn stats

    and the program::

        def forward(self, x):
            spike = self.spike
            without_grad = ratebp_compile_graph_ops_without_grad(spike, x)
            getitem = without_grad[0]                                     # output 0
            r_sn = without_grad[1]; e_sn = without_grad[2]
            bn_mean_bn = without_grad[3]; bn_var_bn = without_grad[4]
            bn = self.bn
            update_batch_norm_stats = ratebp_compile_graph_ops_update_batch_norm_stats(bn, bn_mean_bn, bn_var_bn, 1568)
            return getitem

    Holds before: every node is classified (classify_ops). Holds after: the result is a program
    GraphModule with submodule ``spike``; ``program.meta["ratebp.source"]`` keeps the annotated source
    graph and ``program.meta["ratebp.statistics"]`` the Statistics the spike graph outputs after the model's
    outputs (a shared neuron module has one set per call); program nodes carry ``meta["ratebp.aux"]`` (their
    Statistic) or ``meta["ratebp.output"]``
    (output index). Run as is, the program is the model's training-mode forward without gradients.
    """
    g, aux, bn_updates, leaves, spec = _build(gm)
    spike = fx.GraphModule(gm, g, class_name="SpikeGraph")
    source_placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    propagate_shapes(spike, [n.meta.get("val") for n in source_placeholders])
    spike_outputs = [a.meta["val"] for a in next(n for n in g.nodes if n.op == "output").args[0]]

    p = fx.Graph()
    root: Dict[str, object] = {"spike": spike}
    placeholders = [p.node_copy(n, lambda _: None) for n in source_placeholders]
    call = p.call_function(without_grad, (p.get_attr("spike"), *placeholders))
    call.meta["val"] = tuple(spike_outputs)
    node_leaves = [l for l in leaves if isinstance(l, fx.Node)]
    outs = []
    for i, leaf in enumerate(node_leaves):
        item = p.call_function(operator.getitem, (call, i))
        copy_meta(item, leaf, PASS, spike_outputs[i])
        item.meta[OUTPUT_INDEX] = i
        item.meta["ratebp.time"] = leaf.meta.get("ratebp.time")
        outs.append(item)
    aux_nodes = {}
    for j, (stat, node) in enumerate(aux, start=len(node_leaves)):
        item = p.create_node("call_function", operator.getitem, (call, j), name=stat.name)
        item.meta[AUX] = stat
        item.meta["val"] = spike_outputs[j]
        aux_nodes[stat] = item
    for parts, count, mean, var in bn_updates:
        if parts.module is not None:
            target = p.get_attr(parts.module)
            root[parts.module] = gm.get_submodule(parts.module)
        elif parts.running is not None:
            by_name = {n.target: n for n in placeholders}
            refs = []
            for r in parts.running:
                if r.op == "placeholder":
                    refs.append(by_name[r.target])
                else:
                    refs.append(p.get_attr(r.target))
                    refs[-1].meta["val"] = r.meta.get("val")
                    root[r.target] = gm.get_buffer(r.target)
            target = tuple(refs)
        else:
            continue
        momentum = None if parts.module is not None else parts.momentum     # a module's own is read at run time
        extra = (momentum, parts.group) if parts.group is not None else (momentum,) if momentum is not None else ()
        update = p.call_function(update_batch_norm_stats,
                                 (target, aux_nodes[mean], aux_nodes[var], count, *extra))
        update.meta["val"] = None
    it = iter(outs)
    p.output(tree_unflatten([next(it) if isinstance(l, fx.Node) else l for l in leaves], spec))
    program = fx.GraphModule(root, p, class_name="RateBPProgram")
    program.meta.update(gm.meta)
    program.meta[SOURCE] = gm
    program.meta[STATISTICS] = [stat for stat, _ in aux]
    return PassResult(program, True)


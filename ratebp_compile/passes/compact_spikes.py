"""compact_spikes: an unstreamed spike pass in less memory — spikes that stay alive while other layers run are
kept in 1 byte, and sums are written into an operand that dies there."""
from __future__ import annotations

import operator
from typing import List, Optional, Set

import torch
import torch.fx as fx

from ..capture import propagate_shapes
from ..hooks import ModuleHooks
from ..nn.spec import NeuronSpec
from ..oprules import is_view
from ..oprules.table import is_inplace_method
from ..stream import StreamStage
from .infra import PassResult, check_values, copy_meta, postcondition, require, tensor_val
from .stream_time import reuse_dead_inputs

__all__ = ["compact_spikes"]

PASS = "compact_spikes"


def _readers(spikes: fx.Node, gm: fx.GraphModule) -> Optional[List[fx.Node]]:
    """The nodes that read the spikes through any chain of views, or None if one of them may write into
    them (an in-place op, or a forward hook, which may change its module's output), which a copy would
    hide from the others."""
    readers, seen, stack = [], set(), [spikes]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if is_inplace_method(user) or user.kwargs.get("inplace") or isinstance(user.target, ModuleHooks):
                return None
            if is_view(user, gm):
                stack.append(user)
            else:
                readers.append(user)
    return readers


def _spike_outputs(gm: fx.GraphModule) -> List[fx.Node]:
    """The spikes of the binary neurons (``getitem(neuron, 0)``) in a float dtype."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, NeuronSpec) and node.target.binary:
            spikes = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), None)
            val = tensor_val(spikes) if spikes is not None else None
            if val is not None and val.dtype.is_floating_point:
                out.append(spikes)
    return out


def _check(program: fx.GraphModule) -> None:
    check_values(program.spike, PASS)
    for node in program.spike.graph.nodes:
        if node.op == "call_method" and node.target == "to" and node.args[1:] == (torch.uint8,):
            require(_readers(node, program.spike) is not None, PASS, node, "compacted spikes read in place",
                    program.spike)


@postcondition(_check)
def compact_spikes(program: fx.GraphModule) -> PassResult:
    """Keep in 1 byte the spikes of a 0/1 neuron that more than one op reads (through views): the input of
    a residual block is read by its first convolution and, after the block's other layers, by its shortcut.
    Each reader then gets the spikes back in their dtype right before it, so only one such copy is alive at
    a time; and an add, subtraction or product whose operand the graph computed and reads nowhere else is
    written into it (the restored shortcut's sum into the BatchNorm's output). At the peak of a ResNet's
    spike pass this saves about one layer's activations in three. Spikes are 0 or 1, so the round trip is
    exact. Only an unstreamed spike pass is changed (a streamed one does both already); spikes some reader
    updates in place, or a forward hook sees, are left as they are.

    Before (the program's spike graph, a residual block)::

        lif_spike_pass = lif_fused_spike_pass(unflatten)
        getitem_3 = lif_spike_pass[0]
        flatten_1 = getitem_3.flatten(0, 1)
        conv1 = self.layers.0.0.conv1(flatten_1)
        ...
        add = getitem_9 + flatten_1                      # getitem_9 = spike_batch_norm_2[0]

    After::

        lif_spike_pass = lif_fused_spike_pass(unflatten)
        getitem_3 = lif_spike_pass[0]
        to = getitem_3.to(torch.uint8)
        flatten_1 = to.flatten(0, 1)                     # a uint8 view
        to_1 = flatten_1.to(torch.float32)
        conv1 = self.layers.0.0.conv1(to_1)
        ...
        to_2 = flatten_1.to(torch.float32)
        add = getitem_9.add_(to_2)                       # getitem_9 = spike_batch_norm_2[0]

    Holds before: a program from stream_time. Holds after: every spike-graph node has ``meta["val"]``;
    no compacted spikes are written in place; the spike graph computes what it computed.
    """
    spike = program.spike
    if any(isinstance(m, StreamStage) for m in spike.modules()):
        return PassResult(program, False)
    graph = spike.graph
    changed = False
    for spikes in _spike_outputs(spike):
        readers = _readers(spikes, spike)
        if readers is None or len(readers) < 2:
            continue
        dtype = tensor_val(spikes).dtype
        with graph.inserting_after(spikes):
            compact = copy_meta(graph.call_method("to", (spikes, torch.uint8)), spikes, PASS)
        spikes.replace_all_uses_with(compact, delete_user_cb=lambda user: user is not compact)
        done: Set[fx.Node] = set()
        for reader in readers:
            if reader in done:
                continue
            done.add(reader)
            for value in reader.all_input_nodes:
                if _reaches(compact, value, spike):
                    with graph.inserting_before(reader):
                        restored = copy_meta(graph.call_method("to", (value, dtype)), value, PASS)
                    reader.replace_input_with(value, restored)
        changed = True
    if changed:
        reuse_dead_inputs(graph, spike)
        graph.lint()
        spike.recompile()
        propagate_shapes(spike, [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
        program.recompile()
    return PassResult(program, changed)


def _reaches(source: fx.Node, node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` is ``source`` or a view of it (through views of views)."""
    while node is not source:
        if not (isinstance(node, fx.Node) and is_view(node, gm) and node.args):
            return False
        node = node.args[0]
    return True

"""channels_last: a spike pass on CPU, streamed or not, runs its 2-D convolutions, and the neurons between
them, on channels-last memory."""
from __future__ import annotations

import logging
import operator
from typing import List, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..capture import propagate_shapes
from ..errors import RateBPError
from ..graph_ops import with_strides
from ..hooks import ModuleHooks
from ..nn.spec import NeuronSpec
from ..stream import StreamStage, dense_order, memory_order
from .infra import PassResult, check_values, copy_meta, input_device, postcondition, require, tensor_val

__all__ = ["channels_last"]

PASS = "channels_last"

log = logging.getLogger(__name__)

_CONV2D = (F.conv2d, torch.conv2d)


def _conv_input(node: fx.Node, gm: fx.GraphModule) -> Optional[fx.Node]:
    """The input of a 2-D convolution on a 4-D float32 tensor (a ``Conv2d`` module or ``conv2d`` call)."""
    if node.op == "call_module":
        if not isinstance(gm.get_submodule(node.target), nn.Conv2d) or not node.args:
            return None
        x = node.args[0]
    elif node.op == "call_function" and node.target in _CONV2D:
        x = node.args[0] if node.args else node.kwargs.get("input")
    else:
        return None
    val = tensor_val(x)
    return x if val is not None and val.dim() == 4 and val.dtype == torch.float32 else None


def _dense(val: torch.Tensor) -> bool:
    """Whether ``val``'s elements fill its memory, each once (some permutation of it is contiguous)."""
    return val.permute(memory_order(val)).is_contiguous()


def _neuron_outputs(node: fx.Node) -> Optional[List[fx.Node]]:
    """The ``getitem`` users of a fused neuron node, when each is a tensor that keeps the input's
    dimensions after the first (spikes ``[T, ...]``, r and e ``[1, ...]``), so that the input's order
    of dimensions is theirs; otherwise None."""
    x = tensor_val(node.args[0])
    outputs = []
    for user in node.users:
        val = tensor_val(user)
        if user.target is not operator.getitem or val is None or val.dim() != x.dim() or val.shape[1:] != x.shape[1:]:
            return None
        outputs.append(user)
    return outputs


def _permute_neuron(node: fx.Node, graph: fx.Graph) -> bool:
    """Run a fused neuron on its input in memory order (a view: its kernel reads a contiguous ``[T, N]``
    and would otherwise copy the input) and give its outputs back in the input's order of dimensions."""
    spec = node.target
    if not (isinstance(spec, NeuronSpec) and spec.fused):
        return False
    val = tensor_val(node.args[0])
    order = dense_order(val) if val is not None else None
    outputs = _neuron_outputs(node) if order is not None else None
    if not outputs:
        return False
    inverse = [order.index(d) for d in range(len(order))]
    with graph.inserting_before(node):
        permuted = copy_meta(graph.call_method("permute", (node.args[0], *order)), node, PASS)
    node.update_arg(0, permuted)
    for out in outputs:
        with graph.inserting_after(out):
            back = copy_meta(graph.call_method("permute", (out, *inverse)), out, PASS)
        out.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
    return True


def _restore_outputs(graph: fx.Graph, before: List[Optional[torch.Tensor]]) -> None:
    """Give every output of the graph whose strides the rewrite changed those it had before: the rate pass
    and the user's code then see the tensors they saw without the pass. (This also keeps the eager rate
    pass's convolutions on contiguous input, off the case in which PyTorch 2.13's CPU backward of a strided
    1×1 convolution goes wrong; ``unstride_pointwise_convs`` takes those convolutions out of it anyway.)"""
    output = graph.output_node()
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    restored = []
    for node, old in zip(values, before):
        new = tensor_val(node)
        if old is None or new is None or new.stride() == old.stride():
            restored.append(node)
            continue
        with graph.inserting_before(output):
            if old.is_contiguous() or not _dense(old):
                back = graph.call_method("contiguous", (node,))
            else:
                back = graph.call_function(with_strides, (node, tuple(old.stride())))
        restored.append(copy_meta(back, node, PASS))
    output.args = (type(output.args[0])(restored),) if isinstance(output.args[0], (tuple, list)) else (restored[0],)


def _outputs(graph: fx.Graph) -> List[Optional[torch.Tensor]]:
    out = graph.output_node().args[0]
    return [tensor_val(n) for n in (out if isinstance(out, (tuple, list)) else (out,))]


def _convert_convolutions(gm: fx.GraphModule) -> bool:
    """Give each float32 2-D convolution of ``gm`` its input in channels-last memory; whether there was one."""
    graph = gm.graph
    converted = False
    for node in list(graph.nodes):
        x = _conv_input(node, gm)
        if x is None:
            continue
        with graph.inserting_before(node):
            contiguous = copy_meta(graph.call_method("contiguous", (x,), {"memory_format": torch.channels_last}),
                                   node, PASS)
        node.replace_input_with(x, contiguous)
        converted = True
    if converted:
        gm.recompile()
    return converted


def _convert_stages(spike: fx.GraphModule) -> bool:
    """Every stage of a streamed spike graph replaced by one whose chunk graphs convert their convolutions'
    inputs (the chunk graphs are copies: the stages of the program are left as they are); whether any did."""
    converted = []

    def convert(gm: fx.GraphModule) -> fx.GraphModule:
        new = _copy(gm)
        converted.append(_convert_convolutions(new))
        return new

    for name, stage in list(spike.named_children()):
        if isinstance(stage, StreamStage):
            setattr(spike, name, stage.map_graphs(convert))
    return any(converted)


def _rewrite(spike: fx.GraphModule) -> bool:
    """:func:`channels_last` on the spike graph; whether it changed."""
    graph = spike.graph
    before = _outputs(graph)
    streamed = any(isinstance(m, StreamStage) for m in spike.children())
    if not (_convert_stages(spike) if streamed else _convert_convolutions(spike)):
        return False
    placeholders = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    propagate_shapes(spike, placeholders)       # a stage's spikes: in the memory order its neuron ran on
    while any([_permute_neuron(n, graph) for n in list(graph.nodes)]):
        propagate_shapes(spike, placeholders)
    _restore_outputs(graph, before)
    propagate_shapes(spike, placeholders)
    graph.lint()
    return True


def _copy(spike: fx.GraphModule) -> fx.GraphModule:
    """A graph module over a copy of ``spike``'s graph (its nodes with their metadata) and its submodules."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(spike.graph, {}))
    return fx.GraphModule(spike, graph)


def _check(program: fx.GraphModule) -> None:
    check_values(program.spike, PASS)
    for node in program.spike.graph.nodes:
        if isinstance(node.target, NeuronSpec) and node.args[0].meta.get("ratebp.pass") == PASS:
            require(all(u.target is operator.getitem and len(u.users) == 1 and next(iter(u.users)).target == "permute"
                        for u in node.users), PASS, node, "a permuted neuron's output is read before it is permuted back",
                    program.spike)


@postcondition(_check)
def channels_last(program: fx.GraphModule) -> PassResult:
    """On CPU, run the spike pass's 2-D convolutions on channels-last (NHWC) memory, where oneDNN's
    kernels are faster for the few channels of spiking networks (the anchor bench's ResNet-18 at T = 8:
    its spike pass's convolutions about a fifth faster, the eager step 0.91–0.94×; BENCHMARKS.md), and
    keep the activations in that memory order from one convolution to the next:

    - each float32 ``Conv2d`` input gets ``.contiguous(memory_format=torch.channels_last)`` (nothing to
      do at run time when it already is); BatchNorms and element-wise ops keep the order of their input;
    - each fused neuron whose input arrives in another order than ``[T, B, C, H, W]``'s runs on a
      permuted view of it, in memory order, its outputs permuted back (a fused neuron is element-wise
      over everything but time, so this computes the same values; without it the kernel would copy its
      input to contiguous memory);
    - the spike graph's outputs (the rate pass's statistics, the user's outputs) get back the strides
      they had.

    A streamed spike pass (``stream_time``) gets the same: each stage is replaced by one whose chunk graphs
    give their convolutions channels-last input; a stage whose fused neuron's input chunks then come in
    channels-last order runs the neuron in that order and stores its spikes so (``StreamStage``), and the
    next stage's convolution reads its chunk of them as it is. The anchor bench's ResNet-18, streamed
    (T = 8, 16, 32; 1 and 2 threads): the eager step in 0.84–0.91× its time on contiguous memory
    (BENCHMARKS.md).

    Only memory orders change: every value is what it was, but for the rounding of the convolutions' own
    algorithms. The pass plans by the strides of shape propagation's fake tensors; where a run's tensors
    differ, a ``contiguous`` or the kernel's own copy puts them right, at the cost of a copy. A spike pass
    with forward hooks (which would see tensors in the new order), one with an op that needs the former
    order (a ``view`` merging a channels-last tensor's dimensions: the rewrite is tried on a copy of the
    graph, and of the stages, and kept only when shape propagation runs through it) and one on another
    device are left alone. BPTT's step is not rewritten: with autograd through every step, its backward
    on channels-last memory costs more than its forward gains.

    Before (the spike graph, a residual block's first neuron)::

        flatten_1 = to.flatten(0, 1)
        to_1 = flatten_1.to(torch.float32)
        layers_0_0_conv1 = self.layers.0.0.conv1(to_1)
        spike_batch_norm_1 = spike_batch_norm(layers_0_0_conv1, ...)
        getitem_6 = spike_batch_norm_1[0]
        unflatten_1 = getitem_6.unflatten(0, [4, -1])
        lif_spike_pass_1 = lif_fused_spike_pass(unflatten_1)
        getitem_9 = lif_spike_pass_1[0]

    After::

        flatten_1 = to.flatten(0, 1)
        to_1 = flatten_1.to(torch.float32)
        contiguous_1 = to_1.contiguous(memory_format = torch.channels_last)
        layers_0_0_conv1 = self.layers.0.0.conv1(contiguous_1)
        spike_batch_norm_1 = spike_batch_norm(layers_0_0_conv1, ...)
        getitem_6 = spike_batch_norm_1[0]
        unflatten_1 = getitem_6.unflatten(0, [4, -1])
        permute_2 = unflatten_1.permute(0, 1, 3, 4, 2)
        lif_spike_pass_1 = lif_fused_spike_pass(permute_2)
        getitem_9 = lif_spike_pass_1[0]
        permute_3 = getitem_9.permute(0, 1, 4, 2, 3)
        getitem_10 = lif_spike_pass_1[1]
        permute_4 = getitem_10.permute(0, 1, 4, 2, 3)     # r
        ...
        contiguous_9 = permute_4.contiguous()             # r in its former strides
        return (..., contiguous_9, ...)

    Streamed, a stage's chunk graph before::

        to = getitem_3.to(torch.float32)
        reshape = to.reshape((128, 16, 32, 32))
        layers_0_0_conv1 = self.layers.0.0.conv1(reshape)

    After (``getitem_3``, the stored spikes, is channels-last already: the ``contiguous`` does nothing)::

        to = getitem_3.to(torch.float32)
        reshape = to.reshape((128, 16, 32, 32))
        contiguous = reshape.contiguous(memory_format = torch.channels_last)
        layers_0_0_conv1 = self.layers.0.0.conv1(contiguous)

    Holds before: a program from compact_spikes. Holds after: every spike-graph node has ``meta["val"]``;
    a permuted neuron's outputs are read only through their permutation back; the spike graph's outputs
    are those before the pass, with the same strides (their values to the convolutions' rounding).
    """
    spike = program.spike
    hooked = any(isinstance(n.target, ModuleHooks) for n in spike.graph.nodes)
    if input_device(spike).type != "cpu" or not torch.backends.mkldnn.is_available() or hooked:
        return PassResult(program, False)
    candidate = _copy(spike)
    try:
        if not _rewrite(candidate):
            return PassResult(program, False)
    except RateBPError as e:        # an op of the model needs the former memory order (a view merging dimensions)
        log.info("channels_last: the spike graph is left as it is: %s", e)
        return PassResult(program, False)
    spike.graph = candidate.graph
    for name, stage in candidate.named_children():
        if isinstance(stage, StreamStage):
            setattr(spike, name, stage)
    program.recompile()
    return PassResult(program, True)

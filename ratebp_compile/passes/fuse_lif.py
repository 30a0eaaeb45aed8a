"""fuse_lif: neuron nodes → the fused kernels' custom ops, where the applicability predicate allows."""
from __future__ import annotations

import torch.fx as fx

from ..nn.spec import NeuronSpec
from .infra import PassResult, postcondition, require

__all__ = ["fuse_lif"]

PASS = "fuse_lif"


def _graphs(gm: fx.GraphModule):
    """``gm`` and the graph modules inside it (a program's ``spike`` and ``rate``)."""
    return [m for m in gm.modules() if isinstance(m, fx.GraphModule)]


def _fusible(node: fx.Node) -> bool:
    return isinstance(node.target, NeuronSpec) and not node.target.fused and \
        node.target.fusable(node.args[0].meta.get("val"))


def _check(gm: fx.GraphModule) -> None:
    for sub in _graphs(gm):
        for node in sub.graph.nodes:
            require(not _fusible(node), PASS, node, "a fusible neuron was left unfused", sub)


@postcondition(_check)
def fuse_lif(gm: fx.GraphModule) -> PassResult:
    """Run LIF, IF and ParametricLIF neurons as fused Triton kernels (``ratebp::lif_spike_pass`` in a
    spike graph, ``ratebp::lif_bptt_forward`` — with its reverse-time backward — in a BPTT graph).

    A neuron node is fused when its family says so (``spec.fusable(x)``): a LIF-family neuron (either
    tie rule, the reset now or delayed — snnTorch's ``Leaky`` with constants is one) with one of the
    kernels' four surrogates, on floating-point input; other neurons keep their PyTorch path. The ops run the Triton
    kernels on CUDA float32/16/bf16 tensors and their PyTorch reference otherwise (CPU, float64), or the
    kernels on CPU under ``TRITON_INTERPRET=1``.

    Before (in the program's spike graph, T = 2)::

        lif_spike_pass = ratebp_compile_nn_spec_lif_spike_pass(unflatten)

    After::

        lif_spike_pass = ratebp_compile_nn_spec_lif_fused_spike_pass(unflatten)
        #   → torch.ops.ratebp.lif_spike_pass(x [2, ...], λ, ...) → spikes, r, e

    Holds before: neurons are ``NeuronSpec`` nodes with ``meta["val"]`` on their inputs. Holds after:
    no neuron the predicate accepts is unfused; outputs are those of the unfused graph (spikes
    exactly, except where a membrane lands on the threshold within rounding).
    """
    modified = False
    for sub in _graphs(gm):
        changed = False
        for node in sub.graph.nodes:
            if _fusible(node):
                node.target = node.target.with_fused()
                node.meta["ratebp.neuron"] = node.target
                node.meta["ratebp.pass"] = PASS
                changed = True
        if changed:
            sub.recompile()
            modified = True
    return PassResult(gm, modified)

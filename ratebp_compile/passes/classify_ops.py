"""classify_ops: exact / approximate / refused, per node, with reasons."""
from __future__ import annotations

import warnings
from typing import List

import torch.fx as fx

from ..errors import ApproximationWarning, RateBPError, describe_node
from ..hooks import ModuleHooks
from ..nn.spec import NeuronSpec
from ..oprules import APPROXIMATE, HOOK, NEURON, REFUSED, Context, OpClass, classify, op_info
from .batchnorm_parts import is_batchnorm, uses_batch_statistics
from .infra import PassResult, at_node, postcondition, require

__all__ = ["classify_ops"]


def _check(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            require(isinstance(node.meta.get("ratebp.class"), OpClass), "classify_ops", node, "not classified", gm)


@postcondition(_check)
def classify_ops(gm: fx.GraphModule) -> PassResult:
    """Annotate every call node with ``meta["ratebp.class"]``, an ``OpClass``:

    - ``neuron``: a neuron; ``batchnorm``: a BatchNorm normalising with statistics over time and batch
      (the rate pass uses the spike pass's statistics, DESIGN.md);
    - ``exact``: time-local and affine in its temporal operand, or a mean/sum over time;
    - ``approximate``: time-local but not affine (the rate pass applies it to rates); each raises an
      ``ApproximationWarning`` naming the op and the source line;
    - ``refused``: mixes timesteps, is unknown on temporal tensors, or writes in place into an input or a
      module's state (state kept between calls); all of them are reported in one ``RateBPError``;
    - ``state``: a BatchNorm's batch counter updated in place (``torch.compile`` graphs): spike pass only;
    - ``hook``: a module's forward hooks (``ratebp_compile.hooks``): spike pass only;
    - ``static``: no temporal input, evaluated alike in both passes.

    Example (T = 2)::

        conv = self.conv(flatten)       exact
        pool = self.pool(conv)          approximate (MaxPool2d: max_pool is not linear ...)
        lif = lif(unflatten)            neuron
        last = lif[-1]                  refused (indexing selects one timestep)

    Holds before: every node has ``meta["ratebp.time"]``. Holds after: every call node has
    ``meta["ratebp.class"]`` and none is refused; ``gm.meta["ratebp.approximations"]`` lists the
    approximated nodes. Adds metadata only.
    """
    ctx = Context(gm, gm.meta["ratebp.T"], {n: n.meta.get("ratebp.time") for n in gm.graph.nodes})
    refused: List[str] = []
    approximations: List[str] = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        with at_node("classify_ops", node, gm):
            if isinstance(node.target, NeuronSpec):
                cls = OpClass(NEURON, node.target.describe())
            elif isinstance(node.target, ModuleHooks):
                cls = OpClass(HOOK, node.target.describe())
            else:
                bn_batch = is_batchnorm(node, gm) and uses_batch_statistics(node, gm)
                cls = classify(node, op_info(node, gm), ctx, bn_batch)
        node.meta["ratebp.class"] = cls
        if cls.kind == REFUSED:
            refused.append(f"  {describe_node(node, gm)}: {cls.reason}")
        elif cls.kind == APPROXIMATE:
            approximations.append(describe_node(node, gm))
            warnings.warn(f"rate-based backprop approximates {describe_node(node, gm)}: {cls.reason}",
                          ApproximationWarning, stacklevel=2)
    if refused:
        raise RateBPError("classify_ops: rate-based backprop cannot train this model; these ops mix timesteps, are "
                          "not supported on temporal tensors, or write into inputs or module state:\n" +
                          "\n".join(refused))
    gm.meta["ratebp.approximations"] = approximations
    return PassResult(gm, False)


"""The pieces of a BatchNorm node: an ``nn.BatchNorm*`` call, ``F.batch_norm``, a per-step BatchNorm
(``graph_ops.per_step_batch_norm``, from a folded single-step model) or a synchronised BatchNorm
(``graph_ops.sync_batch_norm``, from the ``sync_batchnorm`` pass).

Both graph builders rewrite BatchNorm nodes; this reads them the same way for both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch.fx as fx
from torch import nn

from ..errors import RateBPError, describe_node
from ..graph_ops import per_step_batch_norm, sync_batch_norm
from ..oprules import arg

__all__ = ["BatchNormParts", "batchnorm_parts", "is_batchnorm", "uses_batch_statistics", "batchnorm_module"]

Ref = Union[fx.Node, str, None]   # a node of the source graph, an attribute path, or absent


@dataclass
class BatchNormParts:
    x: fx.Node
    weight: Ref
    bias: Ref
    eps: float
    momentum: Optional[float]
    module: Optional[str]                            # module form: the BatchNorm's path
    running: Optional[Tuple[fx.Node, fx.Node]]       # functional form: running mean and var nodes
    per_step: Optional[int] = None                   # T for a BatchNorm a single-step model calls per step
    group: Optional[str] = None                      # the process group (key) it synchronises over

    def materialize(self, ref: Ref, graph: fx.Graph, env: Callable[[fx.Node], fx.Node]):
        """``ref`` as a node of ``graph``: a get_attr for a path, the mapped node for a source node."""
        if ref is None:
            return None
        if isinstance(ref, str):
            return graph.get_attr(ref)
        return env(ref)


def is_batchnorm(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm)
    return node.op == "call_function" and node.target in (nn.functional.batch_norm, per_step_batch_norm,
                                                          sync_batch_norm)


def batchnorm_module(node: fx.Node, gm: fx.GraphModule) -> Optional[nn.Module]:
    """The ``nn.BatchNorm*`` of a module-form or per-step BatchNorm node (None for ``F.batch_norm``)."""
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    if node.target is per_step_batch_norm:
        return gm.get_submodule(node.args[1].target)
    if node.target is sync_batch_norm and isinstance(node.args[3], fx.Node) and node.args[3].op == "get_attr":
        running = gm.get_submodule(node.args[3].target)
        return running if isinstance(running, nn.Module) else None
    return None


def uses_batch_statistics(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether a BatchNorm node normalises with the batch's statistics (training mode, or no
    running statistics) rather than with fixed running statistics."""
    if node.target is sync_batch_norm:
        return True
    bn = batchnorm_module(node, gm)
    if bn is not None:
        return bn.training or bn.running_mean is None
    training = arg(node, 5, "training", False)
    running_mean = arg(node, 1, "running_mean")
    return bool(training) or running_mean is None


def batchnorm_parts(node: fx.Node, gm: fx.GraphModule) -> BatchNormParts:
    if node.target is sync_batch_norm:
        x, weight, bias, running, eps, momentum, group, steps = node.args
        module = running.target if batchnorm_module(node, gm) is not None else None
        return BatchNormParts(x=x, weight=weight, bias=bias, eps=eps, momentum=momentum, module=module,
                              running=tuple(running) if isinstance(running, (tuple, list)) else None,
                              per_step=steps, group=group)
    bn = batchnorm_module(node, gm)
    if bn is not None:
        path = node.target if node.op == "call_module" else node.args[1].target
        return BatchNormParts(
            x=node.args[0],
            weight=f"{path}.weight" if bn.weight is not None else None,
            bias=f"{path}.bias" if bn.bias is not None else None,
            eps=float(bn.eps), momentum=bn.momentum, module=path, running=None,
            per_step=node.args[2] if node.op == "call_function" else None)
    running_mean, running_var = arg(node, 1, "running_mean"), arg(node, 2, "running_var")
    for r in (running_mean, running_var):
        if r is not None and not (isinstance(r, fx.Node) and r.op in ("get_attr", "placeholder")):
            raise RateBPError(f"{describe_node(node, gm)}: running statistics must be a module buffer or an input")
    return BatchNormParts(
        x=node.args[0], weight=arg(node, 3, "weight"), bias=arg(node, 4, "bias"),
        eps=float(arg(node, 7, "eps", 1e-5)), momentum=float(arg(node, 6, "momentum", 0.1)), module=None,
        running=(running_mean, running_var) if running_mean is not None else None)

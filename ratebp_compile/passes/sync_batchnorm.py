"""sync_batchnorm: BatchNorms that synchronise over a process group become one ``sync_batch_norm`` node."""
from __future__ import annotations

from typing import Optional

import torch.fx as fx
from torch import nn

from ..capture import propagate_shapes
from ..collectives import group_key, world_size
from ..errors import RateBPError
from ..graph_ops import sync_batch_norm
from .batchnorm_parts import batchnorm_module, batchnorm_parts, is_batchnorm, uses_batch_statistics
from .infra import PassResult, at_node, copy_meta, postcondition, require

__all__ = ["sync_batchnorm", "SYNC_GROUP", "refuse_local_batchnorms"]

PASS = "sync_batchnorm"
SYNC_GROUP = "ratebp.sync_batchnorm"     # gm.meta: the key of the group every BatchNorm syncs over, or None


def _group(node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
    """The group a training-mode BatchNorm node synchronises over, or None: an ``nn.SyncBatchNorm`` in
    training mode over its own ``process_group`` (the default group if none), any other BatchNorm using
    batch statistics over the group of the ``sync_batchnorm`` option (a module only in training mode, as
    ``nn.SyncBatchNorm`` does)."""
    if not (is_batchnorm(node, gm) and uses_batch_statistics(node, gm)) or node.target is sync_batch_norm:
        return None
    bn = batchnorm_module(node, gm)
    if bn is not None and not bn.training:
        return None
    if isinstance(bn, nn.SyncBatchNorm):
        return group_key(bn.process_group or True)
    return gm.meta.get(SYNC_GROUP)


def refuse_local_batchnorms(names, group: Optional[str]) -> None:
    """Raise when the plain model (training mode, autograd off) would run BatchNorms the ``sync_batchnorm``
    option synchronises — ``names``, in training mode — with each process's own statistics: only the
    compiled step synchronises them (``nn.SyncBatchNorm`` synchronises itself)."""
    names = list(names)
    if group is None or not names or world_size(group) == 1:
        return
    raise RateBPError(f"sync_batchnorm: in training mode with autograd off the model runs as it is, and its "
                      f"BatchNorms ({'; '.join(names[:3])}{'; ...' if len(names) > 3 else ''}) would normalise each process's "
                      f"batch with its own statistics and update their running statistics from it; run it with "
                      f"autograd on (the synchronised step), in eval mode, or use nn.SyncBatchNorm")


def _check(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        require(_group(node, gm) is None, PASS, node, "a synchronised BatchNorm was left local", gm)


@postcondition(_check)
def sync_batchnorm(gm: fx.GraphModule) -> PassResult:
    """Make every BatchNorm that synchronises over a process group (see ``_group``) one ``sync_batch_norm``
    node: its weight, bias, running statistics (the module, or the functional form's pair), ε, momentum
    (None: the module's own, read at run time), the group's key and, for a per-step BatchNorm, T. Run as is
    it is the BatchNorm with statistics over every rank's batch (BPTT); the graph builders read it as a
    BatchNorm like any other, with its group.

    Before (``sync_batchnorm=True``)::

        def forward(self, x):
            flatten = x.flatten(0, 1)
            conv = self.conv(flatten)
            bn = self.bn(conv)
            ...

    After::

        def forward(self, x):
            flatten = x.flatten(0, 1)
            conv = self.conv(flatten)
            bn_weight = self.bn.weight
            bn_bias = self.bn.bias
            bn_1 = self.bn
            sync_batch_norm = ratebp_compile_graph_ops_sync_batch_norm(conv, bn_weight, bn_bias, bn_1, 1e-05, None, 'WORLD', None)
            ...

    Holds after: no BatchNorm that synchronises is left in another form. Nothing else changed.
    """
    modified = False
    for node in list(gm.graph.nodes):
        group = _group(node, gm)
        if group is None:
            continue
        with at_node(PASS, node, gm):
            parts = batchnorm_parts(node, gm)
            g = gm.graph
            with g.inserting_before(node):
                weight, bias = (ref if not isinstance(ref, str) else g.get_attr(ref)
                                for ref in (parts.weight, parts.bias))
                running = g.get_attr(parts.module) if parts.module is not None else parts.running
                momentum = None if parts.module is not None else parts.momentum
                new = g.call_function(sync_batch_norm, (parts.x, weight, bias, running, parts.eps, momentum, group,
                                                        parts.per_step))
            copy_meta(new, node, PASS, node.meta.get("val"))
            node.replace_all_uses_with(new)
            g.erase_node(node)
            for old in node.all_input_nodes:          # a per-step BatchNorm's reference to its module
                if old.op == "get_attr" and not old.users:
                    g.erase_node(old)
            modified = True
    if modified:
        gm.recompile()
        propagate_shapes(gm, [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])
    return PassResult(gm, modified)

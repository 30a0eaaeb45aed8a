"""``from_reference_spec``: the architecture described by a reference fixture's ``meta``.

The reference gradients in ``fixtures/reference`` were produced by the paper authors' code; each file's
``meta`` describes its network (see the fixtures' README). The model built here has the parameters
in the same order and with the same shapes, so the fixture's tensors load by position.
"""
from __future__ import annotations

import json
from functools import partial
from typing import Any, Dict, Union

from torch import nn

from .common import default_neuron
from .resnet import SpikingResNet
from .vgg import SpikingVGG

__all__ = ["from_reference_spec", "reference_neuron"]


def reference_neuron(meta: Dict[str, Any]):
    """The fixtures' neuron: LIF without input decay, λ = meta["decay"], V_th = meta["v_threshold"],
    soft reset with the spike detached, sigmoid surrogate α = 4."""
    return partial(default_neuron, decay=float(meta["decay"]), v_threshold=float(meta["v_threshold"]))


def from_reference_spec(meta: Union[Dict[str, Any], str]) -> nn.Module:
    """Build the network a fixture's ``meta`` describes (a dict, or its JSON string)."""
    if isinstance(meta, str):
        meta = json.loads(meta)
    try:
        arch = meta["arch"]
        kind = arch["kind"]
        in_channels, num_classes = int(meta["in_channels"]), int(meta["num_classes"])
        neuron = reference_neuron(meta)
    except (KeyError, TypeError) as e:
        raise ValueError(f"reference meta is missing {e}: expected arch, in_channels, num_classes, decay, "
                         f"v_threshold") from None
    if kind == "resnet":
        return SpikingResNet(arch["blocks"], arch["widths"], num_classes, in_channels, arch.get("head", "resnet18"),
                             neuron)
    if kind == "vgg":
        classifier = list(arch["classifier"])
        return SpikingVGG(arch["feature"], classifier, in_channels, neuron)
    raise ValueError(f"unknown reference architecture kind {kind!r}: expected 'resnet' or 'vgg'")

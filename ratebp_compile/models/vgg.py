"""Spiking VGG networks (VGG-11, VGG-13, VGG-SNN) and the spiking MLP.

A VGG feature configuration is a list of: an int c (conv3×3 with bias, BatchNorm, neuron), "A"
(AvgPool2d 2×2), "M" (MaxPool2d 2×2, approximated by rate-based backprop), "AA" (adaptive average
pool to 1×1) or "AA3" (to 3×3). The classifier [n0, n1, …, K] is Linear(n0→n1)–neuron–…–Linear(→K).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.fx
from torch import nn

from .common import NeuronFactory, expect_rank, merge_time, neuron_factory, split_time

__all__ = ["SpikingVGG", "SpikingMLP", "vgg11", "vgg13", "vggsnn", "VGG_FEATURES"]

VGG_FEATURES = {
    "vgg11": [64, "A", 128, 256, "A", 512, 512, "A", 512, "A", 512, 512, "AA"],
    "vgg13": [64, 64, "A", 128, 128, "A", 256, 256, "A", 512, 512, 512, "A", 512, "AA"],
    "vggsnn": [64, 128, "A", 256, 256, "A", 512, 512, "A", 512, 512, "AA3"],
    "vggsnn_dvs": [64, 128, "A", 256, 256, "A", 512, 512, "A", 512, 512, "A"],
}

Entry = Union[int, str]


class ConvBNNeuron(nn.Module):
    """conv3×3 (with bias) – BatchNorm – neuron, on ``[T, B, C, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int, neuron: NeuronFactory):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=True)
        self.bn = nn.BatchNorm2d(out_channels)
        self.sn = neuron()

    def forward(self, x_seq):
        return self.sn(split_time(self.bn(self.conv(merge_time(x_seq))), x_seq.shape[0]))


class PerStep(nn.Module):
    """A stateless layer applied to every timestep of ``[T, B, ...]``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x_seq):
        return split_time(self.layer(merge_time(x_seq)), x_seq.shape[0])


def _pool(entry: str) -> nn.Module:
    return {"A": lambda: nn.AvgPool2d(2, 2), "M": lambda: nn.MaxPool2d(2, 2),
            "AA": lambda: nn.AdaptiveAvgPool2d(1), "AA3": lambda: nn.AdaptiveAvgPool2d(3)}[entry]()


class SpikingVGG(nn.Module):
    """``x_seq`` ``[T, B, C, H, W]`` → logits ``[T, B, K]`` (K = ``classifier[-1]``)."""

    def __init__(self, features: Sequence[Entry], classifier: Sequence[int], in_channels: int = 3,
                 neuron: Optional[NeuronFactory] = None):
        super().__init__()
        neuron = neuron_factory(neuron)
        layers, channels = [], in_channels
        for entry in features:
            if isinstance(entry, int):
                layers.append(ConvBNNeuron(channels, entry, neuron))
                channels = entry
            elif entry in ("A", "M", "AA", "AA3"):
                layers.append(PerStep(_pool(entry)))
            else:
                raise ValueError(f"unknown VGG feature entry {entry!r}: expected an int, 'A', 'M', 'AA' or 'AA3'")
        self.features = nn.Sequential(*layers)
        if len(classifier) < 2:
            raise ValueError(f"classifier must list at least [n_in, n_classes], got {list(classifier)}")
        head = []
        for i, (n_in, n_out) in enumerate(zip(classifier[:-1], classifier[1:])):
            head.append(nn.Linear(n_in, n_out))
            if i < len(classifier) - 2:
                head.append(neuron())
        self.classifier = nn.Sequential(*head)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        expect_rank(x_seq, 5, "x_seq [T, B, C, H, W]")
        x = self.features(x_seq)
        return self.classifier(x.flatten(2))


def _scaled(config, width: int):
    return [max(1, c * width // 64) if isinstance(c, int) else c for c in config]


def vgg11(num_classes: int = 10, in_channels: int = 3, width: int = 64,
          neuron: Optional[NeuronFactory] = None) -> SpikingVGG:
    """Spiking VGG-11 (channels scaled by width/64), classifier Linear(8w → K)."""
    return SpikingVGG(_scaled(VGG_FEATURES["vgg11"], width), [8 * width, num_classes], in_channels, neuron)


def vgg13(num_classes: int = 10, in_channels: int = 3, width: int = 64,
          neuron: Optional[NeuronFactory] = None) -> SpikingVGG:
    """Spiking VGG-13, classifier Linear(8w → K)."""
    return SpikingVGG(_scaled(VGG_FEATURES["vgg13"], width), [8 * width, num_classes], in_channels, neuron)


def vggsnn(num_classes: int = 10, in_channels: int = 3, width: int = 64, dvs: bool = False,
           neuron: Optional[NeuronFactory] = None) -> SpikingVGG:
    """VGG-SNN: 8 conv layers, 3×3 feature map at the end (pooled adaptively for 32×32 inputs, by a
    fourth average pool for 48×48 event-camera inputs with ``dvs=True``), classifier Linear(72w → K)."""
    features = _scaled(VGG_FEATURES["vggsnn_dvs" if dvs else "vggsnn"], width)
    return SpikingVGG(features, [8 * width * 9, num_classes], in_channels, neuron)


def mlp(num_classes: int = 10, in_channels: int = 64, width: int = 16,
        neuron: Optional[NeuronFactory] = None) -> "SpikingMLP":
    """A spiking MLP with two hidden layers of 8w neurons; ``in_channels`` is the number of input features
    per timestep (a step's input ``[T, B, ...]`` is flattened)."""
    return SpikingMLP(in_channels, (8 * width, 8 * width), num_classes, neuron=neuron)


class SpikingMLP(nn.Module):
    """A spiking multilayer perceptron: ``x_seq`` ``[T, B, ...]`` → ``[T, B, K]``.

    Each hidden layer is Linear – (BatchNorm1d over time and batch, with ``batch_norm=True``) – neuron.
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (256, 256), num_classes: int = 10,
                 batch_norm: bool = False, neuron: Optional[NeuronFactory] = None):
        super().__init__()
        neuron = neuron_factory(neuron)
        layers, n_in = [], in_features
        for n in hidden:
            layers.append(_HiddenLayer(n_in, n, batch_norm, neuron))
            n_in = n
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(n_in, num_classes)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x_seq.flatten(2)))


class _HiddenLayer(nn.Module):
    def __init__(self, n_in: int, n_out: int, batch_norm: bool, neuron: NeuronFactory):
        super().__init__()
        self.fc = nn.Linear(n_in, n_out, bias=not batch_norm)
        self.bn = nn.BatchNorm1d(n_out) if batch_norm else None
        self.sn = neuron()

    def forward(self, x_seq):
        x = self.fc(x_seq)
        if self.bn is not None:
            x = split_time(self.bn(merge_time(x)), x_seq.shape[0])
        return self.sn(x)


torch.fx.wrap("expect_rank")

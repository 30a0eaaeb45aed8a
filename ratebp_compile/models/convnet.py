"""A small spiking convolutional network, for small images (the 8×8 digits, MNIST-sized inputs).

conv3×3(C→w)–BN–neuron–AvgPool2 – conv3×3(w→2w)–BN–neuron – adaptive average pool to p×p –
Linear(2w·p² → K); ``x_seq`` ``[T, B, C, H, W]`` → logits ``[T, B, K]``. ``convnet``: p = 2 (8×8 digits);
``convnet28``: p = 7 (28×28 MNIST digits keep a 7×7 map).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx
from torch import nn

from .common import NeuronFactory, expect_rank, neuron_factory
from .vgg import ConvBNNeuron, PerStep

__all__ = ["SpikingConvNet", "convnet", "convnet28"]


class SpikingConvNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16,
                 neuron: Optional[NeuronFactory] = None, pooled: int = 2):
        super().__init__()
        neuron = neuron_factory(neuron)
        self.block1 = ConvBNNeuron(in_channels, width, neuron)
        self.pool1 = PerStep(nn.AvgPool2d(2))
        self.block2 = ConvBNNeuron(width, 2 * width, neuron)
        self.pool2 = PerStep(nn.AdaptiveAvgPool2d(pooled))
        self.classifier = nn.Linear(2 * width * pooled * pooled, num_classes)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        expect_rank(x_seq, 5, "x_seq [T, B, C, H, W]")
        x = self.pool2(self.block2(self.pool1(self.block1(x_seq))))
        return self.classifier(x.flatten(2))


def convnet(num_classes: int = 10, in_channels: int = 1, width: int = 16,
            neuron: Optional[NeuronFactory] = None) -> SpikingConvNet:
    """The small spiking conv net (channels w and 2w)."""
    return SpikingConvNet(num_classes, in_channels, width, neuron)


def convnet28(num_classes: int = 10, in_channels: int = 1, width: int = 16,
              neuron: Optional[NeuronFactory] = None) -> SpikingConvNet:
    """The small spiking conv net for 28×28 images: its last feature map pooled to 7×7, not 2×2."""
    return SpikingConvNet(num_classes, in_channels, width, neuron, pooled=7)


torch.fx.wrap("expect_rank")

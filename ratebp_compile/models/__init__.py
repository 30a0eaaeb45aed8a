"""Model zoo: spiking ResNet-18/19, VGG-11/13, VGG-SNN, a small conv net and an MLP.

Every model takes ``x_seq`` ``[T, B, C, H, W]`` (the MLP: ``[T, B, ...]``) and returns per-step logits
``[T, B, K]``; ``neuron=`` picks the neuron factory (default: the paper's LIF, λ = 0.2, V_th = 1).
"""
from .common import default_neuron
from .convnet import SpikingConvNet, convnet, convnet28
from .reference import from_reference_spec, reference_neuron
from .resnet import BasicBlock, SpikingResNet, resnet18, resnet19
from .vgg import SpikingMLP, SpikingVGG, mlp, vgg11, vgg13, vggsnn

__all__ = ["resnet18", "resnet19", "vgg11", "vgg13", "vggsnn", "convnet", "convnet28", "mlp", "SpikingResNet", "SpikingVGG", "SpikingMLP",
           "SpikingConvNet",
           "BasicBlock", "from_reference_spec", "reference_neuron", "default_neuron", "ZOO"]

#: name -> builder(num_classes, in_channels, width); the MLP's ``in_channels`` is its input features per step
ZOO = {"resnet18": resnet18, "resnet19": resnet19, "vgg11": vgg11, "vgg13": vgg13, "vggsnn": vggsnn,
       "convnet": convnet, "convnet28": convnet28, "mlp": mlp}

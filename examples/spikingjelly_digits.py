"""A SpikingJelly network, written as its tutorials write it, trained with rate-based backprop.

    python examples/spikingjelly_digits.py [--epochs 3] [--T 4]

The network is plain SpikingJelly (multi-step LIF neurons, its layers); ``rc.transform`` compiles its
training step. The data is scikit-learn's 8x8 digits, encoded by feeding the image as a constant input
current at every step. Needs SpikingJelly 2.x and scikit-learn.
"""
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional, layer, neuron, surrogate

import ratebp_compile as rc
from digits import arguments, train


def build(tau: float = 2.0) -> torch.nn.Module:
    return torch.nn.Sequential(
        layer.Conv2d(1, 16, 3, padding=1, bias=False), layer.BatchNorm2d(16),
        neuron.LIFNode(tau=tau, surrogate_function=surrogate.ATan(), step_mode="m"),
        layer.Flatten(), layer.Linear(16 * 8 * 8, 10),
        neuron.LIFNode(tau=tau, surrogate_function=surrogate.ATan(), step_mode="m"))


def main(argv=None) -> float:
    args = arguments(__doc__, argv, T=4)
    torch.manual_seed(0)
    net = build()
    functional.set_step_mode(net, "m")
    model = rc.transform(net)                    # the rate-based training step; eval runs SpikingJelly's own
    return train(net, model, args, images=True, reset=functional.reset_net,
                 loss_fn=lambda spikes, y: F.cross_entropy(spikes.mean(0) * 10, y))   # firing rates as logits


if __name__ == "__main__":
    main()

"""A SpikingJelly network, written as its tutorials write it, trained with rate-based backprop.

    python examples/spikingjelly_digits.py [--epochs 3] [--T 4]

The network is plain SpikingJelly (multi-step LIF neurons, its layers); ``rc.transform`` compiles its
training step. The data is scikit-learn's 8x8 digits, encoded by feeding the image as a constant input
current at every step. Needs SpikingJelly 2.x and scikit-learn.
"""
import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from spikingjelly.activation_based import functional, layer, neuron, surrogate

import ratebp_compile as rc


def build(tau: float = 2.0) -> torch.nn.Module:
    return torch.nn.Sequential(
        layer.Conv2d(1, 16, 3, padding=1, bias=False), layer.BatchNorm2d(16),
        neuron.LIFNode(tau=tau, surrogate_function=surrogate.ATan(), step_mode="m"),
        layer.Flatten(), layer.Linear(16 * 8 * 8, 10),
        neuron.LIFNode(tau=tau, surrogate_function=surrogate.ATan(), step_mode="m"))


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--T", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
    net = build()
    functional.set_step_mode(net, "m")
    model = rc.transform(net)                    # the rate-based training step; eval runs SpikingJelly's own
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for epoch in range(args.epochs):
        model.train()
        for i in torch.randperm(len(x_train)).split(args.batch_size):
            x_seq = x_train[i].unsqueeze(0).repeat(args.T, 1, 1, 1, 1)       # [T, B, 1, 8, 8]
            loss = F.cross_entropy(model(x_seq).mean(0) * 10, y_train[i])     # firing rates as logits
            opt.zero_grad()
            loss.backward()
            opt.step()
            functional.reset_net(net)
        model.eval()
        with torch.no_grad():
            rates = model(x_test.unsqueeze(0).repeat(args.T, 1, 1, 1, 1)).mean(0)
            functional.reset_net(net)
        accuracy = (rates.argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch}: loss {loss.item():.3f}, test accuracy {100 * accuracy:.1f}%")
    return accuracy


if __name__ == "__main__":
    main()

"""A Norse network, written as its tutorials write it, trained with rate-based backprop.

    python examples/norse_digits.py [--epochs 3] [--T 8]

Norse's current-based ``LIFCell`` neurons, called once per step inside ``forward`` with their state
passed along (``z, s = cell(x, s)``); ``rc.transform`` compiles the training step. The output is the
spike count of the last layer. Data: scikit-learn's 8x8 digits as a constant input current. Needs Norse
and scikit-learn.
"""
import argparse

import norse.torch as norse
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import ratebp_compile as rc


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        p = norse.LIFParameters(tau_mem_inv=torch.tensor(200.0), v_th=torch.tensor(0.3))
        self.fc1, self.lif1 = nn.Linear(64, 128), norse.LIFCell(p)
        self.fc2, self.lif2 = nn.Linear(128, 10), norse.LIFCell(p)

    def forward(self, x):                          # x: [T, B, 64]
        s1 = s2 = None
        spikes = []
        for x_t in x:
            z1, s1 = self.lif1(self.fc1(x_t) * 10.0, s1)
            z2, s2 = self.lif2(self.fc2(z1) * 10.0, s2)
            spikes.append(z2)
        return torch.stack(spikes)                 # [T, B, 10]


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--T", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
    net = Net()
    model = rc.transform(net)                      # the rate-based training step; eval runs Norse's own
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for epoch in range(args.epochs):
        model.train()
        for i in torch.randperm(len(x_train)).split(args.batch_size):
            loss = F.cross_entropy(model(x_train[i].expand(args.T, -1, -1)).sum(0), y_train[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            counts = model(x_test.expand(args.T, -1, -1)).sum(0)
        accuracy = (counts.argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch}: loss {loss.item():.3f}, test accuracy {100 * accuracy:.1f}%")
    return accuracy


if __name__ == "__main__":
    main()

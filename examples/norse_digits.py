"""A Norse network, written as its tutorials write it, trained with rate-based backprop.

    python examples/norse_digits.py [--epochs 3] [--T 8]

Norse's current-based ``LIFCell`` neurons, called once per step inside ``forward`` with their state
passed along (``z, s = cell(x, s)``); ``rc.transform`` compiles the training step. The output is the
spike count of the last layer. Data: scikit-learn's 8x8 digits as a constant input current. Needs Norse
and scikit-learn.
"""
import norse.torch as norse
import torch
import torch.nn.functional as F
from torch import nn

import ratebp_compile as rc
from digits import arguments, train


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
    args = arguments(__doc__, argv)
    torch.manual_seed(0)
    net = Net()
    model = rc.transform(net)                      # the rate-based training step; eval runs Norse's own
    return train(net, model, args, images=False,
                 loss_fn=lambda spikes, y: F.cross_entropy(spikes.sum(0), y))     # spike counts as logits


if __name__ == "__main__":
    main()

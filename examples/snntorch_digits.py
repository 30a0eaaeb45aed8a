"""An snnTorch network, written as its tutorials write it, trained with rate-based backprop.

    python examples/snntorch_digits.py [--epochs 3] [--T 8]

The network is tutorial 5's: ``Leaky`` neurons with their membrane passed explicitly through the time
loop inside ``forward``; ``rc.transform`` compiles its training step. The loss is snnTorch's own
cross-entropy on spike counts (``snntorch.functional.ce_count_loss``; the rate-based step trains through
spikes, not through the membrane). Data: scikit-learn's 8x8 digits as a constant input current. Needs
snnTorch and scikit-learn.
"""
import snntorch as snn
import snntorch.functional as SF
import torch
from torch import nn

import ratebp_compile as rc
from digits import arguments, train


class Net(nn.Module):
    def __init__(self, beta: float = 0.9):
        super().__init__()
        self.fc1, self.lif1 = nn.Linear(64, 128), snn.Leaky(beta=beta)
        self.fc2, self.lif2 = nn.Linear(128, 10), snn.Leaky(beta=beta)

    def forward(self, x):                          # x: [T, B, 64]
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        spk2_rec = []
        for step in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[step]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spk2_rec.append(spk2)
        return torch.stack(spk2_rec)               # [T, B, 10]


def main(argv=None) -> float:
    args = arguments(__doc__, argv)
    torch.manual_seed(0)
    net = Net()
    model = rc.transform(net)                      # the rate-based training step; eval runs snnTorch's own
    return train(net, model, args, images=False, loss_fn=SF.ce_count_loss())


if __name__ == "__main__":
    main()

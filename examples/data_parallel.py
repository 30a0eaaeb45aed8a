"""A spiking conv net with BatchNorm trained on several processes: DDP around the rate-based step.

    torchrun --standalone --nproc-per-node 2 examples/data_parallel.py [--epochs 5] [--amp bf16]

Each process trains on its share of every batch (a ``DistributedSampler``); ``DistributedDataParallel``
averages the gradients, and ``sync_batchnorm=True`` makes every BatchNorm take its statistics over all the
processes' batches, so a step is the one-process step on the whole batch. Gloo on the CPU, NCCL with one
GPU per process. Rank 0 prints. Data: scikit-learn's 8x8 digits as a constant input current. Needs
scikit-learn.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import ratebp_compile as rc


class Net(nn.Module):
    """conv–BN–LIF, average pool, conv–BN–LIF, average pool, linear, on ``[T, B, 1, 8, 8]``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.lif1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), rc.nn.LIF()
        self.conv2, self.bn2, self.lif2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), rc.nn.LIF()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        T = x.shape[0]
        h = self.lif1(self.bn1(self.conv1(x.flatten(0, 1))).unflatten(0, (T, -1)))
        h = F.avg_pool2d(h.flatten(0, 1), 2)
        h = self.lif2(self.bn2(self.conv2(h)).unflatten(0, (T, -1)))
        return self.fc(h.mean((3, 4)))                 # [T, B, 10]


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--amp", choices=("bf16",), help="autocast the step to bfloat16")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")          # torchrun sets RANK, WORLD_SIZE, ...
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    train_set, (x_test, y_test) = TensorDataset(x[:1400], y[:1400]), (x[1400:], y[1400:])
    sampler = DistributedSampler(train_set, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    torch.manual_seed(0)                                         # the same parameters on every process
    net = Net().to(device)
    model = DDP(rc.transform(net, sync_batchnorm=True), device_ids=[device.index] if cuda else None)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for xb, yb in loader:
            xb = xb.to(device).unsqueeze(0).expand(args.T, *xb.shape)        # [T, B, 1, 8, 8]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
                loss = F.cross_entropy(model(xb).mean(0).float(), yb.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()                                               # every process has the same model
        with torch.no_grad():
            xt = x_test.to(device).unsqueeze(0).expand(args.T, *x_test.shape)
            accuracy = (net(xt).mean(0).argmax(1).cpu() == y_test).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch}: loss {loss.item():.3f}, test accuracy {100 * accuracy:.1f}%", flush=True)
    dist.destroy_process_group()
    return accuracy


if __name__ == "__main__":
    main()

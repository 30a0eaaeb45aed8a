"""What the examples share: scikit-learn's 8x8 digits as a constant input current over T steps, and a
plain training loop around a transformed model. Each example only builds its network."""
import argparse
from typing import Callable, Optional

import torch
from sklearn.datasets import load_digits


def arguments(doc: str, argv=None, T: int = 8) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--T", type=int, default=T)
    parser.add_argument("--batch-size", type=int, default=64)
    return parser.parse_args(argv)


def train(net: torch.nn.Module, model: torch.nn.Module, args: argparse.Namespace, images: bool,
          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
          reset: Optional[Callable[[torch.nn.Module], None]] = None) -> float:
    """Train ``model`` (``rc.transform(net)``) with Adam on 1,400 digits, test on the other 397 after each
    epoch (the class with the most spikes); ``images``: [B, 1, 8, 8] samples, else [B, 64]; ``reset``: what
    the library needs between batches. Returns the last test accuracy."""
    digits = load_digits()
    x = torch.tensor(digits.images if images else digits.data, dtype=torch.float32) / 16.0
    x = x.unsqueeze(1) if images else x
    y = torch.tensor(digits.target)
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
    steps = lambda batch: batch.unsqueeze(0).expand(args.T, *batch.shape)     # noqa: E731  [T, B, ...]
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for epoch in range(args.epochs):
        model.train()
        for i in torch.randperm(len(x_train)).split(args.batch_size):
            loss = loss_fn(model(steps(x_train[i])), y_train[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if reset is not None:
                reset(net)
        model.eval()
        with torch.no_grad():
            counts = model(steps(x_test)).sum(0)
            if reset is not None:
                reset(net)
        accuracy = (counts.argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch}: loss {loss.item():.3f}, test accuracy {100 * accuracy:.1f}%")
    return accuracy

"""What both commands share: devices, models, the training step, step memory, run records."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..memory import LiveTensorTracker
from .data import CLIError

__all__ = ["pick_device", "build_model", "make_runner", "train_step", "StepMemory", "synchronize", "environment",
           "write_json", "ensure_parent", "default_path", "command_line", "MiB", "METHODS"]

MiB = 2 ** 20
METHODS = ("ratebp", "bptt")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, auto)") from None


def build_model(name: str, width: int, in_channels: int, num_classes: int, seed: int) -> nn.Module:
    """A zoo model, its parameters drawn from ``seed``."""
    if name not in models.ZOO:
        raise CLIError(f"unknown model {name!r}; choose from {', '.join(sorted(models.ZOO))}")
    if width < 1:
        raise CLIError(f"--width must be at least 1, got {width}")
    torch.manual_seed(seed)
    return models.ZOO[name](num_classes=num_classes, in_channels=in_channels, width=width)


def make_runner(model: nn.Module, method: str, compiled: bool, time_chunk: Optional[int]) -> Callable:
    """What a training step calls: the rate-based step (``transform``), or BPTT (the model itself); through
    ``torch.compile`` with ``compiled`` (the ``ratebp`` backend, and Inductor for BPTT)."""
    import ratebp_compile as rc

    if method == "ratebp":
        if compiled:
            return torch.compile(model, backend="ratebp", options={"time_chunk": time_chunk})
        return rc.transform(model, time_chunk=time_chunk)
    return torch.compile(model) if compiled else model


def train_step(runner: Callable, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    """One step: cross-entropy of the time-mean logits, backward, optimizer step. Returns (loss, logits)."""
    optimizer.zero_grad(set_to_none=True)
    logits = runner(x).mean(0)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


class StepMemory:
    """Peak bytes of the tensors one training step creates (activations, transients, gradients):
    the CUDA allocator's peak above what was allocated before the step, or on CPU the live-tensor
    tracker's peak (which slows the step it watches: do not time that step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._tracker = None
        self._base = 0
        self.peak_bytes: Optional[int] = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._tracker = LiveTensorTracker().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._tracker.__exit__(*exc)
            self.peak_bytes = self._tracker.peak_bytes


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> Dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
           "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def default_path(kind: str, stem: str, ext: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{kind}-{stem}-{stamp}.{ext}")


def ensure_parent(path: str) -> None:
    """Create the folder ``path`` goes in, if it has one."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)


def write_json(path: str, record: Dict[str, Any]) -> None:
    ensure_parent(path)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def command_line() -> str:
    return " ".join(["ratebp"] + sys.argv[1:])

"""What both commands share: devices, models, the training step, step memory, files and run records."""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import secrets
import sys
import time
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..memory import LiveTensorTracker
from .data import CLIError

__all__ = ["pick_device", "build_model", "make_runner", "train_step", "Precision", "AMP_DTYPES", "StepMemory", "synchronize", "environment", "pyplot", "finish_figure",
           "write_atomically", "write_json", "ensure_parent", "default_path", "command_line", "MiB"]

MiB = 2 ** 20


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, auto)") from None


def build_model(name: str, width: int, step_shape: tuple, num_classes: int, seed: int) -> nn.Module:
    """A zoo model for inputs whose timesteps are ``step_shape`` (``(C, H, W)`` or ``(features,)``), its
    parameters drawn from ``seed``."""
    if name not in models.ZOO:
        raise CLIError(f"unknown model {name!r}; choose from {', '.join(sorted(models.ZOO))}")
    if width < 1:
        raise CLIError(f"--width must be at least 1, got {width}")
    if name != "mlp" and len(step_shape) != 3:
        raise CLIError(f"--model {name} takes images; this data has {step_shape[0]} features per step: use --model mlp")
    torch.manual_seed(seed)
    in_channels = math.prod(step_shape) if name == "mlp" else step_shape[0]
    return models.ZOO[name](num_classes=num_classes, in_channels=in_channels, width=width)


def memory_options(memory_budget: str, time_chunk: int) -> Dict[str, Any]:
    """The spike pass's memory options from the command line's ``--memory-budget`` (as written) and
    ``--time-chunk`` (0: as the budget decides); a :class:`CLIError` for values they cannot take."""
    from ..errors import RateBPError
    from ..options import parse_memory_budget

    if time_chunk < 0:
        raise CLIError(f"--time-chunk must be 0 (as the memory budget decides) or positive, got {time_chunk}")
    try:
        return {"memory_budget": parse_memory_budget(str(memory_budget)), "time_chunk": time_chunk or None}
    except RateBPError as e:
        raise CLIError(f"--memory-budget: {e}") from None


def make_runner(model: nn.Module, method: str, compiled: bool, memory: Dict[str, Any],
                sync_batchnorm: bool = False) -> Callable:
    """What a training step calls: the rate-based step (``transform``), or BPTT (the model itself); through
    ``torch.compile`` with ``compiled`` (the ``ratebp`` backend, and Inductor for BPTT). ``memory``: the
    spike pass's ``memory_budget`` and ``time_chunk`` options. With ``sync_batchnorm`` BatchNorms normalise
    over every process's batch (BPTT then through ``transform``'s BPTT, which synchronises them too)."""
    import ratebp_compile as rc

    options = {"method": method, **memory, **({"sync_batchnorm": True} if sync_batchnorm else {})}
    if method == "ratebp" or sync_batchnorm:
        if compiled:
            return torch.compile(model, backend="ratebp", options=options)
        return rc.transform(model, **options)
    return torch.compile(model) if compiled else model


#: ``--amp`` choices: the autocast dtype of the training step's forward.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """The training step's precision: float32, or ``torch.autocast`` to ``amp`` ("bf16" or "fp16") around the
    forward and the loss, with a ``GradScaler`` for float16 (whose gradients would underflow)."""

    def __init__(self, amp: Optional[str], device: torch.device):
        if amp is not None and amp not in AMP_DTYPES:
            raise CLIError(f"--amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        self.dtype = AMP_DTYPES.get(amp)
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)


def train_step(runner: Callable, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               precision: Optional[Precision] = None):
    """One step: cross-entropy of the time-mean logits (float32), backward, optimizer step; under autocast
    (and loss scaling) as ``precision`` says. Returns (loss, logits)."""
    optimizer.zero_grad(set_to_none=True)
    scaler = precision.scaler if precision is not None else None
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        logits = runner(x).mean(0).float()
        loss = F.cross_entropy(logits, y)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach(), logits.detach()


def interleaved_times(steps: Dict[str, Callable[[], Any]], warmup: int, timed: int,
                      device: torch.device) -> Tuple[Dict[str, List[float]], Dict[str, float]]:
    """Run each named step ``warmup + timed`` times, the names interleaved (one step of each in turn, so
    that a slow drift of the machine hits all alike), synchronising ``device`` around each: returns the
    seconds of the timed steps per name, and of each name's first step (compilation included)."""
    times: Dict[str, List[float]] = {name: [] for name in steps}
    first: Dict[str, float] = {}
    for i in range(warmup + timed):
        for name, run in steps.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            elapsed = time.perf_counter() - start
            first.setdefault(name, elapsed)
            if i >= warmup:
                times[name].append(elapsed)
    return times, first


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


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only); a :class:`CLIError` if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("the plot needs matplotlib (pip install matplotlib)") from None
    return plt


def finish_figure(plt, fig, axes, xlabel: str, ylabels, title: str, path: str) -> None:
    """Label, grid and legend each of ``axes``, title the figure and write it to ``path`` (PNG)."""
    for ax, ylabel in zip(axes, ylabels):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` whole or not at all: how the command line writes every file a later run reads
    (checkpoints, JSON records).

    ``write`` fills a new file in the same folder, which is flushed, fsynced and then renamed over
    ``path`` (``os.replace``: atomic). If anything fails or interrupts it (KeyboardInterrupt included),
    the new file is removed and ``path`` keeps what it held, or stays absent. The folder is created if
    needed; the file gets the permissions ``open`` would give it.
    """
    ensure_parent(path)
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def write_json(path: str, record: Dict[str, Any]) -> None:
    """``record`` as indented JSON, written atomically (a record that cannot be encoded leaves ``path`` as it was)."""
    text = json.dumps(record, indent=1) + "\n"
    write_atomically(path, lambda f: f.write(text.encode()))


def command_line() -> str:
    return " ".join(["ratebp"] + sys.argv[1:])

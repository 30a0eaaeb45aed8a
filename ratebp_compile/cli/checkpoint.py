"""Checkpoints of ``ratebp train``: written whole or not at all, checked before they are loaded.

A checkpoint is a ``torch.save``d dict: ``format`` (``CHECKPOINT_FORMAT``), ``config`` (the run's
settings, its method and seed included), ``epoch`` (epochs done), the ``model``, ``optimizer`` and
``schedule`` state dicts, and the run's ``record`` so far. A checkpoint replaces the previous one
atomically, so an interrupt while it is written leaves the previous one on disk. On ``--resume``,
:func:`restore` checks the model and optimizer states against the model and optimizer they go into and
refuses, in one line, any that do not fit, before anything is loaded or trained.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .common import write_atomically
from .data import CLIError

__all__ = ["CHECKPOINT_FORMAT", "CheckpointFile", "checkpoint_path", "load_checkpoint", "restore",
           "interrupt_note"]

CHECKPOINT_FORMAT = "ratebp-train-checkpoint/1"
#: Optimizer state entries holding one number per parameter (Adam's step count); every other tensor in a
#: parameter's state (SGD's momentum_buffer, Adam's exp_avg, exp_avg_sq, max_exp_avg_sq) has its shape.
SCALAR_STATE = ("step",)
#: How many names an error lists before "and N more".
NAMES_SHOWN = 3


class CheckpointFile:
    """Where one run keeps its checkpoint, and the epoch of the last checkpoint written there in full
    (``None`` until this run has written one)."""

    def __init__(self, path: str):
        self.path = path
        self.epoch: Optional[int] = None

    def write(self, state: Dict[str, Any]) -> None:
        """Replace the file with the checkpoint ``state`` (``config``, ``epoch``, ``model``, ``optimizer``,
        ``schedule``, ``record``), atomically."""
        write_atomically(self.path, lambda f: torch.save(dict(state, format=CHECKPOINT_FORMAT), f))
        self.epoch = state["epoch"]

    def __str__(self) -> str:
        return f"{self.path} ({'not written by this run' if self.epoch is None else f'epoch {self.epoch}'})"


def checkpoint_path(path: str, method: str, seed: int, several: bool) -> str:
    """The checkpoint of one run of ``--save path``: ``path`` itself, or suffixed when there are several runs."""
    if not several:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}-{method}-seed{seed}{ext or '.pt'}"


def interrupt_note(files: Sequence[CheckpointFile]) -> str:
    """What the runs interrupted left on disk, for the line that reports the interrupt."""
    label = "last completed checkpoint" if len(files) == 1 else "last completed checkpoints"
    return f"{label}: {', '.join(map(str, files))}"


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint at ``path`` (on the CPU); a :class:`CLIError` if there is none or it is not one."""
    if not os.path.isfile(path):
        raise CLIError(f"--resume {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CLIError(f"--resume {path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CLIError(f"--resume {path}: not a ratebp train checkpoint")
    return checkpoint


def restore(checkpoint: Dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
            schedule: Optional[torch.optim.lr_scheduler.LRScheduler]) -> None:
    """Load the checkpoint's model, optimizer and schedule states into ``model``, ``optimizer`` (built on
    ``model.parameters()``) and ``schedule``. First checks that they fit; a :class:`CLIError` says what does
    not (names missing or unexpected, shapes that differ, parameter groups), and nothing is loaded then."""
    config = checkpoint["config"]
    problems = _model_mismatch(checkpoint["model"], model.state_dict())
    if problems:
        raise CLIError(f"--resume: the checkpoint's model state does not fit {config['model']} of width "
                       f"{config['width']}: {problems}")
    names = {id(p): name for name, p in model.named_parameters()}
    problems = _optimizer_mismatch(checkpoint["optimizer"], optimizer, names)
    if problems:
        raise CLIError(f"--resume: the checkpoint's optimizer state does not fit the model's parameters: {problems}")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if schedule is not None and checkpoint.get("schedule") is not None:
        schedule.load_state_dict(checkpoint["schedule"])


def _few(items: Sequence[str]) -> str:
    """The first few ``items``, then how many more."""
    shown = ", ".join(items[:NAMES_SHOWN])
    return shown if len(items) <= NAMES_SHOWN else f"{shown} and {len(items) - NAMES_SHOWN} more"


def _report(kinds: Sequence[Tuple[str, List[str]]]) -> str:
    """``"missing a, b; unexpected c"`` from ``[("missing", [a, b]), ("unexpected", [c])]``; empty kinds left out."""
    return "; ".join(f"{kind} {_few(items)}" for kind, items in kinds if items)


def _shapes(name: str, saved: torch.Tensor, expected: torch.Size) -> str:
    return f"{name} {list(saved.shape)} vs {list(expected)}"


def _model_mismatch(saved: Dict[str, Any], expected: Dict[str, Any]) -> str:
    """How the state dict ``saved`` does not fit the model whose state dict is ``expected``, key for key and
    shape for shape; empty when it fits."""
    common = [k for k in expected if k in saved and torch.is_tensor(saved[k]) and torch.is_tensor(expected[k])]
    return _report([
        ("missing", [k for k in expected if k not in saved]),
        ("unexpected", [k for k in saved if k not in expected]),
        ("of another shape (checkpoint vs model):",
         [_shapes(k, saved[k], expected[k].shape) for k in common if saved[k].shape != expected[k].shape])])


def _optimizer_mismatch(saved: Dict[str, Any], optimizer: torch.optim.Optimizer, names: Dict[int, str]) -> str:
    """How the optimizer state dict ``saved`` does not fit ``optimizer`` (whose parameters ``names`` names by
    ``id``): the number of parameter groups, of parameters in each, and the shape of every tensor in each
    parameter's state against that parameter's, paired as ``Optimizer.load_state_dict`` pairs them (in
    order, group by group). Empty when it fits."""
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        return f"{len(groups)} parameter groups in the checkpoint, {len(optimizer.param_groups)} in the optimizer"
    owners: Dict[Any, torch.Tensor] = {}          # the checkpoint's index of a parameter -> the parameter
    for i, (group, own) in enumerate(zip(groups, optimizer.param_groups)):
        if len(group["params"]) != len(own["params"]):
            return (f"parameter group {i} has {len(group['params'])} parameters in the checkpoint, "
                    f"{len(own['params'])} in the optimizer")
        owners.update(zip(group["params"], own["params"]))
    reshaped = []
    for index, state in saved["state"].items():
        param = owners.get(index)
        if param is None:
            continue                              # reported as the state of a parameter no group lists
        for key, value in state.items():
            expected = torch.Size() if key in SCALAR_STATE else param.shape
            if torch.is_tensor(value) and value.shape != expected:
                reshaped.append(_shapes(f"{key} of {names[id(param)]}", value, expected))
    return _report([("state of parameters no group lists:", [str(i) for i in saved["state"] if i not in owners]),
                    ("of another shape (checkpoint vs parameter):", reshaped)])

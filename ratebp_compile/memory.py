"""Saved-for-backward accounting: how many bytes autograd keeps between forward and backward.

    with SavedTensorMeter() as meter:
        loss = model(x).sum()
    meter.bytes        # distinct storages saved for backward, in bytes

Tensors are counted once per storage, so a tensor saved by several ops counts once; parameters
(saved by the ops that use them) are excluded unless ``include_parameters``.

``LiveTensorTracker`` measures what saved bytes miss: the peak of all tensor storage alive during a
training step, transients of the forward included.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["SavedTensorMeter", "LiveTensorTracker", "saved_bytes_on_fake", "graph_peak_bytes", "device_memory_bytes",
           "budget_on_device", "format_bytes"]


class SavedTensorMeter:
    def __init__(self, include_parameters: bool = False):
        self.include_parameters = include_parameters
        self._storages: Dict[int, int] = {}
        self._hooks = None

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def _pack(self, t: torch.Tensor):
        if self.include_parameters or not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            self._storages[storage._cdata] = storage.nbytes()     # one entry per storage (fake ones too)
        return t

    def __enter__(self) -> "SavedTensorMeter":
        self._storages.clear()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class LiveTensorTracker(TorchDispatchMode):
    """Bytes of tensor storage alive during a region, and their peak, on any device.

    Every storage an op creates inside the region counts from its creation until it is freed;
    tensors that existed before (inputs, parameters) are not counted. The peak therefore covers
    the step's working memory: activations, saved tensors, transients, gradients.

        with LiveTensorTracker() as tracker:
            model(x).sum().backward()
        tracker.peak_bytes
    """

    def __init__(self):
        super().__init__()
        self._live: Dict[int, tuple] = {}
        self._current = 0
        self.peak_bytes = 0

    @property
    def current_bytes(self) -> int:
        self._collect()
        return self._current

    def _collect(self) -> None:
        for key, (ref, nbytes) in list(self._live.items()):
            if ref.expired():
                del self._live[key]
                self._current -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._live:
            return
        self._live[key] = (StorageWeakRef(storage), storage.nbytes())
        self._current += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self._current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._collect()
        # a view or an in-place result shares an input's storage: not new memory (the input may be
        # a tensor from before the region, which does not count)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._track(t)
        return out


def saved_bytes_on_fake(gm, args) -> int:
    """Bytes autograd would keep for backward when ``gm`` runs on inputs like ``args``, measured on fake
    tensors (no compute, nothing changed). Parameters are excluded, as in :class:`SavedTensorMeter`."""
    from .capture import on_fake_tensors

    with on_fake_tensors(gm) as fake, torch.enable_grad(), SavedTensorMeter() as meter:
        gm(*[fake(a) if isinstance(a, torch.Tensor) else a for a in args])
    return meter.bytes


def _storages(val) -> Dict[int, torch.Tensor]:
    """``{storage id: tensor}`` of the tensors in a node's ``meta["val"]``."""
    return {t.untyped_storage()._cdata: t for t in tree_leaves(val) if isinstance(t, torch.Tensor)}


def graph_peak_bytes(gm, transient=None, resize=None) -> int:
    """The peak bytes of tensor storage a graph creates while it runs, from its nodes' ``meta["val"]``
    (no compute): each storage a node creates is alive from that node to the last node that reads it or
    a view of it; the graph's outputs stay alive to the end; inputs and attributes do not count.
    ``transient(node)`` adds what a node needs while it runs besides its output (an op's scratch);
    ``resize(node, tensor)`` replaces the bytes of a tensor's storage the node creates (to model another
    schedule of the same graph).

    An estimate for planning (``passes.stream_time``): what ``LiveTensorTracker`` measures when the
    graph runs, as far as the nodes' values and ``transient`` describe the ops."""
    nodes = list(gm.graph.nodes)
    given = set()
    for node in nodes:
        if node.op in ("placeholder", "get_attr"):
            given.update(_storages(node.meta.get("val")))
    last: Dict[int, int] = {}         # storage -> index of the last node reading it
    size: Dict[int, int] = {}
    for i, node in enumerate(nodes):
        if node.op == "output":
            for a in node.all_input_nodes:
                for key in _storages(a.meta.get("val")):
                    last[key] = len(nodes)
            continue
        for key, t in _storages(node.meta.get("val")).items():
            if key not in given and key not in size:
                size[key] = t.untyped_storage().nbytes() if resize is None else resize(node, t)
                last[key] = max(last.get(key, i), i)
        for a in node.all_input_nodes:
            for key in _storages(a.meta.get("val")):
                if key in size:
                    last[key] = max(last[key], i)
    alive: Dict[int, int] = {}
    current = peak = 0
    for i, node in enumerate(nodes):
        for key in _storages(node.meta.get("val")):
            if key in size and key not in alive:
                alive[key] = size[key]
                current += size[key]
        extra = transient(node) if transient is not None and node.op != "output" else 0
        peak = max(peak, current + extra)
        for key in [k for k in alive if last[k] == i]:
            current -= alive.pop(key)
    return peak


#: Where a Linux container's memory limit is (cgroup v2, then v1).
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def device_memory_bytes(device: torch.device) -> Optional[int]:
    """The memory of ``device``: a CUDA device's total; for the CPU the machine's physical memory, or the
    container's memory limit where that is lower; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    for path in _CGROUP_LIMITS:
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def budget_on_device(budget, device: torch.device) -> Optional[int]:
    """A memory budget (``StepOptions.memory_budget``: bytes, a fraction of the device's memory, or None) in
    bytes on ``device``; None for no budget, or for a fraction of a device whose memory is unknown."""
    from .options import budget_bytes
    total = device_memory_bytes(device) if isinstance(budget, float) else None
    if budget is None or (isinstance(budget, float) and total is None):
        return None
    return budget_bytes(budget, total)


def format_bytes(nbytes: int) -> str:
    """``nbytes`` for people: "512 B", "3.2 KiB", "40 MiB", "12 GiB" (powers of 1024; three digits at most)."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{nbytes} B"

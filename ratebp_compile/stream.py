"""The spike pass streamed over chunks of time: what a ``StreamStage`` of the ``stream_time`` pass runs.

A stage computes one *sink* of the spike graph over all T steps, a chunk of steps at a time: a
neuron (its input current is computed per chunk and fed to the neuron's resumable scan; spikes are
stored in 1 byte for 0/1 neurons) or a value other parts of the program need whole (a model output,
the input of a reduction over time). The stage's *cone* — the per-step ops between its inputs and
the sink — runs as a small graph on each chunk. A BatchNorm with statistics over time and batch in
the cone needs all T steps before it can normalise any: the stage first runs the cone up to that
BatchNorm's input over every chunk, last to first, accumulating per-channel mean and variance (Chan's
parallel update, float64; then combined with the other ranks' for a synchronised BatchNorm), then normalises with them in the chunks of the next pass, which starts
from the first chunk's BatchNorm input left over from the first pass. Only one chunk's activations
are alive at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

from .collectives import global_moments
from .graph_ops import batch_moments
from .nn.spec import NeuronSpec
from .time_layout import TimeLayout

__all__ = ["StreamStage", "StageInput", "ChannelMoments", "chunk_bounds", "memory_order", "dense_order"]

def chunk_bounds(T: int, chunk: int) -> List[Tuple[int, int]]:
    """``(start, length)`` of ⌈T/chunk⌉ chunks of near-equal length (at most ``chunk``) covering T steps."""
    count = -(-T // chunk)
    base, extra = divmod(T, count)
    bounds, start = [], 0
    for i in range(count):
        length = base + (i < extra)
        bounds.append((start, length))
        start += length
    return bounds


def time_slice(x: torch.Tensor, layout: TimeLayout, T: int, start: int, length: int) -> torch.Tensor:
    """Steps ``start … start+length−1`` of ``x`` (time at ``layout.axis``, merged time-major or not)."""
    per_step = x.shape[layout.axis] // T if layout.merged else 1
    return x.narrow(layout.axis, start * per_step, length * per_step)


def memory_order(x: torch.Tensor) -> List[int]:
    """The dimensions of ``x`` from the largest stride to the smallest (the first of equals first)."""
    return sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))


def dense_order(x: torch.Tensor, leading: int = 1) -> Optional[List[int]]:
    """For an ``x`` that is not contiguous: its :func:`memory_order`, when that keeps the first ``leading``
    dimensions first and makes ``x.permute(order)`` contiguous (a chunk ``[n, B, C, H, W]`` of channels-last
    activations: ``[0, 1, 3, 4, 2]``); otherwise None."""
    order = memory_order(x)
    if x.is_contiguous() or order[:leading] != list(range(leading)) or not x.permute(order).is_contiguous():
        return None
    return order


def _permuted(shape: Sequence[int], order: Optional[Sequence[int]]) -> Tuple[int, ...]:
    return tuple(shape) if order is None else tuple(shape[d] for d in order)


class ChannelMoments:
    """Per-channel mean and biased variance over the chunks of a BatchNorm input ``[N, C, ...]``,
    combined exactly (Chan et al.'s parallel update) in float64."""

    def __init__(self):
        self.count = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None
        self.dtype: Optional[torch.dtype] = None

    def add(self, x: torch.Tensor) -> None:
        acc = torch.promote_types(x.dtype, torch.float32)
        mean, var = batch_moments(x)                                               # biased variance
        n = x.numel() // x.shape[1]
        mean, m2 = mean.double(), var.double() * n
        if self.mean is None:
            self.count, self.mean, self.m2, self.dtype = n, mean, m2, acc
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def result(self, group: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(mean, var)`` in the dtype the unstreamed BatchNorm reports (float32, or float64); over every
        rank's batch with a ``group``."""
        mean, var = self.mean, self.m2 / self.count
        if group is not None:
            mean, var, _ = global_moments(mean, var, self.count, group)
        return mean.to(self.dtype), var.to(self.dtype)


@dataclass(frozen=True)
class StageInput:
    """How a stage reads one of its inputs: a tensor of all T steps (``layout`` set: the chunk graphs
    get a slice of the chunk's steps) or a static value (passed as is)."""

    name: str
    layout: Optional[TimeLayout] = None


class StreamStage(nn.Module):
    """One sink of a streamed spike graph over all T steps (see the module docstring).

    Called with the stage's inputs (``inputs``, in order) followed by the neuron's parameters, it returns
    ``(value, *neuron statistics, *BatchNorm statistics)``: the sink's value for all T steps (a neuron's
    spikes, 1 byte each when the neuron is binary), then r, e, e_params of a neuron, then mean and
    variance of every BatchNorm in its cone in ``batchnorms`` order (``[C]``, or ``[T, C]`` for a per-step
    BatchNorm).

    ``value_graphs[str(n)]`` computes a chunk of ``n`` steps of the sink's input (followed by the chunk's
    per-step BatchNorm statistics), for every chunk ``first_graphs`` does not; ``stats_graphs[f"{j}_{n}"]`` computes a chunk of BatchNorm ``j``'s
    input. Graph inputs: the chunk slices and static inputs, then ``(mean, var)`` of each batch-statistic
    BatchNorm already known. The statistics pass visits the chunks last to first and keeps what it
    computed for the first chunk: ``first_graphs`` computes the first chunk from those BatchNorm inputs
    (one more graph input each), so that chunk is not computed twice. With ``keep_all`` it keeps every
    chunk's BatchNorm inputs (all T steps of them, when they fit the memory budget) and ``first_graphs``
    computes every chunk from them: nothing before a BatchNorm is computed twice.

    A fused neuron whose input chunks come in another dense memory order than ``[n, B, C, ...]``'s
    (channels-last activations, :func:`dense_order`) runs on them in that order, and its spikes are stored
    in it (so the next stage's convolution reads them as they are); r, e and e_params come back contiguous.
    """

    def __init__(self, T: int, bounds: Sequence[Tuple[int, int]], inputs: Sequence[StageInput],
                 neuron: Optional[NeuronSpec], value_shape: Tuple[int, ...], value_layout: TimeLayout,
                 value_dtype: torch.dtype, batchnorms: Sequence[str], per_step: Sequence[bool],
                 value_graphs: Dict[str, fx.GraphModule], stats_graphs: Dict[str, fx.GraphModule],
                 first_graphs: Dict[str, fx.GraphModule], description: str = "",
                 groups: Optional[Sequence[Optional[str]]] = None, keep_all: bool = False):
        super().__init__()
        self.T = T
        self.bounds = list(bounds)
        self.inputs = list(inputs)
        self.neuron = neuron
        self.value_shape = tuple(value_shape)
        self.value_layout = value_layout
        self.value_dtype = value_dtype
        self.batchnorms = list(batchnorms)
        self.per_step = list(per_step)
        self.value_graphs = nn.ModuleDict(value_graphs)
        self.stats_graphs = nn.ModuleDict(stats_graphs)
        self.first_graphs = nn.ModuleDict(first_graphs)
        self.description = description
        self.groups = list(groups) if groups is not None else [None] * len(self.batchnorms)
        self.keep_all = keep_all

    def map_graphs(self, fn) -> "StreamStage":
        """A stage like this one, but for its chunk graphs: ``fn`` of each."""
        def mapped(graphs: nn.ModuleDict) -> Dict[str, fx.GraphModule]:
            return {key: fn(gm) for key, gm in graphs.items()}
        return StreamStage(self.T, self.bounds, self.inputs, self.neuron, self.value_shape, self.value_layout,
                           self.value_dtype, self.batchnorms, self.per_step, mapped(self.value_graphs),
                           mapped(self.stats_graphs), mapped(self.first_graphs), self.description, self.groups,
                           self.keep_all)

    def _chunk_args(self, args: Sequence, start: int, length: int) -> List:
        return [a if spec.layout is None else time_slice(a, spec.layout, self.T, start, length)
                for spec, a in zip(self.inputs, args)]

    def _batch_statistics(self, args: Sequence) -> Tuple[List[torch.Tensor], List[List[torch.Tensor]]]:
        """Pass 1: mean and variance of every batch-statistic BatchNorm of the cone, in order, over the
        chunks last to first; and, per chunk, each one's input kept for pass 2: the first chunk's only, or
        every chunk's with ``keep_all``."""
        known: List[torch.Tensor] = []
        kept: List[List[torch.Tensor]] = [[] for _ in self.bounds]
        for j, (per_step, group) in enumerate(zip(self.per_step, self.groups)):
            if per_step:
                continue
            moments = ChannelMoments()
            for i in reversed(range(len(self.bounds))):
                start, length = self.bounds[i]
                (x,) = self.stats_graphs[f"{j}_{length}"](*self._chunk_args(args, start, length), *known)
                moments.add(x)
                if self.keep_all or i == 0:
                    kept[i].append(x)
                del x
            known.extend(moments.result(group))
        return known, kept

    def forward(self, *args):
        n_inputs = len(self.inputs)
        args, params = args[:n_inputs], args[n_inputs:]
        known, kept = self._batch_statistics(args)
        per_step_chunks: List[List[torch.Tensor]] = [[] for _ in range(2 * sum(self.per_step))]
        T, layout, neuron = self.T, self.value_layout, self.neuron
        if neuron is not None:      # the neuron scans [n, ...]: time unmerged
            steps_shape = (T, self.value_shape[0] // T) + self.value_shape[1:] if layout.merged else self.value_shape
        value = carry = order = None
        for i, (start, length) in enumerate(self.bounds):
            if kept[i]:
                x, *stats = self.first_graphs[str(length)](*self._chunk_args(args, start, length), *known, *kept[i])
                kept[i] = []
            else:
                x, *stats = self.value_graphs[str(length)](*self._chunk_args(args, start, length), *known)
            for chunks, s in zip(per_step_chunks, stats):
                chunks.append(s)
            if neuron is not None:
                x = x.reshape((length,) + steps_shape[1:])
                if value is None:
                    order = dense_order(x, leading=2) if neuron.fused else None
                if order is not None:       # element-wise but for time: run on x in its memory order
                    x = x.permute(order)
                x, carry = neuron.scan(x, carry, *params)
                if value is None:
                    value = torch.empty(_permuted(steps_shape, order), dtype=x.dtype, device=x.device)
                value.narrow(0, start, length).copy_(x)
            else:
                if value is None:
                    value = torch.empty(self.value_shape, dtype=x.dtype, device=x.device)
                time_slice(value, layout, T, start, length).copy_(x)
            del x
        if order is None:
            out = [value.view(self.value_shape)]
            if neuron is not None:
                out.extend(neuron.scan_finish(carry, T, neuron.rate_shape(self.value_shape), self.value_dtype,
                                              *params))
        else:                       # spikes stay in that order; the statistics are given back contiguous
            inverse = [order.index(d) for d in range(len(order))]
            out = [value.permute(inverse).view(self.value_shape)]
            finished = neuron.scan_finish(carry, T, (1,) + tuple(value.shape[1:]), self.value_dtype, *params)
            out.extend(s.permute(inverse).contiguous().reshape(neuron.rate_shape(self.value_shape)) for s in finished)
        known_iter, step_iter = iter(known), iter(per_step_chunks)
        for per_step in self.per_step:
            if per_step:
                out.extend([torch.cat(next(step_iter)), torch.cat(next(step_iter))])
            else:
                out.extend([next(known_iter), next(known_iter)])
        return tuple(out)

    def extra_repr(self) -> str:
        return self.description

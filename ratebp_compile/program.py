"""``Program``: one compiled training step, and ``compile_program``, which makes one from a captured graph.

A program is what ``transform`` and the ``torch.compile`` backend run and what ``show`` prints: the step's
graph module (for rate-based backprop it runs the spike graph, the rate graph and the gradient routing),
the options it was compiled with, the statistics the spike pass hands the rate pass, the guards that say
when it may be reused, and the history of the passes that built it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .cpu_memory import keep_freed
from .guards import Guards
from .memory import budget_on_device
from .options import StepOptions
from .passes import BPTT_PIPELINE, PIPELINE, PassRecord, run_pipeline
from .passes.build_spike_graph import SOURCE, STATISTICS, Statistic
from .passes.infra import snapshot, tensor_val
from .passes.stream_time import MEMORY_BUDGET, TIME_CHUNK
from .passes.sync_batchnorm import SYNC_GROUP

__all__ = ["Program", "Statistic", "compile_program", "CPU_MEMORY"]

CPU_MEMORY = "ratebp.cpu_memory"       # step.meta: what the step did about malloc on the CPU, in words (show)


@dataclass
class Program:
    """A compiled training step.

    step:       the graph module to call with the model's inputs; for ``method="ratebp"`` it has submodules
                ``spike`` (the exact forward, no autograd) and ``rate`` (length 1 in time, with autograd).
    method:     "ratebp" or "bptt".
    options:    the options it was compiled with.
    history:    one record per pass; ``history[0]`` is the captured graph.
    guards:     what it specialised on (``ratebp_compile.guards``), checked before every reuse; None for
                the backend's programs, which Dynamo guards.
    compiled:   what runs instead of ``step`` when the backend compiled the whole step (BPTT).
    """

    step: fx.GraphModule
    method: str
    options: StepOptions
    history: List[PassRecord]
    guards: Optional[Guards] = None
    compiled: Optional[Callable] = None

    def __call__(self, *args):
        return (self.compiled or self.step)(*args)

    @property
    def source(self) -> Optional[fx.GraphModule]:
        """The annotated graph the spike and rate graphs were built from (None for BPTT)."""
        return self.step.meta.get(SOURCE)

    @property
    def spike(self) -> Optional[fx.GraphModule]:
        return getattr(self.step, "spike", None)

    @property
    def rate(self) -> Optional[fx.GraphModule]:
        return getattr(self.step, "rate", None)

    @property
    def statistics(self) -> Tuple[Statistic, ...]:
        """What the spike pass hands the rate pass, in the rate graph's order of inputs after the model's."""
        return tuple(self.step.meta.get(STATISTICS, ()))


def compile_program(gm: fx.GraphModule, options: StepOptions, input_layouts: Sequence[str],
                    capture_seconds: float = 0.0, guards=None) -> Program:
    """Run the pipeline of ``options.method`` on a captured graph (``transform``'s or Dynamo's); one layout
    per placeholder of ``gm``."""
    gm.meta["ratebp.input_layouts"] = list(input_layouts)
    gm.meta["ratebp.upstream_grad_scale"] = options.grad_scale == "upstream"
    gm.meta[TIME_CHUNK] = options.time_chunk
    gm.meta[MEMORY_BUDGET] = options.memory_budget
    gm.meta[SYNC_GROUP] = options.sync_batchnorm
    history = [PassRecord("capture", True, capture_seconds, snapshot(gm))]
    device = next((tensor_val(n).device for n in gm.graph.nodes if n.op == "placeholder" and tensor_val(n) is not None),
                  None)
    step = run_pipeline(gm, PIPELINE if options.method == "ratebp" else BPTT_PIPELINE, history)
    if device is not None and device.type == "cpu":
        step.meta[CPU_MEMORY] = _keep_cpu_memory(options)
    return Program(step, options.method, options, history, guards)


def _keep_cpu_memory(options: StepOptions) -> str:
    """A CPU step keeps as much freed memory as its memory budget allows (``cpu_memory``): the next step
    reuses it instead of faulting fresh pages in."""
    return keep_freed(budget_on_device(options.memory_budget, torch.device("cpu")))

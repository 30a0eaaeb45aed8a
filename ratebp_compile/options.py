"""The user's options for the compiled training step, parsed and defaulted in one place, and the one
rule that decides which step a call runs.

``transform(model, **options)`` and ``torch.compile(model, backend="ratebp", options={...})`` both build a
:class:`StepOptions`; everything downstream reads that object and nothing else.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

from .collectives import group_key
from .errors import RateBPError

__all__ = ["StepOptions", "step_kind", "METHODS", "GRAD_SCALES", "COMPILERS", "LAYOUTS", "DEFAULT_TIME_CHUNK",
           "DEFAULT_CACHE_SIZE"]

METHODS = ("ratebp", "bptt")
GRAD_SCALES = ("bptt", "upstream")
COMPILERS = ("inductor", "aot_eager", "eager")
LAYOUTS = ("TB", "T*B", "static")
#: Steps per chunk of the streamed spike pass unless the user says otherwise: T up to 8 runs at once.
DEFAULT_TIME_CHUNK = 8
#: Programs kept per model (one per input signature, grad mode, autocast state and module modes).
DEFAULT_CACHE_SIZE = 8


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise RateBPError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _positive_int(name: str, value: Any, optional: bool) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RateBPError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class StepOptions:
    """How the training step is compiled.

    method:       "ratebp" (rate-based backprop) or "bptt" (plain BPTT through the same capture).
    input_layout: per input, or one for all: "TB" (``[T, B, ...]``), "T*B" (``[T·B, ...]``, time-major),
                  "static" (no time axis).
    grad_scale:   "bptt" (gradients at BPTT's scale) or "upstream" (also divided by T, as the paper
                  authors' code does).
    time_chunk:   for T above it the spike pass runs over chunks of at most this many steps; None: never.
    cache_size:   compiled programs kept per model; the least recently used is dropped beyond it.
    compiler:     the ``torch.compile`` backend only: what compiles the spike and rate graphs
                  ("inductor", "aot_eager" or "eager").
    sync_batchnorm: BatchNorms synchronised over a process group besides ``nn.SyncBatchNorm`` (which always
                  is, over its own): None, True (every training-mode BatchNorm, over the default group) or
                  a ``torch.distributed`` ProcessGroup. Kept as the group's key (``collectives.group_key``).
    """

    method: str = "ratebp"
    input_layout: Union[str, Tuple[str, ...]] = "TB"
    grad_scale: str = "bptt"
    time_chunk: Optional[int] = DEFAULT_TIME_CHUNK
    cache_size: int = DEFAULT_CACHE_SIZE
    compiler: str = "inductor"
    sync_batchnorm: Any = None

    def __post_init__(self):
        _choice("method", self.method, METHODS)
        _choice("grad_scale", self.grad_scale, GRAD_SCALES)
        _choice("compiler", self.compiler, COMPILERS)
        _positive_int("time_chunk", self.time_chunk, optional=True)
        _positive_int("cache_size", self.cache_size, optional=False)
        layouts = (self.input_layout,) if isinstance(self.input_layout, str) else self.input_layout
        if not isinstance(layouts, (list, tuple)) or not layouts:
            raise RateBPError(f"input_layout must be one of {LAYOUTS} or a list of them, got {self.input_layout!r}")
        for layout in layouts:
            _choice("input_layout", layout, LAYOUTS)
        if isinstance(self.input_layout, list):
            object.__setattr__(self, "input_layout", tuple(self.input_layout))
        object.__setattr__(self, "sync_batchnorm", group_key(self.sync_batchnorm))

    @classmethod
    def parse(cls, options: Optional[Mapping[str, Any]], where: str) -> "StepOptions":
        """Options given by name (``torch.compile``'s ``options``); unknown names are an error naming ``where``."""
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise RateBPError(f"{where}: unknown option(s) {unknown}; known: {known}")
        return cls(**options)

    def replace(self, **changes) -> "StepOptions":
        return dataclasses.replace(self, **changes)

    def layouts(self, n: int) -> List[str]:
        """One layout per input for ``n`` inputs."""
        if isinstance(self.input_layout, str):
            return [self.input_layout] * n
        if len(self.input_layout) != n:
            raise RateBPError(f"input_layout lists {len(self.input_layout)} layouts for {n} inputs")
        return list(self.input_layout)


def step_kind(method: str, training: bool, grad_enabled: bool) -> str:
    """Which step a call runs: the compiled ``method`` ("ratebp" or "bptt") in training mode with autograd
    on; otherwise "plain", the user's model as it is (exact inference, nothing compiled).

    ``training`` is the model's mode: ``transform``'s module reads the user's model's own flag (set by
    ``train()``/``eval()`` on either of them); the ``torch.compile`` backend reads the flag of the model's
    neurons, which ``train()``/``eval()`` set alike. BatchNorms in eval mode inside a training model (frozen statistics)
    do not make it an eval step.
    """
    return method if training and grad_enabled else "plain"

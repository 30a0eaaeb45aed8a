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

__all__ = ["StepOptions", "step_kind", "parse_memory_budget", "budget_bytes", "METHODS", "GRAD_SCALES", "COMPILERS",
           "LAYOUTS", "DEFAULT_MEMORY_BUDGET", "DEFAULT_CACHE_SIZE"]

METHODS = ("ratebp", "bptt")
GRAD_SCALES = ("bptt", "upstream")
COMPILERS = ("inductor", "aot_eager", "eager")
LAYOUTS = ("TB", "T*B", "static")
#: The spike pass may take this fraction of its device's memory before it is streamed over chunks of time.
DEFAULT_MEMORY_BUDGET = 0.25
_UNITS = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}
#: Programs kept per model (one per input signature, grad mode, autocast state and module modes).
DEFAULT_CACHE_SIZE = 8


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise RateBPError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _memory_budget(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or \
            (isinstance(value, float) and value > 1):
        raise RateBPError(f"memory_budget must be bytes (an int ≥ 1), a fraction of the device's memory (a float in "
                          f"(0, 1]) or None, got {value!r}")


def parse_memory_budget(text: str) -> Union[int, float, None]:
    """A memory budget as written on a command line: bytes with an optional unit ("512M", "2G", "1.5g";
    powers of 1024), a fraction of the device's memory ("0.25"), or "none"."""
    value = text.strip().lower()
    if value == "none":
        return None
    unit = value[-1] if value and value[-1] in "kmgt" else ""
    try:
        number = float(value[:-1] if unit else value)
        if not (unit or number <= 1 or number.is_integer()):
            raise ValueError
    except ValueError:
        raise RateBPError(f"memory budget {text!r}: expected bytes (e.g. 512M, 2G, 1000000), a fraction of the "
                          f"device's memory (e.g. 0.25) or 'none'") from None
    budget = int(number * _UNITS[unit]) if unit or number > 1 else number
    _memory_budget(budget)
    return budget


def budget_bytes(budget: Union[int, float, None], device_bytes: int) -> Optional[int]:
    """The budget in bytes on a device of ``device_bytes``: itself, or its fraction of them; None: none."""
    if budget is None:
        return None
    return int(budget * device_bytes) if isinstance(budget, float) else budget


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
    memory_budget: what the spike pass may take (the peak of the tensors it creates): bytes, or a fraction of
                  its device's memory; when its estimate for all T steps at once exceeds the budget, the pass is
                  streamed over the largest chunks of time that fit. None: never streamed. On CPU it is also
                  how much freed memory the process keeps for the next step (``cpu_memory``, at most 2 GiB).
    time_chunk:   run the spike pass over chunks of at most this many steps whatever its memory (overrides
                  ``memory_budget``); None: as the budget decides.
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
    memory_budget: Union[int, float, None] = DEFAULT_MEMORY_BUDGET
    time_chunk: Optional[int] = None
    cache_size: int = DEFAULT_CACHE_SIZE
    compiler: str = "inductor"
    sync_batchnorm: Any = None

    def __post_init__(self):
        _choice("method", self.method, METHODS)
        _choice("grad_scale", self.grad_scale, GRAD_SCALES)
        _choice("compiler", self.compiler, COMPILERS)
        _memory_budget(self.memory_budget)
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

"""``transform(model)``: the user's module, trained with rate-based backprop.

The returned :class:`RateBPModule` *is* the user's model as far as parameters go: it holds the same
submodules, parameters and buffers under the same names (so ``state_dict`` keys, optimizers and
checkpoints are interchangeable) and keeps no per-step state. In training mode with autograd on it
runs the compiled program (spike pass without autograd, rate pass with it); in eval mode, or with
autograd off, it runs the user's model unchanged.

The model is captured (traced on fake tensors) and compiled at the first training call with each new
input signature (shapes, dtypes, devices) — or at once when ``example_inputs`` is given.
"""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import nn

from .capture import capture
from .errors import RateBPError
from .passes import GRAD_SCALES, METHODS, PassRecord, compile_step
from .passes.infer_time_layout import INPUT_LAYOUTS, input_layouts
from .stream import DEFAULT_TIME_CHUNK, check_time_chunk

__all__ = ["transform", "RateBPModule", "Compiled"]

log = logging.getLogger(__name__)


@dataclass
class Compiled:
    """What the compiler produced for one input signature."""

    program: fx.GraphModule
    history: List[PassRecord]          # history[0] is the capture


def _signature(args: Sequence[Any], model: nn.Module) -> Tuple:
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(("tensor", tuple(a.shape), a.dtype, a.device.type, a.device.index))
        else:
            parts.append(("value", repr(a)))
    modes = tuple(m.training for m in model.modules())
    return tuple(parts), modes


def _check_input_ranks(names, args, layouts) -> None:
    for name, a, layout in zip(names, args, layouts):
        lay = INPUT_LAYOUTS[layout]
        if not isinstance(a, torch.Tensor) or lay is None:
            continue
        if a.dim() < (1 if lay.merged else 2):
            raise RateBPError(f"input '{name}' has shape {tuple(a.shape)}, but a "
                              f"{'[T·B, ...]' if lay.merged else '[T, B, ...]'} input was expected "
                              f"(wrong input rank, or pass input_layout='static' for inputs without time)")


class RateBPModule(nn.Module):
    """A user's SNN whose training step is rate-based backprop (or BPTT, ``method="bptt"``).

    Use it like the model: ``out = m(x_seq); loss(out).backward(); opt.step()``. ``ratebp_compile.show(m)``
    prints what the compiler made of it.
    """

    def __init__(self, model: nn.Module, method: str, input_layout: Union[str, Sequence[str]],
                 grad_scale: str, time_chunk: Optional[int] = DEFAULT_TIME_CHUNK):
        super().__init__()
        object.__setattr__(self, "_model", model)
        self._adopt(model)
        self.training = model.training
        self.method = method
        self.grad_scale = grad_scale
        self.time_chunk = time_chunk
        self._input_layout = input_layout
        self._cache: Dict[Tuple, Compiled] = {}

    # -- identity with the user's model -----------------------------------------------------------
    def _adopt(self, model: nn.Module) -> None:
        for name, child in model.named_children():
            self._modules[name] = child
        for name, p in model._parameters.items():
            self._parameters[name] = p
        for name, b in model._buffers.items():
            self._buffers[name] = b
        self._non_persistent_buffers_set = set(model._non_persistent_buffers_set)

    def _apply(self, fn, recurse=True):
        self._model._apply(fn, recurse)
        self._adopt(self._model)
        self._cache.clear()
        return self

    def train(self, mode: bool = True):
        self._model.train(mode)
        self.training = mode
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_model")
            if model is None:
                raise
            return getattr(model, name)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, model={type(self._model).__name__}"

    # -- compilation ------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The user's model (same parameters and buffers)."""
        return self._model

    def _positional(self, args, kwargs) -> List[Any]:
        if not kwargs:
            return list(args)
        try:
            bound = inspect.signature(self._model.forward).bind(*args, **kwargs)
        except TypeError as e:
            raise RateBPError(f"{type(self._model).__name__}.forward: {e}") from None
        bound.apply_defaults()
        return list(bound.arguments.values())

    def compile_for(self, *args) -> Compiled:
        """Run the pipeline for inputs like ``args`` (cached per input signature)."""
        sig = _signature(args, self._model)
        compiled = self._cache.get(sig)
        if compiled is None:
            compiled = self._compile(list(args), sig)
            self._cache[sig] = compiled
        return compiled

    def _compile(self, args: List[Any], sig) -> Compiled:
        names = list(inspect.signature(self._model.forward).parameters)
        layouts = input_layouts(self._input_layout, len(args))
        _check_input_ranks(names, args, layouts)
        start = time.perf_counter()
        gm = capture(self._model, args)
        program, history = compile_step(gm, input_layouts=layouts, method=self.method, grad_scale=self.grad_scale,
                                        time_chunk=self.time_chunk, capture_seconds=time.perf_counter() - start)
        log.debug("compiled %s for %s", type(self._model).__name__, sig)
        return Compiled(program, history)

    @property
    def compiled(self) -> Optional[Compiled]:
        """The most recently compiled program (None before the first training step)."""
        return next(reversed(self._cache.values()), None)

    # -- the step -------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self._traced_forward(args, kwargs)
        if not self.training or (self.method == "ratebp" and not torch.is_grad_enabled()):
            return self._model(*args, **kwargs)
        args = self._positional(args, kwargs)
        return self.compile_for(*args).program(*args)

    def _traced_forward(self, args, kwargs):
        """What ``torch.compile(transform(model), backend="ratebp")`` traces: the user's model, its tensor
        inputs marked with this module's settings, which the backend reads (so the step is built once,
        by the backend's passes)."""
        from .backend import step_settings

        args = self._positional(args, kwargs)
        training = self.training and (self.method == "bptt" or torch.is_grad_enabled())
        method = self.method if training else "plain"
        layouts = input_layouts(self._input_layout, len(args))
        marked = [step_settings(a, lay, method, self.grad_scale, self.time_chunk) if isinstance(a, torch.Tensor) else a
                  for a, lay in zip(args, layouts)]
        return self._model(*marked)


def transform(model: nn.Module, *, method: str = "ratebp", example_inputs: Optional[Sequence[Any]] = None,
              input_layout: Union[str, Sequence[str]] = "TB", grad_scale: str = "bptt",
              time_chunk: Optional[int] = DEFAULT_TIME_CHUNK) -> RateBPModule:
    """Return ``model`` with its training step rewritten into rate-based backpropagation.

    Args:
        model: a multi-step SNN (neurons from ``ratebp_compile.nn`` or registered with ``register_neuron``).
        method: ``"ratebp"`` (rate-based backprop) or ``"bptt"`` (plain BPTT through the same capture).
        example_inputs: inputs to compile for now rather than at the first training call.
        input_layout: per input (or one for all): ``"TB"`` for ``[T, B, ...]``, ``"T*B"`` for ``[T·B, ...]``
            (time-major), ``"static"`` for inputs without a time axis.
        grad_scale: ``"bptt"`` (default): gradients at BPTT's scale, so the last layer's gradient equals
            BPTT's; ``"upstream"``: additionally divided by T, as the paper authors' code does.
        time_chunk: for T above it, the spike pass runs over chunks of at most this many steps, so its
            memory stays flat in T (convolutions before a BatchNorm then run twice in the spike pass);
            None: always all T steps at once.

    Returns a :class:`RateBPModule` sharing the model's parameters, buffers and ``state_dict`` keys.
    Raises :class:`RateBPError` for models or inputs it cannot compile; the model is left unchanged.
    """
    if method not in METHODS:
        raise RateBPError(f"method must be one of {METHODS}, got {method!r}")
    if grad_scale not in GRAD_SCALES:
        raise RateBPError(f"grad_scale must be one of {GRAD_SCALES}, got {grad_scale!r}")
    if isinstance(model, RateBPModule):
        raise RateBPError("this model is already transformed; pass the original model (RateBPModule.model)")
    check_time_chunk(time_chunk)
    module = RateBPModule(model, method, input_layout, grad_scale, time_chunk)
    if example_inputs is not None:
        module.compile_for(*example_inputs)
    return module

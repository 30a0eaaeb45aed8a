"""``transform(model)``: the user's module, trained with rate-based backprop.

The returned :class:`RateBPModule` *is* the user's model as far as state goes: it shares the model's
dictionaries of submodules, parameters and buffers (so ``state_dict`` keys, optimizers and checkpoints
are interchangeable, and a layer swapped on either is swapped on both), forwards attribute reads and
writes to the model, and keeps no per-step state. In training mode with autograd on it runs the compiled
program (spike pass without autograd, rate pass with it); in eval mode, or with autograd off, it runs the
user's model unchanged (``options.step_kind``).

A program is compiled at the first training call with each new key — input signature (shapes, dtypes,
devices, the values of non-tensor arguments), autocast state and every module's training flag — or at
once when ``example_inputs`` is given. Before it is reused its guards are checked (``guards``): a program
whose model changed (a swapped layer, a reassigned parameter, a neuron's threshold, an attribute the
forward reads, a hook) is compiled again. At most ``cache_size`` programs are kept, least recently used
dropped first; a model that keeps recompiling gets one warning.
"""
from __future__ import annotations

import collections
import inspect
import logging
import time
import warnings
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .capture import capture
from .errors import RateBPError, RecompileWarning
from .guards import Guards
from .hooks import hooks_suspended
from .marks import step_settings
from .options import DEFAULT_CACHE_SIZE, DEFAULT_MEMORY_BUDGET, StepOptions, step_kind
from .passes.sync_batchnorm import refuse_local_batchnorms
from .program import Program, compile_program

__all__ = ["transform", "RateBPModule"]

log = logging.getLogger(__name__)

#: The module's own attributes; every other attribute is the model's.
_OWN = frozenset({"_model", "options", "_programs", "_compiles", "_warned", "training"}) | frozenset(vars(nn.Module()))


def _autocast_state() -> Tuple:
    return tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))


def _input_key(args: Sequence[Any]) -> Tuple:
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append((tuple(a.shape), a.dtype, a.device))
        else:
            parts.append((type(a), repr(a)))
    return tuple(parts)


def _check_inputs(names, args, layouts) -> None:
    for name, a, layout in zip(names, args, layouts):
        if not isinstance(a, torch.Tensor):
            continue
        if a.numel() == 0:
            raise RateBPError(f"input '{name}' is empty (shape {tuple(a.shape)}): there is nothing to train on; "
                              f"skip empty batches")
        if layout != "static" and a.dim() < (1 if layout == "T*B" else 2):
            raise RateBPError(f"input '{name}' has shape {tuple(a.shape)}, but a "
                              f"{'[T·B, ...]' if layout == 'T*B' else '[T, B, ...]'} input was expected "
                              f"(wrong input rank, or pass input_layout='static' for inputs without time)")


class RateBPModule(nn.Module):
    """A user's SNN whose training step is rate-based backprop (or BPTT, ``method="bptt"``).

    Use it like the model: ``out = m(x_seq); loss(out).backward(); opt.step()``. ``ratebp_compile.show(m)``
    prints what the compiler made of it.
    """

    def __init__(self, model: nn.Module, options: StepOptions):
        super().__init__()
        own = object.__setattr__
        own(self, "_model", model)
        own(self, "options", options)
        own(self, "_programs", collections.OrderedDict())
        own(self, "_compiles", 0)
        own(self, "_warned", False)
        for store in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            own(self, store, getattr(model, store))          # shared: one model, two views
        own(self, "training", model.training)

    # -- one model ------------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_model")
            if model is None:
                raise
            return getattr(model, name)

    def __setattr__(self, name: str, value) -> None:
        if name in _OWN or hasattr(type(self), name):
            super().__setattr__(name, value)
        else:
            setattr(self._model, name, value)

    def __delattr__(self, name: str) -> None:
        if name in _OWN or hasattr(type(self), name):
            super().__delattr__(name)
        else:
            delattr(self._model, name)

    def __getstate__(self):
        """Pickled (``torch.save``, ``copy.deepcopy``) without its compiled programs, which are rebuilt."""
        state = dict(self.__dict__)
        state["_programs"] = collections.OrderedDict()
        return state

    def _apply(self, fn, recurse=True):
        self._model._apply(fn, recurse)
        self._programs.clear()
        return self

    def train(self, mode: bool = True):
        self._model.train(mode)
        self.training = mode
        return self

    def extra_repr(self) -> str:
        return f"method={self.method!r}, model={type(self._model).__name__}"

    @property
    def model(self) -> nn.Module:
        """The user's model (same submodules, parameters and buffers)."""
        return self._model

    @property
    def method(self) -> str:
        return self.options.method

    @property
    def grad_scale(self) -> str:
        return self.options.grad_scale

    @property
    def time_chunk(self) -> Optional[int]:
        return self.options.time_chunk

    @property
    def memory_budget(self) -> Union[int, float, None]:
        return self.options.memory_budget

    # -- compilation ------------------------------------------------------------------------------------
    def _positional(self, args, kwargs) -> List[Any]:
        try:
            bound = inspect.signature(self._model.forward).bind(*args, **kwargs)
        except TypeError as e:
            raise RateBPError(f"{type(self._model).__name__}.forward: {e}") from None
        bound.apply_defaults()
        return list(bound.arguments.values())

    def compile_for(self, *args) -> Program:
        """The program for inputs like ``args`` (all of the forward's arguments, in order): the cached one if
        its guards hold, else a new one."""
        key = (_input_key(args), _autocast_state(), tuple(m.training for m in self._model.modules()))
        program = self._programs.get(key)
        reason = None
        if program is not None:
            reason = program.guards.check()
            if reason is None:
                self._programs.move_to_end(key)
                return program
            del self._programs[key]
        elif self._programs:
            reason = "new inputs (shapes, dtypes, devices, non-tensor values), autocast state or module modes"
        program = self._compile(list(args), reason)
        self._programs[key] = program
        while len(self._programs) > self.options.cache_size:
            self._programs.popitem(last=False)
        return program

    def _compile(self, args: List[Any], reason: Optional[str]) -> Program:
        names = list(inspect.signature(self._model.forward).parameters)
        layouts = self.options.layouts(len(args))
        _check_inputs(names, args, layouts)
        start = time.perf_counter()
        gm = capture(self._model, args)
        guards = Guards(self._model, gm.meta["ratebp.reads"], gm.meta.get("ratebp.stored_state", ()))
        program = compile_program(gm, self.options, layouts, time.perf_counter() - start, guards)
        object.__setattr__(self, "_compiles", self._compiles + 1)
        if reason is not None:
            log.info("recompiled %s: %s", type(self._model).__name__, reason)
        if self._compiles > self.options.cache_size and not self._warned:
            object.__setattr__(self, "_warned", True)
            warnings.warn(f"ratebp_compile: {type(self._model).__name__} has been compiled {self._compiles} times "
                          f"(last: {reason}); each compile captures the model again. Keep input shapes, non-tensor "
                          f"arguments and the model's configuration fixed between steps, or raise cache_size.",
                          RecompileWarning, stacklevel=4)
        return program

    @property
    def compiled(self) -> Optional[Program]:
        """The most recently used program (None before the first training step)."""
        return next(reversed(self._programs.values()), None)

    @property
    def programs(self) -> List[Program]:
        """The programs kept, least recently used first."""
        return list(self._programs.values())

    # -- the step ---------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self._traced_forward(args, kwargs)
        if step_kind(self.options.method, self._model.training, torch.is_grad_enabled()) == "plain":
            if self._model.training:
                refuse_local_batchnorms([n for n, m in self._model.named_modules() if m.training and
                                         isinstance(m, nn.modules.batchnorm._BatchNorm) and
                                         not isinstance(m, nn.SyncBatchNorm)], self.options.sync_batchnorm)
            return self._model(*args, **kwargs)
        args = self._positional(args, kwargs)
        program = self.compile_for(*args)
        with hooks_suspended(program.guards.hooked):
            return program(*args)

    def _traced_forward(self, args, kwargs):
        """What ``torch.compile(transform(model), backend="ratebp")`` traces: the user's model, its tensor
        inputs marked with this module's settings and the step this call runs, which the backend reads (so
        the step is built once, by the backend's passes)."""
        args = self._positional(args, kwargs)
        kind = step_kind(self.options.method, self._model.training, torch.is_grad_enabled())
        layouts = self.options.layouts(len(args))
        opts = self.options
        marked = [step_settings(a, lay, kind, opts.grad_scale, opts.memory_budget, opts.time_chunk, opts.cache_size,
                                opts.sync_batchnorm)
                  if isinstance(a, torch.Tensor) else a for a, lay in zip(args, layouts)]
        return self._model(*marked)


def transform(model: nn.Module, *, method: str = "ratebp", example_inputs: Optional[Sequence[Any]] = None,
              input_layout: Union[str, Sequence[str]] = "TB", grad_scale: str = "bptt",
              memory_budget: Union[int, float, None] = DEFAULT_MEMORY_BUDGET, time_chunk: Optional[int] = None,
              cache_size: int = DEFAULT_CACHE_SIZE,
              sync_batchnorm: Any = None) -> RateBPModule:
    """Return ``model`` with its training step rewritten into rate-based backpropagation.

    Args:
        model: a multi-step SNN (neurons from ``ratebp_compile.nn`` or registered with ``register_neuron``).
        method: ``"ratebp"`` (rate-based backprop) or ``"bptt"`` (plain BPTT through the same capture).
        example_inputs: inputs to compile for now rather than at the first training call.
        input_layout: per input (or one for all): ``"TB"`` for ``[T, B, ...]``, ``"T*B"`` for ``[T·B, ...]``
            (time-major), ``"static"`` for inputs without a time axis.
        grad_scale: ``"bptt"`` (default): gradients at BPTT's scale, so the last layer's gradient equals
            BPTT's; ``"upstream"``: additionally divided by T, as the paper authors' code does.
        memory_budget: what the spike pass may take — the peak of the tensors it creates — in bytes, or as a
            fraction of its device's memory (default 0.25). The spike pass runs all T steps at once when its
            estimated peak fits (the fastest way), else over the largest chunks of time that fit, so its
            memory stays flat in T (convolutions before a BatchNorm then run twice). None: never streamed.
            On CPU (glibc), up to the budget (at most 2 GiB) of the memory a step frees stays in the process
            for the next step instead of being faulted in again (``cpu_memory``; the process's RSS does not
            fall back between steps; ``RATEBP_KEEP_CPU_MEMORY=0`` turns this off).
        time_chunk: run the spike pass over chunks of at most this many steps, whatever its memory
            (overrides ``memory_budget``).
        cache_size: compiled programs kept (one per input signature, autocast state and module modes).
        sync_batchnorm: for data-parallel training (``torch.distributed``): ``True`` to take every training-mode
            BatchNorm's statistics over the default process group's batches, or a ``ProcessGroup``; both
            passes and BPTT then normalise over every rank's batch, as ``nn.SyncBatchNorm`` does, and update
            running statistics once from the global moments. ``nn.SyncBatchNorm`` modules synchronise over
            their own group in any case. Without an initialised process group a BatchNorm stays local.

    Returns a :class:`RateBPModule` sharing the model's parameters, buffers and ``state_dict`` keys.
    Raises :class:`RateBPError` for models or inputs it cannot compile; the model is left unchanged.
    """
    options = StepOptions(method=method, input_layout=input_layout, grad_scale=grad_scale, memory_budget=memory_budget,
                          time_chunk=time_chunk, cache_size=cache_size, sync_batchnorm=sync_batchnorm)
    if isinstance(model, RateBPModule):
        raise RateBPError("this model is already transformed; pass the original model (RateBPModule.model)")
    if not isinstance(model, nn.Module):
        raise RateBPError(f"transform expects an nn.Module, got {type(model).__name__}")
    module = RateBPModule(model, options)
    if example_inputs is not None:
        module.compile_for(*module._positional(example_inputs, {}))
    return module

"""Guards: what a compiled program specialised on, checked before the program is reused.

A program built by ``transform`` holds the model's modules, parameters and buffers, its neurons'
hyper-parameters and every module attribute the forward read while it was captured. If any of those
changes afterwards, the program would silently train the old model. So before every step the module
checks the program's :class:`Guards` — as Dynamo checks its guards — and compiles again when one fails:

- the module tree: every submodule, parameter and buffer is the same object, with the same dtype, device
  and shape (a swapped layer, ``load_state_dict(..., assign=True)``, ``model.to(torch.float64)``);
- every neuron's ``NeuronSpec`` (threshold, decay, reset, surrogate, ...): recomputed from the module;
- the attributes the forward read (``statewatch``): plain values by value, anything else by identity;
- forward and backward hooks, on each module and global.

Grad mode, autocast state, module modes and the input signature are part of the cache key instead
(``RateBPModule``). The check is plain Python over lists made at compile time; BENCHMARKS.md has its cost.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from .errors import RateBPError
from .hooks import hook_state, hooked_modules
from .interop import PORTING, UnsupportedNeuron
from .nn.neuron import LIFFamily
from .nn.spec import NeuronSpec, call_form, cell_spec, is_single_step, neuron_spec

__all__ = ["Guards", "neuron_config"]

_MISSING = object()
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def neuron_config(module: nn.Module) -> Optional[NeuronSpec]:
    """The spec of a neuron module, single-step cells included (their spec for one step); None otherwise."""
    if is_single_step(module):
        return cell_spec(module, 1)
    return neuron_spec(module)


def _frozen(value: Any) -> Any:
    """A value to compare later: plain data (numbers, strings, dtypes, ...) and containers of it by value,
    anything else (tensors, modules, functions, objects) by identity."""
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        return (type(value),) + tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return (dict,) + tuple((k, _frozen(v)) for k, v in value.items())
    if isinstance(value, (set, frozenset)):
        return (type(value), frozenset(map(_Identity, value)))
    return _Identity(value)


class _Identity:
    """Compares equal to a wrapper of the very same object."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Identity) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


class Guards:
    """What a program compiled for ``model`` specialised on; ``reads`` maps modules to the names of the
    attributes their forward read during capture. Each check has a fast path — the very same objects as
    at compile time — and compares values only when that fails."""

    def __init__(self, model: nn.Module, reads: Dict[nn.Module, Set[str]], stored_state=()):
        self.paths = {}
        for path, m in model.named_modules():
            self.paths.setdefault(m, path or "<root>")
        modules = list(self.paths)
        self.modules = modules
        # (module, dictionary, what, entries): every submodule, parameter and buffer, by identity
        self.tree = [(m, store, what, tuple(store.items())) for m in modules
                     for store, what in ((m._modules, "submodule"), (m._parameters, "parameter"),
                                         (m._buffers, "buffer"))]
        self.tensors = [(m, t, t.dtype, t.device, t.shape) for m in modules
                        for store in (m._parameters, m._buffers) for t in store.values() if t is not None]
        # (module, its attributes, spec): a LIF-family neuron's spec is a function of its attributes, so it
        # is recomputed only when one is another object; any other neuron's (a registered class's to_spec
        # may read tensors) at every check
        self.neurons = [(m, tuple(vars(m).items()) if isinstance(m, LIFFamily) else None, spec)
                        for m in modules for spec in [neuron_config(m)] if spec is not None]
        # (module, name, value, frozen value): compared by value unless the very same plain value
        self.attributes: List[Tuple[nn.Module, str, Any, Any]] = [
            (m, name, getattr(m, name), _frozen(getattr(m, name))) for m, names in reads.items()
            if m in self.paths for name in sorted(names) if hasattr(m, name)]
        # neurons the forward calls without their state (they start from the one they hold): it must stay
        # at rest, as the compiled step assumes
        self.stored_state = [m for m in stored_state if m in self.paths]
        self.hooks = hook_state(modules)
        self.hooked = hooked_modules(model)          # their hooks run as nodes of the program

    def _neuron_now(self, m: nn.Module) -> Optional[NeuronSpec]:
        try:
            return neuron_config(m)
        except UnsupportedNeuron as e:
            raise RateBPError(f"the neuron '{self.paths[m]}' ({type(m).__module__}.{type(m).__qualname__}) cannot "
                              f"be compiled any more: {e} See {PORTING}.") from None

    def check(self) -> Optional[str]:
        """None if the program may be reused, else what changed (the first guard that fails)."""
        for m, store, what, entries in self.tree:
            if len(store) != len(entries) or any(store.get(k) is not v for k, v in entries):
                return f"a {what} of '{self.paths[m]}' was added, removed or replaced"
        for m, t, dtype, device, shape in self.tensors:
            if t.dtype is not dtype or t.shape != shape or t.device != device:
                return f"a parameter or buffer of '{self.paths[m]}' changed dtype, device or shape"
        return self.check_attributes() or self.check_neurons()

    def check_attributes(self) -> Optional[str]:
        """The attributes part of :meth:`check`: each attribute the forward read, by value or identity."""
        for m, name, value, frozen in self.attributes:
            current = getattr(m, name, _MISSING)
            if (current is not value or not isinstance(value, _PLAIN)) and _frozen(current) != frozen:
                return f"'{self.paths[m]}.{name}', which the forward reads, changed"
        return None

    def check_neurons(self) -> Optional[str]:
        """The neurons' part of :meth:`check`: each neuron's spec, the state of those that start from the one
        they hold (refused unless at rest), the hooks. What the ratebp backend checks of the neurons Dynamo
        calls as modules (Dynamo guards the rest of the model itself)."""
        for m, attributes, spec in self.neurons:
            current = vars(m)
            same = attributes is not None and len(current) == len(attributes) and \
                all(current.get(k) is v for k, v in attributes)
            if not same and self._neuron_now(m) != spec:
                return f"the neuron '{self.paths[m]}' changed ({spec.describe()} before)"
        for m in self.stored_state:
            if not call_form(m).stored_at_rest(m):
                raise RateBPError(f"the neuron '{self.paths[m]}' ({type(m).__qualname__}) holds a state that is not at "
                                  f"rest (left by a call of the plain model), and the forward starts from the state "
                                  f"it holds: the compiled step starts from rest. Reset the neurons before each "
                                  f"batch. See {PORTING}.")
        if hook_state(self.modules) != self.hooks:
            return "a hook was registered or removed"
        return None

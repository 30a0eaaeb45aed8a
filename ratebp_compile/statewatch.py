"""What a model's forward reads and writes of its modules while capture traces it.

Capture runs the forward once, on fake tensors; a compiled step then runs what was traced and never the
forward again. So every attribute the forward read from its modules is baked into the program — the
attributes read are recorded here, and ``ratebp_compile.guards`` checks their values before every step —
and anything the forward writes would happen once, at capture, instead of at every step: an attribute
assignment (``self.last = x``, ``self.count += 1``) or a change to a Python container held by a module
(``self.history.append(x)``) is state kept between calls, and is refused, naming the module, the attribute
and (for assignments) the line.

How: while the forward is traced, each watched module's class is swapped for a subclass that records
attribute reads and refuses attribute writes; containers are compared before and after. Neurons are not
watched (their configuration is guarded through their ``NeuronSpec``; single-step cells keep their
membrane as documented state).
"""
from __future__ import annotations

import collections
from contextlib import contextmanager
from typing import Callable, Dict, List, Set, Tuple

from torch import nn

from .errors import RateBPError

__all__ = ["StateWatch", "original_class"]

#: nn.Module's own bookkeeping (hooks, parameters, ...): neither configuration nor user state.
_INTERNALS = frozenset(vars(nn.Module())) - {"training"}
#: fx registers tensors a traced forward creates on the root module under these names.
_FX_CONSTANT = "_tensor_constant"
_CONTAINERS = (list, dict, set, collections.deque)

_ACTIVE: List["StateWatch"] = []          # the watch of the capture in progress (innermost last)
_RECORDING: Dict[type, type] = {}         # module class -> its recording subclass
_ORIGINAL: Dict[type, type] = {}      # recording subclass -> the class it records


def _recording_class(cls: type) -> type:
    """A subclass of ``cls`` whose instances report attribute reads and writes to the active watch."""
    sub = _RECORDING.get(cls)
    if sub is not None:
        return sub

    def __getattribute__(self, name):
        value = super(sub, self).__getattribute__(name)
        if _ACTIVE and not name.startswith("__") and name not in _INTERNALS:
            _ACTIVE[-1].read(self, name)
        return value

    def __setattr__(self, name, value):
        if _ACTIVE and not name.startswith(_FX_CONSTANT):
            _ACTIVE[-1].refuse_write(self, name)
        super(sub, self).__setattr__(name, value)

    def __delattr__(self, name):
        if _ACTIVE and not name.startswith(_FX_CONSTANT):
            _ACTIVE[-1].refuse_write(self, name)
        super(sub, self).__delattr__(name)

    sub = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__setattr__": __setattr__,
                                      "__delattr__": __delattr__, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__})
    _RECORDING[cls] = sub
    _ORIGINAL[sub] = cls
    return sub


def original_class(module) -> type:
    """``module``'s own class, also while a watch has swapped it for its recording subclass."""
    return _ORIGINAL.get(type(module), type(module))


def _contents(container) -> Tuple:
    """A container's contents, compared by identity (so that tensors and proxies compare cheaply)."""
    if isinstance(container, dict):
        return tuple((k, id(v)) for k, v in container.items())
    if isinstance(container, set):
        return tuple(sorted(map(id, container)))
    return tuple(map(id, container))


class StateWatch:
    """Watches ``model``'s modules (those ``watched`` accepts) while a forward is traced: :meth:`watching`.

    ``reads`` maps each watched module to the names of the attributes the forward read from it (data on the
    instance, or plain data on its class); ``where()`` names the user's current source line, for errors.
    """

    def __init__(self, model: nn.Module, watched: Callable[[nn.Module], bool], where: Callable[[], str]):
        self.names = {}
        for path, m in model.named_modules():
            if watched(m):
                self.names.setdefault(m, path or "<root>")
        self.where = where
        self.reads: Dict[nn.Module, Set[str]] = collections.defaultdict(set)

    def read(self, module: nn.Module, name: str) -> None:
        if name in vars(module) or _is_class_data(type(module), name):
            self.reads[module].add(name)

    def refuse_write(self, module: nn.Module, name: str) -> None:
        raise RateBPError(
            f"module '{self.names.get(module, '?')}' ({type(module).__name__}): its forward sets self.{name} at "
            f"{self.where()}. A compiled step runs what capture traced, not the forward, so state a module keeps "
            f"between calls would be updated once instead of at every step. Keep per-step state in local "
            f"variables, or neuron state inside a neuron module (ratebp_compile.nn).")

    @contextmanager
    def watching(self):
        """Record reads and refuse writes of the watched modules while inside; on leaving, put back the
        contents of every container they hold and refuse a change to one."""
        containers = {(m, k): (v, list(v.items()) if isinstance(v, dict) else list(v), _contents(v))
                      for m in self.names for k, v in vars(m).items()
                      if isinstance(v, _CONTAINERS) and k not in _INTERNALS}
        swapped: List[Tuple[nn.Module, type]] = []
        try:
            for m in self.names:
                try:
                    cls = type(m)
                    m.__class__ = _recording_class(cls)
                    swapped.append((m, cls))
                except TypeError:        # a class whose instances cannot change class (slots, C types)
                    continue
            _ACTIVE.append(self)
            yield self
        finally:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
            for m, cls in swapped:
                m.__class__ = cls
            changed = []
            for (m, k), (container, saved, contents) in containers.items():
                if _contents(container) != contents:
                    _restore(container, saved)
                    changed.append((m, k, container))
        if changed:
            m, k, container = changed[0]
            raise RateBPError(
                f"module '{self.names[m]}' ({type(m).__name__}): its forward changes the "
                f"{type(container).__name__} self.{k} (state kept between calls). A compiled step runs what capture "
                f"traced, not the forward, so the change would happen once instead of at every step. Record "
                f"per-step values with a forward hook on the module instead (hooks run at every step).")


def _restore(container, saved: list) -> None:
    container.clear()
    if isinstance(container, (dict, set)):
        container.update(saved)
    else:
        container.extend(saved)


def _is_class_data(cls: type, name: str) -> bool:
    """Whether ``name`` is a plain value (a number, a string, a tuple, ...) defined on a user class, not on
    ``nn.Module`` (methods, properties and descriptors are code, guarded by the module's class)."""
    for klass in cls.__mro__:
        if klass is nn.Module:
            return False
        if name in vars(klass):
            value = vars(klass)[name]
            return isinstance(value, (bool, int, float, str, tuple, frozenset, type(None)))
    return False


"""Neurons of other SNN libraries — SpikingJelly, snnTorch, Norse — recognised when a model holds them.

Each library has one module here, imported the first time the compiler meets a module of that
library (none of them is a dependency of ratebp_compile, and nothing is imported for a model that
does not use them). Importing it registers the library's neuron classes with
``ratebp_compile.nn.register_neuron``: each class's ``to_spec`` maps a module's settings onto one of
``ratebp_compile.families``, or raises :class:`UnsupportedNeuron` with the reason the compiler
cannot honour that setting (the capture turns it into an error naming the module and the user's line).

``docs/porting.md`` says, per library, what maps to what and what is refused.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional, Set

__all__ = ["UnsupportedNeuron", "load_for", "load_for_op", "library_of", "register_rewrite", "rewrite_for",
           "register_op_traced", "op_traced", "LIBRARIES", "PORTING"]

#: Top-level package → the module here that adapts it.
LIBRARIES = {"spikingjelly": "spikingjelly", "snntorch": "snntorch", "norse": "norse"}
#: Custom-op namespaces (what torch.compile records of a library's neurons) → the library.
OP_NAMESPACES = {"sj_lif": "spikingjelly", "sj_if": "spikingjelly", "sj_plif": "spikingjelly"}
PORTING = "docs/porting.md"

_loaded: Set[str] = set()
_rewrites: Dict[type, Callable] = {}
_op_traced: Dict[type, Callable] = {}


class UnsupportedNeuron(Exception):
    """A neuron of another library in a setting the compiler cannot honour; the message says why (one or
    more sentences: the errors that quote it go on after it)."""

    def __str__(self) -> str:
        text = super().__str__().rstrip()
        return text if text.endswith(".") else text + "."


def library_of(cls: type) -> Optional[str]:
    """The adapted library a class comes from, or None."""
    top = (getattr(cls, "__module__", "") or "").split(".")[0]
    return top if top in LIBRARIES else None


def load_for(module) -> None:
    """Import the adapter of the library ``module``'s class (or a base class) comes from, once."""
    for cls in type(module).__mro__:
        lib = library_of(cls)
        if lib is not None:
            _load(lib)


def _load(lib: str) -> None:
    if lib not in _loaded:
        _loaded.add(lib)
        importlib.import_module(f"{__name__}.{LIBRARIES[lib]}")


def load_for_op(qualified_name: str) -> None:
    """Import the adapter of the library whose custom op ``qualified_name`` (``"sj_lif::forward"``) is."""
    lib = OP_NAMESPACES.get(qualified_name.split("::")[0])
    if lib is not None:
        _load(lib)


def register_rewrite(cls: type, rewrite: Callable) -> None:
    """Have the capture trace ``rewrite(module, *args)`` instead of the forward of a ``cls`` module: an
    equivalent, traceable form of a layer that keeps state between calls (SpikingJelly's
    ``layer.Dropout``, whose mask is module state). ``rewrite`` may raise :class:`UnsupportedNeuron`."""
    _rewrites[cls] = rewrite


def rewrite_for(module) -> Optional[Callable]:
    """The rewrite registered for ``module``'s exact class, or None."""
    from ..statewatch import original_class

    load_for(module)
    return _rewrites.get(original_class(module))


def register_op_traced(cls: type, when: Callable = lambda module: True) -> None:
    """Declare that torch.compile (Dynamo) records a neuron of ``cls`` for which ``when(module)`` holds as the
    library's own custom op (``register_neuron_op``: SpikingJelly 2.x's neurons with one of its built-in
    surrogates), so that the backend reads that op rather than a call of the module."""
    _op_traced[cls] = when


def op_traced(module) -> bool:
    """Whether Dynamo records ``module`` as its library's custom op (:func:`register_op_traced`)."""
    from ..statewatch import original_class

    load_for(module)
    when = _op_traced.get(original_class(module))
    return when is not None and bool(when(module))

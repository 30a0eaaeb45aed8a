"""Forward hooks of the user's modules in a compiled step: run once per step, with the spike pass's tensors.

In the plain model a module's forward (pre-)hooks run when the module is called. A compiled step calls
modules in several graphs (the spike pass, per chunk of time when it is streamed, the rate pass) and
replaces some by functions (neurons, BatchNorms), so it cannot let ``Module.__call__`` run them. Instead:

- capture records each hooked module call as explicit nodes around it, whose target is a
  :class:`ModuleHooks` (``forward_pre_hooks(module, args)`` before, ``forward_hooks(module, args, output)``
  after); they stay in the spike graph (and the BPTT graph) and are left out of the rate graph, so every
  hook sees the exact values of all T steps once per step, as in the plain model;
- while a compiled step runs, :func:`hooks_suspended` empties the hooked modules' own hook dictionaries,
  so calling those modules does not run their hooks a second time.

Hooks that only observe (firing-rate monitors, activation recorders) work; a hook that returns a value
(changing its module's input or output) is refused with an error naming it, as are backward hooks and
global module hooks, whose semantics the compiled step cannot honour.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple

from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree
from torch.nn.modules import module as _module

from .errors import RateBPError

__all__ = ["ModuleHooks", "forward_hooks", "check_hooks_supported", "hooks_suspended", "hook_state",
           "hooked_modules"]

_GLOBAL = {"forward ": _module._global_forward_hooks, "forward pre-": _module._global_forward_pre_hooks,
           "backward ": _module._global_backward_hooks, "backward pre-": _module._global_backward_pre_hooks}


def _name(hook) -> str:
    return getattr(hook, "__qualname__", None) or getattr(hook, "__name__", None) or type(hook).__name__


@dataclass(frozen=True, eq=False)
class ModuleHooks:
    """The call target of a node that runs the forward pre-hooks (``kind="pre"``; the node's arguments:
    the module's positional arguments) or the forward hooks (``kind="post"``; its arguments and its output)
    of ``module``, in registration order. ``hooks`` are ``(hook, with_kwargs)`` pairs, as registered when
    the program was compiled (a change of hooks recompiles it)."""

    path: str
    kind: str
    hooks: Tuple[Tuple[object, bool], ...]
    module: nn.Module = field(repr=False)

    @property
    def __name__(self) -> str:  # fx names a node and its generated-code global after it
        return "forward_pre_hooks" if self.kind == "pre" else "forward_hooks"

    def __call__(self, args: tuple, output=None) -> None:
        if any(isinstance(t, FakeTensor) for t in pytree.tree_leaves((args, output))):
            return                    # shapes being propagated: hooks see real tensors only
        module = self.module
        for hook, with_kwargs in self.hooks:
            state = dict(vars(module))
            if self.kind == "pre":
                result = hook(module, args, {}) if with_kwargs else hook(module, args)
            else:
                result = hook(module, args, {}, output) if with_kwargs else hook(module, args, output)
            after = vars(module)
            changed = sorted(k for k in state.keys() | after.keys()
                             if k not in state or k not in after or after[k] is not state[k])
            if changed:
                raise RateBPError(
                    f"the forward {'pre-' if self.kind == 'pre' else ''}hook {_name(hook)} of module "
                    f"'{self.path or '<root>'}' ({type(module).__name__}) sets self.{changed[0]}: the compiled step "
                    f"runs what capture traced, so a module a hook changes would not change the step (the old "
                    f"torch.nn.utils.weight_norm works so; torch.nn.utils.parametrizations.weight_norm is traced).")
            if result is not None:
                what, kind = ("input", "pre-hook") if self.kind == "pre" else ("output", "hook")
                raise RateBPError(
                    f"the forward {kind} {_name(hook)} of module '{self.path or '<root>'}' "
                    f"({type(module).__name__}) returns a value, i.e. it changes the module's {what}; the compiled "
                    f"step runs the module apart from its hooks and cannot honour that. Hooks that only observe "
                    f"(return None) are supported; fold the change into the module's forward instead.")

    def describe(self) -> str:
        return f"{self.__name__} of '{self.path or '<root>'}': " + ", ".join(_name(h) for h, _ in self.hooks)


def forward_hooks(module: nn.Module, path: str) -> Tuple[Optional[ModuleHooks], Optional[ModuleHooks]]:
    """``(pre, post)``: the module's forward pre-hooks and forward hooks as call targets (None where it has none)."""
    pre = tuple((h, k in module._forward_pre_hooks_with_kwargs) for k, h in module._forward_pre_hooks.items())
    post = tuple((h, k in module._forward_hooks_with_kwargs) for k, h in module._forward_hooks.items())
    return (ModuleHooks(path, "pre", pre, module) if pre else None), \
        (ModuleHooks(path, "post", post, module) if post else None)


def check_hooks_supported(model: nn.Module) -> None:
    """Refuse hooks the compiled step cannot honour: backward hooks of the model's modules (they would see
    the rate pass's gradients, not BPTT's) and global module hooks (``register_module_forward_hook``, ...)."""
    for kind, hooks in _GLOBAL.items():
        if hooks:
            raise RateBPError(f"a global module {kind}hook is registered ({', '.join(_name(h) for h in hooks.values())}"
                              f"); the compiled step cannot run it as the plain model does. Remove it while "
                              f"training with ratebp_compile.")
    for path, m in model.named_modules():
        hooks = list(m._backward_hooks.values()) + list(m._backward_pre_hooks.values())
        if hooks:
            raise RateBPError(f"module '{path or '<root>'}' ({type(m).__name__}) has backward hooks "
                              f"({', '.join(map(_name, hooks))}): in a rate-based step its gradients are those of "
                              f"the rate pass, not BPTT's, and the compiled step has no per-module backward to run "
                              f"them in. Remove them while training with ratebp_compile.")


def hook_state(modules: Iterable[nn.Module]) -> Tuple:
    """Every hook registered on ``modules`` and globally, for a guard (compare with ``==``: a hook is known by
    its handle's id, which registration never reuses)."""
    return tuple((i, tuple(d)) for i, m in enumerate(modules)
                 for d in (m._forward_pre_hooks, m._forward_hooks, m._backward_hooks, m._backward_pre_hooks) if d) + \
        tuple(tuple(d) for d in _GLOBAL.values())


@contextmanager
def hooks_suspended(modules: List[nn.Module]):
    """While inside, calling one of ``modules`` does not run its forward hooks (the compiled step runs them
    itself, see the module docstring); they are put back afterwards, an exception included."""
    saved = []
    try:
        for m in modules:
            saved.append((m, m._forward_pre_hooks, m._forward_hooks))
            m._forward_pre_hooks, m._forward_hooks = type(m._forward_pre_hooks)(), type(m._forward_hooks)()
        yield
    finally:
        for m, pre, post in saved:
            m._forward_pre_hooks, m._forward_hooks = pre, post


def hooked_modules(model: nn.Module) -> List[nn.Module]:
    """The model's modules (the model included) that have forward hooks or forward pre-hooks."""
    return [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]


"""Other libraries' neurons in the graphs Dynamo builds for the ``ratebp`` backend: one module call each.

Dynamo inlines a module's Python ``forward``. For a neuron of another library (snnTorch's ``Leaky``,
Norse's ``LIFCell``, ...) that leaves a handful of elementwise ops per step in which the backend cannot
see a neuron. So while Dynamo traces for the ``ratebp`` backend, a call of a registered neuron
(``ratebp_compile.nn.register_neuron``; the adapters of ``ratebp_compile.interop``) in a training step
(module in training mode, autograd on) is recorded as one ``call_module`` node of that module — the
form ``transform``'s capture gives it — and the backend runs the same passes on it (``fold_time`` folds a
per-step loop, ``normalize_neurons`` reads the module's spec). What Dynamo does not see (the module's
settings: thresholds, decays, resets) the backend guards itself, recomputing every neuron's spec before
each call (``guards.Guards``).

How: Dynamo traces a call of a module that is not part of ``torch.nn`` through
``UnspecializedNNModuleVariable.call_function``; :func:`install` wraps that method (once) so that it
registers such a neuron with the output graph and emits the call instead. Every other module, every
other backend and every other situation (evaluation, no autograd) takes Dynamo's own path unchanged; a
neuron with hooks, or with a ``forward`` set on the instance, is refused (its call cannot be one node).
The module's output is computed once, on zeros, to give Dynamo its structure, and every attribute that
call sets is put back.

This relies on Dynamo internals of torch 2.13 (``torch._dynamo.variables``); ``tests/test_dynamo_neurons.py``
pins the behaviour.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["install", "records_as_call", "tracing_for_ratebp"]

_MARK = "_ratebp_neuron_calls"


def records_as_call(module: nn.Module) -> bool:
    """Whether a call of ``module`` becomes one ``call_module`` node when traced for the backend: a neuron
    registered with ``register_neuron`` (snnTorch's, Norse's, a user's; not ``rc.nn``'s, nor SpikingJelly's
    where its own custom ops describe them: multi-step, or single-step with settings the cell step covers),
    a layer with a rewrite (``interop.register_rewrite``: SpikingJelly's Dropout, whose mask is module
    state) or an ``nn.SyncBatchNorm`` (the ``sync_batchnorm`` pass rewrites it), in training mode, with
    autograd on."""
    from .interop import load_for, op_traced, rewrite_for
    from .nn.neuron import Neuron
    from .nn.spec import is_single_step, registered_neuron_types

    if isinstance(module, Neuron) or not (module.training and torch.is_grad_enabled()):
        return False
    if isinstance(module, nn.SyncBatchNorm):
        return True             # its forward's collectives (and its refusal of CPU tensors): the backend's own
    if rewrite_for(module) is not None:
        return True             # a layer with a rewrite (SpikingJelly's Dropout): the backend expands it
    load_for(module)
    if not isinstance(module, registered_neuron_types()):
        return False
    if op_traced(module):
        # SpikingJelly's neurons reach the graph as its own custom ops, which the backend reads — but for a
        # single-step neuron only where the cell step covers its settings
        return is_single_step(module) and not _cell_step_covers(module)
    return True


def _cell_step_covers(module: nn.Module) -> bool:
    from .interop import UnsupportedNeuron
    from .nn.spec import cell_spec
    from .passes.normalize_neurons import covered_by_cell_step

    try:
        return covered_by_cell_step(cell_spec(module).dynamics)
    except UnsupportedNeuron:
        return False            # a module call, which the backend refuses naming the module


def _not_one_call(module: nn.Module) -> Optional[str]:
    """Why a call of neuron ``module`` cannot be one module call (its hooks must run, its forward is the
    instance's own), or None."""
    from torch._dynamo.utils import nnmodule_has_hooks

    if "forward" in vars(module):
        return "its forward is replaced on the instance"
    if nnmodule_has_hooks(module, check_forward_hooks=True, check_backward_hooks=True):
        return "it has hooks"
    return None


def tracing_for_ratebp(tx) -> bool:
    """Whether the trace ``tx`` is for the ``ratebp`` backend (unwrapping Dynamo's, torch.compile's and
    DDPOptimizer's wrappers of the backend function)."""
    from torch._dynamo.eval_frame import innermost_backend

    from .backend import ratebp_backend

    from torch._dynamo.backends.distributed import DDPOptimizer

    fn = innermost_backend(tx.output.compiler_fn)
    if isinstance(getattr(fn, "__self__", None), DDPOptimizer):    # a DistributedDataParallel model's
        fn = fn.__self__.backend_compile_fn
    fn = getattr(fn, "compiler_fn", fn)              # torch.compile's wrapper of a backend with options
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn is ratebp_backend


def _call(variable, tx, args, kwargs):
    """The ``call_module`` node of neuron ``variable.value`` applied to ``args``/``kwargs``."""
    from torch._dynamo.guards import GuardBuilder, install_guard
    from torch._dynamo.source import AttrSource
    from torch._dynamo.utils import get_unique_name_wrt, proxy_args_kwargs
    from torch._dynamo.variables.builder import wrap_fx_proxy
    from torch._dynamo.variables.nn_module import record_nn_module_stack

    from .errors import dynamo_module_path

    module, source, graph = variable.value, variable.source, tx.output
    # the graph holds this very module; the decision read its training flag (a trace in eval mode must not
    # reuse this graph; grad mode is one of Dynamo's global guards)
    install_guard(source.make_guard(GuardBuilder.ID_MATCH))
    install_guard(AttrSource(source, "training").make_guard(GuardBuilder.CONSTANT_MATCH))
    key = next((k for k, m in graph.nn_modules.items() if m is module), None)
    if key is None:
        path = dynamo_module_path(source.name).replace(".", "_")        # its path in the model
        key = get_unique_name_wrt(path if path.isidentifier() else f"neuron_{path}", graph.nn_modules,
                                  graph.global_scope)
        graph.nn_modules[key] = module
    with record_nn_module_stack(key, variable.get_nn_module_stack_source(), tx, module):
        proxy = graph.create_proxy("call_module", key, *proxy_args_kwargs(args, kwargs))
        proxy.node.meta["ratebp.module_path"] = dynamo_module_path(source.name)
        return wrap_fx_proxy(tx, proxy, example_value=_example_output(module, proxy.node, graph.fake_mode))


def _refuse(variable, tx, why: str) -> None:
    from .errors import RateBPError, dynamo_module_path
    from .interop import PORTING

    module = variable.value
    raise RateBPError(f"ratebp backend: module '{dynamo_module_path(variable.source.name)}' "
                      f"({type(module).__module__}.{type(module).__qualname__}) at {tx.f_code.co_filename}:"
                      f"{tx.lineno} cannot be traced as one neuron: {why}. Under torch.compile a neuron is called "
                      f"as its class defines it, without hooks (rc.transform runs a multi-step neuron's hooks as "
                      f"nodes); see {PORTING}.")


def _example_output(module: nn.Module, node, fake_mode):
    """The fake output of the call ``node`` of ``module``, for Dynamo: the module's own forward run once on
    zeros shaped like the call's inputs (not on fake tensors: a library may branch on a tensor, as snnTorch's
    ``reset_delay=False`` reset does), every attribute it sets put back and the random number generators'
    states too (a Dropout's mask); each output shaped like an input is a fake tensor like that input
    (symbolic sizes included)."""
    from torch.fx.node import map_arg
    from torch.utils import _pytree as pytree

    from .capture import restored_attributes

    def hint(size):
        return int(size.node.hint) if isinstance(size, torch.SymInt) else int(size)

    fakes = [v for v in pytree.tree_leaves(map_arg((node.args, node.kwargs), lambda n: n.meta.get("example_value")))
             if isinstance(v, torch.Tensor)]
    if isinstance(module, nn.SyncBatchNorm):        # shaped like its input; running it would update its statistics
        with fake_mode:
            return torch.empty_like(fakes[0])
    real_args, real_kwargs = pytree.tree_map_only(
        torch.Tensor, lambda f: torch.zeros([hint(s) for s in f.shape], dtype=f.dtype, device=f.device),
        map_arg((node.args, node.kwargs), lambda n: n.meta.get("example_value")))
    devices = sorted({f.device for f in fakes if f.device.type == "cuda"}, key=str)
    with restored_attributes(module), torch.no_grad(), torch.random.fork_rng(devices=devices):
        out = torch.compiler.disable(module)(*real_args, **real_kwargs)      # run, not traced, no RNG drawn

    def fake(t: torch.Tensor):
        like = next((f for f in fakes if [hint(s) for s in f.shape] == list(t.shape) and f.device == t.device), None)
        with fake_mode:
            return torch.empty_like(like, dtype=t.dtype) if like is not None else fake_mode.from_tensor(t)

    return pytree.tree_map_only(torch.Tensor, fake, out)


def install() -> None:
    """Make Dynamo record registered neurons as module calls when it traces for the backend (idempotent)."""
    from torch._dynamo.variables.nn_module import UnspecializedNNModuleVariable

    original = UnspecializedNNModuleVariable.call_function
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def call_function(self, tx, args, kwargs) -> Any:
        if self.source is not None and tracing_for_ratebp(tx) and records_as_call(self.value):
            why = _not_one_call(self.value)
            if why is not None:
                _refuse(self, tx, why)
            return _call(self, tx, args, kwargs)
        return original(self, tx, args, kwargs)

    setattr(call_function, _MARK, True)
    UnspecializedNNModuleVariable.call_function = call_function

"""Capture: the user's ``nn.Module`` as an ``fx.GraphModule`` with every neuron as one node.

``capture(model, example_args)`` traces ``model.forward`` (``torch.fx``) in training mode. Neurons —
``ratebp_compile.nn`` modules and classes given to ``register_neuron`` — stay single ``call_module``
nodes; standard layers stay ``call_module`` nodes; everything else is traced through, so residual
adds, branches, concatenations, shared modules, functional calls and ``nn.Sequential`` all become
plain graph structure. The graph shares the model's submodules, parameters and buffers.

Refused at capture, with the user's source line:
- data-dependent control flow (``if x.sum() > 0``, loops over a tensor, ``.item()``);
- state kept between calls: a forward that assigns an attribute of a module or changes a container a
  module holds (``ratebp_compile.statewatch``, which also records the attributes the forward reads, for
  the program's guards: ``gm.meta["ratebp.reads"]``);
- neuron classes of other libraries that have not been registered;
- backward hooks and global module hooks (``ratebp_compile.hooks``).

A module's forward hooks do not run at capture: each hooked call becomes explicit hook nodes around it
(see ``ratebp_compile.hooks``), which run at every step. Arguments that are not tensors (``None``, numbers,
strings, flags) are traced as the constants they are (``if bias is not None:`` works), and the program is
compiled again for other values.

Tracing uses example inputs: every node's value is computed on fake tensors as it is traced
(``node.meta["val"]``; no compute, no side effects), so shapes are concrete and shape-dependent Python
(a loop over the timesteps of a single-step model) unrolls. ``propagate_shapes(gm, args)`` records the
same values for graphs the passes build.
"""
from __future__ import annotations

import functools

import inspect
import traceback
from contextlib import contextmanager
from typing import Any, Dict, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.fx._symbolic_trace import _orig_module_getattr
from torch.nn.utils import parametrize

from .errors import RateBPError, describe_node, user_frame
from .hooks import ModuleHooks, check_hooks_supported, forward_hooks, hooked_modules, hooks_suspended
from .interop import PORTING, UnsupportedNeuron, rewrite_for
from .nn.neuron import Neuron
from .nn.spec import (NeuronSpec, call_form, cell_spec, is_single_step, neuron_spec, registered_neuron_types,
                      starts_from_stored)
from .statewatch import StateWatch

__all__ = ["capture", "propagate_shapes", "is_foreign_neuron", "restored_attributes"]

# Base classes of stateful neurons in other SNN libraries, recognised by name so that those
# libraries need not be installed.
_FOREIGN_NEURON_BASES = {"MemoryModule", "BaseNode", "SpikingNeuron", "LIFBox", "SNNCell", "BaseNeuron"}
_FOREIGN_PACKAGES = ("spikingjelly", "snntorch", "norse", "sinabs", "lava", "spikingtorch")


def is_foreign_neuron(module: torch.nn.Module) -> bool:
    """A neuron class of another SNN library that has not been registered with ``register_neuron``."""
    if isinstance(module, registered_neuron_types()):
        return False
    for cls in type(module).__mro__:
        if cls.__name__ in _FOREIGN_NEURON_BASES and cls.__module__.split(".")[0] in _FOREIGN_PACKAGES:
            return True
    return False


def _is_neuron_leaf(module: torch.nn.Module) -> bool:
    return isinstance(module, (Neuron,) + registered_neuron_types()) or is_single_step(module)


#: Non-tensor arguments traced as constants: their value is part of the program's input signature.
_CONSTANT_ARGUMENTS = (type(None), bool, int, float, str)


class _SNNTracer(fx.Tracer):
    def __init__(self):
        super().__init__()
        self.record_stack_traces = True
        self.proxy_buffer_attributes = True      # buffers are graph values: a forward that updates one is seen

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if _is_neuron_leaf(m):
            return True
        if rewrite_for(m) is not None:
            return False
        if is_foreign_neuron(m):
            raise RateBPError(
                f"unrecognised stateful module '{qualname}' ({type(m).__module__}.{type(m).__name__}): it keeps "
                f"its membrane state between calls, so its time dynamics are hidden from the compiler. Use "
                f"ratebp_compile.nn.LIF / IF / ParametricLIF, or describe the class with "
                f"ratebp_compile.nn.register_neuron({type(m).__name__}, to_spec). Called at {_calling_frame()}. "
                f"See {PORTING}.")
        if parametrize.is_parametrized(m) or isinstance(m, parametrize.ParametrizationList):
            return False             # traced through: its weight is computed from the parametrization
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        """A module call: a node (leaf modules) or its forward traced through — never its hooks, which
        become hook nodes around the call (``ratebp_compile.hooks``)."""
        path = self.path_of_module(m)
        pre, post = forward_hooks(m, path)
        if pre is not None:
            self.create_proxy("call_function", pre, (tuple(args),), {})
        rewrite = rewrite_for(m)
        if rewrite is not None:
            try:
                out = rewrite(m, *args, **kwargs)
            except UnsupportedNeuron as e:
                raise RateBPError(f"module '{path}' ({type(m).__module__}.{type(m).__qualname__}) cannot be "
                                  f"compiled: {e} Called at {_calling_frame()}. See {PORTING}.") from None
        else:
            out = super().call_module(m, lambda *a, **k: m.forward(*a, **k), args, kwargs)
        if post is not None:
            self.create_proxy("call_function", post, (tuple(args), out), {})
        return out


def _calling_frame() -> str:
    return user_frame("".join(traceback.format_stack())) or "<unknown location>"


def _frame_of(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    text = "".join(traceback.format_list(frames))
    return user_frame(text) or "<unknown location>"


@contextmanager
def _all_training(model: torch.nn.Module):
    modes = {m: m.training for m in model.modules()}
    try:
        model.train()
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


class _ShapedProxy(fx.Proxy):
    """A proxy that knows its value (traced on fake tensors): shapes, dtypes and devices are concrete,
    so shape-dependent Python — ``for t in range(x.shape[0])``, ``for x_t in x_seq``, ``len(x)`` —
    runs at trace time and unrolls. Values stay symbolic: control flow on them is still refused."""

    _ATTRIBUTES = ("shape", "dtype", "device", "ndim", "is_cuda", "layout")
    _METHODS = ("size", "dim", "numel", "nelement", "ndimension", "element_size", "is_floating_point",
                "is_complex", "get_device")

    def __getattr__(self, k):
        val = self.node.meta.get("val")
        if isinstance(val, torch.Tensor) and (k in self._ATTRIBUTES or k in self._METHODS):
            return getattr(val, k)
        return super().__getattr__(k)

    def __len__(self):
        val = self.node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > 0:
            return val.shape[0]
        if isinstance(val, (tuple, list)):
            return len(val)
        return super().__len__()

    def __iter__(self):
        val = self.node.meta.get("val")
        if isinstance(val, (torch.Tensor, tuple, list)):
            return iter([self[i] for i in range(len(self))])
        return super().__iter__()


class _ShapedTracer(_SNNTracer):
    """Traces with example inputs: each node's value is computed on fake tensors as the node is created
    (``node.meta["val"]``), so proxies know their shapes. A module runs with its parameters and buffers
    swapped for fakes; a multi-step neuron's output shapes come from its spec."""

    def __init__(self, example_args: Sequence[Any], specs: Dict[torch.nn.Module, NeuronSpec],
                 refused: Dict[torch.nn.Module, str]):
        super().__init__()
        self.example_args = list(example_args)
        self.specs = specs                   # the neurons' specs, read before tracing (see neuron_specs)
        self.refused = refused               # neurons in a setting the compiler cannot honour, with why
        self.stored_state: Set[torch.nn.Module] = set()   # neurons called without their state: they use theirs
        self.fake_mode = FakeTensorMode()
        self._fakes: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}   # id(real) -> (real, fake)
        self._placeholder_index = 0

    def fake(self, t: torch.Tensor) -> torch.Tensor:
        """One fake tensor per real one (the real one is held, so its id stays unique while tracing)."""
        entry = self._fakes.get(id(t))
        if entry is None:
            # A plain fake tensor (not an nn.Parameter, which fx's patched getattr would turn into a
            # proxy); created outside the fake mode, which may be running a module just now.
            with unset_fake_temporarily(), self.fake_mode:
                fake = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=t.device)
            entry = self._fakes[id(t)] = (t, fake.requires_grad_(t.requires_grad) if t.is_floating_point() else fake)
        return entry[1]

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapedProxy(node, self)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if m in self.refused:
            raise RateBPError(f"module '{qualname}' ({type(m).__module__}.{type(m).__qualname__}) cannot be "
                              f"compiled: {self.refused[m]} Called at {_calling_frame()}. See {PORTING}.")
        return super().is_leaf_module(m, qualname)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        try:
            proxy.node.meta["val"] = self._evaluate(proxy.node)
        except RateBPError:
            raise
        except Exception as e:
            raise RateBPError(f"{describe_node(proxy.node, self.root)} fails on the given inputs: "
                              f"{type(e).__name__}: {e}") from e
        return proxy

    def _value(self, node: fx.Node) -> Any:
        """A node's value; constants fx registers while tracing (get_attr nodes made without a proxy)
        are evaluated on first use."""
        if "val" not in node.meta and node.op == "get_attr":
            node.meta["val"] = self._evaluate(node)
        return node.meta.get("val")

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            i = self._placeholder_index
            self._placeholder_index += 1
            value = self.example_args[i] if i < len(self.example_args) else (node.args[0] if node.args else None)
            return self.fake(value) if isinstance(value, torch.Tensor) else value
        if node.op == "get_attr":
            value = self.root
            for part in node.target.split("."):
                value = _plain_getattr(value, part)
            return self.fake(value) if isinstance(value, torch.Tensor) else value
        if isinstance(node.target, ModuleHooks):
            return None                      # hooks run in the compiled step, never at capture
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), self._value)
        with self.fake_mode:
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            module = self.root.get_submodule(node.target)
            spec = self.specs.get(module)
            if spec is not None or is_single_step(module):
                if starts_from_stored(module, len(args) - 1):
                    self.stored_state.add(module)
                return _neuron_outputs(module, spec, args)
            with _fake_parameters_and_buffers(module, self.fake), _numeric_momentum(module), \
                    self._buffers_as_values():
                return shape_forward(module)(*args, **kwargs)     # the module itself, without its hooks

    @contextmanager
    def _buffers_as_values(self):
        """A leaf module runs on its (fake) buffers, not on proxies of them."""
        self.proxy_buffer_attributes = False
        try:
            yield
        finally:
            self.proxy_buffer_attributes = True


def _plain_getattr(obj: Any, name: str) -> Any:
    """``getattr`` without fx's patch of ``Module.__getattr__`` (which would hand back proxies)."""
    try:
        return object.__getattribute__(obj, name)
    except AttributeError:
        if isinstance(obj, torch.nn.Module):
            return _orig_module_getattr(obj, name)
        raise


@contextmanager
def _numeric_momentum(module: torch.nn.Module):
    """A cumulative-average BatchNorm reads its (fake) batch counter as a number; its momentum affects
    only running statistics, never shapes."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.momentum is None]
    try:
        for m in norms:
            vars(m)["momentum"] = 0.0        # not through setattr: capture refuses writes by the forward
        yield
    finally:
        for m in norms:
            vars(m)["momentum"] = None


def capture(model: torch.nn.Module, example_args: Sequence[Any]) -> fx.GraphModule:
    """Trace ``model`` (in training mode) on inputs like ``example_args`` into a GraphModule with neurons
    as single nodes and ``meta["val"]`` on every node; ``gm.meta["ratebp.reads"]`` maps modules to the
    attributes the forward read. Nothing of the model changes."""
    if not isinstance(model, torch.nn.Module):
        raise RateBPError(f"transform expects an nn.Module, got {type(model).__name__}")
    check_hooks_supported(model)
    refused: Dict[torch.nn.Module, str] = {}
    tracer = _ShapedTracer(example_args, neuron_specs(model, refused), refused)
    watch = StateWatch(model, lambda m: not _is_neuron_leaf(m), _calling_frame)
    try:
        with _all_training(model), restored_attributes(model):
            with watch.watching():
                graph = tracer.trace(model, concrete_args=_constant_arguments(model, example_args))
            _add_root_hooks(graph, model)
            # tensors the forward creates become attributes of the model while tracing: the graph
            # module keeps them, the model does not
            gm = fx.GraphModule(model, graph, class_name=type(model).__name__ + "Graph")
    except RateBPError:
        raise
    except fx.proxy.TraceError as e:
        raise RateBPError(
            f"cannot capture {type(model).__name__}: {e} at {_frame_of(e)}. Control flow that depends on tensor "
            f"values cannot be compiled; compute both branches with torch.where, or move the decision "
            f"outside the model.") from e
    except Exception as e:
        raise RateBPError(f"cannot capture {type(model).__name__}: {type(e).__name__}: {e} at {_frame_of(e)}") from e
    gm.meta["ratebp.model"] = type(model).__name__
    gm.meta["ratebp.reads"] = dict(watch.reads)
    gm.meta["ratebp.stored_state"] = set(tracer.stored_state)
    return gm


def _constant_arguments(model: torch.nn.Module, example_args: Sequence[Any]) -> Dict[str, Any]:
    """The forward's arguments that are not tensors (None, numbers, strings, flags), by name: fx traces
    them as constants."""
    names = list(inspect.signature(model.forward).parameters)
    return {name: a for name, a in zip(names, example_args) if isinstance(a, _CONSTANT_ARGUMENTS)}


def _add_root_hooks(graph: fx.Graph, model: torch.nn.Module) -> None:
    """The model's own forward hooks as nodes: pre-hooks after the inputs, hooks before the output."""
    pre, post = forward_hooks(model, "")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    if pre is not None:
        with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
            graph.call_function(pre, (tuple(placeholders),))
    if post is not None:
        with graph.inserting_before(output):
            graph.call_function(post, (tuple(placeholders), output.args[0]))


def _neuron_outputs(module: torch.nn.Module, spec: Optional[NeuronSpec], args) -> Any:
    """Uninitialised outputs of a neuron module's call, without running it (its state, which it may keep
    anywhere, stays untouched): the spikes, or the tuple its call form says (state outputs shaped like
    one step of the input; the compiler never reads them)."""
    x = args[0]
    spikes = spec.empty_outputs(x) if spec is not None else torch.empty_like(x)
    form = call_form(module)
    if not form.outputs:
        return spikes
    return tuple(spikes if role == "spikes" else torch.empty_like(x) for role in form.outputs)


def neuron_specs(model: torch.nn.Module,
                 refused: Optional[Dict[torch.nn.Module, str]] = None) -> Dict[torch.nn.Module, NeuronSpec]:
    """The spec of every multi-step neuron of ``model``, by module. Read before tracing or running on fake
    tensors: a registered neuron's ``to_spec`` may read its tensors (``float(m.beta)``), which must be real.
    A neuron whose ``to_spec`` refuses its setting goes into ``refused`` with the reason (the capture
    raises when the forward calls it, naming the line); without ``refused`` the refusal is raised here."""
    specs = {}
    for name, m in model.named_modules():
        try:
            spec = neuron_spec(m)
            if spec is None and is_single_step(m):
                cell_spec(m)                 # a single-step neuron's setting is checked here too
        except UnsupportedNeuron as e:
            if refused is None:
                raise RateBPError(f"module '{name}' ({type(m).__module__}.{type(m).__qualname__}) cannot be "
                                  f"compiled: {e} See {PORTING}.") from None
            refused[m] = str(e)
            continue
        if spec is not None:
            specs[m] = spec
    return specs


def shape_forward(module: torch.nn.Module):
    """The forward that gives a leaf module's outputs on fake tensors: its own, but for an ``nn.SyncBatchNorm``
    that of a local BatchNorm (the same shapes; its own refuses CPU tensors once ``torch.distributed`` is
    initialised, and the ``sync_batchnorm`` pass replaces its calls anyway)."""
    if isinstance(module, torch.nn.SyncBatchNorm):
        return functools.partial(torch.nn.modules.batchnorm._BatchNorm.forward, module)
    return module.forward


class _Propagator(fx.Interpreter):
    def __init__(self, gm, specs: Dict[torch.nn.Module, NeuronSpec]):
        super().__init__(gm)
        self.specs = specs
        self.extra_traceback = False   # our errors already name the node and the user's line

    def run_node(self, n: fx.Node) -> Any:
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        spec = self.specs.get(module)
        try:
            if isinstance(n.target, NeuronSpec):     # elementwise over [T, ...]: no need to run the time loop
                args, _ = self.fetch_args_kwargs_from_env(n)
                result = n.target.empty_outputs(*args)
            elif module is not None and (spec is not None or is_single_step(module)):
                args, _ = self.fetch_args_kwargs_from_env(n)
                result = _neuron_outputs(module, spec, args)
            elif isinstance(module, torch.nn.SyncBatchNorm):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                result = shape_forward(module)(*args, **kwargs)
            else:
                result = super().run_node(n)
        except RateBPError:
            raise
        except Exception as e:
            raise RateBPError(f"{describe_node(n, self.module)} fails on the given inputs: "
                              f"{type(e).__name__}: {e}") from e
        n.meta["val"] = result
        return result


@contextmanager
def on_fake_tensors(gm: fx.GraphModule):
    """Run ``gm`` on fake tensors: inside, ``gm``'s parameters and buffers are fake (of the same shapes,
    dtypes and ``requires_grad``), the fake mode is active, and ``fake(t)`` makes a fake input like ``t``.
    Every module attribute a forward sets is put back afterwards, and no forward hook runs; nothing real
    is computed or changed.

        with on_fake_tensors(gm) as fake:
            out = gm(*[fake(a) for a in args])
    """
    fake_mode = FakeTensorMode()

    def fake(t: torch.Tensor) -> torch.Tensor:
        with fake_mode:
            out = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=t.device)
        return out.requires_grad_(t.requires_grad) if t.is_floating_point() else out

    with restored_attributes(gm), _numeric_momentum(gm), _fake_parameters_and_buffers(gm, fake), \
            hooks_suspended(hooked_modules(gm)), fake_mode:
        yield fake


def propagate_shapes(gm: fx.GraphModule, args: Sequence[Any]) -> None:
    """Record ``node.meta["val"]`` (fake tensors, ints, tuples) for every node of ``gm`` run on
    inputs like ``args`` (real or fake tensors: only their shapes, strides, dtypes and devices count).

    Nothing real is computed and nothing of the model is changed, even when a node fails.
    """
    specs = neuron_specs(gm)
    with on_fake_tensors(gm) as fake, torch.no_grad():
        _Propagator(gm, specs).run(*[fake(a) if isinstance(a, torch.Tensor) else a for a in args])


@contextmanager
def _fake_parameters_and_buffers(gm: fx.GraphModule, fake):
    """Swap every parameter, buffer and plain tensor attribute of every module for a fake copy, and back.
    Works per module object, so modules reachable by several paths (one module in two graphs) and tied
    tensors are swapped once and restored exactly."""
    fakes, saved = {}, []
    for m in gm.modules():
        for store in (m._parameters, m._buffers, vars(m)):
            for key, value in store.items():
                if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
                    saved.append((store, key, value))
                    store[key] = fakes.setdefault(id(value), fake(value))
    try:
        yield
    finally:
        for store, key, value in reversed(saved):
            store[key] = value


@contextmanager
def restored_attributes(root: torch.nn.Module):
    """Put back every attribute a module's forward sets while it is traced or runs on fake tensors (the
    state of a single-step neuron, say, which another library may keep in a buffer its forward — or a
    reset the user's forward calls — replaces: snnTorch's ``mem``, SpikingJelly's memories)."""
    stores = ("_buffers", "_parameters", "_memories")
    saved = {m: (dict(vars(m)), {name: dict(vars(m)[name]) for name in stores
                                 if isinstance(vars(m).get(name), dict)})
             for m in root.modules()}
    try:
        yield
    finally:
        for m, (attrs, contents) in saved.items():
            for k in [k for k in vars(m) if k not in attrs]:
                delattr(m, k)
            for k, v in attrs.items():
                if vars(m).get(k, v) is not v:
                    object.__setattr__(m, k, v)
            for name, entries in contents.items():
                store = vars(m)[name]
                if store.keys() != entries.keys() or any(store[k] is not v for k, v in entries.items()):
                    store.clear()
                    store.update(entries)

"""normalize_neurons: every neuron module call becomes one node whose target is its NeuronSpec."""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from ..errors import RateBPError, describe_node, dynamo_module_path
from ..families.lif import LIFDynamics, spec_from_op_args
from ..interop import PORTING, UnsupportedNeuron
from ..kernels.lif import op_arguments
from ..nn.spec import FinalMembrane, NeuronSpec, call_form, neuron_op, neuron_spec
from .infra import PassResult, at_node, constant_value, copy_meta, postcondition, require

__all__ = ["normalize_neurons", "covered_by_cell_step"]


def _check(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_module":
            require(neuron_spec(gm.get_submodule(node.target)) is None, "normalize_neurons", node,
                    "a neuron module call was left in the graph", gm)
        if isinstance(node.target, NeuronSpec):
            require(node.meta.get("ratebp.neuron") is node.target, "normalize_neurons", node,
                    "neuron node without its spec in meta['ratebp.neuron']", gm)


def _op_forms():
    """The custom ops a neuron module's forward appears as in a torch.compile (Dynamo) graph."""
    op = torch.ops.ratebp.lif_bptt_forward
    return (op, op.default)


def _module_path(node: fx.Node) -> str:
    """The neuron module's path as Dynamo recorded it (``L['self'].layers[0].sn`` → ``layers.0.sn``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    return dynamo_module_path(str(list(stack.values())[-1][0])) or node.name


def _normalize_op_form(gm: fx.GraphModule, node: fx.Node) -> None:
    """``spikes, h = ratebp.lif_bptt_forward(x, decay, decay_logit, ...)`` → ``spec(x[, decay_logit])``."""
    args = op_arguments(node)
    logit = args["decay_logit"]
    spec = spec_from_op_args(args)
    users = list(node.users)
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
        raise RateBPError(f"normalize_neurons: {describe_node(node, gm)}: only the spikes of a neuron op may be used "
                          f"(its membrane output is internal to BPTT)")
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(spec, (args["x"],) + ((logit,) if logit is not None else ()))
    spikes_val = users[0].meta.get("val", node.meta.get("val", (None,))[0]) if users else None
    copy_meta(new, node, "normalize_neurons", spikes_val)
    new.meta["ratebp.neuron"] = spec
    new.meta["ratebp.module"] = _module_path(node)
    for u in users:
        u.replace_all_uses_with(new)
        gm.graph.erase_node(u)
    gm.graph.erase_node(node)


def _at_rest(value, rest: float) -> bool:
    """Whether a neuron op's initial state is the resting potential filled like one step of its input
    (``torch.full_like(x[0], rest)``, as a library that keeps its state builds it after a reset)."""
    if not (isinstance(value, fx.Node) and value.op == "call_function" and value.target is torch.full_like):
        return False
    fill = value.args[1] if len(value.args) > 1 else value.kwargs.get("fill_value")
    return isinstance(fill, (int, float)) and float(fill) == float(rest)


def _normalize_library_op(gm: fx.GraphModule, node: fx.Node, parse) -> None:
    """A neuron another library runs as its own custom op (``sj_lif::forward(x, v, tau, ...)``, as Dynamo
    records a SpikingJelly ``LIFNode``) → ``spec(x, *params)``; its final membrane, which Dynamo hands
    back to the module, → ``FinalMembrane(spec)(x, *params)``."""
    args = op_arguments(node)
    where = f"{describe_node(node, gm)} (neuron '{_module_path(node)}')"
    try:
        form = parse(args)
    except UnsupportedNeuron as e:
        raise RateBPError(f"normalize_neurons: {where} cannot be compiled: {e} See {PORTING}.") from None
    if _one_step(args[form.x]) is not None:
        _as_cell_step(gm, node, form, args, where)
        return
    if form.state is not None and not _at_rest(args[form.state], form.rest):
        raise RateBPError(f"normalize_neurons: {where} starts from a membrane that is not at rest (the module still "
                          f"holds the state of an earlier call): the compiled step always starts from rest; reset "
                          f"the network before each batch. See {PORTING}.")
    x, params = args[form.x], [args[name] for name in form.params]
    users = list(node.users)
    for u in users:
        role = form.outputs[u.args[1]] if u.target is operator.getitem else None
        if role is None or (role == "internal" and u.users):
            raise RateBPError(f"normalize_neurons: {where}: only its spikes and its final membrane may be used")
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(form.spec, (x, *params))
        final = gm.graph.call_function(FinalMembrane(form.spec), (x, *params)) \
            if any(form.outputs[u.args[1]] == "membrane" and u.users for u in users) else None
    spikes_user = next((u for u in users if form.outputs[u.args[1]] == "spikes"), None)
    copy_meta(new, node, "normalize_neurons", spikes_user.meta.get("val") if spikes_user is not None else None)
    new.meta["ratebp.neuron"] = form.spec
    new.meta["ratebp.module"] = _module_path(node)
    for u in users:
        role = form.outputs[u.args[1]]
        if role == "membrane" and final is not None:
            copy_meta(final, u, "normalize_neurons", u.meta.get("val"))
        u.replace_all_uses_with(new if role == "spikes" else final)
        gm.graph.erase_node(u)
    gm.graph.erase_node(node)
    if form.state is not None:           # full_like(x[0], rest): nothing else reads it
        _erase_unused(args[form.state])


def _one_step(x) -> Optional[fx.Node]:
    """``x_t`` if ``x`` is ``x_t.unsqueeze(0)``: a library's multi-step op run on one step (SpikingJelly's
    single-step neurons), else None."""
    if not (isinstance(x, fx.Node) and x.op == "call_method" and x.target == "unsqueeze"):
        return None
    dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim")
    return x.args[0] if dim == 0 else None


def covered_by_cell_step(dynamics) -> bool:
    """Whether ``ratebp::lif_cell_step`` computes a single-step neuron of these dynamics (on floating-point
    input): the LIF family, resting at 0, with one of the kernels' surrogates."""
    return isinstance(dynamics, LIFDynamics) and not dynamics.v_rest and dynamics.fusable(torch.empty(0))


def _as_cell_step(gm: fx.GraphModule, node: fx.Node, form, args, where: str) -> None:
    """A library's neuron op run on one step, its membrane handed from call to call (SpikingJelly's
    single-step ``LIFNode`` under torch.compile: ``sj_lif::forward(x_t.unsqueeze(0), v, ...)``, ``v`` the
    previous call's membrane) → ``ratebp::lif_cell_step(x_t, v, ...)``, the cell step ``fold_time`` folds
    with its loop (the first call from rest: ``v`` None). Where the family or its settings have no cell
    step (another family, a surrogate the kernels do not know, a resting potential other than 0), refused."""
    dynamics, x_t = form.spec.dynamics, _one_step(args[form.x])
    if not covered_by_cell_step(dynamics) or not dynamics.fusable(x_t.meta.get("val")):
        raise RateBPError(f"normalize_neurons: {where} runs one step per call under torch.compile with a setting "
                          f"the cell step does not cover ({dynamics.describe()}); use step_mode='m', or "
                          f"ratebp_compile.transform. See {PORTING}.")
    state = args[form.state]
    if _at_rest(state, form.rest):
        v = None
    elif isinstance(state, fx.Node) and state.target is operator.getitem and state.args[1] == 1 and \
            _is_cell_step(state.args[0]):
        v = state                             # the previous call's membrane (already a cell step's output 1)
    else:
        raise RateBPError(f"normalize_neurons: {where} starts from a membrane that is not at rest (the module still "
                          f"holds the state of an earlier call): reset the network before each batch. See {PORTING}.")
    params = [args[name] for name in form.params]
    with gm.graph.inserting_before(node):
        step = gm.graph.call_function(torch.ops.ratebp.lif_cell_step.default, (x_t, v, *dynamics.op_args(params)))
        spikes = gm.graph.call_function(operator.getitem, (step, 0))
        membrane = gm.graph.call_function(operator.getitem, (step, 1))
    copy_meta(step, node, "normalize_neurons", (x_t.meta["val"], x_t.meta["val"]))
    copy_meta(spikes, node, "normalize_neurons", x_t.meta["val"])
    copy_meta(membrane, node, "normalize_neurons", x_t.meta["val"])
    for u in list(node.users):
        role = form.outputs[u.args[1]] if u.target is operator.getitem else None
        if role == "spikes":                  # spikes[0]: the step's spikes
            for w in list(u.users):
                if not (w.target is operator.getitem and w.args[1] == 0):
                    raise RateBPError(f"normalize_neurons: {where}: its one-step spikes are used other than as "
                                      f"spikes[0]")
                w.replace_all_uses_with(spikes)
                gm.graph.erase_node(w)
        elif role == "membrane":
            u.replace_all_uses_with(membrane)
        elif u.users:
            raise RateBPError(f"normalize_neurons: {where}: only its spikes and its membrane may be used")
        gm.graph.erase_node(u)
    gm.graph.erase_node(node)
    _erase_unused(args[form.x])
    _erase_unused(state)


def _is_cell_step(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and \
        getattr(node.target, "_overloadpacket", node.target) is torch.ops.ratebp.lif_cell_step


def _erase_unused(dead) -> None:
    """Erase ``dead`` and the inputs it leaves unused, along a chain of indexing, ``unsqueeze`` and
    ``full_like`` (what a library builds its op's arguments with)."""
    while isinstance(dead, fx.Node) and not dead.users and \
            ((dead.op == "call_function" and dead.target in (torch.full_like, operator.getitem)) or
             (dead.op == "call_method" and dead.target == "unsqueeze")):
        source = dead.args[0]
        dead.graph.erase_node(dead)
        dead = source


def _normalize(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Replace ``node`` by its neuron's spec call if it is a neuron; whether it was."""
    if node.op == "call_function" and node.target in _op_forms():
        _normalize_op_form(gm, node)
        return True
    parse = neuron_op(node.target) if node.op == "call_function" else None
    if parse is not None:
        _normalize_library_op(gm, node, parse)
        return True
    if node.op != "call_module":
        return False
    module = gm.get_submodule(node.target)
    spec = neuron_spec(module)        # None for single-step neurons: fold_time folds them with their loop
    if spec is None:
        return False
    form = call_form(module)
    if len(node.args) > 1 + form.state_args or node.kwargs:
        raise RateBPError(f"normalize_neurons: {describe_node(node, gm)} is called with "
                          f"{len(node.args)} positional and {len(node.kwargs)} keyword arguments; a neuron "
                          f"takes exactly one input tensor" + (f" and {form.state_args} state argument(s)"
                                                              if form.state_args else ""))
    if len(node.args) < 1 + form.state_args and not form.stored_at_rest(module):
        raise RateBPError(f"normalize_neurons: {describe_node(node, gm)} starts from the state the module holds, "
                          f"which is not at rest (left by an earlier call): the compiled step always runs a "
                          f"multi-step neuron from rest; reset it before each batch. See {PORTING}.")
    for value in node.args[1:]:
        if not form.at_rest(constant_value(gm, value)):
            raise RateBPError(f"normalize_neurons: {describe_node(node, gm)} is given a state that is not at rest: "
                              f"the compiled step always runs a multi-step neuron from rest. See {PORTING}.")
    spikes_of = {}
    if form.outputs:                  # a tuple out: its spikes are the neuron; its state must go unused
        for user in list(node.users):
            role = form.outputs[user.args[1]] if user.target is operator.getitem else None
            if role is None or (role != "spikes" and user.users):
                reader = describe_node(next(iter(user.users)) if role else user, gm)
                raise RateBPError(f"normalize_neurons: the output of {describe_node(node, gm)} is used other than "
                                  f"for its spikes (by {reader}): "
                                  f"rate-based backprop propagates through spikes only, and the compiled step keeps "
                                  f"a neuron's state inside it. See {PORTING}.")
            spikes_of[user] = role
    with gm.graph.inserting_before(node):
        params = [gm.graph.get_attr(f"{node.target}.{name}") for name in spec.param_names]
        new = gm.graph.call_function(spec, (node.args[0], *params))
    for p, name in zip(params, spec.param_names):
        copy_meta(p, node, "normalize_neurons", getattr(module, name))
    val = node.meta.get("val")
    copy_meta(new, node, "normalize_neurons", val[form.spikes_index] if form.outputs else val)
    new.meta["ratebp.neuron"] = spec
    new.meta["ratebp.module"] = node.target
    for user, role in spikes_of.items():
        if role == "spikes":
            user.replace_all_uses_with(new)
        gm.graph.erase_node(user)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return True



@postcondition(_check)
def normalize_neurons(gm: fx.GraphModule) -> PassResult:
    """Replace each neuron ``call_module`` by a ``call_function`` of its :class:`NeuronSpec`.

    The spec (``ratebp_compile.nn.neuron_spec(module)``) records the neuron's kind, decay, threshold,
    reset, surrogate and time layout; calling it runs the same multi-step forward, so the graph
    computes exactly what it did. Learnable neuron parameters become explicit arguments.

    Before (``sn`` a ``ratebp_compile.nn.LIF(decay=0.5)``, T = 2)::

        conv = self.conv(x)                       # [2·B, C, H, W]
        unflatten = conv.unflatten(0, (2, -1))    # [2, B, C, H, W]
        sn = self.sn(unflatten)

    After::

        conv = self.conv(x)
        unflatten = conv.unflatten(0, (2, -1))
        lif = ratebp_compile_nn_spec_lif(unflatten)   # target: NeuronSpec(LIFDynamics(decay=0.5, ...))

    A ``ParametricLIF`` becomes ``plif(x, self.sn.w)``. In a graph captured by torch.compile, where a
    neuron module's forward is its fused op, ``spikes = ratebp.lif_bptt_forward(x, 0.5, None, ...)[0]``
    becomes the same node, its spec read off the op's arguments; so does another library's neuron op
    (``register_neuron_op``: SpikingJelly's ``sj_lif::forward(x, full_like(x[0], v_reset), tau, ...)``),
    whose final-membrane output becomes ``FinalMembrane(spec)(x)``; run on one step with the previous
    call's membrane (a SpikingJelly single-step neuron in a loop), it becomes
    ``ratebp.lif_cell_step(x_t, v, ...)``, a cell step ``fold_time`` folds. A neuron whose call returns a
    tuple (Norse's ``z, s = lif(x)``) keeps its spikes; its state must go unused.

    Holds before: the graph comes from ``capture`` (neurons are ``call_module`` leaves).
    Holds after: no ``call_module`` targets a multi-step neuron; every neuron node has
    ``meta["ratebp.neuron"]`` (its spec) and ``meta["ratebp.module"]`` (the module path it came from).
    Single-step neurons (``LIFCell``, ...) stay module calls, for ``fold_time``.
    """
    modified = False
    for node in list(gm.graph.nodes):
        with at_node("normalize_neurons", node, gm):
            modified = _normalize(gm, node) or modified
    if modified:
        gm.recompile()
    return PassResult(gm, modified)

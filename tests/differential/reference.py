"""An eager reference of the semantics contract, written from the contract alone.

The network is given as a :class:`Spec` — a small DAG of layers — plus the module built from it
(``tests.differential.generator.SpecNet``), from which only parameter tensors and the neurons'
public hyper-parameters are read. Everything else is re-implemented here in plain PyTorch:

* the LIF family's dynamics (h_t = λ·v_{t−1} + c_t, or λ·v_{t−1} + (1 − λ)·c_t with input decay;
  spike at h_t ≥ V_th; soft reset h_t − V_th·s_t or hard reset to v_reset; IF is λ = 1,
  ParametricLIF λ = 1 − sigmoid(w)) and the four surrogate derivatives;
* the **spike pass**: the exact forward without autograd; per neuron the rate r = mean_t s_t, the
  eligibility e = mean_t ψ_t·κ_t (κ = ∂h/∂c for an input held constant in time) and, for a learned
  decay, e_w = ∂r/∂w; each BatchNorm's statistics over time × batch;
* the **rate pass**: the network once, with autograd, on time-averaged inputs; a neuron returns r
  with Jacobian diag(e) (and Σ grad·e_w for w); a BatchNorm over time normalises with the spike
  pass's statistics as values and differentiates through its input's own batch statistics;
* the **outputs**: the spike pass's exact values, the gradient of a per-step output summed over the
  steps into the rate output; BatchNorm running statistics updated once, from the spike pass;
* **BPTT**: plain autograd through the per-step unrolled forward, spikes through a small autograd
  function with the surrogate as derivative.

Tensors are walked in a canonical form whatever the model's layout: temporal ``[T, B, ...]``, static
``[B, ...]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Node", "Spec", "StepResult", "surrogate_derivative", "neuron_spike_pass", "neuron_bptt",
           "spike_pass", "ratebp_step", "bptt_step", "canonical_input", "model_output"]

# ---------------------------------------------------------------------------------------------------
# The specification language
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    """One layer of a network specification.

    op: ``input``, ``repeat`` (static → temporal, the model repeats its input over T), ``conv``,
    ``linear``, ``bn``, ``avgpool``, ``global_pool``, ``flatten``, ``neuron``, ``add``, ``cat``
    (channels), ``mean_time`` (temporal → static). ``shape`` is one sample's shape, ``(C, H, W)`` or
    ``(F,)``; ``temporal`` whether the tensor has a time axis; ``attrs`` the op's arguments.
    """

    name: str
    op: str
    inputs: Tuple[str, ...] = ()
    shape: Tuple[int, ...] = ()
    temporal: bool = True
    attrs: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        args = ", ".join(self.inputs)
        attrs = ", ".join(f"{k}={v!r}" for k, v in self.attrs.items())
        return f"{self.name} = {self.op}({args}{', ' if args and attrs else ''}{attrs})  " \
               f"# {'temporal' if self.temporal else 'static'} {self.shape}"


@dataclass(frozen=True)
class Spec:
    """A multi-step SNN: nodes in execution order (the last one is the output), T, the batch size,
    the input layout (``"TB"``: ``[T, B, ...]``; ``"T*B"``: ``[T·B, ...]``, neurons told T), whether
    the input is static (repeated over T inside the model), the output form of a temporal last node
    (``"steps"``: per step, as the layout has them; ``"steps_view"``: per step viewed as
    ``[T, B, K]``, layout ``"T*B"``; ``"mean"``: their mean over time), the spike pass's
    ``time_chunk`` (``"default"``: the argument left out) and the seed of the parameter values and
    inputs."""

    T: int
    B: int
    layout: str
    static: bool
    nodes: Tuple[Node, ...]
    output: str = "steps"
    time_chunk: Any = "default"
    seed: int = 0

    @property
    def final(self) -> Node:
        return self.nodes[-1]

    def describe(self) -> str:
        head = (f"T={self.T} B={self.B} layout={self.layout} static_input={self.static} output={self.output} "
                f"time_chunk={self.time_chunk} seed={self.seed}")
        return "\n".join([head] + ["  " + n.describe() for n in self.nodes])


@dataclass
class StepResult:
    """One training step: outputs and loss (detached), gradients and buffers after the step by the
    model's names, and the smallest distance of a membrane to the threshold (or to an edge of a
    rectangular surrogate) met in the forward."""

    out: torch.Tensor
    loss: torch.Tensor
    grads: Dict[str, Optional[torch.Tensor]]
    buffers: Dict[str, torch.Tensor]
    margin: float = math.inf


# ---------------------------------------------------------------------------------------------------
# Neurons
# ---------------------------------------------------------------------------------------------------
def surrogate_derivative(name: str, width: float, u: torch.Tensor) -> torch.Tensor:
    """ψ(u), the pseudo-derivative of the Heaviside step at u = h − V_th."""
    if name == "sigmoid":
        sg = torch.sigmoid(width * u)
        return width * sg * (1.0 - sg)
    if name == "atan":
        return (width / 2.0) / (1.0 + (math.pi / 2.0 * width * u) ** 2)
    if name == "rectangular":
        return (u.abs() < width / 2.0).to(u.dtype) / width
    if name == "triangle":
        return torch.clamp(1.0 - u.abs() / width, min=0.0) / width
    raise ValueError(f"unknown surrogate {name!r}")


def _margin(name: str, width: float, u: torch.Tensor) -> float:
    """How far u is from a value where rounding changes the result: 0 (the spike), ±w/2 (where a
    rectangular surrogate jumps)."""
    dist = u.abs()
    if name == "rectangular":
        dist = torch.minimum(dist, (u.abs() - width / 2.0).abs())
    return dist.min().item() if dist.numel() else math.inf


@dataclass
class NeuronParams:
    """A neuron layer's hyper-parameters, read from the module's public attributes."""

    decay_input: bool
    v_threshold: float
    v_reset: Optional[float]
    detach_reset: bool
    surrogate: str
    width: float
    decay: Optional[float]             # λ; None when learned (ParametricLIF)
    w: Optional[torch.Tensor]          # ParametricLIF's logit, λ = 1 − sigmoid(w)

    @classmethod
    def read(cls, module: nn.Module, kind: str) -> "NeuronParams":
        decay = {"lif": getattr(module, "decay", None), "if": 1.0, "plif": None}[kind]
        return cls(decay_input=module.decay_input, v_threshold=module.v_threshold, v_reset=module.v_reset,
                   detach_reset=module.detach_reset, surrogate=module.surrogate.name,
                   width=module.surrogate.width, decay=decay, w=module.w if kind == "plif" else None)

    def psi(self, u: torch.Tensor) -> torch.Tensor:
        return surrogate_derivative(self.surrogate, self.width, u)


@dataclass
class NeuronTrace:
    """What the spike pass records of one neuron layer: spikes ``[T, ...]``, r, e, e_w (ParametricLIF)."""

    spikes: torch.Tensor
    r: torch.Tensor
    e: torch.Tensor
    e_w: Optional[torch.Tensor]
    margin: float


@torch.no_grad()
def neuron_spike_pass(c: torch.Tensor, p: NeuronParams) -> NeuronTrace:
    """The exact neuron over ``c`` ``[T, ...]`` with the forward-mode tangents of its membrane for a
    unit input held constant in time (κ_t = ∂h_t/∂c) and, for a learned decay, for a unit change of
    λ (μ_t = ∂h_t/∂λ). Through the reset, ∂v_t/∂h_t is 1 (soft, detached), 1 − V_th·ψ_t (soft),
    1 − s_t (hard, detached) or 1 − s_t − (h_t − v_reset)·ψ_t (hard)."""
    if p.w is not None:
        sig = torch.sigmoid(p.w.detach())
        lam, dlam_dw = 1.0 - sig, -sig * (1.0 - sig)
    else:
        lam, dlam_dw = p.decay, None
    v = torch.zeros_like(c[0])
    kappa = mu = dvdh = 0.0
    spikes, sum_e, sum_mu, margin = [], torch.zeros_like(v), torch.zeros_like(v), math.inf
    for c_t in c:
        if p.decay_input:
            kappa = (1.0 - lam) + lam * dvdh * kappa
            mu = (v - c_t) + lam * dvdh * mu
            h = lam * v + (1.0 - lam) * c_t
        else:
            kappa = 1.0 + lam * dvdh * kappa
            mu = v + lam * dvdh * mu
            h = lam * v + c_t
        u = h - p.v_threshold
        s = (u >= 0).to(c.dtype)
        psi = p.psi(u)
        margin = min(margin, _margin(p.surrogate, p.width, u))
        sum_e += psi * kappa
        sum_mu += psi * mu
        if p.v_reset is None:
            dvdh = 1.0 if p.detach_reset else 1.0 - p.v_threshold * psi
            v = h - p.v_threshold * s
        else:
            dvdh = 1.0 - s if p.detach_reset else 1.0 - s - (h - p.v_reset) * psi
            v = torch.where(s > 0, torch.full_like(h, p.v_reset), h)
        spikes.append(s)
    spikes = torch.stack(spikes)
    T = c.shape[0]
    e_w = None if dlam_dw is None else sum_mu / T * dlam_dw
    return NeuronTrace(spikes, spikes.mean(0), sum_e / T, e_w, margin)


class _Heaviside(torch.autograd.Function):
    """Θ(u) forward; ψ(u) as its derivative in reverse and forward mode."""

    @staticmethod
    def forward(u, surrogate, width):
        return (u >= 0).to(u.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, ctx.surrogate, ctx.width = inputs
        ctx.save_for_backward(u)
        ctx.save_for_forward(u)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return grad * surrogate_derivative(ctx.surrogate, ctx.width, u), None, None

    @staticmethod
    def jvp(ctx, tangent, _surrogate, _width):
        (u,) = ctx.saved_tensors
        return tangent * surrogate_derivative(ctx.surrogate, ctx.width, u)


def neuron_bptt(c: torch.Tensor, p: NeuronParams) -> Tuple[torch.Tensor, float]:
    """The neuron over ``c`` ``[T, ...]``, differentiable step by step (BPTT); returns the spikes and the
    smallest threshold margin met."""
    lam = 1.0 - torch.sigmoid(p.w) if p.w is not None else p.decay
    v = torch.zeros_like(c[0])
    spikes, margin = [], math.inf
    for c_t in c:
        h = lam * v + ((1.0 - lam) * c_t if p.decay_input else c_t)
        u = h - p.v_threshold
        margin = min(margin, _margin(p.surrogate, p.width, u.detach()))
        s = _Heaviside.apply(u, p.surrogate, p.width)
        s_reset = s.detach() if p.detach_reset else s
        v = h - p.v_threshold * s_reset if p.v_reset is None else (1.0 - s_reset) * h + s_reset * p.v_reset
        spikes.append(s)
    return torch.stack(spikes), margin


class _RateNeuron(torch.autograd.Function):
    """The rate pass's neuron: value r, Jacobian diag(e) for x, Σ grad·e_w for a learned decay logit w."""

    @staticmethod
    def forward(ctx, x, w, r, e, e_w):
        ctx.save_for_backward(e, e_w)
        ctx.has_w = w is not None
        return r.clone()

    @staticmethod
    def backward(ctx, grad):
        e, e_w = ctx.saved_tensors
        grad_w = (grad * e_w).sum() if ctx.has_w else None
        return grad * e, grad_w, None, None, None


# ---------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------
def _per_sample(x: torch.Tensor, temporal: bool, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply a per-sample op to ``[T, B, ...]`` (time folded into the batch) or ``[B, ...]``."""
    if not temporal:
        return fn(x)
    return fn(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def _stateless(node: Node, module: Optional[nn.Module], args: List[torch.Tensor], temporal: bool) -> torch.Tensor:
    """The ops that act on every step alike (the same in every pass)."""
    a = node.attrs
    if node.op == "conv":
        return _per_sample(args[0], temporal, lambda x: F.conv2d(x, module.weight, module.bias, a["stride"],
                                                                 a["padding"]))
    if node.op == "linear":
        return F.linear(args[0], module.weight, module.bias)
    if node.op == "avgpool":
        return _per_sample(args[0], temporal, lambda x: F.avg_pool2d(x, a["kernel"]))
    if node.op == "global_pool":
        return args[0].mean((-2, -1), keepdim=True)
    if node.op == "flatten":
        return args[0].flatten(2 if temporal else 1)
    if node.op == "add":
        return args[0] + args[1]
    if node.op == "cat":
        return torch.cat(args, dim=2 if temporal else 1)
    raise ValueError(f"unknown op {node.op!r}")


def _moments(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and biased variance of ``[N, C, ...]``, and the number of values per channel."""
    dims = [0] + list(range(2, x.dim()))
    return x.mean(dims), x.var(dims, unbiased=False), x.numel() // x.shape[1]


def _normalise(x, mean, var, module: nn.Module) -> torch.Tensor:
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + module.eps)
    if module.weight is not None:
        y = y * module.weight.view(shape) + module.bias.view(shape)
    return y


@torch.no_grad()
def _update_running(module: nn.Module, mean, var, count: int) -> None:
    """One step of a BatchNorm's running statistics: unbiased variance, momentum (None: the cumulative
    average over the steps so far)."""
    module.num_batches_tracked += 1
    m = module.momentum if module.momentum is not None else 1.0 / module.num_batches_tracked.item()
    module.running_mean.mul_(1.0 - m).add_(m * mean)
    module.running_var.mul_(1.0 - m).add_(m * var * (count / (count - 1)))


# ---------------------------------------------------------------------------------------------------
# The passes
# ---------------------------------------------------------------------------------------------------
def canonical_input(spec: Spec, x: torch.Tensor) -> torch.Tensor:
    """The model's input as ``[T, B, ...]`` (temporal) or ``[B, ...]`` (static)."""
    if spec.static or spec.layout == "TB":
        return x
    return x.unflatten(0, (spec.T, spec.B))


def model_output(spec: Spec, y: torch.Tensor) -> torch.Tensor:
    """The last node's canonical value in the shape the model returns."""
    if not spec.final.temporal or spec.output == "steps_view":
        return y
    if spec.output == "mean":
        return y.mean(0)
    return y if spec.layout == "TB" else y.flatten(0, 1)


@dataclass
class _Record:
    """One walk: every node's value, the neurons' spike-pass traces, the BatchNorm statistics
    (mean, biased variance, values per channel) and the smallest threshold margin."""

    values: Dict[str, torch.Tensor] = field(default_factory=dict)
    neurons: Dict[str, NeuronTrace] = field(default_factory=dict)
    stats: Dict[str, Tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)
    margin: float = math.inf


def _walk(spec: Spec, model: nn.Module, x: torch.Tensor, mode: str, record: Optional[_Record] = None) -> _Record:
    """Run the network in one of three modes: ``"spike"`` (exact, records r, e and BatchNorm statistics),
    ``"bptt"`` (exact, with autograd), ``"rate"`` (time-averaged, with autograd, reading ``record``)."""
    out = _Record()
    for node in spec.nodes:
        module = model.layers[node.name] if node.name in model.layers else None
        args = [out.values[i] for i in node.inputs]
        temporal = node.temporal and mode != "rate"
        if node.op == "input":
            value = x.mean(0) if mode == "rate" and node.temporal else x
        elif node.op == "repeat":
            value = args[0] if mode == "rate" else args[0].unsqueeze(0).expand(spec.T, *args[0].shape)
        elif node.op == "mean_time":
            value = args[0] if mode == "rate" else args[0].mean(0)
        elif node.op == "neuron":
            p = NeuronParams.read(module, node.attrs["kind"])
            if mode == "spike":
                trace = neuron_spike_pass(args[0], p)
                out.neurons[node.name], value = trace, trace.spikes
                out.margin = min(out.margin, trace.margin)
            elif mode == "bptt":
                value, margin = neuron_bptt(args[0], p)
                out.margin = min(out.margin, margin)
            else:
                trace = record.neurons[node.name]
                value = _RateNeuron.apply(args[0], p.w, trace.r, trace.e, trace.e_w)
        elif node.op == "bn":
            flat = args[0].flatten(0, 1) if temporal else args[0]
            mean, var, count = _moments(flat)
            if mode == "rate" and node.temporal:
                spike_mean, spike_var, _ = record.stats[node.name]
                mean = spike_mean + (mean - mean.detach())
                var = spike_var + (var - var.detach())
            else:
                out.stats[node.name] = (mean.detach(), var.detach(), count)
            value = _normalise(flat, mean, var, module)
            value = value.unflatten(0, args[0].shape[:2]) if temporal else value
        else:
            value = _stateless(node, module, args, temporal)
        out.values[node.name] = value
    return out


def spike_pass(spec: Spec, model: nn.Module, x: torch.Tensor) -> _Record:
    """The exact forward without autograd, with every neuron's r, e (, e_w) and BatchNorm statistics."""
    with torch.no_grad():
        return _walk(spec, model, canonical_input(spec, x), "spike")


def _route(spec: Spec, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of the model's output as it enters the rate output: summed over the steps for
    per-step outputs."""
    if spec.final.temporal and spec.output != "mean":
        return grad.reshape(spec.T, spec.B, *spec.final.shape).sum(0)
    return grad


def _finish(model: nn.Module, out, loss, grads, stats, margin) -> StepResult:
    bns = {name: m for name, m in model.layers.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for name, (mean, var, count) in stats.items():
        _update_running(bns[name], mean, var, count)
    names = [n for n, _ in model.named_parameters()]
    return StepResult(out.detach(), loss.detach(), dict(zip(names, grads)),
                      {n: b.detach().clone() for n, b in model.named_buffers()}, margin)


def ratebp_step(spec: Spec, model: nn.Module, x: torch.Tensor,
                loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> StepResult:
    """One rate-based training step of ``model`` (its BatchNorm buffers are updated in place)."""
    record = spike_pass(spec, model, x)
    out = model_output(spec, record.values[spec.final.name])
    out_leaf = out.detach().requires_grad_()
    loss = loss_fn(out_leaf)
    (grad_out,) = torch.autograd.grad(loss, out_leaf)
    rate = _walk(spec, model, canonical_input(spec, x), "rate", record)
    params = list(model.parameters())
    grads = torch.autograd.grad(rate.values[spec.final.name], params, _route(spec, grad_out), allow_unused=True)
    return _finish(model, out, loss, grads, record.stats, record.margin)


def bptt_step(spec: Spec, model: nn.Module, x: torch.Tensor,
              loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> StepResult:
    """One BPTT training step of ``model`` (its BatchNorm buffers are updated in place)."""
    record = _walk(spec, model, canonical_input(spec, x), "bptt")
    out = model_output(spec, record.values[spec.final.name])
    loss = loss_fn(out)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return _finish(model, out, loss, grads, record.stats, record.margin)

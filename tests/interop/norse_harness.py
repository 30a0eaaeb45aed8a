"""Test-side harness for Norse interoperability (independent of ratebp_compile).

Three things live here:

* :func:`models` -- named builders of small Norse models written the way Norse's tutorials and its own
  ``norse.torch.models`` write them.  Every model is MULTI-STEP: it takes ``x`` of shape ``[T, B, ...]``
  and reads ``T`` from ``x.shape[0]`` (so the same model runs at ``T = 1`` in the rate pass).
* :func:`peer_forward` and :func:`peer_bptt_grads` -- Norse's own forward and its own BPTT gradients.
* :func:`peer_rate_grads` -- an independent, eager rate-based reference (Yu et al. 2024):

  1. spike pass: the peer's own forward (no autograd), with forward hooks recording, for every neuron
     call, its input, its incoming state and its output;
  2. per neuron instance: rate ``r = mean_t z_t`` and eligibility ``e = sum_t d(sum_elems mean_t z)/dx_t``,
     computed by re-running that neuron ALONE over its recorded inputs with Norse's own autograd (valid
     because the neuron is elementwise: reverse mode gives, per element, the derivative of its mean
     output with respect to an input perturbation held constant over time).  The re-run is checked to
     reproduce the recorded outputs bit for bit;
  3. rate pass: the model runs ONCE with autograd on the time-averaged input ``x.mean(0, keepdim=True)``
     (``T = 1``), each neuron call's output replaced by ``r + e * (x - x.detach())`` (the state the
     neuron's own forward returns on that input is passed through, so the caller's unpacking works).

  Output contract: the returned output has the spike pass's exact values; the loss gradient with respect
  to all of its steps is summed into the (broadcast) rate output, e.g. ``[T, B, K]`` into ``[1, B, K]``.

What counts as a neuron: instances of ``norse.torch.module.snn.SNNCell`` (``LIFCell``, ``LIFBoxCell``,
``LICell``, ...; called once per step) and ``SNN`` (``LIF``, ``LI``, ...; called once on the whole
``[T, ...]`` sequence), plus ``LILinearCell`` (a bias-free linear map followed by an elementwise leaky
integrator: the linear map is kept in the rate pass and the integrator gets a rate and an eligibility).
Recurrent modules (``SNNRecurrentCell`` / ``SNNRecurrent``: ``LIFRecurrent*``) are refused.
A cell called k times per step (a shared neuron) is supported when the calls are time-major
(all k calls of step t before any call of step t+1), which a loop over ``range(T)`` gives.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "norse_available",
    "ModelEntry",
    "models",
    "primary_output",
    "peer_forward",
    "peer_bptt_grads",
    "peer_rate_grads",
]


def norse_available() -> bool:
    try:
        import norse.torch  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelEntry:
    """One named model.

    ``build(seed)`` returns the module; ``make_input(T, seed)`` returns ``x`` of shape ``[T, B, ...]``;
    ``loss(out)`` maps the model's primary output (see :func:`primary_output`) to a scalar.
    ``output`` says what the primary output is: ``"spikes"`` ([T, B, K] of 0/1), ``"voltages"``
    ([T, B, K] leaky-integrator membrane voltages), and ``returns_tuple`` whether the model returns
    ``(tensor, states)`` rather than a tensor.
    """

    name: str
    build: Callable[[int], torch.nn.Module]
    make_input: Callable[..., torch.Tensor]
    loss: Callable[[torch.Tensor], torch.Tensor]
    output: str
    returns_tuple: bool = False
    T: int = 6
    notes: str = ""


def _t(v: float) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32)


def _rand_input(shape_tail: Tuple[int, ...], scale: float, offset: float = 0.0):
    def make(T: int = 6, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + seed)
        return offset + scale * torch.rand((T, *shape_tail), generator=g)

    return make


def _ce_over_time(B: int, K: int, seed: int = 7):
    y = torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(seed))

    def loss(out: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float().mean(0), y)

    return loss


def _max_over_time_nll(B: int, K: int, seed: int = 7):
    # Norse's MNIST task decodes voltages by their maximum over time, then log_softmax + NLL.
    y = torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(seed))

    def loss(out: torch.Tensor) -> torch.Tensor:
        m, _ = torch.max(out, 0)
        return F.nll_loss(F.log_softmax(m, dim=1), y)

    return loss


def _mse_to_target(T: int, B: int, K: int, seed: int = 7):
    tgt = torch.rand((B, K), generator=torch.Generator().manual_seed(seed))

    def loss(out: torch.Tensor) -> torch.Tensor:
        return ((out.float().mean(0) - tgt) ** 2).sum()

    return loss


def models() -> Dict[str, ModelEntry]:
    """Named Norse models (import Norse lazily; raises ImportError if it is missing)."""
    import norse.torch as nt
    from norse.torch.functional.reset import reset_subtract

    entries: List[ModelEntry] = []

    # 1. LIFBoxCell (no synaptic current) called in a loop with explicit states, default parameters.
    class BoxLoop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(12, 16)
            self.lif1 = nt.LIFBoxCell()
            self.fc2 = torch.nn.Linear(16, 5)
            self.lif2 = nt.LIFBoxCell()

        def forward(self, x):
            s1 = s2 = None
            out = []
            for t in range(x.shape[0]):
                z, s1 = self.lif1(self.fc1(x[t]), s1)
                z, s2 = self.lif2(self.fc2(z) * 30.0, s2)
                out.append(z)
            return torch.stack(out)

    entries.append(ModelEntry(
        "lifbox_cell_loop", _seeded(BoxLoop), _rand_input((4, 12), 30.0), _ce_over_time(4, 5),
        "spikes", T=10, notes="LIFBoxCell x2, states s1/s2 start as None, torch.stack of spikes"))

    # 2. LIFCell (current-based synapse) in a loop, default parameters.
    class LIFLoop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(12, 16)
            self.lif1 = nt.LIFCell()
            self.fc2 = torch.nn.Linear(16, 5)
            self.lif2 = nt.LIFCell()

        def forward(self, x):
            s1, s2 = None, None
            zs = []
            for ts in range(x.shape[0]):
                z1, s1 = self.lif1(self.fc1(x[ts]), s1)
                z2, s2 = self.lif2(20.0 * self.fc2(z1), s2)
                zs.append(z2)
            return torch.stack(zs)

    entries.append(ModelEntry(
        "lif_cell_loop", _seeded(LIFLoop), _rand_input((4, 12), 10.0), _ce_over_time(4, 5),
        "spikes", T=10, notes="LIFCell x2 (v and synaptic current i), default p, dt=1e-3"))

    # 3. Multi-step LIF inside SequentialState, wrapped by a user module that drops the state list.
    #    (Norse 1.1.0 has no multi-step LIFBox; the second LIF uses non-default parameters instead.)
    class SeqLIF(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nt.SequentialState(
                torch.nn.Linear(12, 16),
                nt.LIF(),
                _scaled(torch.nn.Linear(16, 5), 10.0),
                nt.LIF(nt.LIFParameters(v_th=_t(0.5), tau_mem_inv=_t(200.0), method="tanh", alpha=_t(5.0))),
            )

        def forward(self, x):
            out, _ = self.net(x)
            return out

    entries.append(ModelEntry(
        "seqstate_lif", _seeded(SeqLIF), _rand_input((4, 12), 10.0), _ce_over_time(4, 5),
        "spikes", T=10, notes="SequentialState(Linear, LIF(), Linear, LIF(tanh)) on [T,B,F]; nn.Linear on [T,B,F]"))

    # 4. The bare SequentialState: returns (spikes, [None, LIFFeedForwardState, None, LIFFeedForwardState]).
    def build_bare(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return nt.SequentialState(
            torch.nn.Linear(12, 16),
            nt.LIF(),
            _scaled(torch.nn.Linear(16, 5), 20.0),
            nt.LIF(nt.LIFParameters(method="super", alpha=_t(20.0))),
        )

    entries.append(ModelEntry(
        "seqstate_bare", build_bare, _rand_input((4, 12), 10.0), _ce_over_time(4, 5),
        "spikes", returns_tuple=True, T=10,
        notes="model returns (out, state_list); primary output is out"))

    # 5. Conv net with LIFCell in a loop (average pooling: exact in a rate pass).
    class ConvLIF(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.lif0 = nt.LIFCell()
            self.fc = torch.nn.Linear(4 * 4 * 4, 5)
            self.lif1 = nt.LIFCell()

        def forward(self, x):
            T, B = x.shape[0], x.shape[1]
            s0 = s1 = None
            outs = []
            for ts in range(T):
                z = self.conv(x[ts])
                z, s0 = self.lif0(z, s0)
                z = F.avg_pool2d(z, 2)
                z = z.reshape(B, -1)
                z, s1 = self.lif1(self.fc(z) * 20.0, s1)
                outs.append(z)
            return torch.stack(outs)

    entries.append(ModelEntry(
        "conv_lif_cell", _seeded(ConvLIF), _rand_input((2, 1, 8, 8), 10.0), _ce_over_time(2, 5),
        "spikes", T=8, notes="Conv2d -> LIFCell -> avg_pool2d -> reshape -> Linear -> LIFCell"))

    # 6. Non-default parameters: LIFCell with tanh surrogate, LIFBoxCell with the triangle surrogate.
    class ParamsTanhTriangle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(10, 12)
            self.lif1 = nt.LIFCell(nt.LIFParameters(
                tau_syn_inv=_t(300.0), tau_mem_inv=_t(200.0), v_leak=_t(0.0), v_th=_t(0.5),
                v_reset=_t(-0.2), method="tanh", alpha=_t(5.0)))
            self.fc2 = torch.nn.Linear(12, 4)
            self.lif2 = nt.LIFBoxCell(nt.LIFBoxParameters(
                tau_mem_inv=_t(250.0), v_leak=_t(0.0), v_th=_t(0.8), v_reset=_t(0.1),
                method="triangle", alpha=_t(0.5)))

        def forward(self, x):
            s1 = s2 = None
            out = []
            for t in range(x.shape[0]):
                z, s1 = self.lif1(self.fc1(x[t]), s1)
                z, s2 = self.lif2(15.0 * self.fc2(z), s2)
                out.append(z)
            return torch.stack(out)

    entries.append(ModelEntry(
        "params_tanh_triangle", _seeded(ParamsTanhTriangle), _rand_input((3, 10), 6.0), _ce_over_time(3, 4),
        "spikes", T=8, notes="v_th 0.5/0.8, v_reset -0.2/0.1, tau_mem_inv 200/250, tanh(alpha=5), triangle(alpha=0.5)"))

    # 7. super (alpha given, ignored by Norse 1.1.0's SuperSpike backward), circ, and a soft (subtract)
    #    reset on LIFBoxCell; one neuron module multi-step (LIF) and one cell.
    class ParamsSuperCircSoft(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(10, 12)
            self.lif1 = nt.LIF(nt.LIFParameters(v_th=_t(0.7), method="super", alpha=_t(20.0)))
            self.fc2 = torch.nn.Linear(12, 4)
            self.lif2 = nt.LIFBoxCell(nt.LIFBoxParameters(
                v_th=_t(0.6), method="circ", alpha=_t(0.3), reset_method=reset_subtract))

        def forward(self, x):
            z1, _ = self.lif1(self.fc1(x))           # [T, B, 12] in one call
            s = None
            out = []
            for t in range(x.shape[0]):
                z, s = self.lif2(self.fc2(z1[t]) * 20.0, s)
                out.append(z)
            return torch.stack(out)

    entries.append(ModelEntry(
        "params_super_circ_soft", _seeded(ParamsSuperCircSoft), _rand_input((3, 10), 10.0),
        _ce_over_time(3, 4), "spikes", T=8,
        notes="LIF(super, v_th .7) multi-step + LIFBoxCell(circ, alpha .3, reset_subtract) cell loop"))

    # 8. Leaky-integrator readout (LICell): output is membrane voltage, not spikes.
    class LIReadout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(12, 16)
            self.lif1 = nt.LIFCell()
            self.fc2 = torch.nn.Linear(16, 5)
            self.out = nt.LICell()

        def forward(self, x):
            s1 = so = None
            vs = []
            for t in range(x.shape[0]):
                z, s1 = self.lif1(self.fc1(x[t]), s1)
                v, so = self.out(10.0 * self.fc2(z), so)
                vs.append(v)
            return torch.stack(vs)

    entries.append(ModelEntry(
        "li_readout", _seeded(LIReadout), _rand_input((4, 12), 10.0), _mse_to_target(8, 4, 5),
        "voltages", T=10, notes="LIFCell hidden layer, LICell readout ([T,B,K] voltages)"))

    # 9. Multi-step LI readout inside SequentialState.
    class SeqLI(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nt.SequentialState(
                torch.nn.Linear(12, 16), nt.LIF(), _scaled(torch.nn.Linear(16, 5), 10.0), nt.LI())

        def forward(self, x):
            v, _ = self.net(x)
            return v

    entries.append(ModelEntry(
        "seqstate_li", _seeded(SeqLI), _rand_input((4, 12), 10.0), _ce_over_time(4, 5),
        "voltages", T=10, notes="SequentialState(Linear, LIF(), Linear, LI()) -> [T,B,K] voltages"))

    # 10. Norse's own tutorial/MNIST ConvNet (norse.torch.models.conv.ConvNet): LIFCell x3 in a loop,
    #     max_pool2d, `10 * conv2`, relu before an LILinearCell readout, voltages[ts] = v written into a
    #     preallocated tensor; decoded by max over time + log_softmax (norse/task/mnist.py).
    def build_convnet(seed: int) -> torch.nn.Module:
        from norse.torch.models.conv import ConvNet

        torch.manual_seed(seed)
        net = ConvNet(num_channels=1, feature_size=16)
        _scaled(net.fc1, 8.0)  # a larger init, so that lif2 fires at this size
        return net

    entries.append(ModelEntry(
        "tutorial_convnet", build_convnet, _rand_input((2, 1, 16, 16), 20.0), _max_over_time_nll(2, 10),
        "voltages", T=4,
        notes="max_pool2d on spikes is NOT exact in a rate pass; setitem into a preallocated [T,B,10]"))

    # 11. A shared neuron: the same LIFBoxCell called twice per step with two separate states.
    class SharedCell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fa = torch.nn.Linear(8, 6)
            self.fb = torch.nn.Linear(8, 6)
            self.lif = nt.LIFBoxCell()
            self.head = torch.nn.Linear(12, 3)
            self.lif_out = nt.LIFBoxCell()

        def forward(self, x):
            sa = sb = so = None
            out = []
            for t in range(x.shape[0]):
                za, sa = self.lif(self.fa(x[t]) * 3.0, sa)
                zb, sb = self.lif(self.fb(x[t]) * 3.0, sb)
                z, so = self.lif_out(self.head(torch.cat([za, zb], -1)) * 15.0, so)
                out.append(z)
            return torch.stack(out)

    entries.append(ModelEntry(
        "shared_cell", _seeded(SharedCell), _rand_input((3, 8), 20.0), _ce_over_time(3, 3),
        "spikes", T=8, notes="one LIFBoxCell instance called twice per step (k = 2)"))

    # 12. Explicit initial states built by the user instead of None.
    class ExplicitState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(8, 10)
            self.lif1 = nt.LIFCell()
            self.fc2 = torch.nn.Linear(10, 4)
            torch.nn.init.constant_(self.fc2.bias, 0.15)
            self.lif2 = nt.LIFBoxCell()

        def forward(self, x):
            B = x.shape[1]
            s1 = nt.LIFFeedForwardState(v=torch.full((B, 10), 0.3), i=torch.zeros(B, 10))
            s2 = nt.LIFBoxFeedForwardState(v=torch.zeros(B, 4))
            out = []
            for t in range(x.shape[0]):
                z, s1 = self.lif1(self.fc1(x[t]), s1)
                z, s2 = self.lif2(30.0 * self.fc2(z), s2)
                out.append(z)
            return torch.stack(out)

    entries.append(ModelEntry(
        "explicit_state", _seeded(ExplicitState), _rand_input((3, 8), 10.0), _ce_over_time(3, 4),
        "spikes", T=8, notes="LIFFeedForwardState / LIFBoxFeedForwardState constructed in forward"))

    return {e.name: e for e in entries}


def _scaled(layer: torch.nn.Module, gain: float) -> torch.nn.Module:
    with torch.no_grad():
        for prm in layer.parameters():
            prm.mul_(gain)
    return layer


def _seeded(cls):
    def build(seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return cls()

    return build


# ----------------------------------------------------------------------------------------------------
# Peer forward and BPTT
# ----------------------------------------------------------------------------------------------------


def primary_output(out: Any) -> torch.Tensor:
    """The model's main tensor: ``out`` itself, or the first element of a returned tuple/list."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def peer_forward(model: torch.nn.Module, x: torch.Tensor) -> Any:
    """Norse's own forward, without autograd; returns whatever the model returns."""
    with torch.no_grad():
        return model(x)


def _param_grads(loss: torch.Tensor, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g.detach()) for (n, p), g in zip(named, grads)}


def peer_bptt_grads(model: torch.nn.Module, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]):
    """Norse's own BPTT: returns ``(grads, out)``, ``grads`` name -> gradient (zeros where unused),
    plus ``"__input__"`` when ``x.requires_grad``; ``out`` is the detached primary output."""
    xin = x.detach().clone().requires_grad_(x.requires_grad)
    with torch.enable_grad():
        out = primary_output(model(xin))
        loss = loss_fn(out)
        grads = _param_grads(loss, model) if not xin.requires_grad else {}
        if xin.requires_grad:
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            gs = torch.autograd.grad(loss, [p for _, p in named] + [xin], allow_unused=True)
            grads = {n: (torch.zeros_like(p) if g is None else g.detach()) for (n, p), g in zip(named, gs[:-1])}
            grads["__input__"] = torch.zeros_like(xin) if gs[-1] is None else gs[-1].detach()
    return grads, out.detach()


# ----------------------------------------------------------------------------------------------------
# Rate-based reference
# ----------------------------------------------------------------------------------------------------


def _norse_kinds():
    from norse.torch.module.leaky_integrator import LILinearCell
    from norse.torch.module.snn import SNN, SNNCell, SNNRecurrent, SNNRecurrentCell

    return SNNCell, SNN, LILinearCell, (SNNRecurrent, SNNRecurrentCell)


def _kind(m: torch.nn.Module) -> Optional[str]:
    SNNCell, SNN, LILinearCell, refused = _norse_kinds()
    if isinstance(m, refused):
        raise NotImplementedError(f"recurrent Norse module {type(m).__name__} is not supported")
    if isinstance(m, SNN):
        return "multi"
    if isinstance(m, SNNCell):
        return "cell"
    if isinstance(m, LILinearCell):
        return "li_linear"
    return None


def _split_call(args: tuple, kwargs: dict):
    x = args[0] if args else kwargs["input_tensor"]
    s = args[1] if len(args) > 1 else kwargs.get("state")
    return x, s


def _detach_tree(s: Any) -> Any:
    if s is None:
        return None
    if isinstance(s, torch.Tensor):
        return s.detach().clone()
    if isinstance(s, tuple) and hasattr(s, "_fields"):
        return type(s)(*[_detach_tree(v) for v in s])
    if isinstance(s, (tuple, list)):
        return type(s)(_detach_tree(v) for v in s)
    return s


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


@dataclasses.dataclass
class _Call:
    x: torch.Tensor
    state: Any
    out: torch.Tensor


def _li_linear_step(m, u, s):
    """The elementwise part of an LILinearCell: Norse's own li_feed_forward_step on u = W x."""
    from norse.torch.functional.leaky_integrator import LIState, li_feed_forward_step

    if s is None:
        s = LIState(v=m.p.v_leak.detach(), i=torch.zeros_like(u))
    return li_feed_forward_step(u, s, p=m.p, dt=m.dt)


def _cell_rate_elig(m, kind: str, calls: List[_Call], name: str):
    """Re-run one cell instance alone over its recorded inputs: (r, e)."""
    s = calls[0].state
    leaves, zs = [], []
    with torch.enable_grad():
        for t, c in enumerate(calls):
            if kind == "li_linear":
                u = F.linear(c.x, m.input_weights).detach().requires_grad_(True)
                z, s = _li_linear_step(m, u, s)
            else:
                u = c.x.detach().clone().requires_grad_(True)
                z, s = m(u, s)
            if not _same(z.detach(), c.out):
                raise RuntimeError(f"{name}: re-running the neuron alone does not reproduce step {t}")
            leaves.append(u)
            zs.append(z)
        zstack = torch.stack(zs)
        total = zstack.mean(0).sum()
        if total.requires_grad:
            gs = torch.autograd.grad(total, leaves, allow_unused=True)
        else:  # heaviside: no gradient at all
            gs = [None] * len(leaves)
    e = sum((torch.zeros_like(u) if g is None else g) for u, g in zip(leaves, gs))
    return zstack.detach().mean(0), e.detach()


def _multi_rate_elig(m, call: _Call, name: str):
    with torch.enable_grad():
        X = call.x.detach().clone().requires_grad_(True)
        out = primary_output(m(X, call.state))
        if not _same(out.detach(), call.out):
            raise RuntimeError(f"{name}: re-running the neuron alone does not reproduce its output")
        total = out.mean(0).sum()
        g = torch.autograd.grad(total, X, allow_unused=True)[0] if total.requires_grad else None
    e = torch.zeros_like(X[0]) if g is None else g.sum(0)
    return out.detach().mean(0), e.detach()


def peer_rate_grads(model: torch.nn.Module, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]):
    """Eager rate-based reference: returns ``(grads, out)`` like :func:`peer_bptt_grads`.

    ``out`` has the spike pass's exact values; ``"__input__"`` (when ``x.requires_grad``) is the rate
    pass's gradient with respect to the time-averaged input, spread as 1/T of it over every step.
    """
    T = x.shape[0]
    neurons = [(n, m, _kind(m)) for n, m in model.named_modules()]
    neurons = [(n or "<root>", m, k) for n, m, k in neurons if k is not None]
    if not neurons:
        raise ValueError("no Norse neuron module found in the model")

    # 1. spike pass, recording every neuron call
    records: Dict[int, List[_Call]] = {id(m): [] for _, m, _ in neurons}

    def make_rec(mod):
        def hook(module, args, kwargs, output):
            xin, s = _split_call(args, kwargs)
            records[id(mod)].append(_Call(xin.detach().clone(), _detach_tree(s),
                                          primary_output(output).detach().clone()))
        return hook

    handles = [m.register_forward_hook(make_rec(m), with_kwargs=True) for _, m, _ in neurons]
    try:
        with torch.no_grad():
            spike_full = model(x.detach())
    finally:
        for h in handles:
            h.remove()
    spike_out = primary_output(spike_full).detach()

    # 2. rates and eligibilities, per neuron instance
    table: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, m, kind in neurons:
        calls = records[id(m)]
        if not calls:
            continue
        if kind == "multi":
            table[id(m)] = [_multi_rate_elig(m, c, f"{name}[{j}]") for j, c in enumerate(calls)]
        else:
            if len(calls) % T:
                raise RuntimeError(f"{name}: {len(calls)} calls is not a multiple of T={T}")
            k = len(calls) // T
            table[id(m)] = [_cell_rate_elig(m, kind, calls[q::k], f"{name}[{q}]") for q in range(k)]

    # 3. rate pass on the time-averaged input, neurons replaced by r + e * (x - x.detach())
    counters: Dict[int, int] = {id(m): 0 for _, m, _ in neurons}
    kinds = {id(m): (name, kind) for name, m, kind in neurons}

    def rate_hook(module, args, kwargs, output):
        name, kind = kinds[id(module)]
        j = counters[id(module)]
        counters[id(module)] += 1
        inst = table.get(id(module), [])
        if j >= len(inst):
            raise RuntimeError(f"{name}: called more often in the rate pass than in the spike pass")
        r, e = inst[j]
        xin, _ = _split_call(args, kwargs)
        if kind == "li_linear":
            xin = F.linear(xin, module.input_weights)
        if kind == "multi":
            r, e = r.unsqueeze(0), e.unsqueeze(0)
        y = r + e * (xin - xin.detach())
        if isinstance(output, tuple):
            return (y, *output[1:])
        return y

    xd = x.detach()
    xbar = (xd if xd.dtype.is_floating_point else xd.float()).mean(0, keepdim=True)
    xbar.requires_grad_(x.requires_grad)
    handles = [m.register_forward_hook(rate_hook, with_kwargs=True) for _, m, _ in neurons]
    try:
        with torch.enable_grad():
            rate_out = primary_output(model(xbar))
    finally:
        for h in handles:
            h.remove()
    for name, m, _ in neurons:
        if counters[id(m)] != len(table.get(id(m), [])):
            raise RuntimeError(f"{name}: called {counters[id(m)]} times in the rate pass, "
                               f"expected {len(table.get(id(m), []))}")

    try:
        torch.broadcast_shapes(rate_out.shape, spike_out.shape)
    except RuntimeError as err:
        raise RuntimeError(f"rate output {tuple(rate_out.shape)} does not broadcast to the spike "
                           f"output {tuple(spike_out.shape)}") from err
    with torch.enable_grad():
        out = spike_out + (rate_out - rate_out.detach())   # exact values; gradient summed over steps
        loss = loss_fn(out)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        targets = [p for _, p in named] + ([xbar] if xbar.requires_grad else [])
        gs = torch.autograd.grad(loss, targets, allow_unused=True)
    grads = {n: (torch.zeros_like(p) if g is None else g.detach()) for (n, p), g in zip(named, gs)}
    if xbar.requires_grad:
        gx = torch.zeros_like(xbar) if gs[-1] is None else gs[-1].detach()
        grads["__input__"] = (gx / T).expand_as(x).clone()
    return grads, out.detach()

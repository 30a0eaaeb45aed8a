"""snnTorch peer models and independent references, for the interoperability tests.

Pure test-side helpers: nothing here imports ``ratebp_compile``.

* ``models()``: snnTorch models written the way its tutorials write them, as multi-step modules (the
  time loop inside ``forward`` over ``x`` of shape ``[T, B, ...]``, ``T = x.shape[0]``, returning the
  stacked output spikes ``[T, B, K]``; ``leaky_mlp_t5`` also returns the stacked membrane).
  ``per_step_models()``: ``nn.Sequential`` networks of ``init_hidden=True`` neurons that a user drives
  from an outer loop (``run_per_step``, the tutorials' ``forward_pass``); ``PerStepDriver`` wraps one
  into a multi-step module so that the functions below apply to it too.
* ``peer_forward(model, x)``: snnTorch's own forward.
* ``peer_bptt_grads(model, x, loss_fn)``: snnTorch's own BPTT gradients.
* ``peer_rate_grads(model, x, loss_fn)``: an eager rate-based reference (Yu et al. 2024) built on the
  peer's own code. Spike pass: the peer's forward, recording every neuron's input at every call. Per
  neuron (per call site) r = mean_t s_t and e = sum_t d(sum_elements mean_t s_t)/dx_t, from autograd
  through the neuron itself replayed alone on its recorded inputs from a zero state (the neurons are
  elementwise, so this reverse-mode sum is, per element, the derivative of r for an input perturbation
  held constant in time); for each learnable neuron parameter p (beta, threshold, alpha, graded spikes
  factor) e_p = d(mean_t s)/dp per element (p expanded to the element shape, so a scalar p gets one
  contribution per element). Rate pass: the model once on the time-averaged input (T = 1), each neuron
  call replaced by r + e*(x - x.detach()) plus, per parameter, a term whose backward gives p the
  gradient sum(grad * e_p) reduced to p's shape. Outputs: the spike pass's exact values; the gradient
  of the loss w.r.t. all T steps of a time-varying output is summed into the length-1 rate output.
  A membrane a neuron returns gets, by default, the same treatment as its spikes (mean_t mem_t with
  its own eligibility; ``mem_grad="none"``: no gradient). Requirements: every neuron is an elementwise
  ``snn.Leaky``/``snn.Synaptic`` (no ``inhibition``, no recurrent ``RLeaky``/``RSynaptic``), every
  forward starts from a zero state, T is ``x.shape[0]``, and a neuron is called the same number of
  times at every step.

Every function leaves the neurons' state (``mem``, ``syn``, ``spk``, ``reset``) as it found it and
writes no ``.grad``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

try:  # snnTorch is an optional peer: the tests skip without it
    import snntorch as snn
    import snntorch.functional as SF
    from snntorch import spikegen, surrogate
    from snntorch import utils as snn_utils
    HAVE_SNNTORCH = True
except Exception:  # pragma: no cover - exercised only without snnTorch
    snn = SF = spikegen = surrogate = snn_utils = None
    HAVE_SNNTORCH = False

__all__ = [
    "HAVE_SNNTORCH", "PeerModel", "models", "per_step_models", "model_by_name", "run_per_step",
    "PerStepDriver", "peer_forward", "peer_bptt_grads", "peer_rate_grads", "neuron_modules",
    "T_DEFAULT", "B_DEFAULT",
]

T_DEFAULT = 6
B_DEFAULT = 4
N_IN, N_HIDDEN, N_OUT = 12, 16, 4

_STATE_NAMES = ("mem", "syn", "spk")
_PARAM_NAMES = ("alpha", "beta", "threshold", "graded_spikes_factor")


# --------------------------------------------------------------------------------------------------
# Models, as snnTorch's tutorials write them (time loop inside forward)
# --------------------------------------------------------------------------------------------------

def _excitatory_readout(fc: nn.Linear, low: float = -0.3, high: float = 0.6) -> None:
    """A user's init for a Linear, so that the neurons it drives fire at moderate rates."""
    with torch.no_grad():
        fc.weight.uniform_(low, high)


class LeakyMLP(nn.Module):
    """Tutorial 5: two Linear + Leaky layers, explicit membrane state threaded through the loop."""

    def __init__(self, beta=0.9, return_mem=False, lif1=None, lif2=None, **lif_kwargs):
        super().__init__()
        self.return_mem = return_mem
        self.fc1 = nn.Linear(N_IN, N_HIDDEN)
        self.lif1 = snn.Leaky(**{"beta": beta, **lif_kwargs, **(lif1 or {})})
        self.fc2 = nn.Linear(N_HIDDEN, N_OUT)
        self.lif2 = snn.Leaky(**{"beta": beta, **lif_kwargs, **(lif2 or {})})
        _excitatory_readout(self.fc2)

    def forward(self, x):
        mem1 = self.lif1.init_leaky()
        mem2 = self.lif2.init_leaky()
        spk2_rec = []
        mem2_rec = []
        for step in range(x.shape[0]):
            cur1 = self.fc1(x[step])
            spk1, mem1 = self.lif1(cur1, mem1)
            cur2 = self.fc2(spk1)
            spk2, mem2 = self.lif2(cur2, mem2)
            spk2_rec.append(spk2)
            mem2_rec.append(mem2)
        if self.return_mem:
            return torch.stack(spk2_rec, dim=0), torch.stack(mem2_rec, dim=0)
        return torch.stack(spk2_rec, dim=0)


class LeakyHiddenMLP(nn.Module):
    """``init_hidden=True`` neurons called inside the loop: the state lives in ``lif.mem``."""

    def __init__(self, beta=0.9):
        super().__init__()
        self.fc1 = nn.Linear(N_IN, N_HIDDEN)
        self.lif1 = snn.Leaky(beta=beta, init_hidden=True)
        self.fc2 = nn.Linear(N_HIDDEN, N_OUT)
        self.lif2 = snn.Leaky(beta=beta, init_hidden=True)
        _excitatory_readout(self.fc1, -0.2, 0.4)
        _excitatory_readout(self.fc2)

    def forward(self, x):
        self.lif1.reset_mem()
        self.lif2.reset_mem()
        spk_rec = []
        for step in range(x.shape[0]):
            spk1 = self.lif1(self.fc1(x[step]))
            spk2 = self.lif2(self.fc2(spk1))
            spk_rec.append(spk2)
        return torch.stack(spk_rec)


class SynapticMLP(nn.Module):
    """Tutorial 2/3 style second-order neurons: ``syn, mem = lif.init_synaptic()``."""

    def __init__(self, alpha=0.8, beta=0.9, **lif_kwargs):
        super().__init__()
        self.fc1 = nn.Linear(N_IN, N_HIDDEN)
        self.lif1 = snn.Synaptic(alpha=alpha, beta=beta, **lif_kwargs)
        self.fc2 = nn.Linear(N_HIDDEN, N_OUT)
        self.lif2 = snn.Synaptic(alpha=alpha, beta=beta, **lif_kwargs)
        _excitatory_readout(self.fc2)

    def forward(self, x):
        syn1, mem1 = self.lif1.init_synaptic()
        syn2, mem2 = self.lif2.init_synaptic()
        spk2_rec = []
        for step in range(x.shape[0]):
            cur1 = self.fc1(x[step])
            spk1, syn1, mem1 = self.lif1(cur1, syn1, mem1)
            cur2 = self.fc2(spk1)
            spk2, syn2, mem2 = self.lif2(cur2, syn2, mem2)
            spk2_rec.append(spk2)
        return torch.stack(spk2_rec, dim=0)


class ConvNet(nn.Module):
    """Tutorial 6 style: Conv2d + max pooling + Leaky, then Linear + Leaky. Input [T, B, 1, 8, 8]."""

    def __init__(self, beta=0.8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.lif1 = snn.Leaky(beta=beta)
        self.fc1 = nn.Linear(4 * 4 * 4, N_OUT)
        self.lif2 = snn.Leaky(beta=beta)

    def forward(self, x):
        mem1 = self.lif1.init_leaky()
        mem2 = self.lif2.init_leaky()
        spk2_rec = []
        for step in range(x.size(0)):
            cur1 = F.max_pool2d(self.conv1(x[step]), 2)
            spk1, mem1 = self.lif1(cur1, mem1)
            cur2 = self.fc1(spk1.view(spk1.size(0), -1))
            spk2, mem2 = self.lif2(cur2, mem2)
            spk2_rec.append(spk2)
        return torch.stack(spk2_rec, dim=0)


def run_per_step(net: nn.Module, data: torch.Tensor):
    """The tutorials' ``forward_pass``: reset, then one call of ``net`` per step (``init_hidden``)."""
    mem_rec = []
    spk_rec = []
    snn_utils.reset(net)  # resets hidden states for all LIF neurons in net
    for step in range(data.size(0)):
        spk_out, mem_out = net(data[step])
        spk_rec.append(spk_out)
        mem_rec.append(mem_out)
    return torch.stack(spk_rec), torch.stack(mem_rec)


class PerStepDriver(nn.Module):
    """A per-step network driven by ``run_per_step``, as one multi-step module (spikes, membrane)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return run_per_step(self.net, x)


# --------------------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PeerModel:
    name: str
    build: Callable[[], nn.Module]                    # a fresh model, deterministic weights
    make_input: Callable[..., torch.Tensor]           # make_input(T=T_DEFAULT, B=B_DEFAULT, seed=0)
    make_loss: Callable[..., Callable[[Any], torch.Tensor]]   # make_loss(B=B_DEFAULT, seed=0) -> loss_fn(out)
    per_step: bool = False                            # build() gives a per-step net (wrap: PerStepDriver)
    outputs: str = "spikes"                           # "spikes" ([T,B,K]) or "spikes+mem" (a tuple)
    notes: str = ""

    def driver(self) -> nn.Module:
        """A module taking [T, B, ...] for the harness functions (the per-step net wrapped)."""
        m = self.build()
        return PerStepDriver(m) if self.per_step else m


def _seeded(seed: int, fn: Callable[[], Any]) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _builder(cls, seed=0, **kwargs) -> Callable[[], nn.Module]:
    return lambda: _seeded(seed, lambda: cls(**kwargs))


def _dense_input(T=T_DEFAULT, B=B_DEFAULT, seed=0):
    return _seeded(1000 + seed, lambda: torch.rand(T, B, N_IN) * 2.5)


def _rate_coded_input(T=T_DEFAULT, B=B_DEFAULT, seed=0):
    """spikegen.rate as in the tutorials: Bernoulli spikes [T, B, F] from intensities in [0, 1]."""
    def make():
        data = 0.5 + 0.5 * torch.rand(B, N_IN)
        return spikegen.rate(data, num_steps=T)
    return _seeded(2000 + seed, make)


def _image_input(T=T_DEFAULT, B=B_DEFAULT, seed=0):
    return _seeded(3000 + seed, lambda: torch.rand(T, B, 1, 8, 8) * 2.0)


def _targets(B, seed):
    return _seeded(4000 + seed, lambda: torch.randint(0, N_OUT, (B,)))


def _spikes_of(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _ce_rate_loss(B=B_DEFAULT, seed=0):
    y = _targets(B, seed)
    fn = SF.ce_rate_loss()
    return lambda out: fn(_spikes_of(out), y).sum()


def _t5_membrane_loss(B=B_DEFAULT, seed=0):
    """Tutorial 5: ``loss_val += nn.CrossEntropyLoss()(mem_rec[step], targets)`` for every step."""
    y = _targets(B, seed)
    ce = nn.CrossEntropyLoss()

    def loss_fn(out):
        mem_rec = out[1]
        return sum(ce(mem_rec[step], y) for step in range(mem_rec.shape[0]))
    return loss_fn


def _ce_count_loss(B=B_DEFAULT, seed=0):
    y = _targets(B, seed)
    fn = SF.ce_count_loss()
    return lambda out: fn(_spikes_of(out), y)


def _mse_count_loss(B=B_DEFAULT, seed=0):
    y = _targets(B, seed)
    fn = SF.mse_count_loss(correct_rate=0.8, incorrect_rate=0.2)
    return lambda out: fn(_spikes_of(out), y)


def _per_channel_beta():
    return torch.linspace(0.5, 0.95, N_HIDDEN)


def models() -> List[PeerModel]:
    """Multi-step snnTorch models (time loop inside forward), small enough for a CPU step in < 2 s."""
    if not HAVE_SNNTORCH:
        return []
    S = surrogate
    out = [
        PeerModel("leaky_mlp_t5", _builder(LeakyMLP, return_mem=True), _dense_input, _t5_membrane_loss,
                  outputs="spikes+mem",
                  notes="tutorial 5: init_leaky(), explicit mem, returns (spk_rec, mem_rec); its loss is "
                        "cross-entropy on the output MEMBRANE at every step, summed"),
        PeerModel("leaky_mlp_t5_spike_loss", _builder(LeakyMLP, return_mem=True), _dense_input, _ce_rate_loss,
                  outputs="spikes+mem", notes="tutorial 5's model, ce_rate_loss on its spikes"),
    ]
    for reset in ("subtract", "zero", "none"):
        for delay in (True, False):
            out.append(PeerModel(
                f"leaky_{reset}_delay{int(delay)}",
                _builder(LeakyMLP, seed=1, reset_mechanism=reset, reset_delay=delay),
                _dense_input, _ce_rate_loss, notes=f"reset_mechanism={reset!r}, reset_delay={delay}"))
    out += [
        PeerModel("leaky_learn_beta", _builder(LeakyMLP, seed=2, learn_beta=True), _dense_input,
                  _ce_count_loss, notes="scalar beta Parameter per layer"),
        PeerModel("leaky_learn_threshold", _builder(LeakyMLP, seed=3, learn_threshold=True), _dense_input,
                  _ce_rate_loss, notes="scalar threshold Parameter per layer"),
        PeerModel("leaky_per_channel_beta", _builder(LeakyMLP, seed=4, lif1={"beta": _per_channel_beta()}),
                  _dense_input, _ce_rate_loss, notes="beta buffer of shape [hidden] in layer 1"),
        PeerModel("leaky_per_channel_learn",
                  _builder(LeakyMLP, seed=5, learn_beta=True, learn_threshold=True,
                           lif1={"beta": _per_channel_beta(), "threshold": torch.full((N_HIDDEN,), 1.0)}),
                  _dense_input, _mse_count_loss,
                  notes="layer 1: beta and threshold Parameters of shape [hidden]; layer 2: shape [] Parameters"),
        PeerModel("leaky_graded_spikes", _builder(LeakyMLP, seed=6, graded_spikes_factor=0.5), _dense_input,
                  _ce_rate_loss, notes="graded_spikes_factor=0.5 (buffer)"),
        PeerModel("leaky_init_hidden_loop", _builder(LeakyHiddenMLP, seed=7), _rate_coded_input,
                  _ce_rate_loss, notes="init_hidden=True inside the loop; reset_mem() first; spikegen.rate input"),
        PeerModel("synaptic_mlp", _builder(SynapticMLP, seed=8), _dense_input, _ce_rate_loss,
                  notes="Synaptic(alpha=0.8, beta=0.9), init_synaptic()"),
        PeerModel("synaptic_zero", _builder(SynapticMLP, seed=9, reset_mechanism="zero"), _dense_input,
                  _ce_rate_loss, notes="Synaptic reset to zero (zeroes beta*mem + syn, not only mem)"),
        PeerModel("conv_net", _builder(ConvNet, seed=10), _image_input, _ce_rate_loss,
                  notes="Conv2d + F.max_pool2d + Leaky, flatten with view"),
    ]
    for name, make in (("sigmoid", lambda: S.sigmoid()), ("fast_sigmoid", lambda: S.fast_sigmoid()),
                       ("triangular", lambda: S.triangular()),
                       ("straight_through_estimator", lambda: S.straight_through_estimator())):
        out.append(PeerModel(f"surrogate_{name}", _builder(_SurrogateMLP, seed=11, spike_grad=make),
                             _dense_input, _ce_rate_loss, notes=f"spike_grad=surrogate.{name}()"))
    out.append(PeerModel("surrogate_atan_alpha5",
                         _builder(_SurrogateMLP, seed=11, spike_grad=lambda: S.atan(alpha=5.0)),
                         _dense_input, _ce_rate_loss, notes="spike_grad=surrogate.atan(alpha=5.0)"))
    return out


class _SurrogateMLP(LeakyMLP):
    """beta=0.5 and mostly excitatory weights keep every membrane above threshold - 3.4: snnTorch's
    sigmoid surrogate gives NaN gradients below that in float32 (its backward overflows exp)."""

    def __init__(self, spike_grad):
        super().__init__(beta=0.5, spike_grad=spike_grad())
        with torch.no_grad():
            self.fc1.weight.uniform_(-0.1, 0.25)
            self.fc1.bias.uniform_(-0.1, 0.1)
            self.fc2.weight.uniform_(-0.2, 0.5)
            self.fc2.bias.uniform_(-0.1, 0.1)


def _per_step_mlp():
    net = nn.Sequential(
        nn.Linear(N_IN, N_HIDDEN),
        snn.Leaky(beta=0.9, init_hidden=True),
        nn.Linear(N_HIDDEN, N_OUT),
        snn.Leaky(beta=0.9, init_hidden=True, output=True),
    )
    _excitatory_readout(net[2])
    return net


def _per_step_conv():
    """Tutorial 7's shape (atan, beta=0.5), scaled down, with Leaky before MaxPool2d (pooling of spikes)."""
    spike_grad = surrogate.atan()
    beta = 0.5
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        snn.Leaky(beta=beta, spike_grad=spike_grad, init_hidden=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, N_OUT),
        snn.Leaky(beta=beta, spike_grad=spike_grad, init_hidden=True, output=True),
    )
    with torch.no_grad():
        net[0].weight.uniform_(-0.2, 0.4)
    _excitatory_readout(net[4], -0.3, 0.35)
    return net


def per_step_models() -> List[PeerModel]:
    """Per-step ``nn.Sequential`` nets (tutorial 7): one call per step, state in the neurons' ``mem``.
    ``build()`` gives the bare net (called as ``spk, mem = net(x_t)``); ``driver()`` the wrapped one."""
    if not HAVE_SNNTORCH:
        return []
    return [
        PeerModel("per_step_mlp", lambda: _seeded(20, _per_step_mlp), _dense_input, _ce_rate_loss,
                  per_step=True, outputs="spikes+mem", notes="Sequential, init_hidden=True, output=True last"),
        PeerModel("per_step_conv", lambda: _seeded(21, _per_step_conv), _image_input, _mse_count_loss,
                  per_step=True, outputs="spikes+mem",
                  notes="tutorial 7 shape (atan, beta=0.5, mse_count_loss(0.8, 0.2)); pooling after the "
                        "neuron (max of spikes), as in some versions of the tutorial; conv_net pools before it"),
    ]


def model_by_name(name: str) -> PeerModel:
    for m in models() + per_step_models():
        if m.name == name:
            return m
    raise KeyError(name)


# --------------------------------------------------------------------------------------------------
# State bookkeeping
# --------------------------------------------------------------------------------------------------

def neuron_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if HAVE_SNNTORCH and isinstance(m, snn.SpikingNeuron)]


@contextlib.contextmanager
def _preserved_state(model: nn.Module):
    """Restore every neuron's state buffers and ``reset`` attribute on exit."""
    saved = []
    for _, m in neuron_modules(model):
        bufs = {k: m._buffers[k] for k in _STATE_NAMES if k in m._buffers}
        saved.append((m, bufs, "reset" in m.__dict__, m.__dict__.get("reset")))
    try:
        yield
    finally:
        for m, bufs, had_reset, reset in saved:
            for k, v in bufs.items():
                m._buffers[k] = v
            if had_reset:
                m.__dict__["reset"] = reset
            else:
                m.__dict__.pop("reset", None)


def _trainable(model: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _grads(loss: torch.Tensor, named: Sequence[Tuple[str, torch.Tensor]],
           x_leaf: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    tensors = [p for _, p in named] + ([x_leaf] if x_leaf is not None else [])
    if tensors and loss.requires_grad:
        gs = torch.autograd.grad(loss, tensors, allow_unused=True)
    else:                                   # nothing to differentiate, or a loss that depends on none
        gs = [None] * len(tensors)
    out = {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(named, gs)}
    if x_leaf is not None:
        out["__input__"] = torch.zeros_like(x_leaf) if gs[-1] is None else gs[-1]
    return out


def _detach(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, (tuple, list)):
        return type(out)(_detach(o) for o in out)
    return out


def _model(model: nn.Module, per_step: bool) -> nn.Module:
    return PerStepDriver(model) if per_step else model


# --------------------------------------------------------------------------------------------------
# The peer's own forward and BPTT
# --------------------------------------------------------------------------------------------------

def peer_forward(model: nn.Module, x: torch.Tensor, per_step: bool = False):
    """snnTorch's forward (no autograd); neuron state restored afterwards."""
    model = _model(model, per_step)
    with _preserved_state(model), torch.no_grad():
        return model(x)


def peer_bptt_grads(model: nn.Module, x: torch.Tensor, loss_fn: Callable[[Any], torch.Tensor],
                    per_step: bool = False) -> Tuple[Dict[str, torch.Tensor], Any]:
    """snnTorch's own BPTT: ({parameter name: grad}, detached output). With ``x.requires_grad`` the
    gradient w.r.t. ``x`` is under ``"__input__"``."""
    named = _trainable(model)               # the bare net's names, also for a per-step net
    model = _model(model, per_step)
    with _preserved_state(model), torch.enable_grad():
        out = model(x)
        loss = loss_fn(out)
        grads = _grads(loss, named, x if x.requires_grad else None)
    return grads, _detach(out)


# --------------------------------------------------------------------------------------------------
# The rate-based reference
# --------------------------------------------------------------------------------------------------

class _ParamTerm(torch.autograd.Function):
    """Value 0 (element shape); backward gives ``p`` the gradient ``sum(grad * e_p)`` reduced to p's shape."""

    @staticmethod
    def forward(ctx, p, e_p):
        ctx.save_for_backward(e_p)
        ctx.p_shape = p.shape
        return torch.zeros_like(e_p)

    @staticmethod
    def backward(ctx, grad):
        (e_p,) = ctx.saved_tensors
        return (grad * e_p).sum_to_size(ctx.p_shape), None


class _Bridge(torch.autograd.Function):
    """Value: the spike pass's output; gradient: into the rate output, summed over broadcast (time) axes."""

    @staticmethod
    def forward(ctx, rate, spike):
        ctx.rate_shape = rate.shape
        return spike.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.sum_to_size(ctx.rate_shape), None


@dataclasses.dataclass
class _Site:
    """Per-element rate quantities of one neuron call site."""
    r: torch.Tensor                       # mean_t s_t
    e: torch.Tensor                       # d r / d(constant input)
    e_params: Dict[str, torch.Tensor]     # name -> d r / d p (per element)
    m: torch.Tensor                       # mean_t mem_t
    e_m: torch.Tensor                     # d m / d(constant input)
    e_m_params: Dict[str, torch.Tensor]
    syn: Optional[torch.Tensor]           # mean_t syn_t (Synaptic)


def _check_supported(name: str, m: nn.Module) -> None:
    if isinstance(m, (snn.RLeaky, snn.RSynaptic)) or not isinstance(m, (snn.Leaky, snn.Synaptic)):
        raise NotImplementedError(f"{name}: {type(m).__name__} is not an elementwise Leaky/Synaptic neuron")
    if m.inhibition:
        raise NotImplementedError(f"{name}: inhibition=True couples the neurons of a layer")


def _learnable_params(m: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: m._parameters[k] for k in _PARAM_NAMES
            if m._parameters.get(k) is not None and m._parameters[k].requires_grad}


def _replay(m: nn.Module, xs: List[torch.Tensor], spikes_seen: List[torch.Tensor], where: str) -> _Site:
    """Run neuron ``m`` alone over ``xs`` from a zero state, with autograd, and differentiate."""
    T = len(xs)
    shape = xs[0].shape
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    originals = _learnable_params(m)
    expanded: Dict[str, nn.Parameter] = {}
    for k, p in originals.items():
        if torch.broadcast_shapes(p.shape, shape) != shape:
            raise NotImplementedError(f"{where}: parameter {k} of shape {tuple(p.shape)} does not broadcast "
                                      f"to the neuron's element shape {tuple(shape)}")
        expanded[k] = nn.Parameter(p.detach().expand(shape).clone())
    saved = {k: m._buffers[k] for k in _STATE_NAMES if k in m._buffers}
    had_reset, reset = "reset" in m.__dict__, m.__dict__.get("reset")
    try:
        for k, p in expanded.items():
            m._parameters[k] = p
        for k in saved:
            m._buffers[k] = torch.zeros(0)
        spikes, mems, syns = [], [], []
        with torch.enable_grad():
            for x in leaves:
                out = m(x)
                spikes.append(out[0] if isinstance(out, tuple) else out)
                mems.append(m._buffers["mem"])
                if "syn" in m._buffers:
                    syns.append(m._buffers["syn"])
            S = torch.stack(spikes)
            if not torch.equal(S.detach(), torch.stack(spikes_seen)):
                raise AssertionError(f"{where}: the neuron replayed from a zero state does not reproduce the "
                                     f"spike pass (the model must start every forward from a zero state)")
            targets = leaves + list(expanded.values())
            r = S.mean(0)
            g = torch.autograd.grad(r.sum(), targets, allow_unused=True, retain_graph=True)
            mbar = torch.stack(mems).mean(0)
            gm = torch.autograd.grad(mbar.sum(), targets, allow_unused=True)
    finally:
        for k, p in originals.items():
            m._parameters[k] = p
        for k, v in saved.items():
            m._buffers[k] = v
        if had_reset:
            m.__dict__["reset"] = reset
        else:
            m.__dict__.pop("reset", None)

    def total(gs):
        acc = torch.zeros(shape, dtype=r.dtype)
        for gi in gs:
            if gi is not None:
                acc = acc + gi
        return acc

    def per_param(gs):
        return {k: (torch.zeros(shape) if gi is None else gi) for k, gi in zip(expanded, gs[T:])}

    return _Site(r=r.detach(), e=total(g[:T]), e_params=per_param(g), m=mbar.detach(), e_m=total(gm[:T]),
                 e_m_params=per_param(gm),
                 syn=torch.stack(syns).mean(0).detach() if syns else None)


def peer_rate_grads(model: nn.Module, x: torch.Tensor, loss_fn: Callable[[Any], torch.Tensor],
                    per_step: bool = False, mem_grad: str = "eligibility",
                    return_sites: bool = False):
    """The rate-based step on the peer's own code: ({parameter name: grad}, output with the spike pass's
    exact values).

    ``mem_grad``: what a membrane output (the ``mem`` a neuron returns) carries in the rate pass:
    ``"eligibility"`` (default) — mean_t mem_t with Jacobian diag(d mean_t mem_t / d constant input) and
    its parameter terms, the membrane's analogue of the spike rule (tutorial 5 trains on the output
    membrane, so without it that model gets no gradient); ``"none"`` — the spike pass's value and no
    gradient (the convention for state read-outs). A ``syn`` output never carries a gradient. Either
    way the output's value is the spike pass's.
    With ``x.requires_grad``, ``"__input__"`` holds the gradient w.r.t. the time-averaged input, 1/T of
    it at every step. ``return_sites=True`` adds a third value: {neuron name: [_Site per call site]}.
    """
    if mem_grad not in ("none", "eligibility"):
        raise ValueError(f"mem_grad must be 'none' or 'eligibility', not {mem_grad!r}")
    named = _trainable(model)               # the bare net's names, also for a per-step net
    model = _model(model, per_step)
    T = x.shape[0]
    neurons = neuron_modules(model)
    for name, m in neurons:
        _check_supported(name, m)

    with _preserved_state(model):
        # 1. spike pass: the peer's forward, recording each neuron's input and spikes at every call
        records = {m: {"inputs": [], "spikes": [], "arity": None} for _, m in neurons}

        def pre_hook(mod, args, kwargs):
            records[mod]["inputs"].append((args[0] if args else kwargs["input_"]).detach())

        def post_hook(mod, args, kwargs, output):
            rec = records[mod]
            rec["spikes"].append((output[0] if isinstance(output, tuple) else output).detach())
            rec["arity"] = len(output) if isinstance(output, tuple) else 1

        handles = []
        try:
            for _, m in neurons:
                handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
                handles.append(m.register_forward_hook(post_hook, with_kwargs=True))
            with torch.no_grad():
                out_spike = model(x.detach())
        finally:
            for h in handles:
                h.remove()

        # 2. per neuron and call site: r, e (and parameter eligibilities) from the peer's autograd
        sites: Dict[nn.Module, List[_Site]] = {}
        names = {m: n for n, m in neurons}
        for name, m in neurons:
            rec = records[m]
            n = len(rec["inputs"])
            if n == 0:
                continue
            if n % T:
                raise NotImplementedError(f"{name}: called {n} times over T={T} steps")
            k = n // T
            sites[m] = [_replay(m, rec["inputs"][j::k], rec["spikes"][j::k], f"{name}[site {j}]")
                        for j in range(k)]

        # 3. rate pass: the model once on the time-averaged input, each neuron call replaced
        counters = {m: 0 for m in sites}

        def rate_forward_for(m):
            arity = records[m]["arity"]
            params = _learnable_params(m)

            def forward(input_, *args, **kwargs):
                ss = sites[m]
                site = ss[counters[m] % len(ss)]
                counters[m] += 1
                out = site.r + site.e * (input_ - input_.detach())
                for k, p in params.items():
                    out = out + _ParamTerm.apply(p, site.e_params[k])
                mem = site.m
                if mem_grad == "eligibility":
                    mem = mem + site.e_m * (input_ - input_.detach())
                    for k, p in params.items():
                        mem = mem + _ParamTerm.apply(p, site.e_m_params[k])
                if arity == 1:
                    return out
                if arity == 2:
                    return out, mem
                return out, site.syn, mem
            return forward

        x_rate = x.detach().mean(0, keepdim=True)
        if x.requires_grad:
            x_rate.requires_grad_(True)
        try:
            for m in sites:
                m.forward = rate_forward_for(m)
            with torch.enable_grad():
                out_rate = model(x_rate)
        finally:
            for m in sites:
                m.__dict__.pop("forward", None)

        # 4. outputs: the spike pass's values, gradients into the rate graph (summed over time)
        out = _bridge(out_rate, out_spike)
        with torch.enable_grad():
            loss = loss_fn(out)
            grads = _grads(loss, named, x_rate if x.requires_grad else None)
    if "__input__" in grads:
        grads["__input__"] = (grads["__input__"] / T).expand_as(x).clone()
    if return_sites:
        strip = "net." if per_step else ""
        return grads, _detach(out), {names[m][len(strip):]: s for m, s in sites.items()}
    return grads, _detach(out)


def _bridge(rate, spike):
    if isinstance(spike, torch.Tensor):
        if not isinstance(rate, torch.Tensor) or not rate.requires_grad:
            return spike
        if torch.broadcast_shapes(rate.shape, spike.shape) != spike.shape:
            raise NotImplementedError(f"rate output {tuple(rate.shape)} vs spike output {tuple(spike.shape)}")
        return _Bridge.apply(rate, spike)
    if isinstance(spike, (tuple, list)):
        return type(spike)(_bridge(r, s) for r, s in zip(rate, spike))
    return spike

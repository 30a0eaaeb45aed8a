"""SpikingJelly 2.0 peer models and independent references, for the interoperability tests.

Pure test-side helpers: nothing here imports ``ratebp_compile``.

* ``models()``: small, UNMODIFIED SpikingJelly 2.0 models written the way its tutorials write them
  (``layer.*`` wrappers and ``neuron.*Node`` in multi-step mode, ``SeqToANNContainer`` /
  ``MultiStepContainer``, a single-step model driven by a loop over ``T`` inside ``forward``, the
  tutorial CSNN that repeats a static image ``T`` times, and the model zoo's ``spiking_resnet18``,
  ``sew_resnet18`` and ``spiking_vgg11_bn`` on 3x32x32 images). Each ``PeerModel`` has
  ``build(seed)``, ``make_input(T, B, seed, dtype)`` (``[T, B, ...]`` when ``time_major``) and a loss.
* ``peer_forward(model, x)``: SpikingJelly's own output (``functional.reset_net`` before and after).
* ``peer_bptt_grads(model, x, loss_fn)``: SpikingJelly's own BPTT gradients ``{name: grad}`` and the
  output (``"__input__"`` too when ``x.requires_grad``).
* ``peer_rate_grads(model, x, loss_fn)``: an eager rate-based reference (Yu et al. 2024) built on the
  peer's own code, for models without BatchNorm whose input is time-major:

  1. spike pass: the peer's forward (no autograd), forward hooks recording every neuron call's input
     and output (a multi-step neuron is called once on ``[T, B, ...]``; a single-step neuron ``T``
     times on ``[B, ...]``);
  2. per neuron: ``r = mean_t s_t`` and ``e = sum_t d(sum_elements mean_t s)/dx_t``, by re-running the
     neuron ALONE (``reset()`` first, its own step mode) on its recorded inputs with SpikingJelly's own
     autograd -- elementwise neuron, so this reverse-mode sum is, per element, the derivative of ``r``
     for an input perturbation held constant in time. The re-run must reproduce the recorded spikes
     bit for bit. For a learnable scalar neuron parameter (``ParametricLIFNode.w``) the parameter is
     expanded to one copy per element (``torch.func.functional_call``), giving ``e_w`` per element;
  3. rate pass: the model once, with autograd, on ``x.mean(0, keepdim=True)`` (``T = 1``), each
     neuron's ``forward`` temporarily replaced by ``r + e*(x - x.detach()) + e_w*(w - w.detach())``
     (value ``r``). Dropout masks are SpikingJelly memories shared over time: the rate pass reuses the
     spike pass's masks (no reset in between; the same seed re-draws them if the model resets itself).

  Output contract: the returned output is the spike pass's, bit for bit; ``g = dloss/dout`` is taken
  at that output and, for a time-major output ``[T, B, K]``, summed over time into the rate output
  ``[1, B, K]`` (an output without a time axis, e.g. a firing rate ``[B, K]``, gets ``g`` as it is).

Every function resets the neurons' memories on exit (``functional.reset_net``), restores every buffer
(BatchNorm running statistics) to what it held on entry, and writes no ``.grad``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import sys
import types
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

try:  # SpikingJelly is an optional peer: the tests skip without it
    from spikingjelly.activation_based import base as sj_base
    from spikingjelly.activation_based import functional, layer, neuron, surrogate
    HAVE_SPIKINGJELLY = hasattr(neuron, "BaseNode") and hasattr(layer, "SeqToANNContainer")
except Exception:  # pragma: no cover - exercised only without SpikingJelly
    sj_base = functional = layer = neuron = surrogate = None
    HAVE_SPIKINGJELLY = False

__all__ = [
    "HAVE_SPIKINGJELLY", "PeerModel", "models", "model_by_name", "torchvision_stub", "neuron_modules",
    "describe_neuron", "peer_forward", "peer_bptt_grads", "peer_rate_grads", "peer_rate_eligibility",
    "T_DEFAULT", "B_DEFAULT",
]

T_DEFAULT = 4
B_DEFAULT = 2


# --------------------------------------------------------------------------------------------------
# torchvision: the zoo imports only ``load_state_dict_from_url`` from it
# --------------------------------------------------------------------------------------------------

_TORCHVISION_STUB_NAMES = ("torchvision", "torchvision._internally_replaced_utils", "torchvision.models",
                           "torchvision.models.utils")


@contextlib.contextmanager
def torchvision_stub() -> Iterator[None]:
    """While inside: if torchvision is not importable, ``sys.modules`` holds tiny stand-ins for
    ``torchvision`` (and ``._internally_replaced_utils``, ``.models``, ``.models.utils``) whose only
    content is ``load_state_dict_from_url = torch.hub.load_state_dict_from_url``. They are removed on
    exit, so nothing else in the session sees a fake torchvision (modules imported meanwhile keep the
    function they bound). With torchvision installed this does nothing."""
    try:
        importlib.import_module("torchvision")
        yield
        return
    except ImportError:
        pass
    added = []
    for name in _TORCHVISION_STUB_NAMES:
        if name not in sys.modules:
            stub = types.ModuleType(name, "test stub: torchvision is not installed")
            stub.load_state_dict_from_url = torch.hub.load_state_dict_from_url
            sys.modules[name] = stub
            added.append(name)
    for parent, child in (("torchvision", "models"), ("torchvision.models", "utils"),
                          ("torchvision", "_internally_replaced_utils")):
        if parent in added:
            setattr(sys.modules[parent], child, sys.modules[f"{parent}.{child}"])
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _zoo(module: str):
    """``spikingjelly.activation_based.model.<module>``, imported under the torchvision stub."""
    with torchvision_stub():
        return importlib.import_module(f"spikingjelly.activation_based.model.{module}")


# --------------------------------------------------------------------------------------------------
# Model entries
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PeerModel:
    """One named SpikingJelly model.

    ``build(seed)`` returns a fresh model (weights drawn under ``seed``, the global RNG untouched);
    ``make_input(T, B, seed, dtype)`` its input: ``[T, B, *in_shape]`` when ``time_major``, else
    ``[B, *in_shape]`` (the tutorial CSNN repeats a static image over its own ``T``); ``make_loss(B,
    seed)`` a loss on the model's output. ``output``: ``"spikes"`` ([T, B, K] of 0/1), ``"logits"``
    ([T, B, K] real: the zoo's last ``layer.Linear``) or ``"rate"`` ([B, K] firing rate, averaged
    over time inside ``forward``). ``step_mode``: the neurons' (``"m"``: one call on the sequence;
    ``"s"``: one call per step). ``rate_reference``: whether :func:`peer_rate_grads` applies."""

    name: str
    build: Callable[[int], nn.Module]
    make_input: Callable[..., torch.Tensor]
    make_loss: Callable[..., Callable[[torch.Tensor], torch.Tensor]]
    output: str
    num_classes: int
    step_mode: str = "m"
    time_major: bool = True
    batchnorm: bool = False
    dropout: bool = False
    zoo: bool = False
    T: int = T_DEFAULT
    notes: str = ""

    @property
    def loss(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The loss for ``B_DEFAULT`` samples."""
        return self.make_loss(B_DEFAULT)

    @property
    def rate_reference(self) -> bool:
        return self.time_major and not self.batchnorm


def _seeded(ctor: Callable[[], nn.Module], gain: Optional[float] = 2.5) -> Callable[[int], nn.Module]:
    """``build(seed)``: ``ctor()`` under ``seed``; then, unless ``gain`` is None, every linear and
    convolution weight redrawn excitatory-leaning (U(-1, 3) * gain / fan_in: a mean drive of ``gain``
    times the mean input), so that every layer fires at a moderate rate at these tiny sizes."""
    def build(seed: int = 0) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = ctor()
            if gain is not None:
                _excite(net, gain)
            return net
    return build


def _excite(net: nn.Module, gain: float) -> None:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.uniform_(-1.0, 3.0).mul_(gain / fan_in)
                if m.bias is not None:
                    m.bias.zero_()


def _input(tail: Tuple[int, ...], scale: float, offset: float = 0.0, time_major: bool = True):
    def make(T: int = T_DEFAULT, B: int = B_DEFAULT, seed: int = 0, dtype: torch.dtype = torch.float32):
        g = torch.Generator().manual_seed(1000 + seed)
        shape = (T, B, *tail) if time_major else (B, *tail)
        return (offset + scale * torch.rand(shape, generator=g, dtype=torch.float64)).to(dtype)
    return make


def _rate_of(out: torch.Tensor) -> torch.Tensor:
    """[T, B, K] -> the mean over time [B, K]; [B, K] (already a rate) as it is."""
    return out.mean(0) if out.dim() == 3 else out


def _labels(B: int, K: int, seed: int) -> torch.Tensor:
    return torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(7 + seed))


def _mse_rate_loss(K: int):
    """SpikingJelly's tutorial loss: MSE between the output firing rate and the one-hot label."""
    def make(B: int = B_DEFAULT, seed: int = 0):
        target = F.one_hot(_labels(B, K, seed), K).double()

        def loss(out: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(_rate_of(out), target.to(out.dtype))
        return loss
    return make


def _ce_rate_loss(K: int):
    """Cross-entropy of the time-averaged output (the zoo models' logits)."""
    def make(B: int = B_DEFAULT, seed: int = 0):
        y = _labels(B, K, seed)

        def loss(out: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(_rate_of(out), y)
        return loss
    return make


# ---- the models, as a user writes them ----------------------------------------------------------

N_IN, N_HIDDEN, N_OUT = 16, 24, 4


def _mlp(make_neuron: Callable[[], nn.Module]) -> nn.Module:
    """Multi-step MLP: layer.Linear (on [T, B, F]) and neurons built with step_mode='m'."""
    return nn.Sequential(
        layer.Linear(N_IN, N_HIDDEN, step_mode="m"),
        make_neuron(),
        layer.Linear(N_HIDDEN, N_OUT, step_mode="m"),
        make_neuron(),
    )


def _mlp_flatten() -> nn.Module:
    """The lif_fc_mnist tutorial's network on a 1x4x4 image, switched to multi-step mode."""
    net = nn.Sequential(
        layer.Flatten(),
        layer.Linear(16, N_HIDDEN, bias=False),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan()),
        layer.Linear(N_HIDDEN, N_OUT, bias=False),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan()),
    )
    functional.set_step_mode(net, step_mode="m")
    return net


def _conv_bn_if() -> nn.Module:
    """conv_fashion_mnist-style: Conv2d / BatchNorm2d / IFNode(ATan) / MaxPool2d / Flatten / Dropout."""
    c = 4
    net = nn.Sequential(
        layer.Conv2d(1, c, kernel_size=3, padding=1, bias=False),
        layer.BatchNorm2d(c),
        neuron.IFNode(surrogate_function=surrogate.ATan()),
        layer.MaxPool2d(2, 2),
        layer.Conv2d(c, c, kernel_size=3, padding=1, bias=False),
        layer.BatchNorm2d(c),
        neuron.IFNode(surrogate_function=surrogate.ATan()),
        layer.MaxPool2d(2, 2),
        layer.Flatten(),
        layer.Dropout(0.5),
        layer.Linear(c * 2 * 2, N_OUT, bias=False),
        neuron.IFNode(surrogate_function=surrogate.ATan()),
    )
    functional.set_step_mode(net, step_mode="m")
    return net


class CSNN(nn.Module):
    """The conv_fashion_mnist tutorial's CSNN (shrunk): a static image repeated over ``T`` inside
    ``forward``, the firing rate ``[B, K]`` out."""

    def __init__(self, T: int = T_DEFAULT, channels: int = 4):
        super().__init__()
        self.T = T
        self.conv_fc = nn.Sequential(
            layer.Conv2d(1, channels, kernel_size=3, padding=1, bias=False),
            layer.BatchNorm2d(channels),
            neuron.IFNode(surrogate_function=surrogate.ATan()),
            layer.MaxPool2d(2, 2),
            layer.Flatten(),
            layer.Linear(channels * 4 * 4, 16, bias=False),
            neuron.IFNode(surrogate_function=surrogate.ATan()),
            layer.Linear(16, N_OUT, bias=False),
            neuron.IFNode(surrogate_function=surrogate.ATan()),
        )
        functional.set_step_mode(self, step_mode="m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_seq = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)     # [N, C, H, W] -> [T, N, C, H, W]
        x_seq = self.conv_fc(x_seq)
        return x_seq.mean(0)


def _conv_if_dropout() -> nn.Module:
    """Conv net without BatchNorm (rate reference applies): biases, AvgPool2d and MaxPool2d, Dropout."""
    c = 4
    net = nn.Sequential(
        layer.Conv2d(1, c, kernel_size=3, padding=1),
        neuron.IFNode(surrogate_function=surrogate.ATan()),
        layer.AvgPool2d(2, 2),
        layer.Conv2d(c, c, kernel_size=3, padding=1),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan()),
        layer.AdaptiveAvgPool2d((2, 2)),
        layer.Flatten(),
        layer.Dropout(0.25),
        layer.Linear(c * 2 * 2, N_OUT),
        neuron.IFNode(surrogate_function=surrogate.ATan()),
    )
    functional.set_step_mode(net, step_mode="m")
    return net


def _conv_maxpool() -> nn.Module:
    """Conv / IF / MaxPool2d / Flatten / Linear / IF in multi-step mode, no BatchNorm, no Dropout."""
    c = 4
    net = nn.Sequential(
        layer.Conv2d(1, c, kernel_size=3, padding=1),
        neuron.IFNode(),
        layer.MaxPool2d(2, 2),
        layer.Flatten(),
        layer.Linear(c * 4 * 4, N_OUT),
        neuron.IFNode(),
    )
    functional.set_step_mode(net, step_mode="m")
    return net


def _seq_to_ann() -> nn.Module:
    """The older container style: plain torch layers in SeqToANNContainer (time folded into batch),
    multi-step neurons between them, and a single-step neuron driven by MultiStepContainer."""
    c = 4
    return nn.Sequential(
        layer.SeqToANNContainer(nn.Conv2d(1, c, kernel_size=3, padding=1), nn.AvgPool2d(2)),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(), step_mode="m"),
        layer.SeqToANNContainer(nn.Flatten(), nn.Linear(c * 4 * 4, N_HIDDEN)),
        layer.MultiStepContainer(neuron.IFNode(surrogate_function=surrogate.ATan())),
        layer.SeqToANNContainer(nn.Linear(N_HIDDEN, N_OUT)),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(), step_mode="m"),
    )


def _plif() -> nn.Module:
    """Parametric LIF (learned 1/tau = sigmoid(w)): decay_input both ways."""
    return nn.Sequential(
        layer.Linear(N_IN, N_HIDDEN, step_mode="m"),
        neuron.ParametricLIFNode(init_tau=2.0, surrogate_function=surrogate.ATan(), step_mode="m"),
        layer.Linear(N_HIDDEN, N_OUT, step_mode="m"),
        neuron.ParametricLIFNode(init_tau=3.0, decay_input=False, surrogate_function=surrogate.ATan(),
                                 step_mode="m"),
    )


class SingleStepLoop(nn.Module):
    """A single-step network (step_mode='s', the default) driven by a loop over T inside forward, as
    the lif_fc_mnist tutorial's training loop does: the firing rate [B, K] out. With
    ``reset_in_forward`` the forward starts with ``functional.reset_net(self)``."""

    def __init__(self, reset_in_forward: bool = False, node=None):
        super().__init__()
        self.reset_in_forward = reset_in_forward
        node = node or (lambda: neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan()))
        self.net = nn.Sequential(layer.Linear(N_IN, N_HIDDEN), node(), layer.Linear(N_HIDDEN, N_OUT), node())

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if self.reset_in_forward:
            functional.reset_net(self)
        T = x_seq.shape[0]
        out_fr = 0.0
        for t in range(T):
            out_fr = out_fr + self.net(x_seq[t])
        return out_fr / T


def _zoo_resnet18() -> nn.Module:
    net = _zoo("spiking_resnet").spiking_resnet18(
        spiking_neuron=neuron.LIFNode, tau=2.0, surrogate_function=surrogate.ATan(), detach_reset=True,
        num_classes=10)
    functional.set_step_mode(net, "m")
    return net


def _zoo_sew_resnet18() -> nn.Module:
    net = _zoo("sew_resnet").sew_resnet18(
        cnf="ADD", spiking_neuron=neuron.IFNode, surrogate_function=surrogate.ATan(), detach_reset=True,
        num_classes=10)
    functional.set_step_mode(net, "m")
    return net


def _zoo_vgg11_bn() -> nn.Module:
    net = _zoo("spiking_vgg").spiking_vgg11_bn(
        spiking_neuron=neuron.IFNode, surrogate_function=surrogate.ATan(), detach_reset=True,
        num_classes=10)
    functional.set_step_mode(net, "m")
    return net


def _surrogates() -> Dict[str, Callable[[], nn.Module]]:
    """The surrogates exercised on the MLP (name -> factory)."""
    return {
        "atan": lambda: surrogate.ATan(),                          # = atan(alpha=2)
        "sigmoid_a2": lambda: surrogate.Sigmoid(alpha=2.0),        # = sigmoid(alpha=2)
        "pwquad": lambda: surrogate.PiecewiseQuadratic(alpha=1.0),  # = triangle(w=1/alpha)
        "rect": lambda: surrogate.Rect(alpha=1.0),                 # = rectangular(w=1/alpha)
        "erf": lambda: surrogate.Erf(),
        "softsign": lambda: surrogate.SoftSign(),
        "pwexp": lambda: surrogate.PiecewiseExp(),
        "superspike": lambda: surrogate.SuperSpike(),
        "pwleakyrelu": lambda: surrogate.PiecewiseLeakyReLU(w=1.0, c=0.01),
    }


def models() -> List[PeerModel]:
    """Every peer model (see the module docstring)."""
    if not HAVE_SPIKINGJELLY:
        raise ImportError("SpikingJelly 2.x (spikingjelly.activation_based) is not installed")
    vec = _input((N_IN,), scale=1.2)
    img = _input((1, 8, 8), scale=1.5)
    img4 = _input((1, 4, 4), scale=1.5)
    rgb16 = _input((3, 16, 16), scale=1.0, offset=-0.5)
    rgb32 = _input((3, 32, 32), scale=1.0, offset=-0.5)
    mse, ce = _mse_rate_loss(N_OUT), _ce_rate_loss(10)
    out: List[PeerModel] = [
        PeerModel("mlp_lif", _seeded(lambda: _mlp(lambda: neuron.LIFNode(step_mode="m"))), vec, mse,
                  "spikes", N_OUT, notes="LIFNode defaults: tau=2, decay_input, hard reset to 0, Sigmoid(4)"),
        PeerModel("mlp_flatten_atan", _seeded(_mlp_flatten), img4, mse, "spikes", N_OUT,
                  notes="layer.Flatten + bias-free layer.Linear, set_step_mode(net, 'm')"),
        PeerModel("conv_bn_if_dropout", _seeded(_conv_bn_if), img, mse, "spikes", N_OUT, batchnorm=True,
                  dropout=True),
        PeerModel("csnn_tutorial", _seeded(CSNN, gain=1.5), _input((1, 8, 8), scale=1.5, time_major=False), mse,
                  "rate", N_OUT, time_major=False, batchnorm=True,
                  notes="static [B, 1, 8, 8] image, x.unsqueeze(0).repeat(T, ...) inside forward"),
        PeerModel("conv_if_dropout", _seeded(_conv_if_dropout), img, mse, "spikes", N_OUT, dropout=True),
        PeerModel("conv_maxpool", _seeded(_conv_maxpool, gain=1.0), img, mse, "spikes", N_OUT,
                  notes="MaxPool2d on spikes; in the rate pass it pools rates (ties: first max)"),
        PeerModel("seq_to_ann", _seeded(_seq_to_ann, gain=2.0), img, mse, "spikes", N_OUT,
                  notes="SeqToANNContainer + MultiStepContainer(IFNode in step_mode 's')"),
        PeerModel("plif", _seeded(_plif), vec, mse, "spikes", N_OUT, notes="learned w, tau = 1/sigmoid(w)"),
        PeerModel("lif_vreset_neg", _seeded(lambda: _mlp(lambda: neuron.LIFNode(
            v_reset=-0.1, surrogate_function=surrogate.ATan(), step_mode="m"))), vec, mse, "spikes", N_OUT,
            notes="v starts at and leaks toward v_reset = -0.1"),
        PeerModel("lif_no_decay_input", _seeded(lambda: _mlp(lambda: neuron.LIFNode(
            tau=3.0, decay_input=False, surrogate_function=surrogate.ATan(), step_mode="m")), gain=1.5),
            _input((N_IN,), scale=0.75), mse, "spikes", N_OUT),
        PeerModel("lif_detach_reset", _seeded(lambda: _mlp(lambda: neuron.LIFNode(
            detach_reset=True, surrogate_function=surrogate.ATan(), step_mode="m"))), vec, mse, "spikes",
            N_OUT),
        PeerModel("lif_soft_reset", _seeded(lambda: _mlp(lambda: neuron.LIFNode(
            v_reset=None, v_threshold=0.5, surrogate_function=surrogate.ATan(), step_mode="m")), gain=1.5),
            vec, mse, "spikes", N_OUT, notes="v_reset=None: subtract v_threshold"),
        PeerModel("if_soft_reset_detach", _seeded(lambda: _mlp(lambda: neuron.IFNode(
            v_reset=None, detach_reset=True, step_mode="m")), gain=1.5), _input((N_IN,), scale=0.75), mse,
            "spikes", N_OUT),
        PeerModel("single_step_loop", _seeded(SingleStepLoop), vec, mse, "rate", N_OUT, step_mode="s",
                  notes="step_mode 's' neurons, Python loop over T in forward, firing rate out"),
        PeerModel("single_step_loop_reset", _seeded(lambda: SingleStepLoop(reset_in_forward=True)), vec,
                  mse, "rate", N_OUT, step_mode="s", notes="forward begins with functional.reset_net(self)"),
        PeerModel("single_step_vreset_erf", _seeded(lambda: SingleStepLoop(node=lambda: neuron.LIFNode(
            tau=2.0, v_reset=-0.2, surrogate_function=surrogate.Erf()))), vec, mse, "rate", N_OUT, step_mode="s",
                  notes="single-step neurons resting at v_reset -0.2 with a surrogate the kernels lack"),
    ]
    for sg_name, sg in _surrogates().items():
        out.append(PeerModel(
            f"mlp_sg_{sg_name}",
            _seeded(lambda sg=sg: _mlp(lambda: neuron.LIFNode(surrogate_function=sg(), step_mode="m"))),
            vec, mse, "spikes", N_OUT, notes=f"LIFNode(surrogate_function={sg_name})"))
    out += [
        PeerModel("zoo_spiking_resnet18", _seeded(_zoo_resnet18, gain=None), rgb16, ce, "logits", 10,
                  batchnorm=True, zoo=True, T=2,
                  notes="LIFNode(tau=2, ATan, detach_reset); `out += identity`; torch.flatten(x, 2)"),
        PeerModel("zoo_sew_resnet18", _seeded(_zoo_sew_resnet18, gain=None), rgb16, ce, "logits", 10,
                  batchnorm=True, zoo=True, T=2, notes="cnf='ADD', IFNode(ATan, detach_reset)"),
        PeerModel("zoo_spiking_vgg11_bn", _seeded(_zoo_vgg11_bn, gain=None), rgb32, ce, "logits", 10,
                  batchnorm=True, dropout=True, zoo=True, T=2,
                  notes="IFNode(ATan, detach_reset); ~129M parameters (the 512*7*7 -> 4096 classifier is "
                  "fixed; 3x32x32 is the smallest input its five 2x2 max-pools take); layer.Dropout"),
    ]
    return out


def model_by_name(name: str) -> PeerModel:
    for entry in models():
        if entry.name == name:
            return entry
    raise KeyError(name)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

def _neuron_types() -> tuple:
    return (neuron.BaseNode, neuron.SimpleBaseNode)


def neuron_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The spiking neurons of ``model`` (``BaseNode`` / ``SimpleBaseNode`` instances), by name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _neuron_types())]


def describe_neuron(m: nn.Module) -> Dict[str, Any]:
    """The parameters of a SpikingJelly LIF-family neuron, in its own terms (tau or learned w)."""
    sg = m.surrogate_function
    d = {
        "kind": type(m).__name__, "step_mode": m.step_mode, "v_threshold": m.v_threshold,
        "v_reset": m.v_reset, "detach_reset": m.detach_reset,
        "surrogate": type(sg).__name__,
        "surrogate_params": {k: getattr(sg, k) for k in getattr(sg, "_sg_param_names", ())},
        "spiking": getattr(sg, "spiking", True),
    }
    if hasattr(m, "tau"):
        d["tau"] = m.tau
    if hasattr(m, "decay_input"):
        d["decay_input"] = m.decay_input
    if isinstance(getattr(m, "w", None), torch.Tensor):
        d["w"] = m.w.detach().clone()
        d["tau"] = float(1.0 / torch.sigmoid(m.w.detach().double()))
    return d


@contextlib.contextmanager
def _clean(model: nn.Module, seed: Optional[int]) -> Iterator[None]:
    """Reset every memory before and after; restore every buffer (BatchNorm statistics); run under
    ``seed`` (Dropout masks) without disturbing the global RNG."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    functional.reset_net(model)
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        functional.reset_net(model)
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])


def _trainable(model: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _grads(outputs, grad_outputs, named: Sequence[Tuple[str, torch.Tensor]],
           x_leaf: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    tensors = [p for _, p in named] + ([x_leaf] if x_leaf is not None else [])
    gs = torch.autograd.grad(outputs, tensors, grad_outputs, allow_unused=True)
    out = {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(named, gs)}
    if x_leaf is not None:
        out["__input__"] = torch.zeros_like(x_leaf) if gs[-1] is None else gs[-1]
    return out


# --------------------------------------------------------------------------------------------------
# The peer's own forward and BPTT
# --------------------------------------------------------------------------------------------------

def peer_forward(model: nn.Module, x: torch.Tensor, seed: Optional[int] = 0) -> torch.Tensor:
    """SpikingJelly's output for ``x`` (no autograd), from reset neurons; ``seed`` fixes Dropout masks."""
    with _clean(model, seed), torch.no_grad():
        return model(x)


def peer_bptt_grads(model: nn.Module, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                    seed: Optional[int] = 0) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """SpikingJelly's own BPTT: ``({parameter name: grad}, detached output)``; with ``x.requires_grad``
    also ``"__input__"``. Parameters the loss does not reach get zeros."""
    named = _trainable(model)
    x_leaf = x if x.requires_grad else None
    with _clean(model, seed), torch.enable_grad():
        out = model(x)
        grads = _grads(loss_fn(out), None, named, x_leaf)
    return grads, out.detach()


# --------------------------------------------------------------------------------------------------
# The rate-based reference
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Site:
    """One neuron's spike-pass record and its rate quantities (per element of one step's shape)."""
    module: nn.Module
    mode: str
    xs: List[torch.Tensor] = dataclasses.field(default_factory=list)
    ss: List[torch.Tensor] = dataclasses.field(default_factory=list)
    r: Optional[torch.Tensor] = None
    e: Optional[torch.Tensor] = None
    e_params: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    rate_calls: int = 0


def _learnable(m: nn.Module) -> Dict[str, torch.Tensor]:
    params = {n: p for n, p in m.named_parameters(recurse=False) if p.requires_grad}
    for n, p in params.items():
        if p.numel() != 1:
            raise NotImplementedError(f"{type(m).__name__}.{n}: only scalar learnable neuron parameters "
                                      f"(ParametricLIFNode.w) are supported, got shape {tuple(p.shape)}")
    return params


def _record(model: nn.Module, x: torch.Tensor, seed: Optional[int]) -> Tuple[torch.Tensor, Dict[str, _Site]]:
    """The spike pass: the peer's forward with hooks recording every neuron call."""
    sites: Dict[str, _Site] = {}
    handles = []
    for name, m in neuron_modules(model):
        site = sites[name] = _Site(m, m.step_mode)

        def hook(mod, args, output, site=site):
            site.xs.append(args[0].detach().clone())
            site.ss.append(output.detach().clone())
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
                out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, sites


def _eligibility(name: str, site: _Site, T: int) -> None:
    """r, e (and e per learnable parameter) of one neuron, by re-running it alone on its inputs."""
    m = site.module
    if not site.xs:
        raise ValueError(f"neuron {name} was not called")
    if site.mode == "m":
        if len(site.xs) != 1:
            raise NotImplementedError(f"multi-step neuron {name} called {len(site.xs)} times per forward "
                                      f"(shared neuron)")
        x_seq, s_seen = site.xs[0], site.ss[0]
    else:
        x_seq, s_seen = torch.stack(site.xs), torch.stack(site.ss)
    if x_seq.shape[0] != T:
        raise ValueError(f"neuron {name} ran {x_seq.shape[0]} steps for an input of {T} steps: the rate "
                         f"reference needs the model's time axis to be the input's first dimension")
    params = _learnable(m)
    elem = {n: p.detach().expand(x_seq.shape[1:]).clone().requires_grad_(True) for n, p in params.items()}
    xs = x_seq.clone().requires_grad_(True)

    def call(inp):
        if elem:
            return torch.func.functional_call(m, elem, (inp,))
        return m(inp)

    m.reset()
    try:
        with torch.enable_grad():
            if site.mode == "m":
                s = call(xs)
            else:
                s = torch.stack([call(xs[t]) for t in range(T)])
            if not torch.equal(s.detach(), s_seen):
                raise AssertionError(f"re-running neuron {name} alone did not reproduce its spikes")
            r = s.mean(0)
            gs = torch.autograd.grad(r.sum(), [xs, *elem.values()], allow_unused=True)
    finally:
        m.reset()
    site.r = r.detach()
    site.e = torch.zeros_like(x_seq[0]) if gs[0] is None else gs[0].sum(0)
    site.e_params = {n: (torch.zeros_like(elem[n]) if g is None else g) for n, g in zip(elem, gs[1:])}


def _rate_forward(site: _Site) -> Callable:
    m = site.module

    def forward(inp: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        site.rate_calls += 1
        flat = inp.reshape(site.r.shape)
        y = site.r + site.e * (flat - flat.detach())
        for n, e_p in site.e_params.items():
            p = getattr(m, n)
            y = y + e_p * (p - p.detach())
        return y.reshape(inp.shape)
    return forward


@contextlib.contextmanager
def _rate_neurons(sites: Dict[str, _Site]) -> Iterator[None]:
    for site in sites.values():
        site.rate_calls = 0
        site.module.forward = _rate_forward(site)       # an instance attribute shadows the method
    try:
        yield
    finally:
        for site in sites.values():
            del site.module.forward


def peer_rate_eligibility(model: nn.Module, x: torch.Tensor, seed: Optional[int] = 0) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per neuron name: ``{"r": mean_t s_t, "e": eligibility, "e_<param>": ...}`` (each shaped like one
    step of that neuron's input), from the spike pass on ``x`` ``[T, B, ...]``."""
    with _clean(model, seed):
        _, sites = _record(model, x, seed)
        for name, site in sites.items():
            _eligibility(name, site, x.shape[0])
    return {name: {"r": s.r, "e": s.e, **{f"e_{n}": v for n, v in s.e_params.items()}}
            for name, s in sites.items()}


def peer_rate_grads(model: nn.Module, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                    seed: Optional[int] = 0) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """The rate-based reference (see the module docstring): ``({parameter name: grad}, output)`` with
    the spike pass's exact output; with ``x.requires_grad`` also ``"__input__"`` (the rate input is
    ``x.mean(0)``, so every step gets 1/T of the rate input's gradient). For models without BatchNorm
    (their statistics on the time-averaged input would not be the spike pass's) whose input is
    time-major."""
    bn = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bn:
        raise ValueError(f"the rate reference does not apply to models with BatchNorm ({bn[0]})")
    named = _trainable(model)
    x_leaf = x if x.requires_grad else None
    T = x.shape[0]
    with _clean(model, seed):
        out, sites = _record(model, x.detach(), seed)
        if not sites:
            raise ValueError("no SpikingJelly neuron in the model")
        for name, site in sites.items():
            _eligibility(name, site, T)
        with torch.enable_grad():
            out_spike = out.detach().requires_grad_(True)
            g, = torch.autograd.grad(loss_fn(out_spike), out_spike)
            x_bar = x.mean(0, keepdim=True)
            with _rate_neurons(sites), torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                rate_out = model(x_bar)
            for name, site in sites.items():
                if site.rate_calls != 1:
                    raise AssertionError(f"neuron {name} called {site.rate_calls} times in the rate pass")
            if rate_out.dim() == out.dim() and rate_out.shape[0] == 1 and out.shape[0] == T \
                    and rate_out.shape[1:] == out.shape[1:]:
                grad_out = g.sum(0, keepdim=True)           # [T, B, ...] -> [1, B, ...]
            elif rate_out.shape == out.shape:
                grad_out = g                                  # no time axis (e.g. a firing rate)
            else:
                raise ValueError(f"rate output {tuple(rate_out.shape)} does not match the spike output "
                                 f"{tuple(out.shape)}")
            grads = _grads(rate_out, grad_out, named, x_leaf)
    return grads, out.detach()

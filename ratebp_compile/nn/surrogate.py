"""Surrogate gradients: the Heaviside step forward, a smooth pseudo-derivative ψ backward.

Every surrogate is a frozen dataclass (hashable, comparable, printable) with one width parameter,
and ``spike(x, surrogate)`` is the firing function used by all neurons: ``(x >= 0)`` forward (or
``x > 0`` with ``strict=True``), ``grad · ψ(x)`` in reverse mode and ``tangent · ψ(x)`` in forward
mode (which is how the eligibility of a neuron without a closed form is computed, see
``ratebp_compile.families.base``). The four surrogates the fused kernels know take their formula
from ``ratebp_compile.kernels.lif_math``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels.lif_math import surrogate_grad

__all__ = ["Surrogate", "Sigmoid", "ATan", "Rectangular", "Triangle", "PiecewiseExp", "SoftSign", "SuperSpike", "Erf",
           "PiecewiseLeakyReLU", "spike", "SURROGATES",
           "SignedStep", "StraightThrough", "StepGrad",
           "Tanh", "Tent", "Circ", "HeaviErfc"]


@dataclass(frozen=True)
class Surrogate:
    """Base class: subclasses define ``grad(x) = ψ(x)``, the pseudo-derivative of Θ(x)."""

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    @property
    def width(self) -> float:
        """The surrogate's one shape parameter (α for sigmoid/atan, the support width otherwise)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Sigmoid(Surrogate):
    """ψ(x) = α·σ(αx)·(1 − σ(αx)), the derivative of σ(αx); peak α/4 at x = 0."""

    alpha: float = 4.0

    def grad(self, x):
        return surrogate_grad("sigmoid", self.alpha, x)

    @property
    def width(self):
        return self.alpha


@dataclass(frozen=True)
class ATan(Surrogate):
    """ψ(x) = (α/2) / (1 + (π·α·x/2)²), the derivative of arctan(π·α·x/2)/π + 1/2; peak α/2."""

    alpha: float = 2.0

    def grad(self, x):
        return surrogate_grad("atan", self.alpha, x)

    @property
    def width(self):
        return self.alpha


@dataclass(frozen=True)
class Rectangular(Surrogate):
    """ψ(x) = 1/w where |x| < w/2, else 0 (unit area)."""

    w: float = 1.0

    def grad(self, x):
        return surrogate_grad("rectangular", self.w, x)

    @property
    def width(self):
        return self.w


@dataclass(frozen=True)
class Triangle(Surrogate):
    """ψ(x) = max(0, 1 − |x|/w) / w (unit area, support |x| < w)."""

    w: float = 1.0

    def grad(self, x):
        return surrogate_grad("triangle", self.w, x)

    @property
    def width(self):
        return self.w


# -- surrogates of other libraries (no fused kernel: their neurons run the PyTorch spike pass) -----------
@dataclass(frozen=True)
class PiecewiseExp(Surrogate):
    """ψ(x) = (α/2)·exp(−α|x|) (SpikingJelly's PiecewiseExp)."""

    alpha: float = 1.0

    def grad(self, x):
        return (self.alpha / 2.0) * torch.exp(-self.alpha * x.abs())

    @property
    def width(self):
        return self.alpha


@dataclass(frozen=True)
class SoftSign(Surrogate):
    """ψ(x) = 1 / (2α·(1/α + |x|)²) (SpikingJelly's SoftSign)."""

    alpha: float = 2.0

    def grad(self, x):
        return 1.0 / (2.0 * self.alpha * (1.0 / self.alpha + x.abs()).square())

    @property
    def width(self):
        return self.alpha


@dataclass(frozen=True)
class SuperSpike(Surrogate):
    """ψ(x) = α / (β·|x| + 1)² (SuperSpike, Zenke & Ganguli 2018): SpikingJelly's is α/(|x| + 1)² (β = 1),
    snnTorch's fast_sigmoid 1/(k|x| + 1)² (α = 1, β = k), Norse's "super" 1/(|x| + 1)²."""

    alpha: float = 1.0
    beta: float = 1.0

    def grad(self, x):
        return self.alpha / (self.beta * x.abs() + 1.0).square()

    @property
    def width(self):
        return self.beta


@dataclass(frozen=True)
class Erf(Surrogate):
    """ψ(x) = (α/√π)·exp(−(αx)²) (SpikingJelly's Erf)."""

    alpha: float = 2.0

    def grad(self, x):
        return (self.alpha / math.sqrt(math.pi)) * torch.exp(-(self.alpha * x).square())

    @property
    def width(self):
        return self.alpha


@dataclass(frozen=True)
class PiecewiseLeakyReLU(Surrogate):
    """ψ(x) = 1/(2w) where |x| < w, else c (SpikingJelly's PiecewiseLeakyReLU)."""

    w: float = 1.0
    c: float = 0.01

    def grad(self, x):
        return torch.where(x.abs() < self.w, 1.0 / (2.0 * self.w), self.c).to(x.dtype)

    @property
    def width(self):
        return self.w


SURROGATES = {cls.__name__.lower(): cls for cls in (Sigmoid, ATan, Rectangular, Triangle)}


class _SurrogateSpike(torch.autograd.Function):
    @staticmethod
    def forward(x, surrogate, strict):
        return ((x > 0) if strict else (x >= 0)).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, surrogate, _ = inputs
        ctx.surrogate = surrogate
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return grad_out * ctx.surrogate.grad(x), None, None

    @staticmethod
    def jvp(ctx, x_tangent, *_):
        (x,) = ctx.saved_tensors
        return x_tangent * ctx.surrogate.grad(x)


def spike(x: torch.Tensor, surrogate: Surrogate, strict: bool = False) -> torch.Tensor:
    """Θ(x) = 1 where x ≥ 0 (x > 0 when ``strict``), else 0, in x's dtype, with ψ = ``surrogate.grad`` as
    its derivative."""
    if not isinstance(surrogate, Surrogate):
        raise TypeError(f"surrogate must be a ratebp_compile.nn.surrogate.Surrogate, got {surrogate!r}")
    return _SurrogateSpike.apply(x, surrogate, bool(strict))


# -- snnTorch's surrogates ---------------------------------------------------------------------------
# (snnTorch's fast_sigmoid(k) is SuperSpike(alpha=1, beta=k), its sigmoid(k) Sigmoid(alpha=k), its
# atan(α) ATan(α); the three below have no equivalent above. No fused kernel: PyTorch spike pass.)
@dataclass(frozen=True)
class SignedStep(Surrogate):
    """ψ(x) = +c where x < 0, −c where x ≥ 0: a signed step, not a triangle (snnTorch's ``triangular(c)``,
    whose backward is exactly this)."""

    c: float = 1.0

    def grad(self, x):
        return torch.where(x >= 0, torch.full_like(x, -self.c), torch.full_like(x, self.c))

    @property
    def width(self):
        return self.c


@dataclass(frozen=True)
class StraightThrough(Surrogate):
    """ψ(x) = 1: the gradient passes through the step unchanged (snnTorch's
    ``straight_through_estimator()``); no shape parameter (``width`` is 1)."""

    def grad(self, x):
        return torch.ones_like(x)

    @property
    def width(self):
        return 1.0


@dataclass(frozen=True)
class StepGrad(Surrogate):
    """ψ(x) = Θ(x) = 1 where x > 0, else 0: the step itself as its own derivative, so only a neuron that
    fired passes a gradient (snnTorch's ``heaviside()``); no shape parameter (``width`` is 1)."""

    def grad(self, x):
        return (x > 0).to(x.dtype)

    @property
    def width(self):
        return 1.0


# -- Norse's surrogates ------------------------------------------------------------------------------
# (Norse 1.1's ``threshold(x, method, alpha)``: "super" is SuperSpike(alpha=1, beta=1) above — Norse
# ignores its alpha; "triangle", "tanh", "circ", "heavi_erfc" are the four below, each computed with the
# operations Norse's backward uses; "heaviside" has no gradient and is refused by the adapter. No fused
# kernel: PyTorch spike pass.)
@dataclass(frozen=True)
class Tanh(Surrogate):
    """ψ(x) = 1 − tanh(αx)², peak 1 (Norse's ``"tanh"``; the derivative of (1 + tanh(αx))/2 would be
    α/2 times this)."""

    alpha: float = 100.0

    def grad(self, x):
        return 1 - (x * self.alpha).tanh().pow(2)

    @property
    def width(self):
        return self.alpha


@dataclass(frozen=True)
class Tent(Surrogate):
    """ψ(x) = α·max(0, 1 − |x|): a triangle of half-width 1 and height α (Norse's ``"triangle"``; not
    ``Triangle(w)``, which has unit area)."""

    alpha: float = 100.0

    def grad(self, x):
        return self.alpha * torch.relu(1 - x.abs())

    @property
    def width(self):
        return self.alpha


@dataclass(frozen=True)
class Circ(Surrogate):
    """ψ(x) = α³/(α² + x²)^{3/2}, peak 1 (Norse's ``"circ"``), computed as Norse writes it:
    2α·(1/(2√(α² + x²)) − x²/(2(α² + x²)^{3/2}))."""

    alpha: float = 100.0

    def grad(self, x):
        a2 = self.alpha ** 2
        x2 = x.pow(2)
        return (-(x2 / (2 * (a2 + x2).pow(1.5))) + 1 / (2 * (a2 + x2).sqrt())) * 2 * self.alpha

    @property
    def width(self):
        return self.alpha


#: √π as Norse's "heavi_erfc" divides by it: the square root, in float32, of π rounded to float32.
_SQRT_PI_FLOAT32 = float(torch.tensor(math.pi, dtype=torch.float32).sqrt())


@dataclass(frozen=True)
class HeaviErfc(Surrogate):
    """ψ(x) = 2·exp(−(αx)²)/√π, peak 2/√π whatever α (Norse's ``"heavi_erfc"``; not ``Erf(α)``, whose
    peak is α/√π). Like Norse, it divides by √π computed in float32 (1.7724539, 2e-8 relative below √π),
    in float64 too."""

    alpha: float = 100.0

    def grad(self, x):
        return (2 * torch.exp(-(self.alpha * x).pow(2))) / _SQRT_PI_FLOAT32

    @property
    def width(self):
        return self.alpha

"""The spike pass's training-mode BatchNorm on CPU: per-channel statistics and the normalisation in one
C function (``clib``: compiled on first use, on PyTorch's OpenMP threads).

``torch.native_batch_norm`` on a CPU tensor spends most of its time on the statistics (about 2 ns an
element on one core for a ``[128, 16, 32, 32]`` input, four times its normalisation). Here each channel's
mean and biased variance take two vectorised passes over its slabs — the mean, then the squared
deviations from it, in the input's dtype in 16 partial sums, each block of 1024 elements added into a
double — and the normalisation a third, ``y = (x − mean)·a + β`` with ``a = γ/√(var + ε)``.
Threads split the channels.

The results are BatchNorm's to rounding, not bitwise ``native_batch_norm``'s (whose summation order
differs): mean and variance within a few float32 ulps of the exact ones. Inputs it does not take (other
dtypes or layouts, fewer than 16 elements per slab, autograd through the parameters, fake or subclassed
tensors, tracing by Dynamo, or the library unavailable) are for :func:`usable` to refuse; the caller then
runs PyTorch's.
"""
from __future__ import annotations

import ctypes
from string import Template
from typing import Optional, Tuple

import torch

from .clib import CLibrary

__all__ = ["usable", "batch_norm", "LIBRARY"]

_TEMPLATE = Template(r"""
/* The sum of p[0..m) (square: of (p[i] − center)², else of p[i] − center): 16 partial sums in $R, each
   block of 1024 elements added into a double. */
INLINE double ${NAME}_sum(const $R *restrict p, const int64_t m, const $R center, const int square) {
    double total = 0;
    for (int64_t b = 0; b < m; b += 1024) {
        const int64_t e = b + 1024 < m ? b + 1024 : m;
        $R acc[16] = {0}, tail = 0;
        int64_t i = b;
        for (; i + 16 <= e; i += 16)
            for (int k = 0; k < 16; ++k) {
                const $R d = p[i + k] - center;
                acc[k] += square ? d * d : d;
            }
        for (; i < e; ++i) {
            const $R d = p[i] - center;
            tail += square ? d * d : d;
        }
        double block = tail;
        for (int k = 0; k < 16; ++k)
            block += acc[k];
        total += block;
    }
    return total;
}

/* x [N, C, L] contiguous: mean and biased variance per channel into mean_out and var_out; with y, also
   y = (x − mean)·a + β per channel, a = γ/√(var + ε) (weight, bias: NULL for 1 and 0). */
void $NAME(const $R *restrict x, $R *restrict y, const $R *weight, const $R *bias, $R *mean_out,
           $R *var_out, int64_t N, int64_t C, int64_t L, double eps, int threads) {
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t c = 0; c < C; ++c) {
        const double count = (double)N * (double)L;
        double s = 0, q = 0;
        for (int64_t n = 0; n < N; ++n)
            s += ${NAME}_sum(x + (n * C + c) * L, L, 0, 0);
        const double mean = s / count;
        for (int64_t n = 0; n < N; ++n)
            q += ${NAME}_sum(x + (n * C + c) * L, L, ($R)mean, 1);
        const double var = q / count;
        mean_out[c] = ($R)mean;
        var_out[c] = ($R)var;
        if (y) {
            const $R m = ($R)mean, a = ($R)((weight ? (double)weight[c] : 1.0) / sqrt(var + eps));
            const $R b = bias ? bias[c] : 0;
            for (int64_t n = 0; n < N; ++n) {
                const $R *restrict xs = x + (n * C + c) * L;
                $R *restrict ys = y + (n * C + c) * L;
                for (int64_t i = 0; i < L; ++i)
                    ys[i] = (xs[i] - m) * a + b;
            }
        }
    }
}
""")

_SOURCE = "".join(_TEMPLATE.substitute(NAME=name, R=real)
                  for name, real in (("batch_norm_f32", "float"), ("batch_norm_f64", "double")))

_FUNCTIONS = {torch.float32: ("batch_norm_f32", ctypes.c_float), torch.float64: ("batch_norm_f64", ctypes.c_double)}


def _declare(lib: ctypes.CDLL) -> None:
    for name, _ in _FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_double, ctypes.c_int]


LIBRARY = CLibrary("batchnorm_cpu", _SOURCE, _declare)


def _plain(t: Optional[torch.Tensor], x: torch.Tensor) -> bool:
    """A real CPU tensor or parameter (not a fake or other subclass) in x's dtype, contiguous, outside
    autograd."""
    return t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
                         and t.dtype == x.dtype and t.is_contiguous()
                         and not (t.requires_grad and torch.is_grad_enabled()))


def usable(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`batch_norm` takes this BatchNorm input ``[N, C, ...]`` (float32 or float64, contiguous,
    at least 16 elements per slab, below which PyTorch's is as fast) and its parameters (``[C]`` each; any
    other shape is left to PyTorch's BatchNorm, which reports it)."""
    if torch.compiler.is_compiling():       # Dynamo sees real-looking tensors; a traced graph gets PyTorch's
        return False
    per_channel = all(t is None or t.shape == x.shape[1:2] for t in (weight, bias))
    return (x.dtype in _FUNCTIONS and x.dim() >= 3 and _plain(x, x) and _plain(weight, x) and _plain(bias, x)
            and per_channel and x.numel() > 0 and x.numel() // (x.shape[0] * x.shape[1]) >= 16
            and LIBRARY.get() is not None)


def batch_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
               normalise: bool = True) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm of ``x`` ``[N, C, ...]`` (:func:`usable`): ``(y, mean, var)`` with the biased
    variance; ``y`` is None without ``normalise`` (the statistics only)."""
    lib = LIBRARY.get()
    N, C = x.shape[0], x.shape[1]
    L = x.numel() // (N * C)
    y = torch.empty_like(x) if normalise else None
    mean, var = x.new_empty(C), x.new_empty(C)
    threads = min(torch.get_num_threads(), C) if LIBRARY.openmp else 1
    name, _ = _FUNCTIONS[x.dtype]
    pointer = (lambda t: None if t is None else t.data_ptr())
    getattr(lib, name)(x.data_ptr(), pointer(y), pointer(weight), pointer(bias), mean.data_ptr(), var.data_ptr(),
                       N, C, L, float(eps), threads)
    return y, mean, var

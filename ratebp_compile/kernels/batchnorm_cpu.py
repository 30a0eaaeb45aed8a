"""The spike pass's training-mode BatchNorm on CPU: per-channel statistics and the normalisation in one
C function (``clib``: compiled on first use, on PyTorch's OpenMP threads).

``torch.native_batch_norm`` on a CPU tensor spends most of its time on the statistics (about 2 ns an
element on one core for a ``[128, 16, 32, 32]`` input, four times its normalisation). Here each channel's
mean and biased variance take two vectorised passes over its slabs — the mean, then the squared
deviations from it, in the input's dtype in 16 partial sums, each block of 1024 elements added into a
double — and the normalisation a third, ``y = (x − mean)·a + β`` with ``a = γ/√(var + ε)``.
Threads split the channels. A channels-last input (``[N, C, H, W]`` stored as rows of C channels, as the
spike pass keeps its convolutions' outputs: ``passes/channels_last.py``) takes the same three passes over
its rows, the channels vectorised, every 16 rows summed in the input's dtype and added into a double per
block of 256 rows, the blocks' sums added in order; threads split the blocks; ``y`` is channels-last.

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

/* x [M, C] contiguous (a channels-last [N, C, H, W], M = N·H·W), rows [b, e) (at most 256: in cache while
   each group of $LANES channels is summed over them, then the channels past the last full group): the
   per-channel sums of x − center (square: of (x − center)²) into out, every 16 rows summed in $R (one
   vector per group) and added into a double. */
INLINE void ${NAME}_rows(const $R *restrict x, const int64_t b, const int64_t e, const int64_t C,
                         const $R *restrict center, const int square, double *restrict out) {
    int64_t c = 0;
    for (; c + $LANES <= C; c += $LANES) {
        $V m;
        double total[$LANES] = {0};
        memcpy(&m, center + c, sizeof m);
        for (int64_t r0 = b; r0 < e; r0 += 16) {
            const int64_t r1 = r0 + 16 < e ? r0 + 16 : e;
            $V acc = {0};
            for (int64_t r = r0; r < r1; ++r) {
                $V v;
                memcpy(&v, x + r * C + c, sizeof v);
                v -= m;
                acc += square ? v * v : v;
            }
            for (int k = 0; k < $LANES; ++k)
                total[k] += acc[k];
        }
        for (int k = 0; k < $LANES; ++k)
            out[c + k] = total[k];
    }
    for (; c < C; ++c) {
        double total = 0;
        for (int64_t r0 = b; r0 < e; r0 += 16) {
            const int64_t r1 = r0 + 16 < e ? r0 + 16 : e;
            $R acc = 0;
            for (int64_t r = r0; r < r1; ++r) {
                const $R d = x[r * C + c] - center[c];
                acc += square ? d * d : d;
            }
            total += acc;
        }
        out[c] = total;
    }
}

/* $NAME on a channels-last x, seen as [M, C] contiguous: the same statistics and y. Each block of 256 rows
   has its sums; threads split the blocks, and the blocks' sums are added in order (so that the result does
   not depend on the number of threads). Returns 1 when its scratch memory cannot be had, else 0. */
int ${NAME}_last(const $R *restrict x, $R *restrict y, const $R *weight, const $R *bias, $R *mean_out,
                 $R *var_out, int64_t M, int64_t C, double eps, int threads) {
    const int64_t blocks = (M + 255) / 256;
    double *partial = malloc((size_t)(blocks * C) * sizeof(double));
    $R *center = calloc((size_t)(3 * C), sizeof($R));
    if (!partial || !center) {
        free(partial);
        free(center);
        return 1;
    }
    $R *scale = center + C, *shift = scale + C;
    (void)threads;
    for (int square = 0; square < 2; ++square) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
        for (int64_t k = 0; k < blocks; ++k)
            ${NAME}_rows(x, k * 256, (k + 1) * 256 < M ? (k + 1) * 256 : M, C, center, square, partial + k * C);
        for (int64_t c = 0; c < C; ++c) {
            double total = 0;
            for (int64_t k = 0; k < blocks; ++k)
                total += partial[k * C + c];
            if (square)
                var_out[c] = ($R)(total / (double)M);
            else
                center[c] = mean_out[c] = ($R)(total / (double)M);
        }
    }
    if (y) {
        for (int64_t c = 0; c < C; ++c) {
            scale[c] = ($R)((weight ? (double)weight[c] : 1.0) / sqrt((double)var_out[c] + eps));
            shift[c] = bias ? bias[c] : 0;
        }
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
        for (int64_t r = 0; r < M; ++r)
            for (int64_t c = 0; c < C; ++c)
                y[r * C + c] = (x[r * C + c] - center[c]) * scale[c] + shift[c];
    }
    free(partial);
    free(center);
    return 0;
}
""")

_SOURCE = "".join(_TEMPLATE.substitute(NAME=name, R=real, V=vector, LANES=lanes)
                  for name, real, vector, lanes in (("batch_norm_f32", "float", "vf32", 8),
                                                    ("batch_norm_f64", "double", "vf64", 4)))

_FUNCTIONS = {torch.float32: ("batch_norm_f32", ctypes.c_float), torch.float64: ("batch_norm_f64", ctypes.c_double)}


def _declare(lib: ctypes.CDLL) -> None:
    for name, _ in _FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_double, ctypes.c_int]
        last = getattr(lib, name + "_last")
        last.restype = ctypes.c_int
        last.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 2 + [ctypes.c_double, ctypes.c_int]


LIBRARY = CLibrary("batchnorm_cpu", _SOURCE, _declare)


def _plain(t: Optional[torch.Tensor], x: torch.Tensor) -> bool:
    """A real CPU tensor or parameter (not a fake or other subclass) in x's dtype, outside autograd."""
    return t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
                         and t.dtype == x.dtype and not (t.requires_grad and torch.is_grad_enabled()))


def _channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is a 4-D tensor in channels-last memory and not also contiguous (``[N, C, 1, 1]``)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def usable(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`batch_norm` takes this BatchNorm input ``[N, C, ...]`` (float32 or float64; contiguous,
    with at least 16 elements per slab, below which PyTorch's is as fast, or a 4-D tensor in channels-last
    memory with at least 16 rows of channels) and its parameters (``[C]`` each, contiguous; any other shape
    is left to PyTorch's BatchNorm, which reports it)."""
    if torch.compiler.is_compiling():       # Dynamo sees real-looking tensors; a traced graph gets PyTorch's
        return False
    per_channel = all(t is None or (t.shape == x.shape[1:2] and t.is_contiguous()) for t in (weight, bias))
    laid_out = (x.is_contiguous() and x.numel() // (x.shape[0] * x.shape[1]) >= 16) or \
        (_channels_last(x) and x.numel() // x.shape[1] >= 16)
    return (x.dtype in _FUNCTIONS and x.dim() >= 3 and _plain(x, x) and _plain(weight, x) and _plain(bias, x)
            and per_channel and x.numel() > 0 and laid_out and LIBRARY.get() is not None)


def batch_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
               normalise: bool = True) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm of ``x`` ``[N, C, ...]`` (:func:`usable`): ``(y, mean, var)`` with the biased
    variance; ``y`` is None without ``normalise`` (the statistics only)."""
    lib = LIBRARY.get()
    N, C = x.shape[0], x.shape[1]
    L = x.numel() // (N * C)
    y = torch.empty_like(x) if normalise else None
    mean, var = x.new_empty(C), x.new_empty(C)
    threads = torch.get_num_threads() if LIBRARY.openmp else 1
    name, _ = _FUNCTIONS[x.dtype]
    pointer = (lambda t: None if t is None else t.data_ptr())
    if _channels_last(x):                   # threads split the blocks of rows; y (empty_like) is channels-last
        if getattr(lib, name + "_last")(x.data_ptr(), pointer(y), pointer(weight), pointer(bias), mean.data_ptr(),
                                        var.data_ptr(), N * L, C, float(eps), threads):
            raise MemoryError(f"batch_norm: no memory for the per-block sums of a {list(x.shape)} input")
    else:
        getattr(lib, name)(x.data_ptr(), pointer(y), pointer(weight), pointer(bias), mean.data_ptr(),
                           var.data_ptr(), N, C, L, float(eps), min(threads, C))     # threads split the channels
    return y, mean, var

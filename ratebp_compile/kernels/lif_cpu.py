"""The LIF family's spike pass as one fused CPU loop: C compiled on first use, called through ctypes.

The PyTorch reference (``lif_math``) runs each timestep as a dozen elementwise ops over the whole layer,
each reading and writing it from memory. Here one pass reads the input currents, writes the spikes and
accumulates r and e — the spike pass of ``ratebp::lif_spike_pass`` and ``ratebp::lif_spike_scan`` on CPU
tensors: block by block of 384 elements, 8 steps at a time with the state of three vectors in registers
(three interleaved, so that the core has independent work while one waits on a division), the block's
state in the first-level cache between those tiles of steps. Tiles keep the rows streaming through the
cache at once to 16 at any T (all T steps at once ran at half the speed at T = 32). The loop is written
with the C compiler's vector extensions (32-byte vectors).

Threads split the elements, as many as ``torch.get_num_threads()``: PyTorch's own OpenMP threads where
the library joins that runtime (``clib``), a Python thread pool elsewhere (the calls release the GIL).

The arithmetic is the reference's, operation for operation and in its dtype (float32, or float64 for
float64 inputs; half-precision inputs are widened first), compiled without contracting products and
sums into FMAs, so that it rounds as the reference does: spikes, r and the membrane are bitwise the
reference's; the sigmoid surrogate's ``exp`` is a polynomial here (about one ulp), so ψ, and with it e,
may differ in the last bits. Without a C compiler, or with ``RATEBP_CPU_LOOP=0``, :func:`available` is
False and the ops run the reference.
"""
from __future__ import annotations

import ctypes
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from string import Template
from typing import Optional

import torch

from .clib import CLibrary

__all__ = ["available", "unavailable_reason", "spike_scan", "SURROGATES", "LIBRARY"]

#: The surrogates by index, as in the Triton kernels.
SURROGATES = ("sigmoid", "atan", "rectangular", "triangle")

#: Vectors the C loop interleaves; a thread of the Python pool starts at a multiple of GROUP vectors.
_GROUP = 3
#: Lanes of a 32-byte vector per dtype.
_LANES = {torch.float32: 8, torch.float64: 4}

_HEADER = Template(r"""
/* Vectors interleaved per step: independent work for the core while one waits on a division or the
   exponential's polynomial. Elements per block: a multiple of GROUP vectors of 8 and of 4 lanes. */
#define GROUP $GROUP
#define BLOCK 384
#define TILE 8

/* e^a, about one ulp, a clamped to the normal range: a = n·ln2 + f with |f| ≤ ln2/2, e^f by a polynomial
   (Cephes' minimax one in float32, Taylor to degree 13 in float64), 2^n from the exponent bits; n is
   rounded to nearest by adding and subtracting 1.5·2^23 (1.5·2^52), which is exact for these |n|. */
INLINE vf32 exp_f32(vf32 a) {
    a = SELECT(vi32, vf32, a < -87.3f, SPLAT(vf32, -87.3f), a);
    a = SELECT(vi32, vf32, a > 88.0f, SPLAT(vf32, 88.0f), a);
    const vf32 n = (a * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const vf32 f = (a - n * 0.693359375f) - n * -2.12194440e-4f;
    vf32 p = SPLAT(vf32, 1.9875691500E-4f);
    p = p * f + 1.3981999507E-3f; p = p * f + 8.3334519073E-3f; p = p * f + 4.1665795894E-2f;
    p = p * f + 1.6666665459E-1f; p = p * f + 5.0000001201E-1f;
    p = p * (f * f) + f + 1.0f;
    return p * (vf32)((__builtin_convertvector(n, vi32) + 127) << 23);
}

INLINE vf64 exp_f64(vf64 a) {
    a = SELECT(vi64, vf64, a < -708.0, SPLAT(vf64, -708.0), a);
    a = SELECT(vi64, vf64, a > 709.0, SPLAT(vf64, 709.0), a);
    const vf64 n = (a * 1.4426950408889634 + 6755399441055744.0) - 6755399441055744.0;
    const vf64 f = (a - n * 6.93145751953125E-1) - n * 1.42860682030941723212E-6;
    vf64 p = SPLAT(vf64, 1.0 / 6227020800.0);
    p = p * f + 1.0 / 479001600.0; p = p * f + 1.0 / 39916800.0; p = p * f + 1.0 / 3628800.0;
    p = p * f + 1.0 / 362880.0; p = p * f + 1.0 / 40320.0; p = p * f + 1.0 / 5040.0; p = p * f + 1.0 / 720.0;
    p = p * f + 1.0 / 120.0; p = p * f + 1.0 / 24.0; p = p * f + 1.0 / 6.0; p = p * f + 0.5;
    p = p * (f * f) + f + 1.0;
    return p * (vf64)((__builtin_convertvector(n, vi64) + 1023) << 52);
}
""").substitute(GROUP=_GROUP)

# One instance per input and spike dtype: $NAME; the real type $R, its vector $V, the mask $I, $LANES lanes;
# the spike type $S and the vector $SV of spikes stored; $EXP.
_SCAN = Template(r"""
typedef struct {
    $R lam, one_minus_lam, v_threshold, v_reset, width, half_pi_width;
    int decay_input, hard_reset, detach_reset, strict, delayed_reset;
} ${NAME}_params;

/* One step of one vector: charge with c, fire, update the state (v, kappa, dv/dh, r, e, mu, e_lambda),
   return the spikes; the scalar recurrence of lif_math, operation for operation. */
INLINE $V ${NAME}_step(const ${NAME}_params *p, const int surrogate, const int tangent, const $V c, $V *v,
                       $V *kappa, $V *dvdh, $V *r, $V *e, $V *mu, $V *el) {
    const $V one = SPLAT($V, 1), zero = SPLAT($V, 0);
    const $R k0 = p->decay_input ? p->one_minus_lam : ($R)1.0, half_width = p->width / ($R)2.0;
    /* the potential charged from (delayed reset) */
    const $V ur = *v - p->v_threshold;
    const $V rs = p->delayed_reset ? SELECT($I, $V, p->strict ? ur > 0 : ur >= 0, one, zero) : zero;
    const $V v_in = p->delayed_reset && p->hard_reset ? (one - rs) * *v + rs * p->v_reset : *v;
    /* charge, fire */
    const $V h_charged = p->decay_input ? v_in + (c - v_in) * p->one_minus_lam : v_in * p->lam + c;
    const $V h = p->delayed_reset && !p->hard_reset ? h_charged - rs * p->v_threshold : h_charged;
    const $V u = h - p->v_threshold;
    const $V s = SELECT($I, $V, p->strict ? u > 0 : u >= 0, one, zero);
    /* the sensitivity to the input, and to the decay */
    *kappa = k0 + p->lam * *dvdh * *kappa;
    if (tangent)
        *mu = (p->decay_input ? v_in - c : v_in) + p->lam * *dvdh * *mu;
    /* the surrogate's psi */
    $V psi;
    if (surrogate == 0) {
        const $V sg = one / (one + $EXP(-(u * p->width)));
        psi = (one - sg) * sg * p->width;
    } else if (surrogate == 1) {
        const $V a = u * p->half_pi_width;
        psi = half_width / (one + a * a);
    } else {
        const $V au = SELECT($I, $V, u < 0, -u, u);
        if (surrogate == 2) {
            psi = SELECT($I, $V, au < half_width, one, zero) / p->width;
        } else {
            const $V tri = one - au / p->width;
            psi = SELECT($I, $V, tri > 0, tri, zero) / p->width;
        }
    }
    /* the sums, dv/dh through the reset, the reset */
    *r = *r + s;
    *e = *e + psi * *kappa;
    if (tangent)
        *el = *el + psi * *mu;
    const $V hard = p->detach_reset ? one - s : one - s - (h - p->v_reset) * psi;
    const $V soft = p->detach_reset ? one : one - p->v_threshold * psi;
    *dvdh = p->hard_reset ? hard : soft;
    const $V after = p->hard_reset ? (one - s) * h + s * p->v_reset : h - s * p->v_threshold;
    *v = p->delayed_reset ? h : after;
    return s;
}

/* `groups` vectors of `count` lanes each from element j on: their state loaded into registers, `steps`
   steps run (x and spikes point at the first one's row), the state stored back. */
INLINE void ${NAME}_lanes(const ${NAME}_params *p, const int surrogate, const int tangent, const int groups,
                          const int count, const $R *restrict x, $S *restrict spikes, $R *restrict state,
                          const int64_t steps, const int64_t n, const int64_t j) {
    $V v[GROUP], kappa[GROUP], dvdh[GROUP], r[GROUP], e[GROUP], mu[GROUP], el[GROUP];
    const size_t bytes = count * sizeof($R);
    for (int k = 0; k < groups; ++k) {
        const int64_t i = j + k * $LANES;
        v[k] = kappa[k] = dvdh[k] = r[k] = e[k] = mu[k] = el[k] = SPLAT($V, 0);
        memcpy(&v[k], state + i, bytes); memcpy(&kappa[k], state + n + i, bytes);
        memcpy(&dvdh[k], state + 2 * n + i, bytes); memcpy(&r[k], state + 3 * n + i, bytes);
        memcpy(&e[k], state + 4 * n + i, bytes);
        if (tangent) { memcpy(&mu[k], state + 5 * n + i, bytes); memcpy(&el[k], state + 6 * n + i, bytes); }
    }
    for (int64_t t = 0; t < steps; ++t) {
        for (int k = 0; k < groups; ++k) {
            const int64_t i = t * n + j + k * $LANES;
            $V c = SPLAT($V, 0);
            memcpy(&c, x + i, bytes);
            const $SV s = __builtin_convertvector(${NAME}_step(p, surrogate, tangent, c, &v[k], &kappa[k],
                                                               &dvdh[k], &r[k], &e[k], &mu[k], &el[k]), $SV);
            memcpy(spikes + i, &s, count * sizeof($S));
        }
    }
    for (int k = 0; k < groups; ++k) {
        const int64_t i = j + k * $LANES;
        memcpy(state + i, &v[k], bytes); memcpy(state + n + i, &kappa[k], bytes);
        memcpy(state + 2 * n + i, &dvdh[k], bytes); memcpy(state + 3 * n + i, &r[k], bytes);
        memcpy(state + 4 * n + i, &e[k], bytes);
        if (tangent) { memcpy(state + 5 * n + i, &mu[k], bytes); memcpy(state + 6 * n + i, &el[k], bytes); }
    }
}

/* Elements [begin, end): a block of BLOCK elements at a time, all steps of one block before the next, TILE
   steps at a time with the state in registers: 2·TILE rows stream through the cache at a time (x and the
   spikes of those steps), few enough for the hardware prefetchers at any T, and the block's state stays
   in the first-level cache between tiles. */
INLINE void ${NAME}_range(const ${NAME}_params *p, const int surrogate, const int tangent,
                          const $R *restrict x, $S *restrict spikes, $R *restrict state, int64_t steps,
                          int64_t n, int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; block += BLOCK) {
        const int64_t last = block + BLOCK < end ? block + BLOCK : end;
        for (int64_t t = 0; t < steps; t += TILE) {
            const $R *restrict xt = x + t * n;
            $S *restrict st = spikes + t * n;
            const int64_t tile = steps - t < TILE ? steps - t : TILE;
            int64_t j = block;
            for (; j + GROUP * $LANES <= last; j += GROUP * $LANES)
                ${NAME}_lanes(p, surrogate, tangent, GROUP, $LANES, xt, st, state, tile, n, j);
            for (; j + $LANES <= last; j += $LANES)
                ${NAME}_lanes(p, surrogate, tangent, 1, $LANES, xt, st, state, tile, n, j);
            if (j < last)
                ${NAME}_lanes(p, surrogate, tangent, 1, (int)(last - j), xt, st, state, tile, n, j);
        }
    }
}

/* Elements [begin, end) of a layer of n: x [steps, n], state rows [5 or 7, n] (v, kappa, dv/dh, sum s,
   sum psi*kappa, then mu, sum psi*mu with the decay tangent), spikes [steps, n]; split over `threads`
   OpenMP threads when built with OpenMP (the runtime PyTorch's own operators run on). */
void $NAME(const $R *restrict x, $S *restrict spikes, $R *restrict state, int64_t steps, int64_t n,
           int64_t begin, int64_t end, $R lam, $R one_minus_lam, $R v_threshold, $R v_reset, $R width,
           $R half_pi_width, int decay_input, int hard_reset, int detach_reset, int surrogate, int strict,
           int delayed_reset, int tangent, int threads) {
    const ${NAME}_params p = {lam, one_minus_lam, v_threshold, v_reset, width, half_pi_width, decay_input,
                              hard_reset, detach_reset, strict, delayed_reset};
#define ${NAME}_CASE(SURROGATE, TANGENT) ${NAME}_range(&p, SURROGATE, TANGENT, x, spikes, state, steps, n, b, e)
#define ${NAME}_SPECIALISED                                                                                  \
    switch (surrogate * 2 + (tangent != 0)) {                                                                \
    case 0: ${NAME}_CASE(0, 0); break; case 1: ${NAME}_CASE(0, 1); break;                                    \
    case 2: ${NAME}_CASE(1, 0); break; case 3: ${NAME}_CASE(1, 1); break;                                    \
    case 4: ${NAME}_CASE(2, 0); break; case 5: ${NAME}_CASE(2, 1); break;                                    \
    case 6: ${NAME}_CASE(3, 0); break; default: ${NAME}_CASE(3, 1); break;                                   \
    }
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        {
            const int64_t id = omp_get_thread_num(), team = omp_get_num_threads(), unit = GROUP * $LANES;
            const int64_t units = (end - begin + unit - 1) / unit;
            const int64_t b = begin + units * id / team * unit;
            const int64_t e_ = begin + units * (id + 1) / team * unit, e = e_ < end ? e_ : end;
            if (b < e) { ${NAME}_SPECIALISED }
        }
        return;
    }
#endif
    (void)threads;
    const int64_t b = begin, e = end;
    ${NAME}_SPECIALISED
#undef ${NAME}_CASE
#undef ${NAME}_SPECIALISED
}
""")

_SOURCE = _HEADER + "".join(
    _SCAN.substitute(NAME=name, R=real, V=vector, I=mask, LANES=lanes, S=spike, SV=spike_vector, EXP=exp)
    for name, real, vector, mask, lanes, spike, spike_vector, exp in (
        ("scan_f32", "float", "vf32", "vi32", _LANES[torch.float32], "float", "vf32", "exp_f32"),
        ("scan_f32_u8", "float", "vf32", "vi32", _LANES[torch.float32], "uint8_t", "vu8x8", "exp_f32"),
        ("scan_f64", "double", "vf64", "vi64", _LANES[torch.float64], "double", "vf64", "exp_f64"),
        ("scan_f64_u8", "double", "vf64", "vi64", _LANES[torch.float64], "uint8_t", "vu8x4", "exp_f64")))


def _declare(lib: ctypes.CDLL) -> None:
    for real, name in ((ctypes.c_float, "scan_f32"), (ctypes.c_float, "scan_f32_u8"), (ctypes.c_double, "scan_f64"),
                       (ctypes.c_double, "scan_f64_u8")):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [real] * 6 + [ctypes.c_int] * 8


LIBRARY = CLibrary("lif_cpu", _SOURCE, _declare)
_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def available() -> bool:
    """Whether the fused CPU loop can run (built now if it was not yet)."""
    return LIBRARY.get() is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (None while it is True or not yet tried)."""
    return LIBRARY.unavailable_reason()


def _threads(n: int) -> int:
    return max(1, min(torch.get_num_threads(), n // 4096))


def spike_scan(x: torch.Tensor, state: torch.Tensor, spikes: torch.Tensor, lam, v_threshold: float,
               v_reset: Optional[float], width: float, surrogate: str, decay_input: bool, detach_reset: bool,
               strict: bool, delayed_reset: bool) -> None:
    """Run the spike pass over the steps ``x`` ``[steps, n]`` (contiguous, float32 or float64) from ``state``
    ``[5 or 7, n]`` (x's dtype, contiguous; updated in place), writing ``spikes`` ``[steps, n]`` (x's dtype
    or uint8, contiguous). ``lam``: λ, a Python float or a 0-d tensor (a learned decay), whose 1 − λ is
    rounded as the reference rounds it. See ``lif_math`` for the recurrence and the state's rows."""
    global _pool, _pool_size
    lib = LIBRARY.get()
    steps, n = x.shape
    name = {torch.float32: "scan_f32", torch.float64: "scan_f64"}[x.dtype] + \
        ("_u8" if spikes.dtype == torch.uint8 else "")
    fn = getattr(lib, name)
    one_minus_lam = 1.0 - lam        # in double for a Python λ, in the tensor's dtype for a learned one
    args = (float(lam), float(one_minus_lam), v_threshold, 0.0 if v_reset is None else v_reset, width,
            math.pi / 2.0 * width, int(decay_input), int(v_reset is not None), int(detach_reset),
            SURROGATES.index(surrogate), int(strict), int(delayed_reset), int(state.shape[0] == 7))
    pointers = (x.data_ptr(), spikes.data_ptr(), state.data_ptr(), steps, n)
    threads = _threads(n)
    if threads == 1 or LIBRARY.openmp:
        fn(*pointers, 0, n, *args, threads)
        return
    with _lock:                # a larger pool when more threads are asked for; one in use stays usable
        if _pool_size < threads:
            _pool, _pool_size = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ratebp_lif_cpu"), threads
        pool = _pool
    bounds = [n * i // threads for i in range(threads + 1)]
    unit = _GROUP * _LANES[x.dtype]
    bounds = [b - b % unit if 0 < b < n else b for b in bounds]    # whole groups of vectors per thread
    list(pool.map(lambda i: fn(*pointers, bounds[i], bounds[i + 1], *args, 1), range(threads)))

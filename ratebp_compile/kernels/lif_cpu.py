"""The LIF family's spike pass as one fused CPU loop: C compiled on first use, called through ctypes.

The PyTorch reference (``lif_math``) runs each timestep as a dozen elementwise ops over the whole layer,
each reading and writing it from memory. Here the loop state of a block of 512 elements stays in the
CPU's first-level cache across the T steps: one pass reads the input currents, writes the spikes and
accumulates r and e — the spike pass of ``ratebp::lif_spike_pass`` and ``ratebp::lif_spike_scan`` on CPU
tensors. Threads split the blocks (the calls release the GIL), as many as ``torch.get_num_threads()``.

The arithmetic is the reference's, operation for operation and in its dtype (float32, or float64 for
float64 inputs; half-precision inputs are widened first), compiled without contracting products and
sums into FMAs, so that the compiler vectorises it but rounds as the reference does: spikes, r and the
membrane are bitwise the reference's; the sigmoid surrogate's ``exp`` is a polynomial here (about one
ulp), so ψ, and with it e, may differ in the last bits. The library is built with the system's C
compiler (``cc``, or ``$CC``) into ``$RATEBP_CACHE`` (default ``~/.cache/ratebp_compile``), keyed by the
source's hash and the CPU; without a compiler, or with ``RATEBP_CPU_LOOP=0``, :func:`available` is False
and the ops run the reference.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

__all__ = ["available", "unavailable_reason", "spike_scan", "SURROGATES"]

log = logging.getLogger(__name__)

#: The surrogates by index, as in the Triton kernels.
SURROGATES = ("sigmoid", "atan", "rectangular", "triangle")

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 512

/* e^a in float32 / float64, vectorisable (no library call): a = n·ln2 + f, |f| ≤ ln2/2, e^f by a polynomial
   (Cephes' minimax one in float32, Taylor to degree 13 in float64), 2^n from the exponent bits; about one
   ulp, a clamped to the normal range. */
static inline float exp32(float a) {
    a = a < -87.3f ? -87.3f : a;
    a = a > 88.0f ? 88.0f : a;
    const float n = rintf(a * 1.44269504088896341f);
    const float f = (a - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * f + 1.3981999507E-3f; p = p * f + 8.3334519073E-3f; p = p * f + 4.1665795894E-2f;
    p = p * f + 1.6666665459E-1f; p = p * f + 5.0000001201E-1f;
    p = p * (f * f) + f + 1.0f;
    union { int32_t i; float f; } scale = { .i = ((int32_t)n + 127) << 23 };
    return p * scale.f;
}

static inline double exp64(double a) {
    a = a < -708.0 ? -708.0 : a;
    a = a > 709.0 ? 709.0 : a;
    const double n = rint(a * 1.4426950408889634);
    const double f = (a - n * 6.93145751953125E-1) - n * 1.42860682030941723212E-6;
    double p = 1.0 / 6227020800.0;
    p = p * f + 1.0 / 479001600.0; p = p * f + 1.0 / 39916800.0; p = p * f + 1.0 / 3628800.0;
    p = p * f + 1.0 / 362880.0; p = p * f + 1.0 / 40320.0; p = p * f + 1.0 / 5040.0; p = p * f + 1.0 / 720.0;
    p = p * f + 1.0 / 120.0; p = p * f + 1.0 / 24.0; p = p * f + 1.0 / 6.0; p = p * f + 0.5;
    p = p * (f * f) + f + 1.0;
    union { int64_t i; double f; } scale = { .i = (int64_t)((int32_t)n + 1023) << 52 };
    return p * scale.f;
}

/* One chunk of time for elements [begin, end) of a layer of n: x [steps, n], state rows [5 or 7, n]
   (v, kappa, dv/dh, sum s, sum psi*kappa, then mu, sum psi*mu with the decay tangent), spikes [steps, n].
   Per step and block of elements, three branch-free loops the compiler vectorises: the membrane and the
   spike; psi of the chosen surrogate; the sums, dv/dh and the reset. */
#define SCAN(NAME, REAL, SPIKE, EXP)                                                                         \
void NAME(const REAL *restrict x, SPIKE *restrict spikes, REAL *restrict state, int64_t steps, int64_t n,    \
          int64_t begin, int64_t end,                                                                        \
          REAL lam, REAL one_minus_lam, REAL v_threshold, REAL v_reset, REAL width, REAL half_pi_width,     \
          int decay_input, int hard_reset, int detach_reset, int surrogate, int strict, int delayed_reset,    \
          int tangent) {                                                                                     \
    const REAL k0 = decay_input ? one_minus_lam : (REAL)1.0;                                                 \
    const REAL one = 1, zero = 0, half_width = width / (REAL)2.0;                                           \
    const int delayed_hard = delayed_reset && hard_reset, delayed_soft = delayed_reset && !hard_reset;     \
    REAL *sv = state, *sk = state + n, *sd = state + 2 * n, *sr = state + 3 * n, *se = state + 4 * n;       \
    REAL *sm = state + 5 * n, *sl = state + 6 * n;                                                           \
    for (int64_t b = begin; b < end; b += BLOCK) {                                                           \
        const int64_t m = (end - b < BLOCK) ? end - b : BLOCK;                                               \
        REAL v[BLOCK], kappa[BLOCK], dvdh[BLOCK], r[BLOCK], e[BLOCK], mu[BLOCK], el[BLOCK];                 \
        REAL h[BLOCK], u[BLOCK], s[BLOCK], psi[BLOCK], vin[BLOCK], rsv[BLOCK];                              \
        memcpy(v, sv + b, m * sizeof(REAL)); memcpy(kappa, sk + b, m * sizeof(REAL));                       \
        memcpy(dvdh, sd + b, m * sizeof(REAL)); memcpy(r, sr + b, m * sizeof(REAL));                        \
        memcpy(e, se + b, m * sizeof(REAL));                                                                 \
        if (tangent) { memcpy(mu, sm + b, m * sizeof(REAL)); memcpy(el, sl + b, m * sizeof(REAL)); }        \
        for (int64_t t = 0; t < steps; ++t) {                                                                \
            const REAL *restrict xt = x + t * n + b;                                                         \
            SPIKE *restrict st = spikes + t * n + b;                                                         \
            for (int64_t j = 0; j < m; ++j) {   /* the potential charged from (delayed reset) */              \
                const REAL vj = v[j], ur = vj - v_threshold;                                                 \
                const REAL fr = (strict ? ur > 0 : ur >= 0) ? one : zero;                                    \
                const REAL rs = delayed_reset ? fr : zero;                                                   \
                const REAL v_hard = (one - rs) * vj + rs * v_reset;                                          \
                vin[j] = delayed_hard ? v_hard : vj;                                                         \
                rsv[j] = rs;                                                                                 \
            }                                                                                                \
            for (int64_t j = 0; j < m; ++j) {   /* charge, fire */                                            \
                const REAL c = xt[j], v_in = vin[j];                                                         \
                const REAL h_in = v_in + (c - v_in) * one_minus_lam, h_no = v_in * lam + c;                 \
                const REAL hj = decay_input ? h_in : h_no;                                                   \
                const REAL h_soft = hj - rsv[j] * v_threshold;                                               \
                const REAL hh = delayed_soft ? h_soft : hj;                                                  \
                const REAL uj = hh - v_threshold;                                                            \
                s[j] = (strict ? uj > 0 : uj >= 0) ? one : zero;                                             \
                h[j] = hh; u[j] = uj;                                                                        \
            }                                                                                                \
            for (int64_t j = 0; j < m; ++j)     /* the sensitivity to the input */                            \
                kappa[j] = k0 + lam * dvdh[j] * kappa[j];                                                    \
            if (tangent) {                      /* and to the decay */                                        \
                for (int64_t j = 0; j < m; ++j) {                                                            \
                    const REAL c = xt[j], base_in = vin[j] - c, base = decay_input ? base_in : vin[j];       \
                    mu[j] = base + lam * dvdh[j] * mu[j];                                                    \
                }                                                                                            \
            }                                                                                                \
            if (surrogate == 0) {                                                                            \
                for (int64_t j = 0; j < m; ++j) {                                                            \
                    const REAL sg = one / (one + EXP(-(u[j] * width)));                                      \
                    psi[j] = (one - sg) * sg * width;                                                        \
                }                                                                                            \
            } else if (surrogate == 1) {                                                                     \
                for (int64_t j = 0; j < m; ++j) {                                                            \
                    const REAL a = u[j] * half_pi_width;                                                     \
                    psi[j] = half_width / (one + a * a);                                                     \
                }                                                                                            \
            } else if (surrogate == 2) {                                                                     \
                for (int64_t j = 0; j < m; ++j) {                                                            \
                    const REAL au = u[j] < 0 ? -u[j] : u[j];                                                 \
                    psi[j] = (au < half_width ? one : zero) / width;                                         \
                }                                                                                            \
            } else {                                                                                         \
                for (int64_t j = 0; j < m; ++j) {                                                            \
                    const REAL au = u[j] < 0 ? -u[j] : u[j];                                                 \
                    const REAL tri = one - au / width;                                                       \
                    psi[j] = (tri > 0 ? tri : zero) / width;                                                 \
                }                                                                                            \
            }                                                                                                \
            for (int64_t j = 0; j < m; ++j) {   /* the sums */                                                \
                r[j] += s[j];                                                                                \
                e[j] += psi[j] * kappa[j];                                                                   \
            }                                                                                                \
            if (tangent)                                                                                     \
                for (int64_t j = 0; j < m; ++j)                                                              \
                    el[j] += psi[j] * mu[j];                                                                 \
            for (int64_t j = 0; j < m; ++j) {   /* dv/dh through the reset */                                 \
                const REAL sj = s[j], pj = psi[j];                                                           \
                const REAL hard_det = one - sj, hard_nodet = one - sj - (h[j] - v_reset) * pj;               \
                const REAL soft_nodet = one - v_threshold * pj;                                              \
                const REAL hard = detach_reset ? hard_det : hard_nodet, soft = detach_reset ? one : soft_nodet; \
                dvdh[j] = hard_reset ? hard : soft;                                                          \
            }                                                                                                \
            for (int64_t j = 0; j < m; ++j) {   /* the reset, the spike */                                    \
                const REAL sj = s[j], hj = h[j];                                                             \
                const REAL v_hard = (one - sj) * hj + sj * v_reset, v_soft = hj - sj * v_threshold;          \
                const REAL after = hard_reset ? v_hard : v_soft;                                             \
                v[j] = delayed_reset ? hj : after;                                                           \
                st[j] = (SPIKE)sj;                                                                           \
            }                                                                                                \
        }                                                                                                    \
        memcpy(sv + b, v, m * sizeof(REAL)); memcpy(sk + b, kappa, m * sizeof(REAL));                       \
        memcpy(sd + b, dvdh, m * sizeof(REAL)); memcpy(sr + b, r, m * sizeof(REAL));                        \
        memcpy(se + b, e, m * sizeof(REAL));                                                                 \
        if (tangent) { memcpy(sm + b, mu, m * sizeof(REAL)); memcpy(sl + b, el, m * sizeof(REAL)); }        \
    }                                                                                                        \
}

SCAN(scan_f32, float, float, exp32)
SCAN(scan_f32_u8, float, uint8_t, exp32)
SCAN(scan_f64, double, double, exp64)
SCAN(scan_f64_u8, double, uint8_t, exp64)
"""

# No FMA contraction (the reference's rounding); no trapping math, so that selects may be computed on
# both sides and the loops vectorise (results are unchanged: only floating-point exceptions are ignored).
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared",
          "-std=c11"]

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_reason: Optional[str] = None
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def _cache_dir() -> str:
    return os.environ.get("RATEBP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ratebp_compile")


def _cpu_signature() -> str:
    """What ``-march=native`` compiled for: the machine and its instruction-set flags (Linux), so that a
    cache shared between machines never hands one a library built for another."""
    signature = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            signature += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return signature


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or $CC) on the PATH")
    key = hashlib.sha256((_SOURCE + " ".join(_FLAGS) + compiler + _cpu_signature()).encode()).hexdigest()[:16]
    directory = _cache_dir()
    path = os.path.join(directory, f"lif_cpu_{key}.so")
    if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            src, out = os.path.join(tmp, "lif_cpu.c"), os.path.join(tmp, "lif_cpu.so")
            with open(src, "w") as f:
                f.write(_SOURCE)
            done = subprocess.run([compiler, *_FLAGS, src, "-o", out, "-lm"], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:2000]}")
            os.replace(out, path)            # atomic: a concurrent build leaves one complete library
    lib = ctypes.CDLL(path)
    for real, name in ((ctypes.c_float, "scan_f32"), (ctypes.c_float, "scan_f32_u8"), (ctypes.c_double, "scan_f64"),
                       (ctypes.c_double, "scan_f64_u8")):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [real] * 6 + [ctypes.c_int] * 7
    return lib


def _library() -> Optional[ctypes.CDLL]:
    global _lib, _reason
    if _lib is None and _reason is None:
        with _lock:
            if os.environ.get("RATEBP_CPU_LOOP") == "0":
                _reason = "turned off by RATEBP_CPU_LOOP=0"
            if _lib is None and _reason is None:
                try:
                    _lib = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    _reason = str(e)
                    log.info("ratebp_compile: the fused CPU spike pass is unavailable (%s); the PyTorch "
                             "reference runs instead", _reason)
    return _lib


def available() -> bool:
    """Whether the fused CPU loop can run (built now if it was not yet)."""
    return _library() is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (None while it is True or not yet tried)."""
    _library()
    return _reason


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
    lib = _library()
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
    if threads == 1:
        fn(*pointers, 0, n, *args)
        return
    with _lock:                # a larger pool when more threads are asked for; one in use stays usable
        if _pool_size < threads:
            _pool, _pool_size = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ratebp_lif_cpu"), threads
        pool = _pool
    bounds = [n * i // threads for i in range(threads + 1)]
    bounds = [b - b % 512 if 0 < b < n else b for b in bounds]           # whole blocks per thread
    list(pool.map(lambda i: fn(*pointers, bounds[i], bounds[i + 1], *args), range(threads)))

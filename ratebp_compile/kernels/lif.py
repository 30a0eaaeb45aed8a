"""Fused LIF-family neurons (LIF, IF, ParametricLIF; either tie rule; the reset now or one step later, as
snnTorch's ``Leaky``): the spike pass and a BPTT forward/backward pair.

Every kernel reads the input currents ``[T, N]`` once and keeps the membrane (and, in the spike pass,
κ, the accumulators r and e and, for a learned decay λ = 1 − sigmoid(w), μ = ∂h/∂λ) in registers across
the time loop: the spike pass writes spikes plus r and e ``[N]``, no per-step state (or, run over a
chunk of time, resumes from and saves its loop state ``[5 or 7, N]``); the BPTT forward writes spikes
and the membrane before reset h (float32) — all its backward needs; the backward runs the time loop
in reverse. The dynamics and eligibility are those of ``lif_math`` (its module docstring has the
equations), which is also this file's reference.

This file, in order: Triton kernels; launchers; ``torch.library`` custom ops
(``ratebp::lif_spike_pass``, ``ratebp::lif_spike_scan`` — the same over a chunk of time —,
``ratebp::lif_bptt_forward`` with its autograd, ``ratebp::lif_bptt_backward``); pure-PyTorch references
(the numerical spec, the CPU path, the test oracle); and ``op_arguments``, which reads a neuron op
node's arguments by name. Which neurons run as these ops is ``ratebp_compile.families.lif``'s
decision; this package knows nothing of neuron modules.

On CPU tensors the spike pass runs as one fused C loop (``lif_cpu``, compiled on first use) and the
BPTT pair as the references, as does everything without Triton installed or without a C compiler;
float64 runs the references on GPU; under ``TRITON_INTERPRET=1`` the Triton kernels run on CPU.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import lif_cpu
from . import lif_math as M
from ._triton import AVAILABLE as TRITON_AVAILABLE
from ._triton import tl, triton

__all__ = ["lif_spike_pass", "lif_spike_scan", "lif_bptt_forward", "lif_bptt_backward", "lif_spike_pass_reference",
           "lif_spike_scan_reference", "lif_bptt_forward_reference", "lif_bptt_backward_reference", "lif_spike_pass_cpu",
           "launch_lif_forward", "launch_lif_backward",
           "lif_scan_state", "lif_scan_finish", "op_arguments"]

# The surrogate of a kernel is a compile-time constant: its index here.
SURROGATE_IDS = {name: i for i, name in enumerate(M.SURROGATE_NAMES)}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tuning constants. Not tuned on hardware yet (no GPU measurement so far): 1024 elements per program
# is the usual start for a memory-bound elementwise kernel (4 warps × 8 elements per thread).
BLOCK_SIZE = 1024
NUM_WARPS = 4
# The interpreter runs one Python call per program: bigger blocks, identical results.
INTERPRETER_BLOCK_SIZE = 8192
# Up to this T the time loop is unrolled at compile time (one kernel per T); above, a runtime loop.
MAX_STATIC_T = 16

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# =============================================================================================
# 1. Triton kernels
# =============================================================================================
@triton.jit
def _surrogate_grad(u, width, SURROGATE: tl.constexpr):
    """ψ(u) for u = h − V_th: 0 sigmoid(α = width), 1 atan(α), 2 rectangular(w), 3 triangle(w)."""
    if SURROGATE == 0:
        sg = tl.sigmoid(u * width)
        psi = (1.0 - sg) * sg * width
    elif SURROGATE == 1:
        a = u * (1.5707963267948966 * width)
        psi = (width * 0.5) / (1.0 + a * a)
    elif SURROGATE == 2:
        psi = tl.where(tl.abs(u) < width * 0.5, 1.0 / width, 0.0)
    else:
        psi = tl.maximum(1.0 - tl.abs(u) / width, 0.0) / width
    return psi


@triton.jit
def _program_offsets(N, BLOCK: tl.constexpr):
    """This program's element offsets in a timestep (int64), their mask, and N as int64."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < N, N.to(tl.int64)


@triton.jit
def _decay(DECAY, decay, DECAY_LOGIT: tl.constexpr):
    """λ and dλ/dw: from the logit w at DECAY (λ = 1 − sigmoid(w)), or the constant ``decay``."""
    if DECAY_LOGIT:
        sig = tl.sigmoid(tl.load(DECAY).to(tl.float32))
        lam = 1.0 - sig
        dlam_dw = -sig * (1.0 - sig)
    else:
        lam = decay
        dlam_dw = 0.0
    return lam, dlam_dw


@triton.jit
def _charge(v, c, lam, DECAY_INPUT: tl.constexpr):
    if DECAY_INPUT:
        h = v + (c - v) * (1.0 - lam)
    else:
        h = v * lam + c
    return h


@triton.jit
def _reset(h, s, v_threshold, v_reset, HARD_RESET: tl.constexpr):
    if HARD_RESET:
        v = (1.0 - s) * h + s * v_reset
    else:
        v = h - s * v_threshold
    return v


@triton.jit
def _fire(u, STRICT: tl.constexpr):
    """Θ(u): 1.0 where u ≥ 0 (u > 0 when STRICT)."""
    if STRICT:
        s = (u > 0.0).to(tl.float32)
    else:
        s = (u >= 0.0).to(tl.float32)
    return s


@triton.jit
def _charged_from(v, v_threshold, v_reset, HARD_RESET: tl.constexpr, STRICT: tl.constexpr,
                  DELAYED_RESET: tl.constexpr):
    """v', the potential a step charges from (``lif_math.charged_from``): v reset to v_reset where a delayed
    hard reset acts, else v (a delayed soft reset subtracts after the charge)."""
    v_in = v
    if DELAYED_RESET:
        if HARD_RESET:
            v_in = _reset(v, _fire(v - v_threshold, STRICT), v_threshold, v_reset, HARD_RESET)
    return v_in


@triton.jit
def _dv_dh(h, s, psi, v_threshold, v_reset, HARD_RESET: tl.constexpr, DETACH_RESET: tl.constexpr):
    if HARD_RESET:
        if DETACH_RESET:
            d = 1.0 - s
        else:
            d = 1.0 - s - (h - v_reset) * psi
    else:
        if DETACH_RESET:
            d = tl.full(h.shape, 1.0, tl.float32)
        else:
            d = 1.0 - v_threshold * psi
    return d


@triton.jit
def _forward_step(X, S, H, offs, mask, t_offset, lam, v_threshold, v_reset, width, v, kappa, mu, dvdh, r_sum, e, el,
                  DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr, DETACH_RESET: tl.constexpr,
                  SURROGATE: tl.constexpr, STRICT: tl.constexpr, DELAYED_RESET: tl.constexpr,
                  WRITE_H: tl.constexpr, WRITE_STATS: tl.constexpr, DECAY_TANGENT: tl.constexpr):
    """One timestep of the forward kernel (``lif_math.step``); returns the updated loop state."""
    c = tl.load(X + t_offset + offs, mask=mask, other=0.0).to(tl.float32)
    v_in = _charged_from(v, v_threshold, v_reset, HARD_RESET, STRICT, DELAYED_RESET)
    if WRITE_STATS:
        k0 = (1.0 - lam) if DECAY_INPUT else 1.0
        kappa = k0 + lam * dvdh * kappa
        if DECAY_TANGENT:
            mu = ((v_in - c) if DECAY_INPUT else v_in) + lam * dvdh * mu
    h = _charge(v_in, c, lam, DECAY_INPUT)
    if DELAYED_RESET and not HARD_RESET:
        h = h - _fire(v - v_threshold, STRICT) * v_threshold
    u = h - v_threshold
    s = _fire(u, STRICT)
    if WRITE_STATS:
        psi = _surrogate_grad(u, width, SURROGATE)
        r_sum += s
        e += psi * kappa
        if DECAY_TANGENT:
            el += psi * mu
        dvdh = _dv_dh(h, s, psi, v_threshold, v_reset, HARD_RESET, DETACH_RESET)
    if WRITE_H:
        tl.store(H + t_offset + offs, h, mask=mask)
    tl.store(S + t_offset + offs, s.to(S.dtype.element_ty), mask=mask)
    if DELAYED_RESET:
        v = h
    else:
        v = _reset(h, s, v_threshold, v_reset, HARD_RESET)
    return v, kappa, mu, dvdh, r_sum, e, el


@triton.jit(do_not_specialize=["N", "T"])
def _lif_forward_kernel(
    X,              # in:  [T, N] input currents (fp32/fp16/bf16), contiguous
    DECAY,          # in:  [1] decay logit w, λ = 1 − sigmoid(w), read when DECAY_LOGIT
    S,              # out: [T, N] spikes (X's dtype or uint8)
    H,              # out: [T, N] float32 membrane before reset, written when WRITE_H
    R,              # out: [N] firing rate (X's dtype), written when WRITE_STATS
    E,              # out: [N] eligibility ∂r/∂c, written when WRITE_STATS
    EL,             # out: [N] eligibility ∂r/∂w of the decay logit, written when DECAY_TANGENT
    STATE,          # in/out: [5 or 7, N] float32 loop state v, κ, ∂v/∂h, Σs, Σψκ (, μ, Σψμ) when STATEFUL
    N,              # elements per timestep
    T,              # timesteps (used when T_STATIC == 0)
    decay,          # λ when not DECAY_LOGIT (fp32)
    v_threshold,    # V_th (fp32)
    v_reset,        # hard-reset value (fp32; unused for a soft reset)
    width,          # surrogate width α or w (fp32)
    T_STATIC: tl.constexpr,        # T unrolled at compile time, or 0 for a runtime loop
    DECAY_LOGIT: tl.constexpr, DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr,
    DETACH_RESET: tl.constexpr, SURROGATE: tl.constexpr,
    STRICT: tl.constexpr,          # fire above the threshold only
    DELAYED_RESET: tl.constexpr,   # a spike's reset acts at the next step (the membrane kept is h)
    WRITE_H: tl.constexpr,         # BPTT forward
    WRITE_STATS: tl.constexpr,     # spike pass: r and e
    DECAY_TANGENT: tl.constexpr,   # spike pass of a learned decay: ∂r/∂w too
    STATEFUL: tl.constexpr,        # spike pass over a chunk of time: resume from STATE, save it, no R/E
    BLOCK: tl.constexpr,
):
    offs, mask, n = _program_offsets(N, BLOCK)
    lam, dlam_dw = _decay(DECAY, decay, DECAY_LOGIT)
    if STATEFUL:
        v = tl.load(STATE + offs, mask=mask, other=0.0)
        kappa = tl.load(STATE + n + offs, mask=mask, other=0.0)
        dvdh = tl.load(STATE + 2 * n + offs, mask=mask, other=0.0)
        r = tl.load(STATE + 3 * n + offs, mask=mask, other=0.0)
        e = tl.load(STATE + 4 * n + offs, mask=mask, other=0.0)
        if DECAY_TANGENT:
            mu = tl.load(STATE + 5 * n + offs, mask=mask, other=0.0)
            el = tl.load(STATE + 6 * n + offs, mask=mask, other=0.0)
        else:
            mu = tl.zeros([BLOCK], dtype=tl.float32)
            el = tl.zeros([BLOCK], dtype=tl.float32)
    else:
        v = tl.zeros([BLOCK], dtype=tl.float32)
        kappa = tl.zeros([BLOCK], dtype=tl.float32)
        mu = tl.zeros([BLOCK], dtype=tl.float32)
        dvdh = tl.zeros([BLOCK], dtype=tl.float32)
        r = tl.zeros([BLOCK], dtype=tl.float32)
        e = tl.zeros([BLOCK], dtype=tl.float32)
        el = tl.zeros([BLOCK], dtype=tl.float32)
    if T_STATIC > 0:
        for t in tl.static_range(T_STATIC):
            v, kappa, mu, dvdh, r, e, el = _forward_step(
                X, S, H, offs, mask, t * n, lam, v_threshold, v_reset, width, v, kappa, mu, dvdh, r, e, el,
                DECAY_INPUT, HARD_RESET, DETACH_RESET, SURROGATE, STRICT, DELAYED_RESET, WRITE_H, WRITE_STATS,
                DECAY_TANGENT)
        steps = T_STATIC
    else:
        for t in range(T):
            v, kappa, mu, dvdh, r, e, el = _forward_step(
                X, S, H, offs, mask, t * n, lam, v_threshold, v_reset, width, v, kappa, mu, dvdh, r, e, el,
                DECAY_INPUT, HARD_RESET, DETACH_RESET, SURROGATE, STRICT, DELAYED_RESET, WRITE_H, WRITE_STATS,
                DECAY_TANGENT)
        steps = T
    if STATEFUL:
        tl.store(STATE + offs, v, mask=mask)
        tl.store(STATE + n + offs, kappa, mask=mask)
        tl.store(STATE + 2 * n + offs, dvdh, mask=mask)
        tl.store(STATE + 3 * n + offs, r, mask=mask)
        tl.store(STATE + 4 * n + offs, e, mask=mask)
        if DECAY_TANGENT:
            tl.store(STATE + 5 * n + offs, mu, mask=mask)
            tl.store(STATE + 6 * n + offs, el, mask=mask)
    elif WRITE_STATS:
        inv_t = 1.0 / steps
        tl.store(R + offs, (r * inv_t).to(R.dtype.element_ty), mask=mask)
        tl.store(E + offs, (e * inv_t).to(E.dtype.element_ty), mask=mask)
        if DECAY_TANGENT:
            tl.store(EL + offs, (el * (inv_t * dlam_dw)).to(EL.dtype.element_ty), mask=mask)


@triton.jit
def _backward_step(GS, H, X, GX, offs, mask, t, n, h, lam, v_threshold, v_reset, width, grad_v, glam,
                   DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr, DETACH_RESET: tl.constexpr,
                   SURROGATE: tl.constexpr, STRICT: tl.constexpr, DELAYED_RESET: tl.constexpr,
                   DECAY_GRAD: tl.constexpr):
    """Timestep t of the reverse loop, given h_t; returns (h_{t−1}, grad into v_{t−1}, λ grad)."""
    u = h - v_threshold
    s = _fire(u, STRICT)
    psi = _surrogate_grad(u, width, SURROGATE)
    g_s = tl.load(GS + t * n + offs, mask=mask, other=0.0).to(tl.float32)
    g_h = g_s * psi + grad_v * _dv_dh(h, s, psi, v_threshold, v_reset, HARD_RESET, DETACH_RESET)
    g_x = g_h * (1.0 - lam) if DECAY_INPUT else g_h
    tl.store(GX + t * n + offs, g_x.to(GX.dtype.element_ty), mask=mask)
    # h_{t−1} (zero before the first step: v_{−1} = 0 either way)
    h_prev = tl.load(H + (t - 1) * n + offs, mask=mask & (t > 0), other=0.0)
    if DECAY_GRAD:
        # the potential step t charged from, v'_{t−1}
        if DELAYED_RESET:
            v_prev = _charged_from(h_prev, v_threshold, v_reset, HARD_RESET, STRICT, DELAYED_RESET)
        else:
            s_prev = _fire(h_prev - v_threshold, STRICT)
            v_prev = tl.where(t > 0, _reset(h_prev, s_prev, v_threshold, v_reset, HARD_RESET), 0.0)
        if DECAY_INPUT:
            c = tl.load(X + t * n + offs, mask=mask, other=0.0).to(tl.float32)
            glam += g_h * (v_prev - c)
        else:
            glam += g_h * v_prev
    return h_prev, g_h * lam, glam


@triton.jit(do_not_specialize=["N", "T"])
def _lif_backward_kernel(
    GS,             # in:  [T, N] gradient of the spikes
    H,              # in:  [T, N] float32 membrane before reset, from the forward
    X,              # in:  [T, N] input currents, read when DECAY_GRAD and DECAY_INPUT
    DECAY,          # in:  [1] decay logit w, λ = 1 − sigmoid(w), read when DECAY_LOGIT
    GX,             # out: [T, N] gradient of the input currents (X's dtype)
    GLAM,           # out: [N] float32 per-element gradient of the decay logit, written when DECAY_GRAD
    N,              # elements per timestep
    T,              # timesteps (used when T_STATIC == 0)
    decay,          # λ when not DECAY_LOGIT (fp32)
    v_threshold,    # V_th (fp32)
    v_reset,        # hard-reset value (fp32)
    width,          # surrogate width (fp32)
    T_STATIC: tl.constexpr, DECAY_LOGIT: tl.constexpr, DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr,
    DETACH_RESET: tl.constexpr, SURROGATE: tl.constexpr, STRICT: tl.constexpr, DELAYED_RESET: tl.constexpr,
    DECAY_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, mask, n = _program_offsets(N, BLOCK)
    lam, dlam_dw = _decay(DECAY, decay, DECAY_LOGIT)
    grad_v = tl.zeros([BLOCK], dtype=tl.float32)
    glam = tl.zeros([BLOCK], dtype=tl.float32)
    if T_STATIC > 0:
        h = tl.load(H + (T_STATIC - 1) * n + offs, mask=mask, other=0.0)
        for i in tl.static_range(T_STATIC):
            h, grad_v, glam = _backward_step(
                GS, H, X, GX, offs, mask, T_STATIC - 1 - i, n, h, lam, v_threshold, v_reset, width, grad_v, glam,
                DECAY_INPUT, HARD_RESET, DETACH_RESET, SURROGATE, STRICT, DELAYED_RESET, DECAY_GRAD)
    else:
        h = tl.load(H + (T - 1) * n + offs, mask=mask, other=0.0)
        for i in range(T):
            h, grad_v, glam = _backward_step(
                GS, H, X, GX, offs, mask, T - 1 - i, n, h, lam, v_threshold, v_reset, width, grad_v, glam,
                DECAY_INPUT, HARD_RESET, DETACH_RESET, SURROGATE, STRICT, DELAYED_RESET, DECAY_GRAD)
    if DECAY_GRAD:
        tl.store(GLAM + offs, glam * dlam_dw, mask=mask)


# =============================================================================================
# 2. Launchers
# =============================================================================================
def _grid(n: int, block: int) -> Tuple[int]:
    """One program per ``block`` elements of a timestep."""
    return (triton.cdiv(n, block),)


def _block() -> int:
    return INTERPRETER_BLOCK_SIZE if _INTERPRET else BLOCK_SIZE


def _check_input(name: str, t: torch.Tensor, T: int) -> int:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported (float32, float16, bfloat16)")
    if not t.is_contiguous():
        raise ValueError(f"{name}: the kernel needs a contiguous [T, N] tensor")
    if not (t.is_cuda or _INTERPRET):
        raise ValueError(f"{name}: Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1), got {t.device}")
    if t.dim() < 1 or t.shape[0] != T:
        raise ValueError(f"{name}: expected [T={T}, ...], got {tuple(t.shape)}")
    return t.numel() // max(T, 1)


def _static_T(T: int) -> int:
    return T if T <= MAX_STATIC_T else 0


def launch_lif_forward(x: torch.Tensor, decay: float, decay_logit: Optional[torch.Tensor], v_threshold: float,
                       v_reset: Optional[float], decay_input: bool, detach_reset: bool, surrogate: str, width: float,
                       strict: bool, delayed_reset: bool, *, write_h: bool, write_stats: bool, decay_tangent: bool,
                       spike_dtype: torch.dtype,
                       state: Optional[torch.Tensor] = None):
    """Run the forward kernel on ``x`` ``[T, ...]``; returns (spikes, h or None, r, e, e_λ) with r, e, e_λ
    shaped ``x.shape[1:]`` (None where not written). With ``state`` (the float32 loop state, see
    ``lif_spike_scan``) the spike pass resumes from it and saves it back instead of writing r and e."""
    T = x.shape[0]
    M.check_delayed_reset(delayed_reset, detach_reset)
    N = _check_input("lif forward", x, T)
    stateful = state is not None
    if stateful and (state.dtype != torch.float32 or not state.is_contiguous() or state.numel() != _state_rows(
            decay_tangent) * N):
        raise ValueError(f"lif forward: state must be a contiguous float32 [{_state_rows(decay_tangent)}, N={N}] tensor")
    spikes = torch.empty(x.shape, dtype=spike_dtype, device=x.device)
    h = torch.empty(x.shape, dtype=torch.float32, device=x.device) if write_h else None
    r = x.new_empty(x.shape[1:]) if write_stats and not stateful else None
    e = x.new_empty(x.shape[1:]) if write_stats and not stateful else None
    el = x.new_empty(x.shape[1:]) if decay_tangent and not stateful else None
    if decay_logit is not None:
        decay_logit = decay_logit.detach().reshape(1).to(torch.float32)
    dummy = spikes
    block = _block()
    if N > 0 and T > 0:
        _lif_forward_kernel[_grid(N, block)](
            x, decay_logit if decay_logit is not None else dummy, spikes, h if h is not None else dummy,
            r if r is not None else dummy, e if e is not None else dummy, el if el is not None else dummy,
            state if stateful else dummy, N, T, float(decay), float(v_threshold), float(v_reset or 0.0), float(width),
            T_STATIC=_static_T(T), DECAY_LOGIT=decay_logit is not None, DECAY_INPUT=decay_input,
            HARD_RESET=v_reset is not None, DETACH_RESET=detach_reset, SURROGATE=SURROGATE_IDS[surrogate],
            STRICT=strict, DELAYED_RESET=delayed_reset, WRITE_H=write_h, WRITE_STATS=write_stats,
            DECAY_TANGENT=decay_tangent, STATEFUL=stateful,
            BLOCK=block, num_warps=NUM_WARPS)
    return spikes, h, r, e, el


def launch_lif_backward(grad_spikes: torch.Tensor, h: torch.Tensor, x: Optional[torch.Tensor], decay: float,
                        decay_logit: Optional[torch.Tensor], v_threshold: float, v_reset: Optional[float],
                        decay_input: bool, detach_reset: bool, surrogate: str, width: float, strict: bool,
                        delayed_reset: bool, decay_grad: bool):
    """Run the reverse-time kernel; returns (grad_x like ``grad_spikes``, per-element λ gradient float32 or
    None). ``x`` is read only for the λ gradient with input decay (else it may be None)."""
    T = h.shape[0]
    M.check_delayed_reset(delayed_reset, detach_reset)
    N = _check_input("lif backward", grad_spikes, T)
    if h.dtype != torch.float32 or not h.is_contiguous() or h.shape != grad_spikes.shape:
        raise ValueError("lif backward: h must be the forward's contiguous float32 [T, N] membrane")
    if x is None and decay_grad and decay_input:
        raise ValueError("lif backward: the decay gradient with input decay needs x")
    grad_x = torch.empty_like(grad_spikes)
    glam = torch.empty(h.shape[1:], dtype=torch.float32, device=h.device) if decay_grad else None
    if decay_logit is not None:
        decay_logit = decay_logit.detach().reshape(1).to(torch.float32)
    block = _block()
    if N > 0 and T > 0:
        _lif_backward_kernel[_grid(N, block)](
            grad_spikes, h, x if x is not None else grad_spikes, decay_logit if decay_logit is not None else h, grad_x,
            glam if glam is not None else h, N, T, float(decay), float(v_threshold), float(v_reset or 0.0),
            float(width), T_STATIC=_static_T(T), DECAY_LOGIT=decay_logit is not None, DECAY_INPUT=decay_input,
            HARD_RESET=v_reset is not None, DETACH_RESET=detach_reset, SURROGATE=SURROGATE_IDS[surrogate],
            STRICT=strict, DELAYED_RESET=delayed_reset, DECAY_GRAD=decay_grad, BLOCK=block, num_warps=NUM_WARPS)
    return grad_x, glam


def _use_triton(x: torch.Tensor) -> bool:
    """The Triton kernels for CUDA tensors (any tensor under the interpreter) of a kernel dtype; the
    PyTorch reference otherwise (CPU, float64, or Triton not installed)."""
    return TRITON_AVAILABLE and (x.is_cuda or _INTERPRET) and x.dtype in SUPPORTED_DTYPES


def _use_cpu_loop(x: torch.Tensor) -> bool:
    """The fused C loop for the spike pass on a CPU tensor of a floating dtype, when it could be built."""
    return x.device.type == "cpu" and x.dtype in SUPPORTED_DTYPES + (torch.float64,) and x.numel() > 0 and \
        lif_cpu.available()


def _cpu_scan(x: torch.Tensor, state: torch.Tensor, lam, v_threshold, v_reset, decay_input, detach_reset, surrogate,
              width, strict, delayed_reset, spike_dtype) -> torch.Tensor:
    """``lif_cpu.spike_scan`` on ``x`` ``[n, ...]`` (widened to the state's dtype): the chunk's spikes, in
    ``spike_dtype`` (None: x's)."""
    spike_dtype = spike_dtype or x.dtype
    steps = x.shape[0]
    xs = x.to(state.dtype).reshape(steps, -1).contiguous()
    wide = spike_dtype if spike_dtype == torch.uint8 else state.dtype
    spikes = torch.empty(xs.shape, dtype=wide)
    lif_cpu.spike_scan(xs, state, spikes, lam, v_threshold, v_reset, width, surrogate, decay_input, detach_reset,
                       strict, delayed_reset)
    return spikes.view(x.shape).to(spike_dtype)


def lif_spike_pass_cpu(x, decay, decay_logit, v_threshold, v_reset, decay_input, detach_reset, surrogate, width,
                       strict, delayed_reset, decay_tangent, spike_dtype):
    """The spike pass through the fused C loop, with the reference's outputs: (spikes, r, e, e_w or None)."""
    M.check_delayed_reset(delayed_reset, detach_reset)
    acc = _acc_dtype(x.dtype)
    lam, dlam_dw = _lam(decay, decay_logit, acc)
    state = torch.zeros((_state_rows(decay_tangent), x[0].numel()), dtype=acc)
    spikes = _cpu_scan(x, state, lam, v_threshold, v_reset, decay_input, detach_reset, surrogate, width, strict,
                       delayed_reset, spike_dtype)
    T, shape = x.shape[0], x.shape[1:]
    r, e = ((row / T).to(x.dtype).view(shape) for row in (state[3], state[4]))
    el = ((state[6] / T).to(x.dtype).view(shape) * dlam_dw).to(x.dtype) if decay_tangent else None
    return spikes, r, e, el


# =============================================================================================
# 3. Custom ops
# =============================================================================================
@torch.library.custom_op("ratebp::lif_spike_pass", mutates_args=())
def lif_spike_pass(x: torch.Tensor, decay: float, decay_logit: Optional[torch.Tensor], v_threshold: float,
                   v_reset: Optional[float], decay_input: bool, detach_reset: bool, surrogate: str, width: float,
                   strict: bool, delayed_reset: bool, decay_tangent: bool,
                   uint8_spikes: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spike pass of a LIF-family neuron: ``x`` ``[T, ...]`` → (spikes ``[T, ...]``, r, e, e_w), with r, e, e_w
    shaped ``x.shape[1:]``. λ is 1 − sigmoid(``decay_logit``) if the logit is given (ParametricLIF), else
    ``decay``; e_w = ∂r/∂w is empty unless ``decay_tangent``. Spikes are ``x``'s dtype or uint8. ``strict``:
    fire above the threshold only; ``delayed_reset``: a spike's reset acts at the next step (``lif_math``)."""
    spike_dtype = torch.uint8 if uint8_spikes else x.dtype
    if _use_triton(x):
        spikes, _, r, e, el = launch_lif_forward(
            x.contiguous(), decay, decay_logit, v_threshold, v_reset, decay_input, detach_reset, surrogate, width,
            strict, delayed_reset, write_h=False, write_stats=True, decay_tangent=decay_tangent,
            spike_dtype=spike_dtype)
    else:
        run = lif_spike_pass_cpu if _use_cpu_loop(x) else lif_spike_pass_reference
        spikes, r, e, el = run(x, decay, decay_logit, v_threshold, v_reset, decay_input, detach_reset, surrogate,
                               width, strict, delayed_reset, decay_tangent, spike_dtype)
    return spikes, r, e, el if decay_tangent else x.new_empty((0,))


@lif_spike_pass.register_fake
def _(x, decay, decay_logit, v_threshold, v_reset, decay_input, detach_reset, surrogate, width, strict, delayed_reset,
      decay_tangent, uint8_spikes):
    spikes = torch.empty_like(x, dtype=torch.uint8 if uint8_spikes else x.dtype)
    el = x.new_empty(x.shape[1:] if decay_tangent else (0,))
    return spikes, x.new_empty(x.shape[1:]), x.new_empty(x.shape[1:]), el


def _spike_pass_setup(ctx, inputs, output):
    pass


def _spike_pass_backward(ctx, *grads):
    raise RuntimeError("ratebp::lif_spike_pass is the forward of the spike pass and is not differentiable; "
                       "the rate pass differentiates through r and e instead (ratebp::lif_bptt_forward is the "
                       "differentiable neuron)")


lif_spike_pass.register_autograd(_spike_pass_backward, setup_context=_spike_pass_setup)


def _state_rows(decay_tangent: bool) -> int:
    return 7 if decay_tangent else 5


def lif_scan_state(like: torch.Tensor, decay_tangent: bool) -> torch.Tensor:
    """The zero loop state of ``ratebp::lif_spike_scan`` for steps shaped like ``like``: float32 (float64
    for float64 steps) ``[5, N]`` (v, κ, ∂v/∂h, Σs, Σψκ), ``[7, N]`` with a learned decay (+ μ, Σψμ)."""
    return torch.zeros((_state_rows(decay_tangent), like.numel()), dtype=_acc_dtype(like.dtype), device=like.device)


def lif_scan_finish(state: torch.Tensor, steps: int, decay_logit: Optional[torch.Tensor], shape,
                    dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    """``(r, e)`` (+ e_w = ∂r/∂w for a learned decay) from the state after ``steps`` steps, shaped ``shape``."""
    out = [state[3], state[4]]
    if state.shape[0] == 7:
        out.append(state[6] * _lam(0.0, decay_logit, state.dtype)[1])
    return tuple((t / steps).to(dtype).reshape(shape) for t in out)


@torch.library.custom_op("ratebp::lif_spike_scan", mutates_args=("state",))
def lif_spike_scan(x: torch.Tensor, state: torch.Tensor, decay: float, decay_logit: Optional[torch.Tensor],
                   v_threshold: float, v_reset: Optional[float], decay_input: bool, detach_reset: bool,
                   surrogate: str, width: float, strict: bool, delayed_reset: bool, uint8_spikes: bool) -> torch.Tensor:
    """The spike pass over a chunk of time ``x`` ``[n, ...]``, resumed from ``state`` and saving it back
    (see :func:`lif_scan_state`); returns the chunk's spikes (``x``'s dtype or uint8). Chunk by chunk it
    computes exactly what ``ratebp::lif_spike_pass`` computes at once; :func:`lif_scan_finish` gives r, e."""
    decay_tangent = state.shape[0] == 7
    spike_dtype = torch.uint8 if uint8_spikes else x.dtype
    if _use_triton(x):
        spikes, *_ = launch_lif_forward(
            x.contiguous(), decay, decay_logit, v_threshold, v_reset, decay_input, detach_reset, surrogate, width,
            strict, delayed_reset, write_h=False, write_stats=True, decay_tangent=decay_tangent,
            spike_dtype=spike_dtype, state=state)
        return spikes
    if _use_cpu_loop(x) and state.is_contiguous() and state.dtype == _acc_dtype(x.dtype):
        M.check_delayed_reset(delayed_reset, detach_reset)
        lam, _ = _lam(decay, decay_logit, state.dtype)
        return _cpu_scan(x, state, lam, v_threshold, v_reset, decay_input, detach_reset, surrogate, width, strict,
                         delayed_reset, spike_dtype)
    return lif_spike_scan_reference(x, state, decay, decay_logit, v_threshold, v_reset, decay_input, detach_reset,
                                    surrogate, width, strict, delayed_reset, spike_dtype)


@lif_spike_scan.register_fake
def _(x, state, decay, decay_logit, v_threshold, v_reset, decay_input, detach_reset, surrogate, width, strict,
      delayed_reset, uint8_spikes):
    return torch.empty_like(x, dtype=torch.uint8 if uint8_spikes else x.dtype)


@torch.library.custom_op("ratebp::lif_bptt_forward", mutates_args=())
def lif_bptt_forward(x: torch.Tensor, decay: float, decay_logit: Optional[torch.Tensor], v_threshold: float,
                     v_reset: Optional[float], decay_input: bool, detach_reset: bool, surrogate: str,
                     width: float, strict: bool, delayed_reset: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """BPTT forward: ``x`` ``[T, ...]`` → (spikes like ``x``, h: the membrane before reset in the accumulation
    dtype — float32 for float32/16/bf16 — which is all the backward needs). Differentiable in ``x`` and
    ``decay_logit`` (λ = 1 − sigmoid(decay_logit) when given, else ``decay``)."""
    if _use_triton(x):
        spikes, h, _, _, _ = launch_lif_forward(
            x.contiguous(), decay, decay_logit, v_threshold, v_reset, decay_input, detach_reset, surrogate, width,
            strict, delayed_reset, write_h=True, write_stats=False, decay_tangent=False, spike_dtype=x.dtype)
        return spikes, h
    M.check_delayed_reset(delayed_reset, detach_reset)
    return lif_bptt_forward_reference(x, decay, decay_logit, v_threshold, v_reset, decay_input, strict, delayed_reset)


@lif_bptt_forward.register_fake
def _(x, decay, decay_logit, v_threshold, v_reset, decay_input, detach_reset, surrogate, width, strict, delayed_reset):
    return torch.empty_like(x), torch.empty_like(x, dtype=_acc_dtype(x.dtype))


@torch.library.custom_op("ratebp::lif_bptt_backward", mutates_args=())
def lif_bptt_backward(grad_spikes: torch.Tensor, h: torch.Tensor, x: Optional[torch.Tensor], decay: float,
                      decay_logit: Optional[torch.Tensor], v_threshold: float, v_reset: Optional[float],
                      decay_input: bool, detach_reset: bool, surrogate: str, width: float, strict: bool,
                      delayed_reset: bool, decay_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """BPTT backward: (grad of x, grad of the decay logit — a 0-dim tensor of h's dtype, or empty unless
    ``decay_grad``) from the spikes' gradient and the forward's h. The input ``x`` is needed only for the
    decay gradient with input decay; otherwise it may be None."""
    if _use_triton(grad_spikes):
        grad_x, glam = launch_lif_backward(
            grad_spikes.contiguous(), h.contiguous(), x.contiguous() if x is not None else None, decay, decay_logit,
            v_threshold, v_reset, decay_input, detach_reset, surrogate, width, strict, delayed_reset, decay_grad)
        return grad_x, glam.sum() if decay_grad else h.new_empty((0,))
    grad_x, glam = lif_bptt_backward_reference(grad_spikes, h, x, decay, decay_logit, v_threshold, v_reset,
                                               decay_input, detach_reset, surrogate, width, strict, delayed_reset,
                                               decay_grad)
    return grad_x, glam if decay_grad else h.new_empty((0,))


@lif_bptt_backward.register_fake
def _(grad_spikes, h, x, decay, decay_logit, v_threshold, v_reset, decay_input, detach_reset, surrogate, width,
      strict, delayed_reset, decay_grad):
    return torch.empty_like(grad_spikes), h.new_empty(() if decay_grad else (0,))


def _bptt_setup(ctx, inputs, output):
    x, decay, decay_logit, v_threshold, v_reset, decay_input, detach_reset, surrogate, width, strict, delayed_reset = \
        inputs
    ctx.args = dict(decay=decay, v_threshold=v_threshold, v_reset=v_reset, decay_input=decay_input,
                    detach_reset=detach_reset, surrogate=surrogate, width=width, strict=strict,
                    delayed_reset=delayed_reset)
    ctx.decay_grad = decay_logit is not None and decay_logit.requires_grad
    # x is needed only for the λ gradient with input decay; the h output always.
    keep_x = ctx.decay_grad and decay_input
    ctx.save_for_backward(output[1], x if keep_x else None, decay_logit)


def _bptt_backward(ctx, grad_spikes, grad_h):
    h, x, decay_logit = ctx.saved_tensors
    args = dict(ctx.args, decay_logit=decay_logit)
    grad_x, grad_decay = lif_bptt_backward(grad_spikes.contiguous(), h, x, decay_grad=ctx.decay_grad, **args)
    grad_logit = grad_decay.reshape(decay_logit.shape).to(decay_logit.dtype) if ctx.decay_grad else None
    return grad_x, None, grad_logit, None, None, None, None, None, None, None, None


lif_bptt_forward.register_autograd(_bptt_backward, setup_context=_bptt_setup)


# =============================================================================================
# 4. References (pure PyTorch): the numerical spec, the CPU path, the test oracle
# =============================================================================================
def _lam(decay: float, decay_logit: Optional[torch.Tensor], dtype: torch.dtype = torch.float32):
    """(λ, dλ/dw): from the logit (λ = 1 − sigmoid(w)) or the constant ``decay`` (dλ/dw unused)."""
    if decay_logit is None:
        return decay, 0.0
    return M.decay_from_logit(decay_logit.detach().to(dtype).reshape(()))


def lif_spike_pass_reference(x, decay, decay_logit, v_threshold, v_reset, decay_input, detach_reset, surrogate,
                             width, strict, delayed_reset, decay_tangent, spike_dtype=None):
    """``lif_math.lif_spike_pass`` (closed-form eligibility) in this op's signature."""
    lam, dlam_dw = _lam(decay, decay_logit, _acc_dtype(x.dtype))
    out = M.lif_spike_pass(x, lam, decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset,
                           detach_reset=detach_reset, surrogate=surrogate, width=width, strict=strict,
                           delayed_reset=delayed_reset, decay_tangent=decay_tangent, spike_dtype=spike_dtype)
    if not decay_tangent:
        return out + (None,)
    spikes, r, e, e_lam = out
    return spikes, r, e, (e_lam * dlam_dw).to(e_lam.dtype)


@torch.no_grad()
def lif_spike_scan_reference(x, state, decay, decay_logit, v_threshold, v_reset, decay_input, detach_reset,
                             surrogate, width, strict, delayed_reset, spike_dtype):
    """``lif_math.lif_spike_scan`` on the op's state rows (updated in place)."""
    lam, _ = _lam(decay, decay_logit, _acc_dtype(x.dtype))
    rows = [row.view(x.shape[1:]) for row in state]
    tangent = len(rows) == 7
    scan = M.LIFScan(v=rows[0], kappa=rows[1], dvdh=rows[2], r=rows[3], e=rows[4],
                     mu=rows[5] if tangent else 0.0, e_lam=rows[6] if tangent else None)
    spikes, scan = M.lif_spike_scan(x, scan, lam, decay_input=decay_input, v_threshold=v_threshold,
                                    v_reset=v_reset, detach_reset=detach_reset, surrogate=surrogate, width=width,
                                    strict=strict, delayed_reset=delayed_reset, spike_dtype=spike_dtype)
    carried = [(rows[0], scan.v), (rows[1], scan.kappa), (rows[2], scan.dvdh)]
    if tangent:
        carried.append((rows[5], scan.mu))
    for row, value in carried:          # the scan rebinds these (r, e, Σψμ it updates in place)
        if isinstance(value, torch.Tensor):
            row.copy_(value)
        else:
            row.fill_(value)
    return spikes


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs (the references accept those too)."""
    return torch.promote_types(dtype, torch.float32)


@torch.no_grad()
def lif_bptt_forward_reference(x, decay, decay_logit, v_threshold, v_reset, decay_input, strict=False,
                               delayed_reset=False):
    """Spikes and the membrane before reset h_t (float32, or float64 for float64 input), step by step."""
    acc = _acc_dtype(x.dtype)
    lam, _ = _lam(decay, decay_logit, acc)
    v = torch.zeros(x.shape[1:], dtype=acc, device=x.device)
    spikes, hs = torch.empty_like(x), torch.empty(x.shape, dtype=acc, device=x.device)
    for t in range(x.shape[0]):
        _, h, s, v = M.step(v, x[t].to(acc), lam, decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset,
                            strict=strict, delayed_reset=delayed_reset)
        hs[t], spikes[t] = h, s
    return spikes, hs


@torch.no_grad()
def lif_bptt_backward_reference(grad_spikes, h, x, decay, decay_logit, v_threshold, v_reset, decay_input,
                                detach_reset, surrogate, width, strict, delayed_reset, decay_grad):
    """The reverse-time loop: δh_t = g_t·ψ_t + δv_t·∂v_t/∂h_t, δv_{t−1} = λ·δh_t, δc_t = δh_t (·(1 − λ) with
    input decay), δλ = Σ_t δh_t·∂h_t/∂λ with ∂h_t/∂λ = v'_{t−1} (− c_t with input decay), δw = δλ·dλ/dw."""
    acc = h.dtype
    lam, dlam_dw = _lam(decay, decay_logit, acc)
    grad_x = torch.empty_like(grad_spikes)
    grad_v = torch.zeros(h.shape[1:], dtype=acc, device=h.device)
    glam = torch.zeros((), dtype=acc, device=h.device)
    for t in reversed(range(h.shape[0])):
        u = h[t] - v_threshold
        s = M.fire(u, strict)
        psi = M.surrogate_grad(surrogate, width, u)
        g_h = grad_spikes[t].to(acc) * psi + grad_v * M.dv_dh(h[t], s, psi, v_threshold, v_reset, detach_reset)
        grad_x[t] = g_h * (1.0 - lam) if decay_input else g_h
        if decay_grad:
            kept = torch.zeros_like(g_h)            # the membrane kept after step t − 1
            if t > 0:
                kept = h[t - 1] if delayed_reset else M.reset(h[t - 1], M.fire(h[t - 1] - v_threshold, strict),
                                                              v_threshold, v_reset)
            v_prev, _ = M.charged_from(kept, v_threshold, v_reset, strict, delayed_reset)
            glam += (g_h * ((v_prev - x[t].to(acc)) if decay_input else v_prev)).sum()
        grad_v = g_h * lam
    return grad_x, glam * dlam_dw


# =============================================================================================
# 5. Reading a neuron op node
# =============================================================================================
def op_arguments(node) -> dict:
    """The arguments of a neuron op node (``ratebp::lif_bptt_forward`` or ``ratebp::lif_cell_step``) by name,
    defaults filled in."""
    packet = node.target if hasattr(node.target, "default") else node.target._overloadpacket
    schema = packet.default._schema
    args = dict(zip([a.name for a in schema.arguments], node.args))
    args.update(node.kwargs)
    for a in schema.arguments:
        if a.has_default_value():
            args.setdefault(a.name, a.default_value)
    return args


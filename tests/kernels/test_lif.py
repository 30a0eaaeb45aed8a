"""Fused LIF kernels against their PyTorch references: every neuron x reset x detach x surrogate, input
decay, the strict tie rule and the delayed reset, odd sizes, T = 1 and T above the unrolled range,
float32/16/bf16, non-contiguous inputs, exact ties.

Without a GPU these run the Triton kernels in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); with one, the compiled kernels on CUDA tensors."""
import itertools

import pytest
import torch

from ratebp_compile import kernels
from ratebp_compile.kernels import lif as K
from ratebp_compile.families import LIFDynamics
from ratebp_compile.nn.surrogate import SURROGATES
from tests.conftest import TOLERANCES

pytestmark = pytest.mark.skipif(not kernels.triton_available(), reason=f"Triton unavailable: {kernels.UNAVAILABLE_REASON}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (neuron, decay or decay logit, learned): IF is λ = 1; ParametricLIF reads the logit w of
# λ = 1 − sigmoid(w) from a tensor and wants ∂r/∂w.
NEURONS = [("lif", 0.3, False), ("if", 1.0, False), ("plif", 0.2, True)]
RESETS = [None, 0.0, -0.3]
# (strict, delayed_reset): fire above the threshold only; a spike's reset acting one step later (detached)
PLAIN = (False, False)
VARIANTS = [(True, False), (False, True), (True, True)]
CASES = [c + (PLAIN,) for c in itertools.product(NEURONS, RESETS, [True, False], sorted(K.SURROGATE_IDS),
                                                 [False, True])]
VARIANT_CASES = list(itertools.product(NEURONS, [None, 0.0], [True], ["atan"], [False, True], VARIANTS))


def _ids(case):
    (kind, _, _), v_reset, detach, sg, decay_input, (strict, delayed) = case
    return f"{kind}-{'soft' if v_reset is None else f'hard{v_reset}'}-{'det' if detach else 'nodet'}-{sg}-" \
           f"{'din' if decay_input else 'nodin'}" + ("-strict" if strict else "") + ("-delayed" if delayed else "")


def _args(case, device=DEVICE):
    (kind, decay, learned), v_reset, detach, sg, decay_input, (strict, delayed) = case
    decay_logit = torch.tensor(decay, device=device) if learned else None
    width = {"sigmoid": 4.0, "atan": 2.0, "rectangular": 0.8, "triangle": 1.2}[sg]
    return dict(decay=float("nan") if learned else decay, decay_logit=decay_logit, v_threshold=0.9, v_reset=v_reset,
                decay_input=decay_input and kind != "if", detach_reset=detach, surrogate=sg, width=width,
                strict=strict, delayed_reset=delayed)


def _close(actual, expected, dtype, what):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=what)


def _input(T, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((T,) + shape, generator=g) * 0.8 + 0.6).to(dtype).to(DEVICE)


@pytest.mark.parametrize("case", CASES + VARIANT_CASES, ids=[_ids(c) for c in CASES + VARIANT_CASES])
def test_spike_pass_kernel_equals_reference(case):
    args = _args(case)
    tangent = args["decay_logit"] is not None
    x = _input(5, (3, 37), torch.float32)
    spikes, r, e, el = torch.ops.ratebp.lif_spike_pass(x, **args, decay_tangent=tangent, uint8_spikes=False)
    ref = K.lif_spike_pass_reference(x.cpu(), **{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in args.items()},
                                     decay_tangent=tangent)
    assert torch.equal(spikes.cpu(), ref[0])
    _close(r.cpu(), ref[1], torch.float32, "r")
    _close(e.cpu(), ref[2], torch.float32, "e")
    if tangent:
        _close(el.cpu(), ref[3], torch.float32, "e_w")
    else:
        assert el.numel() == 0


@pytest.mark.parametrize("T,shape", [(1, (5,)), (3, (1,)), (4, (1023,)), (K.MAX_STATIC_T + 3, (2, 17))],
                         ids=["T1", "N1", "odd-N", "runtime-loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_spike_pass_sizes_and_dtypes(T, shape, dtype):
    case = (NEURONS[2], 0.0, False, "sigmoid", True, PLAIN)
    args = _args(case)
    x = _input(T, shape, dtype, seed=T)
    spikes, r, e, el = torch.ops.ratebp.lif_spike_pass(x, **args, decay_tangent=True, uint8_spikes=True)
    ref = K.lif_spike_pass_reference(x.cpu(), **{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in args.items()},
                                     decay_tangent=True)
    assert spikes.dtype == torch.uint8 and r.dtype == dtype
    assert torch.equal(spikes.cpu(), ref[0].to(torch.uint8))
    for name, ours, theirs in zip(("r", "e", "e_w"), (r, e, el), ref[1:]):
        _close(ours.cpu(), theirs, dtype, name)


def _scan(x, args, bounds, uint8=True):
    """``ratebp::lif_spike_scan`` over the chunks ``bounds`` of ``x``; returns (spikes, state)."""
    state = K.lif_scan_state(x[0], args["decay_logit"] is not None)
    chunks = [torch.ops.ratebp.lif_spike_scan(x[a:a + n], state, **args, uint8_spikes=uint8) for a, n in bounds]
    return torch.cat(chunks), state


SOME_CASES = CASES[::5] + VARIANT_CASES[1::2]


@pytest.mark.parametrize("case", SOME_CASES, ids=[_ids(c) for c in SOME_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_scan_over_chunks_equals_the_spike_pass(case, dtype):
    """Chunk by chunk, the resumable scan gives the whole spike pass's spikes, r, e and e_w."""
    args = _args(case)
    tangent = args["decay_logit"] is not None
    x = _input(7, (3, 37), dtype)
    spikes, r, e, el = torch.ops.ratebp.lif_spike_pass(x, **args, decay_tangent=tangent, uint8_spikes=True)
    chunked, state = _scan(x, args, [(0, 3), (3, 1), (4, 3)])
    assert chunked.dtype == torch.uint8 and torch.equal(chunked, spikes)
    assert state.shape == ((7 if tangent else 5), 3 * 37) and state.dtype == torch.float32
    stats = K.lif_scan_finish(state, 7, args["decay_logit"], r.shape, dtype)
    for name, ours, theirs in zip(("r", "e", "e_w"), stats, (r, e, el)):
        assert ours.dtype == theirs.dtype
        _close(ours.cpu(), theirs.cpu(), dtype, name)


def test_scan_over_chunks_keeps_float64():
    """In float64 the resumed scan finishes ∂r/∂w in float64 too (dλ/dw included)."""
    args = _args((NEURONS[2], 0.0, False, "sigmoid", True, PLAIN))
    args["decay_logit"] = torch.tensor(-0.83, dtype=torch.float64)      # σ(w)(1 − σ(w)) not exact in float32
    x = _input(7, (3, 5), torch.float64)
    _, r, e, el = torch.ops.ratebp.lif_spike_pass(x, **args, decay_tangent=True, uint8_spikes=True)
    _, state = _scan(x, args, [(0, 3), (3, 4)])
    assert state.dtype == torch.float64
    for name, ours, theirs in zip(("r", "e", "e_w"), K.lif_scan_finish(state, 7, args["decay_logit"], r.shape,
                                                                       torch.float64), (r, e, el)):
        torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-15, msg=name)


def test_scan_kernel_equals_its_reference():
    args = _args((NEURONS[2], 0.0, True, "triangle", True, (True, True)))
    x = _input(K.MAX_STATIC_T + 2, (2, 11), torch.float32)
    spikes, state = _scan(x, args, [(0, 9), (9, 9)], uint8=False)
    ref_state = K.lif_scan_state(x[0].cpu(), True)
    cpu_args = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in args.items()}
    ref = torch.cat([K.lif_spike_scan_reference(x[a:a + 9].cpu(), ref_state, **cpu_args, spike_dtype=torch.float32)
                     for a in (0, 9)])
    assert spikes.dtype == torch.float32 and torch.equal(spikes.cpu(), ref)
    torch.testing.assert_close(state.cpu(), ref_state, rtol=1e-5, atol=1e-6)


def test_non_contiguous_input():
    args = _args((NEURONS[0], None, True, "atan", False, PLAIN))
    x = _input(6, (10, 9), torch.float32).transpose(1, 2)          # [T, 9, 10], not contiguous
    assert not x.is_contiguous()
    out = torch.ops.ratebp.lif_spike_pass(x, **args, decay_tangent=False, uint8_spikes=False)
    ref = torch.ops.ratebp.lif_spike_pass(x.contiguous(), **args, decay_tangent=False, uint8_spikes=False)
    for a, b in zip(out[:3], ref[:3]):
        assert torch.equal(a, b)
    grad = torch.randn_like(x)
    spikes, h = torch.ops.ratebp.lif_bptt_forward(x, **args)
    assert torch.equal(spikes, ref[0])
    gx, _ = torch.ops.ratebp.lif_bptt_backward(grad, h, x, **args, decay_grad=False)
    gx_ref, _ = torch.ops.ratebp.lif_bptt_backward(grad.contiguous(), h, x.contiguous(), **args, decay_grad=False)
    assert torch.equal(gx, gx_ref)
    gx_without_x, _ = torch.ops.ratebp.lif_bptt_backward(grad, h, None, **args, decay_grad=False)
    assert torch.equal(gx_without_x, gx_ref)          # x is read only for the decay gradient with input decay


def _autograd_bptt(x, args):
    """Gradients of the BPTT step by autograd through the unrolled PyTorch neuron (the oracle); returns
    (x, the decay logit or None, spikes)."""
    x = x.detach().clone().requires_grad_()
    w = args["decay_logit"].detach().clone().requires_grad_() if args["decay_logit"] is not None else None
    dyn = LIFDynamics(decay=None if w is not None else args["decay"], decay_input=args["decay_input"],
                      v_threshold=args["v_threshold"], v_reset=args["v_reset"], detach_reset=args["detach_reset"],
                      surrogate=SURROGATES[args["surrogate"]](args["width"]), strict=args["strict"],
                      delayed_reset=args["delayed_reset"])
    spikes = dyn.multistep(x, (w,) if w is not None else ())
    return x, w, spikes


@pytest.mark.parametrize("case", CASES + VARIANT_CASES, ids=[_ids(c) for c in CASES + VARIANT_CASES])
def test_bptt_pair_equals_autograd(case):
    args = _args(case)
    T = 4 if case[1] is None else K.MAX_STATIC_T + 2      # hard resets also exercise the runtime loop
    x = _input(T, (2, 29), torch.float32)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    xr, lam_r, spikes_r = _autograd_bptt(x, args)
    spikes_r.backward(grad)

    xk = x.clone().requires_grad_()
    learned = args["decay_logit"].clone().requires_grad_() if args["decay_logit"] is not None else None
    spikes, h = torch.ops.ratebp.lif_bptt_forward(xk, **{**args, "decay_logit": learned})
    assert torch.equal(spikes, spikes_r.detach())
    assert h.dtype == torch.float32
    spikes.backward(grad)
    _close(xk.grad, xr.grad, torch.float32, "grad x")
    if learned is not None:
        _close(learned.grad, lam_r.grad, torch.float32, "grad decay logit")


@pytest.mark.parametrize("case", SOME_CASES, ids=[_ids(c) for c in SOME_CASES])
def test_reference_backward_equals_autograd_in_float64(case):
    args = {**_args(case, "cpu")}
    x = (torch.randn(6, 40, dtype=torch.float64) + 0.6)
    if args["decay_logit"] is not None:
        args["decay_logit"] = args["decay_logit"].double()
    grad = torch.randn_like(x)
    xr, lam_r, spikes_r = _autograd_bptt(x, args)
    spikes_r.backward(grad)
    spikes, h = K.lif_bptt_forward_reference(x, args["decay"], args["decay_logit"], args["v_threshold"],
                                             args["v_reset"], args["decay_input"], args["strict"],
                                             args["delayed_reset"])
    assert torch.equal(spikes, spikes_r.detach())
    gx, glam = K.lif_bptt_backward_reference(grad, h, x, decay_grad=args["decay_logit"] is not None, **args)
    torch.testing.assert_close(gx, xr.grad, rtol=TOLERANCES[torch.float64][0], atol=TOLERANCES[torch.float64][1])
    if lam_r is not None:
        torch.testing.assert_close(glam, lam_r.grad, rtol=TOLERANCES[torch.float64][0],
                                   atol=TOLERANCES[torch.float64][1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bptt_half_precision(dtype):
    args = _args((NEURONS[2], 0.0, False, "triangle", True, PLAIN))
    x32 = _input(5, (3, 31), torch.float32)
    x = x32.to(dtype).requires_grad_()
    learned = args["decay_logit"].clone().requires_grad_()
    spikes, _ = torch.ops.ratebp.lif_bptt_forward(x, **{**args, "decay_logit": learned})
    assert spikes.dtype == dtype
    grad = torch.randn(x.shape).to(DEVICE)
    spikes.backward(grad.to(dtype))
    xr, lam_r, spikes_r = _autograd_bptt(x.detach().float(), args)
    spikes_r.backward(grad.to(dtype).float())
    assert torch.equal(spikes.float(), spikes_r.detach())
    _close(x.grad, xr.grad, dtype, "grad x")
    _close(learned.grad, lam_r.grad, dtype, "grad decay logit")


def test_spike_pass_is_not_differentiable():
    x = _input(3, (4,), torch.float32).requires_grad_()
    spikes, r, e, _ = torch.ops.ratebp.lif_spike_pass(x, 0.5, None, 1.0, None, False, True, "sigmoid", 4.0, False,
                                                      False, False, False)
    with pytest.raises(RuntimeError, match="not differentiable"):
        r.sum().backward()


def test_launchers_validate_inputs():
    x = _input(2, (3,), torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        K.launch_lif_forward(x.double(), 0.5, None, 1.0, None, False, True, "sigmoid", 4.0, False, False,
                             write_h=False, write_stats=True, decay_tangent=False, spike_dtype=torch.float64)
    with pytest.raises(ValueError, match="contiguous"):
        K.launch_lif_forward(x.t(), 0.5, None, 1.0, None, False, True, "sigmoid", 4.0, False, False,
                             write_h=False, write_stats=True, decay_tangent=False, spike_dtype=torch.float32)
    with pytest.raises(ValueError, match="delayed reset is detached"):
        K.launch_lif_forward(x, 0.5, None, 1.0, None, False, False, "sigmoid", 4.0, False, True, write_h=False,
                             write_stats=True, decay_tangent=False, spike_dtype=torch.float32)


@pytest.mark.parametrize("delayed", [False, True], ids=["reset-now", "reset-delayed"])
def test_ties_follow_the_rule(delayed):
    """Inputs on a 1/8 grid with λ = 0.5 and V_th = 1 keep every membrane exact, and many land on the
    threshold: ``strict`` neurons do not fire there, the others do, in the kernels as in the reference."""
    x = (torch.randint(0, 12, (8, 4, 33), generator=torch.Generator().manual_seed(3)) / 8.0).to(DEVICE)
    common = dict(decay=0.5, decay_logit=None, v_threshold=1.0, v_reset=None, decay_input=False, detach_reset=True,
                  surrogate="atan", width=2.0, delayed_reset=delayed)
    _, h = K.lif_bptt_forward_reference(x.cpu(), 0.5, None, 1.0, None, False, False, delayed)
    assert (h == 1.0).sum() > 20                     # the input does produce ties
    spikes = {}
    for strict in (False, True):
        ref, _ = K.lif_bptt_forward_reference(x.cpu(), 0.5, None, 1.0, None, False, strict, delayed)
        spikes[strict], _ = torch.ops.ratebp.lif_bptt_forward(x, **common, strict=strict)
        passed, *_ = torch.ops.ratebp.lif_spike_pass(x, **common, strict=strict, decay_tangent=False,
                                                     uint8_spikes=False)
        assert torch.equal(spikes[strict].cpu(), ref) and torch.equal(passed.cpu(), ref)
    assert spikes[False].sum() > spikes[True].sum()

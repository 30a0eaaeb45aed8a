"""The fused CPU spike pass (``kernels.lif_cpu``) against the PyTorch reference it replaces on CPU: every
neuron × reset × detach × surrogate × input decay, the strict tie rule and the delayed reset; float32 and
float64 (spikes, r and the loop state bitwise; e within the last bit of ψ), half precision, uint8 spikes,
chunks of time resumed from the state, several threads (OpenMP or a thread pool) and one OpenMP
runtime, and the ops taking this path on CPU."""
import ast
import os
import subprocess
import sys

import pytest
import torch

from ratebp_compile.kernels import lif as K
from ratebp_compile.kernels import lif_cpu
from tests.kernels.test_lif import CASES, VARIANT_CASES, _args, _ids

pytestmark = pytest.mark.skipif(not lif_cpu.available(), reason=f"no C compiler: {lif_cpu.unavailable_reason()}")


def _cpu_args(case, dtype):
    args = _args(case, device="cpu")
    if args["decay_logit"] is not None:
        args["decay_logit"] = args["decay_logit"].to(dtype)
    return args


def _x(T, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((T,) + shape, generator=g, dtype=torch.float64) * 0.8 + 0.6).to(dtype)


def _assert_matches(ours, ref, dtype):
    spikes, r, e, el = ours
    assert torch.equal(spikes, ref[0])
    assert torch.equal(r, ref[1])                  # sums of 0/1 over T, divided by T: exact
    rtol = 4 * torch.finfo(dtype).eps              # ψ through the C library's exp: the last bit or two
    torch.testing.assert_close(e, ref[2], rtol=rtol, atol=rtol)
    if el is not None:
        torch.testing.assert_close(el, ref[3], rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES + VARIANT_CASES, ids=[_ids(c) for c in CASES + VARIANT_CASES])
def test_equals_the_reference_for_every_neuron_setting(case, dtype):
    args = _cpu_args(case, dtype)
    tangent = args["decay_logit"] is not None
    x = _x(19, (3, 301), dtype)      # steps in tiles of 8, 8 and 3; elements in blocks of 384, 384 and 135
    ref = K.lif_spike_pass_reference(x, **args, decay_tangent=tangent)
    ours = K.lif_spike_pass_cpu(x, **args, decay_tangent=tangent, spike_dtype=None)
    _assert_matches(ours, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_and_uint8_spikes(dtype):
    case = CASES[-1]
    args = _cpu_args(case, torch.float32)
    x = _x(6, (4, 50), dtype)
    ref = K.lif_spike_pass_reference(x, **args, decay_tangent=True, spike_dtype=torch.uint8)
    ours = K.lif_spike_pass_cpu(x, **args, decay_tangent=True, spike_dtype=torch.uint8)
    assert ours[0].dtype == torch.uint8 and ours[1].dtype == dtype
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    for a, b in zip(ours[2:], ref[2:]):
        torch.testing.assert_close(a, b)
    spikes = K.lif_spike_pass_cpu(x, **args, decay_tangent=True, spike_dtype=None)[0]    # x's dtype, as the reference
    assert spikes.dtype == dtype and torch.equal(spikes, K.lif_spike_pass_reference(x, **args, decay_tangent=True)[0])


@pytest.mark.parametrize("case", [CASES[0], CASES[-1], VARIANT_CASES[-1]], ids=lambda c: _ids(c))
def test_chunks_resumed_from_the_state_equal_the_whole_pass(case):
    """``ratebp::lif_spike_scan`` on CPU: chunk by chunk, the state carried between calls, the same spikes,
    r and e as the whole spike pass; the state rows equal the reference scan's."""
    args = _cpu_args(case, torch.float32)
    tangent = args["decay_logit"] is not None
    x = _x(11, (2, 3, 40), torch.float32, seed=3)
    whole = K.lif_spike_pass_reference(x, **args, decay_tangent=tangent)
    ours_state, ref_state = K.lif_scan_state(x[0], tangent), K.lif_scan_state(x[0], tangent)
    chunks, ref_chunks = [], []
    for start, length in [(0, 4), (4, 4), (8, 3)]:
        part = x[start:start + length]
        chunks.append(torch.ops.ratebp.lif_spike_scan(part, ours_state, **args, uint8_spikes=True))
        ref_chunks.append(K.lif_spike_scan_reference(part, ref_state, **args, spike_dtype=torch.uint8))
    assert torch.equal(torch.cat(chunks), whole[0].to(torch.uint8))
    assert torch.equal(torch.cat(chunks), torch.cat(ref_chunks))
    assert torch.equal(ours_state[:4], ref_state[:4])            # v, κ, ∂v/∂h, Σs bitwise
    torch.testing.assert_close(ours_state, ref_state, rtol=1e-6, atol=1e-6)
    r, e, *el = K.lif_scan_finish(ours_state, 11, args["decay_logit"], x.shape[1:], x.dtype)
    assert torch.equal(r, whole[1])
    torch.testing.assert_close(e, whole[2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "thread-pool"])
def test_several_threads_split_the_elements_alike(openmp, monkeypatch):
    """Split over threads (on PyTorch's OpenMP threads, or a Python pool where the library has no OpenMP),
    with a length that leaves a partial vector: the same outputs as one thread."""
    if openmp and not lif_cpu.LIBRARY.openmp:
        pytest.skip("the library was built without OpenMP here")
    monkeypatch.setattr(lif_cpu.LIBRARY, "openmp", openmp)
    args = _cpu_args(CASES[5], torch.float32)
    x = _x(5, (70001,), torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = K.lif_spike_pass_cpu(x, **args, decay_tangent=False, spike_dtype=None)
        torch.set_num_threads(3)
        three = K.lif_spike_pass_cpu(x, **args, decay_tangent=False, spike_dtype=None)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one[:3], three[:3]):
        assert torch.equal(a, b)


def test_openmp_build_joins_the_runtime_torch_loaded():
    """Built with OpenMP, the library binds to the ``libgomp`` PyTorch loaded, not to a second copy whose
    threads would compete with PyTorch's for the cores (in a fresh process: other packages in this one
    may bundle their own copy)."""
    if not lif_cpu.LIBRARY.openmp:
        pytest.skip("the library was built without OpenMP here")
    code = ("import torch\n"
            "from ratebp_compile.kernels import lif_cpu\n"
            "assert lif_cpu.available() and lif_cpu.LIBRARY.openmp\n"
            "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if '/libgomp' in l}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (copy,) = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert copy.startswith(os.path.dirname(torch.__file__))


def test_the_ops_run_it_on_cpu(monkeypatch):
    """On a CPU tensor (Triton's interpreter off) ``ratebp::lif_spike_pass`` takes the C loop, and its input
    is left as it was."""
    monkeypatch.setattr(K, "_INTERPRET", False)
    calls = []
    monkeypatch.setattr(lif_cpu, "spike_scan", lambda *a, **k: calls.append(1) or _real(*a, **k))
    args = _cpu_args(CASES[0], torch.float32)
    x = _x(4, (2, 9), torch.float32)
    x_before = x.clone()
    spikes, r, e, _ = torch.ops.ratebp.lif_spike_pass(x, **args, decay_tangent=False, uint8_spikes=False)
    assert calls == [1]
    assert torch.equal(x, x_before)
    ref = K.lif_spike_pass_reference(x, **args, decay_tangent=False)
    _assert_matches((spikes, r, e, None), ref, torch.float32)


_real = lif_cpu.spike_scan

"""``rc.transform`` (rate-based and BPTT) against the independent reference, on random networks.

Each case builds one network from a drawn :class:`Spec`, runs one training step through
``rc.transform`` and through the reference from the same parameters, input and loss (a fixed random
linear functional of the outputs), and compares outputs, loss, every parameter gradient and the
BatchNorm buffers after the step; the input must be bitwise unchanged. A case that differs in
float32 is run again in float64, where both sides must agree to about 1e-9: then the float32 difference
was rounding — a "tie" when a membrane came within :data:`TIE_MARGIN` of the threshold (or of a
rectangular surrogate's edge), so that rounding could flip a spike, else accumulated rounding
("rounding"). A difference that persists in float64 is a real mismatch.

Every drawn case runs (none is shrunk away): mismatches are collected and reported together at the
end of each test, and the tally of all cases is printed in the terminal summary. Discrepancies this
suite found in the library are kept as minimal regression tests below.

``RATEBP_DIFFERENTIAL_PROFILE=differential-thorough`` draws many more cases.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Tuple

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import ratebp_compile as rc
from tests.conftest import FIXTURE_ATOL, FIXTURE_RTOL, reference_files

from .generator import SURROGATES, SpecBuilder, build_case, fixture_spec, specs
from .reference import (NeuronParams, Spec, StepResult, bptt_step, neuron_bptt, neuron_spike_pass,
                        ratebp_step)

settings.register_profile(
    "differential", max_examples=80, deadline=None, database=None, print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("differential-thorough", settings.get_profile("differential"), max_examples=1000)
PROFILE = settings.get_profile(os.environ.get("RATEBP_DIFFERENTIAL_PROFILE", "differential"))

#: (rtol, atol) per dtype; atol is scaled by max(1, max|reference|) of each compared tensor.
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-9, 1e-10)}
#: A float32 membrane closer than this to the threshold may fire on one side and not on the other
#: (a BatchNorm over a nearly constant channel scales rounding up by as much as 1/√eps ≈ 300).
TIE_MARGIN = 1e-4
#: The spike pass's chunk of time when ``transform`` is not given one: none, as the default memory budget
#: decides for graphs of a few kilobytes.
DEFAULT_TIME_CHUNK = None


# ---------------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------------
def _linear_loss(weights: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda out: (out * weights).sum()


def library_step(spec: Spec, method: str, dtype: torch.dtype) -> Tuple[StepResult, bool]:
    """One training step through ``rc.transform``; returns the result and whether the input is unchanged."""
    model, x, weights = build_case(spec, dtype)
    kwargs = {} if spec.time_chunk == "default" else {"time_chunk": spec.time_chunk}
    step = rc.transform(model, method=method, input_layout="static" if spec.static else spec.layout, **kwargs)
    x_before = x.clone()
    out = step(x)
    loss = _linear_loss(weights)(out)
    loss.backward()
    result = StepResult(out.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()},
                        {n: b.clone() for n, b in model.named_buffers()})
    return result, torch.equal(x, x_before)


def reference_step(spec: Spec, method: str, dtype: torch.dtype) -> StepResult:
    model, x, weights = build_case(spec, dtype)
    step = ratebp_step if method == "ratebp" else bptt_step
    return step(spec, model, x, _linear_loss(weights))


def _mismatch(got: Optional[torch.Tensor], want: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[str]:
    """None if ``got`` matches ``want`` (a missing gradient counts as zeros), else a description."""
    if got is None and want is None:
        return None
    got = torch.zeros_like(want) if got is None else got
    want = torch.zeros_like(got) if want is None else want
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    if not want.dtype.is_floating_point:
        return None if torch.equal(got, want) else f"{got.tolist()} != reference {want.tolist()}"
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    excess = (got - want).abs() - (atol * scale + rtol * want.abs())
    if not (excess <= 0).all():
        i = torch.nan_to_num(excess, nan=math.inf).flatten().argmax().item()
        err = (got - want).abs().flatten()[i].item()
        return (f"|diff| {err:.3e} at flat index {i}: library {got.flatten()[i].item():.8g}, "
                f"reference {want.flatten()[i].item():.8g} (scale {scale:.3g})")
    return None


def compare(spec: Spec, method: str, dtype: torch.dtype) -> Tuple[List[str], float]:
    """Run both sides in ``dtype``: the differences, and the reference's smallest threshold margin."""
    want = reference_step(spec, method, dtype)
    try:
        got, input_intact = library_step(spec, method, dtype)
    except Exception as e:                      # the library refusing or failing on a valid network
        return [f"library raised {type(e).__name__}: {e}"], want.margin
    diffs = [] if input_intact else ["the caller's input tensor was modified by the step"]
    pairs = [("output", got.out, want.out), ("loss", got.loss, want.loss)]
    pairs += [(f"grad {n}", got.grads.get(n), g) for n, g in want.grads.items()]
    pairs += [(f"buffer {n}", got.buffers.get(n), b) for n, b in want.buffers.items()]
    for name, a, b in pairs:
        problem = _mismatch(a, b, dtype)
        if problem:
            diffs.append(f"{name}: {problem}")
    return diffs, want.margin


@dataclass
class Outcome:
    kind: str                  # one of conftest.OUTCOMES
    report: str = ""


def run_case(spec: Spec, method: str) -> Outcome:
    """Compare one case in float32; on a difference, decide rounding or mismatch by a float64 rerun."""
    diffs, margin = compare(spec, method, torch.float32)
    if not diffs:
        return Outcome("agree")
    diffs64, _ = compare(spec, method, torch.float64)
    if not diffs64:
        return Outcome("tie" if margin < TIE_MARGIN else "rounding")
    report = "\n".join([f"method={method}  {spec.describe()}", "float32 differences:"] +
                       [f"  {d}" for d in diffs] + ["float64 differences:"] + [f"  {d}" for d in diffs64])
    return Outcome("mismatch", report)


def _streamed(spec: Spec) -> bool:
    """Whether the rate-based step runs its spike pass over chunks of time."""
    chunk = DEFAULT_TIME_CHUNK if spec.time_chunk == "default" else spec.time_chunk
    return chunk is not None and spec.T > chunk


def mode(spec: Spec, method: str) -> Tuple[str, str, str, str]:
    """The tally's key: method, layout, input kind, and whether the spike pass runs over chunks of time."""
    streamed = "-" if method == "bptt" else ("yes" if _streamed(spec) else "no")
    return method, spec.layout, "static" if spec.static else "temporal", streamed


# ---------------------------------------------------------------------------------------------------
# The differential tests
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["TB", "T*B"])
@pytest.mark.parametrize("method", ["ratebp", "bptt"])
def test_transform_matches_reference(method, layout, tally):
    """One training step of random networks in ``layout`` through ``rc.transform(method=...)`` equals
    the reference's (up to float32 rounding, decided in float64)."""
    mismatches = []

    @settings(PROFILE)
    @seed(zlib.crc32(f"{method} {layout}".encode()))
    @given(spec=specs(layout))
    def check(spec):
        outcome = run_case(spec, method)
        tally(mode(spec, method), outcome.kind)
        if outcome.kind == "mismatch":
            mismatches.append(outcome.report)

    check()
    assert not mismatches, f"{len(mismatches)} case(s) differ from the reference:\n\n" + "\n\n".join(mismatches)


_LIF = {"kind": "lif", "decay": 0.5, "decay_input": False, "v_threshold": 1.0, "v_reset": None,
        "detach_reset": True, "surrogate": ("sigmoid", 4.0)}


def _assert_agrees(spec: Spec, method: str = "ratebp") -> None:
    """The case agrees with the reference, up to float32 rounding."""
    outcome = run_case(spec, method)
    assert outcome.kind in ("agree", "tie", "rounding"), outcome.report


@pytest.mark.parametrize("layout", ["TB", "T*B"])
def test_input_straight_into_batchnorm_streamed(layout):
    """A time-varying input normalised by a BatchNorm first, over chunks of time: the caller's input
    stays as it was and the step is the reference's."""
    g = SpecBuilder()
    x = g.add("input", (), (2, 3, 3))
    g.linear(g.add("flatten", (g.neuron(g.bn(x), _LIF),), (18,)), 2)
    _assert_agrees(g.build(T=5, B=2, layout=layout, time_chunk=2))


def test_merged_layout_flatten_with_batch_of_one():
    """[T·B, ...] layout, B = 1: conv → neuron → flatten(1) → linear → neuron."""
    g = SpecBuilder()
    y = g.neuron(g.conv(g.add("input", (), (1, 2, 2)), 2, 1), _LIF)
    g.neuron(g.linear(g.add("flatten", (y,), (8,)), 2), _LIF)
    _assert_agrees(g.build(T=3, B=1, layout="T*B"))


@pytest.mark.parametrize("how", ["repeat", "expand"])
def test_merged_layout_static_input_with_batch_of_one(how):
    """[T·B, ...] layout, B = 1: a static [B, F] input repeated to [T·B, F] → linear → neuron."""
    g = SpecBuilder()
    x = g.add("repeat", (g.add("input", (), (3,), temporal=False),), (3,), how=how)
    g.neuron(g.linear(x, 2), _LIF)
    _assert_agrees(g.build(T=3, B=1, layout="T*B", static=True))


@pytest.mark.parametrize("join", ["add", "cat"])
@pytest.mark.parametrize("how", ["repeat", "expand"])
def test_merged_layout_static_input_joined_with_spikes_with_batch_of_one(how, join):
    """[T·B, ...] layout, B = 1: a static [B, F] input repeated to [T·B, F], added to (or concatenated
    with) the spikes of linear → neuron on it."""
    g = SpecBuilder()
    x = g.add("repeat", (g.add("input", (), (3,), temporal=False),), (3,), how=how)
    y = g.neuron(g.linear(x, 3), _LIF)
    joined = g.add("add", (y, x), (3,)) if join == "add" else g.add("cat", (y, x), (6,))
    g.linear(g.neuron(joined, _LIF), 2)
    _assert_agrees(g.build(T=3, B=1, layout="T*B", static=True))


@pytest.mark.parametrize("layout", ["TB", "T*B"])
@pytest.mark.parametrize("how", ["repeat", "expand"])
def test_static_input_repeated_over_one_step(how, layout):
    """T = 1: a static [B, F] input repeated (or expanded) over the one step → linear → neuron."""
    g = SpecBuilder()
    x = g.add("repeat", (g.add("input", (), (3,), temporal=False),), (3,), how=how)
    g.neuron(g.linear(x, 2), _LIF)
    _assert_agrees(g.build(T=1, B=2, layout=layout, static=True))


@pytest.mark.parametrize("how", ["repeat", "expand"])
def test_static_batchnorm_before_the_repeat_streamed(how):
    """A static [B, F] input → BatchNorm → repeated over T = 3 → linear → neuron, time_chunk = 2."""
    g = SpecBuilder()
    x = g.add("repeat", (g.bn(g.add("input", (), (3,), temporal=False)),), (3,), how=how)
    g.neuron(g.linear(x, 2), _LIF)
    _assert_agrees(g.build(T=3, B=2, static=True, time_chunk=2))


# ---------------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------------
@settings(PROFILE, max_examples=60)
@seed(1)
@given(kind=st.sampled_from(["lif", "if", "plif"]), decay_input=st.booleans(),
       v_reset=st.sampled_from([None, 0.0, -0.3]), detach_reset=st.booleans(),
       surrogate=st.sampled_from(SURROGATES), T=st.integers(1, 12), data_seed=st.integers(0, 2 ** 16))
def test_reference_eligibility_is_the_forward_derivative_of_the_rate(kind, decay_input, v_reset, detach_reset,
                                                                      surrogate, T, data_seed):
    """e (and e_w) of the reference's spike pass equal forward-mode AD of mean_t s_t through the
    reference's BPTT neuron, for an input perturbation held constant in time (and for w)."""
    gen = torch.Generator().manual_seed(data_seed)
    c = torch.rand(T, 5, generator=gen, dtype=torch.float64) * 2.5 - 0.5
    w = torch.tensor(0.3, dtype=torch.float64) if kind == "plif" else None
    p = NeuronParams(decay_input=decay_input and kind != "if", v_threshold=1.0, v_reset=v_reset,
                     detach_reset=detach_reset, surrogate=surrogate[0], width=surrogate[1],
                     decay={"lif": 0.6, "if": 1.0, "plif": None}[kind], w=w)
    trace = neuron_spike_pass(c, p)
    with fwAD.dual_level():
        spikes, _ = neuron_bptt(fwAD.make_dual(c, torch.ones_like(c)), p)
        torch.testing.assert_close(fwAD.unpack_dual(spikes).primal, trace.spikes, rtol=0, atol=0)
        torch.testing.assert_close(fwAD.unpack_dual(spikes.mean(0)).tangent, trace.e, rtol=1e-12, atol=1e-12)
    if w is not None:
        with fwAD.dual_level():
            p.w = fwAD.make_dual(w, torch.ones_like(w))
            spikes, _ = neuron_bptt(c, p)
            torch.testing.assert_close(fwAD.unpack_dual(spikes.mean(0)).tangent, trace.e_w, rtol=1e-12,
                                       atol=1e-12)


@settings(PROFILE, max_examples=15)
@seed(2)
@given(spec=st.sampled_from(["TB", "T*B"]).flatmap(specs).map(lambda s: replace(s, T=1, B=max(s.B, 2))))
def test_reference_rate_step_equals_bptt_at_T1(spec):
    """At T = 1 the reference's rate-based step is its BPTT step."""
    model, x, weights = build_case(spec, torch.float64)
    rate = ratebp_step(spec, model, x, _linear_loss(weights))
    model, x, weights = build_case(spec, torch.float64)
    bptt = bptt_step(spec, model, x, _linear_loss(weights))
    torch.testing.assert_close(rate.out, bptt.out, rtol=1e-12, atol=1e-12)
    for name, g in bptt.grads.items():
        torch.testing.assert_close(rate.grads[name], g, rtol=1e-9, atol=1e-12, msg=name)
    for name, b in bptt.buffers.items():
        torch.testing.assert_close(rate.buffers[name], b, rtol=1e-12, atol=1e-12, msg=name)


def _fixture_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    bound = FIXTURE_ATOL + FIXTURE_RTOL * ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("path", reference_files(), ids=lambda p: p.stem)
def test_reference_reproduces_the_paper_authors_gradients(path):
    """The reference's rate-based and BPTT steps on the fixtures' networks give the paper authors'
    gradients (rate-based at BPTT's scale: T × the fixture's) and buffers."""
    blob = torch.load(path, weights_only=True)
    meta = json.loads(blob["meta"])
    spec = fixture_spec(meta)
    loss_fn = lambda out: F.cross_entropy(out, blob["y"])
    for key, step, scale in (("rate", ratebp_step, meta["T"]), ("bptt", bptt_step, 1)):
        model, _, _ = build_case(spec)
        params, buffers = list(model.parameters()), list(model.buffers())
        assert [p.shape for p in params] == [t.shape for t in blob["params"]], "parameter order"
        with torch.no_grad():
            for p, v in zip(params + buffers, blob["params"] + blob["buffers"]):
                p.copy_(v)
        result = step(spec, model, blob["x_seq"], loss_fn)
        _fixture_close(result.out, blob[key]["logits"], f"{key} logits")
        assert abs(result.loss.item() - blob[key]["loss"].item()) <= 1e-5
        for name, g, ref in zip(blob["param_names"], result.grads.values(), blob[key]["grads"]):
            _fixture_close(g, scale * ref, f"{key} grad {name}")
        for name, b, ref in zip(blob["buffer_names"], result.buffers.values(), blob[key]["buffers_after"]):
            _fixture_close(b.double(), ref.double(), f"{key} {name}")

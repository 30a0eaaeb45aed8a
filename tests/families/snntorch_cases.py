"""Shared helpers of the snnTorch family tests: snnTorch's own modules as the reference for
``LeakyDynamics`` / ``SynapticDynamics``. Import only after ``pytest.importorskip("snntorch")``.

* ``SURROGATES``: (name, snnTorch factory, our surrogate) for the six surrogates.
* ``float64_spikes()``: while active, snnTorch's surrogate Functions return their spike in the
  input's dtype instead of float32 (the values are 0/1 either way): snnTorch's float64 BPTT gradients
  then pass no float32 rounding at each spike, and equal ours to float64 precision. Outside it, they
  agree to ~1e-7 (checked separately).
* ``run_peer(module, x, n_states)``: the module called step by step from rest, as its users call it:
  ``(spikes [T, ...], per-step returned states)``.
* ``grads(out, wrt)``: reverse-mode gradients of ``sum(out · fixed weights)``.
* ``expanded(value, shape)``: a float64 tensor of the element shape holding ``value`` broadcast (the
  per-element parameter of the eligibility reference).
* ``check_setting(...)``: one neuron setting checked against snnTorch three ways (its docstring).
"""
from __future__ import annotations

import contextlib

import torch
from snntorch import surrogate as S
from snntorch._neurons.neurons import SpikingNeuron

from ratebp_compile.nn.surrogate import ATan, Sigmoid, SignedStep, StepGrad, StraightThrough, SuperSpike

SURROGATES = [
    ("atan", lambda: S.atan(alpha=2.0), ATan(2.0)),
    ("sigmoid", lambda: S.sigmoid(slope=5), Sigmoid(5.0)),
    ("fast_sigmoid", lambda: S.fast_sigmoid(slope=10), SuperSpike(1.0, 10.0)),
    ("triangular", lambda: S.triangular(threshold=0.5), SignedStep(0.5)),
    ("ste", lambda: S.straight_through_estimator(), StraightThrough()),
    ("heaviside", lambda: S.heaviside(), StepGrad()),
]
RESETS = ("subtract", "zero", "none")

#: Float64 tolerance of a comparison against snnTorch with float64 spikes (the surrogates' formulas are
#: written differently, so a few ulps apart); and against unpatched snnTorch (float32 spikes).
TIGHT = dict(rtol=1e-10, atol=1e-12)
LOOSE = dict(rtol=1e-5, atol=1e-7)
#: Float32 throughout (snnTorch's own dtype): the same arithmetic, surrogate formulas a few ulps apart.
FLOAT32 = dict(rtol=1e-4, atol=1e-6)

_FUNCTIONS = (S.ATan, S.Sigmoid, S.FastSigmoid, S.Triangular, S.StraightThroughEstimator, S.Heaviside)


@contextlib.contextmanager
def float64_spikes():
    saved = {cls: cls.__dict__["forward"] for cls in _FUNCTIONS}

    def wrap(original):
        def forward(ctx, input_, *args):
            return original(ctx, input_, *args).to(input_.dtype)
        return staticmethod(forward)

    try:
        for cls, original in saved.items():
            cls.forward = wrap(original.__func__)
        yield
    finally:
        for cls, original in saved.items():
            cls.forward = original


@contextlib.contextmanager
def no_instance_leak():
    """snnTorch appends every neuron it constructs to a class-wide list forever: drop ours on exit."""
    before = list(SpikingNeuron.instances)
    try:
        yield
    finally:
        SpikingNeuron.instances[:] = before


def run_peer(module, x, n_states):
    """``module`` over ``x`` [T, ...] from rest, its state threaded as its users thread it."""
    states = module.reset_mem()
    states = states if isinstance(states, tuple) else (states,)
    spikes, returned = [], []
    for t in range(x.shape[0]):
        out = module(x[t], *states)
        spikes.append(out[0])
        states = tuple(out[1:1 + n_states])
        returned.append(states)
    return torch.stack(spikes), returned


def weights(shape, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def grads(out, wrt):
    loss = (out.to(torch.float64) * weights(out.shape)).sum()
    return torch.autograd.grad(loss, wrt, allow_unused=True)


def expanded(value, shape):
    return torch.as_tensor(value).expand(shape).clone()


def inputs(shape, seed=0, scale=0.8, shift=0.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def assert_close(a, b, tol, msg):
    torch.testing.assert_close(a.to(torch.float64), b.to(torch.float64), **tol, msg=lambda m: f"{msg}: {m}")


# -- one setting, checked three ways ------------------------------------------------------------------
LEARN_FLAG = {"alpha": "learn_alpha", "beta": "learn_beta", "threshold": "learn_threshold",
              "graded_spikes_factor": "learn_graded_spikes_factor"}


def build(cls, constants, learn, options, spike_grad, over=None):
    """A fresh snnTorch ``cls``: ``constants`` name → float or tensor, the names in ``learn`` learnable,
    ``over`` name → a tensor replacing that constant as a learnable parameter. A constant ``cls`` does
    not take as an argument (Synaptic's graded spikes factor) is set on the module afterwards."""
    over = over or {}
    kw, late = dict(options, spike_grad=spike_grad), {}
    for name, value in constants.items():
        value = over.get(name, value)
        learnable = name in learn or name in over
        if name == "graded_spikes_factor" and cls.__name__ == "Synaptic":
            late[name] = torch.nn.Parameter(value) if learnable else torch.as_tensor(value)
            continue
        kw[name] = value.clone() if isinstance(value, torch.Tensor) else value
        if learnable:
            kw[LEARN_FLAG[name]] = True
    m = cls(**kw)
    for name, value in late.items():
        if isinstance(value, torch.nn.Parameter):
            delattr(m, name)
        setattr(m, name, value)
    return m


def our_states(dyn, x, params):
    """The family's state after every step (no autograd)."""
    with torch.no_grad():
        state, out = dyn.init_state(x[0]), []
        for t in range(x.shape[0]):
            _, state = dyn.step(x[t], state, params)
            out.append(state)
    return out


def check_setting(make, dyn, names, n_states, x, c, label, patched=True):
    """(a) spikes and every returned state equal snnTorch's, bitwise; (b) BPTT gradients w.r.t. the
    input and the learnable constants equal snnTorch's autograd; (c) the spike pass's r, e and
    per-element e_params equal snnTorch's reverse-mode d(mean_t s)/d(c, p) for the input ``c`` held
    constant over T = x.shape[0] steps. ``make(over)`` builds the snnTorch module; ``names`` are the
    module attributes the spec passes as parameters."""
    tol = FLOAT32 if x.dtype == torch.float32 else TIGHT if patched else LOOSE
    # Unpatched snnTorch's reset signal is float32 whatever the model's dtype, so in a float64 model it
    # computes r_t·θ (0-dim θ) in float32: its states then differ from float64 arithmetic by θ's float32
    # rounding. With float64 spikes (patched), or in float32, they are bitwise equal.
    exact_states = patched or x.dtype == torch.float32
    ctx = float64_spikes() if patched else contextlib.nullcontext()
    with ctx:
        m = make(None)
        params = tuple(getattr(m, n) for n in names)
        learnable = [p for p in params if p.requires_grad]
        # (a)
        xs = x.clone().requires_grad_()
        ref, ref_states = run_peer(m, xs, n_states)
        ours = dyn.multistep(xs, params)
        assert ours.dtype == x.dtype
        assert torch.equal(ours.detach(), ref.detach().to(x.dtype)), f"{label}: spikes"
        for t, (a, b) in enumerate(zip(our_states(dyn, x, params), ref_states)):
            for i, (u, v) in enumerate(zip(a, b)):
                if exact_states:
                    assert torch.equal(u, v.detach().to(u.dtype)), f"{label}: state {i} at step {t}"
                else:
                    assert_close(u, v.detach(), LOOSE, f"{label}: state {i} at step {t}")
        # (b)
        g_ref = grads(ref, [xs] + learnable)
        g_ours = grads(ours, [xs] + learnable)
        for i, (a, b) in enumerate(zip(g_ours, g_ref)):
            assert_close(a, b, tol, f"{label}: BPTT gradient {i}")
        # (c)
        T = x.shape[0]
        spikes, r, e, *e_params = dyn.spike_pass(c.expand(T, *c.shape), tuple(p.detach() for p in params))
        assert len(e_params) == len(names)
        m2 = make({n: expanded(getattr(m, n).detach(), c.shape) for n in names})
        leaves = [getattr(m2, n) for n in names]
        assert all(p.requires_grad and p.shape == c.shape for p in leaves)
        cc = c.clone().requires_grad_()
        ref_c, _ = run_peer(m2, cc.expand(T, *c.shape), n_states)
        refs = torch.autograd.grad(ref_c.to(torch.float64).mean(0).sum(), [cc] + leaves)
        assert torch.equal(spikes, ref_c.detach().to(spikes.dtype)), f"{label}: spike-pass spikes"
        assert torch.equal(r, ref_c.detach().to(r.dtype).mean(0)), f"{label}: r"
        for i, (a, b) in enumerate(zip([e] + e_params, refs)):
            assert a.shape == c.shape, f"{label}: eligibility {i} shape"
            assert_close(a, b, tol, f"{label}: eligibility {i} ({(['input'] + list(names))[i]})")

"""Fused LIF kernels vs the eager PyTorch loop vs SpikingJelly's multi-step LIF.

    python benchmarks/bench_kernels.py                      # GPU: T 4..64, N 2^16..2^24, float32 and float16
    python benchmarks/bench_kernels.py --T 8 --N 22 --dtype float16 --json out.json

Measured per (T, N, dtype), all in one process:
- spike pass (no autograd): ``ratebp::lif_spike_pass`` (spikes + r + e) vs the eager closed-form loop
  (``families.LIFDynamics.spike_pass``) vs SpikingJelly's multi-step LIF forward (spikes only);
- BPTT step (forward + backward): ``ratebp::lif_bptt_forward``/``backward`` vs autograd through the
  eager loop vs SpikingJelly (its Triton/CuPy backend on GPU, torch backend on CPU).
Times are medians (``triton.testing.do_bench`` on GPU). On GPU the spike pass also reports bytes moved
(read x, write spikes, r and e) / time, as a fraction of the device's nominal memory bandwidth and of
a measured device-to-device copy. SpikingJelly is optional (``pip install --no-deps spikingjelly``).
The neuron is the paper's: LIF, λ = 0.2 (τ = 1.25), no input decay, V_th = 1, soft reset detached,
sigmoid surrogate α = 4.
"""
from __future__ import annotations

import argparse
import json

import torch
from timing import median_seconds

from ratebp_compile.families import LIFDynamics
from ratebp_compile.nn import Sigmoid

DECAY, V_TH, ALPHA = 0.2, 1.0, 4.0
EAGER = LIFDynamics(decay=DECAY, v_threshold=V_TH, surrogate=Sigmoid(ALPHA))
OP_ARGS = dict(decay=DECAY, decay_logit=None, v_threshold=V_TH, v_reset=None, decay_input=False, detach_reset=True,
               surrogate="sigmoid", width=ALPHA, strict=False, delayed_reset=False)
# Nominal DRAM bandwidth (bytes/s) by device name, used when the driver does not report it.
NOMINAL_BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12,
                     "A100-SXM4-80GB": 2.039e12, "A100": 1.555e12, "RTX 4090": 1.008e12, "L40S": 0.864e12}


def _time(fn, device, reps):
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=5, rep=max(reps * 5, 50), return_mode="median") * 1e-3
    return median_seconds(fn, reps)


def nominal_bandwidth():
    props = torch.cuda.get_device_properties(0)
    clock, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock and bus:
        return 2 * clock * 1e3 * bus / 8, "driver (2 × memory clock × bus width)"
    for key, value in NOMINAL_BANDWIDTH.items():
        if key in props.name:
            return value, f"datasheet ({key})"
    return float("nan"), "unknown"


def copy_bandwidth(reps=20):
    x = torch.empty(2 ** 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    seconds = _time(lambda: y.copy_(x), "cuda", reps)
    return 2 * x.numel() / seconds


def spikingjelly_lif(device):
    """A SpikingJelly multi-step LIF with the paper's parameters, or None if it is not installed."""
    try:
        from spikingjelly.activation_based import neuron, surrogate
    except ImportError:
        return None, "not installed"
    kwargs = dict(tau=1.0 / (1.0 - DECAY), decay_input=False, v_threshold=V_TH, v_reset=None, detach_reset=True,
                  surrogate_function=surrogate.Sigmoid(alpha=ALPHA), step_mode="m")
    for backend in (("triton", "cupy") if device == "cuda" else ()) + ("torch",):
        try:
            node = neuron.LIFNode(backend=backend, **kwargs)
            return node.to(device), backend
        except (TypeError, AssertionError, ImportError, NotImplementedError):
            continue
    try:
        return neuron.LIFNode(**kwargs).to(device), "default"
    except Exception as e:  # noqa: BLE001 - report and go on without it
        return None, f"unusable: {e}"


def measure(T, N, dtype, device, reps, sj):
    x = (torch.randn(T, N, device=device) * 0.8 + 0.6).to(dtype)
    grad = torch.randn_like(x)
    row = {"T": T, "N": N, "dtype": str(dtype).replace("torch.", "")}
    with torch.no_grad():
        row["fused_spike_ms"] = 1e3 * _time(lambda: torch.ops.ratebp.lif_spike_pass(
            x, **OP_ARGS, decay_tangent=False, uint8_spikes=False), device, reps)
        row["eager_spike_ms"] = 1e3 * _time(lambda: EAGER.spike_pass(x, ()), device, reps)
        if sj is not None:
            def sj_forward():
                sj.reset()
                return sj(x)
            row["sj_forward_ms"] = 1e3 * _time(sj_forward, device, reps)

    def fused_step():
        xr = x.detach().requires_grad_()
        spikes, _ = torch.ops.ratebp.lif_bptt_forward(xr, **OP_ARGS)
        spikes.backward(grad)

    def eager_step():
        xr = x.detach().requires_grad_()
        EAGER.multistep(xr, ()).backward(grad)

    row["fused_bptt_ms"] = 1e3 * _time(fused_step, device, reps)
    row["eager_bptt_ms"] = 1e3 * _time(eager_step, device, reps)
    if sj is not None:
        def sj_step():
            sj.reset()
            xr = x.detach().requires_grad_()
            sj(xr).backward(grad)
        row["sj_bptt_ms"] = 1e3 * _time(sj_step, device, reps)
    size = x.element_size()
    row["spike_pass_bytes"] = T * N * 2 * size + 2 * N * size      # read x, write spikes; write r and e
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--N", type=int, nargs="+", default=None, help="log2 of elements per step")
    parser.add_argument("--dtype", nargs="+", default=["float32", "float16"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import ratebp_compile.kernels as kernels
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not kernels.triton_available():
        raise SystemExit(f"Triton is not installed: {kernels.UNAVAILABLE_REASON}")
    logs = args.N or ([16, 20, 22, 24] if device == "cuda" else [12, 16])
    sj, sj_backend = spikingjelly_lif(device)
    header = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
              "spikingjelly": sj_backend}
    if device == "cuda":
        nominal, source = nominal_bandwidth()
        header.update(nominal_GBps=nominal / 1e9, nominal_source=source, copy_GBps=copy_bandwidth() / 1e9)
    print(" ".join(f"{k}={v}" for k, v in header.items()))
    rows = []
    print("| dtype | T | N | fused spike pass ms | eager spike pass ms | SJ forward ms | fused BPTT ms | eager BPTT ms "
          "| SJ BPTT ms | spike pass GB/s | % nominal | % copy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtype:
        for T in args.T:
            for log_n in logs:
                row = measure(T, 2 ** log_n, getattr(torch, dtype), device, args.reps, sj)
                gbps = row["spike_pass_bytes"] / (row["fused_spike_ms"] * 1e-3) / 1e9
                row["spike_pass_GBps"] = gbps
                pct_nominal = 100 * gbps / header["nominal_GBps"] if device == "cuda" else float("nan")
                pct_copy = 100 * gbps / header["copy_GBps"] if device == "cuda" else float("nan")
                rows.append(row)
                print(f"| {row['dtype']} | {T} | 2^{log_n} | {row['fused_spike_ms']:.3f} | {row['eager_spike_ms']:.3f} | "
                      f"{row.get('sj_forward_ms', float('nan')):.3f} | {row['fused_bptt_ms']:.3f} | "
                      f"{row['eager_bptt_ms']:.3f} | {row.get('sj_bptt_ms', float('nan')):.3f} | {gbps:.0f} | "
                      f"{pct_nominal:.0f} | {pct_copy:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

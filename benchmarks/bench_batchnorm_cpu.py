"""The spike pass's training-mode BatchNorm on CPU: ``kernels.batchnorm_cpu`` vs ``torch.native_batch_norm``.

    python benchmarks/bench_batchnorm_cpu.py                       # the BatchNorm inputs of ResNet-18 w16, T·B = 128
    python benchmarks/bench_batchnorm_cpu.py --threads 1 2 --json out.json

Per layout (contiguous, and channels-last as ``passes/channels_last.py`` leaves the spike pass's activations),
shape and thread count, in one process, the two alternating: the median time of the statistics and the
normalisation together (the spike pass's ``spike_batch_norm``), and the largest difference of their outputs.
"""
from __future__ import annotations

import argparse
import json

import torch
from timing import median_seconds

from ratebp_compile.kernels import batchnorm_cpu

SHAPES = ["128x16x32x32", "128x32x16x16", "128x64x8x8", "128x128x4x4"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="N×C×H×W, e.g. 128x16x32x32")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--layouts", nargs="+", default=["contiguous", "channels_last"],
                   choices=["contiguous", "channels_last"])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not batchnorm_cpu.LIBRARY.get():
        raise SystemExit(f"the C kernel is unavailable: {batchnorm_cpu.LIBRARY.unavailable_reason()}")
    rows = []
    print("| layout | threads | shape | native_batch_norm ms | C kernel ms | ratio | max |Δy| |")
    print("|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for layout, threads, spec in ((a, b, c) for a in args.layouts for b in args.threads for c in args.shapes):
            torch.set_num_threads(threads)
            shape = tuple(int(s) for s in spec.split("x"))
            x = torch.randn(shape)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            assert batchnorm_cpu.usable(x)
            weight, bias = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
            native = lambda: torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, 1e-5)  # noqa: E731
            ours = lambda: batchnorm_cpu.batch_norm(x, weight, bias, 1e-5)                         # noqa: E731
            native_s, ours_s = [], []
            for _ in range(3):          # alternate, so that both see the same machine
                native_s.append(median_seconds(native, args.reps))
                ours_s.append(median_seconds(ours, args.reps))
            native_ms, ours_ms = 1e3 * min(native_s), 1e3 * min(ours_s)
            diff = (native()[0] - ours()[0]).abs().max().item()
            rows.append(dict(layout=layout, threads=threads, shape=list(shape), native_ms=native_ms,
                             kernel_ms=ours_ms, ratio=ours_ms / native_ms, max_abs_diff=diff))
            print(f"| {layout} | {threads} | {spec} | {native_ms:.2f} | {ours_ms:.2f} | {ours_ms / native_ms:.2f} | {diff:.1e} |")
    if args.json:
        record = dict(torch=torch.__version__, openmp=batchnorm_cpu.LIBRARY.openmp, reps=args.reps, rows=rows)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()

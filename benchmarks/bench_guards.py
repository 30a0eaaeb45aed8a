"""What checking a program's guards costs per step, against the step itself.

    python benchmarks/bench_guards.py                     # ResNet-18, width 16, batch 16, T = 8, CPU
    python benchmarks/bench_guards.py --T 4 --threads 2 --json guards.json

A transformed model checks, before every training step, that the program it compiled still fits the
model (``ratebp_compile.guards``): the module tree and every parameter and buffer, every neuron's spec,
the attributes the forward read, the hooks; plus the program key (input signature, autocast state,
module modes). Measured in one process: the median time of that lookup (``RateBPModule.compile_for`` on a
cached program: key, guards and LRU bookkeeping), of the guard check alone, and of a full training step
(forward, backward, SGD), each over repeated runs; the ratios are what BENCHMARKS.md reports.
"""
from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F
from timing import median_seconds

import ratebp_compile as rc
from ratebp_compile import models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="training steps timed (median)")
    p.add_argument("--lookups", type=int, default=2000, help="program lookups timed (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = models.resnet18(num_classes=10, width=args.width)
    tm = rc.transform(model)
    opt = torch.optim.SGD(tm.parameters(), lr=0.01)
    x = torch.rand(args.T, args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))

    def step():
        opt.zero_grad()
        F.cross_entropy(tm(x).mean(0), y).backward()
        opt.step()

    step()                                        # compiles
    program = tm.compiled
    step_s = median_seconds(step, args.steps)
    lookup_s = median_seconds(lambda: tm.compile_for(x), args.lookups)
    guards_s = median_seconds(program.guards.check, args.lookups)
    assert tm.compiled is program and len(tm.programs) == 1, "the program was compiled again while timing"
    guards = program.guards
    figures = {
        "model": f"resnet18 width {args.width}", "batch_size": args.batch_size, "T": args.T,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "step_ms": step_s * 1e3, "lookup_us": lookup_s * 1e6, "guards_us": guards_s * 1e6,
        "lookup_fraction_of_step": lookup_s / step_s,
        "guarded": {"modules": len(guards.modules), "tensors": len(guards.tensors), "neurons": len(guards.neurons),
                    "attributes": len(guards.attributes)},
    }
    print(f"ResNet-18 w{args.width}, batch {args.batch_size}, T = {args.T}, {figures['threads']} threads")
    print(f"  training step (median of {args.steps}):        {figures['step_ms']:9.1f} ms")
    print(f"  program lookup: key + guards (median):    {figures['lookup_us']:9.1f} µs  "
          f"({100 * figures['lookup_fraction_of_step']:.3f}% of the step)")
    print(f"  guards alone (median):                    {figures['guards_us']:9.1f} µs")
    print(f"  guarded: {figures['guarded']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()

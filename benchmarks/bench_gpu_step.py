"""End-to-end training step on one GPU: rate-based vs BPTT vs SpikingJelly's BPTT, time and allocator peak.

    python benchmarks/bench_gpu_step.py [--T 4 8 16 32] [--batch-size 128] [--width 64] [--json step.json]

Model: spiking ResNet-18 (``models.resnet18``: BasicBlocks [2,2,2,2], widths w-2w-4w-8w, conv–BN–LIF, λ = 0.2,
V_th = 1, soft reset detached, sigmoid surrogate α = 4), 32×32 input repeated over T, cross-entropy on the
time-mean logits, SGD step included. Variants, all on copies of one model in one process, steps interleaved:

- ``bptt``: the model itself (its neurons run as the fused BPTT ops);
- ``ratebp``: ``rc.transform(model)`` with its default options (the memory budget: a quarter of the GPU);
- ``ratebp budget 2G``: ``memory_budget=2 GiB`` (streamed where the spike pass would need more);
- ``ratebp chunk 8``: ``time_chunk=8``, the spike pass streamed for every T above 8;
- ``sj2 bptt``: the same network in SpikingJelly 2 (``layer.Conv2d``/``BatchNorm2d``, ``neuron.LIFNode``,
  multi-step, its fastest GPU backend), when SpikingJelly is installed.

Reported per variant and T: median step time (ms) over ``--steps`` after ``--warmup``, time of the first
step (compilation included), and the allocator's peak above what was allocated before one more step.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import ratebp_compile as rc
from ratebp_compile.cli.common import MiB, StepMemory, build_model, environment, interleaved_times

DECAY, V_TH, ALPHA = 0.2, 1.0, 4.0


def spikingjelly_resnet18(width: int) -> Tuple[Optional[nn.Module], str]:
    """The same ResNet-18 in SpikingJelly 2 and its version, or (None, why not)."""
    try:
        from spikingjelly.activation_based import layer, neuron, surrogate
    except ImportError as e:
        return None, f"not installed ({e})"

    kwargs = dict(tau=1.0 / (1.0 - DECAY), decay_input=False, v_threshold=V_TH, v_reset=None, detach_reset=True,
                  surrogate_function=surrogate.Sigmoid(alpha=ALPHA), step_mode="m")

    def lif():          # SpikingJelly 2 picks its backend itself (Triton kernels on CUDA)
        return neuron.LIFNode(**kwargs)

    def conv_bn(cin, cout, k, stride):
        return [layer.Conv2d(cin, cout, k, stride, k // 2, bias=False, step_mode="m"),
                layer.BatchNorm2d(cout, step_mode="m")]

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.left1 = nn.Sequential(*conv_bn(cin, cout, 3, stride), lif())
            self.left2 = nn.Sequential(*conv_bn(cout, cout, 3, 1))
            self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout \
                else nn.Sequential()
            self.out = lif()

        def forward(self, x):
            return self.out(self.left2(self.left1(x)) + self.shortcut(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            widths = [width, 2 * width, 4 * width, 8 * width]
            self.stem = nn.Sequential(*conv_bn(3, widths[0], 3, 1), lif())
            blocks, c = [], widths[0]
            for i, w in enumerate(widths):
                for j in range(2):
                    blocks.append(Block(c, w, 2 if (i > 0 and j == 0) else 1))
                    c = w
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Linear(widths[-1], 10)

        def forward(self, x_seq):          # [T, B, C, H, W] -> logits [T, B, 10]
            return self.head(self.blocks(self.stem(x_seq)).mean((3, 4)))

    import spikingjelly
    return Net(), getattr(spikingjelly, "__version__", "2.x")


def _reset(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "reset") and type(m).__module__.startswith("spikingjelly"):
            m.reset()


def variants(width: int, seed: int, device: torch.device, names: List[str]) -> Dict[str, Tuple[Callable, nn.Module]]:
    base = build_model("resnet18", width, (3, 32, 32), 10, seed).to(device).train()
    runs: Dict[str, Tuple[Callable, nn.Module]] = {}
    for name in names:
        if name == "sj2 bptt":
            model, why = spikingjelly_resnet18(width)
            if model is None:
                print(f"sj2 bptt: skipped, SpikingJelly {why}")
                continue
            model = model.to(device).train()
            runs[name] = (model, model)
            continue
        model = copy.deepcopy(base)
        options = {"ratebp": {}, "ratebp budget 2G": {"memory_budget": 2 * 2 ** 30}, "ratebp chunk 8": {"time_chunk": 8}}
        runner = model if name == "bptt" else rc.transform(model, **options[name])
        runs[name] = (runner, model)
    return runs


def step(runner: Callable, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    _reset(model)
    loss = F.cross_entropy(runner(x).mean(0), y)
    loss.backward()
    opt.step()


def measure(args, T: int, device: torch.device) -> Dict[str, Any]:
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(1, args.batch_size, 3, 32, 32, generator=g).expand(T, -1, -1, -1, -1).contiguous().to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    runs = variants(args.width, args.seed, device, args.variants)
    opts = {name: torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) for name, (_, model) in runs.items()}
    times, first = interleaved_times({name: (lambda r=runner, m=model, o=opts[name]: step(r, m, o, x, y))
                                      for name, (runner, model) in runs.items()}, args.warmup, args.steps, device)
    result: Dict[str, Any] = {"T": T}
    for name, (runner, model) in runs.items():
        with StepMemory(device) as mem:
            step(runner, model, opts[name], x, y)
        result[name] = {"ms": 1e3 * statistics.median(times[name]), "ms_all": [1e3 * t for t in times[name]],
                        "first_step_s": first[name], "peak_MiB": mem.peak_bytes / MiB}
        if hasattr(runner, "compiled") and runner.compiled is not None:
            result[name]["streamed"] = runner.compiled.step.meta.get("ratebp.streamed")
    del runs, opts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["bptt", "ratebp", "ratebp budget 2G", "ratebp chunk 8",
                                                      "sj2 bptt"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here (after every T)")
    args = p.parse_args()
    device = torch.device(args.device)
    record = {"environment": environment(device), "batch_size": args.batch_size, "width": args.width,
              "steps": args.steps, "warmup": args.warmup, "results": []}
    for T in args.T:
        result = measure(args, T, device)
        record["results"].append(result)
        bptt = result.get("bptt", {})
        for name, entry in result.items():
            if name == "T":
                continue
            ratio = f" ({entry['ms'] / bptt['ms']:.2f}× time, {entry['peak_MiB'] / bptt['peak_MiB']:.2f}× peak of " \
                    f"bptt)" if bptt and name != "bptt" else ""
            print(f"T={T:3d} {name:24s} {entry['ms']:9.1f} ms  peak {entry['peak_MiB']:9.0f} MiB  first "
                  f"{entry['first_step_s']:.1f} s{ratio}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()

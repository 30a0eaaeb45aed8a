"""The rate-based step under ``torch.compile(backend="ratebp")`` against the eager one, paired step by step.

    python benchmarks/bench_compile.py                               # ResNet-18 w16, batch 16, streamed
    python benchmarks/bench_compile.py --T 8 16 --time-chunk 0 0 --threads 1 --json compile.json

For each T (with ``--time-chunk``: the spike pass streamed in chunks of that many steps, 0 for all at once),
two copies of one model — ``rc.transform(model)`` and ``torch.compile(model, backend="ratebp")`` with the
same options — run in one process, after warm-up steps (the compiled one's first compiles), in rounds: each
round one training step of each (forward, cross-entropy, backward, SGD), the order swapped every round so
that neither always runs first. A round gives one paired ratio, compiled / eager; the report is the median of
those ratios and a 95% bootstrap interval of that median (resampling the rounds), with the share of rounds
in which the compiled step was the faster. Pairing within a round cancels the drift of a noisy machine that
two separate medians would carry.

Each step is also split at the program's spike pass (forward hooks on it): "spike" is its time, "rest" the
step's remainder (the rate graph's forward and backward, the loss, the optimizer). Both steps run the same
streamed spike pass on CPU (its chunk graphs run uncompiled there), so what the compiled step gains shows in
"rest". The figures go to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn.functional as F

import ratebp_compile as rc
from ratebp_compile import models
from ratebp_compile.backend import compiled_for
from ratebp_compile.cli.common import build_model
from ratebp_compile.options import COMPILERS


def bootstrap_median(values: List[float], resamples: int = 4000, seed: int = 0) -> List[float]:
    """The 2.5th and 97.5th percentiles of the median of ``values`` resampled with replacement."""
    rng = np.random.default_rng(seed)
    data = np.asarray(values)
    medians = np.median(rng.choice(data, size=(resamples, len(data)), replace=True), axis=1)
    return [float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))]


class SplitStep:
    """One training step of ``runner``, timed whole and at its program's spike pass."""

    def __init__(self, runner: Callable, params, x: torch.Tensor, y: torch.Tensor):
        self.runner, self.x, self.y = runner, x, y
        self.opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        self.marks: Dict[str, float] = {}
        self.hooked = False

    def hook(self, spike: torch.nn.Module) -> None:
        self.hooked = True
        spike.register_forward_pre_hook(lambda m, a: self.marks.__setitem__("start", time.perf_counter()))
        spike.register_forward_hook(lambda m, a, r: self.marks.__setitem__("end", time.perf_counter()))

    def __call__(self) -> Dict[str, float]:
        self.marks.clear()
        start = time.perf_counter()
        self.opt.zero_grad()
        F.cross_entropy(self.runner(self.x).mean(0), self.y).backward()
        self.opt.step()
        total = time.perf_counter() - start
        if not self.hooked:
            return {"total": 1e3 * total}
        if set(self.marks) != {"start", "end"}:
            raise RuntimeError("the program's spike pass was not called as a module: its time is unknown")
        spike = self.marks["end"] - self.marks["start"]
        return {"total": 1e3 * total, "spike": 1e3 * spike, "rest": 1e3 * (total - spike)}


def measure(args, T: int, chunk: int) -> Dict[str, object]:
    base = build_model(args.model, args.width, (3, 32, 32), 10, args.seed).train()
    x = torch.rand(T, args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    x_before = x.clone()
    options = {"time_chunk": chunk} if chunk else {}
    eager_model, compiled_model = copy.deepcopy(base), copy.deepcopy(base)
    steps = {"eager": SplitStep(rc.transform(eager_model, **options), eager_model.parameters(), x, y),
             "compiled": SplitStep(torch.compile(compiled_model, backend="ratebp",
                                                 options={**options, "compiler": args.compiler}),
                                   compiled_model.parameters(), x, y)}
    start = time.perf_counter()
    steps["compiled"]()
    first_compiled_s = time.perf_counter() - start
    steps["eager"]()
    programs = {"eager": steps["eager"].runner.compiled, "compiled": compiled_for(compiled_model)}
    for name, program in programs.items():
        steps[name].hook(program.step.spike)
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    rounds: List[Dict[str, Dict[str, float]]] = []
    for i in range(args.rounds):
        order = ("eager", "compiled") if i % 2 == 0 else ("compiled", "eager")
        rounds.append({name: steps[name]() for name in order})
    if not torch.equal(x, x_before):
        raise RuntimeError("a training step changed its input")
    ratios = [r["compiled"]["total"] / r["eager"]["total"] for r in rounds]
    med = lambda name, part: statistics.median(r[name][part] for r in rounds)      # noqa: E731
    return {
        "T": T, "time_chunk": chunk, "spike_pass": programs["eager"].step.meta.get("ratebp.streamed"),
        "eager_ms": {part: med("eager", part) for part in ("total", "spike", "rest")},
        "compiled_ms": {part: med("compiled", part) for part in ("total", "spike", "rest")},
        "ratio_median": statistics.median(ratios), "ratio_95": bootstrap_median(ratios),
        "compiled_faster_share": sum(r < 1 for r in ratios) / len(ratios),
        "first_compiled_step_s": first_compiled_s, "ratios": ratios,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", choices=sorted(m for m in models.ZOO if m != "mlp"))
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--T", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--time-chunk", type=int, nargs="+", default=[4, 8, 8],
                   help="one per T: the spike pass in chunks of this many steps, 0 for all at once (default 4 8 8)")
    p.add_argument("--compiler", default="inductor", choices=COMPILERS,
                   help="what compiles the compiled step's graphs (the backend's option; default inductor)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds after the first (compiling) steps")
    p.add_argument("--rounds", type=int, default=160,
                   help="timed rounds, one step of each per round (at 160 the 95%% interval is about ±1%% at T = 32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    if len(args.time_chunk) != len(args.T):
        p.error(f"--time-chunk needs one value per T ({len(args.T)}), got {len(args.time_chunk)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for T, chunk in zip(args.T, args.time_chunk):
        torch._dynamo.reset()
        r = measure(args, T, chunk)
        results.append(r)
        e, c = r["eager_ms"], r["compiled_ms"]
        print(f"T = {T:3d}, {r['spike_pass']}: compiled / eager {r['ratio_median']:.3f} "
              f"(95% {r['ratio_95'][0]:.3f}–{r['ratio_95'][1]:.3f}; faster in {100 * r['compiled_faster_share']:.0f}% "
              f"of {args.rounds} rounds); eager {e['total']:.1f} ms (spike {e['spike']:.1f}, rest {e['rest']:.1f}), "
              f"compiled {c['total']:.1f} (spike {c['spike']:.1f}, rest {c['rest']:.1f})", flush=True)
    if args.json:
        record = {"command": "python benchmarks/bench_compile.py " + " ".join(
                      f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                      for k, v in vars(args).items() if v is not None and k != "json"),
                  "model": f"{args.model} width {args.width}", "compiler": args.compiler,
                  "batch_size": args.batch_size,
                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "machine": platform.processor() or platform.machine(),
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()

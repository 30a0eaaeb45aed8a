"""``ratebp bench``: time and peak memory of one training step, rate-based vs BPTT, for a list of T.

    ratebp bench --model resnet18 --width 16 --batch-size 32 --T 4 8 16 32 [--compile]

All variants run on copies of one model in one process, their steps interleaved: ``--warmup`` steps
(the first compiles), then ``--steps`` timed steps (median reported; optimizer step included), then
one step watched for memory — peak of the tensors the step creates (the live-tensor tracker on CPU,
the allocator on CUDA) and the bytes autograd saves for backward. With ``--compile`` the
``torch.compile`` variants run too (time only on CPU: the tracker does not see Inductor's buffers).
Prints a table and writes a JSON record and a PNG plot.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
from typing import Any, Dict, List, Tuple

import torch

from .. import models
from ..memory import SavedTensorMeter
from ..options import DEFAULT_MEMORY_BUDGET
from .common import (MiB, StepMemory, build_model, command_line, default_path, environment, finish_figure,
                     interleaved_times, make_runner, memory_options, pick_device, pyplot, train_step, write_json)
from .data import CLIError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet18", choices=sorted(models.ZOO), help="zoo model (default resnet18)")
    p.add_argument("--width", type=int, default=16, help="channels of the first layer (default 16)")
    p.add_argument("--batch-size", type=int, default=32, help="default 32")
    p.add_argument("--input-size", type=int, default=32, help="height = width of the random input (default 32)")
    p.add_argument("--channels", type=int, default=3, help="input channels (default 3)")
    p.add_argument("--T", type=int, nargs="+", default=[4, 8, 16, 32], help="timesteps (default 4 8 16 32)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant and T (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--compile", action="store_true", help="also the torch.compile variants")
    p.add_argument("--memory-budget", nargs="+", default=[str(DEFAULT_MEMORY_BUDGET)],
                   help=f"what the rate-based spike pass may take before it is streamed over chunks of time: bytes "
                        f"(512M, 2G), a fraction of the device's memory, or none (default {DEFAULT_MEMORY_BUDGET}); "
                        f"several: one rate-based variant each ('ratebp@64M'), to compare them")
    p.add_argument("--time-chunk", type=int, default=0,
                   help="rate-based spike pass in chunks of this many steps whatever its memory (default 0: as the "
                        "memory budget decides)")
    p.add_argument("--out", help="path of the JSON record; the PNG goes beside it (default runs/bench-<model>-<time>)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--seed", type=int, default=0)


def _variants(args) -> Dict[str, Tuple[str, bool, Dict[str, Any]]]:
    """``{name: (method, compiled, memory options)}``: BPTT, and the rate-based step once per memory budget
    ("ratebp", or "ratebp@<budget>" for several); with ``--compile`` each again through ``torch.compile``."""
    budgets = args.memory_budget
    rates = {"ratebp" if len(budgets) == 1 else f"ratebp@{b}": ("ratebp", memory_options(b, args.time_chunk))
             for b in budgets}
    eager = {"bptt": ("bptt", memory_options(budgets[0], args.time_chunk)), **rates}
    out = {name: (method, False, memory) for name, (method, memory) in eager.items()}
    if args.compile:
        out.update({f"{name} compiled": (method, True, memory) for name, (method, memory) in eager.items()})
    return out


def measure(args, T: int, device: torch.device) -> Dict[str, Any]:
    base = build_model(args.model, args.width, (args.channels, args.input_size, args.input_size), 10,
                       args.seed).to(device).train()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(T, args.batch_size, args.channels, args.input_size, args.input_size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    runs = {}
    for name, (method, compiled, memory) in _variants(args).items():
        model = copy.deepcopy(base)
        runner = make_runner(model, method, compiled, memory)
        runs[name] = (runner, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    times, first = interleaved_times({name: (lambda r=runner, o=opt: train_step(r, o, x, y))
                                      for name, (runner, opt) in runs.items()}, args.warmup, args.steps, device)
    result: Dict[str, Any] = {"T": T}
    for name, (runner, opt) in runs.items():
        entry = {"ms": 1e3 * statistics.median(times[name]), "first_step_s": first[name],
                 "peak_MiB": None, "saved_MiB": None}
        if device.type == "cuda" or not name.endswith("compiled"):
            with StepMemory(device) as mem:
                train_step(runner, opt, x, y)
            entry["peak_MiB"] = mem.peak_bytes / MiB
        if not name.endswith("compiled"):
            with SavedTensorMeter() as saved:
                runner(x)                     # the forward alone: what it saves for backward
            entry["saved_MiB"] = saved.bytes / MiB
        program = getattr(runner, "compiled", None)
        if program is not None and program.method == "ratebp":
            entry["spike_pass"] = program.step.meta.get("ratebp.streamed")      # all at once, or in chunks: why
        result[name] = entry
    return result


def _ratio(a, b):
    return None if a is None or b is None else a / b


def table(results: List[Dict[str, Any]], variants: List[str]) -> str:
    """One row per T: each variant's time, the rate-based variants' time ratios to BPTT, the peaks and their
    ratios, the saved bytes ("time rate/BPTT" with one rate-based variant, "time <variant>/BPTT" with several)."""
    rates = [v for v in variants if v.startswith("ratebp") and not v.endswith("compiled")]
    ratio = (lambda v: "rate") if len(rates) == 1 else (lambda v: v)        # noqa: E731
    cols = ["T"] + [f"{v} ms" for v in variants] + [f"time {ratio(v)}/BPTT" for v in rates] + \
        [f"{v} peak MiB" for v in variants] + [f"peak {ratio(v)}/BPTT" for v in rates] + \
        [f"{v} saved MiB" for v in variants if not v.endswith("compiled")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    fmt = lambda v, spec: "–" if v is None else format(v, spec)      # noqa: E731
    for r in results:
        cells = [str(r["T"])] + [fmt(r[v]["ms"], ".0f") for v in variants]
        cells += [fmt(_ratio(r[v]["ms"], r["bptt"]["ms"]), ".2f") for v in rates]
        cells += [fmt(r[v]["peak_MiB"], ".0f") for v in variants]
        cells += [fmt(_ratio(r[v]["peak_MiB"], r["bptt"]["peak_MiB"]), ".2f") for v in rates]
        cells += [fmt(r[v]["saved_MiB"], ".1f") for v in variants if not v.endswith("compiled")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: List[Dict[str, Any]], variants: List[str], title: str, path: str) -> None:
    plt = pyplot()
    Ts = [r["T"] for r in results]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for v in variants:
        style = dict(marker="o", linestyle="--" if v.endswith("compiled") else "-")
        ax_t.plot(Ts, [r[v]["ms"] for r in results], label=v, **style)
        peaks = [(T, r[v]["peak_MiB"]) for T, r in zip(Ts, results) if r[v]["peak_MiB"] is not None]
        if peaks:
            ax_m.plot(*zip(*peaks), label=v, **style)
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xticks(Ts, [str(T) for T in Ts])
    finish_figure(plt, fig, (ax_t, ax_m), "timesteps T", ("training step (ms, median)", "peak memory of a step (MiB)"),
                  title, path)


def run(args: argparse.Namespace) -> int:
    for key in ("width", "batch_size", "input_size", "channels", "steps"):
        if getattr(args, key) < 1:
            raise CLIError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if any(T < 1 for T in args.T) or args.warmup < 1:
        raise CLIError("--T values and --warmup must be at least 1")
    for budget in args.memory_budget:
        memory_options(budget, args.time_chunk)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    variants = list(_variants(args))
    results = []
    for T in args.T:
        torch._dynamo.reset()
        print(f"T = {T} ...", flush=True)
        results.append(measure(args, T, device))
        for name, entry in results[-1].items():
            if isinstance(entry, dict) and entry.get("spike_pass"):
                print(f"  {name}: spike pass {entry['spike_pass']}")
    env = environment(device)
    title = (f"{args.model} width {args.width}, batch {args.batch_size}, {args.channels}×{args.input_size}×"
             f"{args.input_size} input · {env['device']}"
             + (f" ({env['gpu']})" if "gpu" in env else f", {env['threads']} threads") + f" · torch {env['torch']}")
    print(title)
    print(table(results, variants))
    out = args.out or default_path("bench", args.model, "json")
    png = os.path.splitext(out)[0] + ".png"
    config = {k: v for k, v in vars(args).items() if k not in ("run", "parser", "command")}
    write_json(out, {"command": command_line(), "config": config, "environment": env, "results": results})
    plot(results, variants, title, png)
    print(f"record: {out}\nplot:   {png}")
    return 0

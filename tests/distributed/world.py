"""Run a function on a world of processes: ``torch.distributed`` with gloo on 127.0.0.1 only, bounded in time.

    results = run(fn, world_size=2, **kwargs)     # fn(rank, world_size, **kwargs) in each process

``fn`` must be importable (a module-level function: the processes are spawned). Each process uses one
thread. What ``fn`` returns comes back through ``torch.save`` (tensors, dicts, numbers); an exception in
any process fails the call with that process's traceback; a world that has not finished within ``timeout``
seconds is terminated and fails the call.
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run"]

#: Seconds a collective may wait for the other processes before it fails (inside each process).
COLLECTIVE_TIMEOUT = 60


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world_size: int, port: int, out: str, kwargs: dict) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"            # loopback only
    torch.set_num_threads(1)
    code = 0
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
        try:
            result = fn(rank, world_size, **kwargs)
        finally:
            dist.destroy_process_group()
        torch.save(result, Path(out) / f"{rank}.pt")
    except BaseException:
        (Path(out) / f"{rank}.err").write_text(traceback.format_exc())
        code = 1
    # everything is written: leave without the interpreter's teardown, where gloo's and Dynamo's threads
    # can abort the process ("terminate called without an active exception")
    os._exit(code)


def run(fn: Callable, world_size: int = 2, timeout: float = 240, **kwargs: Any) -> List[Any]:
    """``[fn(0, world_size, **kwargs), fn(1, ...), ...]``, each computed in its own process."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out:
        processes = [ctx.Process(target=_worker, args=(fn, rank, world_size, port, out, kwargs), daemon=True)
                     for rank in range(world_size)]
        for p in processes:
            p.start()
        deadline = time.monotonic() + timeout
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [rank for rank, p in enumerate(processes) if p.is_alive()]
        for p in processes:
            if p.is_alive():
                p.terminate()
                p.join(10)
        errors = sorted(Path(out).glob("*.err"))
        if errors:
            raise AssertionError("\n".join(f"rank {e.stem}:\n{e.read_text()}" for e in errors))
        if alive:
            raise TimeoutError(f"ranks {alive} of {world_size} did not finish within {timeout:g} s")
        failed = [(rank, p.exitcode) for rank, p in enumerate(processes) if p.exitcode != 0]
        if failed:
            raise AssertionError(f"processes exited with codes {failed}")
        return [torch.load(Path(out) / f"{rank}.pt", weights_only=False) for rank in range(world_size)]

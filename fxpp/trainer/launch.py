"""Run a function in ``world_size`` local processes with a process group, bounded in time.

Used by ``fxpp run``, the tests and the benchmarks. Each rank gets
``fn(rank, world_size, workdir, *args)`` with the process group initialised through a
file rendezvous (one fresh file per run: a stale one would make ranks wait on dead
peers) and destroyed afterwards; what it returns (or raises) comes back in rank order.
The backend is NCCL when CUDA is present, else gloo.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time
import traceback
import uuid
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..runtime.placement import default_backend, default_device


def _entry(rank: int, world_size: int, workdir: str, fn: Callable, args: tuple, pg_timeout_s: float,
           rendezvous: str, threads: int | None, barrier_at_end: bool) -> None:
    if threads:
        torch.set_num_threads(threads)
    result: dict[str, Any] = {"ok": False}
    try:
        device = default_device(rank)
        if device.type == "cuda":  # each rank's own GPU, bound to its process group (NCCL)
            torch.cuda.set_device(device)
        dist.init_process_group(
            default_backend(), init_method=f"file://{rendezvous}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s), device_id=device if device.type == "cuda" else None,
        )
        result = {"ok": True, "value": fn(rank, world_size, workdir, *args)}
    except BaseException as e:  # noqa: BLE001 - reported to the caller
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    finally:
        with open(os.path.join(workdir, f"result{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        if dist.is_initialized():
            try:
                if barrier_at_end and result["ok"]:
                    dist.barrier()
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_ranks(fn: Callable, world_size: int, *args: Any, workdir: str | None = None, timeout_s: float | None = 600,
              pg_timeout_s: float = 120, threads: int | None = None, barrier_at_end: bool = False) -> list[dict]:
    """Spawn ``world_size`` processes running ``fn``; return one result dict per rank.

    Each result is ``{"ok": True, "value": ...}`` or ``{"ok": False, "error": ..., "traceback": ...}``;
    a rank that died without a word gets ``"rank N died (exit code X)"``.

    Raises:
        TimeoutError: the run did not finish in ``timeout_s`` (every process is killed).
    """
    with tempfile.TemporaryDirectory(prefix="fxpp_run_") as tmp:
        workdir = str(workdir or tmp)
        rendezvous = os.path.join(tmp, f"rendezvous-{uuid.uuid4().hex}")
        for rank in range(world_size):
            stale = os.path.join(workdir, f"result{rank}.pkl")
            if os.path.exists(stale):
                os.remove(stale)
        ctx = mp.start_processes(
            _entry, args=(world_size, workdir, fn, args, pg_timeout_s, rendezvous, threads, barrier_at_end),
            nprocs=world_size, join=False, start_method="spawn",
        )
        deadline = time.monotonic() + (float("inf") if timeout_s is None else timeout_s)
        try:
            while any(p.is_alive() for p in ctx.processes):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size}-rank run of {fn.__name__} did not finish in {timeout_s:.0f}s")
                for p in ctx.processes:
                    p.join(timeout=0.2)
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for rank in range(world_size):
            path = os.path.join(workdir, f"result{rank}.pkl")
            if not os.path.exists(path):
                results.append({"ok": False, "error": f"rank {rank} died (exit code {ctx.processes[rank].exitcode})"})
                continue
            with open(path, "rb") as f:
                results.append(pickle.load(f))
        return results

"""Run a rank function in ``world_size`` CPU processes with gloo, bounded in time.

Rank functions live at module level (they are pickled into spawned processes). Each
gets ``(rank, world_size, workdir, *args)`` with the process group already
initialised through a file rendezvous in ``workdir`` and destroyed afterwards; what it
returns is saved and handed back to the test, in rank order.
"""

from __future__ import annotations

import datetime
import os
import pickle
import traceback
import uuid

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world_size, workdir, fn, args, pg_timeout_s, rendezvous):
    torch.set_num_threads(1)
    result = {"ok": False}
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        result = {"ok": True, "value": fn(rank, world_size, workdir, *args)}
    except BaseException as e:  # noqa: BLE001 - reported to the test
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    finally:
        with open(os.path.join(workdir, f"result{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_distributed(fn, world_size: int, workdir, *args, timeout_s: float = 180, pg_timeout_s: float = 60, expect_ok: bool = True):
    """Run ``fn`` on every rank; return the list of per-rank results (dicts)."""
    workdir = str(workdir)
    rendezvous = os.path.join(workdir, f"rendezvous-{uuid.uuid4().hex}")  # one per run: a stale file would hang
    for rank in range(world_size):
        stale = os.path.join(workdir, f"result{rank}.pkl")
        if os.path.exists(stale):
            os.remove(stale)
    ctx = mp.start_processes(
        _entry, args=(world_size, workdir, fn, args, pg_timeout_s, rendezvous), nprocs=world_size, join=False,
        start_method="spawn",
    )
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    try:
        while not all(not p.is_alive() for p in ctx.processes):
            if datetime.datetime.now() > deadline:
                raise TimeoutError(f"{world_size}-rank run of {fn.__name__} did not finish in {timeout_s}s")
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
            results.append({"ok": False, "error": f"rank {rank} died without a result"})
            continue
        with open(path, "rb") as f:
            results.append(pickle.load(f))
    if expect_ok:
        failed = [(r, res) for r, res in enumerate(results) if not res["ok"]]
        if failed:
            rank, res = failed[0]
            raise AssertionError(f"rank {rank} failed: {res['error']}\n{res.get('traceback', '')}")
        return [res["value"] for res in results]
    return results

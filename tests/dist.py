"""Run a rank function in ``world_size`` CPU processes with gloo, bounded in time.

A thin layer over :func:`fxpp.trainer.launch.run_ranks`: rank functions live at module level
(they are pickled into spawned processes) and get ``(rank, world_size, workdir, *args)``
with the process group initialised and destroyed afterwards. By default any failing
rank fails the test with its traceback.
"""

from __future__ import annotations

from fxpp.trainer.launch import run_ranks


def run_distributed(fn, world_size: int, workdir, *args, timeout_s: float = 180, pg_timeout_s: float = 60,
                    expect_ok: bool = True):
    """Run ``fn`` on every rank; the values it returned (or, with ``expect_ok=False``, the result dicts)."""
    results = run_ranks(fn, world_size, *args, workdir=str(workdir), timeout_s=timeout_s, pg_timeout_s=pg_timeout_s,
                        threads=1)
    if not expect_ok:
        return results
    failed = [(r, res) for r, res in enumerate(results) if not res["ok"]]
    if failed:
        rank, res = failed[0]
        raise AssertionError(f"rank {rank} failed: {res['error']}\n{res.get('traceback', '')}")
    return [res["value"] for res in results]

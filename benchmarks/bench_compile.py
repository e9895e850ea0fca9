"""Compiled stages against eager stages: step time under 1F1B and ZBVZeroBubble, compile time and counts.

The CPU-sized Llama of ``bench_schedules.py`` (hidden 256, 8 layers, intermediate 688,
vocab 1000, fp32), global batch 16 x 64, 8 microbatches, 2 pipeline ranks (local
processes, gloo, one thread each). Every rank builds two pipelines of the same seeded
model: one with ``build_stage(..., compile=True)`` (each decoder layer compiled in place
with inductor, Note [compiled stages] in ``fxpp.runtime.compiled``), one eager. Per
schedule:

* warm-up: ``--warmup`` steps of each; the compiled pipeline's first step compiles, and
  its compile events and seconds are read from ``fxpp.compile_stats()`` (rank 0's and
  the slowest rank's seconds; compiles per rank);
* ``--repeats`` timed rounds, each one step of the eager pipeline then one of the
  compiled one (interleaved, so machine noise hits both alike). Ranks start every step
  together (barrier, untimed); a step's time is the slowest rank's ``schedule.step +
  opt.step`` (AdamW).

Rows report the median step of each, ``speedup = eager / compiled`` (above 1: compiled is
faster), and the last step's loss difference between the two pipelines (same data, same
optimizer: inductor's float reordering only).

Run:  PYTHONPATH=. python benchmarks/bench_compile.py [--schedules 1F1B,ZBVZeroBubble] [--repeats 10]
          [--warmup 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import fxpp
from _common import default_json_path, report, schedules_arg, start, values_or_exit
from bench_schedules import BATCH, MICROBATCHES, MODEL_NAME, SEQ, rank_pipeline, schedule_step

RANKS = 2
KNOWN = ("1F1B", "ZBVZeroBubble", "GPipe", "Interleaved1F1B", "InterleavedZeroBubble", "DualPipeV", "LoopedBFS")


def _pipeline(rank: int, world: int, schedule: str, compile: bool):
    rp = rank_pipeline(rank, world, torch.device("cpu"), schedule)
    stages = [rp.pipe.build_stage(i, "cpu", style=rp.style, compile=compile) for i in rp.ids]
    loss_fn = fxpp.causal_lm_loss(rp.labels, rp.microbatches)
    sched = fxpp.schedule(schedule, stages, rp.microbatches, loss_fn)
    params = list({id(p): p for st in stages for p in st.submod.parameters()}.values())
    return rp, sched, loss_fn, torch.optim.AdamW(params, lr=1e-3), any(st.is_last for st in stages)


def _step(run) -> tuple[float, float | None]:
    rp, sched, loss_fn, opt, holds_last = run
    dist.barrier()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    losses = schedule_step(sched, rp.batch, rp.labels, holds_last)
    opt.step()
    return time.perf_counter() - t0, float(loss_fn.whole_batch(losses)) if holds_last else None


def _rank_job(rank: int, world: int, workdir: str, schedules: list[str], repeats: int, warmup: int) -> dict:
    out = {}
    for schedule in schedules:
        eager, compiled = _pipeline(rank, world, schedule, False), _pipeline(rank, world, schedule, True)
        before = fxpp.compile_stats()
        t0 = time.perf_counter()
        first_s = _step(compiled)[0]  # compiles
        for _ in range(warmup - 1):
            _step(compiled)
        stats = fxpp.compile_stats()
        warm_s = time.perf_counter() - t0
        for _ in range(warmup):
            _step(eager)
        times = {"eager": [], "compiled": []}
        loss = {}
        for _ in range(repeats):
            for name, run in (("eager", eager), ("compiled", compiled)):
                dt, loss[name] = _step(run)
                times[name].append(dt)
        out[schedule] = {"times": times, "loss": loss, "first_step_s": first_s, "warmup_s": warm_s,
                         "compiles": stats["compiles"] - before["compiles"],
                         "compile_s": stats["compile_s"] - before["compile_s"]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedules", default="1F1B,ZBVZeroBubble")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3000)
    ap.add_argument("--json", default=default_json_path("bench_compile"))
    args = ap.parse_args(argv)
    schedules = schedules_arg(ap, args.schedules, KNOWN)
    env = start("cpu", threads=1, spawned=True, ranks=RANKS, backend="gloo", model=MODEL_NAME,
                batch=f"{BATCH}x{SEQ}", microbatches=MICROBATCHES, compile_backend="inductor")
    from fxpp.trainer.launch import run_ranks  # start-up: the launcher is needed only here

    results = values_or_exit(run_ranks(_rank_job, RANKS, schedules, args.repeats, max(1, args.warmup),
                                       timeout_s=args.timeout, pg_timeout_s=args.timeout, threads=1), "bench")
    rows = []
    for schedule in schedules:
        per_rank = [r[schedule] for r in results]
        med = {}
        for name in ("eager", "compiled"):
            slowest = [max(ts) for ts in zip(*(p["times"][name] for p in per_rank))]  # per round, slowest rank
            med[name] = statistics.median(slowest)
        losses = [p["loss"] for p in per_rank if p["loss"].get("eager") is not None][0]
        rows.append({"model": MODEL_NAME, "ranks": RANKS, "schedule": schedule, "microbatches": MICROBATCHES,
                     "eager step ms (median)": med["eager"] * 1e3, "compiled step ms (median)": med["compiled"] * 1e3,
                     "speedup (eager/compiled)": med["eager"] / med["compiled"],
                     "tokens/s eager": BATCH * SEQ / med["eager"], "tokens/s compiled": BATCH * SEQ / med["compiled"],
                     "compiles per rank": [p["compiles"] for p in per_rank],
                     "compile s (slowest rank)": max(p["compile_s"] for p in per_rank),
                     "first compiled step s": max(p["first_step_s"] for p in per_rank),
                     "loss diff": abs(losses["eager"] - losses["compiled"]), "repeats": args.repeats})
    columns = ["schedule", "eager step ms (median)", "compiled step ms (median)", "speedup (eager/compiled)",
               "compiles per rank", "compile s (slowest rank)", "first compiled step s", "loss diff"]
    report(rows, columns, env, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

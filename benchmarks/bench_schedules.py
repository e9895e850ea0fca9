"""Training throughput of fxpp pipelines per schedule, against one process and the bubble bound.

A CPU-sized Llama (hidden 256, 8 layers, intermediate 688, 8 heads / 4 KV heads, vocab 1000,
fp32, seeded random weights), global batch 16 x seq 64 (1024 tokens), 8 microbatches of
2 x 64. One training step = forward + backward + AdamW step over the whole global batch.

* ``1 process``: the unpatched ``LlamaForCausalLM`` (``model(**batch, labels=...)``) in
  one process: the baseline. Rank 0 of each N-rank run times it, interleaved with the
  schedules (the other ranks wait at a barrier), so baseline and pipelines see the same
  machine noise; each N-rank block of the table has its own baseline row. Every
  pipeline's last-step loss is checked against the baseline's after as many steps
  (``loss_diff_vs_1proc``).
* each schedule of ``fxpp.runtime.placement.SCHEDULES`` on 2 and 4 ranks: ``fxpp.pipeline(model,
  stages)`` with the cost model's balanced split (stages = ranks, or 2 x ranks for the
  schedules whose ranks hold two stages; placement as in ``fxpp.runtime.placement.MULTI_STAGE``), one
  ``PipelineStage`` per stage, ``fxpp.causal_lm_loss``, AdamW over the rank's own
  parameters. Ranks start every step together (barrier, untimed); a step's time is the
  slowest rank's ``schedule.step + opt.step``.

Each pipeline row reports the median step over --steps after --warmup steps, tokens/s,
speedup = tokens/s / tokens/s(1 process), efficiency = speedup / ranks, and the ideal
bubble bound m / (m + p - 1) with p = ranks, m = microbatches (the efficiency of a
perfectly balanced 1F1B/GPipe with free communication; schedules with two stages per rank
can in principle exceed it, their bound being m / (m + (p - 1) / 2)). ``cpu/wall`` is
each process's CPU seconds per wall second over the timed steps, averaged over ranks:
a pipeline rank is below 1 while it waits for activations or gradients (bubbles,
communication) or when other work on the machine takes its core; the baseline never
waits, so its value is the machine's contention alone. On a shared machine compare
the two before reading the speedups.

CPU (default): ranks are local processes spawned here, gloo, file rendezvous, and every
process (the baseline's included) runs with ``torch.set_num_threads(1)``, so that 2 ranks
on a 2-core machine compare fairly against 1 process on 1 core. With more ranks than cores
the ranks share cores: a warning is printed and the numbers measure oversubscription.

CUDA: ``torchrun --nproc-per-node N benchmarks/bench_schedules.py`` (detected from
RANK / WORLD_SIZE; NCCL when CUDA is present, else gloo): ranks = WORLD_SIZE, one GPU
per rank (cuda:LOCAL_RANK); rank 0 runs the baseline on its GPU; rank 0 prints.

The baseline runs the whole batch at once, so the cost of small microbatch matmuls
counts as bubble here; ``bench_efficiency.py`` compares like for like (gradient
accumulation over the same microbatches, and hand-written stages under the same
schedule), ``bench_timeline.py`` measures where each rank's time goes.

Run:  PYTHONPATH=. python benchmarks/bench_schedules.py [--ranks 2,4] [--schedules GPipe,1F1B,...]
          [--steps 3] [--warmup 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

import fxpp
from fxpp.runtime.placement import MULTI_STAGE, SCHEDULES
from _common import (default_json_path, gather, print_header, report, schedules_arg, start, torchrun_group,
                     under_torchrun)

BATCH, SEQ, MICROBATCHES = 16, 64, 8
MODEL_NAME = "llama-h256-L8-v1000"


def build_model(device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().to(device).train()


def make_batch(vocab: int, device) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    return batch, batch["input_ids"]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class RankPipeline:
    """The benchmark model, its batch, fxpp's pipeline of it for one schedule and the ids of
    this rank's stages (:func:`rank_pipeline`)."""

    model: torch.nn.Module
    batch: dict
    labels: torch.Tensor
    pipe: "fxpp.Pipeline"
    ids: list[int]
    style: str
    microbatches: int

    def schedule(self, schedule: str, device):
        """This rank's stages, a schedule over them with the causal-LM loss, the loss, the
        stages' parameters (a tied weight once), and whether the rank holds the last stage."""
        from fxpp.runtime.schedule import make_schedule

        stages = [self.pipe.build_stage(i, device, style=self.style) for i in self.ids]
        loss_fn = fxpp.causal_lm_loss(self.labels, self.microbatches)
        sched = make_schedule(schedule, stages, self.microbatches, loss_fn)
        params = list({id(p): p for st in stages for p in st.submod.parameters()}.values())
        return stages, sched, loss_fn, params, any(st.is_last for st in stages)


def schedule_step(sched, batch: dict, labels: torch.Tensor, holds_last: bool) -> list:
    """One step of ``sched`` over ``batch``; the rank holding the last stage passes the
    labels and gets the microbatch losses back (an empty list on the other ranks)."""
    losses: list = []
    if holds_last:
        sched.step(**batch, target=labels, losses=losses)
    else:
        sched.step(**batch)
    return losses


def rank_pipeline(rank: int, world: int, device, schedule: str, microbatches: int = MICROBATCHES) -> RankPipeline:
    """The pipeline every rank builds for ``schedule`` (two stages a rank for multi-stage
    schedules), traced for one microbatch of the global batch."""
    model = build_model(device)
    batch, labels = make_batch(model.config.vocab_size, device)
    num_stages = world * (2 if schedule in MULTI_STAGE else 1)
    style = MULTI_STAGE.get(schedule, "loop")
    mb = BATCH // microbatches
    pipe = fxpp.pipeline(model, num_stages, example_inputs={k: v[:mb] for k, v in batch.items()})
    ids = fxpp.stage_ids_of_rank(rank, num_stages, world, style)
    return RankPipeline(model, batch, labels, pipe, ids, style, microbatches)


class Baseline:
    """The unpatched model trained on the whole global batch in one process, a few steps at a time."""

    def __init__(self, device):
        self.device = device
        self.model = build_model(device)
        self.batch, self.labels = make_batch(self.model.config.vocab_size, device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.losses: list[float] = []  # loss of every step so far, in order
        self.samples: list[float] = []  # timed step seconds
        self.cpu: list[float] = []  # CPU seconds of this process in those steps

    def run(self, n: int, timed: bool = True) -> None:
        for _ in range(n):
            sync(self.device)
            t0, c0 = time.perf_counter(), time.process_time()
            self.opt.zero_grad(set_to_none=True)
            loss = self.model(**self.batch, labels=self.labels).loss
            loss.backward()
            self.opt.step()
            sync(self.device)
            if timed:
                self.samples.append(time.perf_counter() - t0)
                self.cpu.append(time.process_time() - c0)
            self.losses.append(float(loss.detach()))


def pipeline_step_times(rank: int, world: int, schedule: str, device, steps: int, warmup: int) -> dict:
    """This rank's step times for ``schedule`` (every rank calls this together)."""
    t_setup = time.perf_counter()
    rp = rank_pipeline(rank, world, device, schedule)
    pipe, ids, batch, labels = rp.pipe, rp.ids, rp.batch, rp.labels
    stages, sched, loss_fn, params, holds_last = rp.schedule(schedule, device)
    opt = torch.optim.AdamW(params, lr=1e-3)
    setup_s = time.perf_counter() - t_setup
    times, cpu, last_loss = [], [], None
    for i in range(warmup + steps):
        dist.barrier()
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        losses = schedule_step(sched, batch, labels, holds_last)
        opt.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        if holds_last:
            last_loss = float(loss_fn.whole_batch(losses))
    return {"rank": rank, "stages": ids, "layers": [list(pipe.layer_ranges[i]) for i in ids], "step_s": times,
            "cpu_s": cpu, "loss": last_loss, "setup_s": setup_s}


def run_schedules(rank: int, world: int, device, schedules: list[str], steps: int, warmup: int) -> dict:
    """Every schedule on this rank; errors are results (the other ranks are told by gloo/NCCL failing).

    Rank 0 also times the 1-process baseline, interleaved with the schedules so that
    machine noise hits both alike: ``warmup + steps`` steps first (the loss sequence the
    pipelines must reproduce), then ``max(1, steps // 2)`` more before each schedule,
    while the other ranks wait at a barrier.
    """
    out: dict = {}
    base = None
    if rank == 0:
        base = Baseline(device)
        base.run(warmup, timed=False)
        base.run(steps)
    for schedule in schedules:
        if base is not None:
            base.run(max(1, steps // 2))
        dist.barrier()
        try:
            out[schedule] = pipeline_step_times(rank, world, schedule, device, steps, warmup)
        except Exception as e:  # noqa: BLE001 -- a failure is a result here
            out[schedule] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                             "traceback": traceback.format_exc()}
            break  # the process group is in an unknown state after a failed collective
    if base is not None:
        out["_baseline"] = {"step_s": base.samples, "cpu_s": base.cpu, "loss": base.losses[warmup + steps - 1]}
    return out


def _rank_job(rank: int, world: int, workdir: str, schedules: list[str], steps: int, warmup: int) -> dict:
    return run_schedules(rank, world, torch.device("cpu"), schedules, steps, warmup)


def spawn(world: int, schedules: list[str], steps: int, warmup: int, timeout_s: float) -> list[dict]:
    """Local gloo ranks through fxpp's own launcher (one thread each)."""
    from fxpp.trainer.launch import run_ranks

    results = run_ranks(_rank_job, world, schedules, steps, warmup, timeout_s=timeout_s, pg_timeout_s=120, threads=1)
    return [r["value"] if r["ok"] else {"_fatal": {"error": r["error"], "traceback": r.get("traceback", "")}}
            for r in results]


def baseline_row(world: int, per_rank: list[dict]) -> dict | None:
    """The 1-process row from the samples rank 0 took during the ``world``-rank run."""
    b = per_rank[0].get("_baseline")
    if b is None:
        return None
    med = statistics.median(b["step_s"])
    return {"schedule": "1 process (unpatched)", "ranks": 1, "stages": 1, "microbatches": 1,
            "steps": len(b["step_s"]), "step_ms": med * 1e3, "tokens_per_s": BATCH * SEQ / med,
            "speedup_vs_1proc": 1.0, "efficiency": 1.0, "ideal_bound": 1.0, "step_min_ms": min(b["step_s"]) * 1e3,
            "cpu/wall": sum(b["cpu_s"]) / sum(b["step_s"]), "final_loss": b["loss"],
            "measured_during": f"{world}-rank run"}


def rows_for(world: int, per_rank: list[dict], schedules: list[str], steps: int) -> list[dict]:
    """The baseline's row, then one per schedule.

    ``final_loss`` (the last step's loss) must equal the baseline's after as many steps:
    same model, data and optimizer; ``loss_diff_vs_1proc`` shows it.
    """
    base = baseline_row(world, per_rank)
    rows = [base] if base else []
    tokens = BATCH * SEQ
    for schedule in schedules:
        entries = [r.get(schedule) or r.get("_fatal") for r in per_rank]
        num_stages = world * (2 if schedule in MULTI_STAGE else 1)
        row = {"schedule": schedule, "ranks": world, "stages": num_stages, "microbatches": MICROBATCHES,
               "steps": steps}
        errors = [(rank, e) for rank, e in enumerate(entries) if e is None or "error" in e]
        if errors:
            rank, e = errors[0]
            row["error"] = f"rank {rank}: " + (e["error"] if e else "did not get to this schedule")
            if e and e.get("traceback"):
                print(f"# {schedule} x{world} rank {rank} traceback:\n{e['traceback']}", file=sys.stderr)
            rows.append(row)
            continue
        # A step ends when the slowest rank is done: per step, the max over ranks.
        step_s = [max(ts) for ts in zip(*(e["step_s"] for e in entries))]
        med = statistics.median(step_s)
        tok_s = tokens / med
        speedup = tok_s / base["tokens_per_s"] if base else None
        row.update({
            "step_ms": med * 1e3,
            "tokens_per_s": tok_s,
            "speedup_vs_1proc": speedup,
            "efficiency": speedup / world if base else None,
            "ideal_bound": MICROBATCHES / (MICROBATCHES + world - 1),
            "eff/ideal": speedup / world / (MICROBATCHES / (MICROBATCHES + world - 1)) if base else None,
            "step_min_ms": min(step_s) * 1e3,
            "cpu/wall": statistics.mean(sum(e["cpu_s"]) / sum(e["step_s"]) for e in entries),
            "setup_s": max(e["setup_s"] for e in entries),
            "stage_layers": {f"rank{e['rank']}": e["layers"] for e in entries},
            "final_loss": next((e["loss"] for e in entries if e.get("loss") is not None), None),
        })
        if base and row["final_loss"] is not None:
            row["loss_diff_vs_1proc"] = abs(row["final_loss"] - base["final_loss"])
        rows.append(row)
    return rows


COLUMNS = ["schedule", "ranks", "stages", "microbatches", "step_ms", "tokens_per_s", "speedup_vs_1proc", "efficiency",
           "ideal_bound", "eff/ideal", "cpu/wall", "loss_diff_vs_1proc", "error"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,4", help="comma list of rank counts (ignored under torchrun)")
    ap.add_argument("--schedules", default=",".join(SCHEDULES), help="comma list of " + ",".join(SCHEDULES))
    ap.add_argument("--steps", type=int, default=3, help="timed steps per schedule (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per schedule first")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for one spawned run of all schedules")
    ap.add_argument("--json", default=default_json_path("bench_schedules"))
    args = ap.parse_args()
    schedules = schedules_arg(ap, args.schedules, SCHEDULES)
    torch.set_num_threads(1)

    if under_torchrun():
        torchrun_main(args, schedules)
        return

    env = start(threads=1, spawned=True)
    print(f"# {MODEL_NAME}, global batch {BATCH}x{SEQ} = {BATCH * SEQ} tokens, {MICROBATCHES} microbatches; "
          f"gloo, spawned local processes, torch.set_num_threads(1) in every process (baseline included)", flush=True)
    rows = []
    for world in [int(r) for r in args.ranks.split(",") if r]:
        if world > (os.cpu_count() or 1):
            print(f"# WARNING: {world} ranks on {os.cpu_count()} cores: ranks share cores (oversubscribed); "
                  f"the {world}-rank rows measure time-slicing, not pipeline parallelism", flush=True)
        t0 = time.perf_counter()
        per_rank = spawn(world, schedules, args.steps, args.warmup, args.timeout)
        if any("_fatal" in r for r in per_rank):
            fatal = next(r["_fatal"] for r in per_rank if "_fatal" in r)
            print(f"# {world} ranks: {fatal['error']}\n{fatal.get('traceback', '')}", file=sys.stderr)
        rows += rows_for(world, per_rank, schedules, args.steps)
        print(f"# {world} ranks done ({time.perf_counter() - t0:.0f}s)", flush=True)
    report(rows, COLUMNS, env, args.json)


def torchrun_main(args, schedules: list[str]) -> None:
    with torchrun_group(args.timeout) as (rank, world, device, env):
        if rank == 0:
            print_header(env)
            print(f"# {MODEL_NAME}, global batch {BATCH}x{SEQ} = {BATCH * SEQ} tokens, {MICROBATCHES} microbatches",
                  flush=True)
            if device.type == "cpu" and world > (os.cpu_count() or 1):
                print(f"# WARNING: {world} ranks on {os.cpu_count()} cores: oversubscribed", flush=True)
        gathered = gather(run_schedules(rank, world, device, schedules, args.steps, args.warmup))
        if rank == 0:
            report(rows_for(world, gathered, schedules, args.steps), COLUMNS, env, args.json)


if __name__ == "__main__":
    main()

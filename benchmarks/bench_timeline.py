"""Measured pipeline timelines: when each rank computed, waited for a message, or sat idle.

Terms:

* **F m / B m / W m**: a stage's forward, backward and backward-weight of microbatch ``m``:
  the time spent inside the stage object's ``forward_one_chunk``, ``backward_one_chunk``
  and ``backward_weight_one_chunk``. Under ZBVZeroBubble ``B`` computes the input
  gradients only (``full_backward=False``) and ``W`` the weight gradients later; under
  1F1B ``B`` is the whole backward. **loss**: the schedule's ``_maybe_compute_loss``
  after a last-stage forward.
* **wait**: time blocked in a point-to-point wait of the schedule (receive of activations
  or gradients, or completion of a send), split by what was waited for (recv, send, or a
  fused send+recv batch).
* **post**: time inside the schedule's ``_batch_p2p`` (posting ``isend`` / ``irecv``,
  which with gloo may copy or hand over the message), drawn as a thin gray strip.
* **idle / other**: the rest of the step (blank in the plot): schedule bookkeeping,
  fxpp's per-step shape broadcast and tied-weight hook, and time the process was not
  scheduled on a core.

How it is measured: the benchmark (not the library) replaces, on each rank's stage
*objects*, ``forward_one_chunk`` / ``backward_one_chunk`` / ``backward_weight_one_chunk``
by wrappers that read ``time.perf_counter_ns()`` before and after, and wraps the torch
schedule object's ``_maybe_compute_loss`` the same way. For the waits it patches two
**private** helpers of ``torch.distributed.pipelining.schedules`` (torch 2.13):
``_batch_p2p`` (to tag each batch of work with recv / send from its ``P2POp``s) and
``_wait_batch_p2p`` (timed); both schedules call them by module-global name. A torch
release that renames them leaves the waits unmeasured (the script says so) but the
compute bars intact. Every step starts with ``dist.barrier()`` and each rank's clock
origin is read right after it, so ranks' clocks agree to the barrier's release skew
(tens of microseconds with gloo on one machine).

Setup: the Llama of ``bench_schedules.py`` (hidden 256, 8 layers, vocab 1000, fp32),
global batch 16 x 64 in 8 microbatches of 2 x 64, 2 gloo ranks with one thread each;
1F1B over 2 stages (layers 0-3 | 4-7 + norm + head) and ZBVZeroBubble over 4 stages in V
placement (rank 0: stages 0 and 3, rank 1: stages 1 and 2); forward + backward (no
optimizer step). ``--warmup`` steps first, then ``--steps`` recorded steps; the plot
shows the recorded step of median length, the JSON keeps them all.

Run:  PYTHONPATH=. python benchmarks/bench_timeline.py [--schedules 1F1B,ZBVZeroBubble] [--microbatches 8]
          [--steps 3] [--warmup 2] [--json PATH] [--plots DIR]
      PYTHONPATH=. python benchmarks/bench_timeline.py --plot-only   # redraw from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from fxpp.runtime.placement import MULTI_STAGE
from _common import ROOT, default_json_path, start, values_or_exit
from bench_schedules import BATCH, MODEL_NAME, SEQ, rank_pipeline, schedule_step

PLOT_NAMES = {"1F1B": "timeline_1f1b.png", "ZBVZeroBubble": "timeline_zbv.png"}


class Recorder:
    """Intervals ``(kind, stage, microbatch, start_ns, end_ns)`` of one rank, relative to ``origin``."""

    def __init__(self):
        self.origin = 0
        self.events: list[list] = []
        self.active = False

    def add(self, kind: str, stage, mb, t0: int, t1: int) -> None:
        if self.active:
            self.events.append([kind, stage, mb, t0 - self.origin, t1 - self.origin])


def instrument_stage(stage, rec: Recorder) -> None:
    """Time the stage object's compute entry points (instance attributes: the class is untouched)."""
    fwd, bwd, bwd_w = stage.forward_one_chunk, stage.backward_one_chunk, stage.backward_weight_one_chunk

    def forward_one_chunk(fwd_chunk_id, *args, **kwargs):
        t0 = time.perf_counter_ns()
        out = fwd(fwd_chunk_id, *args, **kwargs)
        rec.add("F", stage.stage_index, fwd_chunk_id, t0, time.perf_counter_ns())
        return out

    def backward_one_chunk(bwd_chunk_id, *args, **kwargs):
        t0 = time.perf_counter_ns()
        out = bwd(bwd_chunk_id, *args, **kwargs)
        rec.add("B", stage.stage_index, bwd_chunk_id, t0, time.perf_counter_ns())
        return out

    def backward_weight_one_chunk(bwd_chunk_id, *args, **kwargs):
        t0 = time.perf_counter_ns()
        out = bwd_w(bwd_chunk_id, *args, **kwargs)
        rec.add("W", stage.stage_index, bwd_chunk_id, t0, time.perf_counter_ns())
        return out

    stage.forward_one_chunk = forward_one_chunk
    stage.backward_one_chunk = backward_one_chunk
    stage.backward_weight_one_chunk = backward_weight_one_chunk


def instrument_loss(torch_schedule, rec: Recorder) -> None:
    inner = torch_schedule._maybe_compute_loss

    def _maybe_compute_loss(stage, output, target_mbs, mb_index, *args, **kwargs):
        t0 = time.perf_counter_ns()
        out = inner(stage, output, target_mbs, mb_index, *args, **kwargs)
        if stage.is_last:
            rec.add("loss", stage.stage_index, mb_index, t0, time.perf_counter_ns())
        return out

    torch_schedule._maybe_compute_loss = _maybe_compute_loss


def instrument_waits(rec: Recorder) -> bool:
    """Patch torch's private p2p helpers (see the module docstring); False when this torch lacks them."""
    from torch.distributed.pipelining import schedules

    batch_p2p, wait_batch_p2p = getattr(schedules, "_batch_p2p", None), getattr(schedules, "_wait_batch_p2p", None)
    if batch_p2p is None or wait_batch_p2p is None:
        return False
    kinds: dict[int, tuple[str, list]] = {}  # id(work list) -> (what it waits for, the list: keeps the id unique)

    def _batch_p2p(p2p_ops, desc=None):
        t0 = time.perf_counter_ns()
        work = batch_p2p(p2p_ops, desc=desc)
        ops = {p.op for p in p2p_ops}
        kind = "recv" if ops == {dist.irecv} else "send" if ops == {dist.isend} else "send+recv"
        kinds[id(work)] = (kind, work)
        if p2p_ops:
            rec.add("post", None, None, t0, time.perf_counter_ns())
        return work

    def _wait_batch_p2p(work):
        if not work:
            return wait_batch_p2p(work)
        t0 = time.perf_counter_ns()
        out = wait_batch_p2p(work)
        kind = kinds.pop(id(work), ("wait", None))[0]
        rec.add("wait " + kind, None, None, t0, time.perf_counter_ns())
        return out

    schedules._batch_p2p = _batch_p2p
    schedules._wait_batch_p2p = _wait_batch_p2p
    return True


def record(rank: int, world: int, device, schedule: str, microbatches: int, steps: int, warmup: int) -> dict:
    """This rank's events for ``warmup + steps`` steps of ``schedule`` over fxpp stages (every rank calls this)."""
    rp = rank_pipeline(rank, world, device, schedule, microbatches)
    pipe, ids, batch, labels = rp.pipe, rp.ids, rp.batch, rp.labels
    stages, sched, loss_fn, params, holds_last = rp.schedule(schedule, device)
    rec = Recorder()
    for st in stages:
        instrument_stage(st, rec)
    instrument_loss(sched.torch_schedule, rec)
    waits_measured = instrument_waits(rec)
    out_steps = []
    for i in range(warmup + steps):
        rec.events = []
        dist.barrier()
        rec.origin = time.perf_counter_ns()
        rec.active = i >= warmup
        for p in params:
            p.grad = None
        losses = schedule_step(sched, batch, labels, holds_last)
        end = time.perf_counter_ns() - rec.origin
        rec.active = False
        if i >= warmup:
            out_steps.append({"step_ns": end, "events": rec.events,
                              "loss": float(loss_fn.whole_batch(losses)) if holds_last else None})
    return {"rank": rank, "stages": ids, "layers": [list(pipe.layer_ranges[i]) for i in ids], "steps": out_steps,
            "waits_measured": waits_measured}


def _rank_job(rank: int, world: int, workdir: str, schedule: str, microbatches: int, steps: int, warmup: int):
    return record(rank, world, torch.device("cpu"), schedule, microbatches, steps, warmup)


def summarize(per_rank: list[dict], step: int) -> list[dict]:
    """Per rank: ms of compute, of waits and of the rest in recorded step ``step``; the step is the slowest rank's."""
    step_ns = max(r["steps"][step]["step_ns"] for r in per_rank)
    rows = []
    for r in per_rank:
        ev = r["steps"][step]["events"]
        total = {k: sum(e[4] - e[3] for e in ev if e[0] == k) for k in ("F", "B", "W", "loss")}
        wait = sum(e[4] - e[3] for e in ev if e[0].startswith("wait"))
        post = sum(e[4] - e[3] for e in ev if e[0] == "post")
        compute = sum(total.values())
        rows.append({"rank": r["rank"], "stages": r["stages"], "step_ms": step_ns / 1e6,
                     "F_ms": total["F"] / 1e6, "B_ms": total["B"] / 1e6, "W_ms": total["W"] / 1e6,
                     "loss_ms": total["loss"] / 1e6, "compute_ms": compute / 1e6, "wait_ms": wait / 1e6,
                     "post_ms": post / 1e6, "idle_other_ms": (step_ns - compute - wait - post) / 1e6, "busy_share": compute / step_ns})
    return rows


def median_step(per_rank: list[dict]) -> int:
    lengths = [max(r["steps"][i]["step_ns"] for r in per_rank) for i in range(len(per_rank[0]["steps"]))]
    return sorted(range(len(lengths)), key=lengths.__getitem__)[len(lengths) // 2]


COLORS = {"F": ("#4c9be8", "#1f5fa8"), "B": ("#e8834c", "#b0501b"), "W": ("#6cbf6f", "#2e8232"),
          "loss": ("#9e9e9e", "#9e9e9e")}
WAIT_COLORS = {"wait recv": "#f4c7c7", "wait send": "#f7e3b5", "wait send+recv": "#e3c9ef", "wait wait": "#dddddd"}


def draw(entry: dict, path: str) -> None:
    """One bar row per rank: compute labelled F0/B0/W0, waits shaded, idle blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    per_rank = entry["per_rank"]
    step = entry["plotted_step"]
    world = len(per_rank)
    end_ms = max(r["steps"][step]["step_ns"] for r in per_rank) / 1e6
    fig, ax = plt.subplots(figsize=(15, 1.2 + 1.1 * world))
    for r in per_rank:
        y = world - 1 - r["rank"]
        own = r["stages"]
        for kind, stage, mb, t0, t1 in r["steps"][step]["events"]:
            x, w = t0 / 1e6, (t1 - t0) / 1e6
            if kind == "post":
                ax.add_patch(plt.Rectangle((x, y + 0.1), max(w, end_ms / 2000), 0.12, color="#777777", lw=0))
                continue
            if kind.startswith("wait"):
                ax.add_patch(plt.Rectangle((x, y + 0.1), w, 0.8, color=WAIT_COLORS.get(kind, "#dddddd"), lw=0))
                continue
            color = COLORS[kind][own.index(stage) if stage in own else 0]
            ax.add_patch(plt.Rectangle((x, y + 0.1), w, 0.8, facecolor=color, edgecolor="white", lw=0.4))
            if kind != "loss" and w > end_ms / 140:
                ax.text(x + w / 2, y + 0.5, f"{kind}{mb}", ha="center", va="center", fontsize=6.5, color="white")
        ax.plot([r["steps"][step]["step_ns"] / 1e6] * 2, [y + 0.05, y + 0.95], color="black", lw=0.8)
    labels = []
    for r in per_rank:
        ids = r["stages"]
        lay = ["-".join(str(x) for x in (l[0], l[-1])) if l else "-" for l in r["layers"]]
        labels.append(f"rank {r['rank']}\nstage{'s' if len(ids) > 1 else ''} "
                      + ", ".join(f"{s} (L{ly})" for s, ly in zip(ids, lay)))
    ax.set_yticks([world - 1 - r + 0.5 for r in range(world)], labels, fontsize=8)
    ax.set_xlim(0, end_ms * 1.01)
    ax.set_ylim(0, world)
    ax.set_xlabel("ms since the step's barrier")
    handles = [Patch(color=COLORS["F"][0], label="F forward"), Patch(color=COLORS["B"][0], label="B backward"
                                                                      + (" (input grads)" if entry["has_W"] else ""))]
    if entry["has_W"]:
        handles.append(Patch(color=COLORS["W"][0], label="W backward (weight grads)"))
    if entry["multi_stage"]:
        handles.append(Patch(color=COLORS["F"][1], label="darker: the rank's second stage"))
    handles.append(Patch(color=COLORS["loss"][0], label="loss"))
    handles += [Patch(color=c, label=k.replace("wait ", "wait: ")) for k, c in WAIT_COLORS.items()
                if any(e[0] == k for r in per_rank for e in r["steps"][step]["events"])]
    handles.append(Patch(color="#777777", label="thin strip: posting isend/irecv"))
    handles.append(Patch(facecolor="white", edgecolor="gray", label="blank: idle / other"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.35 - 0.05 * (3 - world)), ncol=5, fontsize=7.5,
              frameon=False)
    rows = entry["summary"]
    busy = ", ".join(f"rank {s['rank']} {s['busy_share']:.0%}" for s in rows)
    ax.set_title(f"{entry['schedule']}: {world} ranks, {entry['num_stages']} stages, {entry['microbatches']} "
                 f"microbatches, measured step {end_ms:.0f} ms (compute share: {busy})", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    from fxpp.trainer.launch import run_ranks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedules", default="1F1B,ZBVZeroBubble")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=8, help="4-16; the global batch is 16 x 64")
    ap.add_argument("--steps", type=int, default=3, help="recorded steps (the plot shows the median one)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=default_json_path("bench_timeline"))
    ap.add_argument("--plots", default=os.path.join(ROOT, "docs", "plots"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the plots from --json, run nothing")
    args = ap.parse_args()
    if args.plot_only:
        with open(args.json) as f:
            entries = [json.loads(line) for line in f if line.strip()]
        for e in entries:
            if e.get("schedule") in PLOT_NAMES:
                draw(e, os.path.join(args.plots, PLOT_NAMES[e["schedule"]]))
        print(f"# redrew {len(entries)} plots from {args.json}")
        return
    if BATCH % args.microbatches:
        ap.error(f"--microbatches {args.microbatches} must divide the batch {BATCH}")
    env = start(threads=1, spawned=True)
    print(f"# {MODEL_NAME}, global batch {BATCH}x{SEQ}, {args.microbatches} microbatches, {args.ranks} gloo ranks, "
          f"forward+backward only", flush=True)
    entries = []
    for schedule in [s for s in args.schedules.split(",") if s]:
        results = run_ranks(_rank_job, args.ranks, schedule, args.microbatches, args.steps, args.warmup,
                            timeout_s=600, pg_timeout_s=120, threads=1)
        per_rank = values_or_exit(results, schedule)
        step = median_step(per_rank)
        summary = summarize(per_rank, step)
        kinds = {e[0] for r in per_rank for s in r["steps"] for e in s["events"]}
        entry = {**env, "schedule": schedule, "ranks": args.ranks, "num_stages": args.ranks * (2 if schedule in MULTI_STAGE else 1),
                 "microbatches": args.microbatches, "multi_stage": schedule in MULTI_STAGE, "has_W": "W" in kinds,
                 "waits_measured": all(r["waits_measured"] for r in per_rank), "plotted_step": step,
                 "step_ms_all": [max(r["steps"][i]["step_ns"] for r in per_rank) / 1e6 for i in range(args.steps)],
                 "loss": next(s["loss"] for r in per_rank for s in r["steps"] if s["loss"] is not None),
                 "summary": summary, "per_rank": per_rank}
        entries.append(entry)
        print(f"\n{schedule}: steps {', '.join(f'{t:.0f}' for t in entry['step_ms_all'])} ms; plotted step {step} "
              f"(median); loss {entry['loss']:.6f}; waits measured: {entry['waits_measured']}")
        cols = ["rank", "stages", "step_ms", "F_ms", "B_ms", "W_ms", "loss_ms", "compute_ms", "wait_ms", "post_ms", "idle_other_ms",
                "busy_share"]
        print(" | ".join(cols))
        for s in summary:
            print(" | ".join(f"{s[c]:.1f}" if isinstance(s[c], float) and c != "busy_share" else
                             f"{s[c]:.3f}" if c == "busy_share" else str(s[c]) for c in cols))
        if schedule in PLOT_NAMES:
            path = os.path.join(args.plots, PLOT_NAMES[schedule])
            draw(entry, path)
            print(f"# drew {path}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        for e in entries:
            f.write(json.dumps(e) + "\n")
    print(f"# wrote {len(entries)} entries to {args.json}")


if __name__ == "__main__":
    main()

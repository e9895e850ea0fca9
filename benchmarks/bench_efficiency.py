"""Pipeline efficiency like-for-like: fxpp's stages against gradient accumulation and hand-written stages.

Terms:

* **step**: forward + backward of the whole global batch (16 x 64 tokens, the Llama of
  ``bench_schedules.py``: hidden 256, 8 layers, vocab 1000, fp32) in ``M`` = 8
  microbatches of 2 x 64, gradients zeroed first (``set_to_none``). No optimizer step:
  weights never change, so every step of every variant must give the same loss, and
  that is checked. A pipeline step's time is the slowest rank's ``schedule.step``.
* **accumulation** (baseline a): one process, the unpatched ``LlamaForCausalLM`` run on
  the *same* 8 microbatches one after another, ``loss.backward()`` each (gradient
  accumulation), the same loss function, gradients divided by ``M`` as the schedules do.
  It pays the same small-microbatch matmul costs as a pipeline, so
  ``efficiency = T(accumulation) / (ranks x T(pipeline))`` counts only bubbles and
  communication, against the bound ``M / (M + ranks - 1)``.
* **whole batch**: the same model on the 16 x 64 batch at once (what
  ``bench_schedules.py`` compares with); ``T(accumulation) / T(whole batch)`` is the cost
  of microbatching itself, which that benchmark counts as bubble.
* **fxpp**: ``fxpp.pipeline(model, stages)`` and ``pipe.build_stage`` on every rank,
  ``fxpp.schedule``'s wrapper of the torch schedule (as ``fxpp run`` does).
* **hand** (baseline b): the same schedule class of ``torch.distributed.pipelining`` over
  ``PipelineStage``s of :class:`HandLlamaStage`: the model's own modules in a plain
  ``nn.Module`` per stage, with the same layers per stage as fxpp's split. The first
  stage embeds, every stage builds position ids, the causal mask
  (``transformers.masking_utils.create_causal_mask``) and the rotary embeddings the way
  ``LlamaModel.forward`` does, the last applies the final norm and the head. A stage
  sends the hidden states and the padding mask (fxpp sends the hidden states and one
  int64 tensor packing its header, the padding mask and the position ids: Note [packed
  slots] in ``fxpp.layout``; two messages per microbatch and cut in both).

* **hand copy** (the A/A control): a second, independently built copy of *hand*. Two
  builds of the same code differ in where the allocator put their tensors and so in
  cache and page behaviour, and the machine's noise does not average out in a few dozen
  repeats; ``hand copy / hand`` shows how far two identical variants drift apart in this
  run (on the 2-core machine of ``docs/benchmarks.md``, 0.96-1.00 by schedule): a
  ``fxpp / hand`` inside that spread is not an overhead this run resolves.

Per variant the time inside torch's own ``schedule.step`` is kept apart
(``torch_step_ms``; ``torch_step_vs_hand``: the stages alone under the same schedule)
from the time around it (``around_ms``: for fxpp, what ``fxpp.schedule`` adds, the
broadcast of the step's sizes and the all-reduce of the header flags; for hand,
nothing but the benchmark's own loop).

Every rank holds every variant of every schedule at once (own seeded model copies). The
run goes in ``--rounds`` rounds; each round builds every variant afresh (their build
order rotated from round to round, so no variant keeps one placement) and runs its share
of the ``--repeats`` repeats. In each repeat, rank 0 times accumulation and whole batch
while the other ranks wait at a barrier, then each schedule runs ``--steps`` steps of
each variant back to back, their order rotated between repeats. So machine noise lands
on the variants alike; ``fxpp / hand`` (and ``hand copy / hand``) is computed per repeat
and reported as the median over all repeats with its spread (min, max and the
interquartile range) and a distribution-free 95 % confidence interval of that median
(order statistics).

CPU: local gloo processes, one thread each (the baseline too), 2 ranks by default.
CUDA: ``torchrun --nproc-per-node N benchmarks/bench_efficiency.py`` (NCCL, one GPU
per rank, rank 0 times the baselines on its GPU; not run here).

Run:  PYTHONPATH=. python benchmarks/bench_efficiency.py [--ranks 2] [--schedules GPipe,1F1B,...]
          [--repeats 30] [--rounds 3] [--steps 1] [--no-control] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

import fxpp
from fxpp.runtime.placement import MULTI_STAGE, SCHEDULES
from _common import (default_json_path, gather, print_header, report, schedules_arg, start, torchrun_group,
                     under_torchrun, values_or_exit)
from bench_schedules import (BATCH, MICROBATCHES, MODEL_NAME, SEQ, build_model, make_batch, rank_pipeline,
                             schedule_step)

DEFAULT_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble")
CONTROL = "hand copy"  # the A/A control: a second build of the hand-written stages


class HandLlamaStage(nn.Module):
    """Layers ``layers`` of a ``LlamaForCausalLM`` as a hand-written pipeline stage.

    first: ``forward(input_ids=..., attention_mask=...)`` -> ``(hidden, attention_mask)``;
    middle: ``forward(hidden, attention_mask)`` -> ``(hidden, attention_mask)``;
    last: ``forward(hidden, attention_mask)`` -> logits. Keyword inputs a schedule hands
    to non-first stages are ignored. The modules are the model's own (not copies).
    """

    def __init__(self, model, layers: range, *, first: bool, last: bool):
        super().__init__()
        inner = model.model
        self.config = model.config
        self.first, self.last = first, last
        self.embed_tokens = inner.embed_tokens if first else None
        self.layers = nn.ModuleList(inner.layers[i] for i in layers)
        self.rotary_emb = inner.rotary_emb
        self.norm = inner.norm if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, *args, **kwargs):
        from transformers.masking_utils import create_causal_mask

        if self.first:
            hidden = self.embed_tokens(kwargs["input_ids"])
            attention_mask = kwargs.get("attention_mask")
        else:
            hidden, attention_mask = args
        # As LlamaModel.forward: positions 0..seq-1, the model's mask function, its rotary module.
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, position_ids=position_ids)
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                           position_ids=position_ids, cache=None, use_cache=False)
        if self.last:
            return self.lm_head(self.norm(hidden))
        return hidden, attention_mask


def hand_stage(model, index: int, layer_ranges: list[range], device, mb: int):
    """A torch ``PipelineStage`` of :class:`HandLlamaStage` with static shapes for microbatches of ``mb`` x SEQ."""
    from torch.distributed.pipelining import PipelineStage

    n = len(layer_ranges)
    first, last = index == 0, index == n - 1
    module = HandLlamaStage(model, layer_ranges[index], first=first, last=last)
    hidden = model.config.hidden_size

    def crossing():
        return (torch.empty(mb, SEQ, hidden, device=device, requires_grad=True),
                torch.empty(mb, SEQ, dtype=torch.int64, device=device))

    inputs = () if first else crossing()
    outputs = (torch.empty(mb, SEQ, model.config.vocab_size, device=device),) if last else crossing()
    return PipelineStage(module, index, n, device, input_args=inputs, output_args=outputs)


def torch_schedule(name: str, stages: list, loss_fn):
    from torch.distributed.pipelining import schedules

    cls = getattr(schedules, f"Schedule{name}")
    if issubclass(cls, schedules.PipelineScheduleSingle):
        (stage,) = stages
        return cls(stage, n_microbatches=MICROBATCHES, loss_fn=loss_fn)
    return cls(stages, n_microbatches=MICROBATCHES, loss_fn=loss_fn)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One schedule over this rank's stages (fxpp's or hand-written), stepped and timed."""

    def __init__(self, schedule: str, kind: str, rank: int, world: int, device):
        self.schedule, self.kind, self.device = schedule, kind, device
        mb = BATCH // MICROBATCHES
        # The split is fxpp's in both variants (the hand-written stages take its layer ranges).
        rp = rank_pipeline(rank, world, device, schedule)
        self.model, self.batch, self.labels = rp.model, rp.batch, rp.labels
        self.layer_ranges = [list(r) for r in rp.pipe.layer_ranges]
        self.ids = rp.ids
        if kind == "fxpp":  # any other kind (hand, hand copy) is a build of the hand-written stages
            stages, self.sched, self.loss_fn, _, _ = rp.schedule(schedule, device)
            mods = [st.submod for st in stages]
        else:
            self.loss_fn = fxpp.causal_lm_loss(self.labels, MICROBATCHES)
            model = build_model(device)  # its own weights, equal to self.model's (same seed)
            self.model = model
            ranges = [range(r[0], r[-1] + 1) for r in self.layer_ranges]
            stages = [hand_stage(model, i, ranges, device, mb) for i in self.ids]
            self.sched = torch_schedule(schedule, stages, self.loss_fn)
            mods = [st.submod for st in stages]
        self.params = list({id(p): p for m in mods for p in m.parameters()}.values())
        # Time inside torch's own schedule step, apart from what fxpp.schedule does around it
        # (the step's sizes broadcast, the header flags' all-reduce: Note [one header read per step]).
        inner = self.sched.torch_schedule if kind == "fxpp" else self.sched
        torch_step, self.inner_s = inner.step, 0.0

        def timed_torch_step(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return torch_step(*args, **kwargs)
            finally:
                sync(self.device)
                self.inner_s += time.perf_counter() - t0

        inner.step = timed_torch_step
        self.own_s = 0.0  # fxpp's own work inside the step: its stages' dispatch around their graphs
        if kind == "fxpp":
            for m in mods:
                self._time_dispatch(m)
        self.holds_last = any(st.is_last for st in stages)
        self.losses: list[float] = []

    def _time_dispatch(self, stage_module) -> None:
        """Count the time a stage module spends in its call outside its graph (choosing the variant, unpacking
        and packing the crossing tensors, comparing headers) into ``own_s``."""
        dispatch, call = stage_module._fxpp_dispatch, stage_module._call
        graph_s = [0.0]

        def timed_call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                graph_s[0] += time.perf_counter() - t0

        def timed_dispatch(*args, **kwargs):
            t0, graph_s[0] = time.perf_counter(), 0.0
            try:
                return dispatch(*args, **kwargs)
            finally:
                self.own_s += time.perf_counter() - t0 - graph_s[0]

        # instance attributes, looked up before the class's methods (StageModule calls self._call, self._fxpp_dispatch)
        object.__setattr__(stage_module, "_call", timed_call)
        object.__setattr__(stage_module, "_fxpp_dispatch", timed_dispatch)

    def step(self) -> tuple[float, float, float]:
        """One timed step: its seconds, those inside torch's schedule step, and fxpp's own in its stage calls."""
        self.inner_s = self.own_s = 0.0
        dist.barrier()
        sync(self.device)
        t0 = time.perf_counter()
        for p in self.params:
            p.grad = None
        losses = schedule_step(self.sched, self.batch, self.labels, self.holds_last)
        sync(self.device)
        dt = time.perf_counter() - t0
        if self.holds_last:
            self.losses.append(float(self.loss_fn.whole_batch(losses)))
        return dt, self.inner_s, self.own_s

    def grad_sq(self) -> float:
        return float(sum(p.grad.double().pow(2).sum() for p in self.params if p.grad is not None))


class Baselines:
    """One process, the unpatched model: the same microbatches with gradient accumulation, and the whole batch."""

    def __init__(self, device):
        self.device = device
        self.model = build_model(device)
        self.batch, self.labels = make_batch(self.model.config.vocab_size, device)
        mb = BATCH // MICROBATCHES
        self.mbs = [({k: v[i * mb:(i + 1) * mb] for k, v in self.batch.items()}, self.labels[i * mb:(i + 1) * mb])
                    for i in range(MICROBATCHES)]
        self.loss_fn = fxpp.causal_lm_loss(self.labels, MICROBATCHES)
        self.whole_loss_fn = fxpp.causal_lm_loss(self.labels, 1)
        self.times = {"accumulation": [], "whole batch": []}
        self.losses = {"accumulation": [], "whole batch": []}
        self.grad_sq = {}

    def accumulation(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        self.model.zero_grad(set_to_none=True)
        losses = []
        for inputs, target in self.mbs:
            loss = self.loss_fn(self.model(**inputs, use_cache=False).logits, target)
            loss.backward()
            losses.append(loss.detach())
        for p in self.model.parameters():
            p.grad.div_(MICROBATCHES)  # what the schedules' scale_grads does
        sync(self.device)
        dt = time.perf_counter() - t0
        self.losses["accumulation"].append(float(self.loss_fn.whole_batch(losses)))
        self.grad_sq["accumulation"] = self._grad_sq()
        return dt

    def whole(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        self.model.zero_grad(set_to_none=True)
        loss = self.whole_loss_fn(self.model(**self.batch, use_cache=False).logits, self.labels)
        loss.backward()
        sync(self.device)
        dt = time.perf_counter() - t0
        self.losses["whole batch"].append(float(loss.detach()))
        self.grad_sq["whole batch"] = self._grad_sq()
        return dt

    def _grad_sq(self) -> float:
        return float(sum(p.grad.double().pow(2).sum() for p in self.model.parameters()))


def rotated(items: tuple, by: int) -> tuple:
    """``items`` rotated left by ``by`` (orders of building and of stepping change between rounds and repeats)."""
    by %= len(items)
    return items[by:] + items[:by]


def run(rank: int, world: int, device, schedules: list[str], repeats: int, steps: int, rounds: int = 1,
        control: bool = True) -> dict:
    """Every variant on this rank, in rounds of fresh builds and interleaved repeats (every rank calls this
    together)."""
    kinds = ("fxpp", "hand", CONTROL) if control else ("fxpp", "hand")
    base = Baselines(device) if rank == 0 else None
    if base is not None:  # warm-up: lazy buffers, first-call costs
        base.accumulation(), base.whole()
    rounds = max(1, min(rounds, repeats))
    times = {(s, k): [] for s in schedules for k in kinds}
    inner = {key: [] for key in times}  # per repeat and step, the seconds inside torch's schedule step
    own = {key: [] for key in times}  # ... and those of fxpp's stage dispatch (outside the graphs)
    losses = {key: [] for key in times}
    done = 0
    for rd in range(rounds):
        # this round's builds, in an order rotated from the last round's; the last round's are freed first
        variants = {(s, k): Variant(s, k, rank, world, device) for s in schedules for k in rotated(kinds, rd)}
        for v in variants.values():  # warm-up
            v.step()
            v.losses.clear()
        share = repeats * (rd + 1) // rounds - done
        for r in range(done, done + share):
            if base is not None:
                for name, fn in (("accumulation", base.accumulation), ("whole batch", base.whole))[:: 1 if r % 2 == 0 else -1]:
                    base.times[name].append([fn() for _ in range(steps)])
            dist.barrier()
            for s in schedules:
                order = rotated(kinds, r)
                for kind in order if (r // len(kinds)) % 2 == 0 else order[::-1]:
                    timed = [variants[(s, kind)].step() for _ in range(steps)]
                    for store, at in ((times, 0), (inner, 1), (own, 2)):
                        store[(s, kind)].append([t[at] for t in timed])
        done += share
        for key, v in variants.items():
            losses[key] += v.losses
        grad_sq = {key: v.grad_sq() for key, v in variants.items()}
        layers = {key: [v.layer_ranges[i] for i in v.ids] for key, v in variants.items()}
        ids = {key: v.ids for key, v in variants.items()}
        del variants
        gc.collect()
    out = {"kinds": list(kinds),
           "variants": {f"{s}|{k}": {"times": times[(s, k)], "inner": inner[(s, k)], "own": own[(s, k)],
                                     "losses": losses[(s, k)], "grad_sq": grad_sq[(s, k)], "layers": layers[(s, k)],
                                     "stages": ids[(s, k)]}
                        for (s, k) in times}}
    if base is not None:
        out["baselines"] = {"times": base.times, "losses": base.losses, "grad_sq": base.grad_sq}
    return out


def _rank_job(rank: int, world: int, workdir: str, schedules: list[str], repeats: int, steps: int, rounds: int,
              control: bool) -> dict:
    return run(rank, world, torch.device("cpu"), schedules, repeats, steps, rounds, control)


def median_ci(xs: list[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: order statistics from the binomial(n, 1/2)."""
    from math import comb

    xs, n = sorted(xs), len(xs)
    k, tail = 0, 0.0  # the largest k with P(Bin(n, 1/2) < k) <= (1 - level) / 2
    while k < n // 2 and tail + comb(n, k) / 2 ** n <= (1 - level) / 2:
        tail += comb(n, k) / 2 ** n
        k += 1
    return (xs[k - 1], xs[n - k]) if k > 0 else (xs[0], xs[-1])


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def rows_for(world: int, per_rank: list[dict], schedules: list[str]) -> list[dict]:
    """Per repeat: a pipeline's time is the mean over its steps of the slowest rank; medians over repeats."""
    b = per_rank[0]["baselines"]
    per_repeat = {name: [statistics.mean(ts) for ts in b["times"][name]] for name in b["times"]}
    t_acc = statistics.median(per_repeat["accumulation"])
    t_whole = statistics.median(per_repeat["whole batch"])
    ref_loss = b["losses"]["accumulation"][-1]
    ref_grad = b["grad_sq"]["accumulation"]
    tokens = BATCH * SEQ
    rows = []
    for name, t in (("1 process, whole batch", t_whole), ("1 process, accumulation", t_acc)):
        key = name.split(", ")[1]
        losses = b["losses"][key]
        rows.append({"schedule": name, "stages": "-", "ranks": 1, "variant": "unpatched", "step_ms": t * 1e3,
                     "tokens_per_s": tokens / t, "accumulation/whole": t_acc / t_whole if key == "accumulation" else None,
                     "loss": losses[-1], "loss_max_diff": max(abs(l - ref_loss) for l in losses),
                     "grad_sq_rel_diff": abs(b["grad_sq"][key] - ref_grad) / ref_grad,
                     "repeats": len(per_repeat[key])})
    kinds = per_rank[0]["kinds"]
    for s in schedules:
        per = {}
        for kind in kinds:
            entries = [r["variants"][f"{s}|{kind}"] for r in per_rank]
            # repeat i, step j: the slowest rank's time, its time inside torch's schedule step, and
            # fxpp's own work in its stage calls on the rank that does most of it
            reps, inner, own = ([statistics.mean(max(e[what][i][j] for e in entries)
                                                 for j in range(len(entries[0][what][i])))
                                 for i in range(len(entries[0][what]))] for what in ("times", "inner", "own"))
            losses = [l for e in entries for l in e["losses"]]
            per[kind] = {"reps": reps, "inner": inner, "own": own, "losses": losses,
                         "grad_sq": sum(e["grad_sq"] for e in entries),
                         "layers": [e["layers"] for e in entries]}
        num_stages = world * (2 if s in MULTI_STAGE else 1)
        for kind in kinds:
            t = statistics.median(per[kind]["reps"])
            row = {"schedule": s, "stages": num_stages, "ranks": world, "variant": kind, "step_ms": t * 1e3,
                   "tokens_per_s": tokens / t, "speedup_vs_accumulation": t_acc / t,
                   "efficiency": t_acc / (world * t), "ideal_bound": MICROBATCHES / (MICROBATCHES + world - 1),
                   "loss": per[kind]["losses"][-1],
                   "loss_max_diff": max(abs(l - ref_loss) for l in per[kind]["losses"]),
                   "grad_sq_rel_diff": abs(per[kind]["grad_sq"] - ref_grad) / ref_grad,
                   "repeats": len(per[kind]["reps"]), "step_ms_per_repeat": [x * 1e3 for x in per[kind]["reps"]],
                   "layers_per_rank": per[kind]["layers"],
                   "torch_step_ms": statistics.median(per[kind]["inner"]) * 1e3,
                   # around torch's step: fxpp.schedule's collectives and bookkeeping (hand: none)
                   "around_ms": statistics.median(t - i for t, i in zip(per[kind]["reps"], per[kind]["inner"])) * 1e3,
                   "dispatch_ms": statistics.median(per[kind]["own"]) * 1e3}
            # fxpp's own time in a step (around torch's step, and its stages' dispatch) over the step
            row["own_share"] = (row["around_ms"] + row["dispatch_ms"]) / row["step_ms"]
            if kind != "hand":  # fxpp / hand, and the A/A control's hand copy / hand, per repeat
                ratios = [f / h for f, h in zip(per[kind]["reps"], per["hand"]["reps"])]
                q1, q3 = quartiles(ratios)
                lo, hi = median_ci(ratios)
                row.update({"vs_hand": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                            "ratio_q1": q1, "ratio_q3": q3, "ratio_median_ci95": [lo, hi], "ci95": f"{lo:.3f}-{hi:.3f}",
                            "ratio_per_repeat": ratios})
                inside = [f / h for f, h in zip(per[kind]["inner"], per["hand"]["inner"])]
                row["torch_step_vs_hand"] = statistics.median(inside)  # the stages alone, inside torch's step
                if kind == "fxpp":
                    row["fxpp/hand"] = row["vs_hand"]
            rows.append(row)
    return rows


COLUMNS = ["schedule", "stages", "variant", "step_ms", "tokens_per_s", "accumulation/whole", "speedup_vs_accumulation",
           "efficiency", "ideal_bound", "vs_hand", "ci95", "torch_step_vs_hand", "around_ms", "dispatch_ms",
           "own_share", "ratio_q1", "ratio_q3", "ratio_min", "ratio_max",
           "loss_max_diff", "grad_sq_rel_diff"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2, help="local processes (ignored under torchrun)")
    ap.add_argument("--schedules", default=",".join(DEFAULT_SCHEDULES), help="comma list of " + ",".join(SCHEDULES))
    ap.add_argument("--repeats", type=int, default=30, help="interleaved repeats (ratio: median over them)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of fresh builds of every variant, the repeats shared among them")
    ap.add_argument("--steps", type=int, default=1, help="steps of each variant per repeat")
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="leave out the A/A control (a second build of the hand-written stages)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds for the whole spawned run")
    ap.add_argument("--json", default=default_json_path("bench_efficiency"))
    args = ap.parse_args()
    schedules = schedules_arg(ap, args.schedules, SCHEDULES)
    torch.set_num_threads(1)
    if under_torchrun():
        torchrun_main(args, schedules)
        return
    from fxpp.trainer.launch import run_ranks

    env = start(threads=1, spawned=True)
    print(f"# {MODEL_NAME}, global batch {BATCH}x{SEQ} = {BATCH * SEQ} tokens, {MICROBATCHES} microbatches, "
          f"{args.ranks} gloo ranks, {args.repeats} repeats x {args.steps} steps in {args.rounds} rounds of fresh "
          "builds, fwd+bwd only", flush=True)
    if args.ranks > (os.cpu_count() or 1):
        print(f"# WARNING: {args.ranks} ranks on {os.cpu_count()} cores: oversubscribed", flush=True)
    t0 = time.perf_counter()
    results = run_ranks(_rank_job, args.ranks, schedules, args.repeats, args.steps, args.rounds, args.control,
                        timeout_s=args.timeout,
                        pg_timeout_s=300, threads=1)
    values = values_or_exit(results)
    env["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    report(rows_for(args.ranks, values, schedules), COLUMNS, env, args.json)


def torchrun_main(args, schedules: list[str]) -> None:
    with torchrun_group(args.timeout) as (rank, world, device, env):
        if rank == 0:
            print_header(env)
        gathered = gather(run(rank, world, device, schedules, args.repeats, args.steps, args.rounds, args.control))
        if rank == 0:
            report(rows_for(world, gathered, schedules), COLUMNS, env, args.json)


if __name__ == "__main__":
    main()

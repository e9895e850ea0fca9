"""Tensor parallelism inside pipeline stages: parameter bytes per rank, step time against pp 4, loss-parallel memory.

Terms
-----
pp2xtp2
    ``fxpp.pp_dp_tp_mesh(2, 1, 2)`` on 4 ranks: 2 pipeline stages (cost-model split), each
    split over 2 tp ranks by the model's own tensor-parallel plan, 1F1B, microbatches of
    2 x 64 (``bench_schedules``' Llama and batch: hidden 256, 8 layers, 8 heads / 4 KV
    heads, vocab 1000, fp32; 16 x 64 tokens), AdamW.
pp4
    4 pipeline stages, one per rank, 1F1B, the same microbatches (``bench_data_parallel.Pipe4``).
pp2xdp2xtp2
    ``fxpp.pp_dp_tp_mesh(2, 2, 2)`` on 8 ranks, FSDP2 over dp: built only (parameter bytes).

Parts
-----
1. **Parameter bytes per rank** (pp2xtp2 and pp2xdp2xtp2): the local bytes of the rank's
   stage parameters (DTensors: their local shards) against ``stage share / tp / dp``,
   the stage's parameters in the plain model divided by ``tp * dp``. The plan leaves
   norms whole on every tp rank, so the ratio is slightly above 1; it must be within 2 %
   (``ratio_ok``). ``exact_expected`` counts them whole
   (``fxpp.runtime.tensor_parallel.parameter_share``, FSDP2's padding aside).
2. **Step time** of pp2xtp2 against pp4 on the same 4 CPU ranks, steps interleaved (step
   i of pp2xtp2, then of pp4), the slowest rank's median, for the record: gloo on
   time-sliced CPU cores says little about a GPU (tp's all-reduces per layer cost CPU
   time that a GPU's NCCL would overlap). The final losses must agree (float32 rounding).
3. **Loss-parallel memory on the last stage.** A Llama with a large vocabulary (hidden 256,
   2 layers, vocab 32768, untied), pp2xtp2, one 1F1B step of 2 microbatches of 4 x 256
   tokens, twice, each in its own 4-rank spawn: the head ``colwise_gather_output`` (each
   tp rank gets the whole ``[4, 256, 32768]`` float32 logits: 128 MiB a microbatch) and
   the head ``colwise`` (Note [loss parallel]: a vocabulary-sharded DTensor into
   ``loss_parallel()``). On each last-stage rank: ``logits_MB``, the local bytes of the
   logits the loss gets; ``loss_saved_MB``, the bytes the autograd graph saves while the
   loss of one microbatch runs (``saved_tensors_hooks``, each storage once, parameters
   left out, DTensors' local shards; the larger microbatch); on CPU
   ``peak_rss_above_start_MB``, the process's peak resident set during the step (the
   first: ``ru_maxrss`` only grows) above its resident set before (tensors this large are
   mmapped by glibc and returned on free, so the peak follows them; None where the
   build's peak was higher); on CUDA the allocator's peak above the bytes allocated
   before. The two losses must agree.

CPU (default): local processes spawned here (``fxpp.trainer.launch.run_ranks``), gloo,
``torch.set_num_threads(1)`` each. CUDA: ``torchrun --nproc-per-node 4
benchmarks/bench_tensor_parallel.py`` (NCCL, one GPU per rank) runs parts 1 (pp2xtp2), 2
and 3 in one process group (both head styles in the same processes: the allocator's peak
is reset for each, while on CPU ``ru_maxrss`` shows only the first's); ``--part`` picks
one. Dry-run under torchrun on CPU (gloo); not run on GPUs yet.

Run:  PYTHONPATH=. python benchmarks/bench_tensor_parallel.py [--steps 3] [--warmup 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
from _common import (default_json_path, gather, print_header, require_torchrun_world, start, torchrun_group,
                     under_torchrun, values_or_errors, warn_oversubscribed)
from bench_data_parallel import Pipe4, local_nbytes, report_all, sync
from bench_schedules import BATCH, MODEL_NAME, SEQ, build_model, make_batch, schedule_step

import fxpp

WORLD, PP, TP, DP = 4, 2, 2, 2
MB_SIZE = 2
MB = 1 << 20
TOLERANCE = 0.02  # the parameter bytes' ratio to stage share / tp / dp (issue 23 item 10)
LP_VOCAB, LP_BATCH, LP_SEQ, LP_M = 32768, 8, 256, 2


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def param_row(config: str, rank: int, run) -> dict:
    """Part 1: the rank's parameter bytes against stage share / tp / dp (``run``: a :class:`PipeTp`)."""
    from fxpp.runtime.tensor_parallel import parameter_share, stage_plan

    stage, model, mesh, layers = run.stage, run.model, run.mesh, run.layers
    measured = sum(local_nbytes(p) for p in stage.submod.parameters())
    stage_bytes = sum(model.get_parameter(n).nbytes for n, _ in stage.submod.named_parameters())
    tp = mesh["tp"].size()
    dp = mesh["dp"].size() if "dp" in mesh.mesh_dim_names else 1
    expected = stage_bytes / tp / dp
    whole_stage = run.pipe.stages[stage.stage_index]
    local, _ = parameter_share(whole_stage, stage_plan(model.tp_plan, whole_stage), tp)
    ratio = measured / expected
    return {"what": "params", "config": config, "rank": rank, "stage": stage.stage_index,
            "layers": f"{layers.start}-{layers.stop - 1}", "tp": tp, "dp": dp, "stage_MB": stage_bytes / MB,
            "measured_MB": measured / MB, "share/tp/dp_MB": expected / MB, "measured/expected": ratio,
            "ratio_ok": abs(ratio - 1) <= TOLERANCE,
            "exact_expected_MB": local * 4 / dp / MB}  # fp32: 4 bytes a parameter


def saved_local_bytes(fn, params) -> tuple[int, object]:
    """``bench_data_parallel.saved_bytes`` for DTensors too: a saved DTensor counts its local shard."""
    from torch.distributed.tensor import DTensor

    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict = {}

    def pack(t):
        s = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
        if s.data_ptr() not in skip:
            seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


class PipeTp:
    """pp 2 x dp ``dp`` x tp 2, 1F1B, AdamW."""

    def __init__(self, device, dp: int = 1):
        from fxpp.runtime.parallel import local_batch
        from fxpp.runtime.schedule import make_schedule

        self.mesh = fxpp.pp_dp_tp_mesh(PP, dp, TP, device_type=device.type)
        self.model = build_model(device)
        batch, labels = make_batch(self.model.config.vocab_size, device)
        local = local_batch({**batch, "labels": labels}, self.mesh)
        self.labels = local.pop("labels")
        self.batch = local
        self.m = self.labels.shape[0] // MB_SIZE
        pipe = self.pipe = fxpp.pipeline(self.model, PP, example_inputs={k: v[:MB_SIZE] for k, v in local.items()})
        pp_rank = self.mesh.get_local_rank("pp")
        self.layers = pipe.layer_ranges[pp_rank]
        self.stage = pipe.build_stage(pp_rank, device, mesh=self.mesh)
        self.loss_fn = fxpp.causal_lm_loss(self.labels, self.m, mesh=self.mesh)
        self.sched = make_schedule("1F1B", [self.stage], self.m, self.loss_fn)
        self.params = list(self.stage.submod.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=1e-3)
        self.loss = None

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        losses = schedule_step(self.sched, self.batch, self.labels, self.stage.is_last)
        if self.stage.is_last:
            self.loss = float(self.loss_fn.whole_batch(losses))
        self.opt.step()


def throughput_rank(rank: int, world: int, device, steps: int, warmup: int) -> dict:
    """Parts 1 (pp2xtp2) and 2 on this rank."""
    out: dict = {"rank": rank}
    try:
        runs = {}
        for name, cls in (("pp2xtp2", PipeTp), ("pp4", Pipe4)):
            t0 = time.perf_counter()
            runs[name] = cls(device)
            out[name] = {"setup_s": time.perf_counter() - t0, "step_s": [], "cpu_s": []}
        tp = runs["pp2xtp2"]
        out["params"] = param_row("pp2xtp2", rank, tp)
        for i in range(warmup + steps):
            for name, run in runs.items():
                dist.barrier()
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                run.step()
                sync(device)
                if i >= warmup:
                    out[name]["step_s"].append(time.perf_counter() - t0)
                    out[name]["cpu_s"].append(time.process_time() - c0)
        for name, run in runs.items():
            out[name]["loss"] = run.loss
    except Exception as e:  # noqa: BLE001 -- a failure is a result here
        out["error"], out["traceback"] = f"{type(e).__name__}: {e}", traceback.format_exc()
    return out


def dp_params_rank(rank: int, world: int, device) -> dict:
    """Part 1 on 8 ranks: pp2xdp2xtp2 built (FSDP2 over dp on the tp shards), no step."""
    try:
        run = PipeTp(device, dp=DP)
        return {"rank": rank, "params": param_row("pp2xdp2xtp2", rank, run)}
    except Exception as e:  # noqa: BLE001
        return {"rank": rank, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def lp_model(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=LP_VOCAB, max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().to(device).train()


def loss_parallel_rank(rank: int, world: int, device, head: str) -> dict:
    """Part 3 with the head style ``head`` on this rank."""
    from fxpp.runtime.schedule import make_schedule

    out: dict = {"rank": rank, "head": head}
    try:
        mesh = fxpp.pp_dp_tp_mesh(PP, 1, TP, device_type=device.type)
        model = lp_model(device)
        model.tp_plan = {**model.tp_plan, "lm_head": head}
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, LP_VOCAB, (LP_BATCH, LP_SEQ), generator=g).to(device)
        batch, labels = {"input_ids": ids}, ids.clone()
        mb = LP_BATCH // LP_M
        pipe = fxpp.pipeline(model, PP, example_inputs={"input_ids": ids[:mb]})
        stage = pipe.build_stage(mesh.get_local_rank("pp"), device, mesh=mesh)
        loss_fn = fxpp.causal_lm_loss(labels, LP_M, mesh=mesh)
        seen = {"loss_saved": 0}
        params = [p.to_local() if hasattr(p, "to_local") else p for p in stage.submod.parameters()]

        def loss(output, target):
            logits = output.to_local() if hasattr(output, "to_local") else output
            seen["logits"] = logits.nbytes
            nbytes, value = saved_local_bytes(lambda: loss_fn(output, target), params)
            seen["loss_saved"] = max(seen["loss_saved"], nbytes)
            return value

        sched = make_schedule("1F1B", [stage], LP_M, loss)
        # The first step is the measured one: ru_maxrss only grows, so after a warm-up step
        # a second one could not show its peak (the build's copies are smaller than a step's logits).
        sync(device)
        rss0, peak0 = _rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            alloc0 = torch.cuda.memory_allocated(device)
        losses = schedule_step(sched, batch, labels, stage.is_last)
        sync(device)
        peak1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.update(is_last=stage.is_last, loss_saved=seen["loss_saved"], logits=seen.get("logits"),
                   loss=float(loss_fn.whole_batch(losses)) if losses else None,
                   rss_peak_above_start=(peak1 - rss0) if peak1 > peak0 else None)
        if device.type == "cuda":
            out["cuda_peak_above_start"] = torch.cuda.max_memory_allocated(device) - alloc0
    except Exception as e:  # noqa: BLE001
        out["error"], out["traceback"] = f"{type(e).__name__}: {e}", traceback.format_exc()
    return out


def _throughput_job(rank, world, workdir, steps, warmup):
    return throughput_rank(rank, world, torch.device("cpu"), steps, warmup)


def _dp_job(rank, world, workdir):
    return dp_params_rank(rank, world, torch.device("cpu"))


def _lp_job(rank, world, workdir, head):
    return loss_parallel_rank(rank, world, torch.device("cpu"), head)


def _errors(per_rank: list[dict], what: str) -> list[dict]:
    for r in per_rank:
        if "traceback" in r:
            print(f"# {what} rank {r.get('rank')} traceback:\n{r['traceback']}", file=sys.stderr)
    return [{"what": "error", "config": f"{what} rank {r.get('rank', i)}", "error": r["error"]}
            for i, r in enumerate(per_rank) if "error" in r]


def throughput_rows(per_rank: list[dict], steps: int) -> list[dict]:
    errors = _errors(per_rank, "throughput")
    if errors:
        return errors
    tokens, rows = BATCH * SEQ, []
    losses = {n: next(r[n]["loss"] for r in per_rank if r[n]["loss"] is not None) for n in ("pp2xtp2", "pp4")}
    base = None
    for name in ("pp4", "pp2xtp2"):
        step_s = [max(ts) for ts in zip(*(r[name]["step_s"] for r in per_rank))]
        med = statistics.median(step_s)
        row = {"what": "throughput", "config": name, "ranks": len(per_rank), "microbatches": BATCH // MB_SIZE,
               "steps": steps, "step_ms": med * 1e3, "step_min_ms": min(step_s) * 1e3, "tokens_per_s": tokens / med,
               "cpu/wall": statistics.mean(sum(r[name]["cpu_s"]) / sum(r[name]["step_s"]) for r in per_rank),
               "setup_s": max(r[name]["setup_s"] for r in per_rank), "final_loss": losses[name],
               "loss_diff_vs_pp4": abs(losses[name] - losses["pp4"])}
        base = base or row
        row["step_vs_pp4"] = row["step_ms"] / base["step_ms"]
        rows.append(row)
    return rows + [r["params"] for r in per_rank]


def lp_rows(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for head, per_rank in runs.items():
        errors = _errors(per_rank, f"loss-parallel {head}")
        if errors:
            rows += errors
            continue
        for r in per_rank:
            if not r["is_last"]:
                continue
            row = {"what": "loss_parallel", "head": head, "logits": "sharded" if head == "colwise" else "gathered",
                   "rank": r["rank"], "microbatch": f"{LP_BATCH // LP_M}x{LP_SEQ}", "vocab": LP_VOCAB,
                   "logits_MB": r["logits"] / MB, "loss_saved_MB": r["loss_saved"] / MB, "loss": r["loss"],
                   "peak_rss_above_start_MB": None if r["rss_peak_above_start"] is None else
                   r["rss_peak_above_start"] / MB}
            if "cuda_peak_above_start" in r:
                row["cuda_peak_above_start_MB"] = r["cuda_peak_above_start"] / MB
            rows.append(row)
    by = {r["head"]: r for r in rows if r["what"] == "loss_parallel" and r["rank"] == WORLD - 1}
    if len(by) == 2:
        g, s = by["colwise_gather_output"], by["colwise"]
        for r in rows:
            if r["what"] == "loss_parallel":
                r["loss_diff"] = abs(s["loss"] - g["loss"])
                r["loss_saved_vs_gathered"] = r["loss_saved_MB"] / g["loss_saved_MB"]
                if r["peak_rss_above_start_MB"] and g["peak_rss_above_start_MB"]:
                    r["peak_vs_gathered"] = r["peak_rss_above_start_MB"] / g["peak_rss_above_start_MB"]
    return rows


COLUMNS = {
    "throughput": ["config", "ranks", "microbatches", "step_ms", "tokens_per_s", "step_vs_pp4", "cpu/wall",
                   "final_loss", "loss_diff_vs_pp4"],
    "params": ["config", "rank", "stage", "layers", "tp", "dp", "stage_MB", "measured_MB", "share/tp/dp_MB",
               "measured/expected", "ratio_ok", "exact_expected_MB"],
    "loss_parallel": ["head", "logits", "rank", "microbatch", "vocab", "logits_MB", "loss_saved_MB",
                      "loss_saved_vs_gathered", "peak_rss_above_start_MB", "peak_vs_gathered",
                      "cuda_peak_above_start_MB", "loss", "loss_diff"],
    "error": ["config", "error"],
}


def describe() -> str:
    return (f"# {MODEL_NAME} fp32, global batch {BATCH}x{SEQ}, microbatch {MB_SIZE}x{SEQ}, AdamW, 1F1B: pp2xtp2 "
            f"(the model's tp plan) against pp4, steps interleaved; pp2xdp2xtp2 built on 8 ranks; loss-parallel: "
            f"llama-h256-L2-v{LP_VOCAB}, {LP_M} microbatches of {LP_BATCH // LP_M}x{LP_SEQ}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration first")
    ap.add_argument("--part", choices=("all", "throughput", "params-dp", "loss-parallel"), default="all")
    ap.add_argument("--timeout", type=float, default=900, help="seconds for each spawned run")
    ap.add_argument("--json", default=default_json_path("bench_tensor_parallel"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if under_torchrun():
        torchrun_main(args)
        return
    from fxpp.trainer.launch import run_ranks

    env = start(threads=1, spawned=True, world_size=WORLD, backend="gloo")
    print(describe(), flush=True)
    warn_oversubscribed(WORLD)

    def spawn(job, world, *job_args):
        t0 = time.perf_counter()
        results = run_ranks(job, world, *job_args, timeout_s=args.timeout, pg_timeout_s=300, threads=1)
        print(f"# {job.__name__} on {world} ranks done in {time.perf_counter() - t0:.0f}s", flush=True)
        return values_or_errors(results)

    rows = []
    if args.part in ("all", "throughput"):
        rows += throughput_rows(spawn(_throughput_job, WORLD, args.steps, args.warmup), args.steps)
    if args.part in ("all", "params-dp"):
        per_rank = spawn(_dp_job, WORLD * DP)
        rows += _errors(per_rank, "params-dp") or [r["params"] for r in per_rank]
    if args.part in ("all", "loss-parallel"):
        rows += lp_rows({head: spawn(_lp_job, WORLD, head) for head in ("colwise_gather_output", "colwise")})
    report_all_tp(rows, env, args.json)


def report_all_tp(rows: list[dict], env: dict, json_path: str) -> None:
    """One table per kind of row (``bench_data_parallel.report_all``); every row to the JSON file."""
    report_all(rows, env, json_path, COLUMNS)
    params = [r for r in rows if r["what"] == "params"]
    print(f"# parameter bytes within {TOLERANCE:.0%} of stage share / tp / dp on "
          f"{sum(r['ratio_ok'] for r in params)} of {len(params)} ranks")


def torchrun_main(args) -> None:
    require_torchrun_world("bench_tensor_parallel", WORLD)
    with torchrun_group(args.timeout) as (rank, world, device, env):
        if rank == 0:
            print_header(env)
            print(describe(), flush=True)
        rows = []
        if args.part in ("all", "throughput"):
            got = gather(throughput_rank(rank, world, device, args.steps, args.warmup))
            rows += throughput_rows(got, args.steps) if rank == 0 else []
        if args.part in ("all", "loss-parallel"):
            runs = {head: gather(loss_parallel_rank(rank, world, device, head))
                    for head in ("colwise_gather_output", "colwise")}
            rows += lp_rows(runs) if rank == 0 else []
        if rank == 0:
            report_all_tp(rows, env, args.json)


if __name__ == "__main__":
    main()

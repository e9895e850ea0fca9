"""Pipeline x data parallel on 4 ranks: pp 2 x dp 2 against dp 4 alone and pp 4 alone; memory per rank.

Terms
-----
pp2xdp2
    ``fxpp.pp_dp_mesh(2, 2)``: 2 pipeline stages (cost-model split), each replicated over
    2 dp ranks with FSDP2 (``build_stage(..., dp_mesh=mesh, data_parallel="fsdp")``),
    1F1B, 4 microbatches of 2 x 64 per replica (``fxpp.runtime.parallel.local_batch``).
dp4
    FSDP2 alone: ``fully_shard`` on every decoder layer of the unpatched
    ``LlamaForCausalLM``, then on the model (``reshard_after_forward`` default), no
    pipeline; each rank one forward + backward of its 4 x 64 quarter of the batch.
pp4
    4 pipeline stages, one per rank, 1F1B, 8 microbatches of 2 x 64, no dp.

All three train the same CPU-sized Llama (hidden 256, 8 layers, intermediate 688, 8 heads /
4 KV heads, vocab 1000, fp32, seeded weights) on the same global batch (16 x 64 = 1024
tokens, no padding), one AdamW step (lr 1e-3) per step, in ONE run: every rank builds all
three, then runs their steps interleaved (step i of pp2xdp2, of dp4, of pp4, then step
i + 1), so machine noise hits them alike. A step's time is the slowest rank's
``forward/backward + opt.step``; ranks start each step together (barrier, untimed).
``final_loss`` is the global batch's loss at the last step; the three must agree (the
same training, summed in different orders: float32 rounding only).

Memory (measured on each rank after the last step):

* ``params/grads/optim MB``: the sum of the nbytes of the rank's parameters, gradients
  and AdamW state (``exp_avg``, ``exp_avg_sq``, ``step``), local shards for DTensors.
  ``expected MB`` for pp2xdp2 is computed from the *unsharded* stage (the plain model's
  parameters of that name, ``(params + grads + exp_avg + exp_avg_sq) / dp`` plus the
  ``step`` scalars); ``measured / expected`` must be within 5 % of 1.
* ``peak RSS MB``: the process's peak resident set (``ru_maxrss``): all three
  configurations live in the same process, plus ~400 MB of imported code, so it is an
  upper bound, not a per-configuration figure.
* activations: rank 0 runs one microbatch (2 x 64) forward of each stage of the pp 2
  split in one process, with and without ``activation_checkpointing`` (each decoder
  layer under ``torch.utils.checkpoint``, as ``fxpp.runtime.parallel.checkpoint_layer``
  does), and counts the bytes the autograd graph saves for the backward
  (``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters left
  out). On CUDA it also reports the allocator's peak during that forward above the
  bytes allocated before.

CPU (default): 4 local processes spawned here (``fxpp.trainer.launch.run_ranks``), gloo,
file rendezvous, ``torch.set_num_threads(1)`` in each. On a machine with fewer cores than
ranks the ranks time-slice (a warning is printed).

CUDA: ``torchrun --nproc-per-node 4 benchmarks/bench_data_parallel.py`` (detected from
RANK / WORLD_SIZE; NCCL when CUDA is present, one GPU per rank, cuda:LOCAL_RANK); rank 0
prints and writes the JSON. The only CUDA-specific code is the device choice, the
synchronisation before reading clocks and the allocator peak. Not run on GPUs yet.

Run:  PYTHONPATH=. python benchmarks/bench_data_parallel.py [--steps 3] [--warmup 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
from _common import (default_json_path, gather, print_header, report, require_torchrun_world, start, torchrun_group,
                     under_torchrun, values_or_errors, warn_oversubscribed)
from bench_schedules import BATCH, MODEL_NAME, SEQ, build_model, make_batch, schedule_step

import fxpp

WORLD = 4
MB_SIZE = 2  # rows per microbatch; the model, BATCH and SEQ are bench_schedules' (one Llama, one batch)
CONFIGS = ("pp2xdp2", "dp4", "pp4")
MB = 1 << 20


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def local_nbytes(t) -> int:
    from torch.distributed.tensor import DTensor

    if t is None:
        return 0
    return (t.to_local() if isinstance(t, DTensor) else t).nbytes


def state_bytes(params: list, opt) -> dict:
    """The rank's parameters, gradients and AdamW state in bytes (local shards)."""
    optim = 0
    for p in params:
        for v in opt.state.get(p, {}).values():
            if isinstance(v, torch.Tensor):
                optim += local_nbytes(v)
    return {"params": sum(local_nbytes(p) for p in params), "grads": sum(local_nbytes(p.grad) for p in params),
            "optim": optim}


class PipeDp:
    """pp 2 x dp 2 with FSDP2, 1F1B."""

    def __init__(self, device):
        from fxpp.runtime.parallel import local_batch
        from fxpp.runtime.schedule import make_schedule

        self.mesh = fxpp.pp_dp_mesh(2, 2)
        self.dp = 2
        model = build_model(device)
        batch, labels = make_batch(model.config.vocab_size, device)
        local = local_batch({**batch, "labels": labels}, self.mesh)
        self.labels = local.pop("labels")
        self.batch = local
        self.m = self.labels.shape[0] // MB_SIZE
        pipe = fxpp.pipeline(model, 2, example_inputs={k: v[:MB_SIZE] for k, v in local.items()})
        pp_rank = self.mesh.get_local_rank("pp")
        self.stage = pipe.build_stage(pp_rank, device, dp_mesh=self.mesh, data_parallel="fsdp")
        self.layers = list(pipe.layer_ranges[pp_rank])
        self.loss_fn = fxpp.causal_lm_loss(self.labels, self.m, dp_mesh=self.mesh)
        self.sched = make_schedule("1F1B", [self.stage], self.m, self.loss_fn)
        self.names = [n for n, _ in self.stage.submod.named_parameters()]
        self.params = list(self.stage.submod.parameters())
        # What the unsharded stage holds: the plain model's parameters of the same names.
        self.stage_bytes = sum(model.get_parameter(n).nbytes for n in self.names)
        self.opt = torch.optim.AdamW(self.params, lr=1e-3)
        self.loss = None

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        losses = schedule_step(self.sched, self.batch, self.labels, self.stage.is_last)
        if self.stage.is_last:
            share = self.loss_fn.whole_batch(losses).detach().reshape(1)
        self.opt.step()
        if self.stage.is_last:  # the replicas' shares add up to the global batch's loss
            dist.all_reduce(share, group=self.mesh["dp"].get_group())
            self.loss = float(share[0])


class DataParallel:
    """FSDP2 over all 4 ranks on the unpatched model, no pipeline."""

    def __init__(self, device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
        self.model = build_model(device)
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        batch, labels = make_batch(self.model.config.vocab_size, device)
        d, n = mesh.get_local_rank(), mesh.size()
        self.batch = {k: torch.tensor_split(v, n)[d] for k, v in batch.items()}
        self.labels = torch.tensor_split(labels, n)[d]
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=1e-3)
        self.group = mesh.get_group()
        self.loss = None

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(**self.batch, labels=self.labels).loss
        loss.backward()
        self.opt.step()
        # No padding: every rank has as many target tokens, so the mean of the ranks'
        # means is the global batch's loss (and FSDP's gradient average its gradient).
        total = loss.detach().reshape(1)
        dist.all_reduce(total, group=self.group)
        self.loss = float(total[0]) / dist.get_world_size(self.group)


class Pipe4:
    """4 stages, one per rank, 1F1B, no dp."""

    def __init__(self, device):
        from fxpp.runtime.schedule import make_schedule

        model = build_model(device)
        self.batch, self.labels = make_batch(model.config.vocab_size, device)
        self.m = BATCH // MB_SIZE
        pipe = fxpp.pipeline(model, 4, example_inputs={k: v[:MB_SIZE] for k, v in self.batch.items()})
        self.stage = pipe.build_stage(dist.get_rank(), device)
        self.loss_fn = fxpp.causal_lm_loss(self.labels, self.m)
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


BUILDERS = {"pp2xdp2": PipeDp, "dp4": DataParallel, "pp4": Pipe4}


def saved_bytes(fn, params) -> tuple[int, object]:
    """Bytes of the distinct storages the autograd graph saves while ``fn`` runs, parameters left out
    (a matmul saves its weight for the input gradient, but that memory is the parameters')."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def activation_rows(device) -> list[dict]:
    """One microbatch's forward of each stage of the pp 2 split, without and with checkpointing."""
    from fxpp.runtime.parallel import checkpoint_layer, decoder_layer_modules

    rows = []
    for ac in (False, True):
        model = build_model(device)
        batch, _ = make_batch(model.config.vocab_size, device)
        mb = {k: v[:MB_SIZE] for k, v in batch.items()}
        pipe = fxpp.pipeline(model, 2, example_inputs=mb)
        if ac:
            for st in pipe.stages:
                for _, layer in decoder_layer_modules(st):
                    checkpoint_layer(layer)
        args, kwargs = (), mb
        for i, st in enumerate(pipe.stages):
            if device.type == "cuda":
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            nbytes, out = saved_bytes(functools.partial(st, *args, **kwargs), list(model.parameters()))
            row = {"what": "activations", "stage": i, "layers": f"{pipe.layer_ranges[i].start}-"
                   f"{pipe.layer_ranges[i].stop - 1}", "activation_checkpointing": ac,
                   "microbatch": f"{MB_SIZE}x{SEQ}", "saved_MB": nbytes / MB}
            if device.type == "cuda":
                sync(device)
                row["cuda_peak_above_start_MB"] = (torch.cuda.max_memory_allocated(device) - before) / MB
            rows.append(row)
            args, kwargs = (tuple(out) if isinstance(out, (tuple, list)) else (out,)), {}
    return rows


def run_rank(rank: int, world: int, device, steps: int, warmup: int) -> dict:
    """Build the three configurations, run their steps interleaved, measure memory."""
    out: dict = {"rank": rank}
    runs = {}
    try:
        for name in CONFIGS:
            t0 = time.perf_counter()
            runs[name] = BUILDERS[name](device)
            out[name] = {"setup_s": time.perf_counter() - t0, "step_s": [], "cpu_s": []}
        for i in range(warmup + steps):
            for name in CONFIGS:
                dist.barrier()
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                runs[name].step()
                sync(device)
                if i >= warmup:
                    out[name]["step_s"].append(time.perf_counter() - t0)
                    out[name]["cpu_s"].append(time.process_time() - c0)
        for name, r in runs.items():
            out[name]["loss"] = r.loss
            out[name]["memory"] = state_bytes(r.params, r.opt)
        pd = runs["pp2xdp2"]
        out["pp2xdp2"]["stage_bytes"] = pd.stage_bytes
        out["pp2xdp2"]["layers"] = pd.layers
        out["pp2xdp2"]["adam_step_bytes"] = sum(local_nbytes(pd.opt.state[p]["step"]) for p in pd.params)
        out["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if rank == 0:
            out["activations"] = activation_rows(device)
    except Exception as e:  # noqa: BLE001 -- a failure is a result here
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    return out


def _rank_job(rank: int, world: int, workdir: str, steps: int, warmup: int) -> dict:
    return run_rank(rank, world, torch.device("cpu"), steps, warmup)


def rows_for(per_rank: list[dict], steps: int) -> list[dict]:
    errors = [(r.get("rank", i), r["error"]) for i, r in enumerate(per_rank) if "error" in r]
    for r in per_rank:
        if "traceback" in r:
            print(f"# rank {r.get('rank')} traceback:\n{r['traceback']}", file=sys.stderr)
    if errors:
        return [{"what": "error", "config": f"rank {rank}", "error": e} for rank, e in errors]
    tokens = BATCH * SEQ
    rows, base = [], None
    losses = {name: next(r[name]["loss"] for r in per_rank if r[name]["loss"] is not None) for name in CONFIGS}
    for name in CONFIGS:
        step_s = [max(ts) for ts in zip(*(r[name]["step_s"] for r in per_rank))]
        med = statistics.median(step_s)
        row = {"what": "throughput", "config": name, "ranks": len(per_rank),
               "microbatches": {"pp2xdp2": f"2x{BATCH // 2 // MB_SIZE}", "dp4": "4x1", "pp4": f"{BATCH // MB_SIZE}"}[name],
               "steps": steps, "step_ms": med * 1e3, "step_min_ms": min(step_s) * 1e3, "tokens_per_s": tokens / med,
               "cpu/wall": statistics.mean(sum(r[name]["cpu_s"]) / sum(r[name]["step_s"]) for r in per_rank),
               "setup_s": max(r[name]["setup_s"] for r in per_rank), "final_loss": losses[name],
               "loss_diff_vs_pp2xdp2": abs(losses[name] - losses["pp2xdp2"])}
        if base is None:
            base = row
        row["step_vs_pp2xdp2"] = row["step_ms"] / base["step_ms"]
        row["tokens_per_s_vs_pp2xdp2"] = row["tokens_per_s"] / base["tokens_per_s"]
        rows.append(row)
    for r in per_rank:
        for name in CONFIGS:
            m = r[name]["memory"]
            row = {"what": "memory", "config": name, "rank": r["rank"], "params_MB": m["params"] / MB,
                   "grads_MB": m["grads"] / MB, "optim_MB": m["optim"] / MB,
                   "total_MB": (m["params"] + m["grads"] + m["optim"]) / MB, "peak_rss_MB": r["peak_rss_MB"]}
            if name == "pp2xdp2":
                pd = r[name]
                expected = 4 * pd["stage_bytes"] / 2 + pd["adam_step_bytes"]  # (p + g + 2 moments) / dp + steps
                row.update({"layers": f"{pd['layers'][0]}-{pd['layers'][-1]}", "stage_unsharded_MB": pd["stage_bytes"] / MB,
                            "expected_MB": expected / MB, "measured/expected": (m["params"] + m["grads"] + m["optim"]) / expected})
            rows.append(row)
    rows += per_rank[0]["activations"]
    return rows


COLUMNS = {
    "throughput": ["config", "ranks", "microbatches", "step_ms", "tokens_per_s", "step_vs_pp2xdp2",
                   "tokens_per_s_vs_pp2xdp2", "cpu/wall", "final_loss", "loss_diff_vs_pp2xdp2"],
    "memory": ["config", "rank", "layers", "params_MB", "grads_MB", "optim_MB", "total_MB", "stage_unsharded_MB",
               "expected_MB", "measured/expected", "peak_rss_MB"],
    "activations": ["stage", "layers", "microbatch", "activation_checkpointing", "saved_MB", "cuda_peak_above_start_MB"],
    "error": ["config", "error"],
}


def report_all(rows: list[dict], env: dict, json_path: str, columns: dict | None = None) -> None:
    """One table per kind of row (``columns``: ``{what: [column, ...]}``, this script's by
    default); every row to the JSON file."""
    import io
    from contextlib import redirect_stdout

    for what, names in (columns or COLUMNS).items():
        part = [r for r in rows if r["what"] == what]
        if part:
            buf = io.StringIO()
            with redirect_stdout(buf):
                report(part, names, env, os.devnull)
            print("\n".join(line for line in buf.getvalue().splitlines() if not line.startswith("# wrote")))
    import json

    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        f.writelines(json.dumps({**env, **r}) + "\n" for r in rows)
    print(f"# wrote {len(rows)} rows to {json_path}")


def describe() -> str:
    return (f"# {MODEL_NAME} fp32, global batch {BATCH}x{SEQ} = {BATCH * SEQ} tokens, microbatch {MB_SIZE}x{SEQ}, "
            f"AdamW; pp2xdp2 (FSDP2, 1F1B), dp4 (FSDP2, no pipeline), pp4 (1F1B), steps interleaved")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration first")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for the whole spawned run")
    ap.add_argument("--json", default=default_json_path("bench_data_parallel"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if under_torchrun():
        torchrun_main(args)
        return
    from fxpp.trainer.launch import run_ranks

    env = start(threads=1, spawned=True, world_size=WORLD, backend="gloo")
    print(describe(), flush=True)
    warn_oversubscribed(WORLD)
    t0 = time.perf_counter()
    results = run_ranks(_rank_job, WORLD, args.steps, args.warmup, timeout_s=args.timeout, pg_timeout_s=180,
                        threads=1)
    per_rank = values_or_errors(results)
    print(f"# done in {time.perf_counter() - t0:.0f}s", flush=True)
    report_all(rows_for(per_rank, args.steps), env, args.json)


def torchrun_main(args) -> None:
    require_torchrun_world("bench_data_parallel", WORLD)
    with torchrun_group(args.timeout) as (rank, world, device, env):
        if rank == 0:
            print_header(env)
            print(describe(), flush=True)
        gathered = gather(run_rank(rank, world, device, args.steps, args.warmup))
        if rank == 0:
            report_all(rows_for(gathered, args.steps), env, args.json)


if __name__ == "__main__":
    main()

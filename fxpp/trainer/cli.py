"""The command line: ``fxpp plan``, ``fxpp run`` and ``fxpp export`` (also ``python -m fxpp``)."""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from ..errors import FxppError, RunConfigError
from ..pipeline import pipeline
from ..runtime.optim import LR_SCHEDULES
from ..runtime.placement import MULTI_STAGE, SCHEDULES, default_backend, default_device
from ..runtime.tensor_parallel import check_model as check_tp_model
from ..runtime.tensor_parallel import check_crossings, check_stage_plan, parameter_share, stage_plan, tp_plan_of
from ..analysis.memory_plan import format_memory_plan
from .export import export
from .models import build_model
from .step_files import latest_step
from .train import RunConfig, launch, run_rank


SIZE_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
              "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(text: str) -> int:
    """``"80GB"`` (10^9), ``"512MiB"`` (2^20), ``"1.5GiB"`` or a plain number of bytes.

    Raises:
        RunConfigError: not a positive size.
    """
    t = str(text).strip().replace(" ", "")
    number = t.rstrip("BbKkMmGgTtIi")
    unit = t[len(number):].upper()
    try:
        value = float(number) * SIZE_UNITS[unit]
    except (KeyError, ValueError):
        raise RunConfigError(f"--memory-per-rank {text!r}: give a size like 80GB, 512MiB or a number of bytes") from None
    if value <= 0:
        raise RunConfigError(f"--memory-per-rank {text!r} must be positive")
    return int(value)


def _plan(args) -> int:
    model = build_model(args.model, device="meta")
    if args.batch % args.microbatches:
        raise RunConfigError(f"--batch {args.batch} does not split into --microbatches {args.microbatches}")
    micro = args.batch // args.microbatches  # the cost model works on one microbatch
    example = {
        "input_ids": torch.zeros(micro, args.seq_len, dtype=torch.long, device="meta"),
        "attention_mask": torch.ones(micro, args.seq_len, dtype=torch.long, device="meta"),
    }
    if args.tp > 1:
        check_tp_model(model, args.tp)  # the model's plan, before the pipeline: what tp cannot split
    limit = parse_size(args.memory_per_rank) if args.memory_per_rank else None
    pipe = pipeline(model, args.stages, example_inputs=example, schedule=args.schedule, microbatch=(micro, args.seq_len),
                    num_microbatches=args.microbatches, memory_limit=limit, tp=args.tp,
                    keep_outputs=False)  # as `fxpp run` steps (return_outputs=False)
    print(pipe.plan())
    print(format_memory_plan(pipe.memory, pipe.layer_ranges, pipe.stage_costs(), limit))
    if args.tp > 1:
        print(_tp_shares(model, pipe, args.tp))
    costs = pipe.stage_costs()
    m = args.microbatches
    ranks = args.stages // (2 if args.schedule in MULTI_STAGE else 1)
    ideal = m / (m + ranks - 1)
    balance = sum(costs) / (len(costs) * max(costs))
    print(f"schedule {args.schedule}: {m} microbatches on {ranks} ranks, bubble bound m/(m+p-1) = {ideal:.1%}, "
          f"with stage imbalance {ideal * balance:.1%} estimated efficiency")
    return 0


def _tp_shares(model, pipe, tp: int) -> str:
    """Each stage's parameters per tp rank under the model's tp plan (``fxpp plan --tp``)."""
    plan = tp_plan_of(model)
    rows = [f"tensor parallel: tp {tp}, the model's own tp plan ({len(plan)} rules); parameters per rank:",
            f"{'stage':>5}  {'per tp rank':>12}  {'of the stage':>12}  {'share':>6}"]
    for i, stage in enumerate(pipe.stages):
        entries = stage_plan(plan, stage)
        check_stage_plan(i, model, stage, entries, tp)
        check_crossings(i, stage, tp)
        per_rank, whole = parameter_share(stage, entries, tp)
        rows.append(f"{i:>5}  {per_rank:>12,}  {whole:>12,}  {per_rank / whole:>6.1%}")
    rows.append(f"(sharded: what the plan names, 1/{tp} each; norms and other unnamed parameters whole on every tp "
                "rank; logits gathered whole on the last stage)")
    return "\n".join(rows)


def _run(args) -> int:
    cfg = RunConfig(model=args.model, ranks=args.stages, dp=args.dp, tp=args.tp,
                    activation_checkpointing=args.activation_checkpointing, compile=args.compile,
                    schedule=args.schedule, steps=args.steps,
                    batch=args.batch, seq_len=args.seq_len, microbatches=args.microbatches, lr=args.lr,
                    lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
                    weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                    mixed_precision=args.mixed_precision, param_dtype=args.param_dtype, lora_rank=args.lora_rank,
                    lora_alpha=args.lora_alpha,
                    lora_targets=args.lora_targets.split(",") if args.lora_targets else None,
                    log_every=args.log_every, metrics=args.metrics, val_data=args.val_data, val_every=args.val_every,
                    seed=args.seed, tokens=args.tokens, data=args.data, text_field=args.text_field,
                    shuffle_seed=args.shuffle_seed, check=args.check, save_dir=args.save_dir,
                    save_every=args.save_every, resume=args.resume, resume_step=args.resume_step,
                    keep_last=args.keep_last)
    if int(os.environ.get("RANK", 0)) == 0:
        print(header(cfg), flush=True)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        world = int(os.environ["WORLD_SIZE"])
        if world != cfg.world:
            tp = f" x --tp {cfg.tp}" if cfg.tp > 1 else ""
            raise RunConfigError(f"torchrun started {world} processes, but --stages {cfg.ranks} x --dp {cfg.dp}{tp} = "
                                 f"{cfg.world}: start --nnodes x --nproc-per-node = {cfg.world} processes")
        device = default_device(int(os.environ.get("LOCAL_RANK", 0)))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(default_backend(), device_id=device if device.type == "cuda" else None)
        try:
            result = run_rank(dist.get_rank(), dist.get_world_size(), cfg)
        finally:
            dist.destroy_process_group()
        results = [result]
    else:
        results = launch(cfg, timeout_s=args.timeout)
    compiled = [(r["rank"], r["compile"]) for r in results if "compile" in r]
    if compiled:
        print("compiled decoder layers (inductor): " + ", ".join(
            f"r{rank} {c['compiles']} compiles ({c['graphs']} graphs, {c['graph_breaks']} graph breaks) in "
            f"{c['compile_s']:.1f} s" for rank, c in compiled), flush=True)
    for result in results:
        if "losses" not in result:
            continue
        steps = result["step_s"]
        if not steps:
            print(f"nothing to do: the save in {cfg.save_dir} is at step {result['first_step']} = --steps")
            continue
        tokens = cfg.batch * cfg.seq_len
        med = sorted(steps)[len(steps) // 2]
        first = result["first_step"]
        print(f"steps {first + 1}-{cfg.steps}{' (resumed)' if first else ''}, median step {med * 1e3:.1f} ms, "
              f"{tokens / med:,.0f} tokens/s, final loss {result['losses'][-1]:.4f}")
        kind = "allocated" if "cuda" in str(result.get("device", "")) else "resident"
        print("peak memory per rank (" + kind + "): " +
              ", ".join(f"r{r} {m / 2**30:.2f} GiB" for r, m in enumerate(result["memory"])))
        if "reference_losses" in result:
            # NaN compares as a mismatch (max over NaN differences would hide it)
            diffs = [abs(a - b) for a, b in zip(result["losses"], result["reference_losses"])]
            diff = float("nan") if any(d != d for d in diffs) else max(diffs)
            # fp32: the same float32 program up to summation order (measured ~1e-6); bf16
            # compute: losses from bf16 logits (bf16 eps 7.8e-3 relative, ~0.03 at loss ~5).
            ok = diff == diff and diff <= (1e-3 if cfg.compute_dtype(torch.device(result.get("device", "cpu"))) == "fp32" else 5e-2)
            print(f"loss vs the unpatched model on one process: max |diff| {diff:.2e} over {len(steps)} steps: "
                  f"{'MATCH' if ok else 'MISMATCH'}")
            if not ok:
                return 1
        if result.get("reference_grad_norms"):
            pairs = list(zip(result["grad_norms"], result["reference_grad_norms"]))
            diff = max(abs(a - b) / max(b, 1e-12) for a, b in pairs)
            print(f"gradient norm vs the unpatched model: max relative diff {diff:.2e}: "
                  f"{'MATCH' if diff <= 1e-3 else 'MISMATCH'}")
        if result.get("reference_val_losses"):
            diff = max(abs(a[1] - b[1]) for a, b in zip(result["val_losses"], result["reference_val_losses"]))
            print(f"validation loss vs the unpatched model: max |diff| {diff:.2e}: {'MATCH' if diff <= 1e-3 else 'MISMATCH'}")
        if result.get("val_losses"):
            print("validation loss: " + ", ".join(f"step {s} {v:.4f}" for s, v in result["val_losses"]))
    if cfg.save_dir:
        print(f"saved: {cfg.save_dir} (latest step {latest_step(cfg.save_dir)}); "
              f"fxpp export {cfg.save_dir} OUT_DIR writes a Hugging Face checkpoint")
    return 0


def header(cfg: RunConfig) -> str:
    """The line ``fxpp run`` starts with: the job's shape, and where and when it saves."""
    ranks = (f"{cfg.ranks} pipeline ranks" + (f" x dp {cfg.dp}" if cfg.dp > 1 else "")
             + (f" x tp {cfg.tp}" if cfg.tp > 1 else ""))
    line = (f"fxpp run {cfg.model}: {ranks}, {cfg.num_stages} stages, {cfg.schedule}, {cfg.steps} steps of "
            f"batch {cfg.batch} x seq-len {cfg.seq_len}; ")
    if not cfg.save_dir:
        return line + "no saves (no --save-dir)"
    when = (f"save-every {cfg.save_every} and at the end" if cfg.save_every else "save-every 0 (only at the end)")
    keep = f", keep-last {cfg.keep_last}" if cfg.keep_last else ""
    resume = (f", resuming step {cfg.resume_step}" if cfg.resume_step is not None
              else ", resuming the newest step that verifies" if cfg.resume else "")
    return line + f"saves to {cfg.save_dir}: {when}{keep}{resume}"


def _export(args) -> int:
    step = export(args.save_dir, args.out_dir, step=args.step)
    print(f"exported step {step} of {args.save_dir} to {args.out_dir} "
          f"(AutoModelForCausalLM.from_pretrained({args.out_dir!r}) loads it)")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxpp", description="Pipeline parallelism for Hugging Face models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def common(q):
        q.add_argument("model", help="a built-in preset (tiny-llama, tiny-gemma4, ...), a directory with config.json, "
                       "or a config.json file")
        q.add_argument("--stages", type=int, default=2)
        q.add_argument("--schedule", default="1F1B", choices=SCHEDULES)
        q.add_argument("--seq-len", type=int, default=32)
        q.add_argument("--batch", type=int, default=8)
        q.add_argument("--microbatches", type=int, default=4)
        q.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of every stage, split by the "
                       "model's own tp plan; the job runs on stages' ranks x dp x tp processes")

    plan = sub.add_parser("plan", help="print the stage plan of a model (built on the meta device): layers, time "
                          "share and each rank's predicted peak memory")
    common(plan)
    plan.add_argument("--memory-per-rank", metavar="SIZE",
                      help="choose cuts that keep every rank's predicted peak within SIZE (80GB, 512MiB, bytes)")
    plan.set_defaults(func=_plan)
    run = sub.add_parser("run", help="train a few steps with a pipeline schedule and check against the model")
    common(run)
    run.add_argument("--dp", type=int, default=1, help="data-parallel replicas of every stage (FSDP2); "
                     "the job runs on stages' ranks x dp processes, each replica on 1/dp of every batch")
    run.add_argument("--activation-checkpointing", action="store_true",
                     help="recompute each decoder layer's activations in the backward pass")
    run.add_argument("--compile", action="store_true",
                     help="compile every decoder layer in place with torch.compile (inductor; regional "
                          "compilation): one compile per layer signature and sequence length, reported at the end")
    run.add_argument("--steps", type=int, default=5)
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--lr-schedule", default="constant", choices=LR_SCHEDULES,
                     help="after --warmup-steps of linear warm-up: constant, or linear / cosine decay to --min-lr-ratio")
    run.add_argument("--warmup-steps", type=int, default=0)
    run.add_argument("--min-lr-ratio", type=float, default=0.0, help="the LR at the end as a fraction of --lr")
    run.add_argument("--weight-decay", type=float, default=0.0,
                     help="AdamW's decoupled weight decay (never on biases and normalization weights)")
    run.add_argument("--max-grad-norm", type=float, default=1.0,
                     help="clip the global gradient norm (all stages and replicas, a tied weight once); 0 disables")
    run.add_argument("--mixed-precision", choices=("fp32", "bf16"),
                     help="compute dtype: bf16 keeps fp32 master parameters and optimizer state and reduces "
                          "gradients in fp32 (FSDP2's MixedPrecisionPolicy); default bf16 on CUDA, fp32 on CPU")
    run.add_argument("--param-dtype", choices=("fp32", "bf16"), default="fp32",
                     help="the master parameters' dtype (a bf16 checkpoint is loaded into fp32 by default)")
    run.add_argument("--lora-rank", type=int, default=0, help="train PEFT LoRA adapters of this rank (needs peft)")
    run.add_argument("--lora-alpha", type=float)
    run.add_argument("--lora-targets", help="comma-separated module names, e.g. q_proj,v_proj (default: PEFT's)")
    run.add_argument("--log-every", type=int, default=0, metavar="K",
                     help="a JSON line of metrics every K steps (and the last) in SAVE_DIR/metrics.jsonl or --metrics")
    run.add_argument("--metrics", metavar="FILE", help="the metrics file (JSON lines)")
    run.add_argument("--val-data", nargs="+", metavar="FILE", help="validation text, evaluated every --val-every steps")
    run.add_argument("--val-every", type=int, default=0, metavar="K")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--tokens", help="token ids: a .pt LongTensor or a text file of integers")
    run.add_argument("--data", nargs="+", metavar="FILE",
                     help="text (one document a line), JSON-lines (.jsonl/.json) or parquet (.parquet) files, "
                          "tokenized once with the model directory's tokenizer into a memory-mapped cache "
                          "($FXPP_DATA_CACHE, default ~/.cache/fxpp/data; needs pip install 'fxpp[data]') and "
                          "packed into --seq-len rows with restarting position_ids")
    run.add_argument("--text-field", default="text", metavar="NAME",
                     help="the field of JSON-lines records and the column of parquet files that holds the text "
                          "(default: text)")
    run.add_argument("--shuffle-seed", type=int, metavar="N",
                     help="shuffle the documents before packing, a new order each pass over them, the same on "
                          "every rank (default: file order)")
    run.add_argument("--save-dir", help="write per-stage (per-dp-shard) safetensors checkpoints with optimizer "
                     "state, RNG state and the data position here")
    run.add_argument("--save-every", type=int, default=0, metavar="K",
                     help="save every K steps (and after the last step); default: after the last step only")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest save in --save-dir whose files all verify (sizes and sha256 "
                          "listed in its state.json), exactly as an uninterrupted run; says which newer step it "
                          "skipped and why")
    run.add_argument("--resume-step", type=int, metavar="K",
                     help="continue from saved step K (an error if it does not exist or does not verify)")
    run.add_argument("--keep-last", type=int, default=0, metavar="K",
                     help="keep only the K newest complete saves, removing older ones once a newer one is written "
                          "(default: keep every save)")
    check = run.add_mutually_exclusive_group()
    check.add_argument("--check", dest="check", action="store_true", default=None,
                       help="train the unpatched model in one process on the same batches and compare the losses "
                            "(default for built-in presets; it holds the whole model on one rank)")
    check.add_argument("--no-check", dest="check", action="store_false")
    run.add_argument("--timeout", type=float, default=None,
                     help="kill the local run after this many seconds (default: no limit)")
    run.set_defaults(func=_run)
    exp = sub.add_parser("export", help="write a Hugging Face checkpoint directory from a --save-dir")
    exp.add_argument("save_dir")
    exp.add_argument("out_dir")
    exp.add_argument("--step", type=int, help="the saved step to export (default: the latest)")
    exp.set_defaults(func=_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - one readable line unless --debug
        if args.debug:
            raise
        kind = "error" if isinstance(e, FxppError) else f"error ({type(e).__name__})"
        print(f"fxpp: {kind}: {e}", file=sys.stderr)
        print("hint: rerun with --debug for the traceback", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

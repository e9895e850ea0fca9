"""Predicted against measured peak memory per rank (issue 25): the memory model of
``fxpp.analysis.stage_memory`` against real multi-rank training steps.

Models (fp32, seeded random weights, ``train()``):

* ``qwen2-v151936``: a Qwen2 with Qwen's 151,936-token vocabulary, hidden 256,
  intermediate 704, 8 layers, 4 heads (2 key/value), untied embeddings (as Qwen2.5-7B);
  microbatches of 2 x 64 tokens. The embedding and the head are 155 MB each; the logits
  of one microbatch 78 MB.
* ``llava``: the test zoo's tiny LLaVA (``fxpp.testing.zoo.tiny_vlm``; a CLIP vision
  tower and a Llama text model, hidden 64, 8 layers, vocabulary 128); microbatches of
  2 x 64 tokens with one image per row; labelled ``llava-h64`` (rows written before
  commit 55d8cb4 call it ``llava-h256``; it always was hidden 64).

For each value of ``return_outputs`` (``schedule.step(return_outputs=True)``, torch's
default, which keeps every microbatch's logits until the next step and concatenates them
at the end of the step; ``False``, what ``fxpp run`` passes) and each schedule (1F1B: 2
stages on 2 ranks; Interleaved1F1B and ZBVZeroBubble: 4 stages on 2 ranks), 2 local gloo
ranks (one thread each) build ``fxpp.pipeline(model, n, schedule=..., microbatch=(2, 64),
num_microbatches=4, keep_outputs=return_outputs)``'s stages and train 3 steps of 4
microbatches with AdamW (``zero_grad(set_to_none=True)``, ``schedule.step``,
``opt.step``), under ``torch.profiler`` with ``profile_memory=True``: the CPU allocator
reports every allocation and free. **Measured peak** = the rank's parameters (allocated
before the profiler starts, counted tensor by tensor) + the largest running sum of the
allocator's reports in steps 2 and 3 (step 1 allocates the optimizer state and the
schedule's buffers; from step 2 on each step is alike), each report at its own time
(``fxpp.testing.memory``, Note [allocator timeline]); ``measured_at``: the profiled events
under way at that moment; ``folded_MB``: the same reports folded into profiled events, each
allocation at its event's start and each free at its end, as this benchmark measured up to
commit 5476493 (what that over-counts: the Note). Sizes are MiB (2^20 bytes), in the ``_MB`` columns too.
**Predicted** = ``MemoryModel.split_memory`` for the same split (``pipe.memory_plan``).

Run:  PYTHONPATH=. python benchmarks/bench_memory_plan.py [--models qwen,llava] [--schedules ...]
      [--return-outputs true,false] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys

import torch

from _common import default_json_path, report, schedules_arg, start, values_or_exit

MB = 1024 * 1024
SCHEDULES = ("1F1B", "Interleaved1F1B", "ZBVZeroBubble")
MICRO, SEQ, M, WORLD = 2, 64, 4, 2


def build(name: str):
    """``(model, make_inputs(batch, seed))``."""
    import transformers as tf

    if name == "qwen":
        from fxpp.presets import COMMON

        cfg = tf.Qwen2Config(**{**COMMON, "vocab_size": 151936, "hidden_size": 256, "intermediate_size": 704},
                             num_hidden_layers=8, tie_word_embeddings=False)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(cfg)

        def make(batch, seed):
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(3, 151936, (batch, SEQ), generator=g)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        return model.train(), make
    from fxpp.testing import zoo

    model, make_inputs = zoo.tiny_vlm("llava", num_layers=8)
    return model.train(), lambda batch, seed: make_inputs(batch, SEQ, seed=seed)


def rank_job(rank: int, world: int, workdir: str, model_name: str, schedule: str, return_outputs: bool) -> dict:
    import fxpp
    from fxpp.runtime.placement import MULTI_STAGE
    from fxpp.testing.memory import allocator_peak, events_under_way, folded_peak
    from torch.profiler import ProfilerActivity, profile

    model, make = build(model_name)
    n = world * (2 if schedule in MULTI_STAGE else 1)
    example = make(MICRO, 0)
    pipe = fxpp.pipeline(model, n, example_inputs=example, schedule=schedule, microbatch=(MICRO, SEQ),
                         num_microbatches=M, keep_outputs=return_outputs)
    style = "v" if MULTI_STAGE.get(schedule) == "v" else "loop"
    ids = fxpp.stage_ids_of_rank(rank, n, world, style)
    stages = [pipe.build_stage(i, "cpu", microbatch=example) for i in ids]
    params = {}
    for st in stages:
        for p in st.submod.parameters():
            params[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    batch = make(MICRO * M, 1)
    labels = batch["input_ids"].clone()
    loss_fn = fxpp.causal_lm_loss(labels, M)
    sched = fxpp.schedule(schedule, stages, M, loss_fn)
    opt = torch.optim.AdamW([p for st in stages for p in st.submod.parameters()], lr=1e-4)
    first = ids[0] == 0
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            torch.distributed.barrier()
            kwargs = dict(batch) if first else {}
            sched.step(**kwargs, target=labels if any(st.is_last for st in stages) else None,
                       return_outputs=return_outputs)
            opt.step()
    # the profiler's clock: the first event of step 2 is after step 1's optimizer step; find it by order
    steps = [e for e in prof.events() if e.name.startswith("Optimizer.step")]
    after = steps[0].time_range.end if steps else 0.0
    peak_rise, at = allocator_peak(prof, after)
    where = events_under_way(prof, at)
    folded = folded_peak(prof, after)
    plan = pipe.memory_plan()[rank]
    return {"rank": rank, "stages": ids, "param_bytes": sum(params.values()), "measured": sum(params.values()) + peak_rise,
            "folded": sum(params.values()) + folded,
            "predicted": plan.peak, "phase": plan.phase, "measured_at": where,
            "parts": {k: sum(getattr(s, k) for s in plan.stages) for k in
                      ("params", "grads", "optimizer", "buffers", "activations", "logits", "transient")},
            "layers": [f"{pipe.layer_ranges[i].start}-{pipe.layer_ranges[i].stop - 1}" for i in ids]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen,llava")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--return-outputs", default="true,false",
                    help="schedule.step(return_outputs=...) values to run: true (torch's default), false (fxpp run's)")
    ap.add_argument("--json", default=default_json_path("bench_memory_plan"))
    args = ap.parse_args()
    schedules = schedules_arg(ap, args.schedules, SCHEDULES)
    env = start(threads=1, spawned=True)
    from fxpp.trainer.launch import run_ranks

    choices = {"true": True, "false": False}
    if not set(args.return_outputs.split(",")) <= set(choices):
        ap.error(f"--return-outputs {args.return_outputs!r}: a comma list of true and false")
    outputs = [choices[v] for v in args.return_outputs.split(",")]
    rows = []
    for model_name in [m for m in args.models.split(",") if m]:
        for keep in outputs:
            for schedule in schedules:
                values = values_or_exit(run_ranks(rank_job, WORLD, model_name, schedule, keep, timeout_s=900, threads=1,
                                                  barrier_at_end=True), f"{model_name} {schedule}")
                for v in values:
                    rows.append(_row(model_name, schedule, keep, v))
                print(f"# {model_name} {schedule} return_outputs={keep}: done", flush=True)
    report(rows, ["model", "schedule", "return_outputs", "rank", "stages", "layers", "predicted_MB", "measured_MB",
                  "error", "phase", "measured_at", "folded_MB", "params_MB", "grads_MB", "optimizer_MB", "buffers_MB",
                  "activations_MB", "logits_MB", "transient_MB"], env, args.json)
    worst = max(rows, key=lambda r: abs(r["error"]))
    print(f"# worst prediction error: {worst['error']:+.1%} ({worst['model']}, {worst['schedule']}, "
          f"return_outputs={worst['return_outputs']}, rank {worst['rank']})")
    sys.exit(0)


def _row(model_name: str, schedule: str, keep: bool, v: dict) -> dict:
    return {"model": "qwen2-v151936" if model_name == "qwen" else "llava-h64", "schedule": schedule,
            "return_outputs": keep, "rank": v["rank"], "stages": ",".join(map(str, v["stages"])),
            "layers": " ".join(v["layers"]), "predicted_MB": v["predicted"] / MB, "measured_MB": v["measured"] / MB,
            "error": (v["predicted"] - v["measured"]) / v["measured"], "phase": v["phase"],
            "measured_at": v["measured_at"], "folded_MB": v["folded"] / MB, **{f"{k}_MB": b / MB for k, b in v["parts"].items()}}


if __name__ == "__main__":
    main()

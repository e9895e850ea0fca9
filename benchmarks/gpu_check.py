"""The CUDA paths on one GPU in one short run: NCCL, every stage on cuda:0, bf16.

What it checks (issue 12, part 4), on whatever device is present (cuda:0 with NCCL when
CUDA is available, else the CPU with gloo, so the script is dry-run on CPU machines):

1. **World size 1, NCCL.** One process, a process group of size 1, a 4-stage pipeline
   with ``Interleaved1F1B`` and every stage on the same rank and device.
2. **Equality with the unpatched model.** After one schedule step on 4 microbatches, the
   loss and every parameter gradient equal the unpatched model run on the same
   microbatches with gradient accumulation (``causal_lm_loss`` semantics: the
   whole-batch token mean). fp32 and bf16. The reference differs from the pipeline only
   in the order of float sums (the same modules run on the same tensors), so the bound
   is a few ulps of the dtype relative to the largest gradient: 64 ulps, i.e.
   ``64 * eps * max|grad|`` (fp32 eps 1.2e-7, bf16 eps 7.8e-3).
3. **Stage overhead and peak memory.** ``pipe(**inputs)`` (the 4 stages called one after
   the other in this process) against ``model(**inputs)``, forward + backward, bf16,
   interleaved (eager, fxpp, eager, ...), median of ``--iters``; peak memory of each
   (``torch.cuda.max_memory_allocated``; on CPU not measured).

5. **Predicted against measured memory** (issue 25): the memory model's peak of the one rank
   against ``torch.cuda.max_memory_allocated`` over training steps 2-3, fp32 (see ``_memory``).

4. **A bf16 mixed-precision training step and its host synchronisations.** fp32 master
   parameters, ``build_stage(..., mixed_precision="bf16")`` (FSDP2's policy over a 1-rank
   mesh), Interleaved1F1B, ``fxpp.clip_grad_norm_`` and AdamW; after two warm-up steps one
   step runs under ``torch.cuda.set_sync_debug_mode("warn")`` and the synchronising calls
   are counted (each is a warning); the count is printed per step, with 4 and with 8
   microbatches (a count that grows with the microbatches is a host read per microbatch).
   On CPU there is nothing to count (printed as n/a).

5. **Compiled stages** (``build_stage(..., compile=True)``, issue 24): bf16 mixed precision,
   one step of 1F1B (one stage) and of ZBVZeroBubble (two stages on the rank, V
   placement), eager stages against compiled ones built from the same seeded model,
   interleaved, median of ``--iters`` after ``--warmup``; the compiled pipeline's compile
   count and seconds (``fxpp.compile_stats()``) and the loss difference (bf16 bound 5e-2,
   as ``fxpp run``'s check).

Run: ``bash benchmarks/gpu_check.sh`` (writes ``$OUT/gpu_check.json`` when ``OUT`` is set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

STAGES, MICROBATCHES = 4, 4
ULPS = 64  # see the module docstring


def _model(dtype: torch.dtype, device: torch.device, hidden: int, layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 128, 1),
                         vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).train()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _equality(dtype: torch.dtype, device: torch.device, args) -> dict:
    """One Interleaved1F1B step with all 4 stages on this rank against the unpatched model."""
    import fxpp

    model = _model(dtype, device, args.hidden, args.layers, args.vocab)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[0, : args.seq // 4] = 0  # one left-padded row
    labels = ids.masked_fill(mask == 0, -100)
    micro = args.batch // MICROBATCHES

    # the reference: the unpatched model on the same microbatches, the whole-batch token mean
    model.zero_grad(set_to_none=True)
    tokens = (labels[:, 1:] != -100).sum()
    ref_loss = torch.zeros((), device=device, dtype=torch.float32)
    for k in range(MICROBATCHES):
        sl = slice(k * micro, (k + 1) * micro)
        logits = model(input_ids=ids[sl], attention_mask=mask[sl], use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[sl, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum") / tokens
        loss.backward()
        ref_loss += loss.detach()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)

    pipe = fxpp.pipeline(model, STAGES)
    stages = [pipe.build_stage(i, device) for i in range(STAGES)]
    loss_fn = fxpp.causal_lm_loss(labels, MICROBATCHES)
    schedule = fxpp.schedule("Interleaved1F1B", stages, MICROBATCHES, loss_fn)
    losses: list = []
    schedule.step(input_ids=ids, attention_mask=mask, target=labels, losses=losses)
    got_loss = float(loss_fn.whole_batch(losses))
    got = _grads(model)
    scale = max(float(t.abs().max()) for t in ref.values())
    eps = torch.finfo(dtype).eps
    worst = max(float((got[n] - ref[n]).abs().max()) for n in ref)
    bound = ULPS * eps * scale
    return {"dtype": str(dtype).replace("torch.", ""), "loss": got_loss, "reference_loss": float(ref_loss),
            "loss_diff": abs(got_loss - float(ref_loss)), "max_grad_diff": worst, "bound": bound,
            "same_params": set(got) == set(ref), "ok": set(got) == set(ref) and worst <= bound
            and abs(got_loss - float(ref_loss)) <= ULPS * eps * max(abs(float(ref_loss)), 1.0)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _overhead(device: torch.device, args) -> dict:
    """Forward + backward of the 4 stages in one process against the unpatched model, bf16."""
    import fxpp

    dtype = torch.bfloat16
    model = _model(dtype, device, args.hidden, args.layers, args.vocab)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2)).to(device)
    pipe = fxpp.pipeline(model, STAGES)

    def eager():
        return model(input_ids=ids, use_cache=False).logits

    def staged():
        return pipe(input_ids=ids)

    def run(fn) -> tuple[float, int]:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        fn().float().sum().backward()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        return time.perf_counter() - t0, peak

    for _ in range(args.warmup):
        run(eager), run(staged)
    times = {"eager": [], "fxpp": []}
    peaks = {"eager": 0, "fxpp": 0}
    for _ in range(args.iters):
        for name, fn in (("eager", eager), ("fxpp", staged)):
            t, peak = run(fn)
            times[name].append(t)
            peaks[name] = max(peaks[name], peak)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"eager_ms": med["eager"] * 1e3, "fxpp_ms": med["fxpp"] * 1e3, "ratio": med["fxpp"] / med["eager"],
            "eager_peak_mib": peaks["eager"] / 2**20, "fxpp_peak_mib": peaks["fxpp"] / 2**20,
            "peak_ratio": peaks["fxpp"] / peaks["eager"] if peaks["eager"] else None}


def _syncs_per_step(device: torch.device, args, microbatches: int) -> dict:
    """One steady-state bf16 mixed-precision step; the synchronising calls in it (CUDA only)."""
    import warnings

    import fxpp

    model = _model(torch.float32, device, args.hidden, args.layers, args.vocab)
    batch = 2 * microbatches
    ids = torch.randint(0, args.vocab, (batch, args.seq), generator=torch.Generator().manual_seed(3)).to(device)
    labels = ids.clone()
    pipe = fxpp.pipeline(model, STAGES, example_inputs={"input_ids": ids[:2]})
    stages = [pipe.build_stage(i, device, mixed_precision="bf16") for i in range(STAGES)]
    schedule = fxpp.schedule("Interleaved1F1B", stages, microbatches, fxpp.causal_lm_loss(labels, microbatches))
    params = {id(p): p for st in stages for p in st.submod.parameters()}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        schedule.step(input_ids=ids, target=labels)
        fxpp.clip_grad_norm_(schedule.stages, 1.0)
        opt.step()

    for _ in range(2):
        step()
    _sync(device)
    if device.type != "cuda":
        step()
        return {"microbatches": microbatches, "syncs": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"microbatches": microbatches, "syncs": len(syncs), "first": syncs[:5],
            "param_dtypes": sorted({str(p.dtype) for p in params.values()})}


def _memory(device: torch.device, args) -> dict:
    """Part 5 (issue 25): the memory model's rank peak against ``torch.cuda.max_memory_allocated``.

    fp32, the 4 stages of Interleaved1F1B on this one rank, AdamW, 3 steps; the peak of
    steps 2-3 (step 1 allocates the optimizer state and the schedule's buffers) against
    ``pipe.memory_plan()[0]`` for the same split. On CPU nothing is measured (``None``).
    """
    import fxpp

    model = _model(torch.float32, device, args.hidden, args.layers, args.vocab)
    micro = args.batch // MICROBATCHES
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    pipe = fxpp.pipeline(model, STAGES, example_inputs={"input_ids": ids[:micro]}, schedule="Interleaved1F1B",
                         microbatch=(micro, args.seq), num_microbatches=MICROBATCHES, device=device)
    predicted = pipe.memory_plan()[0]
    stages = [pipe.build_stage(i, device) for i in range(STAGES)]
    schedule = fxpp.schedule("Interleaved1F1B", stages, MICROBATCHES, fxpp.causal_lm_loss(ids, MICROBATCHES))
    opt = torch.optim.AdamW([p for st in stages for p in st.submod.parameters()], lr=1e-5)
    peak = None
    for step in range(3):
        if step == 1 and device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        opt.zero_grad(set_to_none=True)
        schedule.step(input_ids=ids, target=ids)
        opt.step()
    if device.type == "cuda":
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
    return {"predicted_mib": predicted.peak / 2 ** 20, "phase": predicted.phase,
            "measured_mib": None if peak is None else peak / 2 ** 20,
            "error": None if peak is None else (predicted.peak - peak) / peak}


def _compiled(device: torch.device, args) -> list[dict]:
    """Eager against compiled stages, bf16 mixed precision, 1F1B and ZBVZeroBubble on this one rank."""
    import fxpp

    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(4)).to(device)
    labels = ids.clone()
    rows = []
    for schedule, num_stages in (("1F1B", 1), ("ZBVZeroBubble", 2)):
        runs = {}
        for name, compile in (("eager", False), ("compiled", True)):
            model = _model(torch.float32, device, args.hidden, args.layers, args.vocab)
            pipe = fxpp.pipeline(model, num_stages, example_inputs={"input_ids": ids[: args.batch // MICROBATCHES]})
            stages = [pipe.build_stage(i, device, mixed_precision="bf16", compile=compile) for i in range(num_stages)]
            loss_fn = fxpp.causal_lm_loss(labels, MICROBATCHES)
            runs[name] = (fxpp.schedule(schedule, stages, MICROBATCHES, loss_fn), loss_fn, pipe)

        def step(name):
            sched, loss_fn, _ = runs[name]
            losses: list = []
            _sync(device)
            t0 = time.perf_counter()
            sched.step(input_ids=ids, target=labels, losses=losses)
            _sync(device)
            for st in sched.stages:
                st.submod.zero_grad(set_to_none=True)
            return time.perf_counter() - t0, float(loss_fn.whole_batch(losses))

        before = fxpp.compile_stats()
        first_s = step("compiled")[0]
        stats = fxpp.compile_stats()
        for _ in range(args.warmup):
            step("eager"), step("compiled")
        times, loss = {"eager": [], "compiled": []}, {}
        for _ in range(args.iters):
            for name in ("eager", "compiled"):
                t, loss[name] = step(name)
                times[name].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"schedule": schedule, "stages": num_stages, "eager_ms": med["eager"] * 1e3,
                     "compiled_ms": med["compiled"] * 1e3, "speedup": med["eager"] / med["compiled"],
                     "compiles": stats["compiles"] - before["compiles"],
                     "compile_s": stats["compile_s"] - before["compile_s"], "first_step_s": first_s,
                     "loss_diff": abs(loss["eager"] - loss["compiled"]),
                     "ok": abs(loss["eager"] - loss["compiled"]) <= 5e-2})
    return rows


def _rank(rank: int, world: int, workdir: str, args_dict: dict) -> dict:
    import torch.distributed as dist

    from fxpp.runtime.placement import default_device

    args = argparse.Namespace(**args_dict)
    device = default_device(rank)
    out = {"device": str(device), "backend": dist.get_backend(),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "torch": torch.__version__}
    out["equality"] = [_equality(dt, device, args) for dt in (torch.float32, torch.bfloat16)]
    out["overhead"] = _overhead(device, args)
    out["mixed_precision_syncs"] = [_syncs_per_step(device, args, m) for m in (4, 8)]
    out["memory"] = _memory(device, args)
    out["compiled"] = _compiled(device, args)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    args = ap.parse_args(argv)

    from fxpp.trainer.launch import run_ranks

    [res] = run_ranks(_rank, 1, vars(args), timeout_s=540, pg_timeout_s=300)
    if not res["ok"]:
        print(res.get("traceback") or res["error"], file=sys.stderr)
        return 1
    out = res["value"]
    out["args"] = vars(args)
    print(f"device {out['device']} ({out['gpu'] or 'cpu'}), backend {out['backend']}, torch {out['torch']}")
    for eq in out["equality"]:
        print(f"{eq['dtype']:>8}: loss {eq['loss']:.6f} vs {eq['reference_loss']:.6f}, max |grad diff| "
              f"{eq['max_grad_diff']:.3g} (bound {eq['bound']:.3g}): {'MATCH' if eq['ok'] else 'MISMATCH'}")
    ov = out["overhead"]
    print(f"fwd+bwd bf16 batch {args.batch}x{args.seq}: eager {ov['eager_ms']:.2f} ms, fxpp 4 stages "
          f"{ov['fxpp_ms']:.2f} ms, ratio {ov['ratio']:.3f}; peak memory eager {ov['eager_peak_mib']:.0f} MiB, "
          f"fxpp {ov['fxpp_peak_mib']:.0f} MiB")
    for mp in out["mixed_precision_syncs"]:
        count = "n/a (no CUDA)" if mp["syncs"] is None else mp["syncs"]
        print(f"bf16 mixed precision step, {mp['microbatches']} microbatches: host synchronisations per step {count}"
              + (f" (first: {mp['first']})" if mp.get("first") else ""))
    mem = out["memory"]
    print(f"memory, fp32 Interleaved1F1B, 4 stages on one rank: predicted peak {mem['predicted_mib']:.0f} MiB "
          f"({mem['phase']}), measured " + ("n/a (no CUDA)" if mem["measured_mib"] is None else
                                            f"{mem['measured_mib']:.0f} MiB, error {mem['error']:+.1%}"))
    for c in out["compiled"]:
        print(f"compiled stages, bf16, {c['schedule']} ({c['stages']} stage(s)): eager {c['eager_ms']:.2f} ms, compiled "
              f"{c['compiled_ms']:.2f} ms, speedup {c['speedup']:.3f}; {c['compiles']} compiles in {c['compile_s']:.1f} s "
              f"(first step {c['first_step_s']:.1f} s); loss diff {c['loss_diff']:.2e}: "
              f"{'MATCH' if c['ok'] else 'MISMATCH'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if all(eq["ok"] for eq in out["equality"]) and all(c["ok"] for c in out["compiled"]) else 1


if __name__ == "__main__":
    sys.exit(main())

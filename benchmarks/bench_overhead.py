"""Run-time overhead of fxpp stages against the unpatched transformers model.

A CPU-sized Llama (hidden 256, 4 layers, intermediate 512, vocab 1000, 4 heads), batch 4,
seq 128, fp32, random weights. Measures forward+backward (loss = sum of logits) of

* ``pipe(**inputs)``: ``fxpp.pipeline(model, 2)``, its 2 stages run one after the other
  in this process, and
* ``model(**inputs).logits``: the same model, eager, unpatched,

interleaved in one loop (eager, fxpp, eager, fxpp, ...) so that machine noise hits both
alike; median over --iters after --warmup calls of each. Prints both medians in ms and
the ratio fxpp/eager (1.0 = no overhead), and checks the two give the same logits.

Run:  PYTHONPATH=. python benchmarks/bench_overhead.py [--iters 20] [--warmup 3] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fxpp
from _common import default_json_path, report, start

BATCH, SEQ = 4, 128


def fwd_bwd(fn, model) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    fn().sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (e.g. 1 for steadier numbers)")
    ap.add_argument("--json", default=default_json_path("bench_overhead"))
    args = ap.parse_args()
    env = start(threads=args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512)
    model = LlamaForCausalLM(config).float().train()  # train(): dropout is 0 in Llama, grads flow
    inputs = {
        "input_ids": torch.randint(0, config.vocab_size, (BATCH, SEQ)),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
    }
    t0 = time.perf_counter()
    pipe = fxpp.pipeline(model, 2, example_inputs=inputs)
    build_s = time.perf_counter() - t0

    eager = lambda: model(**inputs, use_cache=False).logits  # noqa: E731
    staged = lambda: pipe(**inputs)  # noqa: E731
    with torch.no_grad():
        max_abs_diff = (eager() - staged()).abs().max().item()

    for _ in range(args.warmup):
        fwd_bwd(eager, model)
        fwd_bwd(staged, model)
    t_eager, t_fxpp = [], []
    for _ in range(args.iters):
        t_eager.append(fwd_bwd(eager, model))
        t_fxpp.append(fwd_bwd(staged, model))

    med_e, med_f = statistics.median(t_eager) * 1e3, statistics.median(t_fxpp) * 1e3
    rows = [{
        "model": "llama-h256-L4",
        "batch": BATCH,
        "seq": SEQ,
        "stages": pipe.num_stages,
        "iters": args.iters,
        "threads": torch.get_num_threads(),
        "pipeline_build_s": build_s,
        "eager_fwd_bwd_ms": med_e,
        "fxpp_fwd_bwd_ms": med_f,
        "fxpp/eager": med_f / med_e,
        "eager_min_ms": min(t_eager) * 1e3,
        "fxpp_min_ms": min(t_fxpp) * 1e3,
        "logits_max_abs_diff": max_abs_diff,
    }]
    report(rows, ["model", "stages", "threads", "iters", "eager_fwd_bwd_ms", "fxpp_fwd_bwd_ms", "fxpp/eager",
                  "eager_min_ms", "fxpp_min_ms", "logits_max_abs_diff"], env, args.json)


if __name__ == "__main__":
    main()

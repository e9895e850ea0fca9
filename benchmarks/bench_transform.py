"""Trace + rewrite cost of fxpp on Llama-3-shaped models built on the meta device.

Measures, per model shape (8B: hidden 4096 / 32 layers; 70B: hidden 8192 / 80 layers),
the wall time (median of --repeats after one warm-up) of

* ``fxpp.pipeline(model, 4)``               -- one trace of the whole model + 4 stages,
* ``fxpp.transform(model, "middle", 8..15)`` -- one stage alone (trace included),
* ``torch.distributed.pipelining.pipeline`` -- the same 4-way split at model.layers.{8,16,24}
  (``SplitPoint.BEGINNING``, a fresh meta model per call, built untimed), recorded as a
  time or as its failure message, once with the
  model's defaults (``use_cache=True``: torch.export fails on the DynamicCache output with
  torch 2.13 / transformers 5.23) and once with ``use_cache=False`` in ``mb_kwargs``;
  the ratio torch/fxpp uses the latter,

with the same meta example inputs (batch 1, seq 128, input_ids + all-ones attention_mask).
Nothing is allocated: parameters live on meta, so this is pure tracing/rewriting cost.

Run:  PYTHONPATH=. python benchmarks/bench_transform.py [--models 8b,70b] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fxpp
from _common import default_json_path, report, start

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
}
BATCH, SEQ, STAGES = 1, 128, 4


def build(name: str):
    config = LlamaConfig(**SHAPES[name], num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.eval()
    inputs = {
        "input_ids": torch.zeros(BATCH, SEQ, dtype=torch.long, device="meta"),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long, device="meta"),
    }
    return model, inputs


def timed(fn, repeats: int, setup=lambda: None):
    """(median seconds, None) or (None, first line of the error); one warm-up call.

    ``fn(setup())``: ``setup`` runs untimed before each call.
    """
    try:
        fn(setup())
        times = []
        for _ in range(repeats):
            arg = setup()
            t0 = time.perf_counter()
            fn(arg)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), None
    except Exception as e:  # noqa: BLE001 -- a failure is a result here
        return None, describe(e)


def describe(e: BaseException) -> str:
    """First line of the error and, when it wraps another (``raise ... from``), of its root cause."""
    def line(x):
        return f"{type(x).__name__}: " + (str(x).strip().splitlines() or [""])[0][:160]
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    return line(e) if root is e else f"{line(e)} [root cause: {line(root)}]"


def torch_pipelining(model, inputs, n_layers: int, use_cache: bool | None):
    from torch.distributed.pipelining import SplitPoint, pipeline

    step = n_layers // STAGES
    split_spec = {f"model.layers.{i * step}": SplitPoint.BEGINNING for i in range(1, STAGES)}
    return pipeline(
        model,
        mb_args=(inputs["input_ids"],),
        mb_kwargs={"attention_mask": inputs["attention_mask"], **({} if use_cache is None else {"use_cache": use_cache})},
        split_spec=split_spec,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="8b,70b", help="comma list of " + ",".join(SHAPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=default_json_path("bench_transform"))
    args = ap.parse_args()

    env = start("meta (trace/rewrite runs on CPU)")
    rows = []
    for name in args.models.split(","):
        model, inputs = build(name)
        n = model.config.num_hidden_layers
        t_pipe, e_pipe = timed(lambda _: fxpp.pipeline(model, STAGES, example_inputs=inputs), args.repeats)
        mid = range(n // STAGES, 2 * n // STAGES)
        t_mid, e_mid = timed(lambda _: fxpp.transform(model, "middle", mid, example_inputs=inputs), args.repeats)
        # torch's annotate_split_points wraps the split modules' forward in place, and a
        # second pipeline() on the same model recurses forever: a fresh model per call.
        # As asked (model defaults, i.e. use_cache=True), then with use_cache=False so that
        # torch.export does not meet a DynamicCache in the output.
        fresh = lambda: build(name)[0]  # noqa: E731
        t_tdef, e_tdef = timed(lambda m: torch_pipelining(m, inputs, n, None), args.repeats, fresh)
        t_torch, e_torch = timed(lambda m: torch_pipelining(m, inputs, n, False), args.repeats, fresh)
        row = {
            "model": name,
            "layers": n,
            "seq": SEQ,
            "repeats": args.repeats,
            "fxpp_pipeline4_s": t_pipe,
            "fxpp_middle_s": t_mid,
            "torch_pipelining4_default_s": t_tdef,
            "torch_pipelining4_nocache_s": t_torch,
            "torch_nocache/fxpp_pipeline4": (t_torch / t_pipe) if (t_torch and t_pipe) else None,
            "errors": "; ".join(f"{k}: {e}" for k, e in
                                (("fxpp.pipeline", e_pipe), ("fxpp.transform", e_mid), ("torch default", e_tdef),
                                 ("torch use_cache=False", e_torch)) if e) or None,
        }
        rows.append(row)
        print(f"# {name} done", flush=True)
        del model
    report(rows, ["model", "layers", "fxpp_pipeline4_s", "fxpp_middle_s", "torch_pipelining4_default_s",
                  "torch_pipelining4_nocache_s", "torch_nocache/fxpp_pipeline4", "errors"], env, args.json)


if __name__ == "__main__":
    main()

"""Trace + rewrite cost of fxpp on Llama-3-shaped models built on the meta device.

Measures, per model shape (8B: hidden 4096 / 32 layers; 70B: hidden 8192 / 80 layers),
the wall time (median of --repeats after one warm-up) of

* ``fxpp.pipeline(model, 4)``               -- the whole model traced for its input
  signature and each representative present set (one leaf evaluation shared by all
  the traces) + 4 stages,
* ``fxpp.transform(model, "middle", 8..15)`` -- one stage alone (the same traces),
* NeMo AutoModel's ``split_model_into_stages`` -- the same 4-way split by deep copies of
  the model with the other stages' modules removed (a 1-rank gloo group; the 4 stages
  as 4 virtual stages of an ``Interleaved1F1B`` schedule on that rank, device meta),
  where ``nemo_automodel`` is importable (``pip install --no-deps nemo-automodel``);
  else a printed note and no column,

these three interleaved (one call of each per repeat, in turn, so that the shared
machine's load falls on all of them alike), and of

* ``torch.distributed.pipelining.pipeline`` -- the same 4-way split at model.layers.{8,16,24}
  (``SplitPoint.BEGINNING``, a fresh meta model per call, built untimed), recorded as a
  time or as its failure message, once with the
  model's defaults (``use_cache=True``: torch.export fails on the DynamicCache output with
  torch 2.13 / transformers 5.23) and once with ``use_cache=False`` in ``mb_kwargs``;
  the ratio torch/fxpp uses the latter (median of --torch-repeats: seconds a call),

with the same meta example inputs (batch 1, seq 128, input_ids + all-ones attention_mask).
Nothing is allocated: parameters live on meta, so this is pure tracing/rewriting cost.

Run:  PYTHONPATH=. python benchmarks/bench_transform.py [--models 8b,70b] [--repeats 7] [--torch-repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import SplitPoint, pipeline
from transformers import LlamaConfig, LlamaForCausalLM

import fxpp
from _common import default_json_path, report, start

try:  # optional: NeMo AutoModel's split, timed beside fxpp's where it is installed
    from nemo_automodel.components.distributed.pipelining.functional import split_model_into_stages
except ImportError as e:
    split_model_into_stages = None
    NEMO_MISSING = f"{type(e).__name__}: {e}"

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
    return timed_interleaved({"": (fn, setup)}, repeats)[""]


def timed_interleaved(calls: dict, repeats: int) -> dict:
    """``{name: (median seconds, None) or (None, first line of the error)}`` of ``calls``
    (``{name: (fn, setup)}``), interleaved: one warm-up call each, then per repeat one
    timed call of each in turn. ``fn(setup())``: ``setup`` runs untimed before each call.
    A call that fails is recorded by its error and left out of later repeats. A full
    garbage collection runs untimed before each call: one call's garbage (NeMo's deep
    copies, a fresh model) is not collected in the next one's time.
    """
    times: dict = {name: [] for name in calls}
    errors: dict = {}

    def once(name):
        fn, setup = calls[name]
        try:
            arg = setup()
            gc.collect()
            t0 = time.perf_counter()
            fn(arg)
            return time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 -- a failure is a result here
            errors[name] = describe(e)
            return None

    for name in calls:
        once(name)
    for _ in range(repeats):
        for name in calls:
            if name not in errors:
                t = once(name)
                if t is not None:
                    times[name].append(t)
    return {name: (None, errors[name]) if name in errors else (statistics.median(times[name]), None)
            for name in calls}


def describe(e: BaseException) -> str:
    """First line of the error and, when it wraps another (``raise ... from``), of its root cause."""
    def line(x):
        return f"{type(x).__name__}: " + (str(x).strip().splitlines() or [""])[0][:160]
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    return line(e) if root is e else f"{line(e)} [root cause: {line(root)}]"


def torch_pipelining(model, inputs, n_layers: int, use_cache: bool | None):
    step = n_layers // STAGES
    split_spec = {f"model.layers.{i * step}": SplitPoint.BEGINNING for i in range(1, STAGES)}
    return pipeline(
        model,
        mb_args=(inputs["input_ids"],),
        mb_kwargs={"attention_mask": inputs["attention_mask"], **({} if use_cache is None else {"use_cache": use_cache})},
        split_spec=split_spec,
    )


def nemo_split(model, mesh, n_layers: int):
    """NeMo's ``split_model_into_stages``: all ``STAGES`` stages, as virtual stages of the one rank."""
    stages, parts = split_model_into_stages(model, mesh, "pp", "Interleaved1F1B", torch.device("meta"),
                                            layers_per_stage=n_layers // STAGES)
    assert len(stages) == STAGES, len(stages)
    return stages, parts


def one_rank_mesh(workdir: str):
    """A 1-rank gloo group (file rendezvous, no port) and its ``pp`` mesh, for NeMo's split."""
    dist.init_process_group("gloo", store=dist.FileStore(f"{workdir}/store", 1), rank=0, world_size=1)
    return init_device_mesh("cpu", (1,), mesh_dim_names=("pp",))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="8b,70b", help="comma list of " + ",".join(SHAPES))
    ap.add_argument("--repeats", type=int, default=7, help="timed calls of fxpp (and NeMo), interleaved")
    ap.add_argument("--torch-repeats", type=int, default=3, help="timed calls of torch's pipeline() (seconds each)")
    ap.add_argument("--json", default=default_json_path("bench_transform"))
    ap.add_argument("--parts", action="store_true",
                    help="also time the parts of one build (the canonical trace alone, a subset trace with the "
                         "build's leaf cache, the stage extractions), interleaved with the build and NeMo's split")
    args = ap.parse_args()

    env = start("meta (trace/rewrite runs on CPU)")
    if split_model_into_stages is None:
        print(f"# NeMo AutoModel not importable ({NEMO_MISSING}): its split_model_into_stages is not timed "
              "(pip install --no-deps nemo-automodel to time it)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        mesh = one_rank_mesh(workdir) if split_model_into_stages is not None else None
        try:
            for name in args.models.split(","):
                rows.append(measure(name, args, mesh))
                print(f"# {name} done", flush=True)
        finally:
            if mesh is not None:
                dist.destroy_process_group()
    columns = ["model", "layers", "fxpp_pipeline4_s", "fxpp_middle_s"]
    if split_model_into_stages is not None:
        columns += ["nemo_split4_s", "nemo/fxpp_pipeline4"]
    columns += ["torch_pipelining4_default_s", "torch_pipelining4_nocache_s", "torch_nocache/fxpp_pipeline4"]
    columns += [k for k in (rows[0] if rows else {}) if k.startswith("part")] + ["errors"]
    report(rows, columns, env, args.json)


def build_parts(model, inputs) -> dict:
    """The parts of one ``fxpp.pipeline(model, STAGES)`` as ``timed_interleaved`` calls: what
    a build costs at least (the canonical trace), and what the rest adds."""
    from fxpp.compile import compile_example
    from fxpp.meta import signature_record, trace_record
    from fxpp.pipeline import Pipeline
    from fxpp.trace.meta_eval import LeafValues

    pipe = fxpp.pipeline(model, STAGES, example_inputs=inputs)
    canonical = trace_record(pipe.model_graph).example_inputs
    shared = LeafValues()  # a build's cache, filled by its canonical trace
    compile_example(model, canonical, shared)

    def extractions(_):
        signature_record(pipe.model_graph).layouts.clear()
        Pipeline(model, pipe.model_graph, pipe.layer_ranges, pipe.example_inputs, pipe.block_costs)

    none = lambda: None  # noqa: E731
    return {
        "part canonical trace": (lambda _: compile_example(model, canonical, LeafValues()), none),
        "part subset trace (input_ids), build's leaf cache": (
            lambda _: compile_example(model, {"input_ids": canonical["input_ids"]}, shared), none),
        "part stage extractions and layouts": (extractions, none),
    }


def measure(name: str, args, mesh) -> dict:
    model, inputs = build(name)
    n = model.config.num_hidden_layers
    mid = range(n // STAGES, 2 * n // STAGES)
    # torch's annotate_split_points wraps the split modules' forward in place, and a
    # second pipeline() on the same model recurses forever: a fresh model per call.
    # NeMo's split deep-copies the model it is given; a fresh one per call as well.
    fresh = lambda: build(name)[0]  # noqa: E731
    calls = {
        "fxpp.pipeline": (lambda _: fxpp.pipeline(model, STAGES, example_inputs=inputs), lambda: None),
        "fxpp.transform": (lambda _: fxpp.transform(model, "middle", mid, example_inputs=inputs), lambda: None),
    }
    if mesh is not None:
        calls["NeMo split"] = (lambda m: nemo_split(m, mesh, n), fresh)
    if args.parts:
        calls.update(build_parts(model, inputs))
    found = timed_interleaved(calls, args.repeats)
    (t_pipe, e_pipe), (t_mid, e_mid) = found["fxpp.pipeline"], found["fxpp.transform"]
    t_nemo, e_nemo = found.get("NeMo split", (None, None))
    # As asked (model defaults, i.e. use_cache=True), then with use_cache=False so that
    # torch.export does not meet a DynamicCache in the output.
    t_tdef, e_tdef = timed(lambda m: torch_pipelining(m, inputs, n, None), args.torch_repeats, fresh)
    t_torch, e_torch = timed(lambda m: torch_pipelining(m, inputs, n, False), args.torch_repeats, fresh)
    row = {
        "model": name,
        "layers": n,
        "seq": SEQ,
        "repeats": args.repeats,
        "torch_repeats": args.torch_repeats,
        "fxpp_pipeline4_s": t_pipe,
        "fxpp_middle_s": t_mid,
        "nemo_split4_s": t_nemo,
        "nemo/fxpp_pipeline4": (t_nemo / t_pipe) if (t_nemo and t_pipe) else None,
        "torch_pipelining4_default_s": t_tdef,
        "torch_pipelining4_nocache_s": t_torch,
        "torch_nocache/fxpp_pipeline4": (t_torch / t_pipe) if (t_torch and t_pipe) else None,
        **{f"{k}_s": t for k, (t, _) in found.items() if k.startswith("part")},
        "errors": "; ".join(f"{k}: {e}" for k, e in
                            (("fxpp.pipeline", e_pipe), ("fxpp.transform", e_mid), ("NeMo split", e_nemo),
                             ("torch default", e_tdef), ("torch use_cache=False", e_torch)) if e) or None,
    }
    del model
    return row


if __name__ == "__main__":
    main()

"""Share of a non-first stage's forward spent recomputing masks and rotary embeddings.

fxpp sends only the hidden states and the model inputs across a cut; every later stage
recomputes what is a function of the inputs alone: attention masks, rotary cos/sin,
position ids (the nodes with ``node.meta["fxpp"].rematerialize`` at position -1, roles
``mask`` / ``rotary`` / ``compute`` / ``constant``). This measures what that costs on the
middle stage of a 3-stage split (``cuts=[L/3, 2L/3]``) of CPU-sized models, fp32,
seeded random weights:

* ``gemma3``: Gemma 3 text, hidden 256, 12 layers in Gemma 3's pattern (5 sliding, 1 full:
  the middle stage, layers 4-7, holds both kinds), sliding window 128, head_dim 64,
  4 heads / 1 KV head, intermediate 1024, two rotary embeddings (local and global);
* ``llama``: Llama, hidden 256, 12 layers, intermediate 688, 4 heads / 4 KV heads.

For batch 2 at --seqs (default 128 and 512), with an all-ones attention mask (sdpa can
skip a causal mask then) and with left padding (every mask is materialised), the stage
receives the real tensors stage 0 sends. Per row, medians over --iters after --warmup,
the three timed callables interleaved in one loop (order rotated every iteration) so
machine noise hits them alike:

* ``stage_ms``: the stage's forward (``stage(*received)``, the StageModule call the
  pipeline makes: input checks + generated code), grad mode on as in training
  (received hidden states require grad); outputs dropped;
* ``recompute_ms``: a GraphModule of only the rematerialised nodes (same node code,
  same inputs, returning what the rest of the stage reads from them);
* ``cached_ms``: a GraphModule of the rest of the stage, given the rematerialised values
  precomputed as extra inputs: what a cache of masks / rotary tables for fixed shapes
  could reach at best (fxpp has no such cache). ``stage - recompute`` is the same bound
  computed; ``speedup_bound`` = stage / (stage - recompute);
* ``mask_ms``, ``rotary_ms``, ``other_ms``: the rematerialised time split by role, from a
  ``torch.fx.Interpreter`` that times each node (includes the interpreter's per-node
  overhead, so it sums a little above ``recompute_ms``).

Run:  PYTHONPATH=. python benchmarks/bench_recompute.py [--models gemma3,llama] [--seqs 128,512]
          [--iters 10] [--warmup 2] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch import fx

import fxpp
from fxpp.analysis.annotate import info
from _common import default_json_path, report, start

BATCH = 2
LAYERS = 12
REMAT_ROLES = ("mask", "rotary", "compute", "constant")


def build_model(family: str):
    import transformers as tf

    if family == "gemma3":
        kinds = {"s": "sliding_attention", "f": "full_attention"}
        config = tf.Gemma3TextConfig(
            vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64,
            sliding_window=128, layer_types=[kinds["sssssf"[i % 6]] for i in range(LAYERS)],
            max_position_embeddings=4096, pad_token_id=0,
        )
    elif family == "llama":
        config = tf.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=LAYERS,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                                pad_token_id=0)
    else:
        raise SystemExit(f"unknown model {family!r}: gemma3 or llama")
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).float().train()


def make_inputs(seq: int, padded: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (BATCH, seq), generator=g)
    mask = torch.ones_like(ids)
    if padded:  # left padding: row i has i * seq / (2 * BATCH) pad tokens
        for i in range(BATCH):
            n = i * seq // (2 * BATCH)
            ids[i, :n] = 0
            mask[i, :n] = 0
    return {"input_ids": ids, "attention_mask": mask}


def remat_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The stage's rematerialised nodes: recomputed from model inputs before the first layer."""
    out = []
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        rec = info(n)
        if rec.rematerialize and rec.position == -1 and rec.role in REMAT_ROLES:
            out.append(n)
    return out


def split_stage(stage: fx.GraphModule):
    """(recompute GraphModule, cached GraphModule, frontier nodes) of a stage.

    recompute(*stage_inputs) -> the frontier values (rematerialised values the rest reads);
    cached(*stage_inputs, *frontier_values) -> the stage's output without recomputation.
    """
    graph = stage.graph
    remat = remat_nodes(stage)
    in_remat = set(remat)
    for n in remat:
        for i in n.all_input_nodes:
            if i not in in_remat and i.op != "placeholder":
                raise RuntimeError(f"rematerialised {n.name} depends on {i.name} ({info(i).role}), which is not")
    frontier = [n for n in remat if any(u not in in_remat for u in n.users)]

    rg = fx.Graph()
    env: dict = {}
    for n in graph.nodes:
        if n.op == "placeholder":
            env[n] = rg.node_copy(n)
    for n in remat:
        env[n] = rg.node_copy(n, lambda x: env[x])
    rg.output(tuple(env[f] for f in frontier))

    cg = fx.Graph()
    env = {}
    for n in graph.nodes:
        if n.op == "placeholder":
            env[n] = cg.node_copy(n)
    for f in frontier:
        env[f] = cg.placeholder(f"cached_{f.name}")
    for n in graph.nodes:
        if n.op == "placeholder" or n in in_remat:
            continue
        if n.op == "output":
            cg.output(fx.node.map_arg(n.args[0], lambda x: env[x]))
            continue
        env[n] = cg.node_copy(n, lambda x: env[x])
    return fx.GraphModule(stage, rg), fx.GraphModule(stage, cg), frontier


class NodeTimer(fx.Interpreter):
    """Runs a graph node by node, adding each node's wall time to ``self.times[node.name]``."""

    def __init__(self, gm):
        super().__init__(gm)
        self.times: dict[str, float] = defaultdict(float)

    def run_node(self, n):
        t0 = time.perf_counter()
        out = super().run_node(n)
        self.times[n.name] += time.perf_counter() - t0
        return out


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a.detach(), b.detach())
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def measure(family: str, model, seq: int, padded: bool, iters: int, warmup: int) -> dict:
    inputs = make_inputs(seq, padded)
    n = model.config.num_hidden_layers
    pipe = fxpp.pipeline(model, 3, example_inputs=inputs, cuts=[n // 3, 2 * n // 3])
    first, stage = pipe.stages[0], pipe.stages[1]
    with torch.no_grad():
        sent = first(**inputs)
    received = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in sent)
    recompute, cached, frontier = split_stage(stage)
    with torch.no_grad():
        values = recompute(*received)
    full_out = stage(*received)
    cached_out = cached(*received, *values)
    assert same(full_out, cached_out), "the cached graph does not reproduce the stage"

    fns = {"stage": lambda: stage(*received), "recompute": lambda: recompute(*received),
           "cached": lambda: cached(*received, *values)}
    times = {k: [] for k in fns}
    order = list(fns)
    for i in range(warmup + iters):
        for k in order[i % 3:] + order[: i % 3]:  # rotate the order: no callable always runs first
            t0 = time.perf_counter()
            out = fns[k]()
            times[k].append(time.perf_counter() - t0)
            del out
    med = {k: statistics.median(v[warmup:]) * 1e3 for k, v in times.items()}

    timer = NodeTimer(stage)
    for _ in range(warmup):
        timer.run(*received)
    timer.times.clear()
    for _ in range(iters):
        timer.run(*received)
    by_role: dict[str, float] = defaultdict(float)
    remat_names = {x.name for x in remat_nodes(stage)}
    for node in stage.graph.nodes:
        if node.name in remat_names:
            role = info(node).role
            by_role[role if role in ("mask", "rotary") else "other"] += timer.times[node.name] / iters * 1e3

    roles = [info(x).role for x in remat_nodes(stage)]
    kinds = sorted({t for x in remat_nodes(stage) for t in info(x).layer_types})
    mask_vals = [v for f, v in zip(frontier, values) if info(f).role == "mask"]
    bound = med["stage"] - med["recompute"]
    return {
        "model": family,
        "stage": f"middle {pipe.layer_ranges[1].start}-{pipe.layer_ranges[1].stop - 1}",
        "batch": BATCH,
        "seq": seq,
        "attention_mask": "left-padded" if padded else "all ones",
        "remat_nodes": len(roles),
        "masks": roles.count("mask"),
        "rotary_calls": roles.count("rotary"),
        "for_layer_types": ",".join(kinds),
        "masks_materialised": sum(isinstance(v, torch.Tensor) for v in mask_vals),
        "stage_ms": med["stage"],
        "recompute_ms": med["recompute"],
        "recompute_share": med["recompute"] / med["stage"],
        "mask_ms": by_role["mask"],
        "rotary_ms": by_role["rotary"],
        "other_ms": by_role["other"],
        "cached_bound_ms": bound,
        "cached_ms": med["cached"],
        "speedup_bound": med["stage"] / bound if bound > 0 else None,
        "iters": iters,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gemma3,llama")
    ap.add_argument("--seqs", default="128,512")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--json", default=default_json_path("bench_recompute"))
    args = ap.parse_args()
    env = start(threads=args.threads)
    print("# cached_bound_ms = stage_ms - recompute_ms: the upper bound a cache of masks/rotary for fixed shapes "
          "could reach (fxpp has none); cached_ms measures it", flush=True)
    rows = []
    for family in args.models.split(","):
        model = build_model(family)
        for seq in [int(s) for s in args.seqs.split(",")]:
            for padded in (False, True):
                rows.append(measure(family, model, seq, padded, args.iters, args.warmup))
                print(f"# {family} seq {seq} {'padded' if padded else 'ones'} done", flush=True)
    report(rows, ["model", "stage", "seq", "attention_mask", "masks_materialised", "rotary_calls", "stage_ms",
                  "recompute_ms", "recompute_share", "mask_ms", "rotary_ms", "other_ms", "cached_bound_ms",
                  "cached_ms", "speedup_bound"], env, args.json)


if __name__ == "__main__":
    main()

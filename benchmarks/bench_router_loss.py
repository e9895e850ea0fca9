"""What carrying MoE router logits across cuts costs: bytes per cut and step time.

1. Bytes: a Qwen3-MoE of an 8B-class shape (hidden 2048, 24 layers, 64 experts, top-8,
   bf16) built on the meta device, cut into 4 stages by fxpp; for batch 1 and sequence
   4096, the bytes of every tensor that crosses each cut (the cut's layout on the wire:
   the floating slots, then the packed integer tensor with its header) with
   ``output_router_logits`` off and on. The load-balancing loss is
   accumulated layer by layer in the model's own code, so what crosses is a running
   sum over the experts, not every layer's router logits.
2. Step time: a CPU-sized Qwen3-MoE (hidden 128, 4 layers, 8 experts, top-2, batch 4,
   seq 128, fp32), ``pipe(**inputs, labels=labels)`` forward + backward in one process,
   with router logits off and on, interleaved; medians over --iters.

Run:  PYTHONPATH=. python benchmarks/bench_router_loss.py [--iters 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import fxpp
from fxpp.layout import filler_shape
from _common import default_json_path, report, start


def crossing_bytes(router_logits: bool, batch: int, seq: int) -> list[int]:
    config = Qwen3MoeConfig(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=64, num_experts_per_tok=8,
        vocab_size=151936, output_router_logits=router_logits, torch_dtype=torch.bfloat16,
    )
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    pipe = fxpp.pipeline(model, 4)
    out = []
    for stage in pipe.stages[:-1]:
        layout = stage.out_layout
        built = layout.slots[0].shape[:2]
        shapes = [filler_shape(slot.shape, built, (batch, seq)) for slot in layout.slots]
        # what goes on the wire: the floating slots, then the packed int64 tensor (header included)
        out.append(sum(layout.wire_examples(shapes, _bytes)))
    return out


def _bytes(shape, dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def step_ms(router_logits: bool, iters: int) -> float:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
                            num_experts_per_tok=2, vocab_size=1000, output_router_logits=router_logits)
    model = Qwen3MoeForCausalLM(config)
    pipe = fxpp.pipeline(model, 2)
    ids = torch.randint(0, 1000, (4, 128))
    times = []
    for _ in range(iters + 2):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        pipe(input_ids=ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=default_json_path("bench_router_loss"))
    args = ap.parse_args()
    env = start()
    rows = []
    off, on = crossing_bytes(False, 1, 4096), crossing_bytes(True, 1, 4096)
    for cut, (a, b) in enumerate(zip(off, on), start=1):
        rows.append({"what": f"cut {cut} bytes (8B-class MoE, seq 4096)", "router logits off": a,
                     "router logits on": b, "on / off": round(b / a, 5)})
    t_off, t_on = [], []
    for _ in range(2):  # interleaved, so that machine noise hits both alike
        t_off.append(step_ms(False, args.iters))
        t_on.append(step_ms(True, args.iters))
    a, b = statistics.median(t_off), statistics.median(t_on)
    rows.append({"what": "fwd+bwd ms (CPU Qwen3-MoE, 2 stages, in process)", "router logits off": round(a, 1),
                 "router logits on": round(b, 1), "on / off": round(b / a, 3)})
    report(rows, ["what", "router logits off", "router logits on", "on / off"], env, args.json)


if __name__ == "__main__":
    main()

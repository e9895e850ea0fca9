"""Per-layer cost estimates from the annotated graph and the example shapes.

Forward FLOPs per node, counted the way a roofline model would:

* a parameterised module: ``2 * tokens * active parameters`` (every weight is used
  once per token in a matmul; MoE experts count ``top_k / num_experts`` of their
  weights, the ones a token actually visits);
* attention in a decoder layer: ``4 * batch * seq * keys * heads * head_dim`` for the
  score and value products, halved for causal masking, with ``keys`` capped by the
  sliding window for ``sliding_attention`` layers (so at long sequences a sliding
  layer costs less than a full one);
* embeddings are lookups (no FLOPs), but their parameters count for memory;
* a decoder layer the trace does not call (the forward skips it for the signature's
  inputs: Mllama's cross-attention layers without images) costs no FLOPs, but its
  parameters count; every layer of the model has a cost, so the split numbers them all.

Training cost is 3x forward (backward is twice the forward); only ratios matter for
balancing, so the factor is applied uniformly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from ..trace import find_decoder_layers
from .annotate import called_modules, info


@dataclass(frozen=True)
class BlockCost:
    """Cost of one schedulable block: the prelude, one decoder layer, or the head."""

    name: str
    flops: float
    params: int


def _active_params(named_parameters: list[tuple[str, torch.nn.Parameter]], config) -> float:
    total = 0.0
    top_k = _safe_attr(config, "num_experts_per_tok") or _safe_attr(config, "top_k_experts")
    num_experts = _safe_attr(config, "num_experts") or _safe_attr(config, "num_local_experts")
    for name, p in named_parameters:
        n = p.numel()
        if top_k and num_experts and "experts" in name.split(".") and p.dim() >= 3 and p.shape[0] == num_experts:
            n = n * top_k / num_experts
        total += n
    return total


def _safe_attr(obj, name):
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001 - heterogeneous configs refuse global per-layer reads
        return None


def _attention_flops(layer: torch.nn.Module, config, layer_type: str | None, batch: int, seq: int) -> float:
    """Score and value products of the layer's attention, read off the module itself."""
    attn = next((m for m in layer.modules() if isinstance(_safe_attr(m, "head_dim"), int)), None)
    if attn is None:
        return 0.0
    head_dim = attn.head_dim
    heads = _safe_attr(attn, "num_heads") or _safe_attr(config, "num_attention_heads") or 0
    keys = seq
    window = _safe_attr(attn, "sliding_window") or _safe_attr(config, "sliding_window")
    if layer_type and "sliding" in layer_type and isinstance(window, int) and window > 0:
        keys = min(seq, window)
    return 4.0 * batch * seq * keys * heads * head_dim / 2.0


def estimate_block_costs(gm: GraphModule, model: torch.nn.Module, example_inputs: dict) -> list[BlockCost]:
    """``[prelude, layer 0, ..., layer L-1, head]`` costs for ``example_inputs``' shapes."""
    config = model.config.get_text_config()
    ref = next(v for v in example_inputs.values() if isinstance(v, torch.Tensor))
    batch, seq = ref.shape[0], ref.shape[1] if ref.dim() > 1 else 1
    tokens = batch * seq
    modules = called_modules(gm)
    prelude = BlockCost("prelude", 0.0, 0)
    head = BlockCost("head", 0.0, 0)
    layers: dict[int, BlockCost] = {}
    seen: set[int] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = modules[node.target]
        rec = info(node)
        named = list(module.named_parameters())  # one walk of the module for all three
        params = sum(p.numel() for _, p in named if id(p) not in seen)
        seen.update(id(p) for _, p in named)
        if rec.role == "embed":
            flops = 0.0
        else:
            flops = 2.0 * tokens * _active_params(named, config)
        if rec.role == "layer":
            flops += _attention_flops(module, config, rec.layer_type, batch, seq)
            layers[rec.layer] = BlockCost(f"layer {rec.layer}", flops, params)
        elif rec.position >= 0:
            head = BlockCost("head", head.flops + flops, head.params + params)
        else:
            prelude = BlockCost("prelude", prelude.flops + flops, prelude.params + params)
    for i, layer in enumerate(find_decoder_layers(model)[1]):
        if i not in layers:  # the forward skips it for these inputs: no time, but its parameters
            params = sum(p.numel() for p in layer.parameters() if id(p) not in seen)
            seen.update(id(p) for p in layer.parameters())
            layers[i] = BlockCost(f"layer {i}", 0.0, params)
    return [prelude] + [layers[i] for i in sorted(layers)] + [head]

"""Sweep transformers' causal-LM auto mapping: which model families does fxpp split?

For every ``model_type`` in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` the sweep builds a
tiny config (2 decoder layers, hidden 64, vocabulary 128, few experts, ...) and the
model with seeded random weights on the CPU, then builds ONE 2-stage pipeline
(``fxpp.pipeline(model, 2, cuts=[1])``, no example inputs: the default signature) and
calls it with every input case of :data:`CAUSAL_CASES`, each compared with the
unpatched training forward ``model(**case, use_cache=False)`` on the same inputs:
logits and every parameter gradient (:func:`compare`).

Cases (:func:`causal_cases`)
----------------------------
``ids``
    token ids only, 2x12 (not the build's 2x8).
``padded``
    ids and a left-padded ``attention_mask``, 2x9.
``packed``
    ids and packed-document ``position_ids`` restarting mid-row, no mask (the model
    then finds the documents from the positions), 2x12.
``padded+pos``
    ids, a padding mask and ``position_ids`` that follow it, 3x10.

A case whose input the model's forward does not take is ``skipped``; a case where the
unpatched model itself fails (or is not deterministic) is ``model-error`` for that case.

Statuses (:data:`STATUSES`) of a family: the worst of its cases (:data:`SEVERITY`),
``detail`` naming the case.

``pass``
    every case that applies: logits and all gradients agree (``atol=rtol=1e-4``).
``mismatch``
    fxpp ran but the numbers differ in some case (a silent wrong answer, the worst
    outcome); ``detail`` names the case, the worst tensor and its max diff.
``fxpp-error``
    fxpp refused the model with an :class:`~fxpp.FxppError` (a clean refusal).
``model-error``
    the tiny config, the model build or the unpatched model's own forward/backward
    failed (or the build took too long, or the model is not deterministic); not
    fxpp's fault.
``error``
    any other exception (or a timeout) while fxpp built or ran the stages; ``frame``
    is the innermost fxpp frame of the traceback.

A case has the same statuses plus ``skipped`` (:data:`CASE_STATUSES`).

Run ``python -m fxpp.sweep [--only llama,gemma] [--write-docs]``; with ``--vlm``, the
image-text-to-text sweep of :mod:`fxpp.sweep_vlm` instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from .errors import FxppError

STATUSES = ("pass", "mismatch", "fxpp-error", "model-error", "error")
CASE_STATUSES = (*STATUSES, "skipped")
# A family's status is its worst case's: a silent wrong answer first, then fxpp's
# failures, then the model's own.
SEVERITY = ("mismatch", "error", "fxpp-error", "model-error")
CAUSAL_CASES = ("ids", "padded", "packed", "padded+pos")
# One character per case in the tables.
MARKS = {"pass": "✓", "mismatch": "≠", "fxpp-error": "✗", "error": "✗", "model-error": "m", "skipped": "–"}
MARKS_LEGEND = ("✓ pass, ≠ mismatch, ✗ fxpp-error or error, m model-error, – skipped (the forward takes no such "
                "input; for a VLM of kind text, no images)")

VOCAB = 128
BATCH, SEQ, LEFT_PAD = 2, 9, 3
ATOL = RTOL = 1e-4
# docs/ of the source checkout this module lives in (an editable install), else of the cwd
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_PATH = os.path.join(_ROOT if os.path.exists(os.path.join(_ROOT, "pyproject.toml")) else os.getcwd(),
                         "docs", "supported_models.md")
COMMAND = "python -m fxpp.sweep --write-docs"

# --------------------------------------------------------------------------------------
# Tiny configs
# --------------------------------------------------------------------------------------

NUM_LAYERS = 2
# Attribute names of the decoder layer count (``attribute_map`` aliases included).
LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers")
# Encoder-side counts: not what fxpp splits, only kept small so the build is fast.
SIDE_LAYER_COUNT_ATTRS = ("encoder_layers", "num_encoder_layers")

# Tiny values, passed to a config class only for attributes it has (its own names or
# ``attribute_map`` aliases) and, except for SET_IF_NONE, only where the default is a
# non-zero int (None or 0 usually means "feature off" or "derived": left alone).
SHRINK: dict[str, Any] = {
    # width
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "embedding_size": 64, "word_embed_proj_dim": 64,
    "lru_width": 64, "hidden_size_global": 64, "input_embedding_size": 64, "output_embedding_size": 64,
    "embedding_dim": 64, "adapter_in_dim": 64, "adapter_input_size": 64, "adapter_out_dim": 64,
    # MLP
    "intermediate_size": 128, "ffn_dim": 128, "decoder_ffn_dim": 128, "encoder_ffn_dim": 128, "ffn_hidden_size": 128,
    "dim_ff": 128, "dff": 128, "n_inner": 128, "d_inner": 128, "feed_forward_size": 128, "intermediate_size_mlp": 128,
    "dense_intermediate_size": 128, "shared_intermediate_size": 128,
    # attention heads
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "decoder_attention_heads": 4, "encoder_attention_heads": 4,
    "swa_num_attention_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2, "num_query_groups": 2,
    "swa_num_key_value_heads": 2,
    "head_dim": 16, "swa_head_dim": 16, "kv_channels": 16, "d_head": 16, "dim_head": 16,
    "attention_head_size": 16, "rotary_dim": 8,
    # multi-head latent attention, sparse indexers
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "o_lora_rank": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 4,
    # vocabulary and positions
    "vocab_size": VOCAB, "decoder_vocab_size": VOCAB, "encoder_hash_byte_group_vocab": VOCAB,
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 8, "laurel_rank": 8,
    "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256, "max_seq_len": 256,
    "max_target_positions": 256, "max_source_positions": 256,
    # local attention
    "sliding_window": 4, "sliding_window_size": 4, "attention_window_size": 4, "local_attention_window_len": 4,
    "attention_chunk_size": 4,
    # mixture of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_k": 2, "n_shared_experts": 1, "num_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "num_dense_layers": 1,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "shared_experts_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32, "expert_ffn_hidden_size": 32,
    # state-space / linear attention
    "state_size": 16, "ssm_state_size": 16, "mamba_d_state": 16, "time_step_rank": 8, "mamba_dt_rank": 8,
    "mamba_n_heads": 8, "mamba_num_heads": 8, "mamba_d_head": 16, "mamba_head_dim": 16, "mamba_headdim": 16,
    "mamba_d_ssm": 128, "mamba_n_groups": 1, "n_groups": 1, "mamba_chunk_size": 16, "chunk_size": 16,
    "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "linear_num_heads": 4, "linear_head_dim": 16,
    # special tokens inside the vocabulary, outside the sampled input ids [3, VOCAB)
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}

# Ints that are upper bounds: never raised, only lowered to the tiny value.
AT_MOST = frozenset({
    "num_experts_per_tok", "moe_topk", "moe_k", "n_shared_experts", "num_shared_experts", "n_group", "topk_group",
    "first_k_dense_replace", "num_dense_layers",
})
# MoE sizes that some default configs leave at None although the modeling code needs them.
SET_IF_NONE = frozenset({"num_experts_per_tok", "n_routed_experts", "num_experts", "num_local_experts",
                         "n_shared_experts", "head_dim", "num_key_value_heads"})
ALSO_ZERO = {"num_kv_shared_layers": 0}  # 2 layers cannot both store and reuse shared KV

# Per family: construction keyword arguments applied last (defaults that do not
# validate, features that need a consistent pair of values, more layers, ...).
FAMILY_KWARGS: dict[str, dict[str, Any]] = {
    # default configs that do not build a working model
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [32, 32], "axial_pos_shape": [16, 16]},
    "musicgen": {"num_codebooks": 1},
    "musicgen_melody": {"num_codebooks": 1},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                       "indexer_compress_ratio": 2},
    # hybrids: make the 2 layers one of each kind (the default pattern has no attention in its first layers)
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "zamba": {"layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"]},  # the shared block needs 2 users
    # consistent widths
    "mamba2": {"num_heads": 8},  # hidden_size * expand == num_heads * head_dim
}
FAMILY_KWARGS["qwen4_exp"] = {"text_config": FAMILY_KWARGS["qwen4_exp_text"]}
# Dots 3: the sliding layer (1 of [indexed, sliding]) overrides the MLA sizes; head_dim = nope + rope
# and its rotary part (head_dim * 0.25) = qk_rope_head_dim.
FAMILY_KWARGS["dots3_note_text"] = {"per_layer_config": {1: {
    "head_dim": 32, "qk_nope_head_dim": 24, "qk_rope_head_dim": 8, "v_head_dim": 32, "num_attention_heads": 8,
    "num_key_value_heads": 8, "q_lora_rank": 64, "kv_lora_rank": 32}}}
FAMILY_KWARGS["dots3_note"] = {"text_config": FAMILY_KWARGS["dots3_note_text"]}
# Mllama's text model skips its cross-attention layers without images: the default rule
# (layer indices past the tiny count -> the last layer) would make layer 1 of 2 one that
# never runs, leaving the stage after cuts=[1] nothing to call. Three layers, the
# cross-attention one last: the second stage holds a layer that runs and one that is skipped.
FAMILY_KWARGS["mllama"] = {"text_config": {"cross_attention_layers": [2]}}
FAMILY_LAYERS: dict[str, int] = {"zamba": 4, "mllama": 3}
# Config model types for families whose auto-mapped causal LM takes a sub-config
# (``AutoConfig.for_model("musicgen")`` is the composite text+audio config).
FAMILY_CONFIG_TYPE: dict[str, str] = {"musicgen": "musicgen_decoder", "musicgen_melody": "musicgen_melody_decoder"}
# Called on the built model before anything runs.
FAMILY_SETUP: dict[str, Callable[[torch.nn.Module], None]] = {
    "xmod": lambda model: model.set_default_language(model.config.languages[0]),
}


def _unlocked(config):
    """Read per-layer attributes of heterogeneous configs without raising."""
    try:
        config.allow_global_per_layer_attribute_access = True
    except Exception:  # noqa: BLE001 - not a heterogeneous-capable config
        pass
    return config


def _get(config, name: str, default: Any = None) -> Any:
    try:
        return getattr(config, name)
    except Exception:  # noqa: BLE001 - properties that raise, per-layer attributes, ...
        return default


def _init_names(cls) -> set[str]:
    import inspect

    names: set[str] = set()
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    try:
        params = inspect.signature(cls.__init__).parameters
        names |= {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    except (TypeError, ValueError):
        pass
    return names


def _canonical(config, name: str) -> str:
    return (getattr(type(config), "attribute_map", None) or {}).get(name, name)


def _sub_configs(config) -> dict[str, Any]:
    from transformers import PreTrainedConfig

    subs = {}
    for name in dict.fromkeys([*(getattr(config, "sub_configs", None) or {}), "text_config"]):
        value = _get(config, name)
        if isinstance(value, PreTrainedConfig) and value is not config:
            subs[name] = value
    return subs


def _representative(seq, n: int):
    """``n`` entries of a per-layer pattern: the prefix, or, when the prefix misses a
    kind that the pattern has, the first entry of each kind (in order) padded with the
    earliest other entries."""
    items = list(seq)
    kinds = list(dict.fromkeys(map(repr, items)))
    prefix = items[:n]
    if len({repr(x) for x in prefix}) >= min(n, len(kinds)):
        out = prefix
    else:
        seen, picks = set(), []
        for i, x in enumerate(items):
            if repr(x) not in seen:
                seen.add(repr(x))
                picks.append(i)
        picks = picks[:n]
        rest = [i for i in range(len(items)) if i not in picks]
        picks = sorted(picks + rest[: n - len(picks)])
        out = [items[i] for i in picks]
    if isinstance(seq, str):
        return "".join(out)
    return tuple(out) if isinstance(seq, tuple) else out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def shrink_kwargs(config, num_layers: int = NUM_LAYERS, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Construction keyword arguments that turn ``config``'s class into a tiny model
    (``config`` is a default instance: it tells which attributes exist and their values).
    ``extra`` is applied last; a dict under a sub-config's name applies to that sub-config."""
    _unlocked(config)
    cls = type(config)
    names = _init_names(cls) | {k for k in vars(config) if not k.startswith("_")}
    out: dict[str, Any] = {}

    def put(name: str, value: Any) -> None:
        name = _canonical(config, name)
        if name in names and name not in out:
            out[name] = value

    old_layers = None
    for name in LAYER_COUNT_ATTRS:
        value = _get(config, name)
        if _is_int(value) and _canonical(config, name) in names:
            old_layers = old_layers or value
            put(name, num_layers)
    for name in SIDE_LAYER_COUNT_ATTRS:
        value = _get(config, name)
        if _is_int(value) and value > num_layers:
            put(name, num_layers)
    mla = _is_int(_get(config, "qk_rope_head_dim"))
    heads = _get(config, "num_attention_heads")
    for name, value in SHRINK.items():
        current = _get(config, name, default=AttributeError)
        if current is AttributeError or isinstance(current, bool):
            continue
        if name.endswith("token_id"):
            if current is not None:
                put(name, value)
            continue
        if name in SET_IF_NONE and current is None:
            pass  # often required by the modeling code although the config allows None
        elif not _is_int(current) or current == 0:  # None / 0: the feature is off (or derived); keep it so
            continue
        if name in AT_MOST and current is not None:
            value = min(current, value)
        if name == "head_dim" and mla:  # rotary embeddings of MLA models use head_dim = qk_rope_head_dim
            value = SHRINK["qk_rope_head_dim"]
        if name == "num_key_value_heads" and _is_int(current):
            # keep the attention kind: multi-head (also MLA) stays multi-head, multi-query stays so
            value = SHRINK["num_attention_heads"] if current == heads else 1 if current == 1 else value
        put(name, value)
    for name, value in ALSO_ZERO.items():
        if _is_int(_get(config, name)):
            out[_canonical(config, name)] = value
    for name in names:
        if name in out or name.startswith("_"):
            continue
        value = _get(config, name)
        # per-layer patterns of the old length: layer_types, block types, override strings, ...
        if old_layers and old_layers > num_layers and old_layers >= 3 and isinstance(value, (list, tuple, str)):
            if len(value) == old_layers and (not isinstance(value, str) or any(
                    k in name for k in ("pattern", "layer", "override", "block"))):
                out[name] = _representative(value, num_layers)
                continue
        # layer indices past the new layer count
        if isinstance(value, (list, tuple)) and value and all(_is_int(v) for v in value) and any(
                k in name for k in ("layer", "idx", "indices", "indexes")):
            kept = [v for v in value if v < num_layers] or [num_layers - 1]
            if kept != list(value):
                out[name] = type(value)(kept) if isinstance(value, tuple) else kept
            continue
        # periodic layer choices (attention every k-th layer from an offset)
        if _is_int(value) and name.endswith("_period") and value > num_layers:
            out[name] = num_layers
        elif _is_int(value) and name.endswith("_offset") and "layer" in name and value >= num_layers:
            out[name] = num_layers - 1
    extra = dict(extra or {})
    for name, sub in _sub_configs(config).items():
        if name in names or name in (getattr(config, "sub_configs", None) or {}):
            out[name] = _tiny_sub_config(sub, num_layers, extra.pop(name, None))
    out.update(extra)
    return out


def _tiny_sub_config(sub, num_layers: int, extra: dict[str, Any] | None = None):
    """A tiny instance of ``sub``'s class that keeps the parent's non-default values."""
    _unlocked(sub)
    d = sub.to_dict()
    for key in ("per_layer_config", "transformers_version", "architectures", "_name_or_path", "model_type",
                "allow_global_per_layer_attribute_access"):
        d.pop(key, None)
    valid = _init_names(type(sub)) | set(vars(sub))
    d = {k: v for k, v in d.items() if k in valid and not isinstance(v, dict) or k in ("rope_parameters", "rope_scaling")}
    d.update(shrink_kwargs(sub, num_layers, extra))
    return _with_small_per_layer_overrides(type(sub), d)


def _with_small_per_layer_overrides(make, kwargs: dict[str, Any]):
    """``make(**kwargs)``; for a heterogeneous config (per-layer overrides computed by
    ``__post_init__``, e.g. a larger head_dim on full-attention layers), rebuilt with
    each overriding int at twice the tiny global value, so the layers still differ."""
    config = make(**kwargs)
    spec = config.__dict__.get("_heterogeneity_spec")
    if spec is None or not spec.per_layer_overrides or "per_layer_config" in kwargs:
        return config
    per_layer = {}
    for idx, overrides in spec.per_layer_overrides.items():
        per_layer[idx] = {}
        for attr, value in overrides.items():
            tiny = config._getattr_without_heterogeneous_validation(attr, None)
            if _is_int(value) and _is_int(tiny) and attr in SHRINK and value > tiny:
                value = 2 * tiny
            per_layer[idx][attr] = value
    try:
        return make(**kwargs, per_layer_config=per_layer)
    except Exception:  # noqa: BLE001 - overrides tied by a validator (head_dim = nope + rope, ...): keep them
        return config


def tiny_config(model_type: str, num_layers: int | None = None):
    """A tiny config of ``model_type`` (see :data:`SHRINK`): the class rebuilt from
    shrunk construction arguments, so derived attributes (layer types, per-layer
    overrides, head dims) are recomputed for the tiny sizes."""
    from transformers import AutoConfig

    n = num_layers or FAMILY_LAYERS.get(model_type, NUM_LAYERS)
    extra = FAMILY_KWARGS.get(model_type, {})
    model_type = FAMILY_CONFIG_TYPE.get(model_type, model_type)
    try:
        base = AutoConfig.for_model(model_type)
    except Exception:  # noqa: BLE001 - defaults that do not validate; FAMILY_KWARGS fixes them
        base = AutoConfig.for_model(model_type, **extra)
    return _with_small_per_layer_overrides(
        lambda **kw: AutoConfig.for_model(model_type, **kw), shrink_kwargs(base, n, extra))


# --------------------------------------------------------------------------------------
# Inputs, reference and comparison (a local copy of tests/helpers.py's logic)
# --------------------------------------------------------------------------------------


def make_inputs(batch: int = BATCH, seq: int = SEQ, left_pad: int = LEFT_PAD, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids in ``[3, VOCAB)``; the first row is left-padded by ``left_pad`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :left_pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def packed_positions(seq: int, restarts: Iterable[Iterable[int]]) -> torch.Tensor:
    """Position ids of packed documents: row ``r`` restarts at 0 at each index of ``restarts[r]``."""
    rows = []
    for cuts in restarts:
        starts = sorted({0, *cuts})
        pos = torch.zeros(seq, dtype=torch.long)
        for a, b in zip(starts, [*starts[1:], seq]):
            pos[a:b] = torch.arange(b - a)
        rows.append(pos)
    return torch.stack(rows)


@dataclass
class Case:
    """One call of a family's pipeline: ``inputs``, or none (``skip`` says why)."""

    name: str
    inputs: dict[str, Any] | None
    skip: str = ""


def _needs(name: str, inputs: dict[str, Any], params: set[str], model_name: str) -> Case:
    """``Case(name, inputs)``, skipped when the forward does not take one of the inputs."""
    missing = [k for k in inputs if k not in params]
    if missing:
        return Case(name, None, f"{model_name}.forward takes no {', '.join(missing)}")
    return Case(name, inputs)


def causal_cases(model: torch.nn.Module, seed: int = 0) -> list[Case]:
    """The input cases of :data:`CAUSAL_CASES` for ``model`` (see the module docstring)."""
    from .transform import forward_parameters

    params, name = forward_parameters(model), type(model).__name__
    ids = make_inputs(2, 12, seed=seed)["input_ids"]
    padded = make_inputs(seed=seed + 1)  # 2x9, the first row left-padded by 3
    packed = {"input_ids": make_inputs(2, 12, seed=seed + 2)["input_ids"],
              "position_ids": packed_positions(12, [[5], [7, 10]])}  # 2 and 3 documents
    both = make_inputs(3, 10, seed=seed + 3)
    both["attention_mask"][2, :1] = 0  # rows padded by 3, 0 and 1
    both["position_ids"] = (both["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return [_needs("ids", {"input_ids": ids}, params, name), _needs("padded", padded, params, name),
            _needs("packed", packed, params, name), _needs("padded+pos", both, params, name)]


def loss_of(logits: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A loss that weighs every logit differently, so every gradient path matters."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(logits.shape, generator=g).to(logits.dtype)
    return (logits.float() * w.float()).sum()


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a {type(out).__name__}")


def training_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """``use_cache=False`` where the forward takes it, by name or through ``**kwargs``
    that it hands to the inner model: the training forward a pipeline must equal."""
    import inspect

    from .trace import unwrap_forward

    params = inspect.signature(unwrap_forward(type(model).forward)).parameters
    takes = "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {"use_cache": False} if takes else {}


def reference(model: torch.nn.Module, inputs: dict[str, Any]):
    """Logits and gradients of the unpatched training forward ``model(**inputs, use_cache=False)``."""
    model.zero_grad(set_to_none=True)
    logits = _logits(model(**inputs, **training_kwargs(model)))
    loss_of(logits).backward()
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def run_pipeline(pipe, model: torch.nn.Module, inputs: dict[str, Any]):
    model.zero_grad(set_to_none=True)
    out = pipe(**inputs)
    if not isinstance(out, torch.Tensor):
        out = _logits(out)
    loss_of(out).backward()
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.double() - b.double()).abs()
    d = torch.where(torch.isnan(a) & torch.isnan(b), torch.zeros_like(d), d)
    d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)
    return float(d.max()) if d.numel() else 0.0


def compare(ref, got, *, atol: float = ATOL, rtol: float = RTOL) -> tuple[bool, str, float]:
    """``(same, detail, max_diff)`` over the logits and every parameter gradient."""
    ref_logits, ref_grads = ref
    logits, grads = got
    if logits.shape != ref_logits.shape:
        return False, f"logits shape {tuple(logits.shape)} != {tuple(ref_logits.shape)}", math.inf
    if set(grads) != set(ref_grads):
        missing, extra = sorted(set(ref_grads) - set(grads)), sorted(set(grads) - set(ref_grads))
        parts = []
        if missing:
            parts.append(f"no grad for {len(missing)} param(s), e.g. {missing[0]}")
        if extra:
            parts.append(f"unexpected grad for {len(extra)} param(s), e.g. {extra[0]}")
        return False, "; ".join(parts), math.inf
    for name in ref_grads:
        if grads[name].shape != ref_grads[name].shape:
            return False, f"grad {name} shape {tuple(grads[name].shape)} != {tuple(ref_grads[name].shape)}", math.inf

    def close(a, b):
        return torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol, equal_nan=True)

    logits_diff = _max_diff(logits, ref_logits)
    grad_diffs = {n: _max_diff(grads[n], ref_grads[n]) for n in ref_grads}
    worst = max([logits_diff, *grad_diffs.values()])
    logits_ok = close(logits, ref_logits)
    bad = [n for n in ref_grads if not close(grads[n], ref_grads[n])]
    if logits_ok and not bad:
        return True, f"max diff {worst:.2g}", worst
    detail = f"logits max diff {logits_diff:.3g}" + ("" if logits_ok else " (over tolerance)")
    if bad:
        w = max(bad, key=lambda n: grad_diffs[n])
        detail += f"; {len(bad)}/{len(ref_grads)} grads differ, worst {w} ({grad_diffs[w]:.3g})"
    return False, detail, worst


# --------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    family: str  # the model_type
    class_name: str  # from the auto mapping
    status: str  # one of STATUSES
    detail: str = ""  # message, max diff, ...
    max_diff: float | None = None
    frame: str | None = None  # innermost fxpp frame (status "error")
    exc_type: str | None = None
    cause: str | None = None  # the non-fxpp exception an FxppError wraps (RecursionError, ...)
    phase: str | None = None  # config, build, reference, pipeline, run, compare
    seconds: float = 0.0
    num_params: int | None = None
    model_class: str | None = None  # the class actually built
    traceback: str | None = field(default=None, repr=False)
    case: str | None = None  # the case the status comes from (None: the build, or every case passed)
    cases: list[CaseResult] = field(default_factory=list)  # one per input case, in the sweep's order

    def case_status(self, name: str) -> str | None:
        """The status of case ``name``; None where the family got no case (model not built)."""
        return next((c.status for c in self.cases if c.name == name), None)

    def marks(self, names: Iterable[str]) -> str:
        """One :data:`MARKS` character per case of ``names`` (blank where the case did not run)."""
        if not self.cases:
            return ""
        return " ".join(MARKS.get(self.case_status(n) or "", "·") for n in names)


@dataclass
class CaseResult:
    """One input case of a family: a status of :data:`CASE_STATUSES` and its details."""

    name: str
    status: str
    detail: str = ""
    max_diff: float | None = None
    phase: str | None = None  # reference, run, compare (pipeline: the build failed)
    frame: str | None = None
    exc_type: str | None = None
    cause: str | None = None
    traceback: str | None = field(default=None, repr=False)


class SweepTimeout(Exception):
    """A family ran past its time budget (raised from a SIGALRM handler)."""


@contextlib.contextmanager
def _deadline(seconds: float | None):
    """Raise :class:`SweepTimeout` after ``seconds`` (SIGALRM; main thread only, else a
    no-op). An interval timer already running (pytest-timeout's) is suspended and
    resumed with its remaining time."""
    import threading

    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum, frame):
        raise SweepTimeout(f"timed out after {seconds:g}s")

    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, handler)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    if old_delay and old_delay < seconds:
        signal.setitimer(signal.ITIMER_REAL, old_delay)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:
            left = old_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), old_interval)


_FXPP_DIR = os.path.dirname(os.path.abspath(__file__))


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it (``__cause__``, else ``__context__``), outermost first."""
    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def root_cause(exc: BaseException) -> BaseException:
    """The deepest exception of ``exc``'s chain that is not an :class:`FxppError`
    (``exc`` itself if every link is one)."""
    plain = [e for e in _chain(exc) if not isinstance(e, FxppError)]
    return plain[-1] if plain else exc


def innermost_fxpp_frame(exc: BaseException) -> str | None:
    """``fxpp/file.py:line in function`` of the deepest traceback frame inside fxpp
    (this sweep module excluded), looking at the deepest cause of ``exc`` first: for an
    error that fxpp wrapped (``raise TraceError(...) from e``) that is where it happened."""
    for e in reversed(_chain(exc)):
        found = None
        for fs in traceback.extract_tb(e.__traceback__):
            path = os.path.abspath(fs.filename)
            if path.startswith(_FXPP_DIR + os.sep) and path != os.path.abspath(__file__):
                found = f"fxpp/{os.path.relpath(path, _FXPP_DIR)}:{fs.lineno} in {fs.name}"
        if found:
            return found
    return None


def _message(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    cause = root_cause(exc)
    if cause is not exc:
        cause_text = " ".join(str(cause).split())
        if cause_text[:60] not in text:
            text += f" [caused by {type(cause).__name__}: {cause_text}]"
    return _short(text, limit)


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random init leaves norms at exactly 1 and biases at 0; perturb every parameter
    so gradients through every path are distinguishable."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)


def _build(model_type: str, class_name: str, max_params: int):
    import transformers
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    torch.manual_seed(0)
    with torch.device("meta"):
        try:
            meta = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except Exception:  # noqa: BLE001 - some inits need real tensors; the real build decides
            meta = None
    if meta is not None:
        n = sum(p.numel() for p in meta.parameters())
        del meta
        if n > max_params:
            raise MemoryError(f"tiny config still has {n / 1e6:.1f}M parameters (limit {max_params / 1e6:.0f}M)")
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError as e:
        # a sub-config (FAMILY_CONFIG_TYPE) that the auto class does not map: the mapped class itself
        cls = getattr(transformers, class_name, None)
        if "Unrecognized configuration class" not in str(e) or cls is None:
            raise
        torch.manual_seed(0)
        model = cls._from_config(config, dtype=torch.float32)
    _perturb(model)
    if model_type in FAMILY_SETUP:
        FAMILY_SETUP[model_type](model)
    return model.eval()


def check_family(
    model_type: str,
    class_name: str = "",
    *,
    timeout_s: float = 60.0,
    build_timeout_s: float = 15.0,
    max_params: int = 64_000_000,
    example_inputs: dict[str, Any] | None = None,
) -> SweepResult:
    """Build a tiny ``model_type`` model, one 2-stage pipeline, and compare it with the
    model on every case of :func:`causal_cases`."""
    result = SweepResult(family=model_type, class_name=class_name, status="error")
    start = time.perf_counter()
    model = None
    try:
        # --- the model's own side: any failure here is a model-error
        try:
            with _deadline(build_timeout_s):
                model = _build(model_type, class_name, max_params)
            result.model_class = type(model).__name__
            result.num_params = sum(p.numel() for p in model.parameters())
            cases = causal_cases(model)
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            result.status, result.phase, result.exc_type = "model-error", "build", type(e).__name__
            result.detail = f"build: {type(e).__name__}: {_message(e)}"
            if isinstance(e, SweepTimeout):
                result.detail = f"skipped: model build took over {build_timeout_s:g}s"
            result.traceback = "".join(traceback.format_exception(e))
            return result
        checks = reference_cases(result, model, cases, timeout_s=timeout_s, start=start)
        if not checks:  # the model fails every case itself: nothing to compare
            return settle(result)
        # --- fxpp's side
        return check_pipeline(result, model, checks, example_inputs, timeout_s=timeout_s, start=start)
    finally:
        result.seconds = time.perf_counter() - start
        if model is not None:
            model.zero_grad(set_to_none=True)


def _left(timeout_s: float, start: float) -> float:
    return max(timeout_s - (time.perf_counter() - start), 1.0)


def reference_cases(result: SweepResult, model, cases: list[Case], *, timeout_s: float,
                    start: float) -> list[tuple[str, dict, Any]]:
    """The unpatched model's side of every case, shared by both sweeps: appends a
    :class:`CaseResult` per case to ``result.cases`` (``skipped``, ``model-error`` where
    the model fails or is not deterministic, else a placeholder that
    :func:`check_pipeline` fills) and returns ``(name, inputs, reference)`` of the cases
    to run through the pipeline."""
    checks = []
    for case in cases:
        if case.inputs is None:
            result.cases.append(CaseResult(case.name, "skipped", case.skip))
            continue
        try:
            with _deadline(_left(timeout_s, start)):
                ref = reference(model, case.inputs)
                again = reference(model, case.inputs)
            same, detail, _ = compare(ref, again, atol=0, rtol=0)
            if not same:
                raise RuntimeError(f"the model is not deterministic: two unpatched runs differ ({detail})")
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            result.cases.append(CaseResult(
                case.name, "model-error", f"reference: {type(e).__name__}: {_message(e)}", phase="reference",
                exc_type=type(e).__name__, traceback="".join(traceback.format_exception(e))))
            continue
        result.cases.append(CaseResult(case.name, "error", "not run"))
        checks.append((case.name, case.inputs, ref))
    return checks


def _failure(name: str, phase: str, e: BaseException, timeout_s: float) -> CaseResult:
    """A :class:`CaseResult` for an exception raised on fxpp's side."""
    out = CaseResult(name, "error", phase=phase, exc_type=type(e).__name__,
                     traceback="".join(traceback.format_exception(e)), frame=innermost_fxpp_frame(e))
    cause = root_cause(e)
    if cause is not e:
        out.cause = type(cause).__name__
    if isinstance(e, FxppError):
        out.status, out.detail = "fxpp-error", f"{type(e).__name__}: {_message(e)}"
    elif isinstance(e, SweepTimeout):
        out.detail = f"{phase}: timed out (family budget {timeout_s:g}s)"
    else:
        out.detail = f"{phase}: {type(e).__name__}: {_message(e)}"
    return out


def check_pipeline(result: SweepResult, model, checks: list[tuple[str, dict, Any]], example_inputs: dict | None, *,
                   timeout_s: float, start: float) -> SweepResult:
    """fxpp's half of a family's check, shared by both sweeps: ONE 2-stage pipeline
    (``cuts=[1]``, built from ``example_inputs``) run on every ``(case, inputs,
    reference)`` of ``checks`` and compared with the unpatched reference; fills the
    cases of ``result`` and settles its status (:func:`settle`)."""
    import fxpp

    try:
        with _deadline(_left(timeout_s, start)):
            pipe = fxpp.pipeline(model, 2, example_inputs=example_inputs, cuts=[1])
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        failure = _failure("", "pipeline", e, timeout_s)
        for name, _, _ in checks:
            _put(result, dataclasses.replace(failure, name=name, traceback=None))
        return settle(result, build_failure=failure)
    timed_out = False
    for name, inputs, ref in checks:
        if timed_out:
            _put(result, CaseResult(name, "error", "not run: the family's time budget is spent", phase="run"))
            continue
        phase = "run"
        try:
            with _deadline(_left(timeout_s, start)):
                got = run_pipeline(pipe, model, inputs)
            phase = "compare"
            same, detail, diff = compare(ref, got)
            _put(result, CaseResult(name, "pass" if same else "mismatch", detail, max_diff=diff,
                                    phase=None if same else "compare"))
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            timed_out = isinstance(e, SweepTimeout)
            _put(result, _failure(name, phase, e, timeout_s))
    return settle(result)


def _put(result: SweepResult, case: CaseResult) -> None:
    for i, c in enumerate(result.cases):
        if c.name == case.name:
            result.cases[i] = case
            return
    result.cases.append(case)


def settle(result: SweepResult, build_failure: CaseResult | None = None) -> SweepResult:
    """The family's status from its cases: ``pass`` if every case that applies passes,
    else the worst case's status (:data:`SEVERITY`; a failed pipeline build outranks
    the cases it stopped), its details, and ``case`` naming it."""
    failed = [c for c in result.cases if c.status in SEVERITY]
    diffs = [c.max_diff for c in result.cases if c.max_diff is not None]
    result.max_diff = max(diffs) if diffs else None
    if build_failure is None and not failed:
        ran = [c for c in result.cases if c.status == "pass"]
        if not ran:
            result.status, result.detail = "error", "no case ran"
            return result
        result.status, result.detail, result.case, result.phase = "pass", f"max diff {result.max_diff:.2g}", None, None
        return result
    worst = build_failure or min(failed, key=lambda c: SEVERITY.index(c.status))
    result.status, result.case = worst.status, worst.name or None
    result.phase, result.frame, result.exc_type, result.cause = worst.phase, worst.frame, worst.exc_type, worst.cause
    result.traceback = worst.traceback
    if worst.status == "mismatch":
        result.max_diff = worst.max_diff
    result.detail = f"{worst.name}: {worst.detail}" if worst.name else worst.detail
    others = [c for c in failed if c is not worst and build_failure is None]
    if others:
        result.detail += " (also " + ", ".join(f"{c.name}: {c.status}" for c in others) + ")"
    return result


def causal_lm_families() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def sweep_causal_lm(
    families: Iterable[str] | None = None,
    timeout_s: float = 60.0,
    *,
    build_timeout_s: float = 15.0,
    progress: Any = None,
) -> list[SweepResult]:
    """Check every (or each named) family of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``.

    Args:
        families: model types to check (default: all of the mapping, in its order).
            A name not in the mapping is a ``model-error``.
        timeout_s: the time budget of one family (build, reference and fxpp).
        build_timeout_s: families whose tiny model takes longer to build are skipped
            (``model-error``).
        progress: called with each :class:`SweepResult` as it is done.
    """
    mapping = causal_lm_families()
    names = list(mapping) if families is None else list(families)
    results = []
    for name in names:
        if name not in mapping:
            r = SweepResult(family=name, class_name="", status="model-error",
                            detail="not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
        else:
            r = check_family(name, mapping[name], timeout_s=timeout_s, build_timeout_s=min(build_timeout_s, timeout_s))
        results.append(r)
        if progress is not None:
            progress(r)
    return results


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def _short(text: str, limit: int) -> str:
    """``text`` on one line, at most ``limit`` characters: head and tail kept (the end of
    an error message often says what went wrong, after a long repr)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    tail = max(limit // 3, 0)
    return text[: limit - tail - 5] + " ... " + text[len(text) - tail:] if tail else text[:limit]


def _detail(r: SweepResult, limit: int = 10_000) -> str:
    """The detail in at most ``limit`` characters, ending with the innermost fxpp frame
    for errors and for refusals that wrap a non-fxpp exception."""
    suffix = ""
    if r.frame and (r.status == "error" or (r.status == "fxpp-error" and r.cause)):
        suffix = f" @ {r.frame}"
    return _short(r.detail, max(limit - len(suffix), 20)) + suffix


def summary(results: list[SweepResult]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    return f"{len(results)} families: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES)


def built(results: list[SweepResult]) -> list[SweepResult]:
    """The families whose tiny model was built (those a pass rate is over)."""
    return [r for r in results if r.model_class is not None and r.status != "not-built"]


def built_summary(results: list[SweepResult]) -> str:
    """``N build tiny, M pass every case (P%)``, and how many more fail only where the
    unpatched model itself fails (every case pass, skipped or model-error, one pass)."""
    ok = built(results)
    passed = sum(r.status == "pass" for r in ok)
    rate = f" ({100 * passed / len(ok):.1f}%)" if ok else ""
    model_only = sum(r.status == "model-error" and any(c.status == "pass" for c in r.cases)
                     and all(c.status in ("pass", "skipped", "model-error") for c in r.cases) for r in ok)
    more = f", {model_only} more pass every case the unpatched model runs" if model_only else ""
    return f"{len(ok)} build tiny, {passed} pass every case{rate}{more}"


def case_summary(results: list[SweepResult], names: Iterable[str]) -> str:
    """Per case: how many families pass it, mismatch, fail in fxpp, fail in the model, skip it."""
    parts = []
    for name in names:
        got = [r.case_status(name) for r in results]
        n = {s: got.count(s) for s in CASE_STATUSES}
        parts.append(f"{name}: {n['pass']} pass, {n['mismatch']} mismatch, {n['fxpp-error'] + n['error']} fxpp-error "
                     f"or error, {n['model-error']} model-error, {n['skipped']} skipped")
    return "; ".join(parts)


def format_table(results: list[SweepResult], width: int = 160, cases: Iterable[str] = CAUSAL_CASES) -> str:
    cases = tuple(cases)
    fw = max([len("family")] + [len(r.family) for r in results])
    sw = max(len(s) for s in STATUSES)
    cw = max(len("cases"), 2 * len(cases) - 1)
    rows = [f"{'family':<{fw}} | {'status':<{sw}} | {'cases':<{cw}} | detail",
            f"{'-' * fw}-+-{'-' * sw}-+-{'-' * cw}-+-{'-' * 20}"]
    for r in results:
        rows.append(f"{r.family:<{fw}} | {r.status:<{sw}} | {r.marks(cases):<{cw}} | "
                    f"{_detail(r, max(width - fw - sw - cw - 9, 60))}")
    return "\n".join(rows)


def _md(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def markdown(results: list[SweepResult], command: str = COMMAND) -> str:
    import transformers

    lines = [
        "# Supported models",
        "",
        f"Generated by `{command}`; do not edit by hand.",
        "",
        f"Every causal-LM family of transformers {transformers.__version__} "
        f"(`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, torch {torch.__version__}) is built with a tiny config "
        f"({NUM_LAYERS} decoder layers, hidden 64, vocabulary {VOCAB}, random weights) and split into 2 stages "
        "with `fxpp.pipeline(model, 2, cuts=[1])`, once, without example inputs. That one pipeline is called "
        "with each input case and compared with the unpatched training forward `model(**case, use_cache=False)` "
        f"on the same inputs: logits and every parameter gradient, `atol=rtol={ATOL:g}`. Cases: **ids** — token "
        "ids only (2x12, not the build's 2x8); **padded** — ids and a left-padded `attention_mask` (2x9); "
        "**packed** — ids and `position_ids` of packed documents restarting mid-row, no mask (2x12); "
        "**padded+pos** — ids, a padding mask and `position_ids` that follow it (3x10).",
        "",
        "Statuses: **pass** — same logits and gradients in every case that applies; **mismatch** — fxpp ran but "
        "the numbers differ in some case (a silent wrong answer); **fxpp-error** — fxpp refused the model or a "
        "case with an `FxppError`; **model-error** — the tiny model itself could not be built or run on a case "
        "(not fxpp's fault); **error** — any other exception inside fxpp. A family's status is its worst case's "
        f"(in that order: mismatch, error, fxpp-error, model-error), named in the detail. Case marks: {MARKS_LEGEND}.",
        "",
        f"**Summary:** {summary(results)}; {built_summary(results)}.",
        "",
        f"**Per case:** {case_summary(results, CAUSAL_CASES)}.",
        "",
        f"| family | class | status | {' / '.join(CAUSAL_CASES)} | detail |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| `{r.family}` | `{r.class_name}` | {r.status} | {r.marks(CAUSAL_CASES)} | "
                     f"{_md(_detail(r, 300))} |")
    return "\n".join(lines) + "\n"


def write_docs(results: list[SweepResult], path: str = DOCS_PATH, command: str = COMMAND) -> str:
    """Write the causal-LM part of ``path``, keeping a VLM section (``fxpp.sweep_vlm``) after it."""
    from .sweep_vlm import SECTION_MARK

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    vlm = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if SECTION_MARK in old:
            vlm = "\n" + SECTION_MARK + old.split(SECTION_MARK, 1)[1]
    with open(path, "w") as f:
        f.write(markdown(results, command) + vlm)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--vlm" in argv:  # the image-text-to-text sweep (fxpp.sweep_vlm), same flags
        from .sweep_vlm import main as vlm_main

        return vlm_main(argv, prog="python -m fxpp.sweep --vlm")
    parser = sweep_parser("python -m fxpp.sweep", __doc__, "llama,gemma", f"write {os.path.relpath(DOCS_PATH)}", 60.0)
    args = parser.parse_args(argv)
    return run_and_report(args, sweep_causal_lm, format_table, summary, write_docs, COMMAND)


def sweep_parser(prog: str, doc: str, example: str, docs_help: str, timeout: float) -> argparse.ArgumentParser:
    """The flags both sweep commands take."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--only", default=None, help=f"comma-separated model types, e.g. {example}")
    parser.add_argument("--write-docs", action="store_true", help=docs_help)
    parser.add_argument("--timeout", type=float, default=timeout, help=f"seconds per family (default {timeout:.0f})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no per-family progress on stderr")
    parser.add_argument("--tracebacks", default=None, metavar="PATH",
                        help="write the traceback of every family and case that does not pass to PATH")
    return parser


def write_tracebacks(results: list[SweepResult], path: str) -> str:
    """The traceback of every failed family and case, for investigation."""
    with open(path, "w") as f:
        for r in results:
            if r.status == "pass":
                continue
            f.write(f"=== {r.family} ({r.class_name}): {r.status}\n{r.detail}\n")
            if r.traceback and not any(c.traceback == r.traceback for c in r.cases):
                f.write(r.traceback + "\n")
            for c in r.cases:
                if c.status not in ("pass", "skipped"):
                    f.write(f"--- case {c.name}: {c.status}: {c.detail}\n{c.traceback or ''}\n")
    return path


def run_and_report(args, sweep_fn, format_table_fn, summary_fn, write_docs_fn, command: str) -> int:
    """The part of a sweep command that both sweeps share: run, print, optionally write docs."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    families = [f.strip() for f in args.only.split(",") if f.strip()] if args.only else None

    def progress(r):
        if not args.quiet:
            marks = " ".join(f"{c.name} {MARKS.get(c.status, '?')}" for c in r.cases)
            print(f"  {r.family:<28} {r.status:<11} {r.seconds:5.1f}s  {marks}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    results = sweep_fn(families, timeout_s=args.timeout, progress=progress)
    print(format_table_fn(results))
    print()
    print(f"{summary_fn(results)} ({time.perf_counter() - t0:.0f}s)")
    print(built_summary(results))
    names = list(dict.fromkeys(c.name for r in results for c in r.cases))
    if names:
        print("per case: " + case_summary(results, names))
    if getattr(args, "tracebacks", None):
        print(f"wrote {write_tracebacks(results, args.tracebacks)}")
    if args.write_docs:
        command = command if families is None else f"{command} --only {','.join(families)}"
        print(f"wrote {write_docs_fn(results, command=command)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

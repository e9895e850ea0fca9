"""Tiny configs of any transformers family: the shrinking rules both sweeps use.

:func:`tiny_config` rebuilds a family's default config from shrunk construction
arguments (:data:`SHRINK`), so derived attributes (layer types, per-layer overrides,
head dims) are recomputed for the tiny sizes; :data:`FAMILY_KWARGS` holds the few
families whose defaults need a consistent pair of values.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable

import torch
from transformers import AutoConfig, PreTrainedConfig

VOCAB = 128


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
    "attention_head_size": 16, "rotary_dim": 8, "d_kv": 16,
    # multi-head latent attention, sparse indexers
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "o_lora_rank": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 4,
    "index_kpool": 2,
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
# composite (image-text) configs of the text families above
FAMILY_KWARGS["qwen4_exp"] = {"text_config": FAMILY_KWARGS["qwen4_exp_text"]}
FAMILY_KWARGS["cohere_compass"] = {"text_config": FAMILY_KWARGS["cohere_compass_text"]}
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


def _partial_rotary_factors(config) -> set[float]:
    """The ``partial_rotary_factor`` values of ``config``: its own, and those of its rope
    parameters (flat, or one dict per layer type)."""
    found = {_get(config, "partial_rotary_factor")}
    rope = _get(config, "rope_parameters")
    for params in [rope, *(rope.values() if isinstance(rope, dict) else ())]:
        if isinstance(params, dict):
            found.add(params.get("partial_rotary_factor"))
    return {f for f in found if isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1}


def _mla_rotary_head_dim(config) -> int:
    """The tiny ``head_dim`` of a multi-head latent attention config: its rotary
    embedding is sized ``head_dim * partial_rotary_factor``, which must be the tiny
    ``qk_rope_head_dim``. Where the default already ties them that way (Mistral 4:
    128 * 0.5 = 64; Dots 3: 256 * 0.25 = 64) the tie is kept; else (no partial factor)
    head_dim is the rotary width itself."""
    rope, head, default_rope = SHRINK["qk_rope_head_dim"], _get(config, "head_dim"), _get(config, "qk_rope_head_dim")
    for factor in sorted(_partial_rotary_factors(config)):
        if _is_int(head) and math.isclose(head * factor, default_rope) and (rope / factor).is_integer():
            return int(rope / factor)
    return rope


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
        if name == "head_dim" and mla:  # rotary embeddings of MLA models are sized from head_dim
            value = _mla_rotary_head_dim(config)
        if name == "num_key_value_heads" and _is_int(current):
            # keep the attention kind: multi-head (also MLA) stays multi-head, multi-query stays so
            value = SHRINK["num_attention_heads"] if current == heads else 1 if current == 1 else value
        put(name, value)
    layer_types = _get(config, "layer_types")
    if (_get(config, "sliding_window", 0) is None and isinstance(layer_types, (list, tuple)) and layer_types
            and set(layer_types) == {"full_attention"}):
        # no sliding layer, yet some modeling code builds the sliding-window mask of its
        # mapping unconditionally and refuses an unset window (Step 3.7); no layer reads it
        put("sliding_window", SHRINK["sliding_window"])
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
            if old_layers and len(set(value)) < old_layers and set(kept) >= set(range(num_layers)):
                # the list picks some layers of the real model (Flint's mlp_only_layers [0, 1] of
                # 49: dense layers, the rest MoE); it must pick some, not all, of the tiny ones
                kept = kept[: num_layers - 1]
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
    n = num_layers or FAMILY_LAYERS.get(model_type, NUM_LAYERS)
    extra = FAMILY_KWARGS.get(model_type, {})
    model_type = FAMILY_CONFIG_TYPE.get(model_type, model_type)
    try:
        base = AutoConfig.for_model(model_type)
    except Exception:  # noqa: BLE001 - defaults that do not validate; FAMILY_KWARGS fixes them
        base = AutoConfig.for_model(model_type, **extra)
    return _with_small_per_layer_overrides(
        lambda **kw: AutoConfig.for_model(model_type, **kw), shrink_kwargs(base, n, extra))

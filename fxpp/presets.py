"""Tiny built-in text presets: the ``fxpp run`` / ``fxpp plan`` offline models and the test zoo's.

Terms:
    family: a transformers model type with a tiny config here (``FAMILIES``).
    preset: the command line's name of a family's tiny model, ``tiny-<family>`` (``PRESETS``).

Each preset builds a transformers model from a config with random weights on the CPU
in well under a second (hidden 64, 2-8 layers, vocabulary 128). No model hub.
Both the trainer (``fxpp.trainer``) and the testing room (``fxpp.testing.zoo``, which
adds the vision-language presets) import them from here.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import transformers as tf

VOCAB = 128

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def layer_types_of(num_layers: int, pattern: str) -> list[str]:
    """``pattern`` like ``"ssf"``: s = sliding_attention, f = full_attention, repeated."""
    kinds = {"s": "sliding_attention", "f": "full_attention"}
    return [kinds[pattern[i % len(pattern)]] for i in range(num_layers)]


def _config(family: str, num_layers: int, **over: Any):
    if family == "llama":
        return tf.LlamaConfig(**COMMON, num_hidden_layers=num_layers, **over)
    if family == "mistral":
        return tf.MistralConfig(**COMMON, num_hidden_layers=num_layers, sliding_window=over.pop("sliding_window", 4), **over)
    if family == "qwen2":
        return tf.Qwen2Config(**COMMON, num_hidden_layers=num_layers, **over)
    if family == "qwen3":
        return tf.Qwen3Config(**COMMON, num_hidden_layers=num_layers, head_dim=16, **over)
    if family == "phi3":
        return tf.Phi3Config(**COMMON, num_hidden_layers=num_layers, **over)
    if family == "gemma":
        return tf.GemmaConfig(**COMMON, num_hidden_layers=num_layers, head_dim=16, **over)
    if family == "gemma2":
        return tf.Gemma2Config(
            **COMMON, num_hidden_layers=num_layers, head_dim=16, sliding_window=over.pop("sliding_window", 4),
            final_logit_softcapping=30.0, attn_logit_softcapping=50.0, **over,
        )
    if family == "gemma3":
        pattern = over.pop("pattern", "ssf")
        return tf.Gemma3TextConfig(
            **COMMON, num_hidden_layers=num_layers, head_dim=16, sliding_window=over.pop("sliding_window", 4),
            layer_types=layer_types_of(num_layers, pattern), final_logit_softcapping=30.0, **over,
        )
    if family == "gemma4":
        pattern = over.pop("pattern", "sf")
        common = {k: v for k, v in COMMON.items() if k != "max_position_embeddings"}
        return tf.Gemma4TextConfig(
            **common, num_hidden_layers=num_layers, head_dim=16, sliding_window=over.pop("sliding_window", 4),
            layer_types=layer_types_of(num_layers, pattern), final_logit_softcapping=30.0,
            hidden_size_per_layer_input=over.pop("hidden_size_per_layer_input", 8),
            vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=over.pop("num_kv_shared_layers", num_layers // 2 if num_layers >= 3 else 0),
            max_position_embeddings=256, **over,
        )
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **COMMON, num_hidden_layers=num_layers, head_dim=16, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, decoder_sparse_step=1, **over,
        )
    if family == "mixtral":
        return tf.MixtralConfig(**COMMON, num_hidden_layers=num_layers, num_local_experts=4, num_experts_per_tok=2, **over)
    if family == "olmo2":
        return tf.Olmo2Config(**COMMON, num_hidden_layers=num_layers, **over)
    if family == "olmoe":
        return tf.OlmoeConfig(**COMMON, num_hidden_layers=num_layers, num_experts=4, num_experts_per_tok=2, **over)
    if family == "qwen2_moe":  # dense and sparse layers mixed: mlp_only_layers are dense
        return tf.Qwen2MoeConfig(
            **COMMON, num_hidden_layers=num_layers, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, mlp_only_layers=over.pop("mlp_only_layers", [0, 2]), **over,
        )
    raise KeyError(family)


FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "gemma4",
    "qwen3_moe", "mixtral", "olmo2", "olmoe", "qwen2_moe",
)


def tiny_config(family: str, num_layers: int = 4, **overrides: Any):
    """The config of a tiny ``family`` model (see ``FAMILIES``)."""
    if family not in FAMILIES:
        raise KeyError(f"unknown preset {family!r}; known: {', '.join(FAMILIES)}")
    config = _config(family, num_layers, **overrides)
    # Gemma 2 supports eager attention only (softcapped attention logits).
    config._attn_implementation = "eager" if family == "gemma2" else "sdpa"
    return config


def tiny_model(family: str, num_layers: int = 4, *, seed: int = 0, dtype: torch.dtype = torch.float32, base: bool = False, **overrides: Any) -> torch.nn.Module:
    """A tiny causal LM (or its base model with ``base=True``) with seeded random weights."""
    config = tiny_config(family, num_layers, **overrides)
    torch.manual_seed(seed)
    cls = tf.AutoModel if base else tf.AutoModelForCausalLM
    model = cls.from_config(config, dtype=dtype)
    # Random init leaves many norms at exactly 1 and biases at 0; perturb every
    # parameter so gradients through every path are distinguishable.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


PRESETS: dict[str, Callable[[], torch.nn.Module]] = {f"tiny-{f}": (lambda f=f: tiny_model(f)) for f in FAMILIES}

"""Tiny built-in model presets: the test zoo.

The text presets (``FAMILIES``, ``PRESETS``, ``tiny_config``, ``tiny_model``) live in
:mod:`fxpp.presets`, where the ``fxpp run`` trainer takes them too; they are re-exported
here. This module adds the vision-language and audio presets. Each builds a transformers
model from a config with random weights on the CPU in well under a second (hidden 64,
2-8 layers, vocabulary 128). No model hub.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import transformers as tf

# FAMILIES, PRESETS, tiny_config and tiny_model are re-exported: tests and the README import them from here.
from ..presets import COMMON, FAMILIES, PRESETS, VOCAB, layer_types_of, tiny_config, tiny_model  # noqa: F401

# -- vision-language models ------------------------------------------------------------
# Token ids reserved for multimodal placeholders at the top of the tiny vocabulary.
IMAGE_TOKEN = VOCAB - 1
VIDEO_TOKEN = VOCAB - 2
VISION_START = VOCAB - 3
VISION_END = VOCAB - 4
AUDIO_TOKEN = VOCAB - 5
AUDIO_START = VOCAB - 6
AUDIO_END = VOCAB - 7
_FIRST_SPECIAL = VOCAB - 8

_TINY_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_channels=3)

VLM_FAMILIES = ("gemma3", "llava", "llava_onevision", "mistral3", "gemma4", "qwen2_5_vl", "qwen3_vl")


def _text(num_layers: int, **over: Any) -> dict:
    return {**COMMON, "num_hidden_layers": num_layers, "head_dim": 16, **over}


def _vlm_config(family: str, num_layers: int):
    if family == "gemma3":
        text = _text(num_layers, sliding_window=4, layer_types=layer_types_of(num_layers, "sf"), final_logit_softcapping=30.0)
        return tf.Gemma3Config(
            text_config=text, vision_config={**_TINY_VISION, "image_size": 32, "patch_size": 8},
            mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN, boi_token_index=VISION_START, eoi_token_index=VISION_END,
        )
    if family == "llava":
        return tf.LlavaConfig(
            text_config={**_text(num_layers), "model_type": "llama"},
            vision_config={**_TINY_VISION, "model_type": "clip_vision_model", "image_size": 16, "patch_size": 8, "projection_dim": 32},
            image_token_index=IMAGE_TOKEN, image_seq_length=4, vision_feature_layer=-1,
        )
    if family == "llava_onevision":
        return tf.LlavaOnevisionConfig(
            text_config={**_text(num_layers), "model_type": "qwen2"},
            vision_config={**_TINY_VISION, "model_type": "siglip_vision_model", "image_size": 16, "patch_size": 8},
            image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN, vision_feature_layer=-1,
            image_grid_pinpoints=[[16, 16], [16, 32], [32, 16], [32, 32]],
        )
    if family == "mistral3":
        return tf.Mistral3Config(
            text_config={**_text(num_layers), "model_type": "ministral3"},
            vision_config={**_TINY_VISION, "model_type": "pixtral", "image_size": 32, "patch_size": 8, "head_dim": 16},
            image_token_index=IMAGE_TOKEN, spatial_merge_size=2, vision_feature_layer=-1,
        )
    if family == "gemma4":
        return _gemma4_config(num_layers)
    if family in ("qwen2_5_vl", "qwen3_vl"):
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64)
        if family == "qwen2_5_vl":
            vision.update(window_size=16, fullatt_block_indexes=[1])
            cls = tf.Qwen2_5_VLConfig
        else:
            vision.update(num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
            rope["mrope_interleaved"] = True
            cls = tf.Qwen3VLConfig
        return cls(
            text_config=_text(num_layers, rope_parameters=rope), vision_config=vision,
            image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )
    raise KeyError(f"unknown VLM preset {family!r}; known: {', '.join(VLM_FAMILIES)}")


def _gemma4_config(num_layers: int, *, audio: bool = False):
    """Gemma 4 with a vision tower and, with ``audio=True``, an audio tower (like E2B/E4B)."""
    common = {k: v for k, v in COMMON.items() if k != "max_position_embeddings"}
    text = dict(
        **common, num_hidden_layers=num_layers, head_dim=16, sliding_window=4,
        layer_types=layer_types_of(num_layers, "sf"), final_logit_softcapping=30.0,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=0,
        max_position_embeddings=256,
    )
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=2, position_embedding_size=64)
    config = tf.Gemma4Config(
        text_config=text, vision_config=vision, audio_config=_TINY_GEMMA4_AUDIO if audio else None,
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, audio_token_id=AUDIO_TOKEN,
        boi_token_id=VISION_START, eoi_token_id=VISION_END, boa_token_id=AUDIO_START, eoa_token_index=AUDIO_END,
    )
    if audio:
        # The audio tower's chunked local attention exists in eager only.
        config.audio_config._attn_implementation = "eager"
    return config


# Gemma 4's audio tower (a USM conformer): two stride-2 convolutions subsample the
# frames 4x, then chunked local attention (chunks of 4 frames, 4 frames of left context).
# The features' last axis must equal ``subsampling_conv_channels[0]``: the projection
# after the convolutions expects ``channels[0] // 4 * channels[1]`` inputs, and the
# convolutions leave ``ceil(num_features / 4) * channels[1]``.
_TINY_GEMMA4_AUDIO = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[16, 8],
    conv_kernel_size=3, attention_chunk_size=4, attention_context_left=5, attention_context_right=0,
    output_proj_dims=48,
)
AUDIO_FEATURES = _TINY_GEMMA4_AUDIO["subsampling_conv_channels"][0]


def _image_inputs(model, family: str, batch: int, g: torch.Generator) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Pixel values (and companions) for one image per row, and each image's token count."""
    config = model.config
    if family in ("gemma3", "llava"):
        size = config.vision_config.image_size
        n = config.mm_tokens_per_image if family == "gemma3" else config.image_seq_length
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}, [n] * batch
    if family == "llava_onevision":
        # Each image is tiled into its base tile plus a 2x2 grid; token counts follow the
        # model's own unpadding, so ask it rather than re-deriving the arithmetic.
        sizes = torch.tensor([[32, 32], [32, 24], [24, 32]][:batch] + [[32, 32]] * max(0, batch - 3))
        pixel_values = torch.randn(batch, 5, 3, 16, 16, generator=g)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values, sizes, return_dict=True).pooler_output
        return {"pixel_values": pixel_values, "image_sizes": sizes}, [f.shape[0] for f in feats]
    if family == "mistral3":
        vc = config.vision_config
        sizes = torch.tensor([[32, 32], [32, 16]][:batch] + [[32, 32]] * max(0, batch - 2))
        pixel_values = torch.randn(batch, 3, 32, 32, generator=g)
        merge = vc.patch_size * config.spatial_merge_size
        return {"pixel_values": pixel_values, "image_sizes": sizes}, [int(h // merge * (w // merge)) for h, w in sizes.tolist()]
    if family == "gemma4":
        vc = config.vision_config
        side = 4  # patches per image side
        patch_dim = 3 * vc.patch_size ** 2
        pixel_values = torch.randn(batch, side * side, patch_dim, generator=g)
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        pos = torch.stack([xs.flatten(), ys.flatten()], -1).expand(batch, -1, -1).clone()
        n = side * side // vc.pooling_kernel_size ** 2
        return {"pixel_values": pixel_values, "image_position_ids": pos}, [n] * batch
    if family in ("qwen2_5_vl", "qwen3_vl"):
        vc = config.vision_config
        grid = torch.tensor([[1, 4, 4]] * batch)
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        pixel_values = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g)
        n = int(grid[0].prod()) // vc.spatial_merge_size ** 2
        return {"pixel_values": pixel_values, "image_grid_thw": grid}, [n] * batch
    raise KeyError(family)


def tiny_vlm(family: str, num_layers: int = 4, *, seed: int = 0) -> tuple[torch.nn.Module, Callable[..., dict]]:
    """A tiny ``*ForConditionalGeneration`` and a function making its inputs.

    ``make_inputs(batch, seq, seed=0, offset=None)`` returns token ids with one image
    per row (exactly as many image tokens as the model makes features for the pixel
    values it also returns), an all-ones attention mask, the pixel values and their
    companions (``image_sizes``, ``image_grid_thw``, ``token_type_ids``, ...).
    """
    config = _vlm_config(family, num_layers)
    config._attn_implementation = "sdpa"
    config.get_text_config()._attn_implementation = "sdpa"
    model = _conditional_generation(config, seed)

    def make_inputs(batch: int, seq: int, seed: int = 0, offset: int | None = None) -> dict:
        g = torch.Generator().manual_seed(seed)
        images, counts = _image_inputs(model, family, batch, g)
        ids = torch.randint(3, _FIRST_SPECIAL, (batch, seq), generator=g)
        for row, n in enumerate(counts):
            if n + 3 > seq:
                raise ValueError(f"seq={seq} too short for {n} image tokens")
            start = offset if offset is not None else int(torch.randint(1, seq - n - 1, (1,), generator=g))
            ids[row, start - 1] = VISION_START
            ids[row, start:start + n] = IMAGE_TOKEN
            ids[row, start + n] = VISION_END
        inputs = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long), **images}
        if family == "gemma3":
            inputs["token_type_ids"] = (ids == IMAGE_TOKEN).long()
        if family in ("gemma4", "qwen2_5_vl", "qwen3_vl"):
            inputs["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long()
        return inputs

    return model, make_inputs


def _conditional_generation(config, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tf.AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def tiny_audio_lm(num_layers: int = 4, *, seed: int = 0) -> tuple[torch.nn.Module, Callable[..., dict]]:
    """A tiny ``Gemma4ForConditionalGeneration`` with audio (and vision) towers, and its inputs.

    ``make_inputs(batch, seq, seed=0, offset=None, frames=16, image=False)`` returns
    token ids with one audio clip per row, wrapped in ``AUDIO_START`` / ``AUDIO_END``
    and starting at ``offset`` (random if ``None``); ``input_features`` of shape
    ``[batch, frames, AUDIO_FEATURES]`` and ``input_features_mask`` (True = valid
    frame) with a random number of valid frames per row (at least half). A clip of
    ``v`` valid frames gives ``ceil(v / 4)`` audio tokens: the tower subsamples 4x and
    the model drops the soft tokens of padding frames. With ``image=True`` each row
    also holds one image after its clip (``pixel_values``, ``image_position_ids``).
    ``mm_token_type_ids`` is 1 for image and 3 for audio tokens, as the processor makes it.
    """
    config = _gemma4_config(num_layers, audio=True)
    config._attn_implementation = "sdpa"
    config.get_text_config()._attn_implementation = "sdpa"
    config.audio_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "sdpa"
    model = _conditional_generation(config, seed)

    def make_inputs(batch: int, seq: int, seed: int = 0, offset: int | None = None, frames: int = 16,
                    image: bool = False) -> dict:
        g = torch.Generator().manual_seed(seed)
        features = torch.randn(batch, frames, AUDIO_FEATURES, generator=g)
        valid = torch.randint(frames // 2, frames + 1, (batch,), generator=g)
        features_mask = torch.arange(frames)[None, :] < valid[:, None]
        # Each stride-2 convolution keeps every other frame's mask entry (mask[:, ::2]).
        audio_counts = features_mask[:, ::2][:, ::2].sum(-1).tolist()
        inputs: dict = {}
        image_counts = [0] * batch
        if image:
            images, image_counts = _image_inputs(model, "gemma4", batch, g)
            inputs.update(images)
        ids = torch.randint(3, _FIRST_SPECIAL, (batch, seq), generator=g)
        for row in range(batch):
            blocks = [(AUDIO_START, AUDIO_TOKEN, AUDIO_END, audio_counts[row])]
            if image:
                blocks.append((VISION_START, IMAGE_TOKEN, VISION_END, image_counts[row]))
            need = sum(n + 2 for *_, n in blocks)
            if need + 1 > seq:
                raise ValueError(f"seq={seq} too short for {need} audio/image tokens")
            pos = offset - 1 if offset is not None else int(torch.randint(1, seq - need + 1, (1,), generator=g))
            for begin, token, end, n in blocks:
                ids[row, pos] = begin
                ids[row, pos + 1:pos + 1 + n] = token
                ids[row, pos + 1 + n] = end
                pos += n + 2
        types = torch.where(ids == AUDIO_TOKEN, 3, (ids == IMAGE_TOKEN).long())
        inputs.update(input_ids=ids, attention_mask=torch.ones(batch, seq, dtype=torch.long),
                      input_features=features, input_features_mask=features_mask, mm_token_type_ids=types)
        return inputs

    return model, make_inputs

"""A tiny model and inputs for any image-text family: the VLM sweep's generic attempt.

Terms
-----
generic attempt
    Every other family: :func:`fxpp.testing.tiny.tiny_config`'s shrinking applied with the
    vision tower's images set to 4x4 patches (its ``image_size``; ``num_patches`` for
    towers that take patch sequences; any multiple of a convolutional tower's
    ``patch_stride``; Pix2Struct's ``max_num_patches``) and the image token (else, for a
    video-only model, the video token) moved into the tiny vocabulary. The model's own
    ``get_image_features`` (or ``get_video_features``) says how many tokens an image
    becomes, and each row gets that many image tokens. A model without an image token
    (cross-attention, features put before the text, Kosmos-2's image slots) gets text
    with the first image layout its forward accepts.

    Config rules, each read from the config rather than the family name: widths that
    feed the text model (projector dims, ``out_hidden_size``, and any top-level
    ``*_size``/``*_dim`` equal to a default width of the full model) follow the tiny
    width they equal; ``mm_tokens_per_image``, ``image_grid_pinpoints``,
    ``projector_patch_to_query_dict``, list ``vision_feature_layer``, ``latent_query_num``
    and Llama 4's pixel-shuffle widths follow the tiny image; multimodal rotary sections
    follow the tiny head width; ``freeze_*`` flags are off.

    Input layouts are tried in turn: ``[2, C, H, W]``, ``[2, 1, C, H, W]``,
    ``[2, 2, C, H, W]`` (base view plus a tile), with ``pixel_attention_mask`` where the
    model takes one. Families that take ``image_grid_thw`` get Qwen-VL style flattened
    patches (width read from the tower's patch embedding), else the patches as
    ``[N, C, p, p]`` or ``[1, N, C, p, p]``. Inputs named in the forward signature are
    added: ``*_input_ids`` of a second text encoder (InstructBLIP's Q-Former),
    ``*_pixel_values`` of a second tower, ``spatial_shapes``, ``flattened_patches``,
    ``image_embeds_position_mask``, ``image_attention_mask``, and Mllama's tiles and
    aspect ratios. A family counts as built only when some parameter outside the text
    stack gets a gradient, so a frozen or discrete-code image path is not reported as a
    pass. An encoder-decoder family (its decoder stack is cut) gets ``decoder_input_ids``
    in every case, of another length than the encoder's; the images go where its
    config says (a tower in the encoder's config, an encoder that is a tower, or patches
    the encoder embeds itself with ``bbox`` per token, UDOP). A family whose
    config has no vision tower but an integer ``patch_size`` and ``get_image_features``
    embeds raw patches itself (Fuyu): its images are ``[images, 16, C*p*p]``. Any
    other family whose config has no vision tower is checked on text inputs (kind
    ``text``).
"""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any

import torch
import transformers
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from ..inputs.example_media import (MERGE_ATTRS, example_media_inputs, int_attr, image_side, is_grid_tower,
                                    patch_size, placeholder_token_attrs, text_token_ids, vision_config_of)
from ..model_facts import is_encoder_decoder
from .check import _message, _perturb, make_inputs
from .tiny import FAMILY_KWARGS, FAMILY_LAYERS, NUM_LAYERS, SHRINK, VOCAB, shrink_kwargs

# vision-config widths that feed the text model: they must follow the tiny text width
VISION_TO_TEXT_WIDTH_ATTRS = ("projection_dim", "projector_output_dim", "vision_output_dim", "text_hidden_size",
                              "out_hidden_size")


class NotBuilt(Exception):
    """The generic attempt could not produce a model with image inputs."""


def vlm_families() -> dict[str, str]:
    return dict(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def _model_class(model_type: str):
    return getattr(transformers, vlm_families().get(model_type, ""), None)


def generic_config(model_type: str):
    """A tiny config with a 4x4-patch image size and the image token inside the vocabulary."""
    try:
        cfg = AutoConfig.for_model(model_type)
    except Exception as e:  # noqa: BLE001
        raise NotBuilt(f"default config: {type(e).__name__}: {_message(e, 200)}") from e
    extra: dict[str, Any] = {}
    vision = getattr(cfg, "vision_config", None)
    encoder = getattr(cfg, "encoder", None) if getattr(cfg, "is_encoder_decoder", False) else None
    if vision is not None:
        _tiny_images(cfg, model_type, extra)
    elif encoder is not None and getattr(encoder, "vision_config", None) is not None:
        # an encoder-decoder model whose encoder holds the tower (T5Gemma 2): the same rules, one level down
        vision = encoder.vision_config
        _tiny_images(encoder, model_type, extra.setdefault("encoder", {}))
    elif encoder is not None and image_side(encoder) is not None:
        extra["encoder"] = _tiny_image_size(encoder)  # the encoder is the tower (VisionEncoderDecoder's ViT)
    elif getattr(cfg, "is_encoder_decoder", False) and image_side(cfg) is not None:
        extra.update(_tiny_image_size(cfg))  # the encoder embeds image patches itself (UDOP)
    _follow_default_widths(cfg, extra)
    if vision is not None and isinstance(getattr(vision, "projector_input_dim", None), int):
        # Llama 4: the tower's output, pixel-shuffled to width / ratio^2, enters the projector's
        # first layer (vision intermediate_size wide); its widths then stay the tiny width
        ratio = getattr(vision, "pixel_shuffle_ratio", None) or 1
        tiny = SHRINK["hidden_size"]
        extra["vision_config"].update(intermediate_size=int(tiny / ratio ** 2), projector_input_dim=tiny,
                                      projector_output_dim=tiny, vision_output_dim=tiny)
    # other encoders whose output is scattered onto the text embeddings (audio towers), and
    # top-level output widths of the projector
    if isinstance(getattr(cfg, "out_hidden_size", None), int):
        extra.setdefault("out_hidden_size", SHRINK["hidden_size"])
    for name in getattr(cfg, "sub_configs", None) or {}:
        sub = getattr(cfg, name, None)
        if name not in ("vision_config", "text_config") and isinstance(getattr(sub, "out_hidden_size", None), int):
            extra.setdefault(name, {})["out_hidden_size"] = SHRINK["hidden_size"]
    for name, value in vars(cfg).items():
        if name.startswith("freeze_") and isinstance(value, bool):
            extra[name] = False  # IDEFICS freezes its towers by default: nothing would be compared
    for attr in placeholder_token_attrs(cfg):
        # an int, or declared as None (BLIP-2 merges query outputs at image tokens only when set)
        extra[attr] = VOCAB - 1
    text_cfg = cfg.get_text_config()
    rope = getattr(text_cfg, "rope_parameters", None)
    if isinstance(rope, dict) and rope and (isinstance(rope.get("mrope_section"), list) or _reads_mrope_section(model_type)
                                   or "mrope_section" in getattr(text_cfg, "ignore_keys_at_rope_validation", ())):
        # multimodal rotary sections (t, h, w) must add up to half the tiny rotary width;
        # a config without them gets the modeling code's default, sized for the full model
        text = extra.setdefault("text_config", {}) if "text_config" in (getattr(cfg, "sub_configs", None) or {}) else extra
        text["rope_parameters"] = {**rope, "mrope_section": _mrope_sections(text_cfg, model_type)}
    if model_type not in FAMILY_LAYERS:  # the causal sweep's family rules, where written for NUM_LAYERS layers
        _merge(extra, FAMILY_KWARGS.get(model_type, {}))
    try:
        return AutoConfig.for_model(model_type, **shrink_kwargs(cfg, NUM_LAYERS, extra))
    except Exception as e:  # noqa: BLE001
        raise NotBuilt(f"tiny config: {type(e).__name__}: {_message(e, 200)}") from e


def _tiny_images(cfg, model_type: str, extra: dict[str, Any]) -> None:
    """``extra`` for ``cfg``, the config that holds the vision tower (``cfg.vision_config``):
    4x4-patch images and the widths and counts that follow them."""
    vision = cfg.vision_config
    if is_grid_tower(vision, _model_class(model_type)):
        # Qwen-VL style: image sizes come with the inputs (image_grid_thw); the tower's
        # output width is the text width
        extra["vision_config"] = {a: SHRINK["hidden_size"] for a in VISION_TO_TEXT_WIDTH_ATTRS
                                  if isinstance(getattr(vision, a, None), int)}
    else:
        extra["vision_config"] = _tiny_image_size(vision)
        # a projector sized to the default text width must follow the tiny one
        text_width = getattr(cfg.get_text_config(), "hidden_size", None)
        if text_width and getattr(cfg, "projection_dim", None) == text_width:
            extra["projection_dim"] = SHRINK["hidden_size"]
        for attr in VISION_TO_TEXT_WIDTH_ATTRS:
            if isinstance(getattr(vision, attr, None), int):
                extra["vision_config"][attr] = SHRINK["hidden_size"]
        n_patches = 16
        if isinstance(getattr(cfg, "mm_tokens_per_image", None), int):  # pooled to a square number of tokens
            extra["mm_tokens_per_image"] = 4
        if isinstance(getattr(cfg, "image_grid_pinpoints", None), list):  # any-resolution: one tile of the base size
            size = extra["vision_config"].get("image_size", 4 * patch_size(vision))
            extra["image_grid_pinpoints"] = [[size, size] if isinstance(size, int) else size]
        if isinstance(getattr(cfg, "projector_patch_to_query_dict", None), dict):  # queries per patch count
            extra["projector_patch_to_query_dict"] = {n_patches: 4}
        indices = getattr(vision, "intermediate_layers_indices", None)
        if isinstance(indices, list) and isinstance(getattr(vision, "vision_output_dim", None), int):
            # Mllama: the tower's output is its last state beside the listed intermediate ones
            kept = [i for i in indices if i < NUM_LAYERS] or [NUM_LAYERS - 1]
            extra["vision_config"].update(intermediate_layers_indices=kept,
                                          vision_output_dim=SHRINK["hidden_size"] * (1 + len(kept)))
        if isinstance(getattr(cfg, "latent_query_num", None), int):  # Kosmos-2's image query count
            extra["latent_query_num"] = 4
        layers = getattr(cfg, "vision_feature_layer", None)
        if isinstance(layers, (list, tuple)):  # hidden-state indices of the tiny tower
            extra["vision_feature_layer"] = [-1, -2][:len(layers)]
        for name in getattr(cfg, "sub_configs", None) or {}:  # a second tower (DeepSeek-VL's high-res SAM)
            other = getattr(cfg, name, None)
            if name != "vision_config" and name.endswith("vision_config") and other is not None:
                extra[name] = _tiny_image_size(other)


def _merge(into: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """``into.update(kwargs)``, merging the dicts of a sub-config's arguments."""
    for key, value in kwargs.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _tiny_image_size(vision) -> dict[str, Any]:
    """Overrides giving ``vision`` images of 4x4 patches: its ``image_size``, or the patch
    count of a tower that takes patch sequences (``num_patches``, SigLIP2 naflex); a
    convolutional tower with strides (DaViT) takes any multiple of its total stride."""
    size = getattr(vision, "image_size", None)
    if isinstance(size, (int, list, tuple)):
        side = 4 * patch_size(vision)
        return {"image_size": [side, side] if isinstance(size, (list, tuple)) else side}
    if isinstance(getattr(vision, "num_patches", None), int) and not isinstance(vision.num_patches, bool):
        return {"num_patches": 16}
    if isinstance(getattr(vision, "patch_embed_hidden_size", None), int):  # Pix2Struct's flattened patches
        return {k: 16 for k in ("max_num_patches", "seq_len") if isinstance(getattr(vision, k, None), int)}
    if isinstance(getattr(vision, "patch_stride", None), (list, tuple)):
        return {}
    raise NotBuilt(f"{type(vision).__name__} has no image_size, num_patches or patch_stride (images described by "
                   "other inputs are not generated generically)")


def _follow_default_widths(cfg, extra: dict[str, Any]) -> None:
    """Top-level widths that equal a default width of the full model follow the tiny one.

    A projector's width has many names (``projection_hidden_size``, ``out_hidden_size``);
    what it equals says what it is: the text width, the vision width, or the vision width
    after a ``merge x merge`` pixel shuffle (a merger's input).
    """
    tiny = SHRINK["hidden_size"]
    vision = getattr(cfg, "vision_config", None)
    text_width = getattr(cfg.get_text_config(), "hidden_size", None)
    vision_width = getattr(vision, "hidden_size", None)
    merge = int_attr(vision, MERGE_ATTRS) if vision is not None else None
    targets: dict[int, int] = {}
    if isinstance(vision_width, int) and merge:
        targets[vision_width * merge * merge] = tiny * merge * merge
    for width in (text_width, vision_width):
        if isinstance(width, int):
            targets[width] = tiny
    for name, value in vars(cfg).items():
        if (isinstance(value, int) and not isinstance(value, bool) and value in targets and name not in extra
                and name not in SHRINK and name.endswith(("_size", "_dim")) and "vocab" not in name):
            extra[name] = targets[value]
    if vision is not None and isinstance(text_width, int) and text_width != vision_width:
        # the tower's own width towards the text (PP-FormulaNet's decoder_hidden_size)
        into = extra.setdefault("vision_config", {})
        for name, value in vars(vision).items():
            if (value == text_width and not isinstance(value, bool) and name not in into and name not in SHRINK
                    and name.endswith(("_size", "_dim")) and ("decoder" in name or "text" in name)):
                into[name] = tiny


def _modeling_source(model_type: str) -> str:
    """The source of the family's modeling module ('' where it cannot be read)."""
    cls = _model_class(model_type)
    module = sys.modules.get(getattr(cls, "__module__", ""))
    try:
        return inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return ""


def _reads_mrope_section(model_type: str) -> bool:
    """Whether the family's modeling code reads ``mrope_section`` (defaulting it when the
    config has none, to sections sized for the full model). Families that import their
    text model from another family say so in their config instead."""
    return "mrope_section" in _modeling_source(model_type)


def _default_mrope_sections(text_config, model_type: str) -> list[int] | None:
    """The full model's sections: the config's, else the modeling code's default
    (``rope_parameters.get("mrope_section", [16, 24, 24])``)."""
    sections = (getattr(text_config, "rope_parameters", None) or {}).get("mrope_section")
    if isinstance(sections, list) and sections:
        return sections
    found = re.search(r"""["']mrope_section["']\s*,\s*\[([\d,\s]+)\]""", _modeling_source(model_type))
    return [int(v) for v in found.group(1).split(",") if v.strip()] if found else None


def _mrope_sections(text_config, model_type: str = "") -> list[int]:
    """Rotary sections (one per axis: time, height, width) that add up to half the tiny
    model's rotary width (``qk_rope_head_dim`` for MLA, else ``head_dim`` times the partial
    factor) in the proportions of the full model's, sections that are equal there kept
    equal: Qwen2-VL's [16, 24, 24] becomes [2, 3, 3], Ernie 4.5 VL's [22, 22, 20] (its
    height and width are stacked) [3, 3, 2]."""
    shrink = SHRINK
    if isinstance(getattr(text_config, "qk_rope_head_dim", None), int) and text_config.qk_rope_head_dim:
        half = shrink["qk_rope_head_dim"] // 2
    else:
        head_dim = shrink.get("head_dim") or shrink["hidden_size"] // shrink["num_attention_heads"]
        factor = (getattr(text_config, "rope_parameters", None) or {}).get("partial_rotary_factor") or getattr(
            text_config, "partial_rotary_factor", None) or 1.0
        half = int(head_dim * factor) // 2
    default = _default_mrope_sections(text_config, model_type) or [2, 3, 3]
    if len(default) != 3:
        default = [1] * len(default)
    if half < len(default):  # too narrow for a frequency per axis: all of them on the first
        return [half] + [0] * (len(default) - 1)
    total = sum(default)
    pair = next(((i, j) for i in range(3) for j in range(i + 1, 3) if default[i] == default[j]), None)
    if pair is None or len(set(default)) == 1:  # proportional, the rest on the largest
        out = [max(1, half * d // total) for d in default]
        out[default.index(max(default))] += half - sum(out)
        return out
    odd = ({0, 1, 2} - set(pair)).pop()
    both = min(max(1, round(half * default[pair[0]] / total)), (half - 1) // 2)
    out = [0, 0, 0]
    out[pair[0]] = out[pair[1]] = both
    out[odd] = half - 2 * both
    return out


def generic_inputs(model, seed: int = 0) -> tuple[dict[str, torch.Tensor], str]:
    """Inputs with one image per row and a left-padded row 0 (kind ``VLM``: the example
    images fxpp itself makes, ``fxpp.inputs.example_media``, with another seed), or text
    inputs (kind ``text``: no vision tower)."""
    if vision_config_of(model) is None:
        return {**make_inputs(seed=seed), **decoder_inputs(model, seed)}, "text"
    decoder = decoder_inputs(model, seed)
    inputs = {**example_media_inputs(model, batch=2, seed=seed, decoder=decoder), **decoder}
    if "attention_mask" in inputs:
        inputs["attention_mask"] = inputs["attention_mask"].clone()
        inputs["attention_mask"][0, :1] = 0
    return inputs, "VLM"


def decoder_inputs(model, seed: int, batch: int = 2, seq: int = 7) -> dict[str, torch.Tensor]:
    """An encoder-decoder model's decoder tokens (every case gives them: the decoder is
    the stream that the pipeline cuts); nothing for a decoder-only model."""
    if not is_encoder_decoder(model):
        return {}
    return {"decoder_input_ids": text_ids(model.config, batch, seq, seed=seed + 100)}


def text_ids(config, batch: int, seq: int, seed: int) -> torch.Tensor:
    """Token ids in ``[3, VOCAB - 8)`` without any special token of ``config`` (no image placeholders)."""
    return text_token_ids(config, batch, seq, torch.Generator().manual_seed(seed), high=VOCAB - 8)


def generic_model(model_type: str) -> torch.nn.Module:
    """The generic attempt's tiny model of ``model_type`` (seeded, perturbed, in eval mode)."""
    config = generic_config(model_type)
    torch.manual_seed(0)
    try:
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        raise NotBuilt(f"model: {type(e).__name__}: {_message(e, 200)}") from e
    _fill_unset_config_reads(model)
    _perturb(model)
    model.eval()
    return model


def _declares(config, name: str) -> bool:
    cls = type(config)
    return name in vars(config) or hasattr(cls, name) or name in (getattr(cls, "attribute_map", None) or {})


def _fill_unset_config_reads(model) -> dict[str, Any]:
    """Give ``model.config`` the attributes that the model's own code reads from it
    (``self.config.NAME`` in the classes of the modules that hold that config) but that
    it does not declare, from where the family declares them: a sub-config's value, else
    the default of another config class of the family's configuration module.
    Qwen2.5-Omni's thinker reads ``vision_start_token_id``, which only its talker config
    declares (released checkpoints write it into the thinker's config too). Returns what
    was set."""
    config = model.config
    read: set[str] = set()
    for cls in sorted({type(m) for m in model.modules() if getattr(m, "config", None) is config}, key=str):
        for klass in cls.__mro__:
            if not klass.__module__.startswith("transformers.models."):
                continue
            try:
                read |= set(re.findall(r"\bself\.config\.([A-Za-z_]\w*)", inspect.getsource(klass)))
            except (OSError, TypeError):
                continue
    missing = sorted(n for n in read if not _declares(config, n))
    if not missing:
        return {}
    subs = [v for v in vars(config).values() if isinstance(v, PreTrainedConfig)]
    module = sys.modules.get(type(config).__module__)
    siblings = [v for _, v in sorted(vars(module).items()) if isinstance(v, type)
                and issubclass(v, PreTrainedConfig) and v is not type(config)] if module else []
    filled: dict[str, Any] = {}
    for name in missing:
        for holder in [*subs, *siblings]:
            value = vars(holder).get(name) if isinstance(holder, type) else getattr(holder, name, None) \
                if _declares(holder, name) else None
            if isinstance(value, (int, float, str)):  # bools are ints
                filled[name] = value
                break
    for name, value in filled.items():
        setattr(config, name, value)
    return filled

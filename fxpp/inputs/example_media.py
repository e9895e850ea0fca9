"""Example media for a vision-language model built without them.

The default input signature of a VLM holds its media inputs (``pixel_values`` and
companions), and what crosses each cut is found by tracing the model with every
input of the signature (``fxpp.layout``). A user who builds a pipeline without
example inputs gives no image to trace with, so fxpp makes one here.

Nothing here decides a value of any call: the example only shows the tracer the
image path (which modules run, what crosses each cut). A call's own images flow
through the traced graph; a shape decision the example made that a call breaks is a
guard that retraces (Note [guards] in ``fxpp.ops``), and a value the example's path
did not send is refused by name. So a poor example costs a retrace or a clear error,
never a wrong number.

How an example is found, read from the config and the forward's signature rather than
from the family's name, and always checked by running the model's own code:

- the media layout: Qwen-VL style flattened patches with ``image_grid_thw`` (a tower
  with a temporal patch and a spatial merge, or a forward that takes the grid); a
  patch sequence with its positions (``image_position_ids``) or grid
  (``spatial_shapes``) for towers without a fixed image size; else square images of
  the tower's ``image_size`` as ``[images, C, H, W]``, ``[rows, 1, C, H, W]`` or a base
  view plus one tile, with ``image_sizes`` and ``pixel_attention_mask`` where the
  model reads them; raw patches ``[images, 16, C*p*p]`` for a model that embeds
  patches itself (Fuyu); Mllama-style tiles with aspect ratios;
- how many tokens an image becomes: the size of what the model's own
  ``get_image_features`` returns for the candidate, over the text width; each row
  gets that many image tokens (the config's ``image_token_id``) among text tokens
  that are no special token of the config;
- companions aligned with the text: ``token_type_ids`` / ``mm_token_type_ids`` (1 on
  image tokens) where the forward takes them; a second tower's ``*_pixel_values``; a
  second text encoder's ``*_input_ids`` (InstructBLIP's Q-Former);
- a model without an image token (cross-attention, features put before the text):
  the first candidate its whole forward accepts.

:func:`example_media_inputs` raises :class:`NoExampleMedia` with the reason where none
of this fits; the pipeline then leaves the media inputs out of its signature and a
call with images is refused with that reason (and how to declare them).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from transformers import PreTrainedConfig

from ..model_facts import TRACE_KWARGS, is_encoder_decoder, model_device, model_unchanged, parameter_names
from .names import IMAGE_TOKEN_ATTRS, VIDEO_TOKEN_ATTRS

# merge (pixel-shuffle) factor of grid-style vision towers, under its various names
MERGE_ATTRS = ("spatial_merge_size", "merge_size", "merge_kernel_size", "adapter_merge_size")
TEMPORAL_ATTRS = ("temporal_patch_size", "patch_temporal")
SEQ_TEXT = 6  # text tokens around the image tokens of each row
MAX_IMAGE_TOKENS = 4096  # an example image that becomes more tokens than this is not a useful example


class NoExampleMedia(Exception):
    """No example media could be made for the model; the message says why."""


def patch_size(vision) -> int:
    p = getattr(vision, "patch_size", None)
    if isinstance(p, (list, tuple)):
        p = p[0]
    if not isinstance(p, int) or p <= 0:
        raise NoExampleMedia(f"{type(vision).__name__} has no integer patch_size ({p!r})")
    return p


def int_attr(holder, names, default=None):
    """The first of ``names`` that ``holder`` sets to a positive int (a list's first item counts)."""
    for name in names:
        value = getattr(holder, name, None)
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], int):
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def takes_input(cls_or_model, name: str) -> bool:
    """Whether the class's ``get_image_features`` or ``forward`` takes ``name``."""
    cls = cls_or_model if isinstance(cls_or_model, type) else type(cls_or_model)
    return any(name in parameter_names(getattr(cls, attr, None)) for attr in ("get_image_features", "forward"))


def is_grid_tower(vision, cls=None) -> bool:
    """Qwen-VL style vision towers: flattened patches plus ``image_grid_thw``."""
    if cls is not None and takes_input(cls, "image_grid_thw"):
        return True
    return all(isinstance(getattr(vision, a, None), int) for a in ("temporal_patch_size", "spatial_merge_size"))


def image_side(vision) -> int | None:
    """The side of a square example image for ``vision``; None for patch-sequence towers."""
    size = getattr(vision, "image_size", None)
    if isinstance(size, (int, list, tuple)):
        return size[0] if isinstance(size, (list, tuple)) else size
    stride = getattr(vision, "patch_stride", None)
    if isinstance(stride, (list, tuple)):
        return 2 * math.prod(stride)
    return None


def placeholder_token_attrs(config) -> list[str]:
    """The config attributes naming the token that image features replace: the image
    token's, else (a video-only model) the video token's. Declared as None counts."""
    for attrs in (IMAGE_TOKEN_ATTRS, VIDEO_TOKEN_ATTRS):
        found = [a for a in attrs if isinstance(getattr(config, a, None), int) or a in vars(config)]
        if found:
            return found
    return []


def special_token_ids(config, depth: int = 3) -> set[int]:
    """Every token id a config names (``*_token_id``, ``*_token_index``, ``*_token_ids``),
    its sub-configs' included: what text tokens of an example must not be."""
    found: set[int] = set()
    for name, value in vars(config).items():
        if isinstance(value, PreTrainedConfig) and depth:
            found |= special_token_ids(value, depth - 1)
        elif "token" in name and name.endswith(("_id", "_index", "_ids", "_indices")):
            values = value if isinstance(value, (list, tuple)) else [value]
            found |= {v for v in values if isinstance(v, int) and not isinstance(v, bool)}
    return found


def text_token_ids(config, batch: int, seq: int, generator: torch.Generator, *, low: int = 3,
                   high: int | None = None) -> torch.Tensor:
    """Token ids in ``[low, high)`` (default: the vocabulary, at most 4096 ids) that are no
    special token of ``config``."""
    vocab = getattr(config.get_text_config(), "vocab_size", None) or 128
    high = min(vocab, 4096) if high is None else high
    special = special_token_ids(config)
    allowed = torch.tensor([v for v in range(low, high) if v not in special])
    if not len(allowed):
        raise NoExampleMedia(f"no ordinary token id in [{low}, {high})")
    return allowed[torch.randint(len(allowed), (batch, seq), generator=generator)]


def embeds_raw_patches(model) -> bool:
    """A model without a vision tower config that embeds image patches itself (Fuyu):
    it has ``get_image_features`` and its config an integer ``patch_size``."""
    has_get = any(hasattr(owner, "get_image_features") for owner in (model, getattr(model, "model", None)))
    return has_get and isinstance(getattr(model.config, "patch_size", None), int)


def token_companions(ids: torch.Tensor, forward_params: set[str]) -> dict[str, torch.Tensor]:
    """Example inputs aligned with token ids ``[B, S]`` that the forward reads beside
    them (``fxpp.inputs.names.TOKEN_COMPANIONS``): a document-layout model's ``bbox`` (UDOP),
    each token's box ``(x0, y0, x1, y1)`` in ``[0, 1]``, left to right along a line,
    ``[B, S, 4]``. Empty for other models."""
    if "bbox" not in forward_params:
        return {}
    b, s = ids.shape
    x0 = torch.arange(s, dtype=torch.float32).expand(b, s) / (s + 1)
    y0 = torch.linspace(0.1, 0.5, b)[:, None].expand(b, s)
    return {"bbox": torch.stack([x0, y0, x0 + 1 / (s + 1), y0 + 0.1], -1).to(ids.device)}


def vision_config_of(model):
    """The config that describes the model's images (its vision tower's, or the model's
    own for a model that embeds raw patches), or None for a model without images."""
    config = model.config
    vision = getattr(config, "vision_config", None)
    if vision is None and getattr(config, "is_encoder_decoder", False):
        # an encoder-decoder model's images go to its encoder: a vision tower in the
        # encoder's config (T5Gemma 2), or an encoder that is one (VisionEncoderDecoder's ViT)
        encoder = getattr(config, "encoder", None)
        vision = getattr(encoder, "vision_config", None)
        if vision is None and encoder is not None and image_side(encoder) is not None:
            vision = encoder
        if vision is None and image_side(config) is not None and "pixel_values" in parameter_names(model.forward):
            vision = config  # the encoder embeds image patches itself (UDOP)
    if vision is None and embeds_raw_patches(model):
        return config
    return vision


def patch_dim(model, vision) -> int:
    """Values per flattened patch: read from the vision tower's patch embedding."""
    tower = next((getattr(m, a) for m in (model, getattr(model, "model", None)) if m is not None
                  for a in ("visual", "vision_tower", "vision_model", "vision_encoder") if hasattr(m, a)), model)
    for name, mod in tower.named_modules():
        if "patch" not in name and "embed" not in name:
            continue
        if isinstance(mod, torch.nn.Linear):
            return mod.in_features
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Conv3d)):
            return mod.in_channels * int(torch.tensor(mod.kernel_size).prod())
    channels = getattr(vision, "num_channels", None) or getattr(vision, "in_channels", None) or 3
    return channels * int_attr(vision, TEMPORAL_ATTRS, 1) * patch_size(vision) ** 2


def feature_tokens(features, hidden: int) -> int:
    """Tokens that image features fill: the features' size over the text width."""
    for key in ("pooler_output", "image_embeds", "last_hidden_state"):
        value = getattr(features, key, None) if not isinstance(features, (torch.Tensor, list, tuple)) else None
        if value is not None:
            features = value
            break
    tensors = [features] if isinstance(features, torch.Tensor) else list(features) if isinstance(
        features, (list, tuple)) else []
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise NoExampleMedia(f"get_image_features returned a {type(features).__name__}, not tensors")
    total = sum(t.numel() for t in tensors)
    if total % hidden:
        raise NoExampleMedia(f"image features of {total} values do not fill whole tokens of width {hidden}")
    return total // hidden


def _message(e: BaseException, limit: int) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _image_feature_getter(model) -> Callable | None:
    return next((getattr(owner, name) for name in ("get_image_features", "get_video_features")
                 for owner in (model, getattr(model, "model", None)) if owner is not None and hasattr(owner, name)),
                None)


def media_candidates(model, batch: int, g: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Media layouts to try for ``batch`` images, most likely first (module docstring)."""
    config = model.config
    vision = vision_config_of(model)
    towerless = vision is config and embeds_raw_patches(model)
    channels = getattr(vision, "num_channels", None) or getattr(vision, "in_channels", None) or 3
    forward_params = parameter_names(model.forward)
    get_params = parameter_names(_image_feature_getter(model))
    if towerless:
        # no tower: a linear embedding of raw patches, [images, patches, C*p*p] (Fuyu)
        p = patch_size(config)
        return [{"pixel_values": torch.randn(batch, 16, channels * p * p, generator=g)}]
    if is_grid_tower(vision, type(model)):
        side = 2 * int_attr(vision, MERGE_ATTRS, 1)
        grid = torch.tensor([[1, side, side]] * batch)
        width = patch_dim(model, vision)
        flat = torch.randn(int(grid.prod(-1).sum()), width, generator=g)
        p = patch_size(vision)
        # flattened patches [patches, values]; else patches as small images [patches, C, p, p]
        # (the temporal patch folded into the channels), or a batch of one [1, patches, C, p, p]
        candidates = [{"pixel_values": flat}]
        if width % (p * p) == 0:
            images = flat.reshape(len(flat), width // (p * p), p, p)
            candidates += [{"pixel_values": images}, {"pixel_values": images[None]}]
        for media in candidates:
            media["image_grid_thw"] = grid
            if "image_merge_sizes" in forward_params:
                media["image_merge_sizes"] = torch.tensor([side // 2] * batch)
    elif "flattened_patches" in forward_params:
        # Pix2Struct-style: [images, patches, 2 + values], each row led by its patch's (row, column)
        side = 4
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        where = torch.stack([rows.flatten(), cols.flatten()], -1).float().expand(batch, side * side, 2)
        values = torch.randn(batch, side * side, vision.patch_embed_hidden_size, generator=g)
        candidates = [{"flattened_patches": torch.cat([where, values], -1)}]
    elif image_side(vision) is None:
        # a tower that takes patch sequences: [images, patches, C*p*p] with each patch's
        # (x, y) position (Gemma 4), or each image's patch grid and which patches are real
        # (SigLIP2 naflex)
        p = patch_size(vision)
        side = 4 * int_attr(vision, ("pooling_kernel_size",), 1)
        pixels = torch.randn(batch, side * side, channels * p * p, generator=g)
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        positions = torch.stack([xs.flatten(), ys.flatten()], -1).expand(batch, -1, -1).clone()
        candidates = []
        if "image_position_ids" in get_params | forward_params:
            candidates.append({"pixel_values": pixels, "image_position_ids": positions})
        candidates.append({"pixel_values": pixels, "spatial_shapes": torch.tensor([[side, side]] * batch),
                           "pixel_attention_mask": torch.ones(batch, side * side, dtype=torch.long)})
    else:
        size = image_side(vision)
        pixels = torch.randn(batch, channels, size, size, generator=g)
        # [images, C, H, W]; else one image (or, for any-resolution models, a base view plus
        # one tile) per row: [rows, images, C, H, W]
        candidates = [{"pixel_values": pixels}, {"pixel_values": pixels[:, None]},
                      {"pixel_values": torch.stack([pixels, pixels.flip(-1)], 1)}]
        if "image_sizes" in get_params:
            # with each image's size (any-resolution and Pixtral towers need it; tried after
            # the images alone, which plain towers take without data-dependent splits)
            candidates += [{**media, "image_sizes": torch.tensor([[size, size]] * batch)} for media in candidates]
        if "pixel_attention_mask" in get_params:
            # which tiles of [rows, tiles, C, H, W] are real (tried last)
            candidates += [{**media, "pixel_attention_mask": torch.ones(media["pixel_values"].shape[:2],
                                                                         dtype=torch.bool)}
                           for media in candidates if media["pixel_values"].ndim == 5]
    _add_second_towers(config, get_params, candidates, batch, g)
    # token ids of a second text encoder that reads the images (InstructBLIP's Q-Former
    # instruction), one short row per image
    vocab_config = config
    for name in sorted(p for p in forward_params | get_params
                       if p.endswith("_input_ids") and p not in ("input_ids", "decoder_input_ids")):
        ids = text_token_ids(vocab_config, batch, 4, g)
        for media in candidates:
            media[name] = ids
            if name.replace("input_ids", "attention_mask") in forward_params | get_params:
                media[name.replace("input_ids", "attention_mask")] = torch.ones_like(ids)
    return candidates


def _add_second_towers(config, get_params: set[str], candidates: list[dict], batch: int,
                       g: torch.Generator) -> None:
    """Images for a second tower (``high_res_pixel_values`` read by ``high_res_vision_config``)."""
    for name in sorted(get_params):
        if not name.endswith("_pixel_values"):
            continue
        other = getattr(config, name[: -len("pixel_values")] + "vision_config", None)
        side = image_side(other) if other is not None else None
        if side is None:
            raise NoExampleMedia(f"{type(config).__name__}: no vision config with an image size for {name}")
        channels = getattr(other, "num_channels", None) or 3
        for media in candidates:
            media[name] = torch.randn(batch, channels, side, side, generator=g)


def first_working(candidates: list[dict], attempt: Callable, what: str):
    """``(media, attempt(media))`` for the first candidate ``attempt`` accepts, without
    gradients; else NoExampleMedia listing every failure (``what`` formats the shapes)."""
    failures = []
    for media in candidates:
        try:
            with torch.no_grad():
                return media, attempt(media)
        except NoExampleMedia:
            raise
        except Exception as e:  # noqa: BLE001 - a layout the model does not take: try the next
            shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in media.items())
            failures.append(f"{what.format(shapes)}: {type(e).__name__}: {_message(e, 200 if not failures else 100)}")
    raise NoExampleMedia("; ".join(failures))


def _on(device: torch.device, media: dict) -> dict:
    return {k: v.to(device) for k, v in media.items()}


def _tiled_cross_attention_inputs(model, vision, token, channels: int, batch: int, g: torch.Generator) -> dict:
    """Mllama-style inputs: one image of ``max_num_tiles`` tiles per row, read through
    cross-attention by every token from the image token on."""
    tiles = getattr(vision, "max_num_tiles", None) or 1
    size = image_side(vision)
    seq = 2 * SEQ_TEXT
    ids = text_token_ids(model.config, batch, seq, g)
    if token is not None:
        ids[:, 1] = token
    sees = torch.zeros(batch, seq, 1, tiles, dtype=torch.long)
    sees[:, 1:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 1, tiles, channels, size, size, generator=g),
            "aspect_ratio_ids": torch.ones(batch, 1, dtype=torch.long),  # 0 would mean a padding image
            "aspect_ratio_mask": torch.ones(batch, 1, tiles, dtype=torch.long), "cross_attention_mask": sees}


def _first_that_runs(model, device, forward_params: set[str], candidates: list[dict], batch: int,
                     g: torch.Generator, decoder: dict[str, torch.Tensor] | None = None) -> dict:
    """Text inputs (where the forward takes ``input_ids``; an encoder-decoder model's
    decoder tokens where it takes them) with the first image layout the model's whole
    forward accepts."""
    if not decoder and is_encoder_decoder(model):
        decoder = {"decoder_input_ids": text_token_ids(model.config, batch, SEQ_TEXT, g)}

    slots = getattr(model.config, "latent_query_num", None)
    slots = slots if "image_embeds_position_mask" in forward_params else None
    ids = text_token_ids(model.config, batch, (slots or 0) + 2 * SEQ_TEXT, g)
    extra = {}
    if slots:  # Kosmos-2: the positions the image's query outputs replace
        extra["image_embeds_position_mask"] = torch.zeros_like(ids)
        extra["image_embeds_position_mask"][:, 2:2 + slots] = 1

    def inputs_with(media: dict) -> dict:
        text = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **token_companions(ids, forward_params)} \
            if "input_ids" in forward_params else {}
        inputs = {**text, **extra, **media, **(decoder or {})}
        pixels = media.get("pixel_values")
        if "image_attention_mask" in forward_params and pixels is not None and pixels.ndim == 5:
            # IDEFICS: every token sees every image
            inputs["image_attention_mask"] = torch.ones(*ids.shape, pixels.shape[1], dtype=torch.long)
        return inputs

    def runs(media: dict) -> dict:
        inputs = inputs_with(media)
        model(**_on(device, inputs), **TRACE_KWARGS)
        return inputs

    return first_working(candidates, runs, "forward with {} and no image tokens")[1]


def example_media_inputs(model: torch.nn.Module, batch: int = 2, seed: int = 0,
                         input_ids: torch.Tensor | None = None,
                         decoder: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Inputs with one image per row: token ids with the image's tokens, an
    ``attention_mask`` (row 0 left-padded by one token), the media and their companions,
    on the model's device.

    ``input_ids``: the caller's example token ids, kept (their shape too) where each row
    has room for the image's tokens after its first token; the image tokens overwrite
    ``[1, 1 + n)`` and any stray image token elsewhere becomes an ordinary one.

    ``decoder``: an encoder-decoder model's decoder inputs, for the runs of its whole
    forward (a few decoder tokens where not given); the result holds them where the
    forward ran.

    Runs the model's own ``get_image_features`` (or, without an image token, its
    forward) without gradients to check the layout and count the image tokens; the
    model is left as it was (eval/train mode, parameters).

    Raises:
        NoExampleMedia: the model has no image path, or no layout of the module
            docstring fits it; the message says which layouts were tried and why each failed.
    """
    config = model.config
    vision = vision_config_of(model)
    if vision is None:
        raise NoExampleMedia(f"{type(model).__name__} has no vision_config (no image path)")
    device = model_device(model)
    token = next((getattr(config, a) for a in placeholder_token_attrs(config)
                  if isinstance(getattr(config, a, None), int)), None)
    channels = getattr(vision, "num_channels", None) or getattr(vision, "in_channels", None) or 3
    g = torch.Generator().manual_seed(seed)
    forward_params = parameter_names(model.forward)
    with model_unchanged(model), torch.random.fork_rng(devices=[]):
        if "aspect_ratio_ids" in forward_params:
            return _on(device, _tiled_cross_attention_inputs(model, vision, token, channels, batch, g))
        candidates = media_candidates(model, batch, g)
        if token is None:
            # No image token: the model reads the images another way (cross-attention, or
            # features put before the text); any text length goes with them
            return _on(device, _first_that_runs(model, device, forward_params, candidates, batch, g, decoder))
        get = _image_feature_getter(model)
        if get is None:
            raise NoExampleMedia(f"{type(model).__name__} has an image token but no get_image_features "
                                 "(or get_video_features)")
        hidden = config.get_text_config().hidden_size
        media, n = first_working(candidates, lambda media: feature_tokens(get(**_on(device, media)), hidden),
                                 "get_image_features on {}")
    if n % batch:
        raise NoExampleMedia(f"{batch} images gave {n} feature tokens, not the same number per image")
    n //= batch
    if n > MAX_IMAGE_TOKENS:
        raise NoExampleMedia(f"an example image becomes {n} tokens (more than {MAX_IMAGE_TOKENS})")
    if input_ids is not None and input_ids.dim() == 2 and input_ids.shape[1] >= n + 2:
        ids = input_ids.detach().to("cpu").clone()
        ids[ids == token] = int(text_token_ids(config, 1, 1, g))
        ids[:, 1:1 + n] = token
    else:
        ids = text_token_ids(config, batch, n + SEQ_TEXT, g)
        ids[:, 2:2 + n] = token
    # Row 0 left-padded by one token: mask builders then return a mask in the fake and the
    # real evaluation alike (for an all-ones mask, some return None on real data only).
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, **media}
    for name in ("token_type_ids", "mm_token_type_ids"):  # 1 on image tokens, 0 on text
        if name in forward_params:
            inputs[name] = (ids == token).long()
    inputs.update(token_companions(ids, forward_params))
    return _on(device, inputs)

"""Microbatches of multimodal inputs, and running a schedule on them.

``torch.distributed.pipelining`` splits a batch by cutting every tensor along dim 0.
That is right for token-level inputs but wrong for a vision-language model's media
inputs, which transformers lays out per *image*, not per sample: Gemma 3, LLaVA and
Mistral 3 take ``pixel_values`` with one row per image (``[num_images, C, H, W]``),
Qwen2.5-VL and Qwen3-VL one row per *patch* of every image (``[sum_i t_i*h_i*w_i,
patch_dim]``) plus ``image_grid_thw`` ``[num_images, 3]``. With images per sample that
vary, microbatch ``k`` must get exactly the images of its own samples.

Terms
-----
batch-aligned input
    A tensor whose dim 0 is the batch (``input_ids``, ``attention_mask``,
    ``token_type_ids``, ``mm_token_type_ids``, ``labels``, ``batch_num_images``);
    split with the batch. Qwen's 3-D multimodal ``position_ids`` ``[3, B, S]`` are
    split along dim 1 (:data:`BATCH_DIM`).
item
    One image (or one video) of a :class:`Modality`. Each sample owns the items whose
    placeholder tokens (``config.image_token_id`` / ``image_token_index``) sit in its
    row of ``input_ids``, in order; items are numbered across the batch in the order
    of the samples.
per-item input
    A media tensor with one row per item (``pixel_values`` of most families,
    ``image_sizes``, ``image_grid_thw``, ``image_position_ids``).
flattened-patch input
    A media tensor with ``prod(grid)`` rows per item, where the modality's grid input
    (``image_grid_thw``) gives each item's grid: Qwen-VL's ``pixel_values``.

Note [items per sample]
    Which items a sample owns is read from ``input_ids``. Where each item's token
    count can be computed from the inputs (Qwen-VL: ``prod(grid) / merge**2``;
    Mistral 3: from ``image_sizes``, see :data:`TOKENS_PER_ITEM`), items are handed
    out in order, each sample taking items until their tokens add up to the number
    of placeholder tokens in its row. This is exact also where one item's tokens are
    not contiguous (Pixtral's processor puts ``[IMG_BREAK]`` between rows of image
    tokens; Qwen3-VL puts timestamps between a video's frames). Elsewhere each
    maximal run of placeholder tokens is one item: every processor of the families
    in ``fxpp.testing.zoo`` (Gemma 3/4 with begin/end-of-image tokens around each image,
    LLaVA, LLaVA-OneVision) writes an image's tokens contiguously. Two images written
    back to back with no token between them look like one run there; the item counts
    then disagree with the media tensors' rows and :func:`split_microbatches` raises
    :class:`~fxpp.StageInputError` rather than guess.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import StageInputError
from ..inputs.names import IMAGE, MODALITIES, Modality


# Batch-aligned inputs whose batch is not dim 0: name -> {ndim: batch dim}.
BATCH_DIM: dict[str, dict[int, int]] = {"position_ids": {3: 1}}
# Inputs shared by every sample (copied into each microbatch, not split).
SHARED_INPUTS = frozenset({"cache_position", "logits_to_keep"})
# Families whose media inputs are batch-aligned ([B, max_images, ...], padded) rather
# than per item: only needed where the row count alone is ambiguous (one row per sample
# and as many items as samples, but not one item per sample).
BATCH_ALIGNED_MEDIA: dict[str, frozenset[str]] = {
    "idefics2": frozenset({"pixel_values", "pixel_attention_mask"}),
    "idefics3": frozenset({"pixel_values", "pixel_attention_mask"}),
    "smolvlm": frozenset({"pixel_values", "pixel_attention_mask"}),
    "mllama": frozenset({"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"}),
}


def _grid_tokens(config, inputs: dict, modality: Modality) -> torch.Tensor | None:
    """Qwen-VL style: ``prod(grid) / spatial_merge_size**2`` tokens per item."""
    grid = inputs.get(modality.grid) if modality.grid else None
    if not isinstance(grid, torch.Tensor):
        return None
    vision = getattr(config, "vision_config", None)
    merge = getattr(vision, "spatial_merge_size", None) or getattr(config, "spatial_merge_size", None) or 1
    return grid.prod(-1) // (merge * merge)


def _pixtral_tokens(config, inputs: dict, modality: Modality) -> torch.Tensor | None:
    """Mistral 3: ``(h // (patch * merge)) * (w // (patch * merge))`` tokens per image."""
    sizes = inputs.get("image_sizes")
    if modality is not IMAGE or not isinstance(sizes, torch.Tensor):
        return None
    ratio = config.vision_config.patch_size * config.spatial_merge_size
    return (sizes // ratio).prod(-1)


# model_type -> tokens of each item (Note [items per sample]); the grid rule applies to
# every family that passes a grid input, these only where it does not.
TOKENS_PER_ITEM: dict[str, Callable[[Any, dict, Modality], torch.Tensor | None]] = {
    "mistral3": _pixtral_tokens,
}


def _config(model):
    return getattr(model, "config", model)


def _token_id(config, modality: Modality) -> int | None:
    for attr in modality.token_attrs:
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def _runs(row: torch.Tensor) -> int:
    """Number of maximal runs of True in a 1-D bool tensor."""
    if row.numel() == 0:
        return 0
    starts = row.clone()
    starts[1:] &= ~row[:-1]
    return int(starts.sum())


def _items_per_sample(config, inputs: dict, modality: Modality, token: int, batch: int) -> list[int]:
    """How many items each sample owns (Note [items per sample])."""
    ids = inputs["input_ids"]
    is_token = ids == token
    tokens = is_token.sum(-1).tolist()
    rule = TOKENS_PER_ITEM.get(getattr(config, "model_type", ""), None)
    per_item = _grid_tokens(config, inputs, modality)
    if per_item is None and rule is not None:
        per_item = rule(config, inputs, modality)
    if per_item is None:
        return [_runs(is_token[b]) for b in range(batch)]
    per_item = per_item.tolist()
    counts, item = [], 0
    for b in range(batch):
        need, n = tokens[b], 0
        while need > 0 and item < len(per_item):
            need -= per_item[item]
            item, n = item + 1, n + 1
        if need != 0:
            raise StageInputError(
                f"input_ids: sample {b} has {tokens[b]} {modality.name} tokens (id {token}), which are not the "
                f"tokens of whole {modality.name}s in order (tokens per {modality.name}: {per_item}); "
                f"check that the {modality.name} inputs belong to this batch, in sample order"
            )
        counts.append(n)
    if item != len(per_item):
        raise StageInputError(
            f"input_ids: the batch has {sum(tokens)} {modality.name} tokens, enough for {item} of the "
            f"{len(per_item)} {modality.name}s in the inputs"
        )
    return counts


def _is_media(name: str, model_type: str) -> Modality | None:
    for modality in MODALITIES:
        if name in modality.inputs:
            return modality
    if name in BATCH_ALIGNED_MEDIA.get(model_type, ()):
        return IMAGE
    return None


def split_microbatches(model, inputs: dict[str, Any], num_microbatches: int) -> list[dict[str, Any]]:
    """Split a batch of model inputs into ``num_microbatches`` microbatches by sample.

    Samples are divided as ``torch.tensor_split`` divides the batch (sizes differ by at
    most one). Batch-aligned tensors are split with the batch; per-item media tensors
    by the items (images, videos) each sample owns, flattened-patch tensors by each
    item's patch count (see the module glossary and Note [items per sample]); shared
    inputs and non-tensors are copied. A microbatch whose samples own no item of a
    modality gets none of that modality's inputs (the model then runs text-only);
    a pipeline traced with images needs an image in every microbatch.

    Args:
        model: the model (or its config): gives the placeholder token ids and the
            ``model_type``.
        inputs: the whole batch, by keyword, as the model takes it (``labels`` too).
        num_microbatches: how many microbatches, at most the batch size.

    Returns:
        One dict of inputs per microbatch, in batch order.

    Raises:
        StageInputError: an input that cannot be split: no ``input_ids`` to find the
            images in, media rows that do not match the items found in ``input_ids``,
            a tensor whose size matches neither the batch nor the items.
    """
    config = _config(model)
    model_type = getattr(config, "model_type", "")
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise StageInputError(
            "input_ids: split_microbatches needs the [batch, seq] token ids to tell the batch size and which "
            f"images belong to which sample; got {type(ids).__name__ if ids is None else tuple(ids.shape)}"
        )
    batch = ids.shape[0]
    if not isinstance(num_microbatches, int) or not 1 <= num_microbatches <= batch:
        raise StageInputError(f"num_microbatches={num_microbatches!r} must be between 1 and the batch size {batch}")
    bounds = [0]
    for chunk in torch.tensor_split(torch.arange(batch), num_microbatches):
        bounds.append(bounds[-1] + len(chunk))

    # Which items each microbatch owns, per modality present in the inputs.
    item_bounds: dict[Modality, list[int]] = {}
    for modality in MODALITIES:
        names = [n for n in inputs if isinstance(inputs[n], torch.Tensor) and _is_media(n, model_type) is modality]
        if not names:
            continue
        token = _token_id(config, modality)
        if token is None:
            raise StageInputError(
                f"{names[0]}: {type(config).__name__} names no {modality.name} token "
                f"({' / '.join(modality.token_attrs)}), so the {modality.name}s cannot be assigned to samples"
            )
        counts = _items_per_sample(config, inputs, modality, token, batch)
        cum = [0]
        for c in counts:
            cum.append(cum[-1] + c)
        item_bounds[modality] = [cum[b] for b in bounds]
        if "batch_num_images" in inputs and modality is IMAGE:
            given = [int(x) for x in torch.as_tensor(inputs["batch_num_images"]).tolist()]
            if given != counts:
                raise StageInputError(
                    f"batch_num_images: says {given} images per sample, input_ids has image tokens of {counts}"
                )

    out: list[dict[str, Any]] = [dict() for _ in range(num_microbatches)]
    for name, value in inputs.items():
        if not isinstance(value, torch.Tensor) or name in SHARED_INPUTS or value.dim() == 0:
            for mb in out:
                mb[name] = value
            continue
        modality = _is_media(name, model_type)
        if modality is not None:
            chunks = _split_media(name, value, modality, inputs, item_bounds[modality], bounds, batch,
                                  name in BATCH_ALIGNED_MEDIA.get(model_type, ()))
        else:
            dim = BATCH_DIM.get(name, {}).get(value.dim(), 0)
            if value.shape[dim] != batch:
                raise StageInputError(
                    f"{name}: shape {tuple(value.shape)} has {value.shape[dim]} rows along dim {dim}, not the batch "
                    f"size {batch} of input_ids; fxpp does not know how to split it"
                )
            chunks = [value.narrow(dim, bounds[k], bounds[k + 1] - bounds[k]) for k in range(num_microbatches)]
        for mb, chunk in zip(out, chunks):
            if chunk is not None:
                mb[name] = chunk
    return out


def _split_media(name, value, modality, inputs, items, bounds, batch, batch_aligned) -> list[torch.Tensor | None]:
    """Split one media tensor by items (rows per item, or patches per item)."""
    n_items = items[-1]
    rows = value.shape[0]
    grid = inputs.get(modality.grid) if modality.grid else None
    if isinstance(grid, torch.Tensor) and name != modality.grid and rows == int(grid.prod(-1).sum()):
        patches = [0] + grid.prod(-1).cumsum(0).tolist()
        row_bounds = [patches[i] for i in items]
    elif batch_aligned and rows == batch:
        row_bounds = bounds
    elif rows == n_items:
        row_bounds = items
    elif rows == batch and n_items != batch:
        row_bounds = bounds  # [B, ...]: one row per sample
    else:
        expect = f"{n_items} (one per {modality.name})"
        if isinstance(grid, torch.Tensor):
            expect += f" or {int(grid.prod(-1).sum())} (patches of every {modality.name} in {modality.grid})"
        raise StageInputError(
            f"{name}: shape {tuple(value.shape)} has {rows} rows; input_ids has the tokens of {n_items} "
            f"{modality.name}(s), so expected {expect} or {batch} (the batch). Check the {modality.name} "
            "placeholder tokens in input_ids"
        )
    chunks = []
    for k in range(len(bounds) - 1):
        lo, hi = row_bounds[k], row_bounds[k + 1]
        empty = items[k + 1] == items[k] and row_bounds is not bounds
        chunks.append(None if empty else value[lo:hi])
    return chunks

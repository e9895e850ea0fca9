"""Microbatches of VLM inputs (``fxpp.split_microbatches``), single process.

For every tiny VLM, a batch of 4 samples owning 2, 0, 1 and 1 images is split into 2
and into 4 microbatches. The unpatched model's token-weighted losses over the
microbatches add up to its whole-batch loss, and each microbatch's image tensors are
exactly its own samples' images.
"""

from __future__ import annotations

import functools

import pytest
import torch

import fxpp
from fxpp.testing.zoo import IMAGE_TOKEN, VISION_END, VISION_START, VLM_FAMILIES, _FIRST_SPECIAL, _image_inputs, tiny_vlm

IMAGES_PER_SAMPLE = (2, 0, 1, 1)
# What each family's media inputs hold per image (grid inputs: one row; flattened
# patches: the image's rows).
PER_IMAGE = {
    "gemma3": ("pixel_values",), "llava": ("pixel_values",),
    "llava_onevision": ("pixel_values", "image_sizes"), "mistral3": ("pixel_values", "image_sizes"),
    "gemma4": ("pixel_values", "image_position_ids"),
    "qwen2_5_vl": ("image_grid_thw",), "qwen3_vl": ("image_grid_thw",),
}


@functools.lru_cache(maxsize=None)
def _vlm(family: str):
    return tiny_vlm(family, 2)


def _qwen_images(model, n: int, g: torch.Generator):
    """Qwen-VL images of different grids, so patch counts differ per image."""
    vc = model.config.vision_config
    grid = torch.tensor([[1, 4, 4], [1, 4, 8], [1, 8, 4], [1, 4, 4]] * n)[:n]
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    pixel_values = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g)
    return {"pixel_values": pixel_values, "image_grid_thw": grid}, (grid.prod(-1) // vc.spatial_merge_size ** 2).tolist()


def multi_image_batch(family: str, images_per_sample=IMAGES_PER_SAMPLE, seed: int = 0, model=None):
    """The model, inputs, labels, and each image's media tensors (per sample, in order)."""
    model = model if model is not None else _vlm(family)[0]
    g = torch.Generator().manual_seed(seed)
    n_images = sum(images_per_sample)
    if family in ("qwen2_5_vl", "qwen3_vl"):
        media, tokens = _qwen_images(model, n_images, g)
    else:
        media, tokens = _image_inputs(model, family, n_images, g)
    per_row = []
    it = iter(tokens)
    for count in images_per_sample:
        per_row.append([next(it) for _ in range(count)])
    seq = max(sum(n + 2 for n in row) for row in per_row) + 4
    ids = torch.randint(3, _FIRST_SPECIAL, (len(images_per_sample), seq), generator=g)
    for b, row in enumerate(per_row):
        pos = 1
        for n in row:
            ids[b, pos] = VISION_START
            ids[b, pos + 1:pos + 1 + n] = IMAGE_TOKEN
            ids[b, pos + 1 + n] = VISION_END
            pos += n + 3  # one text token between images
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **media}
    if family == "gemma3":
        inputs["token_type_ids"] = (ids == IMAGE_TOKEN).long()
    if family in ("gemma4", "qwen2_5_vl", "qwen3_vl"):
        inputs["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long()
    labels = ids.masked_fill(ids >= _FIRST_SPECIAL, -100)
    return model, inputs, labels, _images_of(family, media)


def _images_of(family, media) -> list[dict[str, torch.Tensor]]:
    """Each image's rows of every media input."""
    if "image_grid_thw" in media:
        grid = media["image_grid_thw"]
        rows = [0] + grid.prod(-1).cumsum(0).tolist()
        return [{"image_grid_thw": grid[i:i + 1], "pixel_values": media["pixel_values"][rows[i]:rows[i + 1]]}
                for i in range(grid.shape[0])]
    n = media["pixel_values"].shape[0]
    return [{k: v[i:i + 1] for k, v in media.items()} for i in range(n)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_microbatches", [2, 4])
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_microbatch_losses_add_up_to_the_whole_batch(family, num_microbatches):
    model, inputs, labels, _ = multi_image_batch(family)
    with torch.no_grad():
        whole = model(**inputs, labels=labels).loss
        mbs = fxpp.split_microbatches(model, {**inputs, "labels": labels}, num_microbatches)
        assert len(mbs) == num_microbatches
        total = fxpp.count_target_tokens(labels)
        weighted = sum(model(**mb).loss * fxpp.count_target_tokens(mb["labels"]) for mb in mbs) / total
    torch.testing.assert_close(weighted, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_microbatches", [2, 4])
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_each_microbatch_gets_exactly_its_own_images(family, num_microbatches):
    model, inputs, labels, images = multi_image_batch(family)
    mbs = fxpp.split_microbatches(model, inputs, num_microbatches)
    samples = torch.tensor_split(torch.arange(len(IMAGES_PER_SAMPLE)), num_microbatches)
    first = 0
    for k, (mb, rows) in enumerate(zip(mbs, samples)):
        assert torch.equal(mb["input_ids"], inputs["input_ids"][rows])
        assert torch.equal(mb["attention_mask"], inputs["attention_mask"][rows])
        n = sum(IMAGES_PER_SAMPLE[int(r)] for r in rows)
        own = images[first:first + n]
        first += n
        media = {name for name in inputs if name not in ("input_ids", "attention_mask", "token_type_ids",
                                                         "mm_token_type_ids")}
        if not own:
            assert not media & set(mb), f"microbatch {k} owns no image but got {sorted(media & set(mb))}"
            continue
        for name in media:
            expected = torch.cat([img[name] for img in own])
            assert torch.equal(mb[name], expected), f"microbatch {k}: {name} is not its own images'"
    assert first == len(images)


def test_batch_aligned_pixel_values_split_with_the_batch():
    """One image per sample: per-image and batch-aligned splits agree."""
    model, make_inputs = _vlm("llava")
    inputs = make_inputs(4, 12, seed=1)
    mbs = fxpp.split_microbatches(model, inputs, 2)
    assert torch.equal(mbs[1]["pixel_values"], inputs["pixel_values"][2:])


def test_qwen_multimodal_position_ids_split_along_dim_1():
    model, inputs, _, _ = multi_image_batch("qwen2_5_vl")
    position_ids = torch.arange(3 * 4 * inputs["input_ids"].shape[1]).view(3, 4, -1)
    mbs = fxpp.split_microbatches(model, {**inputs, "position_ids": position_ids}, 2)
    assert torch.equal(mbs[1]["position_ids"], position_ids[:, 2:])


def test_image_count_mismatch_names_the_input():
    model, inputs, _, _ = multi_image_batch("llava")
    inputs["pixel_values"] = inputs["pixel_values"][:3]
    with pytest.raises(fxpp.StageInputError, match=r"pixel_values: shape \(3, 3, 16, 16\) has 3 rows; input_ids has "
                                                    r"the tokens of 4 image\(s\)"):
        fxpp.split_microbatches(model, inputs, 2)


def test_image_tokens_that_are_not_whole_images_name_the_sample():
    model, inputs, _, _ = multi_image_batch("qwen2_5_vl")
    ids = inputs["input_ids"].clone()
    ids[2, (ids[2] == IMAGE_TOKEN).nonzero()[0]] = 5  # drop one image token of sample 2
    with pytest.raises(fxpp.StageInputError, match=r"input_ids: sample 2 has \d+ image tokens .* not the tokens of whole"):
        fxpp.split_microbatches(model, {**inputs, "input_ids": ids}, 2)


def test_unknown_tensor_layout_names_the_input():
    model, make_inputs = _vlm("llava")
    inputs = make_inputs(4, 12, seed=1)
    with pytest.raises(fxpp.StageInputError, match=r"extra: shape \(3,\) has 3 rows along dim 0, not the batch size 4"):
        fxpp.split_microbatches(model, {**inputs, "extra": torch.zeros(3)}, 2)
    with pytest.raises(fxpp.StageInputError, match=r"num_microbatches=5 must be between 1 and the batch size 4"):
        fxpp.split_microbatches(model, inputs, 5)

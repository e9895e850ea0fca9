"""Vision-language models trained with a torch.distributed.pipelining schedule on gloo.

On 2 ranks with 1F1B, a batch of 4 samples owning 1, 2, 0 and 1 images is split with
``fxpp.split_microbatches`` (so the two microbatches carry 3 and 1 images) and run
with ``fxpp.step_with_microbatches``. The loss equals the unpatched model's on the
whole batch, and every stage's gradients (the vision tower's included) equal the
unpatched model's.

Every microbatch has the same text shape (the batch is padded to one length): the
stages' static metadata come from the example microbatch. Images may differ per
microbatch because nothing image-shaped crosses a cut:

* LLaVA (the cheapest tiny VLM), cut chosen by fxpp: hidden states and the padding
  mask cross.
* Qwen3-VL cut at layer 1, before a deepstack layer: its visual features for layer 1
  (one row per image token) cross as a dense ``[B, S, H]`` tensor
  (``fxpp.passes.dense_masked_rows``).
"""

from __future__ import annotations

import pytest
import torch

import fxpp
from fxpp.runtime.schedule import make_schedule
from fxpp.testing.zoo import tiny_vlm

from .dist import run_distributed
from .test_microbatch import multi_image_batch

IMAGES_PER_SAMPLE = (1, 2, 0, 1)
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "model.visual.")
CUTS = {"llava": None, "qwen3_vl": [1]}


def vlm_train_rank(rank, world, workdir, family, schedule_name, num_microbatches):
    torch.manual_seed(0)
    model = tiny_vlm(family, 4)[0].train()
    ref = tiny_vlm(family, 4)[0].train()
    _, inputs, labels, _ = multi_image_batch(family, IMAGES_PER_SAMPLE, seed=3, model=model)
    mbs = fxpp.split_microbatches(model, {**inputs, "labels": labels}, num_microbatches)
    targets = [mb.pop("labels") for mb in mbs]
    images = [int((mb["input_ids"] == model.config.image_token_id).sum()) for mb in mbs]
    pipe = fxpp.pipeline(model, world, example_inputs=mbs[0], cuts=CUTS[family])
    stage = pipe.build_stage(rank, "cpu")
    loss_fn = fxpp.causal_lm_loss(labels, num_microbatches)
    schedule = make_schedule(schedule_name, [stage], num_microbatches, loss_fn)
    losses = []
    fxpp.step_with_microbatches(schedule, mbs if rank == 0 else None, targets, losses)
    ref_loss = ref(**inputs, labels=labels).loss
    ref_loss.backward()
    report = {"images": images, "crossing": pipe.crossing, "loss_diff": None, "grad_diff": {}}
    if stage.is_last:
        report["loss_diff"] = float((loss_fn.whole_batch(losses) - ref_loss.detach()).abs())
    for name, p in stage.submod.named_parameters():
        g_ref = ref.get_parameter(name).grad
        if p.grad is None and g_ref is None:
            continue  # unused by the model too (LLaVA reads a vision layer's output, not post_layernorm's)
        report["grad_diff"][name] = "missing" if p.grad is None or g_ref is None else float((p.grad - g_ref).abs().max())
    return report


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", sorted(CUTS))
def test_vlm_1f1b_with_images_matches_unpatched_model(tmp_path, family):
    reports = run_distributed(vlm_train_rank, 2, tmp_path, family, "1F1B", 2, timeout_s=240)
    first, second = reports[0]["images"]
    assert first > second > 0, f"the microbatches must carry different numbers of image tokens: {first}, {second}"
    if family == "qwen3_vl":
        assert any(name.startswith("scatter_rows") for name in reports[0]["crossing"][0]), reports[0]["crossing"]
    assert reports[-1]["loss_diff"] is not None and reports[-1]["loss_diff"] < 2e-5, reports[-1]["loss_diff"]
    for rank, r in enumerate(reports):
        for name, d in r["grad_diff"].items():
            assert d != "missing" and d < 2e-5, f"rank {rank} grad {name}: {d}"
    vision = [n for n in reports[0]["grad_diff"] if n.startswith(VISION_PREFIXES)]
    assert vision, "the first stage must hold the vision tower and projector"
    assert not any(n.startswith(VISION_PREFIXES) for n in reports[1]["grad_diff"])

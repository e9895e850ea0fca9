"""One pipeline, any input set: the fixed crossing layout (``fxpp.layout``).

Stages are built once with no example inputs (for VLMs, fxpp makes example images:
``fxpp.inputs.example_media``) and then called with every subset of the signature a user passes: token ids only, a
padding mask, packed-document position ids (restarting mid-row), both, other batch
and sequence sizes than the build's, and for VLMs batches with and without images.
Each call's logits and every parameter gradient must equal the unpatched model's
training forward, ``model(**inputs, use_cache=False)`` on the same inputs.

Tolerance: the stages call the model's own modules on the same tensors in the same
order, so the only differences come from kernels seeing other memory layouts (a
contiguous copy at a cut) and reassociating float32 sums: a few ulps of values of
order 1-10, far below 1e-5. A wrong mask, a lost position id or a value read in the
wrong slot moves logits by 1e-1 or more (issue: 0.58-1.5 for packed documents).
"""

from __future__ import annotations

import functools
import os
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxpp
from fxpp.runtime.schedule import make_schedule
from fxpp.testing.check import assert_same, loss_of, reference, run_pipeline
from fxpp.testing.zoo import IMAGE_TOKEN, VISION_END, VISION_START, VLM_FAMILIES, tiny_model, tiny_vlm

from .dist import run_distributed
from .helpers import cached_model, make_inputs

ATOL32, RTOL32 = 1e-5, 1e-5  # see the module docstring


def property_examples(default: int) -> int:
    """Hypothesis examples per property test: the suite's default, or FXPP_PROPERTY_EXAMPLES
    for a longer search (``FXPP_PROPERTY_EXAMPLES=500 python -m pytest tests/test_signature.py -k any_input_set``)."""
    return int(os.environ.get("FXPP_PROPERTY_EXAMPLES", default))
TEXT_FAMILIES = ("llama", "gemma2", "gemma3", "gemma4", "qwen3_moe", "phi3")
NUM_LAYERS = 4


def packed_positions(batch: int, seq: int, seed: int) -> torch.Tensor:
    """Position ids of packed documents: each row restarts at 0 where a new document begins."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        starts = sorted({0, *torch.randint(1, max(seq, 2), (2,), generator=g).tolist()})
        pos = torch.zeros(seq, dtype=torch.long)
        for a, b in zip(starts, [*starts[1:], seq]):
            pos[a:b] = torch.arange(b - a)
        rows.append(pos)
    return torch.stack(rows)


def call_inputs(batch: int, seq: int, kinds: frozenset, seed: int) -> dict:
    inputs = make_inputs(batch, seq, padding="left" if "padding" in kinds else "none", seed=seed)
    if "padding" not in kinds:
        del inputs["attention_mask"]
    if "packed" in kinds:
        inputs["position_ids"] = packed_positions(batch, seq, seed)
    return inputs


@functools.lru_cache(maxsize=None)
def _pipeline(family: str, cuts: tuple[int, ...]):
    return fxpp.pipeline(cached_model(family, NUM_LAYERS), len(cuts) + 1, cuts=list(cuts))


@settings(max_examples=property_examples(12), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(TEXT_FAMILIES),
    cuts=st.lists(st.integers(1, NUM_LAYERS - 1), min_size=1, max_size=NUM_LAYERS - 1, unique=True).map(
        lambda c: tuple(sorted(c))),
    kinds=st.sets(st.sampled_from(["padding", "packed"])).map(frozenset),
    batch=st.integers(1, 3),
    seq=st.integers(3, 11).filter(lambda s: s != 8),  # never the build's [2, 8]
    seed=st.integers(0, 2**16),
)
def test_any_input_set_equals_the_training_forward(family, cuts, kinds, batch, seq, seed):
    pipe = _pipeline(family, cuts)
    model = pipe.model
    inputs = call_inputs(batch, seq, kinds, seed)
    assert_same(reference(model, inputs), run_pipeline(pipe, pipe.model, inputs), atol=ATOL32, rtol=RTOL32,
                what=f"{family} cuts={list(cuts)} inputs={sorted(inputs)} shape={batch}x{seq}")


@pytest.mark.parametrize("family", ["llama", "gemma4"])
def test_packed_documents_are_not_read_as_a_padding_mask(family):
    """The issue's silent wrong answer: position ids that restart mid-row, no mask, default build."""
    pipe = fxpp.pipeline(cached_model(family, NUM_LAYERS), 2)
    ids = make_inputs(2, 12, seed=5)["input_ids"]
    pos = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)
    model = pipe.model
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        unpacked = model(input_ids=ids, use_cache=False).logits
        got = pipe(input_ids=ids, position_ids=pos)
    assert (packed - unpacked).abs().max() > 1e-2  # the packing matters for this check to mean anything
    torch.testing.assert_close(got, packed, atol=ATOL32, rtol=RTOL32)


def test_a_tuple_of_another_layout_is_refused():
    model = cached_model("llama", NUM_LAYERS)
    first = fxpp.transform(model, "first", range(0, 2))
    last = fxpp.transform(model, "last", range(2, 4))
    ids = make_inputs(2, 5)["input_ids"]
    out = first(input_ids=ids)
    torch.testing.assert_close(last(*out), model(input_ids=ids, use_cache=False).logits, atol=ATOL32, rtol=RTOL32)
    # Stages built for another signature send another layout id in the header.
    forged = out[-1].clone()
    forged[0] += 1
    with pytest.raises(fxpp.StageInputError, match=r"comes from stages built for another input signature or "
                       r"another cut .* this stage receives \['hidden states', 'input attention_mask', "
                       r"'input position_ids'\]"):
        last(*out[:-1], forged)
    # A slot the sender only filled (no mask in this call) is never read as data.
    forged = out[-1].clone()
    forged[1] = first.signature.traced_bits  # claims every (traced) input was present
    with pytest.raises(fxpp.StageInputError, match=r"reads \['input attention_mask', 'input position_ids'\], which "
                       r"the previous stage did not compute for this call"):
        last(*out[:-1], forged)


def test_inputs_outside_the_signature_are_refused_before_anything_runs():
    model = cached_model("llama", NUM_LAYERS)
    first = fxpp.transform(model, "first", range(0, 2))
    with pytest.raises(fxpp.StageInputError, match=r"input\(s\) \['token_type_ids'\] are not in the pipeline's input "
                       r"signature \['input_ids', 'attention_mask', 'position_ids', 'inputs_embeds'\]\. Declare them"):
        first(input_ids=make_inputs(2, 4)["input_ids"], token_type_ids=torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("built_from", ["input_ids", "inputs_embeds"])
def test_the_other_token_input_is_in_the_default_signature(built_from):
    """inputs_embeds where the forward takes it (and input_ids for stages built from embeddings):
    logits, every parameter gradient and the gradient of the given embeddings equal the unpatched model's."""
    model = cached_model("llama", NUM_LAYERS)
    ids = make_inputs(2, 6)["input_ids"]
    embeds = model.get_input_embeddings()(ids).detach()
    example = {"input_ids": ids} if built_from == "input_ids" else {"inputs_embeds": embeds}
    pipe = fxpp.pipeline(model, 3, example_inputs=example)
    assert pipe.signature.alternatives == (("inputs_embeds",) if built_from == "input_ids" else ("input_ids",))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :2] = 0  # another shape than the build's, left padding
    ids = make_inputs(3, 7)["input_ids"]
    for inputs in ({"input_ids": ids}, {"inputs_embeds": model.get_input_embeddings()(ids).detach()},
                   {"inputs_embeds": model.get_input_embeddings()(ids).detach(), "attention_mask": mask}):
        assert_same(reference(model, inputs), run_pipeline(pipe, pipe.model, inputs), atol=ATOL32, rtol=RTOL32,
                    what=f"built from {built_from}, inputs={sorted(inputs)}")
    # The gradient reaching the embeddings given (what an outer module would train on).
    grads = []
    for run in (lambda e: model(inputs_embeds=e, use_cache=False).logits, lambda e: pipe(inputs_embeds=e)):
        leaf = embeds.clone().requires_grad_(True)
        loss_of(run(leaf)).backward()
        grads.append(leaf.grad)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[1], grads[0], atol=ATOL32, rtol=RTOL32)


@functools.lru_cache(maxsize=None)
def _vlm(family: str):
    return tiny_vlm(family, NUM_LAYERS)


@functools.lru_cache(maxsize=None)
def _vlm_pipeline(family: str, cuts: tuple[int, ...]):
    """Built with no example inputs: the default signature holds the media inputs."""
    return fxpp.pipeline(_vlm(family)[0], len(cuts) + 1, cuts=list(cuts))


def vlm_call_inputs(family: str, make, batch: int, extra: int, images: bool, padding: bool, seed: int) -> dict:
    seq = (40 if family == "llava_onevision" else 24) + extra  # its tiled images need more tokens
    inputs = make(batch, seq, seed=seed)
    if not images:  # text only: no media, and no image placeholder among the ids
        inputs = {"input_ids": inputs["input_ids"].clamp(max=50), "attention_mask": inputs["attention_mask"]}
    if padding:
        # Left padding of row 0, never over its image: a masked image token is an input the
        # unpatched model itself refuses (Qwen-VL's rotary index counts unmasked image tokens).
        special = torch.isin(inputs["input_ids"][0], torch.tensor([IMAGE_TOKEN, VISION_START, VISION_END])).nonzero()
        room = int(special[0]) if len(special) else inputs["input_ids"].shape[1] - 1
        inputs["attention_mask"] = inputs["attention_mask"].clone()
        inputs["attention_mask"][0, : min(1 + seed % 2, room)] = 0
    else:
        del inputs["attention_mask"]
    return inputs


@settings(max_examples=property_examples(14), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(VLM_FAMILIES),
    cut=st.integers(1, NUM_LAYERS - 1),
    images=st.booleans(),
    padding=st.booleans(),
    batch=st.integers(1, 3),
    extra=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_vlm_default_signature_any_input_set(family, cut, images, padding, batch, extra, seed):
    """A VLM pipeline built with no example inputs (fxpp makes the example images), called
    with or without images, with or without a padding mask, at other batch and sequence
    sizes than the build's: logits and every gradient (vision tower's included) equal the
    unpatched training forward."""
    pipe = _vlm_pipeline(family, (cut,))
    assert any(n.startswith("pixel_values") for n in pipe.signature.names), pipe.signature
    model, make = _vlm(family)
    inputs = vlm_call_inputs(family, make, batch, extra, images, padding, seed)
    assert_same(reference(model, inputs), run_pipeline(pipe, pipe.model, inputs), atol=ATOL32, rtol=RTOL32,
                what=f"{family} cut={cut} inputs={sorted(inputs)} shape={list(inputs['input_ids'].shape)}")


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_with_and_without_images_in_one_pipeline(family):
    """Built once with no example inputs; called with images, text only and token ids only."""
    model, make = _vlm(family)
    seq = 40 if family == "llava_onevision" else 24  # its tiled images need more tokens
    cut = 1 + zlib.crc32(family.encode()) % (NUM_LAYERS - 1)  # a cut per family, the same every run
    pipe = _vlm_pipeline(family, (cut,))
    with_images = make(2, seq, seed=2)
    text_only = {"input_ids": with_images["input_ids"].clamp(max=50), "attention_mask": with_images["attention_mask"]}
    for inputs in (with_images, text_only, {"input_ids": text_only["input_ids"]}, with_images):
        assert_same(reference(model, inputs), run_pipeline(pipe, pipe.model, inputs), atol=ATOL32, rtol=RTOL32,
                    what=f"{family} inputs={sorted(inputs)}")


# -- on 2 gloo ranks ---------------------------------------------------------------
def _grad_report(stage, ref) -> dict:
    report = {}
    for name, p in stage.submod.named_parameters():
        g_ref = ref.get_parameter(name).grad
        if p.grad is None and g_ref is None:
            continue
        report[name] = "missing" if p.grad is None or g_ref is None else float((p.grad - g_ref).abs().max())
    return report


def token_ids_only_rank(rank, world, workdir):
    """Plain pretraining: a pipeline built with no example inputs, stepped on token ids alone."""
    model = cached_model("llama", NUM_LAYERS).train()
    pipe = fxpp.pipeline(model, world)
    stage = pipe.build_stage(rank, "cpu")
    ids = make_inputs(4, 8, seed=11)["input_ids"]
    loss_fn = fxpp.causal_lm_loss(ids, 2)
    schedule = make_schedule("1F1B", [stage], 2, loss_fn)
    losses = []
    if rank == 0:
        schedule.step(input_ids=ids)
    else:
        schedule.step(target=ids, losses=losses)
    ref = cached_model("llama", NUM_LAYERS)
    ref.zero_grad(set_to_none=True)
    # The same microbatches, losses and scaling as the schedule (see tests/test_runtime.py).
    for chunk in ids.chunk(2):
        (loss_fn(ref(input_ids=chunk, use_cache=False).logits, chunk) / 2).backward()
    report = {"loss_diff": None, "grads": _grad_report(stage, ref)}
    if stage.is_last:
        ref_loss = sum(float(loss_fn(ref(input_ids=c, use_cache=False).logits, c)) for c in ids.chunk(2)) / 2
        report["loss_diff"] = abs(float(loss_fn.whole_batch(losses)) - ref_loss)
    return report


def vlm_image_presence_rank(rank, world, workdir, family):
    """One step whose microbatch 0 holds no image and microbatch 1 two."""
    model, make = tiny_vlm(family, NUM_LAYERS)
    model.train()
    ref = tiny_vlm(family, NUM_LAYERS)[0].train()
    with_images = make(2, 24, seed=4)
    text_only = {"input_ids": make(2, 24, seed=5)["input_ids"].clamp(max=50),
                 "attention_mask": torch.ones(2, 24, dtype=torch.long)}
    mbs = [text_only, with_images]
    targets = [mb["input_ids"].clamp(max=50) for mb in mbs]
    pipe = fxpp.pipeline(model, world, cuts=[2])  # no example inputs: fxpp makes the example images
    stage = pipe.build_stage(rank, "cpu")
    labels = torch.cat(targets)
    loss_fn = fxpp.causal_lm_loss(labels, 2)
    schedule = make_schedule("1F1B", [stage], 2, loss_fn)
    losses = []
    fxpp.step_with_microbatches(schedule, mbs if rank == 0 else None, targets, losses)
    return microbatch_report(stage, ref, mbs, targets, loss_fn, losses)


def microbatch_report(stage, ref, mbs, targets, loss_fn, losses) -> dict:
    """The step's loss and this rank's gradients against the unpatched model ``ref`` run
    on the same microbatches (each loss over their count, as the schedule scales them)."""
    ref_losses = []
    for mb, target in zip(mbs, targets):
        loss = loss_fn(ref(**mb, use_cache=False).logits, target)
        (loss / len(mbs)).backward()
        ref_losses.append(loss.detach())
    report = {"loss_diff": None, "grads": _grad_report(stage, ref)}
    if stage.is_last:
        report["loss_diff"] = float((loss_fn.whole_batch(losses) - loss_fn.whole_batch(ref_losses)).abs())
    return report


def _check_reports(reports):
    # Same tolerance as the in-process tests (module docstring): the ranks run the same
    # modules on the same microbatches; only the order of float32 sums may differ.
    assert reports[-1]["loss_diff"] is not None and reports[-1]["loss_diff"] < 2e-5, reports[-1]["loss_diff"]
    for rank, r in enumerate(reports):
        assert r["grads"], f"rank {rank} compared no gradient"
        for name, d in r["grads"].items():
            assert d != "missing" and d < 2e-5, f"rank {rank} grad {name}: {d}"


@pytest.mark.timeout(300)
def test_two_ranks_1f1b_on_token_ids_only(tmp_path):
    _check_reports(run_distributed(token_ids_only_rank, 2, tmp_path, timeout_s=240))


@pytest.mark.timeout(300)
def test_two_ranks_1f1b_microbatches_with_and_without_images(tmp_path):
    _check_reports(run_distributed(vlm_image_presence_rank, 2, tmp_path, "qwen2_5_vl", timeout_s=240))


def v_placement_without_style_rank(rank, world, workdir):
    """ZBVZeroBubble with tied embeddings, stages built as API.md spells it: no placement argument."""
    model = tiny_model("qwen2", NUM_LAYERS, tie_word_embeddings=True).train()
    ref = tiny_model("qwen2", NUM_LAYERS, tie_word_embeddings=True).train()
    pipe = fxpp.pipeline(model, 2 * world, cuts=[1, 2, 3])
    stages = [pipe.build_stage(i, "cpu") for i in (rank, 2 * world - 1 - rank)]
    inputs = make_inputs(4, 8, padding="left", seed=3)
    labels = inputs["input_ids"]
    loss_fn = fxpp.causal_lm_loss(labels, 2)
    schedule = make_schedule("ZBVZeroBubble", stages, 2, loss_fn)
    losses = []
    schedule.step(**inputs, target=labels, losses=losses)
    for chunk in range(2):
        mb = {k: v.chunk(2)[chunk] for k, v in inputs.items()}
        (loss_fn(ref(**mb, use_cache=False).logits, labels.chunk(2)[chunk]) / 2).backward()
    grads = {}
    for stage in stages:
        grads.update(_grad_report(stage, ref))
    return {"grads": grads, "tied": "lm_head.weight" in grads or "model.embed_tokens.weight" in grads}


@pytest.mark.timeout(300)
def test_v_placement_is_inferred_from_the_stages_a_rank_builds(tmp_path):
    reports = run_distributed(v_placement_without_style_rank, 2, tmp_path, timeout_s=240)
    assert reports[0]["tied"], "rank 0 holds stages 0 and 3: both copies of the tied embedding"
    for rank, r in enumerate(reports):
        for name, d in r["grads"].items():
            # Tolerance as in _check_reports.
            assert d != "missing" and d < 2e-5, f"rank {rank} grad {name}: {d}"

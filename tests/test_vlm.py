"""Vision-language models: composed stages equal the unpatched model.

Each family is built from a tiny config (``fxpp.testing.zoo.tiny_vlm``) and run on inputs
with real image tokens and pixel values. The stages are traced from one example and
run on another whose image sits at a different offset, so nothing specific to the
example's token positions may be baked into a graph. Logits and every parameter's
gradient are compared, the vision tower's included.

Gemma 4's audio path (``fxpp.testing.zoo.tiny_audio_lm``) is tested the same way, with real
audio placeholder tokens, log-mel-shaped features and clips of different lengths.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

import fxpp
from fxpp.analysis.annotate import info
from fxpp.meta import crossing_of, identity_of
from fxpp.testing.zoo import AUDIO_TOKEN, VLM_FAMILIES, tiny_audio_lm, tiny_vlm

from .helpers import assert_same, reference, run_stages

ATOL32, RTOL32 = 1e-5, 1e-5
NUM_LAYERS = 4
# LLaVA-OneVision's tiled images need more tokens than the others.
SEQ = {"llava_onevision": 40}

VISION_PREFIXES = ("vision_tower", "visual", "multi_modal_projector", "embed_vision", "image_newline")


@functools.lru_cache(maxsize=None)
def _vlm(family: str):
    return tiny_vlm(family, NUM_LAYERS)


def _random_cuts(family: str, seed: int) -> list[int]:
    rng = random.Random(f"{family}-{seed}")
    k = rng.randint(1, NUM_LAYERS - 1)
    return sorted(rng.sample(range(1, NUM_LAYERS), k))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_composed_stages_equal_model(family, seed):
    model, make_inputs = _vlm(family)
    seq = SEQ.get(family, 24)
    cuts = _random_cuts(family, seed)
    example = make_inputs(2, seq, seed=1, offset=2)
    inputs = make_inputs(2, seq, seed=2 + seed)
    pipe = fxpp.pipeline(model, len(cuts) + 1, example_inputs=example, cuts=cuts)
    ref = reference(model, inputs)
    assert any(n.startswith(("model.vision", "model.visual", "model.multi", "model.embed_vision")) for n in ref[1]), \
        "the vision tower must get gradients"
    assert_same(ref, run_stages(pipe.stages, inputs, model), atol=ATOL32, rtol=RTOL32, what=f"{family} cuts={cuts}")


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vision_path_on_first_stage_only(family):
    """The tower, projector and merge live on the first stage; pixel values never cross."""
    model, make_inputs = _vlm(family)
    example = make_inputs(2, SEQ.get(family, 24), seed=1)
    pipe = fxpp.pipeline(model, 3, example_inputs=example, cuts=[1, 3])
    for i, stage in enumerate(pipe.stages):
        names = {n.split(".")[1] for n, _ in stage.named_parameters() if n.startswith("model.")}
        has_vision = any(n in VISION_PREFIXES for n in names)
        assert has_vision == (i == 0), f"stage {i}: {sorted(names)}"
    assert "lm_head.weight" in dict(pipe.stages[-1].named_parameters())
    for crossing in pipe.crossing:
        assert not {"pixel_values", "image_sizes", "image_position_ids"} & set(crossing), crossing


def test_qwen3_vl_deepstack_features_cross_cuts_densely():
    """Deepstack features are added into layers 0 and 1; a cut at 1 sends layer 1's as a
    dense ``[B, S, H]`` tensor (zeros off the image tokens), so no received shape follows
    the microbatch's image count."""
    model, make_inputs = _vlm("qwen3_vl")
    example = make_inputs(2, 24, seed=1)
    pipe = fxpp.pipeline(model, 2, example_inputs=example, cuts=[1])
    received = {crossing_of(n): tuple(n.meta["val"].shape)
                for n in pipe.stages[1].graph.nodes if n.op == "placeholder"}
    batch, seq = example["input_ids"].shape
    hidden = model.config.text_config.hidden_size
    dense = [name for name in received if name.startswith("scatter_rows")]
    assert len(dense) == 1 and received[dense[0]] == (batch, seq, hidden), received
    assert all(shape[:2] == (batch, seq) for shape in received.values()), received
    # The dense tensor holds exactly the features at the image tokens.
    outputs = pipe.stages[0](**example)
    _, got = pipe.stages[1].in_layout.unpack(outputs, "test")  # the received values by identity
    (sent,) = [got[identity_of(n)] for n in pipe.stages[1].graph.nodes
               if n.op == "placeholder" and crossing_of(n) == dense[0]]
    image = example["input_ids"] == model.config.image_token_id
    assert torch.count_nonzero(sent[~image]) == 0 and torch.count_nonzero(sent[image]) > 0


def test_tracing_leaves_no_side_channel_on_the_model():
    """Qwen-VL's forward writes ``self.rope_deltas``; tracing must not leave a Proxy there."""
    model, make_inputs = _vlm("qwen2_5_vl")
    before = model.model.rope_deltas
    fxpp.pipeline(model, 2, example_inputs=make_inputs(2, 24, seed=1), cuts=[2])
    assert model.model.rope_deltas is before


def test_data_dependent_vision_on_meta_device_names_model_and_line():
    """Split sizes computed from tensor data need real example values."""
    model, make_inputs = _vlm("mistral3")
    with torch.device("meta"):
        meta_model = type(model)(model.config)
    example = {k: v.to("meta") for k, v in make_inputs(2, 24, seed=1).items()}
    with pytest.raises(fxpp.TraceError, match=r"Mistral3ForConditionalGeneration: .* depends on tensor data .*meta device"):
        fxpp.pipeline(meta_model, 2, example_inputs=example, cuts=[2])


# -- Gemma 4's audio path --------------------------------------------------------------
AUDIO_PREFIXES = ("audio_tower", "embed_audio")
AUDIO_INPUTS = {"input_features", "input_features_mask"}


@functools.lru_cache(maxsize=None)
def _audio_lm():
    return tiny_audio_lm(NUM_LAYERS)


def _audio_counts(inputs) -> list[int]:
    return (inputs["input_ids"] == AUDIO_TOKEN).sum(-1).tolist()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("image", [False, True], ids=["audio", "audio+image"])
def test_gemma4_audio_composed_stages_equal_model(image, seed):
    """Traced with one clip length and offset, run with others (more frames, batch 3)."""
    model, make_inputs = _audio_lm()
    cuts = _random_cuts(f"gemma4_audio-{image}", seed)
    example = make_inputs(2, 24, seed=1, offset=2, image=image)
    inputs = make_inputs(2 + seed, 24 + 4 * seed, seed=4 + seed, frames=20 + 4 * seed, image=image)
    assert _audio_counts(inputs)[:2] != _audio_counts(example), "the clips must differ from the example's"
    pipe = fxpp.pipeline(model, len(cuts) + 1, example_inputs=example, cuts=cuts)
    ref = reference(model, inputs)
    for prefix in ("model.audio_tower.", "model.embed_audio.") + (("model.vision_tower.",) if image else ()):
        assert any(n.startswith(prefix) for n in ref[1]), f"{prefix} must get gradients"
    assert_same(ref, run_stages(pipe.stages, inputs, model), atol=ATOL32, rtol=RTOL32,
                what=f"gemma4 audio image={image} cuts={cuts}")


def test_gemma4_audio_path_on_first_stage_only():
    """The audio tower and its embedder are ``audio`` nodes of the first stage; features never cross."""
    model, make_inputs = _audio_lm()
    pipe = fxpp.pipeline(model, 3, example_inputs=make_inputs(2, 24, seed=1, image=True), cuts=[1, 3])
    for i, stage in enumerate(pipe.stages):
        names = {n.split(".")[1] for n, _ in stage.named_parameters() if n.startswith("model.")}
        assert any(n in AUDIO_PREFIXES for n in names) == (i == 0), f"stage {i}: {sorted(names)}"
        placeholders = {n.target for n in stage.graph.nodes if n.op == "placeholder"}
        assert (AUDIO_INPUTS <= placeholders) if i == 0 else not (AUDIO_INPUTS & placeholders), (i, placeholders)
    roles = {n.target: info(n) for n in pipe.stages[0].graph.nodes
             if n.op == "call_module" and n.target.startswith(tuple("model." + p for p in AUDIO_PREFIXES))}
    assert set(roles) == {"model.audio_tower", "model.embed_audio"}, roles
    assert all(r.role == "audio" and r.position == -1 for r in roles.values()), roles
    for crossing in pipe.crossing:
        assert not AUDIO_INPUTS & set(crossing), crossing


def test_gemma4_audio_balanced_split():
    """Without explicit cuts the cost model counts the audio tower into the prelude."""
    model, make_inputs = _audio_lm()
    example = make_inputs(2, 24, seed=1)
    pipe = fxpp.pipeline(model, 2, example_inputs=example)
    tower = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.audio_tower."))
    assert pipe.block_costs[0].params >= tower
    inputs = make_inputs(2, 24, seed=4)
    assert_same(reference(model, inputs), run_stages(pipe.stages, inputs, model), atol=ATOL32, rtol=RTOL32,
                what="gemma4 audio balanced")

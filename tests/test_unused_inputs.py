"""No input the caller gives may vanish from the graph (``fxpp.inputs.unused``).

The rule found two tracer bugs, both an old argument name that the forward's
``deprecate_kwarg`` decorator renames (``image_patches`` and ``pixel_values_images`` to
``pixel_values``): the tracer used to drop every decorator but the plumbing ones' it
knew by name, so the old name reached a parameter the forward never reads and the
images were silently ignored (Fuyu's logits were those of the text alone). These tests
check the rule on hand-built graphs and those two families against the unpatched model.
"""

from __future__ import annotations

import functools
import operator

import pytest
import torch
from torch.fx import Graph, GraphModule

import fxpp
from fxpp import ops
from fxpp.errors import StageInputError
from fxpp.model_facts import select_output, unwrap_forward
from fxpp.trace import trace_model
from fxpp.inputs.unused import reject_unconsumed_inputs, tolerated_reason, unconsumed_inputs
from fxpp.testing.zoo import tiny_model, tiny_vlm

# The traced graph calls the model's own modules with the same kernels in the same
# order, in float32 on the CPU: results are bitwise equal in practice (0.0 measured).
# 1e-6 leaves room for a reassociated reduction and is five orders of magnitude below
# what the bugs did (0.5 to 1.0 on these models).
ATOL = 1e-6
# Dropping the images must change the logits by far more than ATOL, or the comparison
# could not tell the bug from the fix.
MEDIA_EFFECT = 1e-2


def _llama(**inputs_over):
    model = tiny_model("llama", 2).eval()
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, **inputs_over}
    return model, inputs, trace_model(model, inputs)


def _add_placeholder(gm: GraphModule, name: str):
    first = next(iter(gm.graph.nodes))
    with gm.graph.inserting_before(first):
        return gm.graph.placeholder(name)


# -- the rule on hand-built graphs -------------------------------------------------------

def test_text_inputs_are_consumed_even_where_they_change_nothing():
    # An all-ones mask and default positions change nothing for this call, but both feed
    # the mask builder and the rotary embedding: consumed.
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    _, inputs, gm = _llama(attention_mask=torch.ones_like(ids), position_ids=torch.arange(8).expand(2, 8))
    assert unconsumed_inputs(gm, set(inputs)) == []
    reject_unconsumed_inputs("LlamaForCausalLM", gm, set(inputs))


def test_placeholder_without_users_is_rejected():
    _, inputs, gm = _llama()
    _add_placeholder(gm, "pixel_values")
    given = {*inputs, "pixel_values"}
    assert unconsumed_inputs(gm, given) == ["pixel_values"]
    with pytest.raises(StageInputError) as err:
        reject_unconsumed_inputs("LlamaForCausalLM", gm, given)
    message = str(err.value)
    assert "LlamaForCausalLM" in message and "'pixel_values'" in message
    assert "does not use it" in message and "silently ignore" in message


def test_readers_that_lead_nowhere_do_not_consume():
    # A placeholder read only by nodes that do not reach the output: a guard on its
    # shape, and a value computed and dropped.
    _, inputs, gm = _llama()
    extra = _add_placeholder(gm, "extra")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        size = gm.graph.call_method("size", (extra, 1))
        gm.graph.call_function(ops.check_guard, (size, 8, "here"))
        gm.graph.call_method("sum", (extra,))
    assert unconsumed_inputs(gm, {*inputs, "extra"}) == ["extra"]


def test_given_name_without_placeholder_is_unconsumed():
    _, inputs, gm = _llama()
    assert unconsumed_inputs(gm, {*inputs, "labels", "image_patches"}) == ["image_patches", "labels"]


def test_several_inputs_are_named_together():
    _, inputs, gm = _llama()
    _add_placeholder(gm, "a")
    _add_placeholder(gm, "b")
    with pytest.raises(StageInputError, match=r"inputs 'a', 'b' are given"):
        reject_unconsumed_inputs("LlamaForCausalLM", gm, {*inputs, "a", "b"})


def test_attention_mask_is_tolerated_only_where_no_mask_is_built():
    # A model that builds masks (a masking_utils node) and drops attention_mask: rejected.
    _, inputs, gm = _llama()
    _add_placeholder(gm, "attention_mask")
    assert tolerated_reason(gm, "attention_mask") is None
    with pytest.raises(StageInputError, match="attention_mask"):
        reject_unconsumed_inputs("LlamaForCausalLM", gm, {*inputs, "attention_mask"})
    # No mask builder at all (a recurrent model; CPM-Ant's own span mask): tolerated.
    graph = Graph()
    ids = graph.placeholder("input_ids")
    graph.placeholder("attention_mask")
    graph.output(graph.call_function(operator.mul, (ids, 2)))
    plain = GraphModule(torch.nn.Module(), graph)
    assert unconsumed_inputs(plain, {"input_ids", "attention_mask"}) == ["attention_mask"]
    assert tolerated_reason(plain, "attention_mask") is not None
    reject_unconsumed_inputs("xLSTMForCausalLM", plain, {"input_ids", "attention_mask"})


def test_gemma4_token_types_switched_off_by_config_are_tolerated():
    # Gemma 4 reads mm_token_type_ids only with use_bidirectional_attention == "vision";
    # the unpatched model ignores them here too.
    model, make_inputs = tiny_vlm("gemma4", 2)
    inputs = make_inputs(2, 24, seed=2)
    assert "mm_token_type_ids" in inputs
    gm = trace_model(model, inputs)
    assert unconsumed_inputs(gm, set(inputs)) == ["mm_token_type_ids"]
    reject_unconsumed_inputs(type(model).__name__, gm, set(inputs))


# -- the tracer keeps decorators that change what a forward computes ---------------------

def _wrapper_kinds(fn) -> list[str]:
    kinds = []
    while fn is not None:
        kinds.append(fn.__code__.co_qualname.split(".<locals>")[0])
        fn = getattr(fn, "__wrapped__", None)
    return kinds


def test_unwrap_forward_keeps_renaming_and_config_defaults():
    import transformers

    kinds = _wrapper_kinds(unwrap_forward(transformers.VideoLlavaModel.forward))
    assert "deprecate_kwarg" in kinds and "merge_with_config_defaults" in kinds
    assert "can_return_tuple" not in kinds  # plumbing stays peeled
    assert kinds[-1] == "VideoLlavaModel.forward"


# -- the two families the rule caught ---------------------------------------------------

@functools.lru_cache(maxsize=None)
def _generic(model_type: str):
    from fxpp.testing.sweep_vlm import generic_model

    return generic_model(model_type)


def _fuyu_inputs(model, name: str) -> dict:
    # Fuyu has no vision tower: a linear embedding of raw patches [rows, patches, p*p*C]
    # fills the image tokens, one per patch.
    config = model.config
    g = torch.Generator().manual_seed(0)
    n = 4
    ids = torch.randint(3, 120, (2, n + 6), generator=g)
    ids[:, 2:2 + n] = config.image_token_id
    patches = torch.randn(2, n, config.patch_size ** 2 * config.num_channels, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), name: patches}


def _video_llava_inputs(model, *, videos: bool) -> dict:
    from fxpp.testing.sweep_vlm import generic_inputs

    inputs, _ = generic_inputs(model, seed=2)  # images: pixel_values and their image tokens
    out = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
           "pixel_values_images": inputs["pixel_values"]}  # the old name deprecate_kwarg renames
    if videos:
        g = torch.Generator().manual_seed(1)
        clips = torch.randn(2, 1, *inputs["pixel_values"].shape[1:], generator=g)  # one frame each
        with torch.no_grad():
            n = model.model.get_video_features(pixel_values_videos=clips).pooler_output.shape[1]
        tokens = torch.full((2, n), model.config.video_token_index)
        out["input_ids"] = torch.cat([out["input_ids"], tokens], 1)
        out["attention_mask"] = torch.cat([out["attention_mask"], torch.ones_like(tokens)], 1)
        out["pixel_values_videos"] = clips
    return out


def _check_matches_model(model, inputs: dict, media: list[str]) -> None:
    with torch.no_grad():
        want = model(**inputs, use_cache=False).logits
        without = model(**{k: v for k, v in inputs.items() if k not in media}, use_cache=False).logits
        assert (want - without).abs().max() > MEDIA_EFFECT, "the media inputs must matter for this check to mean anything"
        gm = trace_model(model, inputs)
        assert unconsumed_inputs(gm, set(inputs)) == []
        full = select_output(fxpp.transform(model, "full", example_inputs=inputs)(**inputs))
        torch.testing.assert_close(full, want, atol=ATOL, rtol=0)
        two = select_output(fxpp.pipeline(model, 2, example_inputs=inputs)(**inputs))
        torch.testing.assert_close(two, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["image_patches", "pixel_values"])
def test_fuyu_images_reach_the_logits(name):
    model = _generic("fuyu")
    _check_matches_model(model, _fuyu_inputs(model, name), [name])


@pytest.mark.parametrize("videos", [False, True], ids=["images", "images+videos"])
def test_video_llava_images_reach_the_logits(videos):
    model = _generic("video_llava")
    # the generic tiny config moves only the image token into the tiny vocabulary
    model.config.video_token_index = 126
    inputs = _video_llava_inputs(model, videos=videos)
    _check_matches_model(model, inputs, ["pixel_values_images"])


# -- inputs the unpatched model itself ignores -------------------------------------------


def test_an_input_the_model_reads_is_not_declared_ignored():
    """Llama reads position_ids (rotary embeddings): changing them moves the logits, so an
    unconsumed position_ids would stay an error."""
    from fxpp.inputs.unused import ignored_by_the_model

    model, inputs, _ = _llama()
    inputs["position_ids"] = torch.arange(8).expand(2, 8).clone()
    assert ignored_by_the_model(model, inputs, ["position_ids"]) == set()


def test_an_input_the_model_ignores_is_tolerated_and_the_pipeline_is_exact():
    """GraniteMoeHybrid without rotary embeddings takes position_ids and ignores them
    (its masks do not read them either): the graph does not consume them, the model's
    logits do not move when they change, so the build accepts them, and packed
    positions give exactly the unpatched result."""
    from fxpp.testing.sweep_causal import _build
    from fxpp.inputs.unused import ignored_by_the_model

    model = _build("granitemoehybrid", "GraniteMoeHybridForCausalLM", 64_000_000)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 1]])
    assert ignored_by_the_model(model, {"input_ids": ids, "position_ids": pos}, ["position_ids"]) == {"position_ids"}
    pipe = fxpp.pipeline(model, 2, cuts=[1])
    want = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(pipe(input_ids=ids, position_ids=pos), want, atol=ATOL, rtol=0)


def test_no_check_without_real_values():
    """On the meta device nothing can be run: an unconsumed input stays an error."""
    from fxpp.inputs.unused import ignored_by_the_model

    with torch.device("meta"):
        model = tiny_model("llama", 2)
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    assert ignored_by_the_model(model, {"input_ids": ids, "position_ids": ids}, ["position_ids"]) == set()

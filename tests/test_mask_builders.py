"""A mask builder that returns no mask for a call's inputs: the forward sees None, as at run time."""

import torch

import fxpp
from fxpp.meta import signature_record
from fxpp.testing.check import compare, reference, run_pipeline


def test_a_forward_that_builds_its_own_mask_when_the_builder_returns_none():
    """GLM-5 Next: ``create_recurrent_attention_mask`` returns None without a padding mask and the
    forward then makes an all-ones mask itself (``if attention_mask is None``); fxpp's stages
    must take that branch too, with a guard that re-checks the builder's None on every call."""
    from fxpp.testing.sweep_vlm import generic_model

    model = generic_model("glm5_next")
    ids = torch.randint(3, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    pipe = fxpp.pipeline(model, 2, example_inputs={"input_ids": ids[:, :8], "attention_mask": mask[:, :8]})
    # The trace for token ids alone (no padding mask): the builder's None is a guarded constant.
    ids_only = signature_record(pipe.model_graph).variant_graphs[pipe.signature.bits(["input_ids"])]
    assert any(n.target is fxpp.ops.check_is_none for n in ids_only.graph.nodes), "the builder's None is not guarded"
    # An all-ones mask: on real data the builder returns None, so the forward builds its own
    # mask; the stages (traced with a padded mask, which they cast) must retrace on that branch
    # (the check_is_not_none guard), not cast a None or pass it on.
    ones = torch.ones_like(ids)
    for inputs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask},
                   {"input_ids": ids, "attention_mask": ones}, {"input_ids": ids, "attention_mask": mask}):
        # compare: logits and every gradient, at the sweep's float32 tolerances (fxpp.testing.check)
        ok, detail, _ = compare(reference(model, inputs), run_pipeline(pipe, model, inputs))
        assert ok, f"{sorted(inputs)}: {detail}"
    assert any(n.target is fxpp.ops.check_is_not_none for n in pipe.stages[1].graph.nodes), \
        "the padded trace casts the mask: its builder's mask must be guarded"


def test_a_mask_builder_is_asked_on_real_data():
    """Fake tensors cannot see that a mask is all ones; the trace asks the builder on the real
    example and follows the branch the run takes: None, guarded."""
    from fxpp.testing.sweep_vlm import generic_model
    from fxpp.compile import compile_example as trace_annotated

    model = generic_model("glm5_next")
    ids = torch.randint(3, 60, (2, 8), generator=torch.Generator().manual_seed(1))
    gm = trace_annotated(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    guards = [n for n in gm.graph.nodes if n.target is fxpp.ops.check_is_none]
    assert guards and all(g.args[0].meta["val"] is None for g in guards)


def test_the_not_none_guard_fails_on_none():
    import pytest

    fxpp.ops.check_is_not_none(torch.ones(2), "here")
    with pytest.raises(fxpp.ops.GuardFailure, match="here: traced with 'a mask', called with None"):
        fxpp.ops.check_is_not_none(None, "here")


def test_the_none_guard_fails_on_a_mask():
    import pytest

    fxpp.ops.check_is_none(None, "here")
    with pytest.raises(fxpp.ops.GuardFailure, match="here: traced with None, called with 'Tensor'"):
        fxpp.ops.check_is_none(torch.ones(2), "here")


def test_a_mask_decided_on_the_first_stage_is_rechecked_on_every_stage():
    """GPT-BigCode has no rotary embeddings: without a padding mask, nothing after the first
    layer needs the position ids, and for the example's plain positions the mask builder
    returns None. Packed positions make it return a mask; the first stage retraces on its
    guard, and the last stage must notice too (the guard and the builder's inputs cross
    every cut), not run its layers unmasked with the variant traced for plain positions."""
    from fxpp.testing.check import packed_positions
    from fxpp.testing.sweep_causal import _build

    model = _build("gpt_bigcode", "GPTBigCodeForCausalLM", 64_000_000)
    pipe = fxpp.pipeline(model, 2, cuts=[1])
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(2))
    packed = {"input_ids": ids, "position_ids": packed_positions(12, [[5], [7, 10]])}
    for inputs in ({"input_ids": ids}, packed, {"input_ids": ids}, packed):
        # compare: logits and every gradient, at the sweep's float32 tolerances (fxpp.testing.check)
        ok, detail, _ = compare(reference(model, inputs), run_pipeline(pipe, model, inputs))
        assert ok, f"{sorted(inputs)}: {detail}"
    # The last stage's variant for token ids alone re-checks the builder's None itself.
    last = pipe.stages[1]._fxpp_variants[pipe.signature.bits(["input_ids"])][0]
    assert any(n.target is fxpp.ops.check_is_none for n in last.graph.nodes)

"""Composed stages equal the unpatched model: logits and every parameter gradient.

Property tests over families, layer counts, cut points, batch and sequence sizes,
padding sides and explicit position ids. The stages are built from example inputs of
a *different* shape than the ones they run on, so shape-generic graphs (and the
retrace when a traced shape decision no longer holds) are exercised every time.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import fxpp
from fxpp.testing.zoo import FAMILIES

from .helpers import assert_same, cached_model, make_inputs, reference, run_stages

# fp32: the stages call the same modules with the same arguments in the same order
# as the model, so logits agree to rounding of reordered gradient accumulation at most.
ATOL32, RTOL32 = 1e-5, 1e-5


@st.composite
def cases(draw, families=FAMILIES):
    family = draw(st.sampled_from(families))
    num_layers = draw(st.integers(2, 6))
    num_cuts = draw(st.integers(0, min(3, num_layers - 1)))
    cuts = sorted(draw(st.lists(st.integers(1, num_layers - 1), min_size=num_cuts, max_size=num_cuts, unique=True)))
    batch = draw(st.integers(1, 3))
    seq = draw(st.integers(1, 32))
    padding = draw(st.sampled_from(["none", "left", "right"]))
    position_ids = draw(st.booleans())
    return family, num_layers, cuts, batch, seq, padding, position_ids


def _check(family, num_layers, cuts, batch, seq, padding, position_ids):
    model = cached_model(family, num_layers)
    inputs = make_inputs(batch, seq, padding=padding, position_ids=position_ids, seed=seq)
    example = make_inputs(2, 7, padding="left", position_ids=position_ids, seed=1)
    pipe = fxpp.pipeline(model, len(cuts) + 1, example_inputs=example, cuts=cuts)
    ref = reference(model, inputs)
    got = run_stages(pipe.stages, inputs, model)
    assert_same(ref, got, atol=ATOL32, rtol=RTOL32, what=f"{family} L={num_layers} cuts={cuts} {batch}x{seq} {padding}")


@given(cases())
def test_composed_stages_equal_model(case):
    _check(*case)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_with_padding_and_cuts(family):
    _check(family, 4, [1, 3], 2, 9, "left", False)


@pytest.mark.parametrize("family", ["gemma4", "gemma3", "mistral"])
@pytest.mark.parametrize("seq", [1, 2, 5, 17])
def test_sliding_window_smaller_and_larger_than_sequence(family, seq):
    _check(family, 4, [2], 2, seq, "right", True)


@pytest.mark.heavy  # a property over Gemma 4's kv-sharing cuts (about 25 s): the README's second test command
@given(cut=st.integers(1, 5), seq=st.integers(1, 16))
def test_gemma4_cuts_between_kv_store_and_readers(cut, seq):
    """Gemma 4 with per-layer inputs and num_kv_shared_layers=3 of 6: the layers that
    store shared KV (2 and 3) and the ones that read it (3..5) land on different stages."""
    model = cached_model("gemma4", 6)
    assert model.config.num_kv_shared_layers == 3 and model.config.hidden_size_per_layer_input > 0
    inputs = make_inputs(2, seq, padding="left", seed=seq)
    pipe = fxpp.pipeline(model, 2, cuts=[cut])
    assert_same(reference(model, inputs), run_stages(pipe.stages, inputs, model), atol=ATOL32, rtol=RTOL32)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma4", "mixtral"])
def test_bf16(family):
    """bf16 stages run exactly the model's kernels on the same tensors in the same
    order; the only freedom is the order in which a parameter's gradient contributions
    are summed (a weight used on two paths). One bf16 ulp at the gradients' scale,
    2**-7 relative, bounds that."""
    model = cached_model(family, 4, torch.bfloat16)
    inputs = make_inputs(2, 12, padding="left")
    pipe = fxpp.pipeline(model, 3, cuts=[1, 3])
    ref = reference(model, inputs)
    got = run_stages(pipe.stages, inputs, model)
    torch.testing.assert_close(got[0], ref[0], atol=0, rtol=0)
    assert_same(ref, got, atol=1e-3, rtol=2**-7, what=f"{family} bf16")


def test_transform_stages_compose_like_pipeline():
    model = cached_model("qwen3", 5)
    inputs = make_inputs(3, 11, padding="right")
    stages = [
        fxpp.transform(model, "first", range(0, 2)),
        fxpp.transform(model, fxpp.StageRole.MIDDLE, range(2, 3)),
        fxpp.transform(model, "middle", range(3, 4)),
        fxpp.transform(model, "last", range(4, 5)),
    ]
    assert_same(reference(model, inputs), run_stages(stages, inputs, model), atol=ATOL32, rtol=RTOL32)


def test_full_stage_equals_model_and_base_model_returns_hidden_states():
    model = cached_model("llama", 3)
    inputs = make_inputs(2, 6, padding="left")
    full = fxpp.transform(model, "full")
    torch.testing.assert_close(full(**inputs), model(**inputs).logits, atol=0, rtol=0)
    base = model.model
    stages = [fxpp.transform(base, "first", range(0, 1)), fxpp.transform(base, "last", range(1, 3))]
    out = stages[1](*stages[0](**inputs))
    torch.testing.assert_close(out, base(**inputs).last_hidden_state, atol=0, rtol=0)

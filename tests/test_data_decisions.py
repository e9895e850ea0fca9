"""Python decisions on tensor data (``if mask.any():``): taken on the example's real values,
guarded with ``check_data`` on every stage, retraced where a call's data decides otherwise."""

from __future__ import annotations

import pytest
import torch

import fxpp
from fxpp.testing.check import compare, reference, run_pipeline
from fxpp.testing.sweep_vlm import tiny_family, vlm_cases


def test_ovis2_visual_indicator_tokens_present_or_not():
    """Ovis 2 writes its visual indicator features ``if mask.any()`` (data): a batch with
    images takes that branch, a text-only batch the other; both equal the unpatched model."""
    model, inputs, kind = tiny_family("ovis2")
    pipe = fxpp.pipeline(model, 2, cuts=[1])
    assert any(n.target is fxpp.ops.check_data for n in pipe.stages[0].graph.nodes), "the decision is not guarded"
    cases = {c.name: c.inputs for c in vlm_cases(model, kind, inputs)}
    for name in ("images", "text", "images", "ids"):
        # compare: logits and every gradient, at the sweep's float32 tolerances (fxpp.testing.check)
        ok, detail, _ = compare(reference(model, cases[name]), run_pipeline(pipe, model, cases[name]))
        assert ok, f"{name}: {detail}"


def test_a_data_guard_fails_when_the_data_decides_otherwise():
    fxpp.ops.check_data(torch.tensor(True), True, "here")
    with pytest.raises(fxpp.ops.GuardFailure, match="here: traced with True, called with False"):
        fxpp.ops.check_data(torch.tensor(False), True, "here")


def test_on_the_meta_device_a_data_decision_is_refused_by_name():
    from fxpp.trace import UntraceableCode, trace_model

    model, inputs, _ = tiny_family("ovis2")
    meta = {k: v.to("meta") for k, v in inputs.items()}
    with torch.device("meta"):
        meta_model = type(model)(model.config)
    with pytest.raises(UntraceableCode, match=r"Python control flow depends on tensor data at .*modeling_ovis2.py"
                       r".*only on real example values \(not on the meta device\)"):
        trace_model(meta_model, meta)


def test_a_later_stage_that_cannot_take_the_senders_branch_refuses_without_retracing_forever():
    """A decision on computed data (the embeddings' sum) is re-checked on the last stage, which
    can only retrace from the inputs it receives; when that retrace takes the other branch, the
    call is refused by name and no failing graph is kept (each call would trace again)."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    from fxpp.testing.zoo import tiny_model

    model = tiny_model("llama", 2).eval()

    class DataDependent(type(model.model)):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
            h = self.embed_tokens(input_ids)
            if h.sum() > 0:
                h = h * 2
            for layer in self.layers:
                h = layer(h, attention_mask=None, position_embeddings=self.rotary_emb(h, torch.arange(h.shape[1])[None]))
            return BaseModelOutputWithPast(last_hidden_state=self.norm(h))

    model.model.__class__ = DataDependent
    rows = model.model.embed_tokens.weight.sum(-1)
    example = torch.nonzero(rows < 0).flatten()[:6].expand(2, 6)  # the example decides False
    flipped = torch.nonzero(rows > 0).flatten()[:6].expand(2, 6)
    first = fxpp.transform(model, "first", range(0, 1), example_inputs={"input_ids": example})
    last = fxpp.transform(model, "last", range(1, 2), example_inputs={"input_ids": example})
    with torch.no_grad():
        torch.testing.assert_close(last(*first(input_ids=example)), model(input_ids=example, use_cache=False).logits,
                                   atol=0, rtol=0)  # the same modules on the same values
        for _ in range(2):
            with pytest.raises(fxpp.StageInputError, match=r"last stage layers range\(1, 2\): traced again for this "
                               r"call .* the new graph's own check fails on it"):
                last(*first(input_ids=flipped))
    assert sum(len(v) for v in last._fxpp_variants.values()) <= 1, "a failing graph was kept"


def test_a_decision_on_a_scalar_read_from_data_is_rechecked_on_the_later_stage():
    """``k = (ids == 5).sum().item()`` before the layers, ``if k > 0:`` after them: the last
    stage takes the decision, so it recomputes ``k`` and re-checks it (a Python int cannot
    cross a cut; the tensor it was read from does)."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    from fxpp.testing.zoo import tiny_model

    model = tiny_model("llama", 2).eval()

    class DataDependent(type(model.model)):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
            h = self.embed_tokens(input_ids)
            k = (input_ids == 5).sum().item()
            for layer in self.layers:
                h = layer(h, attention_mask=None, position_embeddings=self.rotary_emb(h, torch.arange(h.shape[1])[None]))
            h = self.norm(h)
            if k > 0:
                h = h * 2
            return BaseModelOutputWithPast(last_hidden_state=h)

    model.model.__class__ = DataDependent
    with_five = torch.full((2, 8), 7)
    with_five[0, 3] = 5
    first = fxpp.transform(model, "first", range(0, 1), example_inputs={"input_ids": with_five})
    last = fxpp.transform(model, "last", range(1, 2), example_inputs={"input_ids": with_five})
    assert any(n.target is fxpp.ops.check_data for n in last.graph.nodes), "the last stage does not re-check k"
    with torch.no_grad():
        for ids in (torch.full((2, 8), 7), with_five):  # decides False, then True
            torch.testing.assert_close(last(*first(input_ids=ids)), model(input_ids=ids, use_cache=False).logits,
                                       atol=0, rtol=0)  # the same modules on the same values: bit-identical

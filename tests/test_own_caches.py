"""Key/value caches a forward creates itself (Note [own caches] in ``fxpp.trace.caches``).

XLM's forward builds an ``EncoderDecoderCache`` even with ``use_cache=False`` and each
attention layer writes its keys into its own slot and reads them back. fxpp gives every
layer call an empty copy (``fxpp.ops.fresh_cache``) once the trace shows that no slot is
used by two calls; otherwise it refuses, naming the nodes.
"""

from __future__ import annotations

import functools

import pytest
import torch

import fxpp
from fxpp import ops
from fxpp.errors import TraceError
from fxpp.testing.check import compare, make_inputs, reference, run_pipeline
from fxpp.testing.tiny import tiny_config
from fxpp.trace import trace_model
from fxpp.trace.caches import OwnCache, is_kv_cache


def _xlm(num_layers: int = 4, causal: bool = False):
    from transformers import AutoModelForCausalLM

    config = tiny_config("xlm")
    config.n_layers, config.causal = num_layers, causal
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _peeking_attention():
    """An XLM attention that also reads layer 0's slot: in the unpatched model it sees
    layer 0's keys (a nonzero length); an empty cache of its own would show 0."""
    from transformers.models.xlm.modeling_xlm import MultiHeadAttention

    class PeekingAttention(MultiHeadAttention):
        def forward(self, input, mask, kv=None, cache=None, output_attentions=False, **kwargs):
            out = super().forward(input, mask, kv=kv, cache=cache, output_attentions=output_attentions, **kwargs)
            seen = cache.self_attention_cache.get_seq_length(0)  # layer 0's slot
            return (out[0] * (1 + seen),) + out[1:]

    return PeekingAttention


def _attr(gm, target: str):
    return functools.reduce(getattr, target.split("."), gm)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cuts", [[1], [2], [1, 2, 3]])
def test_xlm_stages_equal_the_unpatched_model(causal, cuts):
    model = _xlm(causal=causal)
    pipe = fxpp.pipeline(model, len(cuts) + 1, cuts=cuts)
    for inputs in (make_inputs(2, 9, seed=1), {"input_ids": make_inputs(2, 12, seed=2)["input_ids"]}):
        same, detail, _ = compare(reference(model, inputs), run_pipeline(pipe, model, inputs))
        assert same, f"cuts {cuts}: {detail}"


def test_every_attention_call_gets_its_own_empty_cache():
    model = _xlm()
    gm = trace_model(model, make_inputs(2, 9, seed=1))
    fresh = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ops.fresh_cache]
    assert [[u.target for u in n.users] for n in fresh] == [[f"transformer.attentions.{i}"] for i in range(4)]
    for n in fresh:
        (template,) = n.args
        assert template.op == "get_attr" and isinstance(_attr(gm, template.target), ops.CacheTemplate)
        cache = ops.fresh_cache(_attr(gm, template.target))
        assert cache.get_seq_length() == 0 and cache is not ops.fresh_cache(_attr(gm, template.target))
    # no cache is a graph constant itself: every call's keys would stay in it
    assert not any(is_kv_cache(_attr(gm, n.target)) for n in gm.graph.nodes if n.op == "get_attr")


def test_a_layer_reading_another_layers_slot_is_refused(monkeypatch):
    model = _xlm(num_layers=2)
    model.transformer.attentions[1].__class__ = _peeking_attention()
    inputs = make_inputs(2, 9, seed=1)
    with pytest.raises(TraceError) as e:
        fxpp.pipeline(model, 2, cuts=[1])
    assert ("node transformer_attentions_1 (transformer.attentions.1) uses slot 0 of self_attention_cache "
            "(EncoderDecoderCache), which node transformer_attentions_0 (transformer.attentions.0) used before it"
            in str(e.value))
    # the refusal is what stands between the user and a wrong number: without the watch
    # the second layer would see an empty slot 0
    monkeypatch.setattr(OwnCache, "touch", lambda self, path, slots: None)
    pipe = fxpp.pipeline(model, 2, cuts=[1])
    same, detail, _ = compare(reference(model, inputs), run_pipeline(pipe, model, inputs))
    assert not same, detail


def test_a_layer_writing_a_flag_all_layers_share_is_refused():
    from transformers.models.xlm.modeling_xlm import MultiHeadAttention

    class FlaggingAttention(MultiHeadAttention):
        def forward(self, input, mask, kv=None, cache=None, output_attentions=False, **kwargs):
            cache.is_updated[self.layer_id] = True  # what a cross-attention layer does
            return super().forward(input, mask, kv=kv, cache=cache, output_attentions=output_attentions, **kwargs)

    model = _xlm(num_layers=2)
    model.transformer.attentions[0].__class__ = FlaggingAttention
    with pytest.raises(TraceError, match=r"layer call transformer_attentions_0 \(transformer.attentions.0\) changed "
                                         r"the EncoderDecoderCache the forward created beyond its own slots"):
        fxpp.pipeline(model, 2, cuts=[1])


def test_the_forward_using_a_slot_after_passing_the_cache_on_is_refused():
    from transformers import DynamicCache

    cache = DynamicCache(config=tiny_config("llama"))
    record = OwnCache.adopt(cache, "Model", lambda: "modeling_x.py:1")
    record.check_uses("Model")  # nothing used yet
    cache.get_seq_length(0)  # the forward itself reads slot 0
    with pytest.raises(TraceError, match=r"the forward itself uses slot 0 of the cache \(DynamicCache\) at "
                                         r"modeling_x.py:1 after passing the cache to a layer"):
        record.check_uses("Model")
    record.finish()
    assert type(cache.layers) is list


def test_the_forward_changing_the_cache_between_layer_calls_is_refused():
    from transformers import DynamicCache

    cache = DynamicCache(config=tiny_config("llama"))
    record = OwnCache.adopt(cache, "Model", lambda: "modeling_x.py:2")
    record.check_before("model.layers.0", "Model")
    cache.layers.append(type(list.__getitem__(cache.layers, 0))())  # one more slot
    with pytest.raises(TraceError, match=r"the forward changed the DynamicCache it created before passing it to "
                                         r"model.layers.1 at modeling_x.py:2"):
        record.check_before("model.layers.1", "Model")


def test_a_cache_holding_tensors_when_a_layer_first_gets_it_is_refused():
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    with pytest.raises(TraceError, match="writes tensors into it before passing it to a layer"):
        OwnCache.adopt(cache, "Model", lambda: "modeling_x.py:1")


def test_a_cache_the_model_keeps_between_calls_is_refused(monkeypatch):
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.models.xlm import modeling_xlm

    model = _xlm(num_layers=2)
    kept = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
    model.transformer.kept_cache = kept
    monkeypatch.setattr(modeling_xlm, "EncoderDecoderCache", lambda *caches: kept)
    with pytest.raises(TraceError, match=r"transformer keeps the EncoderDecoderCache it passes to "
                                         r"transformer.attentions.0 at modeling_xlm.py:\d+ between calls"):
        fxpp.pipeline(model, 2, cuts=[1])

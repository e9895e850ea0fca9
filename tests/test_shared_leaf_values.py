"""One leaf evaluation per build (Note: *leaf cache* in ``fxpp.trace.meta_eval``).

A pipeline build traces the model for its whole signature and for each representative
present set (``fxpp.compile.trace_canonical``). The traces share one leaf cache
(``LeafValues``): identical layers are meta-evaluated once for the whole build, and
every trace's graph is the graph a trace of its own gives.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask

import fxpp
from fxpp.compile import compile_example, trace_canonical
from fxpp.meta import signature_record, trace_record
from fxpp.model_facts import ModelState, model_unchanged
from fxpp.testing.zoo import tiny_model
from fxpp.trace import trace_model
from fxpp.trace.driver import ModuleTree
from fxpp.trace.meta_eval import LeafValues, _plain_state_entries
from fxpp.trace.values import call_signature


def _described(gm) -> list[tuple]:
    """Each node's name, op, target and meta value's shape (or type)."""
    def shape(v):
        return (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else type(v).__name__
    return [(n.name, n.op, str(n.target), shape(n.meta.get("val"))) for n in gm.graph.nodes]


def test_a_build_meta_evaluates_identical_layer_calls_once():
    """Four layers, four traces (the whole signature; no mask; no positions; neither): the
    layer calls of batch 1 differ only in their mask (a tensor, or None without one), so
    the build meta-evaluates a layer twice, not once per trace."""
    model = tiny_model("llama", 4)
    fake_calls = []

    def count(module, args, kwargs):
        if isinstance(args[0], FakeTensor):
            fake_calls.append(call_signature((args, kwargs)))

    for layer in model.model.layers:
        layer.register_forward_pre_hook(count, with_kwargs=True)
    pipe = fxpp.pipeline(model, 2, example_inputs={"input_ids": torch.arange(8).reshape(1, 8)})
    assert len(signature_record(pipe.model_graph).variant_graphs) == 3
    assert len(fake_calls) == len(set(fake_calls)) == 2


def test_a_build_fake_evaluates_a_mask_builder_once_per_distinct_call():
    """With and without position_ids the forward calls its mask builder alike: one
    evaluation, one meta value in both graphs; without a mask, another."""
    model = tiny_model("llama", 2)
    pipe = fxpp.pipeline(model, 2, example_inputs={"input_ids": torch.arange(8).reshape(1, 8)})
    record = signature_record(pipe.model_graph)
    values = {}
    for gm in [pipe.model_graph, *record.variant_graphs.values()]:
        present = tuple(sorted(trace_record(gm).example_inputs))
        values[present] = next(n.meta["val"] for n in gm.graph.nodes if n.target is create_causal_mask)
    with_mask = values[("attention_mask", "input_ids", "position_ids")]
    assert isinstance(with_mask, torch.Tensor) and values[("attention_mask", "input_ids")] is with_mask
    assert values[("input_ids",)] is values[("input_ids", "position_ids")]


def test_a_build_walks_the_models_modules_once(monkeypatch):
    """ModuleTree: what Tracer.trace would walk every submodule for, once per build."""
    walks = []
    init = ModuleTree.__init__
    monkeypatch.setattr(ModuleTree, "__init__", lambda self, model: (walks.append(model), init(self, model))[1])
    model = tiny_model("llama", 2)
    pipe = fxpp.pipeline(model, 2, example_inputs={"input_ids": torch.arange(8).reshape(1, 8)})
    assert len(signature_record(pipe.model_graph).variant_graphs) == 3 and walks == [model]


def test_each_trace_of_a_build_is_the_trace_of_its_own():
    model = tiny_model("llama", 4)
    pipe = fxpp.pipeline(model, 2)
    record = signature_record(pipe.model_graph)
    example = trace_record(pipe.model_graph).example_inputs
    assert _described(pipe.model_graph) == _described(compile_example(model, example))
    for bits, gm in record.variant_graphs.items():
        alone = compile_example(model, {k: example[k] for k in record.signature.present(bits)})
        assert gm.code == alone.code
        assert _described(gm) == _described(alone)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x)


class _ReshapesALayerOutputWithoutMask(nn.Module):
    """Two identical layers; without a mask the forward changes the first one's output's
    shape in place (``unsqueeze_``), so a value kept by the trace with the mask is
    changed by the trace without it."""

    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, input_ids, attention_mask=None):
        h = self.layers[0](self.embed(input_ids))
        if attention_mask is None:
            h.unsqueeze_(0)
            h = h.squeeze(0)
        else:
            h = h * attention_mask[..., None]
        return self.layers[1](h)


def _toy_inputs():
    return {"input_ids": torch.arange(6).reshape(2, 3), "attention_mask": torch.ones(2, 3, dtype=torch.long)}


def test_a_value_another_trace_changed_in_place_is_not_taken():
    model = _ReshapesALayerOutputWithoutMask().eval()
    ids = {"input_ids": _toy_inputs()["input_ids"]}
    alone = _described(trace_model(model, ids))
    shared = LeafValues()
    trace_model(model, ids, shared)  # changes the kept value of layers[0] in place
    assert _described(trace_model(model, ids, shared)) == alone


def test_a_trace_that_changes_an_earlier_graphs_value_is_noticed():
    model = _ReshapesALayerOutputWithoutMask().eval()
    shared = LeafValues()
    with_mask = trace_model(model, _toy_inputs(), shared)
    shared.keep(with_mask)
    before = _described(with_mask)
    assert shared.intact()
    trace_model(model, {"input_ids": _toy_inputs()["input_ids"]}, shared)  # takes layers[0]'s value, reshapes it
    assert not shared.intact()
    assert _described(with_mask) != before


def test_a_build_whose_traces_would_change_each_other_traces_each_alone():
    """trace_canonical notices the change and traces again without sharing: the canonical
    graph and the graph without a mask are those of traces of their own."""
    model = _ReshapesALayerOutputWithoutMask().eval()
    gm = trace_canonical(model, {"input_ids": _toy_inputs()["input_ids"]})
    record = signature_record(gm)
    example = trace_record(gm).example_inputs
    assert set(example) == {"input_ids", "attention_mask"}
    assert _described(gm) == _described(compile_example(model, example))
    assert record.variant_graphs
    for bits, variant in record.variant_graphs.items():
        alone = compile_example(model, {k: example[k] for k in record.signature.present(bits)})
        assert _described(variant) == _described(alone)


def test_one_model_state_restores_the_model_after_each_trace():
    """ModelState: the build's traces restore the model from one state, taken once."""
    model = tiny_model("llama", 2)
    norm, layer = model.model.norm, model.model.layers[0]
    state = ModelState(model)
    for _ in range(2):
        with model_unchanged(model, state):
            layer.added = 1
            model.model.norm = nn.Identity()
            layer.register_forward_hook(lambda *a: None)
        assert model.model.norm is norm and not hasattr(layer, "added") and not layer._forward_hooks


def test_the_leaf_cache_reads_a_layers_state_as_state_dict_does():
    """_plain_state_entries: the state_dict entries, or None where a module changes how it saves."""
    model = tiny_model("qwen3_moe", 2)
    layer = model.model.layers[0]
    layer.register_buffer("scratch", torch.zeros(2), persistent=False)  # not in the state dict

    def entries(m):
        return [(k, id(v)) for k, v in m.state_dict(keep_vars=True).items()]

    for m in (layer, model):
        assert [(k, id(v)) for k, v in _plain_state_entries(m)] == entries(m)
    layer.mlp.register_state_dict_pre_hook(lambda *a: None)
    assert _plain_state_entries(layer) is None and _plain_state_entries(model.model.norm) is not None

"""The transform's contract beyond numerics: names, sharing, meta device, no mutation,
errors, and the structure of stage graphs."""

from __future__ import annotations

import pytest
import torch

import fxpp
from fxpp.analysis.annotate import info
from fxpp.testing.zoo import tiny_model

from .helpers import cached_model, make_inputs, reference, run_stages, assert_same


def _snapshot(model):
    return {
        "params": {n: (id(p), p.detach().clone()) for n, p in model.named_parameters()},
        "buffers": {n: (id(b), b.detach().clone()) for n, b in model.named_buffers()},
        "forwards": {n: m.__dict__.get("forward") for n, m in model.named_modules()},
        "hooks": {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()},
        "training": {n: m.training for n, m in model.named_modules()},
        "config": model.config.to_dict(),
    }


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after["params"].keys() == before["params"].keys()
    for n, (pid, value) in before["params"].items():
        assert after["params"][n][0] == pid, f"parameter object {n} replaced"
        assert torch.equal(after["params"][n][1], value), f"parameter {n} changed"
    for n, (bid, value) in before["buffers"].items():
        assert after["buffers"][n][0] == bid, f"buffer object {n} replaced"
        assert torch.equal(after["buffers"][n][1], value), f"buffer {n} changed"
    assert after["forwards"] == before["forwards"]
    assert after["hooks"] == before["hooks"]
    assert after["training"] == before["training"]
    assert after["config"] == before["config"]


@pytest.mark.parametrize("family", ["llama", "gemma4", "mixtral"])
def test_transform_and_pipeline_leave_model_untouched(family, tmp_path):
    from fxpp.runtime.checkpoint import save_stage

    model = tiny_model(family, 4).train()
    before = _snapshot(model)
    pipe = fxpp.pipeline(model, 3, verify=True)
    print(pipe)
    fxpp.transform(model, "middle", range(1, 2))
    pipe(**make_inputs(2, 5))
    save_stage(pipe.stages[1], str(tmp_path / "stage1.safetensors"))
    with pytest.raises(fxpp.StageSpecError):
        fxpp.transform(model, "first", range(1, 2))
    with pytest.raises(fxpp.StageInputError):
        pipe.stages[1](torch.zeros(2, 5, 64))
    _assert_unchanged(model, before)


def test_stage_state_dict_keys_are_model_keys_and_load_a_checkpoint():
    model = cached_model("llama", 4)
    full = model.state_dict()
    pipe = fxpp.pipeline(model, 3)
    seen = set()
    for stage in pipe.stages:
        keys = set(stage.state_dict())
        assert keys <= set(full), keys - set(full)
        seen |= keys
    assert seen == set(full)
    assert "lm_head.weight" in pipe.stages[-1].state_dict()
    assert "model.embed_tokens.weight" in pipe.stages[0].state_dict()
    assert not any(k.startswith("model.embed_tokens") for k in pipe.stages[1].state_dict())
    # A transformers-style checkpoint loads into a stage by its original names.
    other = tiny_model("llama", 4, seed=1)
    stage_copy = fxpp.transform(tiny_model("llama", 4, seed=2), "middle", range(1, 3))
    result = stage_copy.load_state_dict({k: v for k, v in other.state_dict().items() if k in stage_copy.state_dict()})
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(stage_copy.get_parameter("model.layers.1.mlp.up_proj.weight"), other.model.layers[1].mlp.up_proj.weight)


def test_stage_calls_the_models_own_modules_so_hooks_and_wrappers_apply():
    model = tiny_model("qwen2", 3)
    stage = fxpp.transform(model, "middle", range(1, 2))
    assert stage.get_submodule("model.layers.1") is model.model.layers[1]
    assert stage.get_parameter("model.layers.1.self_attn.q_proj.weight") is model.model.layers[1].self_attn.q_proj.weight
    calls = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    first = fxpp.transform(model, "first", range(0, 1))
    stage(*first(**make_inputs(2, 4)))
    handle.remove()
    assert calls == [torch.Size([2, 4, 64])]
    # A per-layer wrapper applied after the transform (LoRA-style) changes the stage too.
    proj = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        saved = proj.weight.clone()
        proj.weight.zero_()
    try:
        out_a = stage(*first(**make_inputs(2, 4)))
    finally:
        with torch.no_grad():
            proj.weight.copy_(saved)
    out_b = stage(*first(**make_inputs(2, 4)))
    assert not torch.equal(out_a[0], out_b[0])


def test_meta_device_model_traces_without_allocating():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    pipe = fxpp.pipeline(model, 3, layers_per_stage=[2, 2, 2])
    assert all(p.is_meta for s in pipe.stages for p in s.parameters())
    assert pipe.crossing == [["model_layers_1", "attention_mask", "position_ids"],
                             ["model_layers_3", "attention_mask", "position_ids"]]
    # The cost model moves a layer off the last stage, which also runs the 32000-word head.
    balanced = fxpp.pipeline(model, 3)
    assert [len(r) for r in balanced.layer_ranges] == [2, 3, 1]
    costs = balanced.stage_costs()
    assert max(costs) < max(pipe.stage_costs())


def test_golden_stage_structure_llama():
    """Which node lands on which stage, with what role; paired with a numerics check."""
    model = cached_model("llama", 3)
    pipe = fxpp.pipeline(model, 3)

    def roles(stage):
        return [f"{n.name}:{info(n).role}" for n in stage.graph.nodes if info(n).role not in ("compute", "constant", "output")]

    assert roles(pipe.stages[0]) == [
        "input_ids:input", "attention_mask:input", "position_ids:input", "model_embed_tokens:embed",
        "create_causal_mask:mask", "model_rotary_emb:rotary", "model_layers_0:layer",
    ]
    assert roles(pipe.stages[1]) == [
        "model_layers_0:layer", "attention_mask:input", "position_ids:input", "create_causal_mask:mask",
        "model_rotary_emb:rotary", "model_layers_1:layer",
    ]
    assert roles(pipe.stages[2]) == [
        "model_layers_1:layer", "attention_mask:input", "position_ids:input", "create_causal_mask:mask",
        "model_rotary_emb:rotary", "model_layers_2:layer", "model_norm:norm", "lm_head:head",
    ]
    inputs = make_inputs(2, 6, padding="left")
    assert_same(reference(model, inputs), run_stages(pipe.stages, inputs, model), atol=1e-5, rtol=1e-5)


def test_stage_of_only_sliding_layers_builds_no_full_mask():
    model = cached_model("gemma3", 6)  # layer types s s f s s f
    stage = fxpp.transform(model, "middle", range(3, 5))
    masks = [info(n).layer_types for n in stage.graph.nodes if info(n).role == "mask"]
    rotary = [info(n).layer_types for n in stage.graph.nodes if info(n).role == "rotary"]
    assert masks == [("sliding_attention",)]
    assert all(r == ("sliding_attention",) for r in rotary) and rotary
    mixed = fxpp.transform(model, "middle", range(2, 4))
    assert sorted(info(n).layer_types for n in mixed.graph.nodes if info(n).role == "mask") == [
        ("full_attention",), ("sliding_attention",)]


def test_first_stage_has_no_head_last_stage_has_no_embedding_and_keeps_softcapping():
    model = cached_model("gemma2", 4)
    pipe = fxpp.pipeline(model, 2)
    first_roles = {info(n).role for n in pipe.stages[0].graph.nodes}
    last_roles = {info(n).role for n in pipe.stages[1].graph.nodes}
    assert "embed" in first_roles and "head" not in first_roles and "norm" not in first_roles
    assert "head" in last_roles and "norm" in last_roles and "embed" not in last_roles
    assert any(n.target is torch.tanh for n in pipe.stages[1].graph.nodes)


def test_gemma4_per_layer_inputs_and_shared_kv_cross_the_cut():
    model = cached_model("gemma4", 6)  # layers 3..5 read KV stored by layers 1 and 2
    pipe = fxpp.pipeline(model, 2, cuts=[3])
    crossing = pipe.crossing[0]
    assert sum(name.startswith("state_entry") for name in crossing) == 2  # one per layer type
    out = pipe.stages[0](**make_inputs(1, 5))
    assert out[0].shape == (1, 5, 64)  # hidden states first
    kv = [t for t in out if t.dim() == 4 and t.shape[1] == model.config.num_key_value_heads]
    assert len(kv) == 4  # (key, value) for sliding and for full attention


def test_new_shapes_and_new_inputs_are_handled():
    model = cached_model("gemma4", 4)
    stage0 = fxpp.transform(model, "first", range(0, 2))
    stage1 = fxpp.transform(model, "last", range(2, 4))
    for batch, seq in [(1, 1), (3, 13), (2, 2)]:
        inputs = make_inputs(batch, seq, padding="right", seed=seq)
        torch.testing.assert_close(stage1(*stage0(**inputs)), model(**inputs).logits, atol=1e-5, rtol=1e-5)
    # position_ids was not an example input: the first and full stages retrace for it.
    full = fxpp.transform(model, "full")
    inputs = make_inputs(2, 6, position_ids=True)
    torch.testing.assert_close(full(**inputs), model(**inputs).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "role, layers, message",
    [
        ("first", range(1, 3), "must start at layer 0"),
        ("last", range(0, 2), "must end at the last layer (4)"),
        ("middle", range(0, 2), "must neither start at layer 0"),
        ("middle", range(2, 4), "must neither start at layer 0"),
        ("first", range(0, 4), "owns every layer"),
        ("full", range(0, 2), "owns every layer"),
        ("first", range(0, 9), "inside range(0, 4)"),
        ("middle", range(2, 2), "non-empty"),
        ("middle", range(1, 3, 2), "step 1"),
        ("sideways", range(1, 2), "'sideways' is not a stage role"),
        ("middle", None, "needs layers=range"),
    ],
)
def test_bad_stage_requests_name_the_problem(role, layers, message):
    with pytest.raises(fxpp.StageSpecError, match=__import__("re").escape(message)):
        fxpp.transform(cached_model("llama", 4), role, layers)


def test_bad_pipeline_requests():
    model = cached_model("llama", 4)
    with pytest.raises(fxpp.StageSpecError, match="more than the model's 4 decoder layers"):
        fxpp.pipeline(model, 5)
    with pytest.raises(fxpp.StageSpecError, match="strictly increasing"):
        fxpp.pipeline(model, 3, cuts=[2, 2])
    with pytest.raises(fxpp.StageSpecError, match="gives 2 stages, not num_stages=3"):
        fxpp.pipeline(model, 3, cuts=[2])


def test_not_a_transformers_model():
    with pytest.raises(fxpp.UnsupportedModelError, match="not a transformers model"):
        fxpp.transform(torch.nn.Linear(2, 2), "full")


def _data_dependent_llama():
    """A tiny Llama whose base forward branches on token data before its layers."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    model = tiny_model("llama", 2)

    class DataDependent(type(model.model)):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            h = self.embed_tokens(input_ids)
            if (input_ids == 5).any():  # control flow on tensor data
                h = h * 2
            for layer in self.layers:
                h = layer(h, attention_mask=None, position_embeddings=self.rotary_emb(h, torch.arange(h.shape[1])[None]))
            return BaseModelOutputWithPast(last_hidden_state=self.norm(h))

    model.model.__class__ = DataDependent
    return model


def test_control_flow_on_data_is_guarded_on_real_values():
    """Decided on the example's real ids, re-checked per call: ids with and without token 5
    take the branch the unpatched forward takes."""
    model = _data_dependent_llama()
    pipe = fxpp.pipeline(model, 2, cuts=[1], example_inputs={"input_ids": torch.full((2, 6), 7)})
    assert any(n.target is fxpp.ops.check_data for n in pipe.stages[0].graph.nodes)
    for ids in (torch.full((2, 6), 7), torch.full((2, 6), 5), torch.full((2, 6), 7)):
        with torch.no_grad():
            torch.testing.assert_close(pipe(input_ids=ids), model(input_ids=ids, use_cache=False).logits,
                                       atol=0, rtol=0)  # the same modules on the same values: bit-identical


def test_untraceable_forward_names_model_and_line():
    """On the meta device there are no real values to decide on: refused, naming the line."""
    model = _data_dependent_llama().to("meta")
    with pytest.raises(fxpp.TraceError, match=r"LlamaForCausalLM: Python control flow depends on tensor data at "
                       r"test_transform.py:\d+.*not on the meta device"):
        fxpp.transform(model, "full", example_inputs={"input_ids": torch.ones(2, 6, dtype=torch.long, device="meta")})


def test_wrong_tuple_to_a_middle_stage():
    model = cached_model("llama", 4)
    stage = fxpp.transform(model, "middle", range(1, 3))
    first = fxpp.transform(model, "first", range(0, 1))
    out = first(**make_inputs(2, 5))
    with pytest.raises(fxpp.StageInputError, match=r"expects the 2 tensors that cross cut 1 \(hidden states, then the "
                       r"fxpp packed tensor: the fxpp header .*, input attention_mask, input position_ids\), got 1"):
        stage(out[0])
    with pytest.raises(fxpp.StageInputError, match="model inputs go to the first stage only"):
        stage(**make_inputs(2, 5))
    with pytest.raises(fxpp.StageInputError, match="expected shape like"):
        stage(out[0][..., :10], *out[1:])


def test_balanced_split_is_exact():
    from itertools import combinations

    from fxpp.split import balanced_split

    costs = [5.0, 1.0, 1.0, 7.0, 2.0, 2.0, 3.0, 1.0]
    for k in range(1, 6):
        got = balanced_split(costs, k, first_extra=4.0, last_extra=6.0)

        def worst(ranges):
            loads = [sum(costs[i] for i in r) for r in ranges]
            loads[0] += 4.0
            loads[-1] += 6.0
            return max(loads)

        brute = min(
            worst([range(a, b) for a, b in zip((0, *cuts), (*cuts, len(costs)))])
            for cuts in combinations(range(1, len(costs)), k - 1)
        )
        assert worst(got) == brute
        assert [r.start for r in got[1:]] == sorted(r.start for r in got[1:])


def test_sliding_layers_cost_less_at_long_sequences():
    model = cached_model("gemma3", 6)
    pipe = fxpp.pipeline(model, 2, example_inputs={"input_ids": torch.zeros(1, 256, dtype=torch.long)})
    layer_costs = [c.flops for c in pipe.block_costs[1:-1]]
    assert layer_costs[0] < layer_costs[2]  # sliding (window 4) vs full attention
    assert layer_costs[0] == layer_costs[1]


def test_a_variant_keeps_its_own_traced_constants():
    """Traced constants are numbered per trace and torch.fx registers tensor constants as
    buffers: a variant must never take another trace's constant of the same name."""
    from torch.fx import Graph, GraphModule

    from fxpp.stage_module import _on_modules_of

    def holding(value):
        graph = Graph()
        const = graph.get_attr("_fxpp_const_0")
        graph.output(const)
        return GraphModule({"_fxpp_const_0": value}, graph)

    variant, owner = holding(torch.ones(3)), holding(torch.zeros(3))
    assert "_fxpp_const_0" in dict(variant.named_buffers())  # what made the names collide
    torch.testing.assert_close(_on_modules_of(variant, owner)(), torch.ones(3), atol=0, rtol=0)  # exact: a copy

"""The family tail: refusals that became answers, each checked against the unpatched model
(logits and every parameter gradient).

1. Large models are built on the meta device and loaded per stage. Where a decoder
   layer's fake evaluation cannot see through a data-dependent op (a sparse-attention
   token selector with ``nonzero``, MoE dispatch), the layer's output shape comes from
   its contract (hidden states in, hidden states of the same shape out) or, for a layer
   returning a tuple, from a bounded evaluation (``fxpp.trace.standins``). The tests
   build the model on ``meta``, pipeline it, load each stage from a safetensors
   checkpoint written from a real-weight copy and compare with that copy. A token-type
   input the forward refuses to train without is in the default signature (Molmo 2).
2. The cost split numbers every layer, those the forward skips included (Mllama).
3. Images of another size than fxpp's example lengthen the sequence (HunYuan-VL).
4. An input the forward takes through ``**kwargs`` and ignores is accepted (xLSTM).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import fxpp
from fxpp.testing.check import compare, grads_of, loss_of, make_inputs, reference, run_pipeline
from fxpp.testing.generic_vlm import (_fill_unset_config_reads as fill_unset_config_reads, generic_config,
                                      generic_inputs, generic_model, text_ids)
from fxpp.testing.tiny import tiny_config


def _real_causal(model_type: str, num_layers: int | None = None):
    config = tiny_config(model_type, num_layers)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return _perturbed(model)


def _perturbed(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def _on_meta(model):
    """A model of ``model``'s class and config built on the meta device, in ``model``'s mode."""
    with torch.device("meta"):
        return type(model)._from_config(model.config, dtype=torch.float32).train(model.training)


def _loaded_stages(pipe, checkpoint: str, rendezvous, training: bool = False):
    """Each stage of ``pipe`` (a meta model's) built on the CPU, reading its weights from ``checkpoint``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    try:
        return [pipe.build_stage(i, torch.device("cpu"), checkpoint=checkpoint, style="loop").submod.train(training)
                for i in range(len(pipe.stages))]
    finally:
        dist.destroy_process_group()


def _stages_logits_and_grads(stages, inputs, real):
    """Logits and gradients of the composed stages, keyed as ``real`` names its parameters
    (a stage's own copy of a tied weight adds into the weight's first name)."""
    canonical = {}
    for name, p in real.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(p), name)
    canonical_name = {name: canonical[id(p)] for name, p in real.named_parameters(remove_duplicate=False)}
    for stage in stages:
        stage.zero_grad(set_to_none=True)
    out = stages[0](**inputs)
    for stage in stages[1:]:
        out = stage(*out)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    loss_of(logits).backward()
    grads: dict[str, torch.Tensor] = {}
    for stage in stages:
        for name, g in grads_of(stage).items():
            key = canonical_name[name]
            grads[key] = grads[key] + g if key in grads else g
    return logits.detach(), grads


def _write_checkpoint(model, path) -> str:
    """``model``'s state dict under its own names, as one safetensors file. (Not
    ``save_pretrained``: transformers writes fused MoE experts back per expert, which
    ``load_stage`` does not map.)"""
    from safetensors.torch import save_file

    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _check_meta_build(real, inputs, tmp_path, num_stages: int = 2, cuts: list[int] | None = None):
    checkpoint = _write_checkpoint(real, tmp_path / "model.safetensors")
    meta = _on_meta(real)
    pipe = fxpp.pipeline(meta, num_stages, cuts=cuts)
    assert all(p.is_meta for p in meta.parameters())
    stages = _loaded_stages(pipe, checkpoint, tmp_path / "rdzv", real.training)
    same, detail, _ = compare(reference(real, inputs), _stages_logits_and_grads(stages, inputs, real))
    assert same, detail
    return pipe


def test_sizes_at_their_bounds_only_inside_the_context():
    from torch._subclasses.fake_tensor import DynamicOutputShapeException

    from fxpp.trace.values import FakeMode

    mode = FakeMode(allow_non_fake_inputs=True)
    with mode:
        x = torch.empty(3, 4, device="meta")
        with pytest.raises(DynamicOutputShapeException):
            x.nonzero()
        with mode.sizes_at_bounds():
            # every element nonzero: nonzero, boolean masks and one-argument where at their largest
            assert tuple(x.nonzero().shape) == (12, 2) and tuple(x[x > 0].shape) == (12,)
            assert tuple(torch.where(x > 0)[1].shape) == (12,) and tuple(x[:, (x > 0).any(0)].shape) == (3, 4)
        assert not mode.at_bounds


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model_type", ["qwen4_exp_text", "qwen4_exp"])
def test_meta_build_of_a_data_dependent_layer_loads_and_matches(model_type, tmp_path):
    # Qwen4-Exp's layers pick the tokens each query attends to with nonzero: on meta, the
    # layer takes its contract's shape
    real = _real_causal(model_type, 4)
    pipe = _check_meta_build(real, make_inputs(2, 9, seed=3), tmp_path)
    assert len(pipe.stages) == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model_type", ["glm5_next", "qwen4_exp"])
def test_meta_build_of_a_data_dependent_vlm_loads_and_matches(model_type, tmp_path):
    # GLM-5 Next's layer returns (hidden states, top-k picks): a bounded evaluation. On
    # meta, fxpp cannot make example images for a vision tower that reads its grid sizes
    # as numbers (image_grid_thw), so the meta pipeline's signature is the text inputs
    real = generic_model(model_type)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :2] = 0
    inputs = {"input_ids": text_ids(real.config, 2, 10, seed=3), "attention_mask": mask}
    _check_meta_build(real, inputs, tmp_path)


@pytest.mark.timeout(120)
def test_meta_build_sends_a_bounded_layer_output_across_cuts(tmp_path):
    # GLM-5 Next layers whose next layer shares their indexer hand it their top-k picks:
    # with cuts after each such layer, the picks cross both cuts in the shape the bounded
    # evaluation gave them
    config = generic_config("glm5_next")
    text = config.text_config
    text.num_hidden_layers = 4
    text.layer_types = ["indexed_attention"] * 4
    text.indexer_types = ["full", "shared", "full", "shared"]
    text.mlp_layer_types = ["dense", "sparse", "dense", "sparse"]
    torch.manual_seed(0)
    real = _perturbed(transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    inputs = {"input_ids": text_ids(real.config, 2, 10, seed=4), "attention_mask": mask}
    pipe = _check_meta_build(real, inputs, tmp_path, 3, cuts=[1, 3])
    for stage, layer in zip(pipe.stages[:2], (1, 3)):
        assert f"prev_topk_indices of model.language_model.layers.{layer}" in stage.out_layout.identities


@pytest.mark.timeout(120)
def test_meta_build_carries_an_input_the_forward_requires(tmp_path):
    # Molmo 2 refuses to train without mm_token_type_ids ("required as a model input when
    # training"): the default signature carries it, as zeros on the text tokens
    real = generic_model("molmo2").train()
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :2] = 0
    ids = text_ids(real.config, 2, 10, seed=5)
    inputs = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": torch.zeros_like(ids)}
    pipe = _check_meta_build(real, inputs, tmp_path)
    assert "mm_token_type_ids" in pipe.stages[0].signature.names


# 2. Mllama's cross-attention layers attend to the images and are skipped without them:
#    the cost split still numbers every layer (a skipped layer costs no time).


def _mllama_config(num_layers: int = 5, cross: tuple[int, ...] = (1, 3), *, images: bool = False):
    config = generic_config("mllama") if images else tiny_config("mllama", num_layers)
    config.text_config.num_hidden_layers = num_layers
    config.text_config.cross_attention_layers = list(cross)
    return config


@pytest.mark.timeout(120)
@pytest.mark.parametrize("auto", ["AutoModelForCausalLM", "AutoModelForImageTextToText"])
@pytest.mark.parametrize("num_stages", [2, 3])
def test_cost_split_numbers_skipped_cross_attention_layers(auto, num_stages):
    torch.manual_seed(0)
    model = _perturbed(getattr(transformers, auto).from_config(_mllama_config(), dtype=torch.float32))
    pipe = fxpp.pipeline(model, num_stages)
    assert pipe.layer_ranges[-1].stop == 5 and len(pipe.layer_ranges) == num_stages
    for inputs in (make_inputs(2, 9, seed=1), {"input_ids": make_inputs(2, 12, seed=2)["input_ids"]}):
        same, detail, _ = compare(reference(model, inputs), run_pipeline(pipe, model, inputs))
        assert same, detail


@pytest.mark.timeout(120)
def test_cost_split_of_mllama_with_images():
    # with images every layer runs: the split and the numbers as without the skipped layers
    torch.manual_seed(0)
    model = _perturbed(transformers.AutoModelForImageTextToText.from_config(_mllama_config(images=True),
                                                                             dtype=torch.float32))
    inputs, kind = generic_inputs(model, seed=2)
    assert kind == "VLM" and "pixel_values" in inputs
    pipe = fxpp.pipeline(model, 2)
    assert pipe.layer_ranges[-1].stop == 5
    same, detail, _ = compare(reference(model, inputs), run_pipeline(pipe, model, inputs))
    assert same, detail


# 3. HunYuan-VL: images of another size than the example's lengthen the sequence. The
#    position helper that walks the token types (get_rope_index) is one opaque node (no
#    guard per token that every later stage would re-check and could not retrace), and a
#    received eager mask [B, 1, S, S] follows the call's sequence.


def _hunyuan_vl(attn: str):
    config = generic_config("hunyuan_vl")
    config.text_config.num_hidden_layers = 4
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32, attn_implementation=attn)
    fill_unset_config_reads(model)
    return _perturbed(model)


def _hunyuan_images(model, side: int, *, positions: bool):
    """One ``side x side``-patch image per row, its tokens in row 0 after one pad."""
    config = model.config
    g = torch.Generator().manual_seed(side)
    grid = torch.tensor([[1, side, side]] * 2)
    pixels = torch.randn(2 * side * side, model.model.vision_tower.config.num_channels * 16 * 16, generator=g)
    with torch.no_grad():
        n = model.get_image_features(pixels, grid).pooler_output[0].shape[0]
    ids = text_ids(config, 2, n + 6, seed=side)
    ids[:, 2:2 + n] = config.image_token_id
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": grid,
              "mm_token_type_ids": (ids == config.image_token_id).long()}
    if positions:
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return inputs


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_images_that_lengthen_the_sequence_reach_every_stage(attn):
    model = _hunyuan_vl(attn)
    pipe = fxpp.pipeline(model, 2)  # example images of 4x4 patches: 14 tokens
    assert not any(n.target is fxpp.ops.check_data for s in pipe.stages for n in s.graph.nodes)
    for side, positions in ((8, False), (6, True)):  # 28 and 20 tokens, without and with position_ids
        inputs = _hunyuan_images(model, side, positions=positions)
        same, detail, _ = compare(reference(model, inputs), run_pipeline(pipe, model, inputs))
        assert same, f"{side}x{side} patches, position_ids={positions}: {detail}"


# 4. xLSTM takes attention_mask only through **kwargs and ignores it (a recurrent model
#    builds no mask): the default signature carries it, and a call with it is accepted.


@pytest.mark.timeout(120)
def test_an_input_the_model_accepts_and_ignores_is_accepted():
    model = _real_causal("xlstm")
    pipe = fxpp.pipeline(model, 2)
    assert "attention_mask" in pipe.stages[0].signature.names
    padded = make_inputs(2, 9, seed=1)
    ones = {"input_ids": make_inputs(2, 11, seed=2)["input_ids"], "attention_mask": torch.ones(2, 11, dtype=torch.long)}
    ids = {"input_ids": make_inputs(2, 12, seed=3)["input_ids"]}
    for inputs in (padded, ones, ids):
        same, detail, _ = compare(reference(model, inputs), run_pipeline(pipe, model, inputs))
        assert same, detail
    with pytest.raises(fxpp.StageInputError, match=r"\['position_ids'\] are not in the pipeline's input signature "
                       r".*xLSTMForCausalLM.forward takes no position_ids"):
        pipe(**ids, position_ids=torch.arange(12).expand(2, 12))

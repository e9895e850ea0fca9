"""``build_model(DIR)`` loads a save_pretrained checkpoint strictly: every key, nothing else, right shapes."""

import os

import pytest
import torch

from fxpp.errors import CheckpointError
from fxpp.trainer.models import build_model


def _save(tmp_path, tie: bool):
    from fxpp.testing.zoo import tiny_model

    model = tiny_model("llama", 2, tie_word_embeddings=tie).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return str(tmp_path)


def _edit(path, fn):
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    fn(state)
    save_file(state, file, metadata={"format": "pt"})
    return file


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_loading_equals_from_pretrained(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    path = _save(tmp_path, tie)
    ours = build_model(path, seed=123).eval()  # another seed: every weight must come from the file
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    if tie:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_missing_key_is_an_error(tmp_path):
    path = _save(tmp_path, False)
    file = _edit(path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing 1 key.*: model.layers.1.mlp.up_proj.weight") as e:
        build_model(path)
    assert file in str(e.value)


def test_untied_lm_head_missing_is_an_error(tmp_path):
    path = _save(tmp_path, False)
    _edit(path, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="missing 1 key.*: lm_head.weight"):
        build_model(path)


def test_unexpected_key_is_an_error(tmp_path):
    path = _save(tmp_path, False)
    file = _edit(path, lambda s: s.__setitem__("model.layers.7.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="unexpected key model.layers.7.extra.weight") as e:
        build_model(path)
    assert file in str(e.value)


def test_wrong_shape_is_an_error(tmp_path):
    path = _save(tmp_path, False)
    key = "model.layers.0.self_attn.q_proj.weight"
    file = _edit(path, lambda s: s.__setitem__(key, s[key][:-1].clone()))
    with pytest.raises(CheckpointError, match=rf"{key} is \(63, 64\)|{key} is \(") as e:
        build_model(path)
    assert file in str(e.value)


def test_load_stage_casts_floating_point_and_refuses_other_dtype_changes(tmp_path):
    """The buffered read path (also CUDA's): a bfloat16 file into a float32 stage is cast, as
    transformers does; an integer tensor stored as float is refused by name."""
    from safetensors.torch import save_file

    import fxpp
    from fxpp.runtime.checkpoint import load_stage

    layer = torch.nn.Linear(4, 3)
    stored = {"weight": torch.randn(3, 4).to(torch.bfloat16), "bias": torch.randn(3).to(torch.bfloat16)}
    save_file(stored, str(tmp_path / "bf16.safetensors"))
    load_stage(layer, str(tmp_path / "bf16.safetensors"))
    assert layer.weight.dtype == torch.float32
    assert torch.equal(layer.weight.detach(), stored["weight"].float())
    assert torch.equal(layer.bias.detach(), stored["bias"].float())
    holder = torch.nn.Module()
    holder.register_buffer("counts", torch.zeros(3, dtype=torch.int64))
    save_file({"counts": torch.ones(3)}, str(tmp_path / "float_counts.safetensors"))
    with pytest.raises(fxpp.CheckpointError, match=r"counts has dtype torch.float32, the stage expects torch.int64"):
        load_stage(holder, str(tmp_path / "float_counts.safetensors"))

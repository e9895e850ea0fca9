"""build_model on a checkpoint directory: every key loaded, or a CheckpointError naming it."""

import pytest
import torch

from fxpp.errors import CheckpointError
from fxpp.trainer.models import build_model


def _save(tmp_path, tie, edit=None):
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    if edit is not None:
        from safetensors.torch import load_file

        sd = load_file(tmp_path / "model.safetensors")
        edit(sd)
        save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return model


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tie", [False, True])
def test_directory_loads_every_weight(tmp_path, tie):
    ref = _save(tmp_path, tie)
    got = build_model(str(tmp_path), seed=7)
    ids = torch.randint(0, 64, (2, 5))
    torch.testing.assert_close(got(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), "missing 1 key.*model.layers.1.mlp.up_proj.weight"),
    (lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(2)), "unexpected key.*model.extra.weight"),
    (lambda sd: sd.__setitem__("model.norm.weight", torch.zeros(3)), "model.norm.weight is \\(3,\\)"),
])
def test_bad_directory_is_a_checkpoint_error(tmp_path, edit, message):
    _save(tmp_path, False, edit)
    with pytest.raises(CheckpointError, match=message):
        build_model(str(tmp_path))

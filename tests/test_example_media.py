"""Example media: the default signature of a VLM holds its media inputs (``fxpp.inputs.example_media``)."""

from __future__ import annotations

import pytest
import torch

import fxpp
from fxpp.testing.zoo import tiny_vlm
from fxpp.inputs.example_media import NoExampleMedia, example_media_inputs

from .helpers import cached_model


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "gemma4"])
def test_example_images_fill_as_many_tokens_as_the_model_makes_features(family):
    model, _ = tiny_vlm(family, 2)
    example = example_media_inputs(model, batch=3, seed=0)
    token = model.config.image_token_id
    counts = (example["input_ids"] == token).sum(1)
    assert counts.min() == counts.max() > 0
    get = model.model.get_image_features
    media = {k: v for k, v in example.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids",
                                                          "token_type_ids")}
    with torch.no_grad():
        features = get(**media)
    features = getattr(features, "pooler_output", features)
    total = sum(f.numel() for f in (features if isinstance(features, (list, tuple)) else [features]))
    assert total == int(counts.sum()) * model.config.get_text_config().hidden_size
    assert example["attention_mask"][0, 0] == 0 and example["attention_mask"][1:].all()  # row 0 left-padded


def test_a_model_without_images_gets_no_example_media():
    with pytest.raises(NoExampleMedia, match="no vision_config"):
        example_media_inputs(cached_model("llama", 2))


def test_the_default_vlm_signature_holds_the_media_inputs_and_none_narrows_it():
    model, make = tiny_vlm("qwen2_5_vl", 2)
    assert {"pixel_values", "image_grid_thw"} <= set(fxpp.pipeline(model, 2).signature.names)
    ids = make(2, 24, seed=0)["input_ids"].clamp(max=50)
    # A media input given as None declares the text-only signature: images are then refused by name.
    pipe = fxpp.pipeline(model, 2, example_inputs={"input_ids": ids, "pixel_values": None})
    assert "pixel_values" not in pipe.signature.names
    with pytest.raises(fxpp.StageInputError, match=r"input\(s\) \['image_grid_thw', 'mm_token_type_ids', "
                       r"'pixel_values'\] are not in .*pixel_values: example_inputs gave pixel_values=None: a "
                       r"text-only signature"):
        pipe(**make(2, 24, seed=1))


def test_media_no_example_fits_are_refused_with_the_reason(monkeypatch):
    import importlib

    def no_fit(model, batch=2, seed=0, input_ids=None, decoder=None):
        raise NoExampleMedia("get_image_features on pixel_values[2, 3, 16, 16]: RuntimeError: no")

    monkeypatch.setattr(importlib.import_module("fxpp.inputs.signature"), "example_media_inputs", no_fit)
    model, make = tiny_vlm("llava", 2)
    pipe = fxpp.pipeline(model, 2)
    with pytest.raises(fxpp.StageInputError, match=r"pixel_values: no example images fit LlavaForConditionalGeneration"
                       r": get_image_features on pixel_values\[2, 3, 16, 16\]: RuntimeError: no; declare them"):
        pipe(**make(2, 24, seed=1))


def test_model_unchanged_restores_plain_attributes():
    """transformers marks a module once it installed its output-capturing hooks; the mark must
    go with the hooks, or the model believes it has hooks it lost."""
    from fxpp.model_facts import model_unchanged

    module = torch.nn.Linear(2, 2)
    module.flag = 1
    with model_unchanged(module):
        module.flag = 2
        module._output_capturing_hooks_installed = True
    assert module.flag == 1 and not hasattr(module, "_output_capturing_hooks_installed")


def test_the_callers_example_ids_are_kept_with_the_image_tokens_written_in():
    """The cost model and build_stage's default shapes read the example: a caller's text
    example keeps its shape, with the image's tokens written into it."""
    model, make = tiny_vlm("llava", 2)
    ids = torch.full((2, 64), 7)
    pipe = fxpp.pipeline(model, 2, example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert "pixel_values" in pipe.signature.names
    built = pipe.example_inputs["input_ids"]
    assert built.shape == ids.shape and (built == model.config.image_token_id).sum() > 0
    inputs = make(2, 24, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(pipe(**inputs), model(**inputs, use_cache=False).logits,
                                   atol=0, rtol=0)  # the same modules on the same values: bit-identical


def test_model_unchanged_restores_buffer_contents():
    """A real evaluation while tracing may update a buffer in place (BatchNorm in train mode)."""
    from fxpp.model_facts import model_unchanged

    norm = torch.nn.BatchNorm1d(3).train()
    before = norm.running_mean.clone()
    with model_unchanged(norm):
        norm(torch.randn(4, 3) + 5)
    torch.testing.assert_close(norm.running_mean, before, atol=0, rtol=0)

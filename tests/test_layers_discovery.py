"""Decoder-layer discovery (``fxpp.trace.layers``): the stack fxpp cuts is found by the
model's structure, not by equality with ``num_hidden_layers`` (see Note [Which stack is
the decoder's]); a model whose text path runs several stacks is refused naming them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import fxpp
from fxpp.testing.sweep_causal import check_family
from fxpp.testing.tiny import tiny_config
from fxpp.trace import find_decoder_layers
from fxpp.trace.layers import layer_stacks


def _meta_model(model_type: str) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(model_type))


def test_layer_stacks_skip_lists_inside_a_layer_lists_of_leaves_and_media_towers():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])  # inside a layer

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block() for _ in range(3)])
            self.projections = torch.nn.ModuleList([torch.nn.Linear(2, 2)])  # leaves (Gemma 3n's altup)
            self.vision_tower = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([Block()])})
            self.empty = torch.nn.ModuleList()

    assert [name for name, _ in layer_stacks(Model())] == ["layers"]


def test_longcat_layers_are_found_although_num_hidden_layers_counts_sublayers():
    model = _meta_model("longcat_flash")
    assert model.config.num_hidden_layers == 2 * len(model.model.layers)  # two attention sublayers a layer
    name, layers = find_decoder_layers(model)
    assert name == "model.layers" and layers is model.model.layers


def test_longcat_two_stage_pipeline_matches_the_model():
    result = check_family("longcat_flash", "LongcatFlashForCausalLM")
    assert result.status == "pass", (result.status, result.detail)
    assert {c.name: c.status for c in result.cases} == {
        "ids": "pass", "padded": "pass", "unpadded": "pass", "packed": "pass", "padded+pos": "pass", "router": "skipped"}


def test_hrm_stacks_run_in_cycles_are_refused_naming_the_loop():
    model = _meta_model("hrm_text")
    with pytest.raises(fxpp.UnsupportedModelError) as e:
        find_decoder_layers(model)
    message = str(e.value)
    assert message.startswith("HrmTextForCausalLM has 2 stacks of layers: model.L_module.layers "
                              "(2 x HrmTextDecoderLayer), model.H_module.layers (2 x HrmTextDecoderLayer); ")
    assert "HrmTextModel.forward calls model.L_module in a loop (modeling_hrm_text.py:" in message
    assert "HrmTextModel.forward calls model.H_module in a loop" in message
    assert message.endswith("no range of these layers is a pipeline stage")


def test_blt_stacks_run_one_after_another_are_refused_naming_them():
    model = _meta_model("blt")
    with pytest.raises(fxpp.UnsupportedModelError, match=r"BltForCausalLM has 6 stacks of layers: "
                       r"model\.local_encoder\.layers \(2 x BltTransformerLayer\), .*"
                       r"model\.global_transformer\.layers .*not several stacks run one after another"):
        fxpp.transform(model, "full")


def test_a_stack_of_num_hidden_layers_is_chosen_among_several():
    # XLM keeps attentions, ffns and norms in parallel lists of num_hidden_layers entries:
    # the stacks of blocks are attentions and ffns, and the choice is the same as before.
    model = _meta_model("xlm")
    assert [name for name, _ in layer_stacks(model)] == ["transformer.attentions", "transformer.ffns"]
    assert find_decoder_layers(model)[0] == "transformer.attentions"

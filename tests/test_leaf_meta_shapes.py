"""A leaf's meta value is the shape its real call gives, or fxpp refuses: never a guess.

During a leaf's fake-tensor evaluation, ``HFTracer._eval_submodule`` lets an MoE expert
block that fails on fake tensors stand in as "output shaped like the first input". That
stand-in once reached modules it does not fit: the leaf module itself and modules whose
class name has "Moe" only from the family (Ernie 4.5 VL's resampler,
``Ernie4_5_VLMoeVariableResolutionResamplerModel``, merges 2x2 patches: 32 rows in,
8 out, and got a meta value of 32 rows). The toy modules below have that pattern: a
data-dependent check (fake tensors cannot answer it) and an output shaped unlike the input.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxpp
from fxpp.errors import TraceError
from fxpp.testing.check import compare, make_inputs, reference, run_pipeline
from fxpp.testing.tiny import tiny_config
from fxpp.trace import trace_model


class ToyMoeEmbedding(nn.Embedding):
    """A leaf outside the decoder layers, "Moe" in its name: ``[B, S]`` ids -> ``[B, S, H]``."""

    def forward(self, ids):
        if bool((ids >= self.num_embeddings).any()):  # data-dependent: no answer on fake tensors
            raise IndexError("token id out of range")
        return super().forward(ids)


class ToyMoePairMerge(nn.Module):
    """Nested in a leaf, outside the decoder layers: ``[B, S, 2H]`` -> ``[B, S, H]``."""

    def forward(self, x):
        if bool(torch.isnan(x).any()):  # data-dependent
            raise ValueError("nan")
        return x.unflatten(-1, (-1, 2)).mean(-1)


class ToyWideEmbedding(nn.Module):
    """The leaf holding :class:`ToyMoePairMerge`."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 2 * hidden)
        self.merge = ToyMoePairMerge()

    def forward(self, ids):
        return self.merge(self.embed(ids))


def _llama(embedding: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", 2)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        vocab, hidden = config.vocab_size, config.hidden_size
        if embedding == "leaf":
            model.model.embed_tokens = ToyMoeEmbedding(vocab, hidden)
        else:
            model.model.embed_tokens = ToyWideEmbedding(vocab, hidden)
    return model


def _embed_node(gm):
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "model.embed_tokens")


@pytest.mark.parametrize("embedding", ["leaf", "nested"])
def test_leaf_meta_value_has_the_real_shape(embedding):
    model = _llama(embedding)
    inputs = make_inputs(2, 7, seed=1)
    gm = trace_model(model, inputs)
    with torch.no_grad():
        real = model.model.embed_tokens(inputs["input_ids"])
    meta = _embed_node(gm).meta["val"]
    assert (tuple(meta.shape), meta.dtype) == (tuple(real.shape), real.dtype)
    pipe = fxpp.pipeline(model, 2)
    same, detail, _ = compare(reference(model, inputs), run_pipeline(pipe, model, inputs))
    assert same, detail


@pytest.mark.parametrize("embedding", ["leaf", "nested"])
def test_no_real_weights_is_refused_naming_the_node(embedding):
    # on the meta device the data-dependent leaf cannot be evaluated: a loud error, not a guessed shape
    model = _llama(embedding, device="meta")
    inputs = {k: v.to("meta") for k, v in make_inputs(2, 7, seed=1).items()}
    with pytest.raises(TraceError, match="embed_tokens"):
        trace_model(model, inputs)


def test_tuple_returning_blocks_get_no_single_tensor_stand_in():
    from fxpp.trace.tracer import _returns_tuple

    class ToyMoeBlock(nn.Module):
        def forward(self, x):
            return x, x.sum(-1)

    class ToyMoeExperts(nn.Module):
        def forward(self, x) -> tuple[torch.Tensor, torch.Tensor]:  # annotation is not trusted
            return x

    assert _returns_tuple(ToyMoeBlock) and not _returns_tuple(ToyMoeExperts)


def test_meta_device_moe_layer_keeps_the_hidden_states_shape():
    # JetMoE routes its attention through data-dependent experts whose router returns a
    # tuple (no stand-in): on the meta device nothing can be evaluated, and the layer, an
    # entry of the decoder-layer stack, takes the shape of the hidden states it maps
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("jetmoe", 2), dtype=torch.float32)
    inputs = {k: v.to("meta") for k, v in make_inputs(2, 7, seed=1).items()}
    gm = trace_model(model, inputs)
    layers = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("model.layers.")]
    assert layers and all(tuple(n.meta["val"].shape) == (2, 7, model.config.hidden_size) for n in layers)

"""Each pass and analysis step on a small graph built by hand, as torch.fx tests its passes.

The end-to-end sweeps run every pass through Hugging Face models; these tests run
one step at a time on a toy module traced with ``torch.fx`` (decoder layers kept as
leaves, as fxpp's tracer keeps them) or on a ``torch.fx.Graph`` written node by node.
Each pairs a golden listing (node -> role, position / what a stage holds) with a
numerics check: the rewritten graph computes what the original does on random inputs.
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn
from torch.fx import Graph, GraphModule, Interpreter, Tracer

from fxpp import ops
from fxpp.analysis.annotate import annotate, describe
from fxpp.analysis.cuts import crossing_identity, crossing_values, stream_at
from fxpp.errors import CutError
from fxpp.passes.dense_masked_rows import dense_masked_rows
from fxpp.passes.extract_stage import extract_stage
from fxpp.passes.guard_mask_branches import guard_mask_branches
from fxpp.spec import StageRole, StageSpec

HIDDEN, VOCAB, IMAGE_TOKEN = 8, 16, 3


# -- toy models ----------------------------------------------------------------------
class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, h, mask):
        return h + torch.tanh(self.proj(h)) * mask


class ToyLM(nn.Module):
    """embed -> mask from attention_mask -> 3 layers -> norm -> head."""

    def __init__(self, num_layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Layer() for _ in range(num_layers))
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        mask = attention_mask[:, :, None].to(h.dtype)
        for layer in self.layers:
            h = layer(h, mask)
        return self.head(self.norm(h))


class PlainLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, h):
        return h + torch.tanh(self.proj(h))


class ToyVLM(nn.Module):
    """Image features added into the image-token rows after layer 1 (Qwen3-VL's deepstack)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.vision = nn.Linear(4, HIDDEN)
        self.layers = nn.ModuleList(PlainLayer() for _ in range(3))

    def forward(self, input_ids, pixel_values):
        h = self.embed(input_ids)
        image = input_ids == IMAGE_TOKEN
        features = self.vision(pixel_values)
        h = self.layers[0](h)
        h = self.layers[1](h)
        deep = h[image, :] + features.to(h.dtype)
        return self.layers[2](h), deep


class LeafLayers(Tracer):
    """Decoder layers as leaves (``call_module layers.i``), as fxpp's tracer records them."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname.startswith("layers.") or super().is_leaf_module(m, qualname)


def traced(model: nn.Module, *example) -> GraphModule:
    """``model`` traced with its layers as leaves, ``node.meta["val"]`` from running ``example``."""
    gm = GraphModule(model, LeafLayers().trace(model))

    class Record(Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            n.meta["val"] = result
            return result

    Record(gm).run(*example)
    return gm


def toy_lm():
    torch.manual_seed(0)
    model = ToyLM().eval()
    input_ids = torch.randint(0, VOCAB, (2, 5))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    gm = traced(model, input_ids, attention_mask)
    annotate(gm, layers_fqn="layers", layer_types=["full_attention", "sliding_attention", "full_attention"],
             input_embeddings=model.embed, output_embeddings=model.head)
    return model, gm, input_ids, attention_mask


def listing(gm: GraphModule) -> str:
    """``name: op target`` per node: what a stage holds, for golden tests."""
    def target(n):
        return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))

    return "\n".join(f"{n.name}: {n.op} {target(n)}" for n in gm.graph.nodes)


# -- fxpp.analysis.annotate ------------------------------------------------------------
def test_annotate_roles_and_positions():
    _, gm, _, _ = toy_lm()
    assert describe(gm.graph) == """\
input_ids: input @-1
attention_mask: input @-1
embed: embed @-1
getitem: compute @-1 remat
getattr_1: compute @-1 remat
to: compute @-1 remat
layers_0: layer @0 full_attention
layers_1: layer @1 sliding_attention
layers_2: layer @2 full_attention
norm: norm @2
head: head @2
output: output @2"""


def test_annotate_leaves_the_graph_unchanged():
    model, gm, input_ids, attention_mask = toy_lm()
    before = listing(gm)
    annotate(gm, layers_fqn="layers", layer_types=None, input_embeddings=model.embed, output_embeddings=model.head)
    assert listing(gm) == before
    torch.testing.assert_close(gm(input_ids, attention_mask), model(input_ids, attention_mask), rtol=0, atol=0)


# -- fxpp.analysis.cuts ----------------------------------------------------------------
def test_crossing_values_hidden_states_first_then_inputs():
    _, gm, _, _ = toy_lm()
    graph = gm.graph
    for k in (1, 2):
        crossing = crossing_values(graph, k)
        assert [n.name for n in crossing] == [f"layers_{k - 1}", "attention_mask"]
        assert crossing[0] is stream_at(graph, k)
        assert [crossing_identity(graph, n, k) for n in crossing] == ["hidden states", "input attention_mask"]


def test_a_cut_refuses_a_value_that_is_not_a_tensor():
    class Pair(nn.Module):  # a layer that returns (hidden states, a Python int)
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(HIDDEN, HIDDEN)

        def forward(self, h, n):
            return self.proj(h), n + 1

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Pair() for _ in range(2))

        def forward(self, h):
            h, n = self.layers[0](h, 0)
            h, n = self.layers[1](h, n)
            return h

    gm = traced(Toy(), torch.randn(2, HIDDEN))
    annotate(gm, layers_fqn="layers", layer_types=None, input_embeddings=None, output_embeddings=None)
    with pytest.raises(CutError, match=r"cut 1: layers_0 \(call_module layers.0\) is needed after the cut by "
                                       r"\['getitem', 'getitem_1'\] but is a tuple, not a tensor"):
        crossing_values(gm.graph, 1)


# -- fxpp.passes.extract_stage -----------------------------------------------------------
def test_extract_stage_golden_and_composition():
    model, gm, input_ids, attention_mask = toy_lm()
    first = extract_stage(gm, spec=StageSpec(StageRole.FIRST, range(0, 1), 3))
    middle = extract_stage(gm, spec=StageSpec(StageRole.MIDDLE, range(1, 2), 3))
    last = extract_stage(gm, spec=StageSpec(StageRole.LAST, range(2, 3), 3))
    assert listing(first) == """\
input_ids: placeholder input_ids
attention_mask: placeholder attention_mask
embed: call_module embed
getitem: call_function getitem
getattr_1: call_function getattr
to: call_method to
layers_0: call_module layers.0
output: output output"""
    # The mask is recomputed from the attention mask it receives; the hidden states
    # stand in for the embeddings whose dtype it reads.
    assert listing(middle) == """\
layers_0: placeholder layers_0
attention_mask: placeholder attention_mask
getitem: call_function getitem
getattr_1: call_function getattr
to: call_method to
layers_1: call_module layers.1
output: output output"""
    assert listing(last) == """\
layers_1: placeholder layers_1
attention_mask: placeholder attention_mask
getitem: call_function getitem
getattr_1: call_function getattr
to: call_method to
layers_2: call_module layers.2
norm: call_module norm
head: call_module head
output: output output"""
    # The stages call the model's own modules, no copies.
    assert middle.get_submodule("layers.1") is model.layers[1]
    for ids, mask in [(input_ids, attention_mask), (torch.randint(0, VOCAB, (3, 7)), torch.ones(3, 7, dtype=torch.long))]:
        torch.testing.assert_close(last(*middle(*first(input_ids=ids, attention_mask=mask))), model(ids, mask),
                                   rtol=0, atol=0)


def test_extract_full_stage_is_the_model():
    model, gm, input_ids, attention_mask = toy_lm()
    full = extract_stage(gm, spec=StageSpec(StageRole.FULL, range(0, 3), 3))
    assert [n.name for n in full.graph.nodes] == [n.name for n in gm.graph.nodes]
    torch.testing.assert_close(full(input_ids, attention_mask), model(input_ids, attention_mask), rtol=0, atol=0)


# -- fxpp.passes.guard_mask_branches ---------------------------------------------------------
def create_causal_mask(attention_mask):
    """A stand-in mask builder: ``None`` when every position is attended (as SDPA's builders)."""
    return None if bool(attention_mask.all()) else attention_mask[:, None, :].bool()


create_causal_mask.__module__ = "transformers.masking_utils"  # what fxpp.trace.is_mask_builder recognises


def mask_graph(*, computes_with_mask: bool) -> GraphModule:
    """``x * builder(attention_mask).float()``, or the mask handed straight to a leaf module."""
    root = nn.Module()
    root.layer = nn.Identity()
    g = Graph()
    x = g.placeholder("x")
    attention_mask = g.placeholder("attention_mask")
    mask = g.call_function(create_causal_mask, (attention_mask,))
    if computes_with_mask:
        as_float = g.call_method("float", (mask,))
        g.output(g.call_function(operator.mul, (x, as_float)))
    else:
        g.output(g.call_module("layer", (mask,)))
    return GraphModule(root, g)


def test_guard_mask_branches_guards_a_mask_the_forward_computes_with():
    gm = mask_graph(computes_with_mask=True)
    x, padded = torch.randn(2, 1, 4), torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    expected = gm(x, padded)
    guard_mask_branches(gm)
    assert listing(gm) == """\
x: placeholder x
attention_mask: placeholder attention_mask
create_causal_mask: call_function create_causal_mask
check_is_not_none: call_function check_is_not_none
float_1: call_method float
mul: call_function mul
output: output output"""
    torch.testing.assert_close(gm(x, padded), expected, rtol=0, atol=0)
    # An all-ones mask: the builder returns None and the traced branch does not hold.
    with pytest.raises(ops.GuardFailure, match="mask builder create_causal_mask: traced with 'a mask', called with None"):
        gm(x, torch.ones(2, 4, dtype=torch.long))


def test_guard_mask_branches_cites_the_models_line_not_the_tracers():
    gm = mask_graph(computes_with_mask=True)
    builder = next(n for n in gm.graph.nodes if n.target is create_causal_mask)
    builder.stack_trace = """File "/x/modeling_toy.py", line 12, in forward
    mask = create_causal_mask(attention_mask)
  File "/x/fxpp/trace/patching.py", line 110, in wrapper
    return tracer.create_proxy(...)
  File "/x/torch/fx/proxy.py", line 287, in create_node
    node = self.create_node(...)"""
    guard_mask_branches(gm)
    guard = next(n for n in gm.graph.nodes if n.target is ops.check_is_not_none)
    assert guard.args[1] == 'mask builder create_causal_mask (File "/x/modeling_toy.py", line 12, in forward)'


def test_guard_mask_branches_leaves_a_mask_handed_to_a_module():
    gm = mask_graph(computes_with_mask=False)
    before = listing(gm)
    guard_mask_branches(gm)
    assert listing(gm) == before
    assert gm(torch.randn(2, 4), torch.ones(2, 4, dtype=torch.long)) is None


# -- fxpp.passes.dense_masked_rows -------------------------------------------------------------
def toy_vlm():
    torch.manual_seed(0)
    model = ToyVLM().eval()
    input_ids = torch.tensor([[1, 3, 3, 5, 6], [3, 2, 7, 3, 3]])
    pixel_values = torch.randn(int((input_ids == IMAGE_TOKEN).sum()), 4)
    gm = traced(model, input_ids, pixel_values)
    annotate(gm, layers_fqn="layers", layer_types=None, input_embeddings=model.embed, output_embeddings=None)
    return model, gm, input_ids, pixel_values


def test_dense_masked_rows_sends_features_densely():
    model, gm, input_ids, pixel_values = toy_vlm()
    expected = model(input_ids, pixel_values)
    # Before: the [N, H] image features cross cut 1, N being the microbatch's image tokens.
    assert [n.name for n in crossing_values(gm.graph, 1)] == ["layers_0", "input_ids", "vision"]
    dense_masked_rows(gm)
    assert describe(gm.graph) == """\
input_ids: input @-1
pixel_values: input @-1
embed: embed @-1
eq: compute @-1 remat
vision: vision @-1
scatter_rows: compute @-1
layers_0: layer @0
layers_1: layer @1
getitem: compute @1
getattr_1: compute @1 remat
gather_rows: compute @-1 remat
to: compute @1
add: compute @1
layers_2: layer @2
output: output @2"""
    crossing = crossing_values(gm.graph, 1)
    assert [n.name for n in crossing] == ["layers_0", "input_ids", "scatter_rows"]
    assert crossing_identity(gm.graph, crossing[2], 1) == "dense " + crossing_identity(gm.graph, gm.graph.find_nodes(
        op="call_module", target="vision")[0], 1)
    assert tuple(crossing[2].meta["val"].shape) == (*input_ids.shape, HIDDEN)
    for got, want in zip(gm(input_ids, pixel_values), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Another microbatch with another number of images.
    ids = torch.tensor([[3, 1, 1, 1, 1], [2, 2, 2, 2, 2]])
    pixels = torch.randn(1, 4)
    for got, want in zip(gm(ids, pixels), model(ids, pixels)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dense_masked_rows_leaves_values_computed_at_the_same_layer():
    class SameLayer(ToyVLM):
        def forward(self, input_ids, pixel_values):
            h = self.layers[0](self.embed(input_ids))
            image = input_ids == IMAGE_TOKEN
            return h[image, :] + h[image, :].sin()  # both sides at position 0: never cut apart

    torch.manual_seed(0)
    model = SameLayer().eval()
    input_ids = torch.tensor([[1, 3, 3, 5, 6]])
    gm = traced(model, input_ids, torch.randn(2, 4))
    annotate(gm, layers_fqn="layers", layer_types=None, input_embeddings=model.embed, output_embeddings=None)
    before = listing(gm)
    dense_masked_rows(gm)
    assert listing(gm) == before

"""The node records of ``fxpp.meta``, and the source lines stage nodes keep."""

from __future__ import annotations

import pytest
import torch
import torch.fx

import fxpp
from fxpp.meta import (NodeFacts, identity_of, is_from_data, mark_from_data, node_facts, source_meta, source_of,
                       update_facts)
from fxpp.testing.zoo import tiny_model


def test_facts_are_frozen_records_under_one_key():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    assert node_facts(x) == NodeFacts() and not is_from_data(x)
    mark_from_data(x)
    update_facts(x, identity="input x")
    assert node_facts(x) == NodeFacts(from_data=True, identity="input x")
    assert identity_of(x) == "input x" and is_from_data(x)
    with pytest.raises(AttributeError):
        node_facts(x).source = "y"  # frozen: a writer replaces the record


def test_source_meta_copies_torchs_source_keys_only():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta.update({"stack_trace": 'File "modeling_x.py", line 611', "nn_module_stack": {"m": ("m", object)},
                   "val": 1, "fxpp_facts": NodeFacts(source="x")})
    assert source_meta(x) == {"stack_trace": x.meta["stack_trace"], "nn_module_stack": x.meta["nn_module_stack"]}


@pytest.mark.parametrize("family", ["llama", "gemma4"])
def test_stage_nodes_keep_the_model_nodes_stack_trace(family):
    model = tiny_model(family, 4)
    pipe = fxpp.pipeline(model, 2)
    model_nodes = {n.name: n for n in pipe.model_graph.graph.nodes}
    computed = 0
    for stage in pipe.stages:
        for node in stage.graph.nodes:
            source = source_of(node)
            if source is not None:  # a node computed from a model node: its very source line
                assert node.meta.get("stack_trace") == model_nodes[source].meta.get("stack_trace"), node.name
                computed += bool(node.meta.get("stack_trace"))
            elif node.op in ("call_function", "call_method") and node.all_input_nodes:
                # plumbing fxpp made (sends, receives): the line of the value it carries
                assert node.stack_trace == node.all_input_nodes[0].stack_trace, node.name
    assert computed > 0

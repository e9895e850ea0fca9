"""Stack traces made once per call stack (``fxpp.trace.source_lines.StackTraces``).

torch.fx would symbolize and format the whole Python stack for each node; fxpp keeps
one text per stack, so the nodes of one stack (the calls of a decoder-layer loop, the
same line in each trace of a build) share it, and every text still names the model's
source lines.
"""

from __future__ import annotations

import torch
import torch.fx

import fxpp
from fxpp.meta import signature_record
from fxpp.testing.zoo import tiny_model
from fxpp.trace.source_lines import StackTraces


def test_a_stack_trace_starts_at_the_outermost_forward_and_is_made_once():
    traces = StackTraces()

    def make():
        return traces.current(torch.fx.Tracer()._filter_traceback_frames)

    def forward():
        return [make() for _ in range(2)]

    first, second = forward()
    assert first is second  # one stack, one text
    assert "in forward" in first.splitlines()[0] and "return [make() for _ in range(2)]" in first
    assert make() is None  # no forward on the stack: torch.fx records nothing


def test_the_nodes_of_a_build_share_their_stacks_texts_and_name_the_models_lines():
    model = tiny_model("llama", 3)
    pipe = fxpp.pipeline(model, 2, example_inputs={"input_ids": torch.ones(1, 4, dtype=torch.long)})
    graphs = [pipe.model_graph, *signature_record(pipe.model_graph).variant_graphs.values()]
    layer_calls = [n for gm in graphs for n in gm.graph.nodes if n.op == "call_module" and ".layers." in n.target]
    assert len(layer_calls) == 3 * len(graphs) and len(graphs) > 1
    assert len({id(n.stack_trace) for n in layer_calls}) == 1
    assert "modeling_llama.py" in layer_calls[0].stack_trace
    assert "hidden_states = decoder_layer(" in layer_calls[0].stack_trace
    assert all(n.stack_trace for gm in graphs for n in gm.graph.nodes if n.op not in ("placeholder", "output"))

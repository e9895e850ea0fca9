"""A second way in: ``torch.distributed.pipelining.pipeline()`` over fxpp's graph.

fxpp's own stages never depend on this. It inserts ``pipe_split()`` markers into the
rewritten whole-model graph at the pipeline's cuts and hands it to torch's splitter
(torch.export, then outlining of submodules). With torch 2.13 and transformers 5 the
export succeeds but the outlining step rejects the exported graph of transformers
decoder layers (``Cannot add placeholder ... to root module`` in
``torch/export/unflatten.py``); the function reports that as an fxpp error instead of
a torch stack trace. ``docs/runtime.md`` records the current status.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed.pipelining import pipe_split
from torch.distributed.pipelining import pipeline as torch_pipeline

from ..analysis.annotate import info
from ..errors import UnsupportedModelError
from ..spec import StageRole, StageSpec
from ..compile import build_stage_module


def with_split_markers(pipe) -> torch.fx.GraphModule:
    """The whole-model graph of ``pipe`` with ``pipe_split()`` before each cut's first layer."""
    n = pipe.layer_ranges[-1].stop
    full = build_stage_module(pipe.model, pipe.model_graph, StageSpec(StageRole.FULL, range(n), n))
    graph = copy.deepcopy(full.graph)
    starts = {r.start for r in pipe.layer_ranges[1:]}
    for node in list(graph.nodes):
        if "fxpp" in node.meta and info(node).role == "layer" and info(node).layer in starts:
            with graph.inserting_before(node):
                graph.call_function(pipe_split, ())
    graph.lint()
    return torch.fx.GraphModule(full, graph)


def split_with_torch_pipeline(pipe, microbatch: dict[str, Any]):
    """``torch.distributed.pipelining.pipeline`` on :func:`with_split_markers`' graph.

    Raises:
        UnsupportedModelError: torch's splitter cannot handle the graph (the reason quoted).
    """
    gm = with_split_markers(pipe)
    try:
        return torch_pipeline(gm, mb_args=(), mb_kwargs=microbatch)
    except Exception as e:  # noqa: BLE001 - torch's splitter raises many types
        raise UnsupportedModelError(
            f"torch.distributed.pipelining.pipeline() cannot split {type(pipe.model).__name__} at fxpp's cuts: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Use pipe.build_stage() instead"
        ) from e

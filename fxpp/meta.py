"""Every key fxpp writes on nodes and graphs, as typed records.

Torch's own keys (``val``, ``tensor_meta``, ``nn_module_stack``, ``stack_trace``) are
left as torch writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.fx import Graph, GraphModule

# Graph keys
# ----------
# ``gm.meta[...]`` of a whole-model graph (the compile driver's, ``fxpp.compile``), of a
# stage (``fxpp.stage_module.StageModule``) and of a stage's variants. A stage and its
# variants carry their model graph's records beside their own.

TRACE_KEY = "fxpp_trace"
SIGNATURE_KEY = "fxpp_signature"
STAGE_KEY = "fxpp_stage"
GRAPH_FACTS_KEY = "fxpp_graph_facts"


@dataclass(frozen=True)
class TraceRecord:
    """What one trace of the model was made from (every whole-model graph has one).

    Attributes:
        model_class: the model's class name, for messages.
        num_layers: the model's decoder layers.
        example_inputs: the inputs it was traced with (``None`` values left out).
    """

    model_class: str
    num_layers: int
    example_inputs: dict[str, Any]


@dataclass(frozen=True)
class SignatureRecord:
    """The canonical whole-model graph's input signature and what was traced for it.

    Attributes:
        signature: the ``fxpp.inputs.InputSignature`` the stages accept.
        variant_graphs: present bits -> the whole-model graph traced for that
            representative present set (Note [layout union] in ``fxpp.compile``).
        layouts: cut -> its ``fxpp.layout.CutLayout``, filled as cuts are asked for.
    """

    signature: Any
    variant_graphs: dict[int, GraphModule]
    layouts: dict[int, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageRecord:
    """What a stage graph (or a variant of it) is: its ``fxpp.spec.StageSpec``."""

    spec: Any


@dataclass(frozen=True)
class GraphFacts:
    """What a call of a stage variant needs from its graph, read once per graph.

    Attributes:
        graph: the graph these facts were read from (a recompiled variant reads them again).
        sent: the identities a FIRST or MIDDLE variant sends, in order.
        recorded: the submodules whose outputs it records (``fxpp.trace.recording``).
        guarded: whether it holds a guard (Note [guards] in ``fxpp.ops``).
    """

    graph: Graph
    sent: tuple[str, ...]
    recorded: list[tuple[str, int]]
    guarded: bool


def trace_record(gm: GraphModule) -> TraceRecord:
    return gm.meta[TRACE_KEY]


def signature_record(gm: GraphModule) -> SignatureRecord:
    return gm.meta[SIGNATURE_KEY]


def stage_record(gm: GraphModule) -> StageRecord | None:
    return gm.meta.get(STAGE_KEY)

"""Every key fxpp writes on ``node.meta`` and ``GraphModule.meta``, as typed records.

fxpp leaves torch's own node keys (``val``, ``tensor_meta``, ``nn_module_stack``,
``stack_trace``) as torch defines them and adds its own under two keys, each holding
one frozen record; readers use the accessors below, never the raw keys.

Terms
-----
node info
    ``node.meta["fxpp"]``: :class:`NodeInfo`, what a node of the traced model is
    (role, position, layer, layer type, ...), written by ``fxpp.analysis.annotate``
    (and by the passes on the nodes they create). The terms are defined in that
    module's docstring.
node facts
    ``node.meta["fxpp_facts"]``: :class:`NodeFacts`, the other facts fxpp learns about a
    node, from two writers:

    * the tracer marks a node whose Python value (not a tensor) was read from tensor
      data on the real example (``.item()``, ``.tolist()``) or computed from one
      (``from_data``): a later stage recomputes it from the tensor it came from
      (``fxpp.analysis.cuts``), so a decision on it is re-checked there;
    * ``fxpp.passes.extract_stage`` names, on a stage node, the model node it computes
      (``source``, for ``fxpp.analysis.verify``); on a stage's input placeholder, the
      model node it stands for (``crossing``) and what that value is (``identity``,
      ``fxpp.analysis.cuts.crossing_identity``); on the output of a FIRST or MIDDLE
      stage, the identity of each tensor it returns (``identities``).
source meta
    torch's ``stack_trace`` and ``nn_module_stack`` of the model node a new node is
    made for: every node a pass creates copies them (:func:`source_meta`), so an error
    on it can cite the model's source line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch.fx import Graph, GraphModule, Node

INFO_KEY = "fxpp"
FACTS_KEY = "fxpp_facts"
# torch's keys that say where a node comes from in the model's source
SOURCE_KEYS = ("stack_trace", "nn_module_stack")


# -- node keys ----------------------------------------------------------------------
@dataclass(frozen=True)
class NodeInfo:
    """fxpp's record of one node; see ``fxpp.analysis.annotate`` for the terms."""

    role: str
    position: int
    rematerialize: bool
    module: str | None = None
    layer: int | None = None
    layer_type: str | None = None
    layer_types: tuple[str, ...] = ()
    shape_only_inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeFacts:
    """The facts of one node besides its :class:`NodeInfo`; see the module docstring."""

    from_data: bool = False
    source: str | None = None
    crossing: str | None = None
    identity: str | None = None
    identities: tuple[str, ...] = ()


def node_info(node: Node) -> NodeInfo:
    return node.meta[INFO_KEY]


def has_node_info(node: Node) -> bool:
    return INFO_KEY in node.meta


def set_node_info(node: Node, record: NodeInfo) -> None:
    node.meta[INFO_KEY] = record


def node_facts(node: Node) -> NodeFacts:
    """The node's facts (all defaults when fxpp recorded none)."""
    return node.meta.get(FACTS_KEY) or _NO_FACTS


def update_facts(node: Node, **changes: Any) -> NodeFacts:
    """Replace some fields of the node's facts (a new frozen record under the key)."""
    record = dataclasses.replace(node_facts(node), **changes)
    node.meta[FACTS_KEY] = record
    return record


def is_from_data(node: Node) -> bool:
    """The node's Python value was read from tensor data (see ``from_data`` above)."""
    return node_facts(node).from_data


def mark_from_data(node: Node) -> None:
    if not is_from_data(node):
        update_facts(node, from_data=True)


def source_of(node: Node) -> str | None:
    """The name of the model node a stage node computes; None for plumbing fxpp added."""
    return node_facts(node).source


def crossing_of(node: Node) -> str | None:
    """The name of the model node a stage input placeholder stands for."""
    return node_facts(node).crossing


def identity_of(node: Node) -> str | None:
    """What a stage input placeholder receives (``fxpp.analysis.cuts.crossing_identity``)."""
    return node_facts(node).identity


def identities_of(node: Node) -> tuple[str, ...]:
    """The identity of each tensor a FIRST or MIDDLE stage's output node returns."""
    return node_facts(node).identities


def source_meta(like: Node) -> dict[str, Any]:
    """torch's source keys of ``like`` (see "source meta" above), to start a new node's meta."""
    return {k: like.meta[k] for k in SOURCE_KEYS if k in like.meta}


_NO_FACTS = NodeFacts()


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
        reads: the identity each placeholder of a MIDDLE or LAST variant receives, in order.
        fits: the received sets (identity, shape, dtype of each value) this variant was found
            to take (``fxpp.stage_module``): a call that repeats one is not checked again.
    """

    graph: Graph
    sent: tuple[str, ...]
    recorded: list[tuple[str, int]]
    guarded: bool
    reads: tuple[str | None, ...] = ()
    fits: set = field(default_factory=set)


def trace_record(gm: GraphModule) -> TraceRecord:
    return gm.meta[TRACE_KEY]


def signature_record(gm: GraphModule) -> SignatureRecord:
    return gm.meta[SIGNATURE_KEY]


def stage_record(gm: GraphModule) -> StageRecord | None:
    return gm.meta.get(STAGE_KEY)

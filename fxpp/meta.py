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
from dataclasses import dataclass
from typing import Any

from torch.fx import Node

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

"""The rewrite pass: the graph of one pipeline stage from the annotated model graph.

Reads the node info (``fxpp.meta.node_info``, from ``fxpp.analysis.annotate``) and
``node.meta["val"]``; copies both onto every node it keeps, and the model node's
``stack_trace`` and ``nn_module_stack`` onto every node it creates (``fxpp.meta.source_meta``).
Writes the node facts (``fxpp.meta.NodeFacts``): ``source`` on every kept node (the
name of the model node it computes), ``crossing`` and ``identity`` on the stage's input
placeholders (the original node name a placeholder stands for, and what that value is:
``fxpp.analysis.cuts.crossing_identity``), and ``identities`` on the output of a FIRST
or MIDDLE stage (the identity of each tensor it returns).

Before (whole model, cuts at 1 and 2)::

    input_ids, attention_mask -> embed -> mask, rotary -> layer0 -> layer1 -> layer2 -> norm -> head

After, for ``MIDDLE`` with ``layers=range(1, 2)``::

    layer0, attention_mask                    # placeholders: what crosses cut 1
    mask(inputs_embeds=layer0, attention_mask) # recomputed; layer0 stands in for the embeddings
    rotary(layer0, position_ids)               # recomputed, only the layer types this stage owns
    layer1(layer0, mask, rotary)
    return (layer1, attention_mask)            # what crosses cut 2

Nothing a stage does not need survives: a stage of only sliding-window layers keeps
no full-attention mask, a middle stage keeps no embedding and no head.
"""

from __future__ import annotations

import operator

import torch

from torch.fx import Graph, GraphModule, Node
from torch.fx._lazy_graph_module import _LazyGraphModule

from .. import ops
from ..analysis.annotate import called_modules, is_guard
from ..analysis.cuts import crossing_identity, crossing_values, leaf_identities, stream_at, substitutable
from ..errors import CutError
from ..meta import NodeInfo, is_from_data, node_info as info, set_node_info, source_meta, update_facts
from ..spec import StageRole, StageSpec
from ..trace import is_inplace_method


def extract_stage(model_gm: GraphModule, *, spec: StageSpec) -> GraphModule:
    """Return the stage ``spec`` of the annotated whole-model graph ``model_gm``.

    The returned GraphModule references the same submodules and parameters as
    ``model_gm`` (no copies), under the same qualified names.
    """
    graph = model_gm.graph
    a, b = spec.layers.start, spec.layers.stop
    inputs = None if spec.takes_model_inputs else crossing_values(graph, a)
    outputs = None if spec.returns_model_output else crossing_values(graph, b)
    stream = None if spec.takes_model_inputs else stream_at(graph, a)

    keep = _needed_nodes(graph, inputs, outputs, stream)
    modules = called_modules(model_gm)
    new = Graph()
    env: dict[Node, Node] = {}

    if inputs is None:
        for node in graph.nodes:
            if node.op == "placeholder":
                env[node] = new.node_copy(node)
    else:
        for value in inputs:
            env[value] = _receive(new, value, crossing_identity(graph, value, a, modules))

    def lookup(user: Node):
        def arg(value: Node) -> Node:
            if value in env:
                return env[value]
            if stream is not None and substitutable(user, value, stream):
                return env[stream]
            raise CutError(f"stage {spec.role.value} {spec.layers}: {user.name} needs {value.name}, which is unavailable")

        return arg

    for node in graph.nodes:
        if node.op in ("placeholder", "output") or node in env:
            continue
        if node in keep:
            env[node] = new.node_copy(node, lookup(node))
            update_facts(env[node], source=node.name)  # for verify: the model node it computes

    if outputs is None:
        (result,) = [n for n in graph.nodes if n.op == "output"]
        out = new.output(torch.fx.node.map_arg(result.args[0], lambda n: env[n]))
        out.meta = dict(result.meta)
    else:
        sent = [(crossing_identity(graph, value, b, modules), _send(new, env[value])) for value in outputs]
        out = new.output(tuple(leaf for _, leaves in sent for leaf in leaves))
        set_node_info(out, NodeInfo(role="output", position=b - 1, rematerialize=False))
        identities = tuple(name for identity, leaves in sent for name in leaf_identities(identity, len(leaves)))
        update_facts(out, identities=identities)

    new.lint()
    # its code made on first use (Note [code made on first use] in fxpp.trace.driver): a
    # StageModule or a variant is a GraphModule of its own over this one's graph
    stage = _LazyGraphModule(model_gm, new, class_name=f"Stage{spec.role.value.capitalize()}")
    stage.recompile()
    return stage


def _needed_nodes(graph: Graph, inputs: list[Node] | None, outputs: list[Node] | None, stream: Node | None) -> set[Node]:
    """Backward slice from the stage's outputs, stopping at what it receives.

    Guards (``fxpp.ops.check_guard``) are roots too, wherever the stage can evaluate
    them: a stage must notice that a shape decision it depends on no longer holds,
    even when the decision was first taken on an earlier stage.
    """
    if outputs is None:
        (out,) = [n for n in graph.nodes if n.op == "output"]
        roots = list(out.all_input_nodes)
    else:
        roots = list(outputs)
    received = set(inputs or ())
    keep = _slice(roots, received, stream, strict=False)
    last = max((info(n).position for n in roots), default=-1)
    for guard in graph.nodes:
        if is_guard(guard) and guard not in keep and info(guard).position <= last:
            extra = _slice([guard], received | keep, stream, strict=True)
            if extra is not None:
                keep |= extra
    return keep


def _slice(roots, received: set[Node], stream: Node | None, *, strict: bool) -> set[Node] | None:
    """Nodes needed for ``roots`` given ``received``; with ``strict``, None when that
    would need a value computed on an earlier stage that is not received."""
    keep: set[Node] = set()
    stack = [r for r in roots if r not in received]
    while stack:
        node = stack.pop()
        if node in keep:
            continue
        keep.add(node)
        for value in node.all_input_nodes:
            if value in received or value in keep:
                continue
            if (stream is not None and stream in received and not info(value).rematerialize
                    and substitutable(node, value, stream)):
                continue  # read for its shape: the received hidden states stand in
            if (strict and stream is not None and not info(value).rematerialize and value.op != "get_attr"
                    and not is_from_data(value)):
                return None
            stack.append(value)
    return keep


def _receive(graph: Graph, value: Node, identity: str) -> Node:
    """Placeholder(s) for a value that crossed the cut, rebuilt into its original form."""
    val = value.meta.get("val")
    if isinstance(val, (tuple, list)):
        leaves = []
        names = leaf_identities(identity, len(val))
        for i, leaf in enumerate(val):
            ph = graph.placeholder(f"{value.name}_{i}")
            ph.meta = {**source_meta(value), "val": leaf}
            set_node_info(ph, info(value))
            _mark_received(ph, value.name, names[i])
            leaves.append(ph)
        kind = "list" if isinstance(val, list) else "tuple"
        packed = graph.call_function(ops.pack, (kind, *leaves))
        packed.meta = dict(value.meta)
        return packed
    ph = graph.placeholder(value.name)
    ph.meta = dict(value.meta)
    _mark_received(ph, value.name, identity)
    if _written_in_place(value):
        # A received tensor is a leaf of this stage's autograd graph (and a schedule's
        # receive buffer): write into a copy, as the forward wrote into its own tensor.
        copy = graph.call_method("clone", (ph,))
        copy.meta = dict(value.meta)
        return copy
    return ph


def _mark_received(ph: Node, crossing: str, identity: str) -> None:
    """A stage input placeholder's facts: the model node it stands for and what it receives."""
    update_facts(ph, crossing=crossing, identity=identity, source=None)


def _written_in_place(value: Node) -> bool:
    """Some user of ``value`` writes into it (``t.scatter_add_(...)``, ``t[mask] = v``)."""
    return any((u.op == "call_method" and is_inplace_method(u.target) and u.args and u.args[0] is value)
               or (u.op == "call_function" and u.target is ops.setitem and u.args and u.args[0] is value)
               for u in value.users)


def _send(graph: Graph, node: Node) -> list[Node]:
    """The flat, contiguous tensors a crossing value is sent as.

    Point-to-point sends need contiguous tensors; a crossing value may be a view
    (Gemma 4's per-layer input slices). ``contiguous()`` is free when it already is.
    Floating views and passed-on inputs are cloned (see the comment below).
    """
    val = node.meta.get("val")
    leaves = []
    if isinstance(val, (tuple, list)):
        for i, leaf in enumerate(val):
            g = graph.call_function(operator.getitem, (node, i))
            g.meta = {**source_meta(node), "val": leaf}
            set_node_info(g, info(node))
            leaves.append(g)
    else:
        leaves = [node]
    out = []
    for leaf in leaves:
        val = leaf.meta["val"]
        if val.is_floating_point() and (leaf.op == "placeholder" or val._is_view()):
            # Zero-bubble schedules detach stage outputs in place, which views (and a
            # received tensor passed straight on) do not allow: send a fresh copy.
            copy = graph.call_method("clone", (leaf,), {"memory_format": torch.contiguous_format})
            copy.meta = {**source_meta(node), "val": val.contiguous()}
            set_node_info(copy, info(node))
            out.append(copy)
            continue
        if val.is_contiguous():
            out.append(leaf)
            continue
        c = graph.call_method("contiguous", (leaf,))
        c.meta = {**source_meta(node), "val": val.contiguous()}
        set_node_info(c, info(node))
        out.append(c)
    return out


__all__ = ["extract_stage", "StageRole"]

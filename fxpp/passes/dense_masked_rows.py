"""Send values that are added into masked rows of a tensor as dense ``[B, S, ...]`` tensors.

Reads ``node.meta["fxpp"]`` (positions, from ``fxpp.analysis.annotate``) and ``node.meta["val"]``;
writes both on the nodes it creates, with the ``stack_trace`` and ``nn_module_stack`` of the
model node each one is made for (``fxpp.meta.source_meta``).

A pipeline stage's receive buffers have one static shape for every microbatch. Most
values that cross a cut are shaped by the text (``[B, S, H]``), but some are shaped
by the media a microbatch holds: Qwen3-VL adds its deepstack visual features, one row
per image token (``[N, H]``), into the hidden states of several decoder layers,

    h[mask, :] = h[mask, :] + features          # mask: [B, S] bool, features: [N, H]

so with a cut before such a layer, ``N`` would have to be the same in every
microbatch. The graph says what ``N`` is: ``features`` is combined elementwise with
``h[mask]``, whose rows are ``mask``'s ``True`` positions. This pass rewrites every
such use whose value could cross a cut (it is computed at an earlier layer position
than the combine) into a dense tensor placed where it is computed and gathered back
where it is used:

Before::

    features = vision(...)                       # position -1, [N, H]
    m = input_ids == image_token                 # position -1, [B, S]
    r = getitem(h3, (m, :))                      # position 3
    add(r, features.to(h3.dtype))                # position 3

After::

    features = vision(...)
    dense = scatter_rows(features, m)            # position -1, [B, S, H], crosses cuts
    again = gather_rows(dense, m)                # recomputed where it is needed
    add(r, again.to(h3.dtype))

Both ops copy rows exactly, so values and gradients are unchanged; the dense tensor
costs ``B * S * H`` elements on the wire instead of ``N * H``.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from .. import ops
from ..meta import NodeInfo, node_info as info, set_node_info, source_meta

_COMBINE_FUNCTIONS = frozenset({operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul})
_COMBINE_METHODS = frozenset({"add", "sub", "mul"})
# Unary methods that keep a tensor's shape and rows (dtype/device moves, copies).
_ROW_PRESERVING_METHODS = frozenset({"to", "type", "type_as", "float", "half", "bfloat16", "contiguous", "clone"})


def is_elementwise_combine(node: Node) -> bool:
    if node.op == "call_function":
        return node.target in _COMBINE_FUNCTIONS
    return node.op == "call_method" and node.target in _COMBINE_METHODS


def row_preserving_input(node: Node) -> Node | None:
    """The tensor a shape- and row-preserving unary op (``x.to(dtype)``) reads, else None."""
    if node.op == "call_method" and node.target in _ROW_PRESERVING_METHODS and isinstance(node.args[0], Node):
        return node.args[0]
    return None


def strip_row_preserving(node: Node) -> Node:
    while (up := row_preserving_input(node)) is not None:
        node = up
    return node


def masked_rows_mask(node: Node) -> Node | None:
    """``m`` when ``node`` is ``t[m]`` or ``t[m, :, ...]`` with a boolean ``m`` over
    ``t``'s leading dimensions: the rows of ``t`` at ``m``'s ``True`` positions."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    source, index = node.args
    if isinstance(index, tuple):
        if not index or any(i != slice(None) and i is not Ellipsis for i in index[1:]):
            return None
        index = index[0]
    if not isinstance(index, Node) or not isinstance(source, Node):
        return None
    mask, tensor = index.meta.get("val"), source.meta.get("val")
    if not isinstance(mask, torch.Tensor) or not isinstance(tensor, torch.Tensor) or mask.dtype != torch.bool:
        return None
    return index if tuple(tensor.shape[: mask.ndim]) == tuple(mask.shape) else None


def dense_masked_rows(gm: GraphModule) -> GraphModule:
    """Rewrite values combined with masked rows of a later tensor to cross cuts densely
    (see the module docstring). Returns ``gm``, rewritten in place."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    dense_of: dict[tuple[Node, Node], Node] = {}
    for combine in list(graph.nodes):
        if not is_elementwise_combine(combine):
            continue
        operands = [a for a in combine.args[:2] if isinstance(a, Node)]
        if len(operands) != 2:
            continue
        for rows_side, other in (operands, operands[::-1]):
            mask = masked_rows_mask(strip_row_preserving(rows_side))
            found = _earlier_rows(other, combine, rows_side, mask)
            if found is None:
                continue
            value, link, sender_mask = found
            if order[sender_mask] > order[link]:
                continue  # no place in graph order to gather before the use
            key = (value, sender_mask)
            if key not in dense_of:
                after = max(value, sender_mask, key=order.__getitem__)
                with graph.inserting_after(after):
                    dense_of[key] = _new_node(graph, ops.scatter_rows, (value, sender_mask), value,
                                              _dense_val(value, sender_mask), rematerialize=False)
            with graph.inserting_before(link):
                again = _new_node(graph, ops.gather_rows, (dense_of[key], sender_mask), value,
                                  value.meta["val"], rematerialize=True)
            link.replace_input_with(value, again)
            order = {n: i for i, n in enumerate(graph.nodes)}
            break
    graph.lint()
    if dense_of:  # else the code is the graph's already
        gm.recompile()
    return gm


def _earlier_rows(operand: Node, combine: Node, rows_side: Node, mask: Node | None) -> tuple[Node, Node, Node] | None:
    """``(value, link, sender_mask)`` when ``operand`` is, up to row-preserving ops, a
    value computed at an earlier layer position than ``combine`` with exactly the shape
    of the masked rows ``rows_side``; ``link`` is the node that reads it and
    ``sender_mask`` is ``mask`` before its device moves. None otherwise."""
    if mask is None:
        return None
    here = info(combine).position
    link, value = combine, operand
    while info(value).position >= here:
        up = row_preserving_input(value)
        if up is None:
            return None
        link, value = value, up
    val, rows = value.meta.get("val"), rows_side.meta.get("val")
    if not isinstance(val, torch.Tensor) or not isinstance(rows, torch.Tensor) or tuple(val.shape) != tuple(rows.shape):
        return None
    if info(value).rematerialize or here < max(info(value).position + 1, 1):
        return None  # recomputed anyway, or never separated from its use by a cut
    sender_mask = strip_row_preserving(mask)
    smask, m = sender_mask.meta.get("val"), mask.meta["val"]
    if not isinstance(smask, torch.Tensor) or smask.dtype != torch.bool or tuple(smask.shape) != tuple(m.shape):
        return None
    if info(sender_mask).position > info(value).position:
        return None  # the stage that computes the value cannot compute the mask
    return value, link, sender_mask


def _dense_val(value: Node, mask: Node) -> torch.Tensor:
    val, m = value.meta["val"], mask.meta["val"]
    return val.new_zeros(*m.shape, *val.shape[1:])


def _new_node(graph, target, args, like: Node, val, *, rematerialize: bool) -> Node:
    node = graph.call_function(target, args)
    node.meta = {**source_meta(like), "val": val}
    set_node_info(node, NodeInfo(role="compute", position=info(like).position, rematerialize=rematerialize))
    return node

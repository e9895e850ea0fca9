"""Re-check, on every call, that a mask the traced forward computed with is still a mask.

Reads nothing from ``node.meta["fxpp"]`` (it runs before annotation); every node it
inserts copies the builder's ``node.meta``.

A mask builder (``transformers.masking_utils.create_*_mask``) returns ``None`` when
attention needs no explicit mask: causal SDPA with an all-ones padding mask. The
tracer gives the forward that ``None`` where the builder returns it for the example
(a ``check_is_none`` guard then re-checks it, ``fxpp.trace.patching``). Where the
builder returned a mask and the forward itself computed with it (Gemma 4 slices it
before its KV-shared layers, GLM-5 Next casts it with ``.bool()``), the traced graph
follows the forward's ``mask is not None`` branch. A call whose builder returns
``None`` takes the forward's other branch, which may do something else entirely
(GLM-5 Next builds an all-ones mask of its own), so passing ``None`` through the
traced ops could be a silent wrong answer. A ``check_is_not_none`` guard after the
builder makes such a call retrace instead, on the branch the forward takes.

Masks handed straight to a leaf module (a decoder layer) need no guard: the module
itself receives ``None``, as in the unpatched forward.

Before::

    m = create_causal_mask(...)
    m2 = getitem(m, idx)
    layer(h, attention_mask=m2)

After::

    m = create_causal_mask(...)
    check_is_not_none(m, "...")
    m2 = getitem(m, idx)
    layer(h, attention_mask=m2)
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from .. import ops
from ..trace.source_lines import recorded_user_frame
from ..trace import is_mask_builder


def _computes_with(node: Node) -> bool:
    """Whether ``node`` is forward code applied to a value (not a leaf module call, not a guard)."""
    return node.op in ("call_function", "call_method") and node.target not in ops.GUARD_OPS


def guard_mask_branches(gm: GraphModule) -> GraphModule:
    """Add a ``check_is_not_none`` guard after each mask builder whose output the forward
    computes with (directly or through other such ops)."""
    root: dict[Node, Node] = {}  # value derived from a mask -> the builder call it comes from
    guarded: list[Node] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and is_mask_builder(node.target):
            root[node] = node
            continue
        if not _computes_with(node):
            continue
        for value in node.all_input_nodes:  # the mask in any argument (a & mask, torch.cat([m, ...]))
            if value in root:
                root[node] = root[value]
                if root[value] not in guarded:
                    guarded.append(root[value])
    for builder in guarded:
        with gm.graph.inserting_after(builder):
            source = recorded_user_frame(builder.meta.get("stack_trace"))
            where = f"mask builder {builder.name}" + (f" ({source})" if source else "")
            guard = gm.graph.call_function(ops.check_is_not_none, (builder, where))
            guard.meta = dict(builder.meta)
            guard.meta["val"] = None
    gm.graph.lint()
    if guarded:  # else the code is the graph's already
        gm.recompile()
    return gm

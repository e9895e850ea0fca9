"""Let ops on attention masks pass ``None`` through.

Reads nothing from ``node.meta["fxpp"]`` (it runs before annotation); keeps
``node.meta`` of every node it rewrites.

A mask builder (``transformers.masking_utils.create_*_mask``) returns a tensor while
tracing but may return ``None`` at run time (SDPA with a causal-only mask). Traced
code guarded by ``if mask is not None`` took the tensor branch, so an op applied to
the mask (Gemma 4 slices it before its KV-shared layers) would fail on ``None``.

Before::

    m = create_causal_mask(...)
    m2 = getitem(m, idx)
    layer(h, attention_mask=m2)

After::

    m = create_causal_mask(...)
    m2 = unless_none("_operator.getitem", m, idx)
    layer(h, attention_mask=m2)
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from .. import ops
from ..trace import is_mask_builder


def none_safe_masks(gm: GraphModule) -> GraphModule:
    """Rewrite ops whose first argument is (derived from) a mask builder's output."""
    maybe_none: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and is_mask_builder(node.target):
            maybe_none.add(node)
            continue
        first = node.args[0] if node.args else None
        if not (isinstance(first, Node) and first in maybe_none) or node.target in ops.GUARD_OPS:
            continue  # a guard must see the None it checks
        if node.op == "call_function":
            name = f"{node.target.__module__}.{node.target.__name__}"
            if ops.resolve(name) is not node.target:
                continue
            node.args = (name, *node.args)
            node.target = ops.unless_none
            maybe_none.add(node)
        elif node.op == "call_method":
            node.args = (node.target, *node.args)
            node.op = "call_function"
            node.target = ops.method_unless_none
            maybe_none.add(node)
    gm.graph.lint()
    gm.recompile()
    return gm

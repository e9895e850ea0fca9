"""What each node of a traced model is: ``node.meta["fxpp"]``.

The rewrite passes read only these records and the graph itself, never the model
family's name.

Terms
-----
role
    ``input`` (placeholder), ``param`` / ``constant`` (get_attr), ``embed``
    (token or per-layer embedding), ``vision`` / ``audio`` / ``prelude`` (other
    parameterised modules before the first decoder layer: towers, projectors),
    ``mask`` (a mask builder call), ``rotary`` (a rotary-embedding module),
    ``layer`` (a decoder layer), ``state`` (explicit shared-state plumbing, see
    ``fxpp.ops``), ``guard``, ``norm`` and ``head`` (modules after the last layer),
    ``compute`` (any other op) and ``output``.
position
    The index of the last decoder layer the node depends on, -1 if it depends on none.
    A stage that owns layers ``[a, b)`` computes the nodes whose position is in
    ``[a, b)`` (plus, on the first stage, everything at -1).
rematerialize
    The node is recomputed on every stage that needs it instead of being sent across
    a cut: non-tensor values (shapes, dtypes, containers), constants and parameters,
    and tensors computed before the first layer from model inputs alone (masks,
    rotary embeddings, position ids). Model inputs themselves are sent.
shape-only input
    An input a node reads only for its shape, dtype and device (``x.shape``, a mask
    builder's ``inputs_embeds``, a rotary embedding's ``x``). A later stage substitutes
    the hidden states it receives, which have the same shape, so a mask never needs
    the token embeddings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from .. import ops
from ..meta import NodeInfo, node_info as info, set_node_info
from ..trace import MASK_SHAPE_ONLY_KWARGS, is_check_function, is_mask_builder

_SHAPE_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda"})
_SHAPE_METHODS = frozenset({"size", "dim", "get_device"})

__all__ = ["NodeInfo", "annotate", "info", "is_decoder_layer", "is_guard", "is_rotary_module", "is_tensorish",
           "rechecked_on_every_stage", "shape_only_inputs"]


# -- predicates --------------------------------------------------------------------
def is_decoder_layer(node: Node) -> bool:
    return info(node).role == "layer"


def is_guard(node: Node) -> bool:
    """A shape guard or a model's own runtime assertion: a node kept for its check only."""
    return node.op == "call_function" and (node.target in ops.GUARD_OPS or is_check_function(node.target))


def rechecked_on_every_stage(node: Node) -> bool:
    """A guard on a decision taken on tensor data: whether a mask builder returned a mask
    (``check_is_none`` / ``check_is_not_none``), or a Python ``if`` on data
    (``check_data``). What follows the decision may run on any later stage (layers given
    ``None`` for a mask), so every stage re-checks it, on the decision's own inputs."""
    return node.op == "call_function" and node.target in (ops.check_is_none, ops.check_is_not_none,
                                                           ops.check_data)


def is_tensorish(value: Any) -> bool:
    """A tensor, or a flat tuple/list of tensors: what can cross a cut."""
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and len(value) > 0 and all(isinstance(v, torch.Tensor) for v in value)


def is_rotary_module(module: torch.nn.Module) -> bool:
    has_params = any(True for _ in module.parameters(recurse=True))
    return not has_params and ("Rotary" in type(module).__name__ or hasattr(module, "inv_freq"))


def shape_only_inputs(node: Node, module: torch.nn.Module | None) -> tuple[Node, ...]:
    """Inputs of ``node`` that it reads only for shape, dtype and device."""
    if node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRS:
        return (node.args[0],) if isinstance(node.args[0], Node) else ()
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return (node.args[0],) if isinstance(node.args[0], Node) else ()
    if node.op == "call_function" and is_mask_builder(node.target):
        found = [node.kwargs[k] for k in MASK_SHAPE_ONLY_KWARGS if isinstance(node.kwargs.get(k), Node)]
        others = set()
        for k, v in node.kwargs.items():
            if k not in MASK_SHAPE_ONLY_KWARGS:
                torch.fx.node.map_arg(v, others.add)
        torch.fx.node.map_arg(node.args, others.add)
        return tuple(n for n in found if n not in others)
    if node.op == "call_module" and module is not None and is_rotary_module(module):
        x = node.args[0] if node.args else node.kwargs.get("x")
        if isinstance(x, Node):
            rest = set()
            torch.fx.node.map_arg((node.args[1:], node.kwargs), rest.add)
            if x not in rest:
                return (x,)
    return ()


def called_modules(gm: GraphModule) -> dict[str, torch.nn.Module]:
    """``{target: module}`` of the graph's ``call_module`` nodes: the modules a pass looks
    up, without a walk over every submodule of the model (``named_modules`` of an 8B
    model visits some 420 modules; its graph calls some 36)."""
    return {n.target: _submodule(gm, n.target) for n in gm.graph.nodes if n.op == "call_module"}


def _submodule(root: torch.nn.Module, target: str) -> torch.nn.Module:
    """``root.get_submodule(target)`` through each module's ``_modules`` (where
    ``named_modules`` finds its children), without the attribute lookups that make
    ``get_submodule`` cost a few microseconds per dotted part; anything else is
    ``get_submodule``'s, with its errors."""
    module = root
    for part in target.split("."):
        child = module._modules.get(part)
        if child is None:
            return root.get_submodule(target)
        module = child
    return module


# -- the annotation pass -------------------------------------------------------------
def annotate(gm: GraphModule, *, layers_fqn: str, layer_types: list[str] | None, input_embeddings, output_embeddings) -> GraphModule:
    """Write ``node.meta["fxpp"]`` on every node of a traced model.

    Reads ``node.meta["val"]`` (from the tracer); writes ``node.meta["fxpp"]``.
    The graph itself is unchanged.
    """
    graph = gm.graph
    modules = called_modules(gm)
    prefix = layers_fqn + "."
    position: dict[Node, int] = {}
    remat: dict[Node, bool] = {}
    records: dict[Node, dict] = {}

    media = _media_inputs(graph, modules, prefix)
    for node in graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        shape_only = shape_only_inputs(node, module)
        layer = None
        if node.op == "call_module" and node.target.startswith(prefix) and node.target[len(prefix):].isdigit():
            layer = int(node.target[len(prefix):])
        inputs = node.all_input_nodes
        if layer is not None:
            pos = layer
        else:
            pos = max((position[i] for i in inputs), default=-1)
        position[node] = pos
        val = node.meta.get("val")
        has_params = module is not None and any(True for _ in module.parameters())
        if node.op == "placeholder" or node.op == "output":
            rm = False
        elif node.op == "get_attr":
            rm = True
        elif layer is not None or has_params:
            rm = False
        elif not is_tensorish(val):
            rm = True
        else:
            rm = pos == -1 and all(
                remat[i] or (i.op == "placeholder" and i not in media) or i in shape_only for i in inputs
            )
        remat[node] = rm
        records[node] = dict(
            role=_role(node, module, layer, pos, input_embeddings, output_embeddings),
            position=pos,
            rematerialize=rm,
            module=node.target if node.op == "call_module" else None,
            layer=layer,
            layer_type=(layer_types[layer] if layer is not None and layer_types else None),
            shape_only_inputs=tuple(n.name for n in shape_only),
        )

    for node in graph.nodes:
        if records[node]["role"] in ("mask", "rotary"):
            records[node]["layer_types"] = tuple(sorted(_consumer_layer_types(node, records)))
        set_node_info(node, NodeInfo(**records[node]))
    return gm


def _media_inputs(graph: Graph, modules: dict, layer_prefix: str) -> set[Node]:
    """Model inputs that an encoder (vision or audio tower, projector) reads.

    Their shapes follow the images or audio a microbatch holds (one row per image),
    while pipeline stages need the same shapes on every microbatch. So a value computed
    from them (Qwen-VL's multimodal position ids) is sent as itself, with its
    per-sample shape, rather than recomputed on a later stage from the media inputs.
    """
    found = set()
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        for user in node.users:
            module = modules.get(user.target) if user.op == "call_module" else None
            if (module is not None and not user.target.startswith(layer_prefix)
                    and not isinstance(module, torch.nn.Embedding) and any(True for _ in module.parameters())):
                found.add(node)
    return found


def _role(node: Node, module, layer, pos, input_embeddings, output_embeddings) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return "param" if isinstance(node.meta.get("val"), torch.Tensor) else "constant"
    if node.op == "call_function":
        if is_mask_builder(node.target):
            return "mask"
        if node.target in (ops.make_state, ops.state_entry):
            return "state"
        if is_guard(node):
            return "guard"
        return "compute"
    if node.op == "call_method":
        return "compute"
    # call_module
    if layer is not None:
        return "layer"
    if module is input_embeddings or isinstance(module, torch.nn.Embedding):
        return "embed"
    if module is output_embeddings:
        return "head"
    if is_rotary_module(module):
        return "rotary"
    if pos >= 0:
        return "norm"
    name = node.target.lower()
    if "audio" in name:
        return "audio"
    if any(k in name for k in ("vision", "visual", "image", "projector", "patch")):
        return "vision"
    return "prelude"


def _consumer_layer_types(node: Node, records: dict[Node, dict]) -> set[str]:
    """Layer types of the decoder layers that consume ``node`` (through non-layer nodes)."""
    found: set[str] = set()
    seen = {node}
    stack = list(node.users)
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        rec = records[user]
        if rec["layer"] is not None:
            found.add(rec["layer_type"] or "full_attention")
            continue
        stack.extend(user.users)
    return found


def describe(graph: Graph) -> str:
    """A compact ``node -> role [position]`` listing, for golden tests and docs."""
    lines = []
    for node in graph.nodes:
        rec = info(node)
        extra = f" {rec.layer_type}" if rec.layer_type else ""
        if rec.layer_types:
            extra += " for " + ",".join(rec.layer_types)
        lines.append(f"{node.name}: {rec.role} @{rec.position}{' remat' if rec.rematerialize else ''}{extra}")
    return "\n".join(lines)

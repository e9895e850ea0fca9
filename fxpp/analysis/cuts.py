"""What crosses a cut: liveness over an annotated graph.

Cut ``k`` (``0 < k < L``) lies between decoder layers ``k - 1`` and ``k``. The values
that cross it are the nodes that

* something at or after the cut needs (a layer ``>= k``, a node whose position is
  ``>= k``, the graph output, or a rematerialized node any of those need), and
* are computed before the cut (position ``< k``) and are not rematerialized.

A shape-only use of such a value (see ``fxpp.analysis.annotate``) does not make it cross: the
later stage substitutes its incoming hidden states, the *stream* at the cut, when
their shapes agree. The result depends only on the graph and ``k``, so any two stages
with ``a.layers.stop == b.layers.start`` fit together.
"""

from __future__ import annotations

import hashlib
import inspect
import operator
import weakref

import torch
from torch.fx import Graph, Node

from .. import ops
from ..errors import CutError
from ..meta import is_from_data
from .annotate import info, is_guard, is_tensorish, rechecked_on_every_stage


def layer_nodes(graph: Graph) -> dict[int, Node]:
    return {info(n).layer: n for n in graph.nodes if info(n).role == "layer"}


def stream_at(graph: Graph, k: int) -> Node:
    """The hidden states entering decoder layer ``k`` (or the next layer the forward calls)."""
    layers = layer_nodes(graph)
    present = sorted(i for i in layers if i >= k)
    if not present:
        return _stream_after_last_layer(layers, k)
    layer = layers[present[0]]
    first = layer.args[0] if layer.args else layer.kwargs.get("hidden_states")
    if not isinstance(first, Node):
        raise CutError(f"{layer.target}: first argument is not a traced value, cannot find the hidden states")
    return first


def _stream_after_last_layer(layers: dict[int, Node], k: int) -> Node:
    """The hidden states leaving the last layer the forward calls, for a cut after it.

    A forward may skip layers for some inputs (Mllama without images skips its
    cross-attention layers): a cut after the last layer it calls still lies between
    that layer and the final norm, so the stages after it call no layer and pass the
    hidden states on to the last stage's norm and head.
    """
    before = sorted(i for i in layers if i < k)
    if not before:
        raise CutError(f"cut {k}: the traced forward calls no decoder layer")
    last = layers[before[-1]]
    if is_tensorish(last.meta.get("val")) and isinstance(last.meta.get("val"), torch.Tensor):
        return last
    firsts = [u for u in last.users if u.op == "call_function" and u.target is operator.getitem and u.args[1:] == (0,)]
    if len(firsts) == 1:
        return firsts[0]
    raise CutError(f"cut {k}: the traced forward calls no decoder layer at or after {k}, and the output of "
                   f"{last.target} is not a tensor whose hidden states fxpp can find")


def same_shape(a: Node, b: Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    try:
        return tuple(va.shape) == tuple(vb.shape) and va.dtype == vb.dtype
    except AttributeError:
        return False


def substitutable(user: Node, value: Node, stream: Node) -> bool:
    """``user`` reads ``value`` only for its shape, and the stream has the same shape."""
    return value.name in info(user).shape_only_inputs and same_shape(value, stream)


def crossing_values(graph: Graph, k: int) -> list[Node]:
    """The nodes whose values cross cut ``k``: the hidden states, then the rest in graph order.

    Raises:
        CutError: a value that must cross is not a tensor or a flat tuple of tensors.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    stream = stream_at(graph, k)
    # Guards on data decisions are needed on every stage: a call on which a mask builder
    # returns a mask (packed positions) where the trace saw None must retrace every stage,
    # not only the first; so the decision's inputs cross every cut.
    needed = [n for n in graph.nodes if n.op == "output" or (info(n).position >= k and not is_guard(n))
              or rechecked_on_every_stage(n)]
    seen = set(needed)
    crossing: set[Node] = set()
    while needed:
        node = needed.pop()
        for value in node.all_input_nodes:
            if value in seen or value in crossing:
                continue
            rec = info(value)
            if rec.position >= k:
                continue
            if rec.rematerialize or is_from_data(value):
                # recomputed after the cut: a mask, rotary, or a scalar read from a tensor
                # (which crosses instead: a Python value cannot)
                seen.add(value)
                needed.append(value)
            elif substitutable(node, value, stream):
                continue
            else:
                crossing.add(value)
    for value in crossing:
        if not is_tensorish(value.meta.get("val")):
            users = sorted((u.name for u in value.users), key=str)
            raise CutError(
                f"cut {k}: {value.name} ({value.op} {value.target}) is needed after the cut by {users} but is a "
                f"{type(value.meta.get('val')).__name__}, not a tensor; move the cut or keep its users on one stage"
            )
    # The hidden states go first (the API's promise), the rest in graph order.
    return sorted(crossing, key=lambda n: (n is not stream, order[n]))


def crossing_identity(graph: Graph, node: Node, k: int, modules: dict | None = None) -> str:
    """What a crossing value *is*, stable across traces of one model with other inputs.

    The receiving stage matches the values it gets by these names, not by their
    position in the tuple (see ``fxpp.layout``). The description of
    :func:`describe_crossing` where it names the value by the model's own structure
    (hidden states, an input, a shared-state key, the parameter of the later layer
    that reads it); elsewhere the consuming modules, never a node name that a
    retrace may number differently.
    """
    if node.op == "call_function" and node.target is ops.scatter_rows:
        return "dense " + crossing_identity(graph, node.args[0], k, modules)
    if node.op == "call_function" and node.target is ops.take_recorded:
        path, index, occurrence = node.args
        return f"recorded output {index} of {path}" + (f" (call {occurrence})" if occurrence else "")
    described = describe_crossing(graph, node, k, modules)
    if described.startswith("read by ") or described == info(node).role:
        what = node.target if node.op == "call_module" else getattr(node.target, "__name__", str(node.target))
        return f"{node.op} {what} {structural_key(node)}"
    return described


def structural_key(node: Node) -> str:
    """A short hash of how ``node`` is computed: its op, target, constants and the keys of its inputs.

    Inputs are named by what they are (``input x``, the n-th call of a module, a
    recorded output), never by node names, so the same computation in another trace of
    the model (other inputs present, other shapes, another process) has the same key.
    Two nodes computed the same way get ``#1``, ``#2``, ... in graph order: they may be
    written in place later (``torch.zeros(n).scatter_add_(...)`` once per layer), so
    they must stay two values.
    """
    keys = _STRUCTURAL_KEYS.get(node.graph)
    if keys is None or node not in keys:
        keys = _structural_keys(node.graph)
        _STRUCTURAL_KEYS[node.graph] = keys
    return keys[node]


_STRUCTURAL_KEYS: "weakref.WeakKeyDictionary[Graph, dict[Node, str]]" = weakref.WeakKeyDictionary()


def _structural_keys(graph: Graph) -> dict[Node, str]:
    keys: dict[Node, str] = {}
    seen: dict[str, int] = {}
    module_calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":  # the n-th call of each module
            text = f"module {n.target}#{module_calls.get(n.target, 0)}"
            module_calls[n.target] = module_calls.get(n.target, 0) + 1
        elif n.op == "placeholder":
            text = f"input {n.target}"
        elif n.op == "call_function" and n.target is ops.take_recorded:
            text = f"recorded {n.args}"
        elif n.op == "get_attr":
            val = n.meta.get("val")
            text = (f"tensor {tuple(val.shape)} {val.dtype}" if isinstance(val, torch.Tensor)
                    else f"constant {type(val).__name__}")
        else:
            target = getattr(n.target, "__qualname__", None) or str(n.target)
            args = torch.fx.node.map_aggregate(n.args, lambda a: keys[a] if isinstance(a, Node) else repr(a))
            kwargs = {k: (keys[v] if isinstance(v, Node) else repr(v)) for k, v in sorted(n.kwargs.items())}
            text = f"{n.op} {target} {args} {kwargs}"
        digest = hashlib.sha1(text.encode()).hexdigest()[:12]
        count = seen.get(digest, 0)
        seen[digest] = count + 1
        keys[n] = digest if count == 0 else f"{digest}#{count}"
    return keys


def leaf_identities(identity: str, count: int) -> list[str]:
    """The identity of each tensor a crossing value is sent as (tuples are flattened)."""
    return [identity] if count == 1 else [f"{identity}[{i}]" for i in range(count)]


def crossing_slots(graph: Graph, k: int, modules: dict | None = None) -> list[tuple[str, object]]:
    """``(identity, meta value)`` of each tensor that crosses cut ``k``, in the order it is sent."""
    slots = []
    for value in crossing_values(graph, k):
        val = value.meta.get("val")
        leaves = list(val) if isinstance(val, (tuple, list)) else [val]
        slots.extend(zip(leaf_identities(crossing_identity(graph, value, k, modules), len(leaves)), leaves))
    return slots


def describe_crossing(graph: Graph, node: Node, k: int, modules: dict | None = None) -> str:
    """What a crossing value is, in the model's own words, for plans and docs.

    The hidden states; a model input; a shared-state entry and who wrote it; or the
    parameter of the first later layer that reads it (``per_layer_input of
    model.layers.3``), named from that layer's forward signature.
    """
    if node is stream_at(graph, k):
        return "hidden states"
    if node.op == "placeholder":
        return f"input {node.target}"
    if node.op == "call_function" and node.target is ops.scatter_rows:
        rows, mask = node.args
        return f"{rows.name} placed densely at the True positions of {mask.name}"
    if node.op == "call_function" and node.target is ops.state_entry:
        writer = node.kwargs.get("after")
        return f"shared state {node.args[1]!r} from {getattr(writer, 'target', '?')}"
    later = sorted((u for u in node.users if info(u).position >= k or info(u).layer == k),
                   key=lambda u: (info(u).position, u.name))
    for user in later:
        if info(user).role != "layer":
            continue
        for name, value in user.kwargs.items():
            if value is node:
                return f"{name} of {user.target}"
        for i, value in enumerate(user.args):
            if value is node:
                module = (modules or {}).get(user.target)
                if module is not None:
                    params = [p for p in inspect.signature(module.forward).parameters]
                    if i < len(params):
                        return f"{params[i]} of {user.target}"
                return f"argument {i} of {user.target}"
    return f"read by {later[0].name}" if later else info(node).role

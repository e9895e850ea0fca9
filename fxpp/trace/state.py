"""Mutable state a leaf call receives, lifted into the graph: state containers and own caches.

Terms
-----
state container
    A mutable mapping, not a plain ``dict``, that a forward passes to its layers and
    that they write into (``KVSharingDict``: a later layer reads the keys and values an
    earlier one shared). Passed to a leaf it becomes an explicit ``make_state`` node
    (its entries as inputs), and each entry a call writes an explicit
    ``state_entry(state, key, after=<the call>)`` node, so the cross-layer dataflow is
    visible to the passes (see ``fxpp.ops``).
own cache
    A key/value cache the forward creates itself and passes to its layers even with
    ``use_cache=False`` (XLM): each layer call gets an empty copy of it
    (``fresh_cache`` nodes), once the trace proves no slot is shared (Note [own caches]
    in ``fxpp.trace.caches``).
"""

from __future__ import annotations

import collections.abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch.fx import Node, Proxy

from .. import ops
from ..errors import TraceError
from .caches import OwnCache, is_kv_cache
from .source_lines import short_stack

if TYPE_CHECKING:  # the tracer passes itself in; only its type is named here
    from .tracer import HFTracer


@dataclass
class _StateRecord:
    """A mutable container seen during the trace and the node of each entry's writer."""

    entries: dict = field(default_factory=dict)


def _items(obj: Any) -> list:
    return list(obj.items())


def is_state_container(value: Any) -> bool:
    return (
        isinstance(value, collections.abc.MutableMapping)
        and not isinstance(value, dict)
        and not any(isinstance(v, Proxy) for v in value.values())
    )


class StateLifting:
    """The state containers and own caches ``tracer``'s leaf calls receive."""

    def __init__(self, tracer: "HFTracer"):
        self.tracer = tracer
        self._states: dict[int, _StateRecord] = {}
        self._own_caches: dict[int, OwnCache] = {}  # Note [own caches] in fxpp.trace.caches

    # -- state containers --------------------------------------------------------------
    def lift_states(self, args, kwargs):
        """Replace mutable containers passed to a leaf by explicit ``make_state`` nodes.

        Returns the new arguments and, per container, the container, its proxy and its
        entries before the call (for :meth:`record_writes`).
        """
        tracer = self.tracer
        states: dict[int, tuple[Any, Proxy, dict]] = {}

        def lift(value: Any) -> Any:
            if is_state_container(value):
                record = self._states.setdefault(id(value), _StateRecord())
                entries = {k: record.entries.get(k, v) for k, v in _items(value)}
                if any(not isinstance(v, Proxy) for v in entries.values()):
                    raise TraceError(
                        f"{type(tracer.model).__name__}: a {type(value).__name__} passed to a layer holds "
                        "values that were not produced inside the traced forward"
                    )
                proxy = tracer.create_proxy("call_function", ops.make_state, (type(value), entries), {})
                # The meta value is the live container itself: the layer's meta
                # evaluation writes into it and we diff it afterwards.
                proxy.node.meta["val"] = value
                states[id(value)] = (value, proxy, None)
                return proxy
            return value

        args, kwargs = tuple(lift(a) for a in args), {k: lift(v) for k, v in kwargs.items()}
        return args, kwargs, {sid: (obj, proxy, dict(_items(obj))) for sid, (obj, proxy, _) in states.items()}

    def record_writes(self, states: dict, out: Proxy) -> None:
        """A ``state_entry`` node for each entry the leaf call ``out`` wrote into a lifted container."""
        for sid, (obj, state_proxy, before) in states.items():
            for key, value in _items(obj):
                if key not in before or before[key] is not value:
                    entry = self.tracer.create_proxy("call_function", ops.state_entry, (state_proxy, key), {"after": out})
                    self._states[sid].entries[key] = entry

    # -- own caches: Note [own caches] ------------------------------------------------
    def lift_caches(self, target: str, args, kwargs):
        """Replace each key/value cache the forward created and passes to a leaf by a
        ``fresh_cache`` node whose meta value is the shared, watched cache (Note [own caches])."""
        tracer = self.tracer
        records: dict[int, OwnCache] = {}
        proxies: dict[int, Proxy] = {}
        name = type(tracer.model).__name__

        def lift(value: Any) -> Any:
            if not is_kv_cache(value):
                return value
            if id(value) not in proxies:
                record = self._own_caches.get(id(value))
                if record is None:
                    held = sorted(n or "the model" for n, mod in tracer.model.named_modules()
                                  if any(v is value for v in vars(mod).values()))
                    if held:  # kept between calls, not created by each forward: its state is not empty per call
                        raise TraceError(
                            f"{name}: {held[0]} keeps the {type(value).__name__} it passes to {target} at "
                            f"{short_stack()} between calls; fxpp gives a layer an empty cache only where the "
                            "forward creates it"
                        )
                    record = self._own_caches[id(value)] = OwnCache.adopt(value, name, short_stack)
                record.check_before(target, name)
                proxy = tracer.create_proxy("call_function", ops.fresh_cache, (record.template,), {})
                proxy.node.meta["val"] = value
                record.nodes.append(proxy.node)
                records[id(value)], proxies[id(value)] = record, proxy
            return proxies[id(value)]

        args, kwargs = tuple(lift(a) for a in args), {k: lift(v) for k, v in kwargs.items()}
        return args, kwargs, list(records.values())

    def caches_of(self, node: Node) -> list[OwnCache]:
        """The own caches whose ``fresh_cache`` nodes ``node`` reads."""
        found = []
        for record in self._own_caches.values():
            if any(n in record.nodes for n in node.all_input_nodes):
                found.append(record)
        return found

    def finish_own_caches(self) -> None:
        """After the trace: refuse what the cache watch found since the last layer call, then stop watching."""
        try:
            for record in self._own_caches.values():
                record.check_uses(type(self.tracer.model).__name__)
        finally:
            for record in self._own_caches.values():
                record.finish()

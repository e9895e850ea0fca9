"""Key/value caches a forward creates itself: an empty cache per layer call.

Note [own caches]
    XLM's forward builds an ``EncoderDecoderCache`` even with ``use_cache=False`` and
    hands it to every attention layer; each layer writes its keys and values into its
    own slot (``cache.update(k, v, self.layer_id)``) and attends over what that returns.
    As a graph constant the cache would keep every call's keys (wrong from the second
    call on); as a graph value it would have to cross cuts. But where no slot is used
    by two layer calls, each call finds its slots as an empty cache holds them: the
    graph gives every layer call its own empty copy (``fxpp.ops.fresh_cache``), and
    no cache lives between calls or crosses a cut.

    The tracer proves that on the trace (:class:`OwnCache`), and refuses otherwise:

    * when a layer first gets the cache, it holds no tensor (the forward wrote nothing
      into it yet): its deep copy is the template every call copies;
    * from then on the slots (the items of each ``Cache``'s ``layers`` list, nested
      caches included) are watched: each use is charged to the layer call being
      evaluated, or to the forward itself. A slot used by two layer calls (a later layer
      reading an earlier layer's keys, one module called twice), or by the forward
      after a layer got the cache, is refused, naming the nodes;
    * the rest of the cache (how many slots, which objects, flags such as
      ``is_updated``) must be as at the first layer call before and after every call;
    * a layer call is evaluated on the shared cache itself (not reusing an identical
      call's meta value, not on real values), and its output must not hold the cache.

    The refusal names the node; it never gives a silently different answer.
"""

from __future__ import annotations

import collections.abc
import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.fx import Node, Proxy
from transformers.cache_utils import Cache

from .. import ops
from ..errors import TraceError


def is_kv_cache(a: Any) -> bool:
    """A transformers ``Cache`` (``DynamicCache``, ``EncoderDecoderCache``, ...)."""
    return isinstance(a, Cache)


class _SlotList(list):
    """A cache's ``layers`` list that reports which items (slots) are used.

    Every read of an item (index, slice, iteration, search) calls ``watch(path,
    indices)``. Writes to the list itself change its length or item identities, which
    :func:`_container_state` compares.
    """

    def __init__(self, items: list, watch: Callable[[str, range], None], path: str):
        super().__init__(items)
        self._watch = watch
        self._path = path

    def _all(self) -> None:
        self._watch(self._path, range(len(self)))

    def __getitem__(self, i):
        picked = range(len(self))[i]
        self._watch(self._path, picked if isinstance(picked, range) else range(picked, picked + 1))
        return super().__getitem__(i)

    def __iter__(self):
        self._all()
        return super().__iter__()

    def __reversed__(self):
        self._all()
        return super().__reversed__()

    def __contains__(self, item):
        self._all()
        return super().__contains__(item)

    def index(self, *args):
        self._all()
        return super().index(*args)

    def count(self, item):
        self._all()
        return super().count(item)

    def copy(self):
        self._all()
        return list(super().__iter__())

    def __add__(self, other):
        self._all()
        return list(super().__iter__()) + list(other)

    def __reduce_ex__(self, protocol):
        self._all()
        return (list, (list(super().__iter__()),))


def _caches_in(cache: Any, path: str = "", seen: set | None = None) -> list[tuple[str, Any]]:
    """``cache`` and the caches it holds as attributes (an encoder-decoder cache's two), with paths."""
    seen = set() if seen is None else seen
    if id(cache) in seen:
        return []
    seen.add(id(cache))
    found = [(path, cache)]
    for name, value in sorted(vars(cache).items()):
        if is_kv_cache(value):
            found += _caches_in(value, f"{path}.{name}" if path else name, seen)
    return found


def _holds_tensor(obj: Any, seen: set | None = None, depth: int = 0) -> bool:
    """Whether a tensor (or a traced value) is reachable from ``obj`` through containers and attributes."""
    seen = set() if seen is None else seen
    if isinstance(obj, (torch.Tensor, Proxy)):
        return True
    if id(obj) in seen or depth > 8 or isinstance(obj, (type, torch.nn.Module)) or callable(obj):
        return False
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (str, bytes, int, float, bool)):
        items = list(vars(obj).values())
    else:
        return False
    return any(_holds_tensor(v, seen, depth + 1) for v in items)


def _plain(value: Any, depth: int = 0) -> Any:
    """A comparable snapshot of a cache attribute: plain values by value, containers and
    plain objects item by item (a few levels deep), anything else (tensors, nested caches,
    types) by identity."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth > 3 or isinstance(value, (torch.Tensor, type)) or is_kv_cache(value) or callable(value):
        return ("id", id(value))
    if isinstance(value, collections.abc.Mapping):
        return ("map", id(value), tuple((k, _plain(v, depth + 1)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("seq", id(value), tuple(_plain(v, depth + 1) for v in value))
    if isinstance(value, (set, frozenset)):
        return ("set", id(value), tuple(sorted(repr(v) for v in value)))
    if hasattr(value, "__dict__"):
        return ("obj", id(value), tuple((k, _plain(v, depth + 1)) for k, v in sorted(vars(value).items())))
    return ("id", id(value))


def _container_state(cache: Any) -> tuple:
    """Everything in ``cache`` except what its slots hold: per cache, its slots' count and
    identities and its other attributes (flags by value, objects by identity)."""
    state = []
    for path, c in _caches_in(cache):
        layers = vars(c).get("layers")
        layers = list.__iter__(layers) if isinstance(layers, list) else iter(())
        rest = tuple((k, _plain(v)) for k, v in sorted(vars(c).items()) if k != "layers")  # layers: slots
        state.append((path, tuple(id(x) for x in layers), rest))
    return tuple(state)


def _holds_cache(value: Any, depth: int = 0) -> bool:
    if is_kv_cache(value) or isinstance(value, _SlotList):
        return True
    if depth > 4:
        return False
    if isinstance(value, dict):
        return any(_holds_cache(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_cache(v, depth + 1) for v in value)
    return False


@dataclass
class OwnCache:
    """A cache the traced forward created, from the first layer call that got it (Note [own caches])."""

    cache: Any
    template: ops.CacheTemplate
    where: Callable[[], str]  # the model source line being traced now
    state: tuple = ()
    owner: dict = field(default_factory=dict)  # (path, slot) -> the layer call node that used it
    current: Node | None = None  # the layer call being meta-evaluated with this cache
    evaluated: set = field(default_factory=set)  # layer call nodes evaluated on the shared cache
    nodes: list = field(default_factory=list)  # the fresh_cache nodes
    problems: list = field(default_factory=list)

    @classmethod
    def adopt(cls, cache: Any, model_name: str, where: Callable[[], str]) -> "OwnCache":
        """Watch ``cache`` from now on; refuse it if the forward already wrote into it."""
        what = type(cache).__name__
        if _holds_tensor(cache):
            raise TraceError(
                f"{model_name}: its forward creates a {what} and writes tensors into it before passing it to a layer "
                f"at {where()}; fxpp can give each layer call an empty cache only when the forward passes it empty"
            )
        try:
            template = ops.CacheTemplate(copy.deepcopy(cache))
        except Exception as e:  # noqa: BLE001
            raise TraceError(f"{model_name}: the {what} its forward creates at {where()} cannot be copied "
                             f"({type(e).__name__}: {e}); fxpp cannot give each layer call an empty one") from e
        record = cls(cache, template, where)
        for path, c in _caches_in(cache):
            if isinstance(vars(c).get("layers"), list):
                c.layers = _SlotList(c.layers, record.touch, path)
        record.state = _container_state(cache)
        return record

    def touch(self, path: str, slots: range) -> None:
        where = f"slot {{}} of {path or 'the cache'} ({type(self.cache).__name__})"
        for slot in slots:
            key = (path, slot)
            if self.current is None:
                self.problems.append(
                    f"the forward itself uses {where.format(slot)} at {self.where()} after passing the cache to a "
                    "layer; fxpp gives each layer call its own empty cache, so the forward would not see what the "
                    "layers wrote"
                )
                continue
            first = self.owner.setdefault(key, self.current)
            if first is not self.current:
                self.problems.append(
                    f"node {self.current.name} ({self.current.target}) uses {where.format(slot)}, which node "
                    f"{first.name} ({first.target}) used before it; a layer call that reads another call's cache "
                    "entries cannot get an empty cache of its own"
                )

    def check_uses(self, model_name: str) -> None:
        """Refuse the first slot use the watch found wrong so far."""
        if self.problems:
            raise TraceError(f"{model_name}: {self.problems[0]}")

    def check_before(self, target: str, model_name: str) -> None:
        """Before a call of layer ``target`` gets the cache: it is as when the first layer got it."""
        self.check_uses(model_name)
        if _container_state(self.cache) != self.state:
            raise TraceError(
                f"{model_name}: the forward changed the {type(self.cache).__name__} it created before passing it to "
                f"{target} at {self.where()}; fxpp can give each layer call an empty cache only when the cache stays "
                "as the first layer got it"
            )

    def check_after(self, node: Node, model_name: str) -> None:
        """After layer call ``node``: it used only slots no other call used, left the rest of the cache
        as it was, was evaluated on the shared cache and does not return it."""
        self.check_uses(model_name)
        what, call = type(self.cache).__name__, f"layer call {node.name} ({node.target})"
        if _container_state(self.cache) != self.state:
            raise TraceError(
                f"{model_name}: {call} changed the {what} the forward created beyond its own slots (which slots it "
                "holds, or flags shared by all layers); fxpp can give each layer call an empty cache only when the "
                "layers use nothing but their own slots"
            )
        if node not in self.evaluated:
            raise TraceError(
                f"{model_name}: {call} gets the {what} the forward created, but fxpp could not evaluate it on that "
                "cache (it needs tensor data), so it cannot check which cache entries the call uses"
            )
        if _holds_cache(node.meta.get("val")):
            raise TraceError(
                f"{model_name}: {call} returns the {what} the forward created; fxpp gives each layer call its own "
                "empty cache, so nothing after the call may read it"
            )

    def finish(self) -> None:
        """Stop watching: the fresh_cache nodes' meta values become plain empty copies."""
        for path, c in _caches_in(self.cache):
            if isinstance(vars(c).get("layers"), _SlotList):
                c.layers = list(list.__iter__(c.layers))
        for node in self.nodes:
            node.meta["val"] = ops.fresh_cache(self.template)

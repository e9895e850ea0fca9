"""Runtime helpers that appear as ``call_function`` targets in fxpp graphs.

They must be importable module-level functions (graph code refers to them by
qualified name) and must stay tiny: a stage runs them on every microbatch.

Glossary
--------
state container
    A mutable mapping that a model's forward creates and hands to several decoder
    layers, which write into it and read from it (Gemma 4's ``KVSharingDict`` of
    shared key/value states). fxpp turns these side channels into explicit graph
    values: ``make_state`` builds a fresh container for one layer call from the
    entries written so far, and ``state_entry`` reads what that call wrote.
own cache
    A key/value cache a model's forward creates itself even without ``use_cache``
    (XLM), in which each layer call uses only its own slots: ``fresh_cache`` gives
    every layer call an empty copy (Note [own caches] in ``fxpp.trace.caches``).
guard
    A Python-level decision the trace took from a shape (``if seq_len == 1``).
    ``check_guard`` re-checks it on every call; a different outcome raises
    :class:`GuardFailure`, and the stage retraces for the new shapes.

Note [guards]
-------------
A trace follows one path through the model's Python: every ``if`` on a shape, on
whether a mask builder returned a mask, or on tensor data is decided once, on the
example inputs, and the graph holds only the branch taken. Each such decision is
recorded as a node calling one of ``GUARD_OPS`` with the value the trace saw:

- ``check_guard``: a shape or other Python value read from a proxy (``if seq_len == 1``);
- ``check_is_none`` / ``check_is_not_none``: a mask builder returned ``None`` / a mask,
  and the forward took its ``mask is None`` / ``mask is not None`` branch
  (``fxpp.trace.patching``, ``fxpp.passes.guard_mask_branches``);
- ``check_data``: a ``bool`` or ``int`` taken from the example's real values
  (``if mask.any():``).

A guard produces no value; it is kept for its check. Stage extraction keeps every
guard a stage can evaluate that sits before its last output
(``fxpp.passes.extract_stage``), so a stage notices a decision that no longer holds
even when an earlier stage took it; the guards on data and on mask builders are
re-checked on every stage on their own inputs, which therefore cross each cut
(``fxpp.analysis.annotate.rechecked_on_every_stage``). A call that fails a guard
raises :class:`GuardFailure`, never a wrong number: the stage tries the other
variants it keeps for the same present inputs, then traces a new one for this call
and keeps it (``StageModule``). A guard that fails again on the graph
traced for the very call is a decision on values the stage does not receive, and is
refused with a :class:`~fxpp.errors.StageInputError`.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import importlib
from typing import Any


class GuardFailure(Exception):
    """A decision baked into a graph (a shape, whether a mask builder returns a mask, an
    ``if`` on data) does not hold for the current inputs: the stage traces again."""

    def __init__(self, where: str, expected: Any, actual: Any):
        super().__init__(f"{where}: traced with {expected!r}, called with {actual!r}")
        self.where = where
        self.expected = expected
        self.actual = actual


def check_guard(value: Any, expected: Any, where: str) -> None:
    actual = type(expected)(value) if isinstance(expected, (bool, int, float)) else value
    if actual != expected:
        raise GuardFailure(where, expected, actual)


def check_is_none(value: Any, where: str) -> None:
    """A mask builder returned ``None`` while tracing (no padding mask, an all-ones one), so the traced
    forward took its ``mask is None`` branch; a mask at run time needs another trace."""
    if value is not None:
        raise GuardFailure(where, None, type(value).__name__)


def check_is_not_none(value: Any, where: str) -> None:
    """A mask builder returned a mask while tracing and the traced forward computed with it,
    so the trace followed the forward's ``mask is not None`` branch; ``None`` at run time
    (an all-ones padding mask) takes the other branch, which needs another trace
    (``fxpp.passes.guard_mask_branches``)."""
    if value is None:
        raise GuardFailure(where, "a mask", None)


def check_data(value: Any, expected: Any, where: str) -> None:
    """A Python decision on tensor *data* (``if mask.any():``), taken on the example's real
    values while tracing; a call whose data decides otherwise needs another trace. The
    check is ``check_guard``'s; the op of its own marks a guard every stage re-checks
    (``fxpp.analysis.annotate.rechecked_on_every_stage``)."""
    check_guard(value, expected, where)


GUARD_OPS = (check_guard, check_is_none, check_is_not_none, check_data)  # graph nodes that re-check a decision


class ModuleRef:
    """A module referenced by a graph constant without registering it as a submodule.

    An opaque helper method (see ``fxpp.trace.HFTracer.call_helper``) needs its
    ``self``; the method uses no parameters, so the stage must not own the module's.
    """

    __slots__ = ("module",)

    def __init__(self, module: Any):
        self.module = module

    def __repr__(self) -> str:
        return f"ModuleRef({type(self.module).__name__})"


def call_method_of(ref: ModuleRef, name: str, *args: Any, **kwargs: Any) -> Any:
    """``ref.module.name(*args, **kwargs)``: an opaque helper method of a traced module."""
    return getattr(type(ref.module), name)(ref.module, *args, **kwargs)


def setitem(target: Any, key: Any, value: Any) -> Any:
    """``target[key] = value``, returning ``target``: an in-place write as a dataflow edge.

    The tracer rebinds the written proxy to this node, so later reads of ``target``
    depend on the write and a stage that keeps the reads keeps the write too.
    """
    target[key] = value
    return target


def scatter_rows(rows: Any, mask: Any) -> Any:
    """A zero tensor of shape ``[*mask.shape, *rows.shape[1:]]`` holding ``rows`` at the
    ``True`` positions of ``mask``, in order: the dense form of ``dense[mask] = rows``.

    Differentiable in ``rows`` (its gradient is the dense gradient's masked rows), so
    a value sent this way gets exactly its gradient back (see
    ``fxpp.passes.dense_masked_rows``).
    """
    dense = rows.new_zeros(*mask.shape, *rows.shape[1:])
    return dense.index_put((mask,), rows)


def gather_rows(dense: Any, mask: Any) -> Any:
    """``dense[mask]``: the rows :func:`scatter_rows` placed, in the same order."""
    return dense[mask]


def make_state(container_type: type, entries: dict) -> Any:
    """A fresh state container holding ``entries`` (see the module glossary)."""
    state = container_type()
    for key, value in entries.items():
        state[key] = value
    return state


def state_entry(state: Any, key: Any, after: Any = None) -> Any:
    """``state[key]``; ``after`` is the layer call that wrote it (a dataflow edge only)."""
    del after
    return state[key]


class CacheTemplate:
    """The empty cache a forward creates, as it was when a layer first got it: a graph
    constant that :func:`fresh_cache` copies (Note [own caches] in ``fxpp.trace.caches``)."""

    __slots__ = ("cache",)

    def __init__(self, cache: Any):
        self.cache = cache

    def __repr__(self) -> str:
        return f"CacheTemplate({type(self.cache).__name__})"


def fresh_cache(template: CacheTemplate) -> Any:
    """A new empty cache for one layer call: a deep copy of ``template``'s (no tensors)."""
    return copy.deepcopy(template.cache)


def pack(kind: str, *leaves: Any) -> Any:
    """Rebuild a flat tuple or list of tensors that crossed a cut as separate tensors."""
    return list(leaves) if kind == "list" else tuple(leaves)


@functools.lru_cache(maxsize=None)
def resolve(qualified_name: str) -> Any:
    """``"operator.getitem"`` -> the function (graph code cannot hold callables as arguments)."""
    module_name, _, attr = qualified_name.rpartition(".")
    obj = importlib.import_module(module_name)
    return getattr(obj, attr)


# Values recorded by submodules during the current stage call (fxpp.trace.recording):
# submodule path -> the values it returned, in call order.
RECORDED: "contextvars.ContextVar[dict | None]" = contextvars.ContextVar("fxpp_recorded", default=None)


def take_recorded(path: str, index: int, occurrence: int, *, after: Any = None) -> Any:
    """The ``occurrence``-th value submodule ``path`` returned (output ``index``) during the call ``after``.

    ``after`` only orders the node after the leaf call that produced the value.
    """
    collected = RECORDED.get()
    if collected is None or path not in collected or len(collected[path]) <= occurrence:
        raise RuntimeError(f"take_recorded: no recorded output {index} of {path} (call {occurrence}); the stage must "
                           "run inside fxpp.trace.recording.recording_hooks")
    return collected[path][occurrence]

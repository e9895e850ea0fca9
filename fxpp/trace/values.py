"""Small functions on the values a trace handles: traced or not, data-dependent, hashable shapes.

Terms
-----
traced value
    A ``torch.fx.Proxy`` (or a structure holding one): a value the graph computes.
data-dependent failure
    A fake-tensor failure that only the tensor's values could answer
    (``nonzero``, ``.item()``, Python iterating a tensor's elements): the node's meta
    value is then taken from the real example inputs (Note [data-dependent values] in
    ``fxpp.trace``).
call signature
    A hashable description of a call's arguments by tensor shapes, dtypes and devices,
    never their values (:func:`call_signature`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                           FakeTensorMode)
from torch.fx import Proxy
from torch.fx.node import map_aggregate


class RecordedNeedsData(Exception):
    """A recorded submodule (a router) failed its meta evaluation on tensor data: its
    leaf is evaluated on the real example inputs (no shape-keeping stand-in)."""


def is_data_dependent(e: BaseException) -> bool:
    """A fake-tensor failure that only the tensor's values could answer."""
    if isinstance(e, (DataDependentOutputException, DynamicOutputShapeException, RecordedNeedsData)):
        return True
    name = type(e).__name__
    # "... its data is not allocated yet": Python iterating a fake tensor's elements
    # (UDOP's ``rows, cols = zip(*ind)``)
    return (name in ("GuardOnDataDependentSymNode", "DataDependentOutputException") or "data-dependent" in str(e).lower()
            or "data is not allocated" in str(e))


def call_signature(value: Any) -> Any:
    """A hashable description of a call's arguments: tensor shapes, not values."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.dtype, str(value.device))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(call_signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, call_signature(v)) for k, v in value.items()))
    if isinstance(value, (str, int, float, bool, type(None), torch.dtype, torch.device)):
        return value
    return ("id", id(value))


def thaw_all(x: Any) -> Any:
    """torch.fx's immutable containers as plain lists and dicts (models may mutate them).

    Through torch.fx's own containers only: ``map_aggregate`` would rebuild every dict
    it meets, so a meta value that is a ``ModelOutput`` (a leaf vision tower's output)
    would lose its attributes.
    """
    name = type(x).__name__
    if name == "immutable_list" or type(x) is list:
        return [thaw_all(v) for v in x]
    if type(x) is tuple:
        return tuple(thaw_all(v) for v in x)
    if name == "immutable_dict" or type(x) is dict:
        return {k: thaw_all(v) for k, v in x.items()}
    return x


def has_proxy(value: Any) -> bool:
    """Whether ``value`` holds a traced value."""
    found = []
    map_aggregate(value, lambda x: found.append(x) if isinstance(x, Proxy) else x)
    return bool(found)


class FakeMode(FakeTensorMode):
    """The trace's ``FakeTensorMode``; inside :meth:`sizes_at_bounds`, a data-dependent size
    is taken at its bound.

    Note [sizes at their bounds]
        ``nonzero`` (and what calls it: boolean-mask indexing, one-argument
        ``torch.where``) returns as many rows as its input has nonzero elements, which
        fake tensors cannot know. Inside :meth:`sizes_at_bounds` it returns the largest
        number it can: one row per element. Only shapes follow from that, never a number
        a stage computes, and a size that depends on data stays wrong: the only user is
        the meta evaluation of a decoder layer on the meta device
        (``fxpp.trace.standins``, *bounded evaluation*), whose outputs are checked at run
        time. Token selectors pad their picks to a fixed width (GLM-5 Next's indexer), so
        their outputs come out right whatever the count. ``.item()`` and other reads of a
        number still fail.
    """

    at_bounds = False

    @contextlib.contextmanager
    def sizes_at_bounds(self) -> Iterator[None]:
        old, self.at_bounds = self.at_bounds, True
        try:
            yield
        finally:
            self.at_bounds = old

    def dispatch(self, func, types, args=(), kwargs=None):
        if self.at_bounds and func is torch.ops.aten.nonzero.default:
            (arg,) = args
            return arg.new_empty((arg.numel(), arg.dim()), dtype=torch.int64)
        return super().dispatch(func, types, args, kwargs)


def fakeify(fake_mode: FakeTensorMode, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fake_mode.from_tensor(value)
    return value

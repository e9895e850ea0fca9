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

from typing import Any

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


def fakeify(fake_mode: FakeTensorMode, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fake_mode.from_tensor(value)
    return value

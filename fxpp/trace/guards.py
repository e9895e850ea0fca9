"""Python control flow on traced values: concrete answers, recorded as guards.

See the package docstring (``fxpp.trace``) for *meta value* and *guard*.

Terms
-----
concrete answer
    A Python ``bool``, ``int``, ``float`` or ``len`` that a forward asks of a traced
    value (``if x.shape[1] == 1:``, ``range(n)``), taken from its meta value. The trace
    is specialised to it.
shape guard
    A ``check_guard`` node that re-checks a concrete answer on every call; the stage
    retraces where it differs.
data guard
    A ``check_data`` node: the answer needed tensor data, so it came from the real
    example values (Note [data-dependent values]); every call and every later stage
    re-check it (``fxpp.analysis.annotate.rechecked_on_every_stage``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Proxy

from .. import ops
from ..errors import TraceError
from ..meta import is_from_data
from .meta_eval import UntraceableCode
from .source_lines import short_stack
from .values import is_data_dependent

if TYPE_CHECKING:  # the tracer passes itself in; only its type is named here
    from .tracer import HFTracer


class Guards:
    """Concrete answers to Python's questions about ``tracer``'s values, each guarded."""

    def __init__(self, tracer: "HFTracer"):
        self.tracer = tracer

    def guard(self, proxy: Proxy, value: Any) -> None:
        """Record a shape guard: ``proxy`` must be ``value`` on every call."""
        self.tracer.create_proxy("call_function", ops.check_guard, (proxy, value, short_stack()), {})

    def concrete(self, obj: Proxy, kind: type, what: str) -> Any:
        """``kind(value)`` from the node's meta value, guarded so the stage checks it at
        run time.

        A bool or int that needs tensor data (``if mask.any():``) is taken from the real
        example values and guarded with ``check_data``: every call re-checks it on its own
        data and retraces where it differs, and every later stage re-checks it too (its
        inputs cross each cut, ``fxpp.analysis.annotate.rechecked_on_every_stage``).
        Without real values (the meta device), or for other kinds, it is an
        :class:`UntraceableCode`.
        """
        tracer = self.tracer
        val = tracer.meta_of(obj)
        try:
            result = kind(val)
        except Exception as e:  # noqa: BLE001
            # Inside a helper a decision on data makes the helper one opaque node instead,
            # recomputed whole on every call (call_helper): exact without any guard.
            if kind in (bool, int) and is_data_dependent(e) and tracer.real.inputs and not tracer.helpers.depth:
                try:
                    result = kind(tracer.real.value(obj.node, why=e))
                except TraceError:
                    raise
                except Exception as real_error:  # noqa: BLE001 - not a bool or int on real data either
                    raise UntraceableCode(
                        f"{type(tracer.model).__name__}: {what} at {short_stack()} (node {obj.node.name}), and its "
                        f"real value is not a {kind.__name__}: {real_error}") from e
                tracer.create_proxy("call_function", ops.check_data, (obj, result, short_stack()), {})
                return result
            raise UntraceableCode(
                f"{type(tracer.model).__name__}: {what} at {short_stack()} (node {obj.node.name}); "
                "fxpp traces decisions on tensor data only on real example values (not on the meta device)"
            ) from e
        if is_from_data(obj.node):
            # a scalar read from data (``k = x.sum().item(); if k > 0:``): a decision on data,
            # re-checked on every stage like any other; inside a helper (HunYuan-VL's
            # ``get_rope_index`` walks ``mm_token_type_ids.tolist()``) the helper becomes one
            # opaque node instead, as above: a guard per token would make every call with
            # other image sizes retrace, on every stage, and a later stage cannot (the images
            # stay on the first)
            if tracer.helpers.depth:
                raise UntraceableCode(f"{type(tracer.model).__name__}: {what} at {short_stack()} (node "
                                      f"{obj.node.name}) decides on a value read from tensor data")
            tracer.create_proxy("call_function", ops.check_data, (obj, result, short_stack()), {})
        else:
            self.guard(obj, result)
        return result

    def concrete_len(self, obj: Proxy) -> int:
        """``len`` of a traced value; of a tensor, guarded."""
        val = self.tracer.meta_of(obj)
        n = len(val)
        if isinstance(val, torch.Tensor):
            self.guard(self.tracer.create_proxy("call_function", len, (obj,), {}), n)
        return n

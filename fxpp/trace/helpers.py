"""Helper functions of modeling files: traced into, or called as one opaque node.

See Note [data-dependent values] in the package docstring (``fxpp.trace``).

Terms
-----
helper
    A plain function of a modeling file (``unpad_image``, ``image_size_to_num_patches``)
    or a public method of a traced module (``get_rope_index``), routed here by
    ``fxpp.trace.patching`` when called with traced values.
opaque helper
    A helper that failed to trace: the nodes it made are removed again and it becomes
    one ``call_function`` node (a method: ``fxpp.ops.call_method_of``) whose meta value
    comes from running it on the real example inputs, and which every call recomputes.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable

import torch

from .. import ops
from ..errors import TraceError
from .meta_eval import UntraceableCode
from .source_lines import short_stack

if TYPE_CHECKING:  # the tracer passes itself in; only its type is named here
    from .tracer import HFTracer


class Helpers:
    """``tracer``'s helper calls, and which helpers became opaque."""

    def __init__(self, tracer: "HFTracer"):
        self.tracer = tracer
        self.depth = 0  # > 0 while tracing into a helper
        self._opaque: set[int] = set()

    def is_opaque(self, target: Any) -> bool:
        return id(target) in self._opaque

    def call(self, fn: Callable, args: tuple, kwargs: dict, *, method: str | None = None) -> Any:
        """Trace a modeling file's helper function, or call it as one opaque node.

        Helpers such as ``image_size_to_num_patches`` or ``unpad_image`` type-check
        their arguments or loop over tensor data. When tracing into one fails, the nodes
        it made are removed and the helper becomes a single ``call_function`` node whose
        meta value comes from running it on the example inputs (Note [data-dependent values]).
        """
        tracer = self.tracer
        graph = tracer.graph
        last = graph._root.prev  # the newest node
        self.depth += 1
        try:
            return fn(*args, **kwargs)
        except UntraceableCode:
            pass  # ``int(grid[0])``, ``torch.tensor`` of traced values: opaque, like any failure below
        except TraceError:
            raise  # a problem opaque evaluation has too (no real values on the meta device)
        except Exception:  # noqa: BLE001 - retried as one opaque node
            pass
        finally:
            self.depth -= 1
        made = []
        node = graph._root.prev
        while node is not last:
            made.append(node)
            node = node.prev
        for node in made:  # newest first: users before their inputs
            tracer.real.values.pop(node, None)
            graph.erase_node(node)
        if method is None:
            self._opaque.add(id(fn))
            return tracer.create_proxy("call_function", fn, args, kwargs)
        owner, rest = args[0], args[1:]
        self._check_parameter_free(owner, method)
        self._opaque.add(id(ops.call_method_of))
        return tracer.create_proxy("call_function", ops.call_method_of, (ops.ModuleRef(owner), method, *rest), kwargs)

    def _check_parameter_free(self, owner: torch.nn.Module, method: str) -> None:
        """An opaque method must not use parameters: the stage would not own them."""
        used = []
        probe = getattr(type(owner), method)
        src = inspect.getsource(getattr(probe, "__wrapped_opaque__", probe))
        for name, sub in owner.named_children():
            if f"self.{name}(" in src and any(True for _ in sub.parameters()):
                used.append(name)
        for name, _ in owner.named_parameters(recurse=False):
            if f"self.{name}" in src:
                used.append(name)
        if used:
            raise TraceError(
                f"{type(self.tracer.model).__name__}: {type(owner).__name__}.{method} ({short_stack()}) depends on "
                f"tensor data and cannot be traced, and it uses parameters ({', '.join(sorted(used))}) so fxpp cannot "
                "call it as one opaque step either"
            )

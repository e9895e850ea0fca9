"""The second interpreter: the graph traced so far, run on the real example inputs.

See Note [data-dependent values] in the package docstring (``fxpp.trace``).

Terms
-----
real inputs
    The example inputs the trace was called with, when they and the model hold real
    data (not on the meta device); empty otherwise, and then any value that needs
    data is a ``TraceError``.
real value
    A node's value for the real inputs, computed by running every earlier node of the
    graph once (cached per node, on the random streams' own copies so a retrace inside
    a training step moves no dropout mask).
from data
    A Python value (not a tensor) read from a real value (``.item()``, ``.tolist()``):
    its node is marked ``from_data`` (``fxpp.meta.NodeFacts``).
"""

from __future__ import annotations

import collections.abc
import copy
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Node
from torch.fx.node import map_arg

from .. import ops
from ..errors import TraceError
from ..meta import mark_from_data
from .source_lines import failure_source_line, short_stack, target_name
from .targets import is_check_function
from .values import thaw_all

if TYPE_CHECKING:  # the tracer passes itself in; only its type is named here
    from .tracer import HFTracer


class RealValues:
    """Real values of ``tracer``'s nodes, evaluated on demand."""

    def __init__(self, tracer: "HFTracer"):
        self.tracer = tracer
        self.inputs: dict[str, Any] = {}
        self.values: dict[Node, Any] = {}
        self.running = 0  # > 0 inside call(): real values, never a stand-in

    def value(self, node: Node, *, why: BaseException | str) -> Any:
        """``node``'s value for the real example inputs, evaluating the graph so far."""
        if node in self.values:
            return self.values[node]
        if not self.inputs:
            raise TraceError(
                f"{type(self.tracer.model).__name__}: node {node.name} at {short_stack()} depends on tensor data "
                f"({type(why).__name__ if isinstance(why, BaseException) else why}); fxpp evaluates such values on the "
                "example inputs, which needs a model with real weights (not on the meta device) and real example inputs"
            )
        # On the random streams' own copies: a retrace inside a training step must not move
        # the dropout masks of the run around it.
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            for n in self.tracer.graph.nodes:
                if n in self.values or n.op == "output":
                    continue
                self.values[n] = self._run(n)
                if n is node:
                    break
        return self.values[node]

    def _run(self, node: Node) -> Any:
        recording = self.tracer.recording
        if node.op == "placeholder":
            return self.inputs[node.target]
        if node.op == "get_attr":
            return self.tracer.fetch_attr(node.target)
        if node.op == "call_function" and (node.target in ops.GUARD_OPS or is_check_function(node.target)):
            return None
        if node.op == "call_function" and node.target is ops.take_recorded:
            return recording.real_recorded[tuple(node.args)]
        if node.op == "call_module" and recording.records(node):
            return recording.run_real(node)
        return self.call(node)

    def call(self, node: Node) -> Any:
        """Call ``node``'s target on the real values of its inputs."""
        tracer = self.tracer
        args = thaw_all(map_arg(node.args, self.values.__getitem__))
        kwargs = {k: thaw_all(v) for k, v in map_arg(node.kwargs, self.values.__getitem__).items()}
        tracer.evaluating += 1
        self.running += 1
        try:
            with torch.no_grad():
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                return tracer.model.get_submodule(node.target)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with node context
            raise TraceError(
                f"{type(tracer.model).__name__}: cannot evaluate node {node.name} ({node.op} {target_name(node.target)}) "
                f"on the example inputs at {failure_source_line(e)}: {type(e).__name__}: {e}"
            ) from e
        finally:
            tracer.evaluating -= 1
            self.running -= 1

    def from_data(self, node: Node, value: Any) -> Any:
        """The meta value of ``node`` evaluated on the real example; a Python value (not a
        tensor) read from data is marked ``from_data``."""
        if not isinstance(value, torch.Tensor):
            mark_from_data(node)
        return self.fakeify(value)

    def fakeify(self, value: Any) -> Any:
        """A real value as a meta value: its tensors as fake tensors, through tuples, lists and mappings."""
        if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
            return type(value)(self.fakeify(v) for v in value)
        if isinstance(value, collections.abc.Mapping):
            value = copy.copy(value)  # the real value stays cached for later real evaluation
            for k in list(value.keys()):
                value[k] = self.fakeify(value[k])
            return value
        return self.tracer.fake_mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

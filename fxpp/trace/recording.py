"""Outputs that transformers records with hooks inside leaf modules (router logits).

transformers 5 collects some outputs of submodules through forward hooks: a forward
decorated with ``capture_outputs`` activates a collector, and hooks on the classes of
its ``_can_record_outputs`` (``OutputRecorder(Qwen3MoeTopKRouter, index=0)`` for
``router_logits``) append what those modules return. The decoder layers that hold
those modules are leaves for fxpp, so the trace never runs the hooks: the collected
tuple would be empty and, for a MoE model with ``output_router_logits=True``, the
load-balancing loss lost.

fxpp records them explicitly instead. While a forward that captures outputs is traced
with a *recordable* output requested (anything but hidden states and attentions,
which fxpp does not return), each leaf module call gets one
``fxpp.ops.take_recorded(path, index, occurrence, after=<the call>)`` node per value a
recorded submodule produced during the call (found by running the leaf on fake
tensors with temporary hooks), and the forward sees those nodes as its collected
tuple. At run time a stage registers temporary hooks on exactly those submodules for
the duration of its call (:func:`recording_hooks`), so each ``take_recorded`` node
reads the value its submodule returned in that call. The values are then ordinary
graph values: they cross cuts like any other and carry gradients back to the routers.

While tracing, :class:`Recording` keeps a tracer's share of this: the capturing
forwards being traced, which submodules the leaf call being created records, what its
meta evaluation (or its real evaluation, Note [data-dependent values]) captured, and
the meta value of each ``take_recorded`` node.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch.fx import Node, Proxy

from .. import ops
from ..model_facts import captures_outputs

if TYPE_CHECKING:  # the tracer passes itself in; only its type is named here
    from .tracer import HFTracer

try:  # optional: transformers versions before output capturing have nothing to record
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, OutputRecorder
except ImportError:  # pragma: no cover - older transformers
    _CAN_RECORD_REGISTRY = OutputRecorder = None

# Recorded outputs that fxpp does not return (it returns logits), so never records.
NOT_RECORDED = frozenset({"hidden_states", "attentions", "cross_attentions", "mask_decoder_attentions"})


def recorder_specs(module: torch.nn.Module, kwargs: dict) -> list[tuple[str, Any]]:
    """``(key, OutputRecorder)`` of each output ``module``'s forward would collect for this call."""
    if _CAN_RECORD_REGISTRY is None:  # pragma: no cover - older transformers
        return []
    flags = _CAN_RECORD_REGISTRY.get(module)
    config = getattr(module, "config", None)
    specs = []
    for key, layer_specs in sorted(flags.items()):
        if key in NOT_RECORDED:
            continue
        requested = kwargs.get(f"output_{key}", getattr(config, f"output_{key}", False))
        if not isinstance(requested, bool) or not requested:
            continue
        for spec in layer_specs if isinstance(layer_specs, list) else [layer_specs]:
            if not isinstance(spec, OutputRecorder):  # transformers' own normalisation
                spec = OutputRecorder(target_class=None if isinstance(spec, str) else spec, index=1,
                                      class_name=spec if isinstance(spec, str) else None)
            specs.append((key, spec))
    return specs


def recorded_submodules(leaf: torch.nn.Module, leaf_path: str, specs: list[tuple[str, Any]]) -> list[tuple[str, str, int]]:
    """``(key, submodule path, output index)`` of each submodule of ``leaf`` a spec records.

    The matching rules of transformers' ``recursively_install_hooks``: an instance of
    the spec's class, or a path ending in its class name; and, if the spec names a
    layer, a path containing it.
    """
    found = []
    for name, sub in leaf.named_modules():
        path = f"{leaf_path}.{name}" if name else leaf_path
        for key, spec in specs:
            by_class = spec.target_class is not None and isinstance(sub, spec.target_class)
            by_name = spec.class_name is not None and path.endswith(spec.class_name)
            if not (by_class or by_name):
                continue
            if spec.layer_name is not None and f".{spec.layer_name.strip('.')}." not in f"{path}.":
                continue
            found.append((key, path, spec.index))
    return found


def _selected(output: Any, index: int) -> Any:
    return output[index] if isinstance(output, tuple) else output


@contextlib.contextmanager
def recording_hooks(root: torch.nn.Module, targets: list[tuple[str, int]]) -> Iterator[dict[str, list]]:
    """Temporary forward hooks that collect what each ``(submodule path, index)`` returns.

    Yields the collector (path -> values in call order); the hooks are removed on exit,
    so the model is left as it was.
    """
    collected: dict[str, list] = {path: [] for path, _ in targets}
    handles = []
    try:
        for path, index in targets:
            def hook(module, args, output, path=path, index=index):
                value = _selected(output, index)
                if value is not None:
                    collected[path].append(value)

            handles.append(root.get_submodule(path).register_forward_hook(hook))
        token = ops.RECORDED.set(collected)
        try:
            yield collected
        finally:
            ops.RECORDED.reset(token)
    finally:
        for handle in handles:
            handle.remove()


def recording_targets(graph: torch.fx.Graph) -> list[tuple[str, int]]:
    """The ``(submodule path, index)`` pairs a graph's ``take_recorded`` nodes read, sorted."""
    return sorted({(n.args[0], n.args[1]) for n in graph.nodes
                   if n.op == "call_function" and n.target is ops.take_recorded})


@contextlib.contextmanager
def _capturing(root: torch.nn.Module, targets, sink: list) -> Iterator[None]:
    """Temporary hooks appending ``(path, index, value)`` to ``sink`` for each ``(path, index)``
    of ``targets`` (extra leading items of a target are ignored), in call order."""
    handles = []
    try:
        for *_, path, index in targets:
            def hook(mod, a, output, path=path, index=index):
                value = _selected(output, index)
                if value is not None:
                    sink.append((path, index, value))

            handles.append(root.get_submodule(path).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


class Recording:
    """What ``tracer`` records of the outputs its capturing forwards collect (see the module docstring)."""

    def __init__(self, tracer: "HFTracer"):
        self.tracer = tracer
        # per capturing forward being traced: its specs and the take_recorded proxies per key
        self._stack: list[tuple[list, dict[str, list]]] = []
        self._pending: list[tuple[str, str, int]] = []  # (key, path, index) of the leaf call being created
        self._pending_targets: list[tuple[str, int]] = []  # for the call_module node being created
        self._captured: list[tuple[str, int, Any]] = []  # what the last leaf evaluation recorded
        self._recorded_ids: set[int] = set()  # modules recorded by the leaf being meta-evaluated
        self._targets: dict[Node, list[tuple[str, int]]] = {}  # a recording leaf call -> its (path, index)
        self._real_calls: dict[Node, list[tuple[str, int, Any]]] = {}  # in call order
        self.recorded_meta: dict[tuple, Any] = {}  # (path, index, occurrence) -> meta value
        self.real_recorded: dict[tuple, Any] = {}  # (path, index, occurrence) -> real value

    # -- tracing -----------------------------------------------------------------------
    def forward(self, module: torch.nn.Module, declared_forward: Callable, call: Callable, kwargs: dict) -> Callable:
        """``call`` collecting the recordable outputs its ``capture_outputs`` forward requests:
        leaf calls inside add their ``take_recorded`` nodes, and the forward's output gets
        them as its tuple, as the decorator would set it."""
        specs = recorder_specs(module, kwargs) if captures_outputs(declared_forward) else []
        if not specs:
            return call

        def run(*a, **k):
            collected: dict[str, list] = {key: [] for key, _ in specs}
            self._stack.append((specs, collected))
            try:
                out = call(*a, **k)
            finally:
                self._stack.pop()
            for key, values in collected.items():
                out[key] = tuple(values)
            return out

        return run

    def begin_leaf(self, leaf: torch.nn.Module, path: str) -> list[tuple[str, str, int]]:
        """Before leaf call ``path`` is created: the submodules it records, kept for its node."""
        targets = recorded_submodules(leaf, path, self._stack[-1][0]) if self._stack else []
        self._pending = targets
        if targets:
            self._pending_targets = [(p, index) for _, p, index in targets]
        return targets

    def node_created(self, node: Node) -> None:
        """A ``call_module`` node was created: it is the leaf call :meth:`begin_leaf` announced."""
        if self._pending_targets:
            self._targets[node], self._pending_targets = self._pending_targets, []

    def take_pending(self) -> list[tuple[str, str, int]]:
        targets, self._pending = self._pending, []
        return targets

    def take(self, out: Proxy, targets: list[tuple[str, str, int]]) -> None:
        """One ``take_recorded`` node per value the leaf call ``out`` recorded, in call order."""
        keys = {path: key for key, path, _ in targets}
        _, collected = self._stack[-1]
        seen: dict[str, int] = {}
        for path, index, value in self._captured:
            occurrence = seen.get(path, 0)
            seen[path] = occurrence + 1
            self.recorded_meta[(path, index, occurrence)] = value
            proxy = self.tracer.create_proxy("call_function", ops.take_recorded, (path, index, occurrence),
                                             {"after": out})
            collected[keys[path]].append(proxy)
        self._captured = []

    # -- evaluation --------------------------------------------------------------------
    def is_recorded(self, module: torch.nn.Module) -> bool:
        """``module`` is recorded by the leaf being meta-evaluated."""
        return id(module) in self._recorded_ids

    def records(self, node: Node) -> bool:
        """``node`` is a leaf call that records outputs."""
        return node in self._targets

    def meta_eval(self, module: torch.nn.Module, targets: list[tuple[str, str, int]], args, kwargs) -> Any:
        """Meta-evaluate a leaf with temporary hooks on the submodules it records (in call order)."""
        model = self.tracer.model
        captured: list = []
        self._recorded_ids = {id(model.get_submodule(path)) for _, path, _ in targets}
        try:
            with _capturing(model, targets, captured):
                out = module(*args, **kwargs)
        finally:
            self._recorded_ids = set()
        self._captured = captured
        return out

    def run_real(self, node: Node) -> Any:
        """Run a recording leaf on real values with hooks on its recorded submodules,
        keeping what they return for the ``take_recorded`` nodes after it."""
        calls: list[tuple[str, int, Any]] = []
        with _capturing(self.tracer.model, self._targets[node], calls):
            out = self.tracer.real.call(node)
        seen: dict[str, int] = {}
        for path, index, value in calls:
            occurrence = seen.get(path, 0)
            seen[path] = occurrence + 1
            self.real_recorded[(path, index, occurrence)] = value
        self._real_calls[node] = calls
        return out

    def replay_real_captures(self, node: Node) -> None:
        """A recording leaf evaluated on real values: what it recorded, as meta values."""
        if node in self._targets:
            fakeify = self.tracer.real.fakeify
            self._captured = [(p, i, fakeify(v)) for p, i, v in self._real_calls[node]]

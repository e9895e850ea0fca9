"""Meta evaluation: the meta value of each node as the tracer creates it, on fake tensors.

See the package docstring (``fxpp.trace``) for *meta value*.

Terms
-----
fake evaluation
    Running a node's target on the meta values of its inputs under the trace's
    ``FakeTensorMode``: shapes, dtypes and devices, no data.
leaf cache
    Decoder layers dominate tracing time (a fake-tensor run each). Two calls of
    modules of one class, with parameters of the same shapes and inputs of the same
    shapes, give outputs of the same shapes, so a leaf call's meta value is reused for
    an identical later call (:meth:`MetaEvaluation.leaf_value`); only the meta value,
    never a number.
shared leaf values
    The traces of one build (the whole signature and each representative present set,
    ``fxpp.compile.trace_canonical``) differ mostly in the forward's own code around
    the layers (masks, positions), so they share one leaf cache and one
    ``FakeTensorMode`` (:class:`LeafValues`): a pipeline's layers are meta-evaluated
    once, not once per trace. Within a trace the cache is as above. A value another
    trace computed is taken only while its :func:`value_state` is as when it was
    computed; and where a later trace changes, in place, a value an earlier trace's
    graph holds, the build traces again without sharing
    (:meth:`LeafValues.intact`): every graph is the graph a trace of its own gives.
builder values
    A mask builder (``transformers.masking_utils``, an opaque function) is fake-evaluated
    as the forward calls it, a few milliseconds of tensor code; its meta value is kept in
    the leaf cache too, by the builder and :func:`~fxpp.trace.values.call_signature` of
    its arguments (the config by identity), and taken by an identical call while its
    :func:`value_state` is as computed: the traces of one build mostly call it alike
    (with and without ``position_ids``). Only a mask, ``None`` or masks by layer type are
    kept, never a mask *function* (a closure over one trace's values).
data-dependent node
    A node whose fake evaluation fails on tensor data (``fxpp.trace.values``): its meta
    value comes from the real example inputs instead (``fxpp.trace.real_values``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from .. import ops
from ..errors import TraceError
from .source_lines import StackTraces, failure_source_line, target_name
from .targets import is_check_function, is_mask_builder
from .values import FakeMode, call_signature, is_data_dependent, thaw_all

if TYPE_CHECKING:  # the tracer passes itself in; only its type is named here
    from .tracer import HFTracer


class UntraceableCode(TraceError):
    """Code the tracer cannot follow symbolically: Python control flow or a Python
    number taken from tensor data, or an op that fake tensors cannot run.

    Raised to the user from the model's own code; inside a helper function it makes
    the helper one opaque node instead (:meth:`HFTracer.call_helper`).
    """


def _load(n: Node) -> Any:
    return n.meta["val"]


def value_state(value: Any) -> Any:
    """What an in-place method may change in a meta value: per tensor its shape, strides,
    dtype, device, view-ness and ``requires_grad``, through tuples, lists and dicts;
    any other object by identity."""
    if isinstance(value, torch.Tensor):
        strides = tuple(value.stride()) if value.layout == torch.strided else None
        return ("T", tuple(value.shape), strides, value.dtype, str(value.device), value._is_view(),
                value.requires_grad)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(value_state(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, value_state(v)) for k, v in value.items()))
    return ("id", id(value))


def _is_mask_value(value: Any) -> bool:
    """A mask builder's value made of tensors: a mask, ``None``, or masks by layer type."""
    if isinstance(value, dict):
        return all(v is None or isinstance(v, torch.Tensor) for v in value.values())
    return value is None or isinstance(value, torch.Tensor)


def _graph_state(gm: GraphModule) -> list:
    return [value_state(n.meta.get("val")) for n in gm.graph.nodes]


@dataclass
class LeafEntry:
    """One kept leaf meta value: its :func:`value_state` when computed, the trace that
    uses it now (a :class:`MetaEvaluation`), and the call (kept alive: a key names
    non-tensor arguments by ``id``, and no other object may take that ``id`` meanwhile)."""

    value: Any
    state: Any
    trace: Any
    call: tuple


class LeafValues:
    """The leaf cache of the traces of one build (*shared leaf values* above), with the
    ``FakeTensorMode`` they all run in, so that a value one trace computed is a fake
    tensor of the next trace's mode; the stack traces of their nodes
    (``fxpp.trace.source_lines.StackTraces``: the traces run the same lines); and the
    walk of the model's modules that each trace would repeat (``fxpp.trace.driver.ModuleTree``).

    For the traces of one model run back to back: each leaves the model as it found it
    (``model_unchanged``), and nothing else changes it in between."""

    def __init__(self):
        self.fake_mode = FakeMode(allow_non_fake_inputs=True)
        self.entries: dict[tuple, LeafEntry] = {}
        self.stack_traces = StackTraces()  # the nodes' stack traces, by call stack
        self.module_tree = None  # the model's fxpp.trace.driver.ModuleTree, walked by the first trace
        self._graphs: list[tuple[GraphModule, list]] = []

    def keep(self, gm: GraphModule) -> None:
        """Note the state of ``gm``'s meta values, its trace (and passes) done."""
        self._graphs.append((gm, _graph_state(gm)))

    def intact(self) -> bool:
        """Whether every kept graph's meta values are as when it was kept: no later trace
        changed in place a value it shares with them (shape-changing in-place methods on
        a layer's output or a memoized input would)."""
        return all(_graph_state(gm) == state for gm, state in self._graphs)


class MetaEvaluation:
    """The meta value of each node of ``tracer``'s graph."""

    def __init__(self, tracer: "HFTracer", leaf_values: LeafValues | None = None):
        self.tracer = tracer
        self.leaf: torch.nn.Module | None = None  # the leaf module being meta-evaluated
        self._leaf_cache = (leaf_values or LeafValues()).entries  # key -> LeafEntry
        # Per trace, not per build: a module's plain attributes are read when the trace
        # first calls it, and a forward may set them differently for other inputs.
        self._param_sigs: dict[int, tuple] = {}

    def value(self, node: Node) -> Any:
        """The meta value of a new node (not a placeholder, not the output)."""
        tracer = self.tracer
        if node.op == "get_attr":
            obj = tracer.fetch_attr(node.target)
            if isinstance(obj, torch.Tensor):
                return tracer.fake_mode.from_tensor(obj)
            return obj

        args = thaw_all(map_arg(node.args, _load))
        kwargs = {k: thaw_all(v) for k, v in map_arg(node.kwargs, _load).items()}
        if node.op == "call_function" and is_check_function(node.target):
            return None
        if node.op == "call_function" and node.target is ops.take_recorded:
            return tracer.recording.recorded_meta[tuple(node.args)]
        if node.op == "call_function" and tracer.helpers.is_opaque(node.target):
            return tracer.real.from_data(node, tracer.real.value(node, why=f"opaque helper {node.target.__name__}"))
        tracer.evaluating += 1
        try:
            with tracer.fake_mode:
                if node.op == "call_function" and is_mask_builder(node.target):
                    return self._builder_value(node.target, args, kwargs)
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                if node.op == "call_module":
                    return self._leaf(node, args, kwargs)
        except TraceError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with node context
            if is_data_dependent(e):
                value = tracer.real.from_data(node, tracer.real.value(node, why=e))
                tracer.recording.replay_real_captures(node)  # what the leaf recorded, from the real run
                return value
            raise UntraceableCode(
                f"{type(tracer.model).__name__}: cannot compute the output shape of node {node.name} "
                f"({node.op} {target_name(node.target)}) at {failure_source_line(e)}: {type(e).__name__}: {e}"
            ) from e
        finally:
            tracer.evaluating -= 1
        raise AssertionError(node.op)

    def _leaf(self, node: Node, args: tuple, kwargs: dict) -> Any:
        """Meta-evaluate a leaf module, reusing the result of an identical earlier call.

        See *leaf cache* above. Calls that touch a state container are always evaluated:
        their writes differ per layer.
        """
        module = self.tracer.model.get_submodule(node.target)
        # The leaf's own forward gets no shape-keeping stand-in (``fxpp.trace.standins``):
        # its meta value is the stage metadata, so it is computed, or evaluated on the
        # real example inputs, or refused, never assumed.
        outer, self.leaf = self.leaf, module
        try:
            return self.leaf_value(node, module, args, kwargs)
        finally:
            self.leaf = outer

    def leaf_value(self, node: Node, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        tracer = self.tracer
        targets = tracer.recording.take_pending()
        caches = tracer.state.caches_of(node)
        if caches:  # always evaluated, on the shared cache: the watch sees which slots this call uses
            for record in caches:
                record.current = node
            try:
                out = tracer.recording.meta_eval(module, targets, args, kwargs) if targets else module(*args, **kwargs)
            finally:
                for record in caches:
                    record.current = None
            for record in caches:
                record.evaluated.add(node)
            return out
        if targets:
            return tracer.recording.meta_eval(module, targets, args, kwargs)
        if any(n.target is ops.make_state for n in node.all_input_nodes):
            return module(*args, **kwargs)
        key = (type(module), self._param_signature(module), call_signature((args, kwargs)))
        entry = self._leaf_cache.get(key)
        if entry is not None and entry.trace is not self:
            # another trace's value (*shared leaf values*): taken only as it was computed
            if value_state(entry.value) != entry.state:
                entry = None
            else:
                entry.trace = self
        if entry is None:
            value = module(*args, **kwargs)
            entry = self._leaf_cache[key] = LeafEntry(value, value_state(value), self, (module, args, kwargs))
        return entry.value

    def _builder_value(self, builder: Any, args: tuple, kwargs: dict) -> Any:
        """A mask builder's meta value, reusing an identical earlier call's (*builder values* above)."""
        key = ("mask builder", builder, call_signature((args, kwargs)))
        entry = self._leaf_cache.get(key)
        if entry is not None and value_state(entry.value) == entry.state:
            entry.trace = self
            return entry.value
        value = builder(*args, **kwargs)
        if _is_mask_value(value):
            self._leaf_cache[key] = LeafEntry(value, value_state(value), self, (builder, args, kwargs))
        return value

    def _param_signature(self, module: torch.nn.Module) -> tuple:
        sig = self._param_sigs.get(id(module))
        if sig is None:
            entries = _plain_state_entries(module)
            if entries is None:
                entries = module.state_dict(keep_vars=True).items()
            sig = tuple((n, tuple(t.shape), t.dtype) for n, t in entries)
            sig += tuple(sorted((k, v) for k, v in vars(module).items() if isinstance(v, (str, int, float, bool, type(None)))
                                and k not in ("layer_idx", "training")))
            self._param_sigs[id(module)] = sig
        return sig


_Module = torch.nn.Module


def _plain_state_entries(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]] | None:
    """``module.state_dict(keep_vars=True).items()`` where every module below uses
    ``nn.Module``'s own ``state_dict`` (no override, no hooks, no extra state), read
    straight from ``_parameters``, ``_buffers`` and ``_modules`` as it reads them, at a
    third of its cost (a key of the leaf cache, per layer and trace); None otherwise."""
    entries: list[tuple[str, torch.Tensor]] = []

    def walk(m: torch.nn.Module, prefix: str) -> bool:
        cls = type(m)
        if (cls.state_dict is not _Module.state_dict or cls._save_to_state_dict is not _Module._save_to_state_dict
                or getattr(cls, "get_extra_state", _Module.get_extra_state) is not _Module.get_extra_state
                or m._state_dict_pre_hooks or m._state_dict_hooks):
            return False
        for name, param in m._parameters.items():
            if param is not None:
                entries.append((prefix + name, param))
        for name, buf in m._buffers.items():
            if buf is not None and name not in m._non_persistent_buffers_set:
                entries.append((prefix + name, buf))
        return all(walk(child, prefix + name + ".") for name, child in m._modules.items() if child is not None)

    return entries if walk(module, "") else None

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
    never a number. The traces of one build (the whole signature and each
    representative present set, ``fxpp.compile.trace_canonical``) share one cache
    (:class:`LeafValues`): what differs between them is mostly the forward's own code
    around the layers (masks, positions), so a pipeline's layers are meta-evaluated
    once, not once per trace. An entry is reused only while its value keeps the shapes
    it was computed with (a later node may change it in place).
data-dependent node
    A node whose fake evaluation fails on tensor data (``fxpp.trace.values``): its meta
    value comes from the real example inputs instead (``fxpp.trace.real_values``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Node
from torch.fx.node import map_arg

from .. import ops
from ..errors import TraceError
from .source_lines import failure_source_line, target_name
from .targets import is_check_function
from .values import call_signature, is_data_dependent, thaw_all

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


class LeafValues:
    """The leaf cache of the traces of one build (**leaf cache* above).

    One ``FakeTensorMode`` for all of them, so that a value one trace computed is a
    fake tensor of the mode the next trace runs in. Each entry keeps the call's
    arguments (a key names non-tensor arguments by ``id``, and no other object may take
    that ``id`` while the key lives) and the call signature of the value it holds.
    """

    def __init__(self):
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.entries: dict[tuple, tuple[Any, Any, tuple]] = {}  # key -> (value, its call signature, the call)


class MetaEvaluation:
    """The meta value of each node of ``tracer``'s graph."""

    def __init__(self, tracer: "HFTracer", leaf_values: LeafValues | None = None):
        self.tracer = tracer
        self.leaf: torch.nn.Module | None = None  # the leaf module being meta-evaluated
        self._leaf_cache = (leaf_values or LeafValues()).entries
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
        if entry is None or call_signature(entry[0]) != entry[1]:
            # new, or a later node changed the kept value in place (a shape-changing
            # in-place method, a key written into a ModelOutput): evaluated again
            value = module(*args, **kwargs)
            entry = self._leaf_cache[key] = (value, call_signature(value), (module, args, kwargs))
        return entry[0]

    def _param_signature(self, module: torch.nn.Module) -> tuple:
        sig = self._param_sigs.get(id(module))
        if sig is None:
            sig = tuple((n, tuple(t.shape), t.dtype) for n, t in module.state_dict(keep_vars=True).items())
            sig += tuple(sorted((k, v) for k, v in vars(module).items() if isinstance(v, (str, int, float, bool, type(None)))
                                and k not in ("layer_idx", "training")))
            self._param_sigs[id(module)] = sig
        return sig

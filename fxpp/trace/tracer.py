"""The HF-aware ``torch.fx`` tracer: it builds the graph and hands each concern to a collaborator.

See the package docstring (``fxpp.trace``) for the terms.

Collaborators
-------------
Each receives the tracer (its graph, its model, its other collaborators) as its
constructor argument; none imports it.

``meta``: :class:`~fxpp.trace.meta_eval.MetaEvaluation`, the meta value of each new node (fake tensors).
``real``: :class:`~fxpp.trace.real_values.RealValues`, the graph so far run on the real example inputs.
``recording``: :class:`~fxpp.trace.recording.Recording`, outputs that capturing forwards collect.
``standins``: :class:`~fxpp.trace.standins.StandIns`, shape-keeping stand-ins for expert blocks and,
on meta, data-dependent layers.
``state``: :class:`~fxpp.trace.state.StateLifting`, state containers and own caches given to leaves.
``helpers``: :class:`~fxpp.trace.helpers.Helpers`, modeling-file helpers traced or called opaquely.
``guards``: :class:`~fxpp.trace.guards.Guards`, concrete answers to Python control flow, guarded.
``constants``: :class:`~fxpp.trace.constants.Constants`, objects the graph holds by reference.
"""

from __future__ import annotations

import collections.abc
import functools
from typing import Any, Callable, Iterator

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Node, Proxy, Tracer

from ..errors import TraceError
from ..meta import is_from_data, mark_from_data
from ..model_facts import unwrap_forward
from .caches import is_kv_cache
from .constants import CONSTANT_PREFIX, Constants, needs_constant
from .guards import Guards
from .helpers import Helpers
from .layers import trace_path
from .meta_eval import LeafValues, MetaEvaluation, UntraceableCode
from .proxies import MetaAttribute, MetaProxy
from .real_values import RealValues
from .recording import Recording
from .source_lines import StackTraces, short_stack, user_source_line
from .standins import StandIns, returns_tuple as _returns_tuple
from .state import StateLifting
from .targets import is_inplace_method
from .values import fakeify, has_proxy
from .wrappers import nested_forward_kwargs

# Names other rooms import from here.
__all__ = ["CONSTANT_PREFIX", "HFTracer", "MetaAttribute", "MetaProxy", "UntraceableCode", "fakeify", "has_proxy",
           "user_source_line", "_returns_tuple"]


class HFTracer(Tracer):
    """The tracer; use :func:`trace_model` rather than this class directly."""

    def __init__(self, model: torch.nn.Module, layers_fqn: str, fake_mode: FakeTensorMode,
                 leaf_values: LeafValues | None,
                 layer_stack: Callable[[str], tuple[set[int], set[int]]]):
        super().__init__(autowrap_functions=(), param_shapes_constant=False)
        # Buffers a traced forward reads (BERT's token_type_ids) become get_attr nodes, so
        # tensor methods called on them with traced sizes are recorded, not executed.
        self.proxy_buffer_attributes = True
        # Stack traces are recorded, once per call stack (fxpp.trace.source_lines.StackTraces),
        # not by torch.fx for each node.
        self.record_stack_traces = False
        self.stack_traces = leaf_values.stack_traces if leaf_values is not None else StackTraces()
        self.model = model
        self.traced_modules = trace_path(layers_fqn)
        self.fake_mode = fake_mode
        self.placeholder_vals: dict[str, Any] = {}  # input name -> its meta value
        self.evaluating = 0  # > 0 while a node is evaluated (meta or real): plain calls, no proxies
        self.constants = Constants()
        self.meta = MetaEvaluation(self, leaf_values)
        self.real = RealValues(self)
        self.recording = Recording(self)
        self.standins = StandIns(self, layers_fqn, layer_stack)
        self.state = StateLifting(self)
        self.helpers = Helpers(self)
        self.guards = Guards(self)

    # Made on first use: most traces never meet a parameter or buffer as a plain argument,
    # and walking a large model's parameters per trace costs more than the rest of it.
    @functools.cached_property
    def _param_names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}

    @functools.cached_property
    def _buffer_names(self) -> dict[int, str]:
        return {id(b): n for n, b in self.model.named_buffers(remove_duplicate=False)}

    # -- proxies and nodes ---------------------------------------------------------------
    def proxy(self, node: Node) -> Proxy:
        return MetaProxy(node, self)

    def meta_of(self, proxy: Proxy) -> Any:
        return proxy.node.meta.get("val")

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind == "call_method" and is_inplace_method(target) and args and isinstance(args[0], Proxy):
            # ``mask.masked_fill_(cond, 0)`` changes ``mask``: from now on the proxy stands for
            # the written tensor, so later reads depend on the write (else no stage keeps it)
            args[0].node = proxy.node
        return proxy

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if not node.stack_trace:
            text = self.stack_traces.current(self._filter_traceback_frames)
            if text is not None:
                node.stack_trace = text
        if kind == "placeholder":
            node.meta["val"] = self.placeholder_vals[target]
            return node
        if kind == "call_module":
            self.recording.node_created(node)
        if kind != "output":
            node.meta["val"] = self.meta.value(node)
            if not isinstance(node.meta["val"], torch.Tensor) and any(
                    is_from_data(n) for n in node.all_input_nodes):
                mark_from_data(node)  # arithmetic on a scalar read from data
        return node

    def fetch_attr(self, target: str) -> Any:
        """The object a ``get_attr`` target names: a constant, or an attribute of the model."""
        if target in self.constants.objects:
            return self.constants.objects[target]
        obj = self.model
        self.evaluating += 1  # plain attribute reads, not proxies
        try:
            for part in target.split("."):
                obj = getattr(obj, part)
        finally:
            self.evaluating -= 1
        return obj

    # -- delegated to the collaborators ------------------------------------------------
    def real_value(self, node: Node, *, why: BaseException | str) -> Any:
        """``node``'s value for the real example inputs (Note [data-dependent values])."""
        return self.real.value(node, why=why)

    def call_helper(self, fn: Callable, args: tuple, kwargs: dict, *, method: str | None = None) -> Any:
        """Trace a modeling file's helper, or call it as one opaque node (``fxpp.trace.helpers``)."""
        return self.helpers.call(fn, args, kwargs, method=method)

    def recording_forward(self, module, declared_forward, call, kwargs):
        """``call`` collecting the recordable outputs its forward requests (``fxpp.trace.recording``)."""
        return self.recording.forward(module, declared_forward, call, kwargs)

    def finish_own_caches(self) -> None:
        """After the trace: refuse what the cache watch found, then stop watching (Note [own caches])."""
        self.state.finish_own_caches()

    # -- module calls --------------------------------------------------------------------
    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name not in self.traced_modules

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self.evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        if self.evaluating:
            return self.standins.eval_submodule(m, forward, args, kwargs)
        qualname = self.path_of_module(m)
        if not self.is_leaf_module(m, qualname):
            inner = unwrap_forward(type(m).forward)
            kwargs = nested_forward_kwargs(inner, args, kwargs)
            call = self.recording_forward(m, type(m).forward, lambda *a, **k: inner(m, *a, **k), kwargs)
            return super().call_module(m, call, args, kwargs)
        args, kwargs, states = self.state.lift_states(args, kwargs)
        args, kwargs, caches = self.state.lift_caches(qualname, args, kwargs)
        targets = self.recording.begin_leaf(m, qualname)
        out = super().call_module(m, forward, args, kwargs)
        for record in caches:
            record.check_after(out.node, type(self.model).__name__)
        if targets:
            self.recording.take(out, targets)
        self.state.record_writes(states, out)
        return self._constant_items(out)

    def _constant_items(self, out: Any) -> Any:
        """A leaf's tuple output with its ``None`` items as the constant ``None``, not a proxy.

        A layer that returns ``(hidden, None)`` when a flag is off (RWKV's state without
        a cache, XLNet's query stream without ``target_mapping``) is read by the forward
        as ``output_g is not None`` or passed on to the next layer: as a proxy the test
        is always true and the ``None`` would have to cross a cut. The ``None`` is fixed
        by the flags the trace is specialized to, as the real forward's would be.
        """
        val = self.meta_of(out) if isinstance(out, Proxy) else None
        if type(val) is tuple and any(v is None for v in val):
            return tuple(None if v is None else out[i] for i, v in enumerate(val))
        return out

    # -- arguments -----------------------------------------------------------------------
    def create_arg(self, a: Any) -> Any:
        if isinstance(a, Proxy):
            return a.node
        if type(a).__module__ == "numpy" and hasattr(a, "item") and getattr(a, "ndim", None) == 0:
            return a.item()  # numpy scalars print as np.float64(...), which graph code cannot name
        if isinstance(a, torch.nn.Parameter) or (isinstance(a, torch.Tensor) and id(a) in self._buffer_names):
            name = self._param_names.get(id(a)) or self._buffer_names.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        if is_kv_cache(a):
            # A cache object built inside the forward would become a graph constant and
            # keep every call's keys and values: wrong from the second call on. Only a
            # layer may get one, as its own empty copy (Note [own caches]).
            raise TraceError(
                f"{type(self.model).__name__}: its forward passes a {type(a).__name__} it created itself at "
                f"{short_stack()} even with use_cache=False, not as an argument of a layer; a key/value cache "
                "cannot live inside a pipeline stage graph"
            )
        if isinstance(a, torch.Tensor) or needs_constant(a):
            return self.create_node("get_attr", self.constants.name_of(a), (), {})
        return super().create_arg(a)

    # -- Python control flow on proxies: fxpp.trace.guards -------------------------------
    def to_bool(self, obj: Proxy) -> bool:
        return self.guards.concrete(obj, bool, "Python control flow depends on tensor data")

    def concretize(self, obj: Proxy, kind: type) -> Any:
        return self.guards.concrete(obj, kind, f"a tensor value is used as a Python {kind.__name__}")

    def concrete_len(self, obj: Proxy) -> int:
        return self.guards.concrete_len(obj)

    def iter(self, obj: Proxy) -> Iterator:
        val = self.meta_of(obj)
        if isinstance(val, collections.abc.Mapping):
            return iter(list(val.keys()))
        n = self.concrete_len(obj)
        return iter([obj[i] for i in range(n)])

    def keys(self, obj: Proxy) -> Any:
        val = self.meta_of(obj)
        if isinstance(val, collections.abc.Mapping):
            return list(val.keys())
        return super().keys(obj)

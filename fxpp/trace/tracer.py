"""The HF-aware ``torch.fx`` tracer: proxies that carry meta values, leaf modules, guards, state containers.

See the package docstring (``fxpp.trace``) for the terms.
"""

from __future__ import annotations

import collections.abc
import copy
import functools
import inspect
import operator
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx
from torch.fx import Node, Proxy, Tracer
from torch.fx.node import map_aggregate, map_arg
from torch.fx.proxy import Attribute
from torch._subclasses.fake_tensor import FakeTensorMode

from .. import ops
from ..errors import TraceError
from ..meta import is_from_data, mark_from_data
from .caches import OwnCache, is_kv_cache
from .layers import trace_path
from .targets import CONCRETE_TENSOR_ATTRS, is_check_function, is_inplace_method
from .recording import recorded_submodules, recorder_specs
from .wrappers import captures_outputs, nested_forward_kwargs, unwrap_forward


# get_attr names of the objects a trace holds as constants (configs, tensors it made);
# numbered per trace, so the same name means different objects in two traces.
CONSTANT_PREFIX = "_fxpp_const_"


@dataclass
class _StateRecord:
    """A mutable container seen during the trace and the node of each entry's writer."""

    entries: dict = field(default_factory=dict)


class MetaProxy(Proxy):
    """A Proxy whose node carries a meta value, so Python can ask it questions."""

    def __getattr__(self, name: str) -> Any:
        val = self.node.meta.get("val")
        if name in CONCRETE_TENSOR_ATTRS and isinstance(val, torch.Tensor):
            return getattr(val, name)
        if name == "prod" and isinstance(val, torch.Size):
            # numpy reductions call obj.prod(); torch.Size has none: multiply the dims symbolically.
            dims = [self[i] for i in range(len(val))]
            return lambda *args, **kwargs: functools.reduce(operator.mul, dims, 1)
        if name == "dtype" and isinstance(val, torch.Tensor):
            # Forwards pass dtypes to Python APIs (tensor.type(dtype), torch.finfo): a
            # concrete dtype, guarded so that a stage run in another dtype retraces.
            self.tracer._guard(MetaAttribute(self, "dtype"), val.dtype)
            return val.dtype
        return MetaAttribute(self, name)

    def __len__(self) -> int:
        return self.tracer.concrete_len(self)

    def __int__(self) -> int:
        return self.tracer.concretize(self, int)

    def __index__(self) -> int:
        return self.tracer.concretize(self, int)

    def __float__(self) -> float:
        return self.tracer.concretize(self, float)

    def __contains__(self, item: Any) -> bool:
        return item in self.tracer.meta_of(self)

    def __setitem__(self, key: Any, value: Any) -> None:
        # ``h[mask, :] = v`` (Qwen3-VL's deepstack merge): record the write and make this
        # proxy stand for the written tensor from now on.
        self.node = self.tracer.create_proxy("call_function", ops.setitem, (self, key, value), {}).node


class MetaAttribute(MetaProxy, Attribute):
    pass


class UntraceableCode(TraceError):
    """Code the tracer cannot follow symbolically: Python control flow or a Python
    number taken from tensor data, or an op that fake tensors cannot run.

    Raised to the user from the model's own code; inside a helper function it makes
    the helper one opaque node instead (:meth:`HFTracer.call_helper`).
    """


class HFTracer(Tracer):
    """The tracer; use :func:`trace_model` rather than this class directly."""

    def __init__(self, model: torch.nn.Module, layers_fqn: str, fake_mode: FakeTensorMode):
        super().__init__(autowrap_functions=(), param_shapes_constant=False)
        # Buffers a traced forward reads (BERT's token_type_ids) become get_attr nodes, so
        # tensor methods called on them with traced sizes are recorded, not executed.
        self.proxy_buffer_attributes = True
        self.record_stack_traces = True
        self.model = model
        self.traced_modules = trace_path(layers_fqn)
        self.fake_mode = fake_mode
        self.constants: dict[str, Any] = {}
        self._constant_ids: dict[int, str] = {}
        self._placeholder_vals: dict[str, Any] = {}
        self.real_inputs: dict[str, Any] = {}
        self._real_vals: dict[Node, Any] = {}
        self._opaque_helpers: set[int] = set()
        self._evaluating = 0
        self._running_real = 0  # > 0 inside _call_real: real values, never a stand-in
        self._helper_depth = 0  # > 0 while tracing into a helper (call_helper)
        self.meta_fallbacks: list[str] = []
        self._leaf_cache: dict = {}
        self._meta_leaf: torch.nn.Module | None = None  # the leaf module being meta-evaluated
        # the modules of the decoder-layer stack: the only place expert blocks get a stand-in
        self._layer_stack_ids = {id(m) for m in model.get_submodule(layers_fqn).modules()}
        self._layer_ids = {id(m) for m in model.get_submodule(layers_fqn).children()}  # the layers themselves
        self._param_sigs: dict[int, tuple] = {}
        self._states: dict[int, _StateRecord] = {}
        self._own_caches: dict[int, OwnCache] = {}  # Note [own caches] in fxpp.trace.caches
        # fxpp.trace.recording: the outputs each traced capture_outputs forward collects
        self._recording: list[tuple[list, dict[str, list]]] = []
        self._pending_record: list[tuple[str, str, int]] = []
        self._captured: list[tuple[str, int, Any]] = []
        self._recorded_meta: dict[tuple, Any] = {}
        # a leaf call that records outputs -> its (path, index) targets, for real evaluation
        self._record_targets: dict[Node, list[tuple[str, int]]] = {}
        self._recording_ids: set[int] = set()  # modules recorded by the leaf being meta-evaluated
        self._pending_targets: list[tuple[str, int]] = []  # for the call_module node being created
        self._real_recorded: dict[tuple, Any] = {}  # (path, index, occurrence) -> real value
        self._real_record_calls: dict[Node, list[tuple[str, int, Any]]] = {}  # in call order
        self._param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self._buffer_names = {id(b): n for n, b in model.named_buffers(remove_duplicate=False)}

    # -- proxies and meta values -------------------------------------------------
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
        if kind == "placeholder":
            node.meta["val"] = self._placeholder_vals[target]
            return node
        if kind == "call_module" and self._pending_targets:
            self._record_targets[node], self._pending_targets = self._pending_targets, []
        if kind != "output":
            node.meta["val"] = self._meta_eval(node)
            if not isinstance(node.meta["val"], torch.Tensor) and any(
                    is_from_data(n) for n in node.all_input_nodes):
                mark_from_data(node)  # arithmetic on a scalar read from data
        return node

    def _meta_eval(self, node: Node) -> Any:
        if node.op == "get_attr":
            obj = self._fetch_attr(node.target)
            if isinstance(obj, torch.Tensor):
                return self.fake_mode.from_tensor(obj)
            return obj

        def load(n: Node) -> Any:
            return n.meta["val"]

        args = _thaw_all(map_arg(node.args, load))
        kwargs = {k: _thaw_all(v) for k, v in map_arg(node.kwargs, load).items()}
        if node.op == "call_function" and is_check_function(node.target):
            return None
        if node.op == "call_function" and node.target is ops.take_recorded:
            return self._recorded_meta[tuple(node.args)]
        if node.op == "call_function" and id(node.target) in self._opaque_helpers:
            return self._from_data(node, self.real_value(node, why=f"opaque helper {node.target.__name__}"))
        self._evaluating += 1
        try:
            with self.fake_mode:
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                if node.op == "call_module":
                    return self._eval_leaf(node, args, kwargs)
        except TraceError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with node context
            if _is_data_dependent(e):
                value = self._from_data(node, self.real_value(node, why=e))
                if node in self._record_targets:  # what the leaf recorded, from the real run
                    self._captured = [(p, i, self._fakeify_value(v)) for p, i, v in self._real_record_calls[node]]
                return value
            raise UntraceableCode(
                f"{type(self.model).__name__}: cannot compute the output shape of node {node.name} "
                f"({node.op} {_target_name(node.target)}) at {_node_source_line(node, e)}: {type(e).__name__}: {e}"
            ) from e
        finally:
            self._evaluating -= 1
        raise AssertionError(node.op)

    def _eval_leaf(self, node: Node, args: tuple, kwargs: dict) -> Any:
        """Meta-evaluate a leaf module, reusing the result of an identical earlier call.

        Decoder layers dominate tracing time (a fake-tensor run each). Two calls of
        modules of one class, with parameters of the same shapes and inputs of the same
        shapes, give outputs of the same shapes; only the meta value is reused, never a
        number. Calls that touch a state container are always evaluated: their writes
        differ per layer.
        """
        module = self.model.get_submodule(node.target)
        # The leaf's own forward gets no shape-keeping stand-in (``_eval_submodule``):
        # its meta value is the stage metadata, so it is computed, or evaluated on the
        # real example inputs, or refused, never assumed.
        outer, self._meta_leaf = self._meta_leaf, module
        try:
            return self._eval_leaf_call(node, module, args, kwargs)
        finally:
            self._meta_leaf = outer

    def _eval_leaf_call(self, node: Node, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        targets, self._pending_record = self._pending_record, []
        caches = self._caches_of(node)
        if caches:  # always evaluated, on the shared cache: the watch sees which slots this call uses
            for record in caches:
                record.current = node
            try:
                out = self._eval_recording(module, targets, args, kwargs) if targets else module(*args, **kwargs)
            finally:
                for record in caches:
                    record.current = None
            for record in caches:
                record.evaluated.add(node)
            return out
        if targets:
            return self._eval_recording(module, targets, args, kwargs)
        if any(n.target is ops.make_state for n in node.all_input_nodes):
            return module(*args, **kwargs)
        key = (type(module), self._param_signature(module), _signature((args, kwargs)))
        if key not in self._leaf_cache:
            self._leaf_cache[key] = module(*args, **kwargs)
        return self._leaf_cache[key]

    def _eval_recording(self, module, targets: list[tuple[str, str, int]], args, kwargs) -> Any:
        """Meta-evaluate a leaf with temporary hooks on the submodules it records (in call order)."""
        captured = []
        handles = []
        self._recording_ids = {id(self.model.get_submodule(path)) for _, path, _ in targets}
        try:
            for _, path, index in targets:
                def hook(mod, a, output, path=path, index=index):
                    value = output[index] if isinstance(output, tuple) else output
                    if value is not None:
                        captured.append((path, index, value))

                handles.append(self.model.get_submodule(path).register_forward_hook(hook))
            out = module(*args, **kwargs)
        finally:
            self._recording_ids = set()
            for handle in handles:
                handle.remove()
        self._captured = captured
        return out

    def _param_signature(self, module: torch.nn.Module) -> tuple:
        sig = self._param_sigs.get(id(module))
        if sig is None:
            sig = tuple((n, tuple(t.shape), t.dtype) for n, t in module.state_dict(keep_vars=True).items())
            sig += tuple(sorted((k, v) for k, v in vars(module).items() if isinstance(v, (str, int, float, bool, type(None)))
                                and k not in ("layer_idx", "training")))
            self._param_sigs[id(module)] = sig
        return sig

    def _fetch_attr(self, target: str) -> Any:
        if target in self.constants:
            return self.constants[target]
        obj = self.model
        self._evaluating += 1  # plain attribute reads, not proxies
        try:
            for part in target.split("."):
                obj = getattr(obj, part)
        finally:
            self._evaluating -= 1
        return obj

    # -- helpers that cannot be traced -----------------------------------------------
    def call_helper(self, fn: Callable, args: tuple, kwargs: dict, *, method: str | None = None) -> Any:
        """Trace a modeling file's helper function, or call it as one opaque node.

        Helpers such as ``image_size_to_num_patches`` or ``unpad_image`` type-check
        their arguments or loop over tensor data. When tracing into one fails, the nodes
        it made are removed and the helper becomes a single ``call_function`` node whose
        meta value comes from running it on the example inputs (Note [data-dependent values]).
        """
        last = self.graph._root.prev  # the newest node
        self._helper_depth += 1
        try:
            return fn(*args, **kwargs)
        except UntraceableCode:
            pass  # ``int(grid[0])``, ``torch.tensor`` of traced values: opaque, like any failure below
        except TraceError:
            raise  # a problem opaque evaluation has too (no real values on the meta device)
        except Exception:  # noqa: BLE001 - retried as one opaque node
            pass
        finally:
            self._helper_depth -= 1
        made = []
        node = self.graph._root.prev
        while node is not last:
            made.append(node)
            node = node.prev
        for node in made:  # newest first: users before their inputs
            self._real_vals.pop(node, None)
            self.graph.erase_node(node)
        if method is None:
            self._opaque_helpers.add(id(fn))
            return self.create_proxy("call_function", fn, args, kwargs)
        owner, rest = args[0], args[1:]
        self._check_parameter_free(owner, method, rest, kwargs)
        self._opaque_helpers.add(id(ops.call_method_of))
        return self.create_proxy("call_function", ops.call_method_of, (ops.ModuleRef(owner), method, *rest), kwargs)

    def _check_parameter_free(self, owner: torch.nn.Module, method: str, args: tuple, kwargs: dict) -> None:
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
                f"{type(self.model).__name__}: {type(owner).__name__}.{method} ({_short_stack()}) depends on tensor data "
                f"and cannot be traced, and it uses parameters ({', '.join(sorted(used))}) so fxpp cannot call it as "
                "one opaque step either"
            )

    # -- real values: see Note [data-dependent values] ---------------------------------
    def real_value(self, node: Node, *, why: BaseException | str) -> Any:
        """``node``'s value for the real example inputs, evaluating the graph so far."""
        if node in self._real_vals:
            return self._real_vals[node]
        if not self.real_inputs:
            raise TraceError(
                f"{type(self.model).__name__}: node {node.name} at {_short_stack()} depends on tensor data "
                f"({type(why).__name__ if isinstance(why, BaseException) else why}); fxpp evaluates such values on the "
                "example inputs, which needs a model with real weights (not on the meta device) and real example inputs"
            )
        # On the random streams' own copies: a retrace inside a training step must not move
        # the dropout masks of the run around it.
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            for n in self.graph.nodes:
                if n in self._real_vals or n.op == "output":
                    continue
                self._real_vals[n] = self._run_real(n)
                if n is node:
                    break
        return self._real_vals[node]

    def _run_real(self, node: Node) -> Any:
        if node.op == "placeholder":
            return self.real_inputs[node.target]
        if node.op == "get_attr":
            return self._fetch_attr(node.target)
        if node.op == "call_function" and (node.target in ops.GUARD_OPS or is_check_function(node.target)):
            return None
        if node.op == "call_function" and node.target is ops.take_recorded:
            return self._real_recorded[tuple(node.args)]
        if node.op == "call_module" and node in self._record_targets:
            return self._run_real_recording(node)
        return self._call_real(node)

    def _call_real(self, node: Node) -> Any:
        """Call ``node``'s target on the real values of its inputs."""
        args = _thaw_all(map_arg(node.args, self._real_vals.__getitem__))
        kwargs = {k: _thaw_all(v) for k, v in map_arg(node.kwargs, self._real_vals.__getitem__).items()}
        self._evaluating += 1
        self._running_real += 1
        try:
            with torch.no_grad():
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                return self.model.get_submodule(node.target)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with node context
            raise TraceError(
                f"{type(self.model).__name__}: cannot evaluate node {node.name} ({node.op} {_target_name(node.target)}) "
                f"on the example inputs at {_node_source_line(node, e)}: {type(e).__name__}: {e}"
            ) from e
        finally:
            self._evaluating -= 1
            self._running_real -= 1

    def _run_real_recording(self, node: Node) -> Any:
        """Run a recording leaf on real values with hooks on its recorded submodules,
        keeping what they return for the ``take_recorded`` nodes after it."""
        calls: list[tuple[str, int, Any]] = []
        handles = []
        try:
            for path, index in self._record_targets[node]:
                def hook(mod, a, output, path=path, index=index):
                    value = output[index] if isinstance(output, tuple) else output
                    if value is not None:
                        calls.append((path, index, value))

                handles.append(self.model.get_submodule(path).register_forward_hook(hook))
            out = self._call_real(node)
        finally:
            for handle in handles:
                handle.remove()
        seen: dict[str, int] = {}
        for path, index, value in calls:
            occurrence = seen.get(path, 0)
            seen[path] = occurrence + 1
            self._real_recorded[(path, index, occurrence)] = value
        self._real_record_calls[node] = calls
        return out

    def _from_data(self, node: Node, value: Any) -> Any:
        """The meta value of ``node`` evaluated on the real example; a Python value (not a
        tensor) read from data is marked ``from_data`` (``fxpp.meta.NodeFacts``)."""
        if not isinstance(value, torch.Tensor):
            mark_from_data(node)
        return self._fakeify_value(value)

    def _fakeify_value(self, value: Any) -> Any:
        def fake(x):
            return self.fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x

        if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
            return type(value)(self._fakeify_value(v) for v in value)
        if isinstance(value, collections.abc.Mapping):
            value = copy.copy(value)  # the real value stays cached for later real evaluation
            for k in list(value.keys()):
                value[k] = self._fakeify_value(value[k])
            return value
        return fake(value)

    # -- module calls --------------------------------------------------------------
    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name not in self.traced_modules

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:
            return self._eval_submodule(m, forward, args, kwargs)
        qualname = self.path_of_module(m)
        if not self.is_leaf_module(m, qualname):
            inner = unwrap_forward(type(m).forward)
            kwargs = nested_forward_kwargs(inner, args, kwargs)
            call = self.recording_forward(m, type(m).forward, lambda *a, **k: inner(m, *a, **k), kwargs)
            return super().call_module(m, call, args, kwargs)
        args, kwargs, states = self._lift_states(args, kwargs)
        args, kwargs, caches = self._lift_caches(qualname, args, kwargs)
        before = {sid: dict(_items(obj)) for sid, (obj, _) in states.items()}
        targets = recorded_submodules(m, qualname, self._recording[-1][0]) if self._recording else []
        self._pending_record = targets
        if targets:
            self._pending_targets = [(path, index) for _, path, index in targets]
        out = super().call_module(m, forward, args, kwargs)
        for record in caches:
            record.check_after(out.node, type(self.model).__name__)
        if targets:
            self._take_recorded(out, targets)
        for sid, (obj, state_proxy) in states.items():
            for key, value in _items(obj):
                if key not in before[sid] or before[sid][key] is not value:
                    entry = self.create_proxy(
                        "call_function", ops.state_entry, (state_proxy, key), {"after": out}
                    )
                    self._states[sid].entries[key] = entry
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

    def recording_forward(self, module, declared_forward, call, kwargs):
        """``call`` collecting the recordable outputs its ``capture_outputs`` forward requests
        (``fxpp.trace.recording``): leaf calls inside add their ``take_recorded`` nodes, and
        the forward's output gets them as its tuple, as the decorator would set it."""
        specs = recorder_specs(module, kwargs) if captures_outputs(declared_forward) else []
        if not specs:
            return call

        def run(*a, **k):
            collected: dict[str, list] = {key: [] for key, _ in specs}
            self._recording.append((specs, collected))
            try:
                out = call(*a, **k)
            finally:
                self._recording.pop()
            for key, values in collected.items():
                out[key] = tuple(values)
            return out

        return run

    def _take_recorded(self, out: Proxy, targets: list[tuple[str, str, int]]) -> None:
        """One ``take_recorded`` node per value the leaf call ``out`` recorded, in call order."""
        keys = {path: key for key, path, _ in targets}
        _, collected = self._recording[-1]
        seen: dict[str, int] = {}
        for path, index, value in self._captured:
            occurrence = seen.get(path, 0)
            seen[path] = occurrence + 1
            self._recorded_meta[(path, index, occurrence)] = value
            proxy = self.create_proxy("call_function", ops.take_recorded, (path, index, occurrence), {"after": out})
            collected[keys[path]].append(proxy)
        self._captured = []

    def _eval_submodule(self, m, forward, args, kwargs):
        """Run a module nested inside a leaf, during the leaf's meta evaluation.

        Some nested modules cannot run on fake tensors: MoE expert dispatch is
        data-dependent (``nonzero``, loops over the experts hit) or uses kernels whose
        meta functions are stricter than the CPU kernels (``grouped_mm`` in fp32). Such
        a module is assumed to map its first tensor input to an output of the same
        shape. That only feeds meta values, never the numbers a stage computes.

        The stand-in is an assumption, so it is confined to expert blocks inside the
        decoder layers (``_in_moe_fallback_scope``) that return one tensor, and the leaf
        itself gets none (but see ``_layer_contract_applies``): any other failure
        propagates, and the leaf is evaluated on the real example inputs (data-dependent)
        or refused with its node named, rather than given the shape of its input
        (Ernie 4.5 VL's resampler, "Moe" only in its family's name, merges 2x2 patches:
        32 rows in, 8 out).
        """
        if self._running_real:
            # Real values feed decisions (a mask builder's None, a data guard): a module that
            # fails on them is an error, never an empty_like stand-in with made-up numbers.
            return forward(*args, **kwargs)
        if m is self._meta_leaf:
            try:
                return forward(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                if not self._layer_contract_applies(m, e, args):
                    raise  # evaluated on the real example inputs (data-dependent), else refused
                self.meta_fallbacks.append(type(m).__name__)
                return torch.empty_like(args[0])
        try:
            return forward(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, _RecordedNeedsData):
                raise
            if _is_data_dependent(e) and id(m) in self._recording_ids:
                # a module whose output the model records (a router) must really run: a
                # shape-keeping stand-in would record nothing (Note [data-dependent values])
                raise _RecordedNeedsData(f"{type(m).__name__} is recorded and depends on tensor data") from e
            if not self._in_moe_fallback_scope(m):
                raise  # data-dependent: the leaf is evaluated on the real example inputs; else refused
            first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if first is None or _returns_tuple(type(m)):
                # one tensor standing for a tuple would be unpacked along its first dim by the
                # caller (``hidden, _ = self.mlp(x)``: a wrong shape, right only by broadcasting)
                raise
            self.meta_fallbacks.append(type(m).__name__)
            return torch.empty_like(first)

    def _layer_contract_applies(self, m: torch.nn.Module, e: BaseException, args: tuple) -> bool:
        """Whether a decoder layer whose own meta evaluation failed on tensor data may take
        the shape of its hidden-states input.

        Only without real example inputs (a meta-device model: nothing to evaluate, and
        JetMoE's layers route their attention through data-dependent experts), only for an
        entry of the decoder-layer stack, which maps hidden states to the next layer's
        hidden states, of an MoE model, returning one tensor. With real inputs the layer is
        evaluated on them instead, so its meta value is the real shape.
        """
        return (
            not self.real_inputs
            and _is_data_dependent(e)
            and not isinstance(e, _RecordedNeedsData)
            and id(m) in self._layer_ids
            and self._in_moe_fallback_scope(m)
            and not _returns_tuple(type(m))
            and bool(args) and isinstance(args[0], torch.Tensor)
        )

    def _in_moe_fallback_scope(self, m: torch.nn.Module) -> bool:
        """Whether ``m`` is an expert block, whose data-dependent dispatch keeps the shape
        of its input (see ``_eval_submodule``); other modules get real evaluation."""
        if id(m) not in self._layer_stack_ids:
            # expert blocks are parts of decoder layers; elsewhere "moe" in a class name is
            # often only the family's (Ernie4_5_VLMoeVariableResolutionResamplerModel)
            return False
        name = type(m).__name__.lower()
        if any(v in name for v in ("vision", "visual", "audio")):
            return False  # towers of MoE VLMs (Qwen3VLMoeVisionModel) are not expert blocks
        return "expert" in name or "moe" in name

    def _lift_states(self, args, kwargs):
        """Replace mutable containers passed to a leaf by explicit ``make_state`` nodes."""
        states: dict[int, tuple[Any, Proxy]] = {}

        def lift(value: Any) -> Any:
            if _is_state_container(value):
                record = self._states.setdefault(id(value), _StateRecord())
                entries = {k: record.entries.get(k, v) for k, v in _items(value)}
                if any(not isinstance(v, Proxy) for v in entries.values()):
                    raise TraceError(
                        f"{type(self.model).__name__}: a {type(value).__name__} passed to a layer holds "
                        "values that were not produced inside the traced forward"
                    )
                proxy = self.create_proxy("call_function", ops.make_state, (type(value), entries), {})
                # The meta value is the live container itself: the layer's meta
                # evaluation writes into it and we diff it afterwards.
                proxy.node.meta["val"] = value
                states[id(value)] = (value, proxy)
                return proxy
            return value

        return tuple(lift(a) for a in args), {k: lift(v) for k, v in kwargs.items()}, states

    def _lift_caches(self, target: str, args, kwargs):
        """Replace each key/value cache the forward created and passes to a leaf by a
        ``fresh_cache`` node whose meta value is the shared, watched cache (Note [own caches])."""
        records: dict[int, OwnCache] = {}
        proxies: dict[int, Proxy] = {}
        name = type(self.model).__name__

        def lift(value: Any) -> Any:
            if not is_kv_cache(value):
                return value
            if id(value) not in proxies:
                record = self._own_caches.get(id(value))
                if record is None:
                    held = sorted(n or "the model" for n, mod in self.model.named_modules()
                                  if any(v is value for v in vars(mod).values()))
                    if held:  # kept between calls, not created by each forward: its state is not empty per call
                        raise TraceError(
                            f"{name}: {held[0]} keeps the {type(value).__name__} it passes to {target} at "
                            f"{_short_stack()} between calls; fxpp gives a layer an empty cache only where the "
                            "forward creates it"
                        )
                    record = self._own_caches[id(value)] = OwnCache.adopt(value, name, _short_stack)
                record.check_before(target, name)
                proxy = self.create_proxy("call_function", ops.fresh_cache, (record.template,), {})
                proxy.node.meta["val"] = value
                record.nodes.append(proxy.node)
                records[id(value)], proxies[id(value)] = record, proxy
            return proxies[id(value)]

        args, kwargs = tuple(lift(a) for a in args), {k: lift(v) for k, v in kwargs.items()}
        return args, kwargs, list(records.values())

    def _caches_of(self, node: Node) -> list[OwnCache]:
        """The own caches whose ``fresh_cache`` nodes ``node`` reads."""
        found = []
        for record in self._own_caches.values():
            if any(n in record.nodes for n in node.all_input_nodes):
                found.append(record)
        return found

    def finish_own_caches(self) -> None:
        """After the trace: refuse what the cache watch found since the last layer call, then stop watching."""
        try:
            for record in self._own_caches.values():
                record.check_uses(type(self.model).__name__)
        finally:
            for record in self._own_caches.values():
                record.finish()

    # -- arguments -----------------------------------------------------------------
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
                f"{_short_stack()} even with use_cache=False, not as an argument of a layer; a key/value cache "
                "cannot live inside a pipeline stage graph"
            )
        if isinstance(a, torch.Tensor) or _needs_constant(a):
            return self.create_node("get_attr", self._constant(a), (), {})
        return super().create_arg(a)

    def _constant(self, obj: Any) -> str:
        name = self._constant_ids.get(id(obj))
        if name is None:
            name = f"{CONSTANT_PREFIX}{len(self.constants)}"
            self.constants[name] = obj
            self._constant_ids[id(obj)] = name
        return name

    # -- Python control flow on proxies --------------------------------------------
    def _guard(self, proxy: Proxy, value: Any) -> None:
        where = _short_stack()
        self.create_proxy("call_function", ops.check_guard, (proxy, value, where), {})

    def to_bool(self, obj: Proxy) -> bool:
        return self._concrete(obj, bool, "Python control flow depends on tensor data")

    def concretize(self, obj: Proxy, kind: type) -> Any:
        return self._concrete(obj, kind, f"a tensor value is used as a Python {kind.__name__}")

    def _concrete(self, obj: Proxy, kind: type, what: str) -> Any:
        """``kind(value)`` from the node's meta value, guarded so the stage checks it at
        run time.

        A bool or int that needs tensor data (``if mask.any():``) is taken from the real
        example values and guarded with ``check_data``: every call re-checks it on its own
        data and retraces where it differs, and every later stage re-checks it too (its
        inputs cross each cut, ``fxpp.analysis.annotate.rechecked_on_every_stage``).
        Without real values (the meta device), or for other kinds, it is an
        :class:`UntraceableCode`.
        """
        val = self.meta_of(obj)
        try:
            result = kind(val)
        except Exception as e:  # noqa: BLE001
            # Inside a helper a decision on data makes the helper one opaque node instead,
            # recomputed whole on every call (call_helper): exact without any guard.
            if kind in (bool, int) and _is_data_dependent(e) and self.real_inputs and not self._helper_depth:
                try:
                    result = kind(self.real_value(obj.node, why=e))
                except TraceError:
                    raise
                except Exception as real_error:  # noqa: BLE001 - not a bool or int on real data either
                    raise UntraceableCode(
                        f"{type(self.model).__name__}: {what} at {_short_stack()} (node {obj.node.name}), and its "
                        f"real value is not a {kind.__name__}: {real_error}") from e
                self.create_proxy("call_function", ops.check_data, (obj, result, _short_stack()), {})
                return result
            raise UntraceableCode(
                f"{type(self.model).__name__}: {what} at {_short_stack()} (node {obj.node.name}); "
                "fxpp traces decisions on tensor data only on real example values (not on the meta device)"
            ) from e
        if is_from_data(obj.node):
            # a scalar read from data (``k = x.sum().item(); if k > 0:``): a decision on data,
            # re-checked on every stage like any other
            self.create_proxy("call_function", ops.check_data, (obj, result, _short_stack()), {})
        else:
            self._guard(obj, result)
        return result

    def concrete_len(self, obj: Proxy) -> int:
        val = self.meta_of(obj)
        n = len(val)
        if isinstance(val, torch.Tensor):
            self._guard(self.create_proxy("call_function", len, (obj,), {}), n)
        return n

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


class _RecordedNeedsData(Exception):
    """A recorded submodule (a router) failed its meta evaluation on tensor data: its
    leaf is evaluated on the real example inputs (no shape-keeping stand-in)."""


def _is_data_dependent(e: BaseException) -> bool:
    """A fake-tensor failure that only the tensor's values could answer."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    if isinstance(e, (DataDependentOutputException, DynamicOutputShapeException, _RecordedNeedsData)):
        return True
    name = type(e).__name__
    # "... its data is not allocated yet": Python iterating a fake tensor's elements
    # (UDOP's ``rows, cols = zip(*ind)``)
    return (name in ("GuardOnDataDependentSymNode", "DataDependentOutputException") or "data-dependent" in str(e).lower()
            or "data is not allocated" in str(e))


@functools.lru_cache(maxsize=None)
def _returns_tuple(cls: type) -> bool:
    """Whether ``cls.forward`` has a ``return a, b`` (read from its source, not from its
    return annotation, which is often wrong: Lfm2MoeSparseMoeBlock's says tuple and it
    returns one tensor). Unknown source: ``False``."""
    import ast
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(cls.forward))))
    except (OSError, TypeError, SyntaxError, AttributeError):
        return False
    return any(isinstance(n, ast.Return) and isinstance(n.value, ast.Tuple) for n in ast.walk(tree))


def _signature(value: Any) -> Any:
    """A hashable description of a call's arguments: tensor shapes, not values."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.dtype, str(value.device))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _signature(v)) for k, v in value.items()))
    if isinstance(value, (str, int, float, bool, type(None), torch.dtype, torch.device)):
        return value
    return ("id", id(value))


def _thaw(x: Any) -> Any:
    # torch.fx stores aggregates as immutable_list / immutable_dict; models may mutate them.
    if type(x).__name__ == "immutable_list":
        return list(x)
    if type(x).__name__ == "immutable_dict":
        return dict(x)
    return x


def _thaw_all(x: Any) -> Any:
    """``_thaw`` through torch.fx's own containers only.

    ``map_aggregate`` would rebuild every dict it meets, so a meta value that is a
    ``ModelOutput`` (a leaf vision tower's output) would lose its attributes.
    """
    name = type(x).__name__
    if name == "immutable_list" or type(x) is list:
        return [_thaw_all(v) for v in x]
    if type(x) is tuple:
        return tuple(_thaw_all(v) for v in x)
    if name == "immutable_dict" or type(x) is dict:
        return {k: _thaw_all(v) for k, v in x.items()}
    return x


def _items(obj: Any) -> list:
    return list(obj.items())


def _is_state_container(value: Any) -> bool:
    return (
        isinstance(value, collections.abc.MutableMapping)
        and not isinstance(value, dict)
        and not any(isinstance(v, Proxy) for v in value.values())
    )


def _needs_constant(a: Any) -> bool:
    """Objects torch.fx cannot print into code: configs, modules' helper objects."""
    simple = (str, int, float, bool, complex, torch.dtype, torch.device, torch.memory_format, torch.layout, slice, range)
    if a is None or a is ... or isinstance(a, simple):
        return False
    if isinstance(a, (tuple, list, dict)):
        return False
    import enum

    if isinstance(a, enum.Enum):
        return False
    return True


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)


def _is_user_frame(filename: str) -> bool:
    return "/fxpp/" not in filename and "/torch/" not in filename and "/contextlib" not in filename


def _short_stack() -> str:
    """The innermost model source line of the current Python stack."""
    for frame in reversed(traceback.extract_stack()):
        if _is_user_frame(frame.filename) and "/transformers/utils/" not in frame.filename:
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "<unknown>"


def _node_source_line(node: Node, e: BaseException) -> str:
    """Where a node came from: the exception's model frame, else the node's own stack trace."""
    line = user_source_line(e)
    if line != "<unknown>":
        return line
    return _short_stack()


def user_source_line(e: BaseException) -> str:
    """The innermost model source line in an exception's traceback."""
    frames = traceback.extract_tb(e.__traceback__)
    for frame in reversed(frames):
        if _is_user_frame(frame.filename):
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "<unknown>"


def has_proxy(value: Any) -> bool:
    found = []
    map_aggregate(value, lambda x: found.append(x) if isinstance(x, Proxy) else x)
    return bool(found)


def fakeify(fake_mode: FakeTensorMode, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fake_mode.from_tensor(value)
    return value

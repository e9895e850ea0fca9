"""HF-aware torch.fx tracer at module granularity.

transformers 5 dropped ``transformers.utils.fx``; this is fxpp's replacement. It
traces a model's forward (and the forward of every module on the path from the root
to the decoder-layer list) into one ``torch.fx.Graph`` in which decoder layers,
embeddings, rotary embeddings, norms, heads and vision towers stay single
``call_module`` nodes with their original qualified names.

Terms
-----
trace path
    The root module and every ancestor of the text decoder-layer ``ModuleList``
    (``""``, ``"model"``, ``"model.language_model"``). Their forwards are traced
    through; every other module is a leaf.
meta value
    ``node.meta["val"]``: a FakeTensor (or a Python structure of them, or a plain
    Python value) that the node produces for the example inputs. The tracer computes
    it for every node as it is created, so Python control flow on shapes
    (``x.shape[1] == 1``, ``*x.shape``, ``len(x)``) can be answered.
guard
    Such an answer, recorded in the graph as a ``check_guard`` node (see ``fxpp.ops``).
    The graph stays shape-generic everywhere else.
opaque function
    A function called as one ``call_function`` node without tracing into it: the mask
    builders of ``transformers.masking_utils`` (they branch on data and on the
    attention implementation, and only use ``inputs_embeds`` for its shape).

How transformers 5 forwards are handled
    * decorators: output-plumbing wrappers (``can_return_tuple``, ``capture_outputs``,
      ``auto_docstring``) are unwrapped; every other wrapper is kept, rebuilt around the
      unwrapped function: ``merge_with_config_defaults`` (it fills config defaults and
      sees ``use_cache=False`` and ``return_dict=True``) and ``deprecate_kwarg`` (it
      renames an old argument such as ``image_patches`` to ``pixel_values``; without it
      the old name would reach an unused parameter and the input would be ignored);
    * ``**kwargs`` and ``ModelOutput`` construction are plain Python over proxies;
    * config objects become graph constants (``get_attr`` of ``_fxpp_const_N``),
      never rebuilt from nodes;
    * in-place writes ``h[mask] = v`` become ``fxpp.ops.setitem`` nodes, and in-place
      methods (``mask.masked_fill_(c, 0)``) stay ``call_method`` nodes; the written proxy
      stands for the write afterwards, so every later read depends on it;
    * attributes a forward sets on a module (Qwen-VL's ``self.rope_deltas``) are undone
      after the trace: the graph records no side channel between calls.

Note [data-dependent values]
    Vision-language forwards compute Python values from tensor *data*: split sizes
    (``grid.prod(-1).tolist()``), boolean-mask gathers, vision towers that loop over
    image sizes, and helpers that type-check or loop (``unpad_image``,
    ``get_rope_index``). FakeTensors cannot answer these. fxpp keeps them as graph
    nodes (so every call recomputes them from its own inputs) and takes their meta
    value from running the graph so far on the real example inputs
    (``HFTracer.real_value``). A plain function of a modeling file, or a public helper
    method of a traced module, that fails to trace is removed again and called as one
    opaque node; a helper method must not use parameters (the stage would not own
    them). Python *control flow* on data is still refused. On the meta device there
    are no real values, and these models get a TraceError that says so.

Note [mask closures]
    ``blockwise_overlay(ids)`` returns a closure over ``ids``. Traced through, the
    closure would capture a Proxy and become a graph constant; as a node of its own it
    is rebuilt from the stage's real tensors on every call.
    * mutable containers that layers write into (``KVSharingDict``) become explicit
      ``make_state`` / ``state_entry`` nodes, so cross-layer dataflow is visible.
"""

from __future__ import annotations

import collections.abc
import contextlib
import copy
import functools
import inspect
import operator
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx
from torch.fx import Graph, GraphModule, Node, Proxy, Tracer
from torch.fx.node import map_aggregate, map_arg
from torch.fx.proxy import Attribute
from torch._subclasses.fake_tensor import FakeTensorMode

from . import ops
from .errors import TraceError, UnsupportedModelError

# Attributes of a traced tensor that are answered from its meta value instead of
# becoming graph nodes: they cannot change without the graph being retraced anyway
# (rank) or they are needed as Python values by the forward (ndim in ``if``).
_CONCRETE_TENSOR_ATTRS = frozenset({"ndim", "is_floating_point", "requires_grad", "is_meta", "is_cuda"})

# Wrappers that only reshape a forward's output or record intermediates; tracing
# through them adds nothing and some of them install hooks.
_PLUMBING_WRAPPERS = ("can_return_tuple", "capture_outputs", "auto_docstring", "check_model_inputs")

# Keyword arguments that opaque mask builders only read for shape, dtype and device.
MASK_SHAPE_ONLY_KWARGS = ("inputs_embeds", "input_embeds")


def opaque_functions() -> dict[int, Callable]:
    """Functions traced as single ``call_function`` nodes, by ``id``."""
    from transformers import masking_utils

    found = {}
    for name, fn in vars(masking_utils).items():
        if callable(fn) and inspect.isfunction(fn) and name.startswith("create_") and name.endswith("mask"):
            found[id(fn)] = fn
        elif callable(fn) and name in ("find_packed_sequence_indices", "create_masks_for_generate"):
            found[id(fn)] = fn
        elif inspect.isfunction(fn) and is_mask_function_factory(name):
            found[id(fn)] = fn
    return found


def is_mask_function_factory(name: str) -> bool:
    """``blockwise_overlay(ids)``, ``and_masks(f, g)``, ...: builders of mask *functions*.

    Called on a traced tensor they must become graph nodes too: the closure they return
    captures its arguments, and a closure holding a Proxy cannot be a graph constant.
    See Note [mask closures].
    """
    return name.endswith("_overlay") or name.endswith("_mask_function") or name in ("and_masks", "or_masks")


def check_functions() -> dict[int, Callable]:
    """Runtime assertions on tensor data (``torch_compilable_check``), by ``id``.

    Traced as single ``call_function`` nodes with the meta value ``None``: the
    condition depends on data (``n_image_tokens == n_image_features``) so it cannot be
    answered while tracing, but every stage that computes its inputs re-checks it.
    """
    from transformers.utils import import_utils

    fn = getattr(import_utils, "torch_compilable_check", None)
    return {id(fn): fn} if fn is not None else {}


def is_check_function(target: Any) -> bool:
    return id(target) in check_functions()


def is_mask_builder(target: Any) -> bool:
    return getattr(target, "__module__", "") == "transformers.masking_utils"


def unwrap_forward(fn: Callable) -> Callable:
    """Peel output-plumbing decorators off a transformers forward, keep the rest.

    A decorator that is not plumbing changes what the forward computes (config
    defaults, ``deprecate_kwarg``'s renaming of old argument names), so dropping it
    would silently change the model. Each one kept is rebuilt around the peeled function
    beneath it (:func:`_rewrap`). A wrapper that cannot be rebuilt keeps the whole
    forward as written: plumbing traced through is slower, never wrong.
    """
    layers = []
    cur = fn
    while True:
        layers.append(cur)
        nxt = getattr(cur, "__wrapped__", None)
        if nxt is None:
            break
        cur = nxt
    result = layers[-1]
    for wrapper in reversed(layers[:-1]):
        if _is_plumbing_wrapper(wrapper):
            continue
        if result is wrapper.__wrapped__:
            result = wrapper  # nothing beneath it was peeled
            continue
        rebuilt = _rewrap(wrapper, result)
        if rebuilt is None:
            return fn
        result = rebuilt
    return result


@functools.lru_cache(maxsize=1)
def _plumbing_codes() -> frozenset:
    """Code objects of the functions the plumbing decorators wrap a forward in.

    Compared by identity: ``functools.wraps`` gives a wrapper the forward's own
    ``__name__`` and ``__qualname__``, so names cannot tell the wrappers apart.
    """
    import importlib

    codes: set = set()

    def walk(code: Any) -> None:
        for const in code.co_consts:
            if inspect.iscode(const):
                codes.add(const)
                walk(const)

    for module_name in ("transformers.utils.generic", "transformers.utils.output_capturing",
                        "transformers.utils.auto_docstring"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in _PLUMBING_WRAPPERS:
            decorator = getattr(module, name, None)
            if inspect.isfunction(decorator):
                walk(decorator.__code__)
    return frozenset(codes)


def _is_plumbing_wrapper(wrapper: Callable) -> bool:
    return getattr(wrapper, "__code__", None) in _plumbing_codes()


def _rewrap(wrapper: Callable, inner: Callable) -> Callable | None:
    """``wrapper`` calling ``inner`` instead of the function it was built around.

    A decorator's wrapper reaches the function it wraps through a closure cell; the
    copy gets a fresh cell holding ``inner`` and shares every other cell (the
    decorator's arguments). None when no cell holds the wrapped function.
    """
    import types

    wrapped = wrapper.__wrapped__
    cells = getattr(wrapper, "__closure__", None) or ()

    def holds_wrapped(cell) -> bool:
        try:
            return cell.cell_contents is wrapped
        except ValueError:  # an empty cell
            return False

    if not inspect.isfunction(wrapper) or not any(holds_wrapped(c) for c in cells):
        return None
    closure = tuple(types.CellType(inner) if holds_wrapped(c) else c for c in cells)
    rebuilt = types.FunctionType(wrapper.__code__, wrapper.__globals__, wrapper.__name__, wrapper.__defaults__, closure)
    rebuilt.__kwdefaults__ = wrapper.__kwdefaults__
    rebuilt.__dict__.update(wrapper.__dict__)
    rebuilt.__qualname__ = wrapper.__qualname__
    rebuilt.__doc__ = wrapper.__doc__
    rebuilt.__wrapped__ = inner
    return rebuilt


def is_inplace_method(name: Any) -> bool:
    """``masked_fill_``, ``add_``, ``copy_``: a tensor method that writes its own tensor."""
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name)


def find_decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The qualified name and the ``ModuleList`` of the text decoder layers."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no .config; fxpp needs a transformers model")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder model; fxpp splits decoder-only models "
            "(causal LMs, their base models and vision-language models)"
        )
    text_config = config.get_text_config()
    num_layers = getattr(text_config, "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and num_layers is not None and len(module) == num_layers:
            if any(part in name for part in ("vision", "visual", "audio")):
                continue
            candidates.append((name.count("."), name, module))
    if not candidates:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no ModuleList of num_hidden_layers={num_layers} decoder layers; "
            "fxpp needs a decoder-only model whose layers live in one nn.ModuleList"
        )
    # Other stacks of the same length (BLIP-2's Q-Former layers) are not the text decoder:
    # prefer the stack that shares the longest path with the token embeddings, then the
    # shallowest.
    text_path = _token_embedding_path(model)
    candidates.sort(key=lambda c: (-_shared_parts(c[1], text_path), c[0], c[1]))
    _, name, module = candidates[0]
    return name, module


def _token_embedding_path(model: torch.nn.Module) -> list[str]:
    """The qualified name of the module holding the input token embeddings, as parts."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return []
    for name, module in model.named_modules():
        if module is embeddings:
            return name.split(".")[:-1]
    return []


def _shared_parts(name: str, path: list[str]) -> int:
    shared = 0
    for a, b in zip(name.split("."), path):
        if a != b:
            break
        shared += 1
    return shared


def trace_path(layers_fqn: str) -> frozenset[str]:
    parts = layers_fqn.split(".")
    return frozenset([""] + [".".join(parts[:i]) for i in range(1, len(parts))])


@dataclass
class _StateRecord:
    """A mutable container seen during the trace and the node of each entry's writer."""

    entries: dict = field(default_factory=dict)


class MetaProxy(Proxy):
    """A Proxy whose node carries a meta value, so Python can ask it questions."""

    def __getattr__(self, name: str) -> Any:
        val = self.node.meta.get("val")
        if name in _CONCRETE_TENSOR_ATTRS and isinstance(val, torch.Tensor):
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
        self.meta_fallbacks: list[str] = []
        self._leaf_cache: dict = {}
        self._param_sigs: dict[int, tuple] = {}
        self._states: dict[int, _StateRecord] = {}
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
        elif kind != "output":
            node.meta["val"] = self._meta_eval(node)
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
        if node.op == "call_function" and id(node.target) in self._opaque_helpers:
            return self._fakeify_value(self.real_value(node, why=f"opaque helper {node.target.__name__}"))
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
                return self._fakeify_value(self.real_value(node, why=e))
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
        if any(n.target is ops.make_state for n in node.all_input_nodes):
            return module(*args, **kwargs)
        key = (type(module), self._param_signature(module), _signature((args, kwargs)))
        if key not in self._leaf_cache:
            self._leaf_cache[key] = module(*args, **kwargs)
        return self._leaf_cache[key]

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
        try:
            return fn(*args, **kwargs)
        except UntraceableCode:
            pass  # ``int(grid[0])``, ``torch.tensor`` of traced values: opaque, like any failure below
        except TraceError:
            raise  # a problem opaque evaluation has too (no real values on the meta device)
        except Exception:  # noqa: BLE001 - retried as one opaque node
            pass
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
        if node.op == "call_function" and (node.target is ops.check_guard or is_check_function(node.target)):
            return None
        args = _thaw_all(map_arg(node.args, self._real_vals.__getitem__))
        kwargs = {k: _thaw_all(v) for k, v in map_arg(node.kwargs, self._real_vals.__getitem__).items()}
        self._evaluating += 1
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
            kwargs = _nested_forward_kwargs(inner, args, kwargs)
            return super().call_module(m, lambda *a, **k: inner(m, *a, **k), args, kwargs)
        args, kwargs, states = self._lift_states(args, kwargs)
        before = {sid: dict(_items(obj)) for sid, (obj, _) in states.items()}
        out = super().call_module(m, forward, args, kwargs)
        for sid, (obj, state_proxy) in states.items():
            for key, value in _items(obj):
                if key not in before[sid] or before[sid][key] is not value:
                    entry = self.create_proxy(
                        "call_function", ops.state_entry, (state_proxy, key), {"after": out}
                    )
                    self._states[sid].entries[key] = entry
        return out

    def _eval_submodule(self, m, forward, args, kwargs):
        """Run a module nested inside a leaf, during the leaf's meta evaluation.

        Some nested modules cannot run on fake tensors: MoE expert dispatch is
        data-dependent (``nonzero``, loops over the experts hit) or uses kernels whose
        meta functions are stricter than the CPU kernels (``grouped_mm`` in fp32). Such
        a module is assumed to map its first tensor input to an output of the same
        shape. That only feeds meta values, never the numbers a stage computes.
        """
        try:
            return forward(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if _is_data_dependent(e) and not self._in_moe_fallback_scope(m):
                raise  # the node is evaluated on the real example inputs instead
            first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if first is None:
                raise
            self.meta_fallbacks.append(type(m).__name__)
            return torch.empty_like(first)

    def _in_moe_fallback_scope(self, m: torch.nn.Module) -> bool:
        """Whether ``m`` is an expert block, whose data-dependent dispatch keeps the shape
        of its input (see ``_eval_submodule``); other modules get real evaluation."""
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
        if _is_kv_cache(a):
            # A cache object built inside the forward would become a graph constant and
            # keep every call's keys and values: wrong from the second call on.
            raise TraceError(
                f"{type(self.model).__name__}: its forward passes a {type(a).__name__} it created itself to a module "
                f"at {_short_stack()} even with use_cache=False; a key/value cache cannot live inside a pipeline "
                "stage graph"
            )
        if isinstance(a, torch.Tensor) or _needs_constant(a):
            return self.create_node("get_attr", self._constant(a), (), {})
        return super().create_arg(a)

    def _constant(self, obj: Any) -> str:
        name = self._constant_ids.get(id(obj))
        if name is None:
            name = f"_fxpp_const_{len(self.constants)}"
            self.constants[name] = obj
            self._constant_ids[id(obj)] = name
        return name

    # -- Python control flow on proxies --------------------------------------------
    def _guard(self, proxy: Proxy, value: Any) -> None:
        where = _short_stack()
        self.create_proxy("call_function", ops.check_guard, (proxy, value, where), {})

    def to_bool(self, obj: Proxy) -> bool:
        val = self.meta_of(obj)
        try:
            result = bool(val)
        except Exception as e:  # noqa: BLE001
            raise UntraceableCode(
                f"{type(self.model).__name__}: Python control flow depends on tensor data at {_short_stack()} "
                f"(node {obj.node.name}); fxpp can only trace decisions on shapes"
            ) from e
        self._guard(obj, result)
        return result

    def concretize(self, obj: Proxy, kind: type) -> Any:
        val = self.meta_of(obj)
        try:
            result = kind(val)
        except Exception as e:  # noqa: BLE001
            raise UntraceableCode(
                f"{type(self.model).__name__}: a tensor value is used as a Python {kind.__name__} at "
                f"{_short_stack()} (node {obj.node.name}); fxpp can only trace decisions on shapes"
            ) from e
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


def _nested_forward_kwargs(inner: Callable, args: tuple, kwargs: dict) -> dict:
    """The keyword arguments for a traced forward nested in another (``model.language_model``).

    * ``return_dict`` is dropped where the peeled ``can_return_tuple`` would have
      consumed it. A VLM's outer forward calls ``self.model(..., return_dict=True,
      **kwargs)``; the inner forward has no such parameter, so without its wrapper the
      keyword would travel on in ``**kwargs`` and collide with the next explicit
      ``return_dict=True``.
    * ``use_cache`` is False where the forward takes it and its caller left it out or
      None (LLaVA calls its language model without it). The trace is of a forward
      without a KV cache: ``merge_with_config_defaults`` would otherwise fill in the
      config's ``use_cache=True`` and the forward would build a cache object.
    """
    params = inspect.signature(inner).parameters
    if "return_dict" in kwargs and "return_dict" not in params:
        kwargs = {k: v for k, v in kwargs.items() if k != "return_dict"}
    if "use_cache" in params and kwargs.get("use_cache") is None:
        positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if "use_cache" not in positional[1:len(args) + 1]:  # not passed positionally (after self)
            kwargs = {**kwargs, "use_cache": False}
    return kwargs


def _is_data_dependent(e: BaseException) -> bool:
    """A fake-tensor failure that only the tensor's values could answer."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    if isinstance(e, (DataDependentOutputException, DynamicOutputShapeException)):
        return True
    name = type(e).__name__
    return name in ("GuardOnDataDependentSymNode", "DataDependentOutputException") or "data-dependent" in str(e).lower()


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


def _is_kv_cache(a: Any) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(a, Cache)


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


@contextlib.contextmanager
def _helper_methods_patched(tracer: "HFTracer", classes: list[type]):
    """Route helper methods of traced modules (``get_rope_index``) through ``call_helper``."""
    saved = []

    def wrap(name, fn):
        def wrapper(self, *args, **kwargs):
            if tracer._evaluating or not _has_proxy((args, kwargs)):
                return fn(self, *args, **kwargs)
            return tracer.call_helper(fn, (self, *args), kwargs, method=name)

        wrapper.__wrapped_opaque__ = fn
        return wrapper

    try:
        for cls in classes:
            for klass in cls.__mro__:
                if not klass.__module__.startswith("transformers.models."):
                    continue
                for name, fn in list(vars(klass).items()):
                    if inspect.isfunction(fn) and not name.startswith("_") and name != "forward" and not name.startswith("get_input"):
                        saved.append((klass, name, fn))
                        setattr(klass, name, wrap(name, fn))
        yield
    finally:
        for klass, name, fn in reversed(saved):
            setattr(klass, name, fn)


# Constructors whose size arguments come as varargs: Python's argument parser rejects a
# Proxy there (``torch.zeros(batch, 4)`` with ``batch`` traced) before torch's
# ``__torch_function__`` could record the call, so they are recorded by hand.
_VARARG_CONSTRUCTORS = ("zeros", "ones", "empty", "full", "rand", "randn", "randint", "eye")


@contextlib.contextmanager
def _constructors_patched(tracer: "HFTracer"):
    saved = []

    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not tracer._evaluating and _has_proxy((args, kwargs)):
                return tracer.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)

        return wrapper

    try:
        for name in _VARARG_CONSTRUCTORS:
            fn = getattr(torch, name)
            saved.append((name, fn))
            setattr(torch, name, wrap(fn))
        yield
    finally:
        for name, fn in saved:
            setattr(torch, name, fn)


@contextlib.contextmanager
def _opaque_functions_patched(tracer: HFTracer, module_names: set[str]):
    """Make mask builders single graph nodes in the modules whose forwards we trace."""
    functions = {**opaque_functions(), **check_functions()}
    saved = []

    def wrap(fn):
        def wrapper(*args, **kwargs):
            has_proxy = False

            def find(x):
                nonlocal has_proxy
                if isinstance(x, Proxy):
                    has_proxy = True
                return x

            map_aggregate(args, find)
            map_aggregate(kwargs, find)
            if has_proxy and not tracer._evaluating:
                out = tracer.create_proxy("call_function", fn, args, kwargs)
                if isinstance(tracer.meta_of(out), dict):
                    # A mapping of masks per layer type: the forward tests isinstance(..., dict).
                    return {k: out[k] for k in tracer.meta_of(out)}
                return out
            return fn(*args, **kwargs)

        wrapper.__wrapped_opaque__ = fn
        return wrapper

    def wrap_helper(fn):
        def wrapper(*args, **kwargs):
            if tracer._evaluating or not _has_proxy((args, kwargs)):
                return fn(*args, **kwargs)
            return tracer.call_helper(fn, args, kwargs)

        wrapper.__wrapped_opaque__ = fn
        return wrapper

    try:
        for mod_name in sorted(module_names):
            module = sys.modules.get(mod_name)
            if module is None:
                continue
            for name, value in list(vars(module).items()):
                if id(value) in functions:
                    saved.append((module, name, value))
                    setattr(module, name, wrap(value))
                elif _is_model_helper(value, mod_name):
                    saved.append((module, name, value))
                    setattr(module, name, wrap_helper(value))
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def _has_proxy(value: Any) -> bool:
    found = []
    map_aggregate(value, lambda x: found.append(x) if isinstance(x, Proxy) else x)
    return bool(found)


def _is_model_helper(value: Any, mod_name: str) -> bool:
    """A plain function defined in a modeling file (``unpad_image``, ``get_rope_index``'s kin)."""
    return (
        inspect.isfunction(value)
        and value.__module__ == mod_name
        and mod_name.startswith("transformers.models.")
        and not value.__name__.startswith("create_")
    )


def _fakeify(fake_mode: FakeTensorMode, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fake_mode.from_tensor(value)
    return value


def select_output(out: Any) -> Any:
    """The tensor a stage returns: logits if the model has a head, else hidden states."""
    if isinstance(out, collections.abc.Mapping):
        for key in ("logits", "last_hidden_state"):
            if key in out.keys() and out[key] is not None:
                return out[key]
        for value in out.values():
            if value is not None:
                return value
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


# Keyword arguments every trace passes: a training forward with no KV cache that
# returns a ModelOutput.
TRACE_KWARGS = {"use_cache": False, "return_dict": True}


def trace_model(model: torch.nn.Module, example_inputs: dict[str, Any]) -> GraphModule:
    """Trace ``model`` for inputs shaped like ``example_inputs`` (keyword arguments).

    Inputs that are ``None`` or absent are not graph inputs (the forward sees
    ``None``). The returned GraphModule has a placeholder per given input, returns
    the logits (or last hidden state), and holds, by reference, the model's own
    modules and parameters under their original names.

    Raises:
        UnsupportedModelError: encoder-decoder models or models without a decoder-layer list.
        TraceError: the forward does something the tracer cannot record.
    """
    layers_fqn, _ = find_decoder_layers(model)
    signature = inspect.signature(unwrap_forward(type(model).forward))
    accepts_var_kwargs = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    inputs = {k: v for k, v in example_inputs.items() if v is not None}
    for name in inputs:
        if name not in signature.parameters and not accepts_var_kwargs:
            raise TraceError(f"{type(model).__name__}.forward has no argument {name!r}")
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    tracer = HFTracer(model, layers_fqn, fake_mode)
    tracer._placeholder_vals = {k: _fakeify(fake_mode, v) for k, v in inputs.items()}
    if not any(isinstance(v, torch.Tensor) and v.is_meta for v in list(inputs.values()) + list(model.parameters())[:1]):
        tracer.real_inputs = dict(inputs)
    names = list(inputs)
    forward = unwrap_forward(type(model).forward)

    def root_fn(*proxies):
        kwargs = dict(TRACE_KWARGS)
        # Only where the forward names them: through **kwargs they could reach a nested
        # forward that also passes them explicitly.
        kwargs = {k: v for k, v in kwargs.items() if k in signature.parameters}
        kwargs.update(zip(names, proxies))
        return select_output(forward(model, **kwargs))

    def create_args_for_root(root_fn_unused, is_module, concrete_args=None):
        proxies = [tracer.create_proxy("placeholder", n, (), {}) for n in names]
        return root_fn, proxies

    tracer.create_args_for_root = create_args_for_root  # type: ignore[method-assign]
    module_names = {c.__module__ for m in _traced_module_objects(model, tracer.traced_modules) for c in type(m).__mro__}
    training = {id(m): m.training for m in model.modules()}
    attributes = _plain_attributes(model)
    import logging

    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    old_level = fake_log.level
    # Failing meta kernels inside MoE experts are expected (see HFTracer._eval_submodule).
    fake_log.setLevel(logging.CRITICAL)
    try:
        classes = sorted({type(m) for m in _traced_module_objects(model, tracer.traced_modules)}, key=lambda c: c.__qualname__)
        with _opaque_functions_patched(tracer, module_names), _constructors_patched(tracer), _helper_methods_patched(tracer, classes):
            graph = tracer.trace(model)
    except TraceError:
        raise
    except Exception as e:  # noqa: BLE001
        raise TraceError(
            f"cannot trace {type(model).__name__} at {user_source_line(e)}: {type(e).__name__}: {e}"
        ) from e
    finally:
        fake_log.setLevel(old_level)
        for m in model.modules():
            m.training = training.get(id(m), m.training)
        _restore_plain_attributes(model, attributes)
    return _graph_module(model, graph, tracer.constants)


# Module state that ``fxpp.transform.model_unchanged`` restores itself.
_MODULE_STATE = frozenset({"_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
                           "_backward_hooks", "training", "forward"})


def _plain_attributes(model: torch.nn.Module) -> dict[int, tuple[torch.nn.Module, dict]]:
    """Each module's own attributes (not parameters, buffers, submodules or hooks).

    Restoring them also undoes flags that go with hooks the trace installed and
    ``model_unchanged`` removes (``_output_capturing_hooks_installed``).
    """
    return {id(m): (m, {k: v for k, v in vars(m).items() if k not in _MODULE_STATE}) for m in model.modules()}


def _restore_plain_attributes(model: torch.nn.Module, saved: dict) -> None:
    """Undo attribute writes the traced forward made (Qwen-VL's ``self.rope_deltas = ...``).

    Such a write is a side channel between calls; the graph does not record it, and
    the traced value (a Proxy) must not stay on the model.
    """
    for m, attrs in saved.values():
        for k in [k for k in vars(m) if k not in attrs and k not in _MODULE_STATE]:
            del m.__dict__[k]
        for k, v in attrs.items():
            if m.__dict__.get(k) is not v:
                m.__dict__[k] = v


def _traced_module_objects(model: torch.nn.Module, names: frozenset[str]) -> list[torch.nn.Module]:
    return [m for n, m in model.named_modules() if n in names]


def _graph_module(model: torch.nn.Module, graph: Graph, constants: dict[str, Any]) -> GraphModule:
    """A GraphModule over ``graph`` that references the model's modules, not copies."""
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in root:
            if node.target in constants:
                root[node.target] = constants[node.target]
            else:
                obj = model
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                root[node.target] = obj
    gm = GraphModule(root, graph, class_name=f"{type(model).__name__}Graph")
    return gm

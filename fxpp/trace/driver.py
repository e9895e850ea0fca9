"""``trace_model``: trace a model for example inputs, restore everything the forward touched.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.fx
from torch.fx._symbolic_trace import _constant_attribute_types
from torch.fx import Graph, GraphModule
from torch.fx._lazy_graph_module import _LazyGraphModule

from ..errors import TraceError
from ..model_facts import (TRACE_KWARGS, ModelState, forward_signature, model_unchanged, select_output,
                           unwrap_forward)
from .layers import find_decoder_layers
from .patching import constructors_patched, helper_methods_patched, opaque_functions_patched
from .source_lines import user_source_line
from .meta_eval import LeafValues
from .tracer import HFTracer
from .values import FakeMode, fakeify


def trace_model(model: torch.nn.Module, example_inputs: dict[str, Any],
                leaf_values: LeafValues | None = None, *, layers_fqn: str | None = None) -> GraphModule:
    """Trace ``model`` for inputs shaped like ``example_inputs`` (keyword arguments).

    Inputs that are ``None`` or absent are not graph inputs (the forward sees
    ``None``). The returned GraphModule has a placeholder per given input, returns
    the logits (or last hidden state), and holds, by reference, the model's own
    modules and parameters under their original names.

    Raises:
        UnsupportedModelError: encoder-decoder models or models without a decoder-layer list.
        TraceError: the forward does something the tracer cannot record.
    """
    if layers_fqn is None:  # the caller's, where it found them already (a walk of every submodule)
        layers_fqn, _ = module_tree(model, leaf_values).decoder_layers
    signature = forward_signature(model)
    accepts_var_kwargs = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    inputs = {k: v for k, v in example_inputs.items() if v is not None}
    for name in inputs:
        if name not in signature.parameters and not accepts_var_kwargs:
            raise TraceError(f"{type(model).__name__}.forward has no argument {name!r}")
    fake_mode = leaf_values.fake_mode if leaf_values is not None else FakeMode(allow_non_fake_inputs=True)
    tree = module_tree(model, leaf_values)
    tracer = HFTracer(model, layers_fqn, fake_mode, leaf_values, tree.layer_stack)
    tracer.placeholder_vals = {k: fakeify(fake_mode, v) for k, v in inputs.items()}
    first_param = next(model.parameters(), None)  # not list(...)[:1]: that walks every parameter
    if not any(isinstance(v, torch.Tensor) and v.is_meta for v in [*inputs.values(), first_param]):
        tracer.real.inputs = dict(inputs)
    names = list(inputs)
    forward = unwrap_forward(type(model).forward)

    def root_fn(*proxies):
        kwargs = dict(TRACE_KWARGS)
        # Only where the forward names them: through **kwargs they could reach a nested
        # forward that also passes them explicitly.
        kwargs = {k: v for k, v in kwargs.items() if k in signature.parameters}
        kwargs.update(zip(names, proxies))
        call = tracer.recording_forward(model, type(model).forward, lambda **k: forward(model, **k), kwargs)
        return select_output(call(**kwargs))

    def create_args_for_root(root_fn_unused, is_module, concrete_args=None):
        tree.install(tracer)
        proxies = [tracer.create_proxy("placeholder", n, (), {}) for n in names]
        return root_fn, proxies

    tracer.create_args_for_root = create_args_for_root  # type: ignore[method-assign]
    traced_objects = [m for m, name in tree.paths.items() if name in tracer.traced_modules]
    module_names = {c.__module__ for m in traced_objects for c in type(m).__mro__}
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    old_level = fake_log.level
    # Failing meta kernels inside MoE experts are expected (see fxpp.trace.standins).
    fake_log.setLevel(logging.CRITICAL)
    try:
        classes = sorted({type(m) for m in traced_objects}, key=lambda c: c.__qualname__)
        # model_unchanged undoes what the traced forward did to the model before the
        # GraphModule takes its references: a traced value assigned to a buffer (CTRL:
        # self.pos_encoding = self.pos_encoding.to(...)) or an attribute (Qwen-VL's
        # self.rope_deltas = ...), training flags, hooks and their marks.
        with model_unchanged(model, tree.state), opaque_functions_patched(tracer, module_names), constructors_patched(tracer), \
                helper_methods_patched(tracer, classes):
            graph = tracer.trace(type(model).forward)  # the model's forward as a function: see ModuleTree
            tracer.finish_own_caches()
    except TraceError:
        raise
    except Exception as e:  # noqa: BLE001
        raise TraceError(
            f"cannot trace {type(model).__name__} at {user_source_line(e)}: {type(e).__name__}: {e}"
        ) from e
    finally:
        fake_log.setLevel(old_level)
    return _graph_module(model, graph, tracer.constants.objects)


class ModuleTree:
    """What ``torch.fx.Tracer.trace`` learns of a root module before it traces: the path of
    each submodule, and the tensors (and script objects) held as plain attributes.

    ``Tracer.trace(model)`` walks every submodule for them on each trace, some 3 ms for
    an 8B model. The traces of one build start from the same modules (``model_unchanged``
    restores each module's submodules, state and attributes after each trace, by
    identity), so the build walks once: :func:`trace_model` traces the model's forward
    as a function (``Tracer.trace`` then makes an empty root and walks nothing) and
    :meth:`install` puts back what the module's own trace sets, copied (the trace adds
    constants to ``tensor_attrs``): the same root, name, paths and attributes, so the
    same graph. Kept in the build's :class:`LeafValues` (``module_tree``), with what
    else each trace would find again on the same modules: the decoder layers, the
    modules of their stack (``fxpp.trace.standins``) and the state ``model_unchanged``
    restores after each trace (``fxpp.model_facts.ModelState``, taken at the first).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        # as Tracer.trace makes them for a module root
        self.paths = {mod: name for name, mod in model.named_modules()}
        self.tensor_attrs: dict[Any, str] = {}

        def collect_tensor_attrs(m: torch.nn.Module, prefix_atoms: list[str]) -> None:
            for k, v in m.__dict__.items():
                if isinstance(v, _constant_attribute_types):
                    self.tensor_attrs[v] = ".".join(prefix_atoms + [k])
            for k, v in m.named_children():
                collect_tensor_attrs(v, prefix_atoms + [k])

        collect_tensor_attrs(model, [])
        self._stacks: dict[str, tuple[set[int], set[int]]] = {}

    @functools.cached_property
    def state(self) -> ModelState:
        """What ``model_unchanged`` restores after each trace, taken at the first."""
        return ModelState(self.model)

    @functools.cached_property
    def decoder_layers(self) -> tuple[str, torch.nn.ModuleList]:
        """``find_decoder_layers(model)``, found once."""
        return find_decoder_layers(self.model)

    def layer_stack(self, layers_fqn: str) -> tuple[set[int], set[int]]:
        """The ids of the modules of the decoder-layer stack ``layers_fqn``, and of the layers."""
        if layers_fqn not in self._stacks:
            stack = self.model.get_submodule(layers_fqn)
            self._stacks[layers_fqn] = ({id(m) for m in stack.modules()}, {id(m) for m in stack.children()})
        return self._stacks[layers_fqn]

    def install(self, tracer: HFTracer) -> None:
        """Set what ``Tracer.trace`` sets for a module root (called as it makes the root's arguments)."""
        tracer.root = self.model
        tracer.root_module_name = self.model._get_name()
        tracer.submodule_paths = dict(self.paths)
        tracer.tensor_attrs = dict(self.tensor_attrs)


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
    # Note [code made on first use]: a whole-model graph is rewritten by the passes and
    # sliced into stages (new graphs) far more often than it is run or printed, and making
    # its Python code (``recompile``) costs about a millisecond per hundred nodes. As a
    # ``_LazyGraphModule`` its code is made when first needed (``gm.code``, a call,
    # printing, pickling) and ``recompile()`` only marks it out of date: the same code.
    return _LazyGraphModule(root, graph, class_name=f"{type(model).__name__}Graph")


def module_tree(model: torch.nn.Module, leaf_values: LeafValues | None = None) -> ModuleTree:
    """The :class:`ModuleTree` of ``model`` kept in ``leaf_values`` (made there by the
    build's first trace), or a new one."""
    tree = leaf_values.module_tree if leaf_values is not None else None
    if tree is None or tree.model is not model:
        tree = ModuleTree(model)
        if leaf_values is not None:
            leaf_values.module_tree = tree
    return tree

"""What the tracer patches while it runs: model helper methods, tensor constructors, opaque functions.

Each patch is a context manager that restores the original on exit.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from typing import Any

import torch
import torch.fx
from torch.fx import Proxy
from torch.fx.node import map_aggregate

from .. import ops
from .targets import check_functions, is_mask_builder, opaque_functions
from .source_lines import short_stack
from .tracer import HFTracer
from .values import has_proxy


@contextlib.contextmanager
def helper_methods_patched(tracer: "HFTracer", classes: list[type]):
    """Route helper methods of traced modules (``get_rope_index``) through ``call_helper``."""
    saved = []

    def wrap(name, fn):
        def wrapper(self, *args, **kwargs):
            if tracer.evaluating or not has_proxy((args, kwargs)):
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
def constructors_patched(tracer: "HFTracer"):
    saved = []

    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not tracer.evaluating and has_proxy((args, kwargs)):
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


def _none_for_real(tracer: HFTracer, out: Proxy) -> bool:
    """Whether a mask builder returns ``None`` on the real example values.

    Fake tensors cannot tell that a padding mask is all ones, so a builder that returns
    ``None`` for such a mask (no explicit mask needed) returns a mask under fake
    evaluation; the forward would then be traced on a branch the run does not take
    (GLM-5 Next casts the mask, where the run builds one of its own). Without real
    example values (the meta device) the fake answer stands; a run whose builder returns
    ``None`` then fails the ``check_is_not_none`` guard and retraces with real values.
    """
    if not tracer.real.inputs:
        return False
    try:
        return tracer.real_value(out.node, why="a mask builder decides on data whether a mask is needed") is None
    except Exception:  # noqa: BLE001 - the real prefix cannot run: keep the fake answer
        return False


@contextlib.contextmanager
def opaque_functions_patched(tracer: HFTracer, module_names: set[str]):
    """Make mask builders single graph nodes in the modules whose forwards we trace."""
    functions = {**opaque_functions(), **check_functions()}
    saved = []

    def wrap(fn):
        def wrapper(*args, **kwargs):
            traced = False

            def find(x):
                nonlocal traced
                if isinstance(x, Proxy):
                    traced = True
                return x

            map_aggregate(args, find)
            map_aggregate(kwargs, find)
            if traced and not tracer.evaluating:
                out = tracer.create_proxy("call_function", fn, args, kwargs)
                if is_mask_builder(fn) and tracer.meta_of(out) is not None and _none_for_real(tracer, out):
                    out.node.meta["val"] = None
                if isinstance(tracer.meta_of(out), dict):
                    # A mapping of masks per layer type: the forward tests isinstance(..., dict).
                    return {k: out[k] for k in tracer.meta_of(out)}
                if tracer.meta_of(out) is None and is_mask_builder(fn):
                    # A builder that returns no mask for these inputs (no padding mask, an all-ones one):
                    # the forward may test ``mask is None`` and build its own (GLM-5 Next), so
                    # it gets None, as at run time; a guard re-checks that the builder still
                    # returns None on each call, and the stage retraces if it does not.
                    tracer.create_proxy("call_function", ops.check_is_none, (out, short_stack()), {})
                    return None
                return out
            return fn(*args, **kwargs)

        wrapper.__wrapped_opaque__ = fn
        return wrapper

    def wrap_helper(fn):
        def wrapper(*args, **kwargs):
            if tracer.evaluating or not has_proxy((args, kwargs)):
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


def _is_model_helper(value: Any, mod_name: str) -> bool:
    """A plain function defined in a modeling file (``unpad_image``, ``get_rope_index``'s kin)."""
    return (
        inspect.isfunction(value)
        and value.__module__ == mod_name
        and mod_name.startswith("transformers.models.")
        and not value.__name__.startswith("create_")
    )

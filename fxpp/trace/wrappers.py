"""transformers' forward decorators: which are output plumbing (peeled) and which change the computation (kept).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
from typing import Any, Callable


_PLUMBING_WRAPPERS = ("can_return_tuple", "capture_outputs", "auto_docstring", "check_model_inputs")


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


def captures_outputs(fn: Callable) -> bool:
    """Whether a forward is wrapped in transformers' ``capture_outputs`` (see ``fxpp.trace.recording``)."""
    codes = _plumbing_codes(("capture_outputs",))
    cur = fn
    while cur is not None:
        if getattr(cur, "__code__", None) in codes:
            return True
        cur = getattr(cur, "__wrapped__", None)
    return False


@functools.lru_cache(maxsize=None)
def _plumbing_codes(names: tuple[str, ...] = _PLUMBING_WRAPPERS) -> frozenset:
    """Code objects of the functions the plumbing decorators wrap a forward in.

    Compared by identity: ``functools.wraps`` gives a wrapper the forward's own
    ``__name__`` and ``__qualname__``, so names cannot tell the wrappers apart.
    """
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
        for name in names:
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


def nested_forward_kwargs(inner: Callable, args: tuple, kwargs: dict) -> dict:
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

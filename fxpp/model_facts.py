"""The user's model as every room sees it, without tracing it: its forward and what that
forward takes and returns, where the model lives, and leaving it as it was found.

This module sits below ``fxpp.inputs`` and ``fxpp.trace``: the input signature must be
the one the tracer traces (the forward with the same decorators peeled), and example
media and unused inputs are checked by running the model's own forward, called as the
tracer calls it (:data:`TRACE_KWARGS`, :func:`select_output`).

Terms
-----
plumbing decorator
    A transformers decorator on a forward that only shapes the output
    (``can_return_tuple``, ``capture_outputs``, ``auto_docstring``,
    ``check_model_inputs``): peeled before tracing. Every other decorator changes what
    the forward computes and is kept (:func:`unwrap_forward`).
forward parameters
    The parameter names of the model's forward, decorators peeled
    (:func:`forward_parameters`); :func:`parameter_names` for any other callable.
"""

from __future__ import annotations

import collections.abc
import contextlib
import functools
import importlib
import inspect
import operator
import types
from typing import Any, Callable

import torch


# -- the forward ------------------------------------------------------------------------

# Keyword arguments every trace passes: a training forward with no KV cache that
# returns a ModelOutput.
TRACE_KWARGS = {"use_cache": False, "return_dict": True}


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


def forward_signature(model: torch.nn.Module) -> inspect.Signature:
    """The signature of the model's forward as the tracer traces it (decorators peeled)."""
    return inspect.signature(unwrap_forward(type(model).forward))


def forward_parameters(model: torch.nn.Module) -> set[str]:
    """The names of the forward's parameters (:func:`forward_signature`)."""
    return set(forward_signature(model).parameters)


def parameter_names(fn: Callable | None) -> set[str]:
    """The parameter names of any callable (a bound method without ``self``); empty for
    None or a callable without a signature."""
    try:
        return set(inspect.signature(fn).parameters) if fn is not None else set()
    except (TypeError, ValueError):
        return set()


def is_encoder_decoder(model: torch.nn.Module) -> bool:
    """Whether fxpp cuts the model's decoder stack and runs its encoder whole in stage 0:
    an encoder-decoder config and a forward that takes the decoder's tokens."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    try:
        return "decoder_input_ids" in forward_parameters(model)
    except (TypeError, ValueError):
        return False


def select_output(out: Any) -> Any:
    """What a model graph returns: logits if the model has a head, else hidden states.

    Where the forward also computes losses (an auxiliary ``aux_loss`` of router logits,
    or ``loss`` when labels are inputs), a dict ``{"logits": ..., <loss terms>}`` in the
    output's order; ``fxpp.stage_module.StageModule`` decides what a call returns.
    """
    if isinstance(out, collections.abc.Mapping):
        terms = {k: v for k, v in out.items() if is_loss_term(k) and v is not None}
        if terms and out.get("logits") is not None:
            return {"logits": out["logits"], **terms}
        for key in ("logits", "last_hidden_state"):
            if key in out.keys() and out[key] is not None:
                return out[key]
        for value in out.values():
            if value is not None:
                return value
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def is_loss_term(key: str) -> bool:
    """An output field that is a loss (``loss``, ``aux_loss``, ``z_loss``, ...)."""
    return key == "loss" or key.endswith("_loss")


# -- the model's state --------------------------------------------------------------------

def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def model_unchanged(model: torch.nn.Module, state: "ModelState | None" = None):
    """Restore every module's parameters, buffers (and their contents), submodules,
    forward, hooks and plain attributes on exit: as they are now, or as ``state`` (a
    :class:`ModelState` of ``model`` taken earlier, the model unchanged since) holds them.

    Plain attributes too: transformers installs its output-capturing hooks on a first
    call and marks the module (``_output_capturing_hooks_installed``); keeping the mark
    while the hooks are restored away would leave the model believing it has them.

    Every trace runs inside it, so a module whose ``__dict__`` holds the same objects
    as before (the common case) is checked with C-level comparisons only: its state
    dicts' entries by identity and its buffers' contents.
    """
    if state is None or state.model is not model:
        state = ModelState(model)
    try:
        yield
    finally:
        state.restore()


class ModelState:
    """What :func:`model_unchanged` restores, taken once: each module's ``__dict__``, its
    non-empty state dicts and its buffers' contents. :meth:`restore` only reads it, so
    one state restores the model after each of several traces (a build's, run back to
    back: each leaves the model as it was, so each would take this same state)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        saved = []
        for module in model.modules():
            attributes = module.__dict__.copy()  # every attribute, the state dicts' objects among them
            # Only the non-empty state dicts are copied: an empty one (most hook dicts) is
            # restored by clearing it, so its copy would be an empty dict anyway.
            state = tuple(d.copy() if d else None for d in _state_dicts(attributes))
            # Contents too: a real evaluation while tracing may update a buffer in place
            # (BatchNorm's running statistics in train mode).
            buffers = attributes["_buffers"]
            buffer_values = {k: b.clone() for k, b in buffers.items()
                             if isinstance(b, torch.Tensor) and not b.is_meta} if buffers else None
            saved.append((module, attributes, state, buffer_values))
        self._saved = saved

    def restore(self) -> None:
        for module, attributes, state, buffer_values in self._saved:
            current = module.__dict__
            for key, entries in zip(_STATE_DICTS, state):
                now = current[key]
                if entries is None:
                    if now:
                        now.clear()
                elif not _same_entries(now, entries):
                    now.clear()
                    now.update(entries)
            if buffer_values:
                for key, value in buffer_values.items():
                    buffer = module._buffers.get(key)
                    if buffer is not None and buffer.shape == value.shape and not torch.equal(buffer, value):
                        with torch.no_grad():
                            buffer.copy_(value)
            if not _same_entries(current, attributes):
                _restore_attributes(module, attributes, attributes.get("training", True))


def _restore_attributes(module: torch.nn.Module, attributes: dict, training: bool) -> None:
    """``module``'s training flag, plain attributes and forward as in ``attributes`` (its
    ``__dict__`` before): attributes added since are removed, replaced ones put back."""
    module.training = training
    current = module.__dict__
    for key in [k for k in current if k not in _MODULE_STATE]:
        if key not in attributes:
            del current[key]
        elif current[key] is not attributes[key]:
            current[key] = attributes[key]
    if "forward" in attributes:
        current["forward"] = attributes["forward"]
    else:
        current.pop("forward", None)


# The dicts of module state that model_unchanged restores in place.
_STATE_DICTS = ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
# Module state that model_unchanged restores on its own terms (the dicts in place).
_MODULE_STATE = frozenset({*_STATE_DICTS, "training", "forward"})
_state_dicts = operator.itemgetter(*_STATE_DICTS)


def _same_entries(a: dict, b: dict) -> bool:
    # By identity: a forward may have stored a traced value (a Proxy) whose == is symbolic.
    return a.keys() == b.keys() and all(map(operator.is_, map(a.__getitem__, b), b.values()))

"""The user's model, left as it was: where it lives, and undoing what a forward did to it.

fxpp runs the user's model (tracing it, asking it for image features, checking that it
ignores an input) and must leave it exactly as it found it.
"""

from __future__ import annotations

import contextlib
import operator

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")



@contextlib.contextmanager
def model_unchanged(model: torch.nn.Module):
    """Restore every module's parameters, buffers (and their contents), submodules,
    forward, hooks and plain attributes on exit.

    Plain attributes too: transformers installs its output-capturing hooks on a first
    call and marks the module (``_output_capturing_hooks_installed``); keeping the mark
    while the hooks are restored away would leave the model believing it has them.

    Every trace runs inside it, so a module whose ``__dict__`` holds the same objects
    as before (the common case) is checked with C-level comparisons only: its state
    dicts' entries by identity and its buffers' contents.
    """
    saved = []
    for module in model.modules():
        attributes = dict(module.__dict__)  # every attribute, the state dicts' objects among them
        state = tuple(map(dict, _state_dicts(attributes)))
        # Contents too: a real evaluation while tracing may update a buffer in place
        # (BatchNorm's running statistics in train mode).
        buffer_values = {k: b.clone() for k, b in module._buffers.items()
                         if isinstance(b, torch.Tensor) and not b.is_meta} if module._buffers else {}
        saved.append((module, attributes, state, buffer_values, module.training))
    try:
        yield
    finally:
        for module, attributes, state, buffer_values, training in saved:
            current = module.__dict__
            for key, entries in zip(_STATE_DICTS, state):
                now = getattr(module, key)
                if not _same_entries(now, entries):
                    now.clear()
                    now.update(entries)
            for key, value in buffer_values.items():
                buffer = module._buffers.get(key)
                if buffer is not None and buffer.shape == value.shape and not torch.equal(buffer, value):
                    with torch.no_grad():
                        buffer.copy_(value)
            if not _same_entries(current, attributes):
                _restore_attributes(module, attributes, training)


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

"""The user's model, left as it was: where it lives, and undoing what a forward did to it.

fxpp runs the user's model (tracing it, asking it for image features, checking that it
ignores an input) and must leave it exactly as it found it.
"""

from __future__ import annotations

import contextlib

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
    """
    saved = []
    for module in model.modules():
        state = {
            "_parameters": dict(module._parameters),
            "_buffers": dict(module._buffers),
            "_modules": dict(module._modules),
            "training": module.training,
        }
        for key in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            state[key] = dict(getattr(module, key))
        state["attributes"] = {k: v for k, v in module.__dict__.items() if k not in _MODULE_STATE}
        # Contents too: a real evaluation while tracing may update a buffer in place
        # (BatchNorm's running statistics in train mode).
        state["buffer_values"] = {k: b.clone() for k, b in module._buffers.items()
                                  if isinstance(b, torch.Tensor) and not b.is_meta}
        saved.append((module, state, "forward" in module.__dict__, module.__dict__.get("forward")))
    try:
        yield
    finally:
        for module, state, had_forward, forward in saved:
            for key in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
                        "_backward_hooks"):
                current = getattr(module, key)
                if not _same_entries(current, state[key]):
                    current.clear()
                    current.update(state[key])
            module.training = state["training"]
            for key, value in state["buffer_values"].items():
                buffer = module._buffers.get(key)
                if buffer is not None and buffer.shape == value.shape and not torch.equal(buffer, value):
                    with torch.no_grad():
                        buffer.copy_(value)
            attributes = state["attributes"]
            for key in [k for k in module.__dict__ if k not in _MODULE_STATE]:
                if key not in attributes:
                    del module.__dict__[key]
                elif module.__dict__[key] is not attributes[key]:
                    module.__dict__[key] = attributes[key]
            if had_forward:
                module.__dict__["forward"] = forward
            else:
                module.__dict__.pop("forward", None)


# Module state that model_unchanged restores on its own terms (the dicts in place).
_MODULE_STATE = frozenset({"_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
                           "_backward_hooks", "training", "forward"})


def _same_entries(a: dict, b: dict) -> bool:
    # By identity: a forward may have stored a traced value (a Proxy) whose == is symbolic.
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)

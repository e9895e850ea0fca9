"""What the tracer recognises by identity: opaque mask builders, shape checks, in-place methods.

Pure predicates over call targets, shared by the tracer, the annotation and the rewrite passes.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.fx
from transformers import masking_utils
from transformers.utils import import_utils

# Tensor attributes a traced forward reads as Python values from the meta value instead of
# becoming graph nodes: they cannot change without the graph being retraced anyway
# (rank) or they are needed as Python values by the forward (ndim in ``if``).
CONCRETE_TENSOR_ATTRS = frozenset({"ndim", "is_floating_point", "requires_grad", "is_meta", "is_cuda"})

# Keyword arguments that opaque mask builders only read for shape, dtype and device.
MASK_SHAPE_ONLY_KWARGS = ("inputs_embeds", "input_embeds")


def opaque_functions() -> dict[int, Callable]:
    """Functions traced as single ``call_function`` nodes, by ``id``."""
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
    fn = getattr(import_utils, "torch_compilable_check", None)
    return {id(fn): fn} if fn is not None else {}


def is_check_function(target: Any) -> bool:
    return id(target) in check_functions()


def is_mask_builder(target: Any) -> bool:
    return getattr(target, "__module__", "") == "transformers.masking_utils"


def is_inplace_method(name: Any) -> bool:
    """``masked_fill_``, ``add_``, ``copy_``: a tensor method that writes its own tensor."""
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name)

"""Where the decoder layers are, and which modules the tracer traces through (the trace path).
"""

from __future__ import annotations

from __future__ import annotations


import torch
import torch.fx

from ..errors import UnsupportedModelError



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

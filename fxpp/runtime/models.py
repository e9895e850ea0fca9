"""Where the CLI gets models: built-in presets, local directories, config files.

Always offline: a directory is read for ``config.json`` and, if present, safetensors
weights; nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import FxppError
from ..testing.zoo import PRESETS, tiny_config


def load_config(source: str):
    """The transformers config of a preset name, a directory or a ``config.json`` file."""
    from transformers import AutoConfig

    if source in PRESETS:
        return tiny_config(source[len("tiny-"):])
    path = source
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FxppError(
            f"model {source!r} is neither a built-in preset ({', '.join(sorted(PRESETS))}) nor a directory or "
            "config.json file"
        )
    with open(path) as f:
        data = json.load(f)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise FxppError(f"{path} has no \"model_type\"; is it a transformers config.json?")
    return AutoConfig.for_model(model_type, **data)


def build_model(source: str, *, device: str | torch.device = "cpu", seed: int = 0) -> torch.nn.Module:
    """A causal LM for ``source``; on ``meta`` only the structure is built."""
    from transformers import AutoModelForCausalLM

    if source in PRESETS and str(device) != "meta":
        from ..testing.zoo import tiny_model

        return tiny_model(source[len("tiny-"):], seed=seed).train()
    config = load_config(source)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    if os.path.isdir(source) and str(device) != "meta":
        from .checkpoint import load_state_dict_from

        _load_whole(model, load_state_dict_from(source), source)
    return model.train()


def _load_whole(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``: every key, nothing else, right shapes (never a random weight).

    A tied ``lm_head.weight`` may be absent, as transformers saves it (the model ties it).
    """
    from ..errors import CheckpointError

    own = model.state_dict()
    tie = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    tied = {k for k in own if k.endswith("lm_head.weight")} if tie else set()
    missing = sorted(set(own) - set(state) - tied)
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} key(s) of the model, e.g. {missing[:3]}")
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected key(s) for {type(model).__name__}, "
                              f"e.g. {unexpected[:3]}")
    for key, value in state.items():
        if value.shape != own[key].shape or value.dtype != own[key].dtype:
            raise CheckpointError(f"{source}: {key} is {tuple(value.shape)} {value.dtype} in the checkpoint, "
                                  f"the model expects {tuple(own[key].shape)} {own[key].dtype}")
    model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()

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

        model.load_state_dict(load_state_dict_from(source), strict=False)
    return model.train()

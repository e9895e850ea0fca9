"""Where the CLI gets models: built-in presets, local directories, config files.

Always offline: a directory is read for ``config.json`` and, if present, safetensors
weights; nothing is fetched from a hub. Never trusting: the config is built from
transformers' own classes (``model_type``), so a checkpoint's ``auto_map`` code is never
imported, and nothing asks on stdin whether to run it (``trust_remote_code=False``).
"""

from __future__ import annotations

import json
import os

import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

from ..errors import ModelSourceError
from ..presets import PRESETS, tiny_config, tiny_model
from ..runtime.checkpoint import check_checkpoint, key_files, load_state_dict_from


def load_config(source: str):
    """The transformers config of a preset name, a directory or a ``config.json`` file.

    Raises:
        ModelSourceError: ``source`` is none of them, or its ``config.json`` has no ``model_type``.
    """
    if source in PRESETS:
        return tiny_config(source[len("tiny-"):])
    path = source
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ModelSourceError(
            f"model {source!r} is neither a built-in preset ({', '.join(sorted(PRESETS))}) nor a directory or "
            "config.json file"
        )
    with open(path) as f:
        data = json.load(f)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ModelSourceError(f"{path} has no \"model_type\"; is it a transformers config.json?")
    if model_type not in CONFIG_MAPPING:
        custom = " and names custom code (auto_map), which fxpp never runs" if "auto_map" in data else ""
        raise ModelSourceError(f"{path}: model_type {model_type!r} is not a model type of transformers{custom}; "
                               "fxpp loads models of transformers' own classes only (trust_remote_code=False)")
    return AutoConfig.for_model(model_type, **data)


def build_model(source: str, *, device: str | torch.device = "cpu", seed: int = 0,
                dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A causal LM for ``source`` with parameters in ``dtype``; on ``meta`` only the structure is built.

    ``dtype`` is the training's master dtype, not the checkpoint's: a bf16 checkpoint is
    loaded into fp32 parameters by default (floating tensors are cast on load). The
    config keeps the checkpoint's own ``dtype``, which ``fxpp export`` writes.
    """
    if source in PRESETS and str(device) != "meta":
        return tiny_model(source[len("tiny-"):], seed=seed).to(dtype).train()
    config = load_config(source)
    saved_dtype = getattr(config, "dtype", None)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    model.config.dtype = saved_dtype
    if os.path.isdir(source) and str(device) != "meta":
        _load_whole(model, load_state_dict_from(source), source)
    return model.train()


def _load_whole(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``: every key, nothing else, right shapes (never a random weight).

    Raises:
        CheckpointError: see :func:`fxpp.runtime.checkpoint.check_checkpoint`.
    """
    files = key_files(source)
    tied = check_checkpoint(model, {k: (tuple(v.shape), v.dtype, files.get(k, source)) for k, v in state.items()},
                            source)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= tied, result
    if tied:
        model.tie_weights()

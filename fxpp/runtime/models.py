"""Where the CLI gets models: built-in presets, local directories, config files.

Always offline: a directory is read for ``config.json`` and, if present, safetensors
weights; nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import FxppError
from ..presets import PRESETS, tiny_config, tiny_model


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

    Raises:
        CheckpointError: see :func:`check_checkpoint`.
    """
    from .checkpoint import key_files

    files = key_files(source)
    tied = check_checkpoint(model, {k: (tuple(v.shape), v.dtype, files.get(k, source)) for k, v in state.items()},
                            source)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= tied, result
    if tied:
        model.tie_weights()


def check_checkpoint(model: torch.nn.Module, stored: dict[str, tuple[tuple, torch.dtype, str]] | None,
                     source: str) -> set[str]:
    """Check that a checkpoint holds every key of ``model``, nothing else, in the right shapes.

    A tied ``lm_head.weight`` may be absent, as transformers saves it (the model ties it).
    Non-persistent buffers (rotary ``inv_freq``) are not in ``state_dict`` nor in checkpoints.
    Floating-point dtypes may differ (they are cast to the model's, as transformers does).
    Works on a meta model: ``stored`` defaults to the file headers (:func:`stored_shapes`).

    Returns:
        the tied keys the checkpoint may lack.

    Raises:
        CheckpointError: naming the first missing, unexpected or misshapen key and its file.
    """
    from ..errors import CheckpointError
    from .checkpoint import stored_shapes

    if stored is None:
        stored = stored_shapes(source)
    own = model.state_dict()
    tie = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    tied = {k for k in own if k.endswith("lm_head.weight")} if tie else set()
    missing = sorted(set(own) - set(stored) - tied)
    unexpected = sorted(set(stored) - set(own))
    where = sorted({file for _, _, file in stored.values()}) or [source]
    if missing:
        raise CheckpointError(f"{where[0] if len(where) == 1 else source}: missing {len(missing)} key(s) of "
                              f"{type(model).__name__}: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; "
                              f"the checkpoint does not match its config.json")
    if unexpected:
        raise CheckpointError(f"{stored[unexpected[0]][2]}: {len(unexpected)} unexpected key(s), "
                              f"not a parameter or buffer of {type(model).__name__}: unexpected key {unexpected[0]}"
                              f"{', ' + ', '.join(unexpected[1:3]) if len(unexpected) > 1 else ''}")
    for key, (shape, dtype, file) in stored.items():
        if tuple(shape) != tuple(own[key].shape):
            raise CheckpointError(f"{file}: {key} is {tuple(shape)} {dtype} in the "
                                  f"checkpoint, the model expects {tuple(own[key].shape)}")
        if dtype != own[key].dtype and not (dtype.is_floating_point and own[key].is_floating_point()):
            raise CheckpointError(f"{file}: {key} is {dtype} in the checkpoint, "
                                  f"the model expects {own[key].dtype}")
    return tied

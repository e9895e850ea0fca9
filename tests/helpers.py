"""Shared test helpers: cached models and inputs.

The reference runs and comparisons (``reference``, ``run_stages``, ``assert_same``)
have one home, ``fxpp.testing.check``, shared with the sweeps; they are imported
here for the tests that take them from this module.
"""

from __future__ import annotations

import functools

import torch

from fxpp.testing.check import assert_same, reference, run_stages  # noqa: F401 - one definition, shared with the sweeps
from fxpp.testing.zoo import VOCAB, tiny_model


def rank_parameters(stages) -> dict[str, torch.nn.Parameter]:
    """The parameters of a rank's ``PipelineStage``s by name, each name once (the first
    stage's where two of the rank's stages hold it: a tied weight under V placement)."""
    params: dict[str, torch.nn.Parameter] = {}
    for st in stages:
        for name, p in st.submod.named_parameters():
            params.setdefault(name, p)
    return params


@functools.lru_cache(maxsize=None)
def cached_model(family: str, num_layers: int, dtype: torch.dtype = torch.float32):
    """Models are immutable across tests (only .grad changes), so build each once."""
    return tiny_model(family, num_layers, dtype=dtype)


def make_inputs(batch: int, seq: int, *, padding: str = "none", position_ids: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding != "none" and seq > 1:
        for row in range(batch):
            pad = int(torch.randint(0, seq, (1,), generator=g))  # keeps at least one real token
            if pad:
                if padding == "left":
                    mask[row, :pad] = 0
                else:
                    mask[row, seq - pad:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if position_ids:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs["position_ids"] = pos
    return inputs

"""Shared test helpers: inputs, reference runs and comparisons."""

from __future__ import annotations

import functools

import torch

from fxpp.testing.check import grads_of, loss_of  # one definition, shared with the sweep
from fxpp.testing.zoo import VOCAB, tiny_model


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


def reference(model, inputs):
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    loss_of(logits).backward()
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def run_stages(stages, inputs, model):
    model.zero_grad(set_to_none=True)
    out = stages[0](**inputs)
    for stage in stages[1:]:
        out = stage(*out)
    loss_of(out).backward()
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def assert_same(ref, got, *, atol: float, rtol: float, what: str = ""):
    ref_logits, ref_grads = ref
    logits, grads = got
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=rtol, msg=lambda m: f"{what} logits: {m}")
    assert set(grads) == set(ref_grads), f"{what}: parameters with gradients differ: {set(grads) ^ set(ref_grads)}"
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=atol, rtol=rtol, msg=lambda m: f"{what} grad {name}: {m}")

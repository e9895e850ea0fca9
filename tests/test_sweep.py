"""The sweeps (``fxpp.sweep``, ``fxpp.sweep_vlm``): every family of transformers'
causal-LM and image-text-to-text auto mappings, tiny config, 2 stages, logits and
gradients against the unpatched model."""

from __future__ import annotations

import pytest

from fxpp.sweep import STATUSES, format_table, summary, sweep_causal_lm
from fxpp.sweep_vlm import format_table as format_vlm_table
from fxpp.sweep_vlm import summary as vlm_summary
from fxpp.sweep_vlm import sweep_vlm
from fxpp.zoo import FAMILIES, VLM_FAMILIES

# zoo preset name -> transformers model_type, where they differ
_ZOO_MODEL_TYPE = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}
ZOO_MODEL_TYPES = tuple(_ZOO_MODEL_TYPE.get(f, f) for f in FAMILIES)


def test_zoo_model_types():
    assert set(ZOO_MODEL_TYPES) == {
        "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "gemma4_text",
        "qwen3_moe", "mixtral", "olmo2", "olmoe", "qwen2_moe",
    }


def test_sweep_llama_and_qwen2():
    results = sweep_causal_lm(["llama", "qwen2"])
    assert [r.family for r in results] == ["llama", "qwen2"]
    assert all(r.status in STATUSES for r in results)
    failed = [r for r in results if r.status != "pass"]
    assert not failed, "\n" + format_table(failed)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sweep_every_causal_lm_family():
    """Every zoo family passes; no family fails un-cleanly (status "error": an exception
    from fxpp that is not an FxppError). Clean refusals and model errors are allowed."""
    results = sweep_causal_lm()
    by_family = {r.family: r for r in results}
    zoo_failed = [by_family[t] for t in ZOO_MODEL_TYPES if by_family[t].status != "pass"]
    errors = [r for r in results if r.status == "error"]
    report = summary(results)
    if zoo_failed:
        report += "\n\nzoo families that do not pass:\n" + format_table(zoo_failed)
    if errors:
        report += "\n\nfamilies with un-clean failures (status error):\n" + format_table(errors)
    assert not zoo_failed and not errors, report


# Generic VLM attempts (no zoo config) that each exercise one general mechanism:
# blip-2: the decoder layers are the stack beside the token embeddings, not the Q-Former's;
# hunyuan_vl: a helper that calls int() on tensor data inside another helper becomes opaque;
# qwen2_vl: multimodal rotary sections sized for the tiny model by the sweep's builder;
# kosmos-2: its causal mask is written in place (``mask.masked_fill_(...)``), a write every
# stage must keep (before, the stages silently used a mask without the causal part).
GENERIC_VLMS = ("blip-2", "hunyuan_vl", "qwen2_vl", "kosmos-2")


def test_vlm_sweep_generic_families():
    results = sweep_vlm(list(GENERIC_VLMS))
    assert [r.family for r in results] == list(GENERIC_VLMS)
    failed = [r for r in results if r.status != "pass"]
    assert not failed, "\n" + format_vlm_table(failed)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sweep_every_vlm_family():
    """No VLM family fails un-cleanly (status "error"); the zoo families pass."""
    results = sweep_vlm()
    errors = [r for r in results if r.status == "error" or (r.family in VLM_FAMILIES and r.status != "pass")]
    assert not errors, vlm_summary(results) + "\n\n" + format_vlm_table(errors)

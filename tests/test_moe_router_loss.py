"""Mixture-of-experts with router logits: the load-balancing loss crosses the cuts.

With ``output_router_logits=True`` a MoE model adds ``router_aux_loss_coef`` times the
load-balancing loss of every layer's router logits to its loss. fxpp records the
router logits inside the layers it treats as leaves (``fxpp.trace.recording``); they
cross the cuts like any value. Checked against the unpatched model: in one process
``pipe(**inputs, labels=labels)`` gives the model's ``loss``, ``aux_loss``, ``logits``
and every gradient (the routers' included); on 2 gloo ranks the schedule's loss and
gradients equal the unpatched model run on the same microbatches (Note [auxiliary
loss] in ``fxpp.runtime.loss``).

Tolerance: the stages call the model's own modules and the model's own loss
functions on the same tensors in the same order; only the order of float32 sums may
differ (a few ulps of values of order 1-10), far below 1e-5. Dropping the auxiliary
term changes the loss by ``coef * aux`` (about 0.2 with the coefficient 0.1 used here)
and the router gradients by more than 1e-3 (checked below).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxpp
from fxpp.testing.zoo import tiny_model

from .dist import run_distributed
from .helpers import make_inputs

MOE_FAMILIES = ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe")  # qwen2_moe: dense layers 0 and 2
NUM_LAYERS = 4
TOL = 1e-5  # see the module docstring
# Larger than transformers' default 0.001, so that a lost auxiliary term moves the
# router gradients by far more than TOL (test_the_auxiliary_term_matters_for_the_routers).
COEF = 0.1
_MODELS: dict = {}


def moe_model(family: str):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family, NUM_LAYERS, output_router_logits=True, router_aux_loss_coef=COEF)
    return _MODELS[family]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(MOE_FAMILIES),
    cuts=st.lists(st.integers(1, NUM_LAYERS - 1), min_size=1, max_size=NUM_LAYERS - 1, unique=True).map(sorted),
    padding=st.sampled_from(["none", "left"]),
    batch=st.integers(1, 3),
    seq=st.integers(3, 10),
)
def test_pipeline_with_labels_returns_what_the_model_returns(family, cuts, padding, batch, seq):
    model = moe_model(family)
    inputs = make_inputs(batch, seq, padding=padding, seed=seq)
    if padding == "none":
        del inputs["attention_mask"]
    labels = inputs["input_ids"].clone()
    if "attention_mask" in inputs:
        labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    pipe = fxpp.pipeline(model, len(cuts) + 1, cuts=cuts)
    model.zero_grad(set_to_none=True)
    ref = model(**inputs, labels=labels, use_cache=False)
    ref.loss.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    out = pipe(**inputs, labels=labels)
    out.loss.backward()
    grads = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=TOL, rtol=TOL)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=TOL, rtol=TOL)
    torch.testing.assert_close(out.loss, ref.loss, atol=TOL, rtol=TOL)
    assert set(grads) == set(ref_grads)
    routers = [n for n in ref_grads if ".gate." in n or n.endswith(".gate.weight") or "router" in n]
    assert routers, "the routers must get gradients"
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=TOL, rtol=TOL, msg=lambda m: f"{name}: {m}")
    # Without labels the pipeline keeps returning the logits.
    with torch.no_grad():
        torch.testing.assert_close(pipe(**inputs), ref.logits.detach(), atol=TOL, rtol=TOL)


def test_the_auxiliary_term_matters_for_the_routers():
    """The check above can fail: the load-balancing term moves the routers' gradients."""
    model = moe_model("qwen3_moe")
    inputs = make_inputs(2, 8, seed=1)
    labels = inputs["input_ids"]
    model.zero_grad(set_to_none=True)
    model(**inputs, labels=labels, use_cache=False).loss.backward()
    with_aux = _grads(model)
    model.zero_grad(set_to_none=True)
    logits = model(**inputs, use_cache=False).logits
    model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size).backward()
    without = _grads(model)
    model.zero_grad(set_to_none=True)
    gate = "model.layers.1.mlp.gate.weight"
    assert (with_aux[gate] - without[gate]).abs().max() > 100 * TOL


def moe_schedule_rank(rank, world, workdir, family, schedule_name, num_stages):
    model = tiny_model(family, NUM_LAYERS, output_router_logits=True, router_aux_loss_coef=COEF).train()
    ref = tiny_model(family, NUM_LAYERS, output_router_logits=True, router_aux_loss_coef=COEF).train()
    pipe = fxpp.pipeline(model, num_stages, cuts=[2] if num_stages == 2 else [1, 2, 3])  # cuts between MoE layers
    ids = [rank] if num_stages == world else (
        [rank, 2 * world - 1 - rank] if schedule_name == "ZBVZeroBubble" else fxpp.stage_ids_of_rank(rank, num_stages, world))
    stages = [pipe.build_stage(i, "cpu") for i in ids]
    inputs = make_inputs(4, 8, padding="left", seed=5)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    loss_fn = fxpp.causal_lm_loss(labels, 2, model=model)
    schedule = fxpp.schedule(schedule_name, stages, 2, loss_fn)
    losses = []
    schedule.step(**inputs, target=labels, losses=losses) if rank == 0 else schedule.step(target=labels, losses=losses)
    # The unpatched model on the same microbatches (Note [auxiliary loss]).
    ref_losses = []
    for i in range(2):
        mb = {k: v.chunk(2)[i] for k, v in inputs.items()}
        out = ref(**mb, use_cache=False)
        loss = loss_fn((out.logits, out.aux_loss), labels.chunk(2)[i])
        (loss / 2).backward()
        ref_losses.append(loss.detach())
    report = {"loss_diff": None, "grads": {}}
    if any(stage.is_last for stage in stages):
        report["loss_diff"] = float((loss_fn.whole_batch(losses) - loss_fn.whole_batch(ref_losses)).abs())
    for stage in stages:
        for name, p in stage.submod.named_parameters():
            g = ref.get_parameter(name).grad
            if p.grad is None and g is None:
                continue
            report["grads"][name] = "missing" if p.grad is None or g is None else float((p.grad - g).abs().max())
    return report


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family, schedule_name, num_stages", [
    ("qwen3_moe", "1F1B", 2), ("qwen2_moe", "1F1B", 2), ("olmoe", "1F1B", 2), ("mixtral", "ZBVZeroBubble", 4)])
def test_two_ranks_router_loss_matches_the_unpatched_model(tmp_path, family, schedule_name, num_stages):
    reports = run_distributed(moe_schedule_rank, 2, tmp_path, family, schedule_name, num_stages, timeout_s=240)
    diffs = [r["loss_diff"] for r in reports if r["loss_diff"] is not None]
    assert diffs and max(diffs) < 2e-5, diffs
    routers = [n for r in reports for n in r["grads"] if ".gate." in n]
    assert routers, "router gradients must be compared on both stages"
    for rank, r in enumerate(reports):
        for name, d in r["grads"].items():
            # 2e-5: as the in-process bound, with the microbatch sums on two ranks.
            assert d != "missing" and d < 2e-5, f"rank {rank} grad {name}: {d}"

"""Multi-process training with torch.distributed.pipelining schedules on gloo.

For every schedule: one step gives the unpatched model's loss and gradients (every
stage checks its own parameters, the tied last-stage copy included), and SGD steps
give the same parameters. The unpatched model is stepped on the same microbatches
with the same loss and gradient scaling as the schedule (:func:`reference_step`), so
what remains is float32 rounding; each bound below says which rounding and how much,
in ulps (float32 ``eps`` times the largest magnitude of the reference tensor).
"""

from __future__ import annotations

import pytest
import torch

import fxpp
from fxpp.runtime.schedule import make_schedule
from fxpp.testing.zoo import tiny_model

from .dist import run_distributed
from .helpers import make_inputs, rank_parameters

EPS = torch.finfo(torch.float32).eps
LR = 0.5

SCHEDULES = {
    # name: (ranks, stages, placement)
    "GPipe": (2, 2, "loop"),
    "1F1B": (2, 2, "loop"),
    "Interleaved1F1B": (2, 4, "loop"),
    "LoopedBFS": (2, 4, "loop"),
    "InterleavedZeroBubble": (2, 4, "loop"),
    "ZBVZeroBubble": (2, 4, "v"),
    "DualPipeV": (2, 4, "v"),
}


def _batch(batch=8, seq=8):
    inputs = make_inputs(batch, seq, padding="left", seed=3)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs, labels


def reference_step(ref, inputs, labels, loss_fn, n_microbatches):
    """One step of the unpatched model computed the way a schedule computes it.

    A schedule splits every input along dim 0 into ``n_microbatches`` chunks
    (``split_args_kwargs_into_chunks``, ``torch.tensor_split`` for the target), calls
    ``loss_fn`` once per microbatch, accumulates the microbatches' gradients and, with
    ``scale_grads=True``, divides what this step added to ``.grad`` by
    ``n_microbatches`` (``FxppPipelineStage.scale_grads``: gradients accumulated by
    earlier steps are not divided again). The same here, on the same microbatches, with
    the same loss function, so that a pipeline is compared with the float32 sums it
    should reproduce and not with the whole batch's: Gemma 4 stepped on the whole batch
    drifts from itself stepped on four microbatches (float reassociation, amplified by
    the optimizer steps) as much as from the pipeline.

    Returns the whole batch's loss as ``loss_fn.whole_batch`` reports the schedule's.
    """
    from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

    _, chunks = split_args_kwargs_into_chunks((), inputs, n_microbatches)
    targets = torch.tensor_split(labels, n_microbatches, dim=0)
    before = {p: p.grad.detach().clone() for p in ref.parameters() if p.grad is not None}
    losses = []
    for chunk, target in zip(chunks, targets):
        loss = loss_fn(model_output(ref(**chunk, use_cache=False), loss_fn), target)
        loss.backward()
        losses.append(loss.detach())
    for p in ref.parameters():
        if p.grad is None:
            continue
        if p in before:
            p.grad.sub_(before[p]).div_(n_microbatches).add_(before[p])
        else:
            p.grad.div_(n_microbatches)
    return loss_fn.whole_batch(losses)


def model_output(out, loss_fn):
    """What a last stage hands ``loss_fn`` for the unpatched model's output ``out``: the logits, and the router's
    auxiliary loss where the loss adds it (Note [auxiliary loss])."""
    aux = getattr(out, "aux_loss", None)
    return (out.logits, aux) if getattr(loss_fn, "aux_loss_coef", None) is not None and aux is not None else out.logits


def train_rank(rank, world, workdir, schedule, family, num_layers, num_stages, style, tie, steps, microbatches):
    torch.manual_seed(0)
    model = tiny_model(family, num_layers, tie_word_embeddings=tie).train()
    ref = tiny_model(family, num_layers, tie_word_embeddings=tie).train()
    inputs, labels = _batch()
    mb = {k: v[: v.shape[0] // microbatches] for k, v in inputs.items()}
    pipe = fxpp.pipeline(model, num_stages, example_inputs=mb)
    ids = fxpp.stage_ids_of_rank(rank, num_stages, world, style)
    stages = [pipe.build_stage(i, "cpu", style=style) for i in ids]
    loss_fn = fxpp.causal_lm_loss(labels, microbatches)
    sched = make_schedule(schedule, stages, microbatches, loss_fn)
    params = rank_parameters(stages)
    opt = torch.optim.SGD(list({id(p): p for p in params.values()}.values()), lr=LR)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    report = {"loss": None, "grad": {}, "first_step_param": {}, "param": {}}
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        losses = []
        sched.step(**inputs, target=labels, losses=losses)
        ref_loss = reference_step(ref, inputs, labels, loss_fn, microbatches)
        if step == 0:
            if any(st.is_last for st in stages):
                report["loss"] = _diff(loss_fn.whole_batch(losses), ref_loss)
            for name, p in params.items():
                report["grad"][name] = _diff(p.grad, ref.get_parameter(name).grad) if p.grad is not None else "missing"
        opt.step()
        ref_opt.step()
        if step == 0:
            for name, p in params.items():
                report["first_step_param"][name] = _diff(p, ref.get_parameter(name))
    for name, p in params.items():
        report["param"][name] = _diff(p, ref.get_parameter(name))
    return report


def _diff(got, ref):
    """(max |got - ref|, max |ref|): the difference and the magnitude it is measured against."""
    return float((got.detach() - ref.detach()).abs().max()), float(ref.detach().abs().max())


def _assert_within(diff_and_scale, ulps, what):
    """``max |got - ref| <= ulps * eps * max |ref|``."""
    diff, scale = diff_and_scale
    assert diff <= ulps * EPS * scale, f"{what} differs by {diff:.3g} = {diff / (EPS * scale):.3g} ulps of {scale:.3g}, over {ulps}"


# Parameters after the last step, in ulps of each tensor's largest entry. The first
# step is checked tightly (_check); later steps amplify its rounding differences by
# the unpatched model's own sensitivity, measured without fxpp: step it
# (reference_step, LR) with its first gradients perturbed at random by up to 1 ulp of
# their largest entry (the size of the rounding differences that remain), 12 seeds.
# llama / qwen2, 3 steps: up to 31 / 2.7 ulps (the pipelines: up to 1.9); 2x margin.
PARAM_ULPS = 64
# Gemma 4, 2 steps: up to 2500 ulps (1.4e-4 on layer 0's q_proj, |p| <= 0.48, also
# when only the tied gradient is perturbed; the pipelines: 142, 8e-6). Its gradient
# moves ~370x as much as its parameters do (perturbing every parameter by d moves it
# by ~370 d, linearly for d from 1e-7 to 1e-4), so at LR=0.5 a step multiplies a
# parameter difference by ~190. That is the model, not fxpp: the unpatched Gemma 4
# stepped on the whole batch instead of the microbatches ends 1.8e-4 away from
# itself. 4096 ulps (4.9e-4 of the magnitude): 1.6x margin over the worst seed; a
# wrong or missing gradient (order LR * |g|, 1e-2 to 1) stays far above it.
PARAM_ULPS_GEMMA4 = 4096


def _check(reports, microbatches, param_ulps=PARAM_ULPS):
    assert any(r["loss"] is not None for r in reports)
    for rank, r in enumerate(reports):
        if r["loss"] is not None:
            # The same float32 forward on the same microbatches and the per-microbatch
            # losses summed in the same order (whole_batch): identical so far. One ulp per
            # microbatch lets a stage graph round an op differently.
            _assert_within(r["loss"], microbatches, f"rank {rank} loss")
        for name, d in r["grad"].items():
            assert d != "missing", f"rank {rank} grad {name} missing"
            # The same float32 gradients per microbatch; only the order in which they are
            # added differs: a tied weight sums each copy over the microbatches and then
            # the two copies (the reference: both uses per microbatch, then microbatches),
            # LoopedBFS runs the backward of a stage's microbatches in another order.
            # Each order of a float32 sum of n terms is within (n - 1) eps sum|terms| of
            # the exact sum; n <= 2 * microbatches here, with terms of about the
            # gradient's magnitude (measured: up to 1.1 ulps of max |g|; untied models
            # in the reference's order bitwise equal).
            _assert_within(d, 2 * microbatches, f"rank {rank} grad {name}")
        for name, d in r["first_step_param"].items():
            # SGD from bitwise equal parameters: p - LR * g, rounded (at most twice: LR * g
            # and the sum) in each run, so the difference is LR times the gradient's plus at
            # most 2 ulps of |p| + LR * |g|.
            (g_diff, g_scale), (p_diff, p_scale) = r["grad"][name], d
            bound = LR * g_diff + 2 * EPS * (p_scale + LR * g_scale)
            assert p_diff <= bound, f"rank {rank} param {name} after the first step differs by {p_diff:.3g}, over {bound:.3g}"
        for name, d in r["param"].items():
            _assert_within(d, param_ulps, f"rank {rank} param {name} after the optimizer steps")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_schedule_matches_unpatched_model(schedule, tmp_path):
    ranks, stages, style = SCHEDULES[schedule]
    reports = run_distributed(train_rank, ranks, tmp_path, schedule, "llama", 4, stages, style, False, 3, 4)
    _check(reports, 4)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", ["1F1B", "Interleaved1F1B", "ZBVZeroBubble"])
def test_tied_embeddings_are_synchronised(schedule, tmp_path):
    ranks, stages, style = SCHEDULES[schedule]
    reports = run_distributed(train_rank, ranks, tmp_path, schedule, "qwen2", 4, stages, style, True, 3, 4)
    _check(reports, 4)
    names = {n for r in reports for n in r["grad"]}
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names


@pytest.mark.heavy  # four ranks: the README's second test command
@pytest.mark.timeout(300)
def test_four_ranks_gpipe_gemma4(tmp_path):
    reports = run_distributed(train_rank, 4, tmp_path, "GPipe", "gemma4", 4, 4, "loop", True, 2, 4)
    _check(reports, 4, PARAM_ULPS_GEMMA4)


def _save_sharded(model, directory, shards=2):
    """A transformers-style sharded safetensors checkpoint (tied lm_head saved once)."""
    import json
    import os

    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        part = keys[s::shards]
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def meta_rank(rank, world, workdir, tie):
    """Each rank builds the model on meta and loads only its own stage's keys."""
    from transformers import AutoModelForCausalLM

    from fxpp.testing.zoo import tiny_config

    config = tiny_config("qwen2", 4, tie_word_embeddings=tie)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    mb = {k: v[:2] for k, v in _batch()[0].items()}
    pipe = fxpp.pipeline(model, world, example_inputs={k: v.to("meta") for k, v in mb.items()})
    stage = pipe.build_stage(rank, "cpu", checkpoint=f"{workdir}/ckpt")
    ref = tiny_model("qwen2", 4, tie_word_embeddings=tie)
    inputs, labels = _batch()
    loss_fn = fxpp.causal_lm_loss(labels, 4)
    sched = make_schedule("1F1B", [stage], 4, loss_fn)
    losses = []
    sched.step(**inputs, target=labels, losses=losses)
    ref_loss = reference_step(ref, inputs, labels, loss_fn, 4)
    own = dict(stage.submod.named_parameters())
    report = {
        "allocated": sum(p.numel() for p in own.values()),
        "total": sum(p.numel() for p in ref.parameters()),
        "grad": {n: _diff(p.grad, ref.get_parameter(n).grad) for n, p in own.items()},
        "weight_diff": max(float((p - ref.get_parameter(n)).abs().max()) for n, p in own.items()),
        "meta_left": [n for n, p in model.named_parameters() if not p.is_meta],
    }
    if stage.is_last:
        report["loss"] = _diff(loss_fn.whole_batch(losses), ref_loss)
    return report


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tie", [False, True])
def test_meta_model_loads_only_its_stage_from_a_sharded_checkpoint(tmp_path, tie):
    (tmp_path / "ckpt").mkdir()
    _save_sharded(tiny_model("qwen2", 4, tie_word_embeddings=tie), tmp_path / "ckpt")
    reports = run_distributed(meta_rank, 2, tmp_path, tie)
    for rank, r in enumerate(reports):
        assert r["weight_diff"] == 0.0
        for name, d in r["grad"].items():
            # 4 microbatches (and, tied, two copies): the bound of _check.
            _assert_within(d, 2 * 4, f"rank {rank} grad {name}")
        assert r["allocated"] < 0.75 * r["total"], "a rank allocated more than its stage"
        assert r["meta_left"] == [], "the user's meta model was modified"
    _assert_within(reports[-1]["loss"], 4, "loss")  # as in _check


def reshape_rank(rank, world, workdir):
    """Two steps with different sequence lengths and microbatch counts, gradients accumulated."""
    model = tiny_model("gemma", 4, tie_word_embeddings=True).train()
    ref = tiny_model("gemma", 4, tie_word_embeddings=True).train()
    first_inputs, first_labels = _batch(8, 8)
    second_inputs = make_inputs(4, 13, padding="right", seed=9)
    second_labels = second_inputs["input_ids"].masked_fill(second_inputs["attention_mask"] == 0, -100)
    pipe = fxpp.pipeline(model, world, example_inputs={k: v[:2] for k, v in first_inputs.items()})
    stage = pipe.build_stage(rank, "cpu")
    loss_fn = fxpp.causal_lm_loss(first_labels, 4)
    make_schedule("1F1B", [stage], 4, loss_fn).step(**first_inputs, target=first_labels)
    stage = pipe.build_stage(rank, "cpu", microbatch={k: v[:2] for k, v in second_inputs.items()})
    loss_fn = fxpp.causal_lm_loss(second_labels, 2)
    make_schedule("GPipe", [stage], 2, loss_fn).step(**second_inputs, target=second_labels)
    reference_step(ref, first_inputs, first_labels, fxpp.causal_lm_loss(first_labels, 4), 4)
    reference_step(ref, second_inputs, second_labels, loss_fn, 2)
    return {n: _diff(p.grad, ref.get_parameter(n).grad) for n, p in stage.submod.named_parameters()}


@pytest.mark.timeout(300)
def test_new_sequence_length_and_microbatch_count_keep_accumulated_gradients(tmp_path):
    for rank, diffs in enumerate(run_distributed(reshape_rank, 2, tmp_path)):
        for name, d in diffs.items():
            # The tied weight's gradient is summed over 4 + 2 microbatches, each with two
            # copies, in another order than the reference's: the bound of _check for 6.
            _assert_within(d, 2 * (4 + 2), f"rank {rank} grad {name}")


def faulty_rank(rank, world, workdir, fault):
    """Rank 1 fails before its step (``"raise"``) or is killed inside it (``"kill"``), or
    the step's microbatches are longer than the stages were built for with a fixed
    ``microbatch`` shape (``"longer"``; without one, shapes follow the step)."""
    import os

    model = tiny_model("llama", 2)
    inputs, labels = _batch()
    microbatch = {k: v[:2] for k, v in inputs.items()}
    pipe = fxpp.pipeline(model, world, example_inputs=microbatch)
    stage = pipe.build_stage(rank, "cpu", microbatch=microbatch if fault == "longer" else None)
    if fault == "longer":
        inputs, labels = _batch(seq=12)
    if rank == 1 and fault == "raise":
        raise RuntimeError("rank 1 lost its data loader")
    if rank == 1 and fault == "kill":
        stage.submod.register_forward_pre_hook(lambda *a: os._exit(9))  # killed mid-step
    make_schedule("1F1B", [stage], 4, fxpp.causal_lm_loss(labels, 4)).step(**inputs, target=labels)


@pytest.mark.timeout(120)
def test_one_rank_failing_ends_every_rank_with_an_error(tmp_path):
    import time

    start = time.monotonic()
    results = run_distributed(faulty_rank, 2, tmp_path, "raise", expect_ok=False, timeout_s=90, pg_timeout_s=20)
    assert time.monotonic() - start < 90
    assert "rank 1 lost its data loader" in results[1]["error"]
    assert not results[0]["ok"]
    assert any(word in results[0]["error"] for word in ("peer", "Connection", "closed", "timed out", "Timeout")), results[0]["error"]


@pytest.mark.timeout(120)
def test_sending_another_shape_than_the_stages_were_built_for_names_the_value(tmp_path):
    results = run_distributed(faulty_rank, 2, tmp_path, "longer", expect_ok=False, timeout_s=90, pg_timeout_s=20)
    assert not results[0]["ok"] and not results[1]["ok"]
    assert "StageInputError" in results[0]["error"], results[0]["error"]
    assert ("stage 0, microbatch 0: sends hidden states with shape [2, 12, 64], but the stages were built for "
            "[2, 8, 64]") in results[0]["error"], results[0]["error"]


def test_stage_shards_together_equal_the_model_state_dict(tmp_path):
    from fxpp.runtime.checkpoint import load_state_dict_from, save_stage

    model = tiny_model("gemma4", 6)
    pipe = fxpp.pipeline(model, 3)
    merged = {}
    for i, stage in enumerate(pipe.stages):
        save_stage(stage, str(tmp_path / f"stage{i}.safetensors"))
        merged.update(load_state_dict_from(str(tmp_path / f"stage{i}.safetensors")))
    full = model.state_dict()
    assert set(merged) == set(full)
    for name, value in full.items():
        assert torch.equal(merged[name], value), name


def test_torch_pipeline_at_split_markers_status():
    """torch's own splitter over fxpp's graph: pinned to today's behaviour (see
    fxpp/runtime/torch_ir.py). If a torch upgrade makes it work, the stages must match."""
    from fxpp.runtime.torch_ir import split_with_torch_pipeline, with_split_markers

    model = tiny_model("llama", 4)
    inputs = make_inputs(2, 8, padding="left", position_ids=True)  # the whole signature: the canonical graph
    pipe = fxpp.pipeline(model, 2, example_inputs=inputs)
    marked = with_split_markers(pipe)
    torch.testing.assert_close(marked(**inputs), model(**inputs).logits, atol=0, rtol=0)
    try:
        torch_pipe = split_with_torch_pipeline(pipe, inputs)
    except fxpp.UnsupportedModelError as e:
        assert "cannot split LlamaForCausalLM at fxpp's cuts" in str(e)
        return
    out = torch_pipe.get_stage_module(1)(*torch_pipe.get_stage_module(0)(**inputs))
    torch.testing.assert_close(out, model(**inputs).logits)


# Resuming from stage, optimizer and RNG checkpoints ends bit for bit where a straight run
# does: tests/test_walkthrough.py (fxpp run --save-dir / --resume, pp 2 x dp 2).


@pytest.mark.timeout(120)
def test_a_killed_rank_ends_the_others_in_bounded_time(tmp_path):
    import time

    start = time.monotonic()
    results = run_distributed(faulty_rank, 2, tmp_path, "kill", expect_ok=False, timeout_s=90, pg_timeout_s=20)
    assert time.monotonic() - start < 90
    assert results[1]["error"].startswith("rank 1 died")
    assert not results[0]["ok"] and results[0]["error"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", ["ZBVZeroBubble", "InterleavedZeroBubble"])
def test_zero_bubble_schedules_with_gemma4_kv_sharing(schedule, tmp_path):
    """Zero-bubble schedules detach stage outputs in place: Gemma 4 sends views (sliced
    hidden states) and values a stage only passes on (shared KV, per-layer inputs)."""
    ranks, stages, style = SCHEDULES[schedule]
    reports = run_distributed(train_rank, ranks, tmp_path, schedule, "gemma4", 4, stages, style, True, 2, 4)
    _check(reports, 4, PARAM_ULPS_GEMMA4)

"""Multi-process training with torch.distributed.pipelining schedules on gloo.

For every schedule: one step gives the unpatched model's loss and gradients (every
stage checks its own parameters, the tied last-stage copy included), and three SGD
steps give the same parameters.
"""

from __future__ import annotations

import pytest
import torch

import fxpp
from fxpp.zoo import tiny_model

from .dist import run_distributed
from .helpers import make_inputs

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


def _schedule_class(name):
    import torch.distributed.pipelining as pp

    return getattr(pp, f"Schedule{name}")


def _batch(batch=8, seq=8):
    inputs = make_inputs(batch, seq, padding="left", seed=3)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs, labels


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
    cls = _schedule_class(schedule)
    single = cls.__mro__[1].__name__ == "PipelineScheduleSingle"
    sched = cls(stages[0] if single else stages, n_microbatches=microbatches, loss_fn=loss_fn)
    params = {}
    for st in stages:
        for name, p in st.submod.named_parameters():
            params.setdefault(name, p)
    opt = torch.optim.SGD(list({id(p): p for p in params.values()}.values()), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    report = {"loss_diff": None, "grad_diff": {}, "param_diff": {}}
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        losses = []
        sched.step(**inputs, target=labels, losses=losses)
        ref_loss = ref(**inputs, labels=labels).loss
        ref_loss.backward()
        if step == 0:
            if any(st.is_last for st in stages):
                report["loss_diff"] = float((loss_fn.whole_batch(losses) - ref_loss.detach()).abs())
            for name, p in params.items():
                g_ref = ref.get_parameter(name).grad
                report["grad_diff"][name] = float((p.grad - g_ref).abs().max()) if p.grad is not None else "missing"
        opt.step()
        ref_opt.step()
    for name, p in params.items():
        report["param_diff"][name] = float((p.detach() - ref.get_parameter(name).detach()).abs().max())
    return report


def _check(reports, tol=2e-5):
    assert any(r["loss_diff"] is not None for r in reports)
    for rank, r in enumerate(reports):
        if r["loss_diff"] is not None:
            assert r["loss_diff"] < tol, f"rank {rank} loss differs by {r['loss_diff']}"
        for name, d in r["grad_diff"].items():
            assert d != "missing" and d < tol, f"rank {rank} grad {name}: {d}"
        for name, d in r["param_diff"].items():
            assert d < tol, f"rank {rank} param {name} after optimizer steps: {d}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_schedule_matches_unpatched_model(schedule, tmp_path):
    ranks, stages, style = SCHEDULES[schedule]
    reports = run_distributed(train_rank, ranks, tmp_path, schedule, "llama", 4, stages, style, False, 3, 4)
    _check(reports)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", ["1F1B", "Interleaved1F1B", "ZBVZeroBubble"])
def test_tied_embeddings_are_synchronised(schedule, tmp_path):
    ranks, stages, style = SCHEDULES[schedule]
    reports = run_distributed(train_rank, ranks, tmp_path, schedule, "qwen2", 4, stages, style, True, 3, 4)
    _check(reports)
    names = {n for r in reports for n in r["grad_diff"]}
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names


@pytest.mark.timeout(300)
def test_four_ranks_gpipe_gemma4(tmp_path):
    reports = run_distributed(train_rank, 4, tmp_path, "GPipe", "gemma4", 4, 4, "loop", True, 2, 4)
    _check(reports)

"""The optimizer step: the pipeline's global gradient norm and clipping, weight-decay groups, LR schedules.

The distributed cases run in ONE 2-rank gloo spawn (process start-up costs more than
the tiny steps) and compare with the unpatched model stepped the same way
(``test_runtime.reference_step``: same microbatches, same loss): the global norm with
``torch.nn.utils.get_total_norm`` over the reference's gradients, the clipped
gradients with ``torch.nn.utils.clip_grad_norm_`` on the reference.
"""

from __future__ import annotations

import math

import pytest
import torch

import fxpp
from fxpp.runtime.optim import LRFactor, decay_parameter_names, lr_scheduler, param_groups
from fxpp.runtime.schedule import make_schedule
from fxpp.testing.zoo import tiny_model

from .dist import run_distributed
from .test_runtime import EPS, _batch, _diff, reference_step

M = 4  # microbatches
MAX_NORM = 0.05  # below every configuration's norm (about 1-3 here), so clipping scales every gradient

CONFIGS = [
    # (schedule, stages, placement, tied): loop placement puts the tied pair on two ranks
    # (exchanged), V placement puts stages 0 and 3 on rank 0 (summed locally).
    ("1F1B", 2, "loop", True),
    ("1F1B", 2, "loop", False),
    ("ZBVZeroBubble", 4, "v", True),
]


def _one_config(rank, world, schedule, num_stages, style, tie):
    model = tiny_model("llama", 4, tie_word_embeddings=tie).train()
    ref = tiny_model("llama", 4, tie_word_embeddings=tie).train()
    inputs, labels = _batch()
    pipe = fxpp.pipeline(model, num_stages, example_inputs={k: v[: v.shape[0] // M] for k, v in inputs.items()})
    stages = [pipe.build_stage(i, "cpu", style=style) for i in fxpp.stage_ids_of_rank(rank, num_stages, world, style)]
    loss_fn = fxpp.causal_lm_loss(labels, M)
    make_schedule(schedule, stages, M, loss_fn).step(**inputs, target=labels)
    reference_step(ref, inputs, labels, loss_fn, M)
    ref_grads = [p.grad for p in ref.parameters() if p.grad is not None]
    ref_norm = torch.nn.utils.get_total_norm(ref_grads)
    measured = fxpp.clip_grad_norm_(stages, math.inf)  # measures only
    total = fxpp.clip_grad_norm_(stages, MAX_NORM)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
    report = {"norm": (float(total), float(ref_norm)), "measured": float(measured),
              "n": sum(g.numel() for g in ref_grads), "grad": {}}
    for st in stages:
        for name, p in st.submod.named_parameters():
            report["grad"][name] = _diff(p.grad, ref.get_parameter(name).grad)
    return report


def clip_rank(rank, world, workdir):
    torch.manual_seed(0)
    return {config: _one_config(rank, world, *config) for config in CONFIGS}


@pytest.fixture(scope="module")
def clip_reports(tmp_path_factory):
    return run_distributed(clip_rank, 2, tmp_path_factory.mktemp("clip"), timeout_s=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{c[2]}-{'tied' if c[3] else 'untied'}")
def test_clip_grad_norm_equals_unpatched(config, clip_reports):
    per_rank = [r[config] for r in clip_reports]
    norms = {r["norm"][0] for r in per_rank}
    assert len(norms) == 1, f"ranks disagree on the global norm: {per_rank}"
    got, ref = per_rank[0]["norm"]
    assert got > MAX_NORM, "the test must clip"
    assert all(r["measured"] == got for r in per_rank), "max_norm=inf must only measure, the same norm"
    # Bound: each gradient element differs from the reference's by at most 2 * M ulps of
    # its tensor's max (test_runtime._check), so ||g - g_ref|| <= 2 M eps sqrt(n) ||g_ref||
    # (max |g| <= ||g||); the norm's own float32 sum in another order adds at most
    # sqrt(n) eps relative in practice. A tied weight counted twice would add its whole
    # norm (tens of percent here), far above it.
    rtol = (2 * M + 1) * EPS * math.sqrt(per_rank[0]["n"])
    assert abs(got - ref) <= rtol * ref, f"global norm {got} against the unpatched {ref} (rtol {rtol:.2g})"
    for rank, r in enumerate(per_rank):
        for name, (diff, scale) in r["grad"].items():
            # Clipped: coefficient MAX_NORM / norm, equal within rtol, times gradients equal
            # within 2 M ulps of their max.
            assert diff <= (2 * M * EPS + 2 * rtol) * scale, f"rank {rank} clipped grad {name}: {diff:.3g} of {scale:.3g}"


def test_clip_grad_norm_refuses_bad_arguments():
    with pytest.raises(fxpp.OptimizerSettingsError, match="max_norm=-1"):
        fxpp.clip_grad_norm_([object()], -1)
    with pytest.raises(fxpp.OptimizerSettingsError, match="this rank's stages"):
        fxpp.clip_grad_norm_([], 1.0)


def test_decay_groups_follow_transformers_trainer():
    from transformers import Trainer

    model = tiny_model("qwen2", 2)  # q/k/v biases, RMSNorm weights
    names = decay_parameter_names(model)
    assert names == set(Trainer.get_decay_parameter_names(None, model))
    assert not any(n.endswith("bias") or "norm" in n for n in names)
    assert "model.layers.0.mlp.up_proj.weight" in names
    model.model.embed_tokens.weight.requires_grad_(False)
    decay, no_decay = param_groups(model.named_parameters(), 0.1, names)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    grouped = {id(p) for g in (decay, no_decay) for p in g["params"]}
    assert id(model.model.embed_tokens.weight) not in grouped, "a frozen parameter gets no optimizer slot"
    assert len(grouped) == sum(p.requires_grad for p in model.parameters())


def test_lr_schedules():
    warm = LRFactor("cosine", warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    assert [warm(s) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert warm(4) == 1.0 and warm(20) == pytest.approx(0.1) and warm(100) == pytest.approx(0.1)
    assert warm(12) == pytest.approx(0.55)  # half way down the cosine: (1 + 0.1) / 2
    assert LRFactor("linear", 0, 10)(5) == pytest.approx(0.5)
    assert LRFactor("constant", 2, 10)(9) == 1.0
    with pytest.raises(fxpp.OptimizerSettingsError, match="'step'"):
        LRFactor("step", 0, 10)
    with pytest.raises(fxpp.OptimizerSettingsError, match="min_lr_ratio=2"):
        LRFactor("linear", 0, 10, 2)


def test_lr_scheduler_resumes_bit_exact_inside_warmup():
    def run(steps, state=None):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=3e-4)
        sched = lr_scheduler(opt, "cosine", warmup_steps=5, total_steps=12, min_lr_ratio=0.1)
        if state is not None:
            opt.load_state_dict(state[0])
            sched.load_state_dict(state[1])
        lrs = []
        for _ in range(steps):
            p.grad = torch.ones(1)
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return lrs, (opt.state_dict(), sched.state_dict())

    whole, _ = run(10)
    first, state = run(3)  # stops inside warm-up
    rest, _ = run(7, state)
    assert first + rest == whole

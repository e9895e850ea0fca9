"""bf16 mixed precision: fp32 master parameters and optimizer state, bf16 compute, fp32 gradient reduction.

One 4-rank gloo spawn runs pp 2 x dp 2 (FSDP2's ``MixedPrecisionPolicy``) and a
4-stage pipeline without data parallelism (a 1-rank dp mesh per rank carries the same
policy, as torchtitan does). The reference is the unpatched model under the same
policy (:func:`reference_step_bf16`): parameters cast to bf16 for compute (buffers
stay as they are, as FSDP2 casts parameters only), each microbatch's bf16 gradients
upcast and accumulated in fp32 (FSDP2's ``unsharded_accumulated_grad``), summed over
the replicas, divided by dp and by the microbatch count.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fxpp
from fxpp.testing.zoo import tiny_model

from .dist import run_distributed
from .test_data_parallel import _full
from .test_runtime import _batch, _diff

M = 2
BF16_EPS = torch.finfo(torch.bfloat16).eps


def reference_step_bf16(ref, inputs, labels, loss_fn, dp: int, m: int) -> dict[str, torch.Tensor]:
    """The unpatched model's fp32 gradients of one step under bf16 compute, summed as pp x dp sums."""
    from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

    compute = copy.deepcopy(ref)  # a tied weight stays one parameter
    for p in compute.parameters():
        p.data = p.data.to(torch.bfloat16)
    _, chunks = split_args_kwargs_into_chunks((), inputs, dp * m)
    targets = torch.tensor_split(labels, dp * m, dim=0)
    totals: dict[str, torch.Tensor] = {}
    for d in range(dp):
        acc: dict[str, torch.Tensor] = {}
        for i in range(d * m, (d + 1) * m):
            compute.zero_grad(set_to_none=True)
            loss_fn(compute(**chunks[i], use_cache=False).logits, targets[i]).backward()
            for name, p in compute.named_parameters(remove_duplicate=False):  # a tied weight under both names
                if p.grad is not None:
                    acc[name] = p.grad.float() if name not in acc else acc[name] + p.grad
        for name, g in acc.items():
            totals[name] = g if name not in totals else totals[name] + g
    return {name: g / dp / m for name, g in totals.items()}


def _config(rank, mesh, num_stages, pp, dp, tie, m=M):
    model = tiny_model("llama", 4, tie_word_embeddings=tie).train()
    ref = tiny_model("llama", 4, tie_word_embeddings=tie).train()
    inputs, labels = _batch(8, 8)
    local = {**inputs, "labels": labels}
    if mesh is not None:
        local = fxpp.local_batch(local, mesh)
    local_labels = local.pop("labels")
    pipe = fxpp.pipeline(model, num_stages, example_inputs={k: v[: v.shape[0] // m] for k, v in local.items()})
    pp_rank = rank if mesh is None else mesh.get_local_rank("pp")
    stage = pipe.build_stage(pp_rank, "cpu", mesh=mesh, mixed_precision="bf16")
    received = []
    stage.submod.register_forward_pre_hook(lambda mod, args: received.append([a.dtype for a in args]))
    loss_fn = fxpp.causal_lm_loss(local_labels, m, mesh=mesh)
    sched = fxpp.schedule("1F1B", [stage], m, loss_fn)
    sched.step(**local, target=local_labels)
    ref_grads = reference_step_bf16(ref, inputs, labels, fxpp.causal_lm_loss(labels, dp * m), dp, m)
    report = {"grad": {}, "tie": tie, "m": m}
    for name, p in stage.submod.named_parameters():
        report["grad"][name] = _diff(_full(p.grad), ref_grads[name]) if p.grad is not None else "missing"
    opt = torch.optim.AdamW(stage.submod.parameters(), lr=1e-3)
    opt.step()
    report["param_dtypes"] = sorted({str(p.dtype) for p in stage.submod.parameters()})
    report["state_dtypes"] = sorted({str(v.dtype) for s in opt.state.values() for v in s.values()
                                     if torch.is_tensor(v) and v.dim() > 0})
    report["received"] = received[0] if received else None
    return report


def mp_rank(rank, world, workdir):
    mesh = fxpp.pp_dp_mesh(2, 2)
    return {
        "pp2xdp2-tied": _config(rank, mesh, 2, 2, 2, True),
        "pp4-untied": _config(rank, None, 4, 4, 1, False, m=4),
    }


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return run_distributed(mp_rank, 4, tmp_path_factory.mktemp("mp"), timeout_s=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("config", ["pp2xdp2-tied", "pp4-untied"])
def test_bf16_mixed_precision_matches_unpatched_model_under_the_same_policy(reports, config):
    for rank, r in enumerate(r[config] for r in reports):
        assert r["param_dtypes"] == ["torch.float32"], f"rank {rank}: master parameters {r['param_dtypes']}"
        assert r["state_dtypes"] == ["torch.float32"], f"rank {rank}: optimizer state {r['state_dtypes']}"
        floats = [d for d in r["received"] or () if d.is_floating_point]  # a first stage receives token ids only
        assert all(d == torch.bfloat16 for d in floats), f"rank {rank}: the hidden states crossed as {r['received']}"
        receiving = rank >= 2 if config == "pp2xdp2-tied" else rank >= 1  # mesh rank p * dp + d: pp index 1
        if receiving:
            assert floats, f"rank {rank}: a receiving stage got no hidden states: {r['received']}"
        for name, d in r["grad"].items():
            assert d != "missing", f"rank {rank}: {name} has no gradient"
            diff, scale = d
            if r["tie"] and name in ("model.embed_tokens.weight", "lm_head.weight"):
                # The unpatched model adds the embedding's and the head's bf16 gradients
                # in bf16 inside autograd (one bf16 rounding per microbatch: at most 1 ulp
                # of bf16 of the sum), the pipeline each copy's fp32 sum after the step.
                bound = 2 * r["m"] * BF16_EPS * scale
            else:
                # The same bf16 kernels on the same bf16 values in the same order, fp32
                # accumulation in the same order, divisions by powers of two: bitwise.
                bound = 0.0
            assert diff <= bound, f"rank {rank} grad {name} differs by {diff:.3g} (bound {bound:.3g}, |g| {scale:.3g})"

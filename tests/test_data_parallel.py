"""Pipeline x data parallel on one ("pp", "dp") device mesh: 4 gloo ranks, pp 2 x dp 2.

Every configuration runs inside ONE 4-rank spawn (process start-up and imports cost
more than the tiny models' steps on 2 cores; the module-scoped fixture ``runs``) and
reports, per configuration, its largest differences from the unpatched model; the
tests assert each.

The reference (:func:`reference_step_dp`) is the unpatched model trained in each
rank's process on the *global* batch, split into the same microbatches (dp replica
``d`` holds microbatches ``d * M ... (d + 1) * M - 1`` of the global batch's
``dp * M``), with the pipeline's loss (``sum_ce / N_global * dp * M`` per microbatch)
and the pipeline's order of sums: each replica's microbatches accumulated in order,
then the replicas' sums (FSDP's reduce-scatter), divided by dp and by M (powers of
two: exact). Summed in another order (all ``dp * M`` microbatches in one run) the
unpatched model after two AdamW steps differs from itself by up to 8342 ulps of the
tied embedding (AdamW's first update is ``lr * g / (|g| + 1e-8)``: where ``|g|`` is
itself at the level of rounding, a reassociation moves the element by up to ``lr``);
so the reference fixes the order, and what remains is the tied weight's two copies,
which the pipeline adds after the step (each copy summed over the microbatches) and
the unpatched model per microbatch. Bounds are in ulps as in test_runtime.py: float32
``eps`` times the largest magnitude of the reference tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from .dist import run_distributed
from .helpers import rank_parameters
from .test_runtime import _assert_within, _batch, _diff, model_output

PP, DP, M = 2, 2, 2  # M: microbatches per dp replica; the global batch has DP * M of them
LR = 1e-2
STEPS = 2


class Config(NamedTuple):
    schedule: str
    num_stages: int
    style: str
    tie: bool
    data_parallel: str = "fsdp"
    activation_checkpointing: bool = False
    reshape: bool = False  # the second step has another sequence length: the stages are rebuilt

    @property
    def name(self) -> str:
        return (f"{self.schedule}-{'tied' if self.tie else 'untied'}-{self.data_parallel}"
                f"{'-ac' if self.activation_checkpointing else ''}{'-reshape' if self.reshape else ''}")


CONFIGS = [
    Config("1F1B", 2, "loop", False, reshape=True),
    Config("1F1B", 2, "loop", True),
    Config("Interleaved1F1B", 4, "loop", False),
    Config("Interleaved1F1B", 4, "loop", True),
    Config("ZBVZeroBubble", 4, "v", False),
    Config("ZBVZeroBubble", 4, "v", True),
    Config("Interleaved1F1B", 4, "loop", True, "replicate"),
    Config("ZBVZeroBubble", 4, "v", True, "fsdp", True),
    Config("1F1B", 2, "loop", False, "replicate", True),
]


def reference_step_dp(ref, inputs, labels, loss_fn, dp: int, m: int):
    """One step of the unpatched model on the global batch, summed the way pipeline x dp sums.

    ``loss_fn`` is the global batch's loss over ``dp * m`` microbatches (each returns
    ``sum_ce / N * dp * m``, as every replica's does). Needs ``.grad`` cleared before
    (the test steps from ``zero_grad``). Returns the global batch's loss.
    """
    from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

    _, chunks = split_args_kwargs_into_chunks((), inputs, dp * m)
    targets = torch.tensor_split(labels, dp * m, dim=0)
    totals, losses = {}, []
    for d in range(dp):
        ref.zero_grad(set_to_none=True)
        for i in range(d * m, (d + 1) * m):  # a replica accumulates its microbatches in order
            loss = loss_fn(model_output(ref(**chunks[i], use_cache=False), loss_fn), targets[i])
            loss.backward()
            losses.append(loss.detach())
        for p in ref.parameters():  # then the replicas' sums are added (the reduce-scatter)
            if p.grad is not None:
                totals[p] = p.grad.clone() if p not in totals else totals[p] + p.grad
    for p in ref.parameters():
        p.grad = totals[p] / dp / m if p in totals else None  # FSDP's average, then scale_grads
    return loss_fn.whole_batch(losses)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (an all-gather over dp: every dp rank calls it in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _run_config(mesh, config: Config) -> dict:
    import torch.distributed as dist

    import fxpp
    from fxpp.runtime.parallel import local_batch
    from fxpp.runtime.schedule import make_schedule
    from fxpp.testing.zoo import tiny_model

    model = tiny_model("llama", 4, tie_word_embeddings=config.tie).train()
    ref = tiny_model("llama", 4, tie_word_embeddings=config.tie).train()
    # Left padding: the replicas hold different numbers of target tokens.
    batches = [_batch(8, 12 if config.reshape and step else 8) for step in range(STEPS)]
    first = local_batch(batches[0][0], mesh)
    pipe = fxpp.pipeline(model, config.num_stages, example_inputs={k: v[: v.shape[0] // M] for k, v in first.items()})
    ids = fxpp.stage_ids_of_rank(mesh.get_local_rank("pp"), config.num_stages, PP, config.style)
    stages = [pipe.build_stage(i, "cpu", dp_mesh=mesh, data_parallel=config.data_parallel,
                               activation_checkpointing=config.activation_checkpointing) for i in ids]
    submods = [st.submod for st in stages]
    params = rank_parameters(stages)
    opt = torch.optim.AdamW(list(params.values()), lr=LR)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR)
    report = {"loss": None, "grad": {}, "param": {}, "names": sorted(params),
              "wrapped": [type(st.submod).__name__ for st in stages]}
    sched = None
    for step, (inputs, labels) in enumerate(batches):
        local = local_batch({**inputs, "labels": labels}, mesh)
        local_labels = local.pop("labels")
        loss_fn = fxpp.causal_lm_loss(local_labels, M, dp_mesh=mesh)  # this step's global token count
        sched = make_schedule(config.schedule, stages if sched is None else sched.stages, M, loss_fn)
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        losses = []
        sched.step(**local, target=local_labels, losses=losses)
        ref_loss = reference_step_dp(ref, inputs, labels, fxpp.causal_lm_loss(labels, DP * M), DP, M)
        if step == 0:
            if any(st.is_last for st in stages):
                # Each replica's share; the dp group of a last stage holds only last stages.
                share = loss_fn.whole_batch(losses).reshape(1)
                dist.all_reduce(share, group=mesh["dp"].get_group())
                report["loss"] = _diff(share[0], ref_loss)
            for name, p in params.items():
                report["grad"][name] = (_diff(_full(p.grad), ref.get_parameter(name).grad) if p.grad is not None
                                        else "missing")
            ref_grads = [p.grad for p in ref.parameters() if p.grad is not None]
            report["norm"] = (float(fxpp.clip_grad_norm_(stages, float("inf"))),  # measures only
                              float(torch.nn.utils.get_total_norm(ref_grads)), sum(g.numel() for g in ref_grads))
        opt.step()
        ref_opt.step()
    for name, p in params.items():
        report["param"][name] = _diff(_full(p), ref.get_parameter(name))
    report["rebuilt"] = [st is not old for st, old in zip(sched.stages, stages)]
    report["same_modules"] = all(st.submod is sub for st, sub in zip(sched.stages, submods))
    report["model_untouched"] = all(type(p) is torch.nn.Parameter for p in model.parameters())
    return report


def _errors(mesh) -> dict:
    """The refusals, each expected on every rank without communication (so nothing hangs)."""
    from torch.distributed.device_mesh import init_device_mesh

    import fxpp
    from fxpp.runtime.parallel import pp_dp_mesh
    from fxpp.runtime.schedule import make_schedule
    from fxpp.testing.zoo import tiny_model

    def error_of(fn):
        try:
            fn()
        except fxpp.StageSpecError as e:
            return str(e)
        return None

    pipe = fxpp.pipeline(tiny_model("llama", 4), PP, example_inputs={"input_ids": torch.ones(2, 8, dtype=torch.long)})
    named_otherwise = init_device_mesh("cpu", (PP, DP), mesh_dim_names=("data", "model"))
    me = mesh.get_local_rank("pp")
    out = {
        "pp*dp != world": error_of(lambda: pp_dp_mesh(3, 2)),
        "dims not pp/dp": error_of(lambda: pipe.build_stage(me, "cpu", dp_mesh=named_otherwise)),
        "1-D dp mesh, no group": error_of(lambda: pipe.build_stage(me, "cpu", dp_mesh=mesh["dp"])),
        "bad data_parallel": error_of(lambda: pipe.build_stage(me, "cpu", dp_mesh=mesh, data_parallel="ddp")),
    }
    pipe.build_stage(me, "cpu", dp_mesh=mesh)
    out["wrapped twice"] = error_of(lambda: pipe.build_stage(me, "cpu", dp_mesh=mesh, data_parallel="replicate"))

    # A tied weight sharded over dp on the first stage but whole on the last: its two
    # holders cannot exchange shard for shard. Both raise, after the check's own
    # messages are matched, so the ranks go on to the next configuration.
    tied = fxpp.pipeline(tiny_model("llama", 4, tie_word_embeddings=True).train(), PP,
                         example_inputs={"input_ids": torch.ones(2, 8, dtype=torch.long)})
    stage = tied.build_stage(me, "cpu", group=mesh["pp"].get_group(), dp_mesh=mesh if me == 0 else None)
    inputs, labels = _batch(4, 8)
    sched = make_schedule("1F1B", [stage], 2, fxpp.causal_lm_loss(labels, 2))
    try:
        sched.step(**inputs, target=labels)
    except fxpp.FxppError as e:
        out["tie shards differ"] = str(e)
    return out


def pp_dp_rank(rank, world, workdir, configs):
    from fxpp.runtime.parallel import pp_dp_mesh

    mesh = pp_dp_mesh(PP, DP)
    return {"errors": _errors(mesh), **{c.name: _run_config(mesh, c) for c in configs}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(pp_dp_rank, PP * DP, tmp_path_factory.mktemp("pp_dp"), CONFIGS, timeout_s=240,
                           pg_timeout_s=60)


# Parameters after two AdamW steps, in ulps of each tensor's largest entry. The only
# rounding difference left is the tied weight's gradient (the two copies added in
# another order: within 1 ulp of each element's terms), and AdamW amplifies it where an
# element's gradient is small. Measured without fxpp: the unpatched model stepped as
# reference_step_dp with the tied gradient of the first step perturbed at random by up
# to 1 ulp of each element, 12 seeds: up to 96 ulps (model.layers.3.self_attn.q_proj;
# the pipelines: up to 36). 2x margin. A missing or doubled gradient contribution
# moves AdamW's update by order lr = 1e-2, ~1e5 ulps here; a wrong scale is caught by
# the gradients, which AdamW would hide.
PARAM_ULPS = 192


@pytest.mark.timeout(300)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_pipeline_times_data_parallel_matches_unpatched_model(runs, config):
    per_rank = [r[config.name] for r in runs]
    assert any(r["loss"] is not None for r in per_rank)
    for rank, r in enumerate(per_rank):
        assert r["model_untouched"], f"rank {rank}: the user's model was wrapped"
        assert all(w.startswith("FSDP" if config.data_parallel == "fsdp" else "Replicate") for w in r["wrapped"])
        if r["loss"] is not None:
            # Per-microbatch losses as the reference's (same float32 forward, same scale
            # dp * M); summed per replica, then over the replicas: one ulp per microbatch.
            _assert_within(r["loss"], DP * M, f"rank {rank} loss")
        for name, d in r["grad"].items():
            assert d != "missing", f"rank {rank} grad {name} missing"
            if config.tie:
                # The tied weight's two copies: each summed over the microbatches, then
                # added (the reference: both per microbatch, then the microbatches). The
                # bound of test_runtime._check for DP * M microbatches (measured: 0.4).
                _assert_within(d, 2 * DP * M, f"rank {rank} grad {name}")
            else:
                # The same float32 operations in the same order, divisions by powers of
                # two (FSDP's average over dp = 2, scale_grads by M = 2): bitwise equal.
                assert d[0] == 0.0, f"rank {rank} grad {name} differs by {d[0]:.3g}"
        for name, d in r["param"].items():
            if config.tie:
                _assert_within(d, PARAM_ULPS, f"rank {rank} param {name} after {STEPS} AdamW steps")
            else:
                assert d[0] == 0.0, f"rank {rank} param {name} after {STEPS} AdamW steps differs by {d[0]:.3g}"
        if config.reshape:
            assert all(r["rebuilt"]), "a new sequence length rebuilds the stages"
        assert r["same_modules"], "a rebuilt stage must reuse the wrapped module"
    # fxpp.clip_grad_norm_'s global norm: FSDP shards reduced over dp, the pipeline's
    # ranks summed, a tied weight once. The same on every rank; against the reference,
    # the bound of test_optim (gradient differences of 2 * DP * M ulps of each tensor's
    # max, plus the norm's own float32 sum in another order).
    assert len({r["norm"][0] for r in per_rank}) == 1, [r["norm"] for r in per_rank]
    got, ref, n = per_rank[0]["norm"]
    rtol = (2 * DP * M + 1) * torch.finfo(torch.float32).eps * n ** 0.5
    assert abs(got - ref) <= rtol * ref, f"global grad norm {got} against the unpatched model's {ref}"
    names = set().union(*(r["names"] for r in per_rank))
    if config.tie:
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= names


@pytest.mark.timeout(300)
def test_activation_checkpointing_is_numerically_identical(runs):
    """Recomputing each layer replays the same float32 program: ZBV (whose input and
    weight backwards recompute a layer twice) with and without it report the same
    differences to the same reference, to the bit."""
    with_ac = Config("ZBVZeroBubble", 4, "v", True, "fsdp", True).name
    without = Config("ZBVZeroBubble", 4, "v", True, "fsdp", False).name
    for r in runs:
        assert r[with_ac]["grad"] == r[without]["grad"] and r[with_ac]["param"] == r[without]["param"]


@pytest.mark.timeout(300)
def test_bad_mesh_is_refused_on_every_rank(runs):
    for rank, r in enumerate(runs):
        errors = r["errors"]
        assert "pp_dp_mesh(pp=3, dp=2): pp * dp = 6, but the world has 4 ranks" in errors["pp*dp != world"], rank
        assert "mesh has dimensions ('data', 'model'); fxpp needs a mesh with dimensions named among ('pp', 'dp', " \
            "'tp'), in that order" in errors["dims not pp/dp"], rank
        assert "a mesh without a 'pp' dimension (here ('dp',)) needs the pipeline group too" \
            in errors["1-D dp mesh, no group"], rank
        assert "data_parallel='ddp' must be one of ('fsdp', 'replicate')" in errors["bad data_parallel"], rank
        assert "would wrap it twice" in errors["wrapped twice"], rank
        held = ["shape [128, 64], local [64, 64], sharded on dim 0 over 2 rank(s)",
                "shape [128, 64], local [128, 64], replicated over 1 rank(s)"]
        if rank >= DP:  # the last stage's ranks (pp index 1) hold it whole
            held.reverse()
        assert (f"the tied weight {'model.embed_tokens.weight' if rank < DP else 'lm_head.weight'} is held as "
                f"{held[0]} here but as {held[1]} on rank ") in errors["tie shards differ"], (rank, errors)

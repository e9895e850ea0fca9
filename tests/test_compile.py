"""Compiled stages (``build_stage(..., compile=...)``): every schedule, zero-bubble included, on gloo.

Each rank compiles its stages' decoder layers with CPU inductor and steps a torch
schedule; every rank compares its own gradients (and the last stage its loss) with two
references stepped on the same microbatches with the same loss and scaling
(``tests/test_runtime.reference_step``):

* the unpatched model with its layers compiled the same way in the same process
  (``layer.compile()``): the same inductor kernels for the same shapes (the compiled
  code is shared by signature, and the compile counts below show no other signature),
  so what remains is the order in which float32 sums are added, exactly as for eager
  stages: the bounds of ``tests/test_runtime._check`` (a split backward that lost or
  doubled a weight gradient half is off by the gradient itself, ~1e7 ulps);
* the unpatched eager model: inductor fuses elementwise chains and reorders reductions,
  see ``EAGER_REL`` for the bound.

Inductor compiles take tens of seconds on two cores the first time (later runs read
the on-disk compile cache that every test, rank and schedule shares), so the multi-rank
cases are ``heavy`` (the README's second command); the main suite keeps one fast case
that never runs inductor.
"""

from __future__ import annotations

import pytest
import torch

import fxpp
from fxpp.runtime.schedule import make_schedule
from fxpp.testing.zoo import tiny_model

from .dist import run_distributed
from .helpers import make_inputs, rank_parameters
from .test_runtime import SCHEDULES, reference_step

EPS = torch.finfo(torch.float32).eps
MICROBATCHES = 4
SEQS = (8, 12, 8)  # the build's length, a new one (one more compile), the first again (none)
# Compiled stages against the eager unpatched model, relative to max |reference|.
# Inductor computes the same float32 ops but fuses elementwise chains and reorders
# the reductions (RMSNorm's mean over 64, softmax's sums over <= 12 keys, the MLP's
# and attention's matmuls stay aten/mkldnn calls): each reduction of n terms may round
# differently by up to (n - 1) eps of its terms' magnitudes, n <= 128 here (the MLP's
# intermediate size). The backward of the 4 layers chains ~8 such reductions per layer,
# ~32 in series, plus the loss's log-softmax over the 128-word vocabulary: 32 * 127 eps
# ~ 4.8e-4 relative as a worst case. 1e-3 gives it a 2x margin; measured (1F1B, ZBVZeroBubble,
# activation checkpointing): up to 1.6e-6.
# A wrong or missing half of a split backward is off by the gradient itself (relative 1).
EAGER_REL = 1e-3


def _batch(seq: int):
    inputs = make_inputs(8, seq, padding="left", seed=seq)
    return inputs, inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)


def _layers(module):
    return [m for m in module.modules() if type(m).__name__.endswith("DecoderLayer")]


def compiled_rank(rank, world, workdir, schedule, num_stages, style, backend, options):
    torch.manual_seed(0)
    model = tiny_model("llama", 4).train()
    eager_ref = tiny_model("llama", 4).train()
    compiled_ref = tiny_model("llama", 4).train()
    inputs, labels = _batch(SEQS[0])
    mb = {k: v[: v.shape[0] // MICROBATCHES] for k, v in inputs.items()}
    pipe = fxpp.pipeline(model, num_stages, example_inputs=mb)
    ids = fxpp.stage_ids_of_rank(rank, num_stages, world, style)
    stages = [pipe.build_stage(i, "cpu", style=style, compile=backend, **options) for i in ids]
    report = {"optimized_modules": [type(m).__name__ for st in stages for m in st.submod.modules()
                                    if isinstance(m, torch._dynamo.OptimizedModule)],
              "compiled_layers": sum(getattr(layer, "_fxpp_compiled", None) == backend for st in stages
                                     for layer in _layers(st.submod)),
              "user_layers_compiled": sum(layer._compiled_call_impl is not None or "forward" in vars(layer)
                                          or hasattr(layer, "_fxpp_compiled") for layer in _layers(model)),
              "steps": []}
    try:  # another compile than the first build's is another wrapping: refused, never applied twice
        pipe.build_stage(ids[0], "cpu", style=style, compile="aot_eager", **options)
        report["rebuild_refused"] = None
    except fxpp.StageSpecError as e:
        report["rebuild_refused"] = str(e)
    for layer in _layers(compiled_ref):
        layer.compile(backend=backend, dynamic=False)
    params = rank_parameters(stages)
    sched = None
    for seq in SEQS:
        inputs, labels = _batch(seq)
        loss_fn = fxpp.causal_lm_loss(labels, MICROBATCHES)
        if sched is None:
            sched = make_schedule(schedule, stages, MICROBATCHES, loss_fn)
        sched.loss_fn = loss_fn
        for p in params.values():
            p.grad = None
        before = fxpp.compile_stats()
        losses = []
        sched.step(**inputs, target=labels, losses=losses)
        after = fxpp.compile_stats()
        row = {"seq": seq, "compiles": after["compiles"] - before["compiles"],
               "graphs": after["graphs"] - before["graphs"], "graph_breaks": after["graph_breaks"],
               "backward_compiles": after["backward_compiles"] - before["backward_compiles"], "vs": {}}
        for which, ref in (("compiled", compiled_ref), ("eager", eager_ref)):
            ref.zero_grad(set_to_none=True)
            ref_loss = reference_step(ref, inputs, labels, loss_fn, MICROBATCHES)
            diffs = {"loss": _diff(loss_fn.whole_batch(losses), ref_loss) if any(st.is_last for st in stages) else None,
                     "grad": {n: _diff(p.grad, ref.get_parameter(n).grad) if p.grad is not None else "missing"
                              for n, p in params.items()}}
            row["vs"][which] = diffs
        report["steps"].append(row)
    report["total"] = fxpp.compile_stats()
    return report


def _diff(got, ref):
    got = got.full_tensor() if hasattr(got, "full_tensor") else got  # FSDP2 (mixed precision): a DTensor
    return float((got.detach().float() - ref.detach()).abs().max()), float(ref.detach().abs().max())


def _check(reports, *, eager_rel=EAGER_REL, compiled_ulps=True):
    assert any(s["vs"]["eager"]["loss"] is not None for r in reports for s in r["steps"])
    for rank, r in enumerate(reports):
        assert r["optimized_modules"] == [], r["optimized_modules"]
        assert r["compiled_layers"] >= 1 and r["user_layers_compiled"] == 0
        assert "would wrap it twice" in r["rebuild_refused"] and "compile='aot_eager'" in r["rebuild_refused"]
        first, second, third = r["steps"]
        # One compile per distinct layer signature (every llama layer shares one), one more at
        # a new sequence length (static shapes, Note [compiled stages]), none for a length seen before.
        assert first["compiles"] == 1 and second["compiles"] == 1 and third["compiles"] == 0, r["steps"]
        # ... and each compile captured the whole layer as one graph: nothing fell back to eager.
        assert [s["graphs"] for s in r["steps"]] == [1, 1, 0] and third["graph_breaks"] == 0, r["steps"]
        for step in r["steps"]:
            for which, diffs in step["vs"].items():
                where = f"rank {rank} seq {step['seq']} vs {which}"
                items = list(diffs["grad"].items()) + ([("loss", diffs["loss"])] if diffs["loss"] else [])
                for name, d in items:
                    assert d != "missing", f"{where}: grad {name} missing"
                    diff, scale = d
                    if which == "eager":
                        bound = eager_rel * scale
                    elif name == "loss":
                        bound = MICROBATCHES * EPS * scale  # tests/test_runtime._check's loss bound
                    else:
                        bound = 2 * MICROBATCHES * EPS * scale  # and its gradient bound
                    if which == "eager" or compiled_ulps:
                        assert diff <= bound, (f"{where}: {name} differs by {diff:.3g}, over {bound:.3g} "
                                               f"(|ref| {scale:.3g})")


@pytest.mark.heavy  # CPU inductor on two ranks, seven schedules: the README's second command
@pytest.mark.timeout(900)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_compiled_stages_match_under_every_schedule(schedule, tmp_path):
    ranks, stages, style = SCHEDULES[schedule]
    reports = run_distributed(compiled_rank, ranks, tmp_path, schedule, stages, style, "inductor", {},
                              timeout_s=840, pg_timeout_s=600)
    _check(reports)


def test_compiled_layers_leave_the_model_alone_and_refusals_name_the_problem():
    """In process, nothing compiled yet (torch compiles at the first call): the shells, the
    stage torch's zero-bubble schedules accept, and the refusals."""
    from types import SimpleNamespace

    from torch.distributed.pipelining.schedules import _check_torch_compile_compatibility

    from fxpp.runtime.compiled import compile_backend, compile_layers, own_layer_shells
    from fxpp.runtime.parallel import decoder_layer_modules

    with pytest.raises(fxpp.CompileError, match="'nope' is not a torch.compile backend"):
        compile_backend("nope")
    with pytest.raises(fxpp.CompileError, match="must be True, False or a torch.compile backend name"):
        compile_backend(1)
    assert compile_backend(True) == "inductor" and compile_backend(False) is None
    model = tiny_model("llama", 2)
    stage = fxpp.pipeline(model, 1).stages[0].with_fields()
    users = {id(m) for m in model.modules()}
    layers = own_layer_shells(stage, decoder_layer_modules(stage), users)
    compile_layers(layers, "eager")
    assert [n for n, _ in layers] == ["model.layers.0", "model.layers.1"]
    for (name, shell), mine in zip(layers, model.model.layers):
        assert shell is not mine and type(shell) is type(mine) and stage.get_submodule(name) is shell
        assert shell._compiled_call_impl is not None and mine._compiled_call_impl is None
        assert dict(shell.named_parameters()) == dict(mine.named_parameters())  # the same Parameter objects
    assert not any(isinstance(m, torch._dynamo.OptimizedModule) for m in stage.modules())
    _check_torch_compile_compatibility([SimpleNamespace(submod=stage)], "ZBVZeroBubble")  # accepted
    with pytest.raises(RuntimeError, match="not supported with stage modules that have used torch.compile"):
        _check_torch_compile_compatibility([SimpleNamespace(submod=torch.compile(stage))], "ZBVZeroBubble")


@pytest.mark.heavy
@pytest.mark.timeout(900)
def test_compiled_stages_with_activation_checkpointing_under_zero_bubble(tmp_path):
    ranks, stages, style = SCHEDULES["ZBVZeroBubble"]
    reports = run_distributed(compiled_rank, ranks, tmp_path, "ZBVZeroBubble", stages, style, "inductor",
                              {"activation_checkpointing": True}, timeout_s=840, pg_timeout_s=600)
    # The checkpoint runs eagerly around the layer's compiled forward (Note [compiled stages]),
    # the same compiled program as the compiled reference's layers: the ulps bounds hold
    # (measured: bitwise equal; against eager 9.2e-7 relative).
    _check(reports)


# bf16 compute (FSDP2's MixedPrecisionPolicy over the rank alone, fully_shard after the
# compile) against the fp32 references: bf16 keeps 8 significant bits (eps 2^-7 = 7.8e-3);
# every matmul output and the hidden states crossing each layer are rounded to it, ~4
# roundings in series per layer's gradient path, 4 eps = 3.1e-2 relative; 5e-2 (the
# bound fxpp run uses for bf16 losses) leaves a margin (measured: up to 1.8e-2, the same
# against the compiled and the eager reference). A lost gradient half is off by 1.
BF16_REL = 5e-2


@pytest.mark.heavy
@pytest.mark.timeout(900)
def test_compiled_stages_with_bf16_mixed_precision_under_zero_bubble(tmp_path):
    ranks, stages, style = SCHEDULES["ZBVZeroBubble"]
    reports = run_distributed(compiled_rank, ranks, tmp_path, "ZBVZeroBubble", stages, style, "inductor",
                              {"mixed_precision": "bf16"}, timeout_s=840, pg_timeout_s=600)
    _check(reports, eager_rel=BF16_REL, compiled_ulps=False)


def _fxpp_run(argv, capsys):
    from fxpp.trainer.cli import main  # the trainer room: only the command-line cases need it

    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err + out.out
    return out.out


@pytest.mark.heavy
@pytest.mark.timeout(900)
def test_fxpp_run_compile_check_matches_under_zbv(tmp_path, capsys):
    from fxpp.trainer.metrics import read_metrics  # as above

    metrics = tmp_path / "m.jsonl"
    out = _fxpp_run(["run", "tiny-llama", "--stages", "2", "--schedule", "ZBVZeroBubble", "--steps", "3", "--compile",
                     "--check", "--log-every", "3", "--metrics", str(metrics)], capsys)
    assert out.count("MATCH") == 2 and "MISMATCH" not in out, out  # losses and gradient norms
    assert "compiled decoder layers (inductor): r0 1 compiles (1 graphs, 0 graph breaks)" in out, out
    (record,) = read_metrics(str(metrics))
    assert (record["compiles"], record["graphs"], record["graph_breaks"]) == (1, 1, 0) and record["compile_s"] > 0


@pytest.mark.heavy
@pytest.mark.timeout(900)
def test_fxpp_run_compile_with_fsdp_matches(tmp_path, capsys):
    out = _fxpp_run(["run", "tiny-llama", "--stages", "2", "--dp", "2", "--schedule", "1F1B", "--steps", "2",
                     "--compile"], capsys)
    assert out.count("MATCH") == 2 and "MISMATCH" not in out, out

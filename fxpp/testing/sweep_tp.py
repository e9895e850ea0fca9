"""The causal sweep's ``tp`` column: each family with a tensor-parallel plan, pp 2 x tp 2 on 4 gloo ranks.

Terms
-----
precheck
    In the sweep's own process, on the family's tiny model: ``check_model(model, 2)``
    (:mod:`fxpp.runtime.tensor_parallel`), which refuses by name what tp 2 cannot split
    (no plan, a style fxpp does not apply, heads tp does not divide, ...). Only families
    it accepts, and whose single-process pipeline passed, go to the ranks.
tp run
    ONE spawn of 4 CPU processes (gloo, ``fxpp.pp_dp_tp_mesh(2, 1, 2)``) loops over
    those families (process start-up and imports cost more than a tiny model's step).
    Each rank rebuilds the family's tiny model exactly as the sweep does (same seed),
    builds ``fxpp.pipeline(model, 2, cuts=[1])`` on a microbatch, its own stage with
    ``build_stage(pp rank, "cpu", mesh=mesh)`` and takes one 1F1B step of 2 microbatches
    (4 x 8 tokens, the first row left-padded) with ``fxpp.causal_lm_loss``. The
    reference is the unpatched model in the same process, run on the same microbatches
    with the same loss, gradients accumulated and divided by 2 as the schedule does. The
    last stage's loss and every gradient of the rank's stage (``.full_tensor()`` of a
    sharded one) are compared at the sweep's ``atol=rtol=1e-4``.

Statuses (:data:`TP_STATUSES`): ``pass``; ``mismatch`` (a number differs: the worst
tensor named); ``refused`` (an ``FxppError`` at the precheck, at build_stage on any rank
(every rank hears it before the step) or after the step, its reason quoted); ``no plan`` (the model has no tp plan); ``error`` (any other exception,
or the spawn died on the family); ``not run`` (the single-process pipeline did not pass,
or the model was not built).

A family that hangs a collective fails the spawn (the process group's 60 s timeout);
the families after it run in a fresh spawn.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..errors import FxppError, TensorParallelError
from ..pipeline import pipeline
from ..runtime.loss import causal_lm_loss
from ..runtime.parallel import pp_dp_tp_mesh
from ..runtime.schedule import make_schedule
from ..runtime.tensor_parallel import check_model
from ..trainer.launch import run_ranks
from .check import ATOL, RTOL, make_inputs

PP, TP, M = 2, 2, 2
TP_STATUSES = ("pass", "mismatch", "refused", "no plan", "error", "not run")
TP_MARKS = {"pass": "✓", "mismatch": "≠", "refused": "✗", "no plan": "–", "error": "✗!", "not run": "·"}
RESULTS = "tp_results.jsonl"


def precheck(model: torch.nn.Module) -> tuple[str, str] | None:
    """``(status, reason)`` where tp 2 refuses ``model`` before any rank starts, else None (to be run)."""
    try:
        check_model(model, TP)
    except TensorParallelError as e:
        message = str(e).removeprefix("fxpp.runtime.tensor_parallel: ")
        return ("no plan" if "has no tensor-parallel plan" in message else "refused"), message
    return None


def _model_output(out, loss_fn):
    aux = getattr(out, "aux_loss", None)
    return (out.logits, aux) if loss_fn.aux_loss_coef is not None and aux is not None else out.logits


def _close(got: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    diff = float((got.double() - ref.double()).abs().max()) if got.numel() else 0.0
    return torch.allclose(got.double(), ref.double(), atol=ATOL, rtol=RTOL, equal_nan=True), diff


def check_family_tp(mesh, model_type: str, class_name: str, build: Callable) -> dict[str, Any]:
    """This rank's part of one family's tp run: ``{"status", "detail", "diff"}`` (module docstring)."""
    model = build(model_type, class_name)
    inputs = make_inputs(2 * M, 8, seed=5)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    microbatch = {k: v[: v.shape[0] // M] for k, v in inputs.items()}
    built: dict[str, Any] = {"status": "pass"}
    try:
        pipe = pipeline(model, PP, cuts=[1], example_inputs=microbatch)
        stage = pipe.build_stage(mesh.get_local_rank("pp"), "cpu", mesh=mesh)
    except Exception as e:  # noqa: BLE001 - agreed on below, reported in the column
        built = {"status": "refused" if isinstance(e, FxppError) else "error",
                 "detail": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", "diff": None}
    # A refusal can be one stage's (a stage the plan names nothing of): every rank hears it
    # before any steps, else the other stage's ranks would wait for it in the step.
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, built)
    failed = [(rank, b) for rank, b in enumerate(every) if b["status"] != "pass"]
    if failed:
        rank, b = failed[0]
        return {**b, "detail": f"rank {rank}: {b['detail']}"}  # the same on every rank
    loss_fn = causal_lm_loss(labels, M, model=model)
    losses: list[torch.Tensor] = []
    try:  # after the step: the unplanned parameters' check (Note [unplanned parameters])
        make_schedule("1F1B", [stage], M, loss_fn).step(**inputs, target=labels, losses=losses)
    except FxppError as e:
        return {"status": "refused", "detail": f"{type(e).__name__}: {e}", "diff": None}
    model.zero_grad(set_to_none=True)
    ref_losses = []
    chunks = zip(*(torch.tensor_split(v, M) for v in inputs.values()))
    for values, target in zip(chunks, torch.tensor_split(labels, M)):  # the schedule's microbatches and loss
        loss = loss_fn(_model_output(model(**dict(zip(inputs, values)), use_cache=False), loss_fn), target)
        loss.backward()
        ref_losses.append(loss.detach())
    worst, bad = 0.0, []
    if stage.is_last:
        ok, diff = _close(loss_fn.whole_batch(losses), loss_fn.whole_batch(ref_losses))
        worst = max(worst, diff)
        if not ok:
            bad.append(("(loss)", diff))
    for name, p in sorted(stage.submod.named_parameters()):  # the same order on both tp ranks (full_tensor)
        ref = model.get_parameter(name).grad
        if p.grad is None or ref is None:
            if (p.grad is None) != (ref is None):  # both None: a parameter no loss reaches (a frozen bias)
                bad.append((f"{name} (a gradient on one side only)", math.inf))
            continue
        got = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        # The schedule divides the microbatches' summed gradients by M (scale_grads); so does the reference.
        ok, diff = _close(got, ref / M)
        worst = max(worst, diff)
        if not ok:
            bad.append((name, diff))
    if bad:
        name, diff = max(bad, key=lambda b: b[1])
        return {"status": "mismatch", "detail": f"{len(bad)} tensor(s) differ, worst {name} by {diff:.3g}",
                "diff": diff}
    return {"status": "pass", "detail": f"max diff {worst:.3g}", "diff": worst}


def tp_rank(rank: int, world: int, workdir: str, families: list[tuple[str, str]], build: Callable) -> None:
    """Every family in order on this rank; rank 0 appends each family's merged result to ``RESULTS``."""
    mesh = pp_dp_tp_mesh(PP, 1, TP)
    for model_type, class_name in families:
        try:
            mine = check_family_tp(mesh, model_type, class_name, build)
        except Exception as e:  # noqa: BLE001 - reported in the column
            root = e
            while root.__cause__ is not None:  # torch's stage wraps the model's error with its inputs' dump
                root = root.__cause__
            mine = {"status": "error", "detail": f"{type(root).__name__}: {' '.join(str(root).split())[:300]}",
                    "diff": None, "traceback": traceback.format_exc()}
        # This rank's own result first: where another rank is stuck in a collective, the
        # gather below fails, and the driver reads the cause here.
        with open(os.path.join(workdir, f"tp_rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps({"family": model_type, **mine}) + "\n")
        every: list[Any] = [None] * world
        dist.all_gather_object(every, mine)
        merged = _merge(every)
        if rank == 0:
            with open(os.path.join(workdir, RESULTS), "a") as f:
                f.write(json.dumps({"family": model_type, **merged}) + "\n")


def _merge(per_rank: list[dict]) -> dict:
    """The family's result from its ranks': the worst status (a rank's mismatch or error is the family's)."""
    order = ("error", "mismatch", "refused", "pass")
    worst = min(per_rank, key=lambda r: order.index(r["status"]))
    if worst["status"] == "pass":
        diff = max(r["diff"] for r in per_rank)
        return {"status": "pass", "detail": f"max diff {diff:.3g}", "diff": diff}
    rank = per_rank.index(worst)
    detail = worst["detail"] if worst["detail"].startswith("rank ") else f"rank {rank}: {worst['detail']}"
    return {"status": worst["status"], "detail": detail, "diff": worst.get("diff")}


def _cause(workdir: str, family: str) -> str | None:
    """The first rank's own error on ``family`` (its file), where one rank raised and another hung."""
    for rank in range(PP * TP):
        path = os.path.join(workdir, f"tp_rank{rank}.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                mine = [json.loads(line) for line in f if line.strip()]
            if mine and mine[-1]["family"] == family and mine[-1]["status"] != "pass":
                return f"rank {rank}: {mine[-1]['detail']}"
    return None


def tp_column(families: list[tuple[str, str]], build: Callable, *, seconds_per_family: float = 120.0,
              progress: Callable | None = None) -> dict[str, dict]:
    """The tp run of ``families`` (``(model_type, class_name)``): ``{model_type: {"status", "detail"}}``.

    ``build(model_type, class_name)`` builds the family's tiny model (module level:
    it is pickled into the ranks). A spawn that dies or times out marks the family it
    was on ``error`` and the rest run in a fresh spawn.
    """
    results: dict[str, dict] = {}
    left = list(families)
    with tempfile.TemporaryDirectory(prefix="fxpp_sweep_tp_") as workdir:
        while left:
            for name in (RESULTS, *(f"tp_rank{r}.jsonl" for r in range(PP * TP))):
                if os.path.exists(os.path.join(workdir, name)):
                    os.remove(os.path.join(workdir, name))
            path = os.path.join(workdir, RESULTS)
            failure = None
            try:
                ranks = run_ranks(tp_rank, PP * TP, left, build, workdir=workdir, threads=1, pg_timeout_s=60,
                                  timeout_s=60 + seconds_per_family * len(left))
                failure = next((r["error"] for r in ranks if not r["ok"]), None)
            except TimeoutError as e:
                failure = str(e)
            done = []
            if os.path.exists(path):
                with open(path) as f:
                    done = [json.loads(line) for line in f]
            for r in done:
                results[r["family"]] = r
                if progress is not None:
                    progress(r)
            left = left[len(done):]
            if left:  # the spawn stopped on left[0]
                cause = _cause(workdir, left[0][0]) or " ".join(str(failure).split())[:300]
                results[left[0][0]] = {"family": left[0][0], "status": "error",
                                       "detail": f"the 4-rank run failed on it: {cause}"}
                if progress is not None:
                    progress(results[left[0][0]])
                left = left[1:]
    return results

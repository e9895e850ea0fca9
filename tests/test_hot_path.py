"""No host read per microbatch in a steady-state step.

On CUDA every ``Tensor.item`` / ``Tensor.tolist`` (and every ``bool``/``int`` of a
tensor) waits for the device: a read per microbatch stalls the CPU that should be
queueing the next microbatch's kernels. Counted here on CPU, on 2 gloo ranks, in the
second step of a schedule (the first traces and builds): the count with 8 microbatches
equals the count with 2, on every rank.

Only reads made by fxpp's own code are counted (the caller's file is in the ``fxpp``
package). The model's own code reads as the unpatched model does: transformers' SDPA
mask builder asks ``padding_mask.all()`` on every call (``_ignore_causal_mask_sdpa``),
and every stage builds the masks of its layers (they never cross a cut).
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

import fxpp
from fxpp.testing.zoo import tiny_model

from .dist import run_distributed
from .test_runtime import _batch

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
FXPP_DIR = os.path.dirname(fxpp.__file__) + os.sep


@contextlib.contextmanager
def counting_host_reads(counts: dict):
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        def read(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(FXPP_DIR):
                counts[name] = counts.get(name, 0) + 1
            return originals[name](self, *args, **kwargs)
        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counted(name))
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def reads_rank(rank, world, workdir, schedule, num_stages, style):
    out = {}
    for m in (2, 8):
        torch.manual_seed(0)
        model = tiny_model("llama", 4, tie_word_embeddings=True).train()
        inputs, labels = _batch(batch=2 * m, seq=8)
        pipe = fxpp.pipeline(model, num_stages, example_inputs={k: v[:2] for k, v in inputs.items()})
        stages = [pipe.build_stage(i, "cpu", style=style) for i in fxpp.stage_ids_of_rank(rank, num_stages, world, style)]
        sched = fxpp.schedule(schedule, stages, m, fxpp.causal_lm_loss(labels, m))
        sched.step(**inputs, target=labels)  # the first step traces the variants and builds
        with counting_host_reads({}) as counts:
            sched.step(**inputs, target=labels)
        out[m] = counts
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule,num_stages,style", [("1F1B", 2, "loop"), ("ZBVZeroBubble", 4, "v")])
def test_host_reads_do_not_grow_with_microbatches(schedule, num_stages, style, tmp_path):
    reports = run_distributed(reads_rank, 2, tmp_path, schedule, num_stages, style, timeout_s=240)
    for rank, r in enumerate(reports):
        assert r[8] == r[2], f"rank {rank}: host reads per step with 2 microbatches {r[2]}, with 8 {r[8]}"


def redo_rank(rank, world, workdir):
    """A step whose later microbatch's header is made to differ: it is run again, reading every header."""
    from fxpp.layout import CutLayout

    from .test_runtime import _diff, reference_step

    torch.manual_seed(0)
    model = tiny_model("llama", 4, tie_word_embeddings=True).train()
    ref = tiny_model("llama", 4, tie_word_embeddings=True).train()
    inputs, labels = _batch(batch=8, seq=8)
    pipe = fxpp.pipeline(model, 2, example_inputs={k: v[:2] for k, v in inputs.items()})
    stage = pipe.build_stage(rank, "cpu")
    loss_fn = fxpp.causal_lm_loss(labels, 4)
    sched = fxpp.schedule("1F1B", [stage], 4, loss_fn)
    original = CutLayout.unpack_as

    def differing(self, args, where, known):  # as if the sender had filled other slots for this microbatch
        out = original(self, args, where, known)
        forged = known.later[-1].clone()
        forged[2] ^= 1  # the header's first word of filled slots
        known.later[-1] = forged
        return out

    CutLayout.unpack_as = differing
    try:
        losses: list = []
        sched.step(**inputs, target=labels, losses=losses)
    finally:
        CutLayout.unpack_as = original
    reference_step(ref, inputs, labels, loss_fn, 4)
    return {"reads_every_header": sched._reads_every_header, "losses": len(losses),
            "grad": {n: _diff(p.grad, ref.get_parameter(n).grad) for n, p in stage.submod.named_parameters()}}


@pytest.mark.timeout(300)
def test_a_step_whose_headers_differ_is_run_again_reading_every_header(tmp_path):
    from .test_runtime import _assert_within

    for rank, r in enumerate(run_distributed(redo_rank, 2, tmp_path, timeout_s=240)):
        assert r["reads_every_header"], rank
        if rank == 1:
            assert r["losses"] == 4, "the first attempt's losses are dropped"
        for name, d in r["grad"].items():
            # the bound of test_runtime._check: 2 ulps per microbatch; a gradient counted
            # twice (the first attempt's kept) would be off by its whole size
            _assert_within(d, 2 * 4, f"rank {rank} grad {name}")


# Tensor calls that only read metadata (no op, no kernel): not counted below.
_METADATA = {"__get__", "dim", "numel", "is_floating_point", "size", "stride", "data_ptr"}


def test_a_receiving_stage_makes_few_ops_around_its_graph():
    """Inside a step, a middle stage's call of a later microbatch runs a handful of small ops
    around its graph: one split of the packed tensor and a view per filled slot of more than one
    dimension to read, one cat (and a flat reshape per slot) to send, and no header comparison
    (that is made once at the step's end: KnownHeader.differed). Each such op is a dispatcher
    call per microbatch; with the caches cold after a layer's kernels, tens of microseconds each
    on this CPU (benchmarks/bench_efficiency.py reports the dispatch time per step)."""
    from torch.overrides import TorchFunctionMode

    class Counting(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            if name not in _METADATA:
                self.ops.append(name)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = tiny_model("llama", 4).train()
    inputs, _ = _batch(batch=2, seq=8)
    pipe = fxpp.pipeline(model, 3, example_inputs=inputs)
    first, middle = (pipe.stages[i].with_fields(ignore_model_kwargs=i > 0) for i in (0, 1))
    sent = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in first(**inputs))
    graph_output = {}
    call = middle._call

    def graph_once(variant, args, kwargs):  # the graph's own ops are the model's, not counted
        if "out" not in graph_output:
            graph_output["out"] = call(variant, args, kwargs)
        return graph_output["out"]

    object.__setattr__(middle, "_call", graph_once)
    middle.begin_step(True)
    middle(*sent)  # the step's first microbatch: reads the header on the host
    later = tuple(t.detach().clone().requires_grad_(t.is_floating_point()) for t in sent)  # its own buffers
    with Counting() as counting:
        middle(*later)
    assert not middle.end_step()
    ops = counting.ops
    assert ops.count("split_with_sizes") == 1 and ops.count("cat") == 1, ops
    assert not {"ne", "eq", "any", "__or__", "to", "clone"} & set(ops), ops
    # read: split + a view per 2-d slot (the mask); send: a reshape per 2-d packed slot, cat
    assert len(ops) <= 2 + 2 * len(middle.out_layout.packed_slots), ops

"""Predicted peak memory of each rank of a pipeline, per stage and per kind.

Terms
-----
static
    What a stage holds all step: parameters (each at its dtype; the last stage's own copy
    of a tied weight counts there), gradients of the trainable ones, optimizer state
    (AdamW: two moments like each parameter plus a 4-byte step per tensor; SGD: none).
    With ``dp`` replicas under FSDP the gradients and optimizer state are ``1/dp`` and the
    parameters a ``1/dp`` shard plus the whole stage's unsharded copy (fxpp keeps it for
    the step, ``reshard_after_forward=False``); ``replicate`` keeps everything whole. With
    ``tp`` everything parameter-sized is ``1/tp`` (norms are in fact replicated: a small
    underestimate).
buffers
    torch's ``PipelineStage`` allocates, per microbatch of the step, a receive buffer for
    what crosses the stage's first cut and one for the gradients of what crosses its last
    cut; they live from the first step on.
activations
    Per microbatch held (``fxpp.analysis.schedule_order``): the saved bytes of the stage's
    blocks (Note [stage activations]) and what it sends on (kept for its backward).
logits
    On the last stage, per microbatch held: the logits (kept as the stage's output) and
    the fp32 log-softmax the cross entropy saves, until the microbatch's input backward
    (Note [logits after the input backward]); while its backward runs, two more fp32
    buffers of that size (the gradients of the log-softmax's output and input) and, for
    logits not in fp32, the gradient cast back. With ``keep_outputs`` (torch's
    ``step(return_outputs=True)``, the default) the schedule keeps every microbatch's
    logits until the next step, and at the end of the step concatenates them (a second
    copy of the whole batch's logits).
optimizer step
    After the pipeline, the optimizer's temporaries: AdamW's single-tensor loop (the CPU
    default) two tensors the size of the largest parameter, its foreach path (the CUDA
    default) one copy of all the stage's parameters.

A rank's peak is the largest of: the pipeline at each moment of the rank's action list
(static + buffers + what each of its stages holds then), the end-of-step concatenation,
and the optimizer step.

Note [stage activations]
------------------------
A stage ``[a, b)`` keeps per microbatch: the own saved bytes of its blocks (prelude on
the first stage, head on the last), plus each *inherited* saved value once: a value
every stage recomputes (rotary ``cos``/``sin``, masks) once per stage, a value made on
this stage (the previous layer's output) once. A value made on an earlier stage arrives
in a receive buffer (counted under buffers) and costs nothing more; model inputs are
the caller's. What crosses the stage's last cut and was made here is held as its output.

Note [logits after the input backward]
--------------------------------------
A zero-bubble schedule splits the last stage's backward into ``I`` and ``W``. ``I``
(torch's ``stage_backward_input``) runs the loss's backward down to the stage's inputs,
keeping only the gradients at the outputs of weight-using operations for ``W`` (the
head's: one logits-sized fp32 gradient, in ``weight_grads_kept``), then detaches the
loss: the cross entropy's graph goes, and with it the fp32 log-softmax it saved. The
logits themselves were held by the schedule's forward cache, which ``I`` empties; only
``step(return_outputs=True)``'s output list keeps them longer. So a microbatch between
its ``I`` and its ``W`` holds neither (``benchmarks/bench_memory_plan.py``, Qwen with
the 151,936-token vocabulary, ZBVZeroBubble, ``return_outputs=False``, rank 0: predicted
75.5 MiB over the measured peak without this at commit 55d8cb4, one microbatch's logits;
-0.02 % with it). A full backward (``B``) frees them at its end the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule
from torch.utils._pytree import tree_flatten

from ..errors import StageSpecError
from .annotate import info
from .cuts import crossing_values
from .memory import BlockMemory, block_memory, value_bytes
from .schedule_order import Moment, rank_moments, rank_of_stages

OPTIMIZERS = ("adamw", "sgd", "none")
DATA_PARALLEL = ("fsdp", "replicate")
KINDS = ("params", "grads", "optimizer", "buffers", "activations", "logits", "transient")


@dataclass(frozen=True)
class MemorySettings:
    """How the pipeline trains: everything the memory model needs beyond the graph.

    Args:
        schedule: a ``torch.distributed.pipelining`` schedule name (``"1F1B"``, ...).
        num_microbatches: microbatches per step.
        optimizer: ``"adamw"`` (two moments per parameter), ``"sgd"`` or ``"none"``.
        dp, tp: data- and tensor-parallel degrees; data_parallel: ``"fsdp"`` or ``"replicate"``.
        keep_outputs: the steps keep and return the last stage's outputs (torch's
            ``step(return_outputs=True)``, the default); ``fxpp run`` steps with ``False``.
        foreach: AdamW's foreach path; ``None``: torch's default for the device (CUDA).
    """

    schedule: str = "1F1B"
    num_microbatches: int = 4
    optimizer: str = "adamw"
    dp: int = 1
    tp: int = 1
    data_parallel: str = "fsdp"
    keep_outputs: bool = True
    foreach: bool | None = None

    def __post_init__(self):
        for name in ("num_microbatches", "dp", "tp"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise StageSpecError(f"{name}={v!r} must be a positive integer")
        if self.optimizer not in OPTIMIZERS:
            raise StageSpecError(f"optimizer={self.optimizer!r} must be one of {', '.join(OPTIMIZERS)}")
        if self.data_parallel not in DATA_PARALLEL:
            raise StageSpecError(f"data_parallel={self.data_parallel!r} must be 'fsdp' or 'replicate'")


@dataclass(frozen=True)
class StageMemory:
    """One stage's share of its rank's predicted peak, in bytes, by kind (see the module glossary)."""

    stage: int
    rank: int
    layers: range
    params: int
    grads: int
    optimizer: int
    buffers: int
    activations: int
    logits: int
    transient: int

    @property
    def total(self) -> int:
        return sum(getattr(self, k) for k in KINDS)


@dataclass(frozen=True)
class RankMemory:
    rank: int
    peak: int
    phase: str  # "pipeline", "end of step" or "optimizer step"
    stages: tuple[StageMemory, ...]


class MemoryModel:
    """Per-range memory terms of one traced model, and the peak of a whole split.

    Built once per pipeline (:func:`memory_model`); every query is arithmetic.
    """

    def __init__(self, blocks: list[BlockMemory], cuts: dict[int, list[tuple[str, int, int]]], logits: tuple[int, int],
                 settings: MemorySettings, device: torch.device):
        self.blocks = blocks
        self.num_layers = len(blocks) - 2
        self.cuts = cuts  # k -> [(node name, bytes, gradient bytes)]
        self.logits_bytes, self.logits_numel = logits
        self.settings = settings
        self.device = torch.device(device)
        self._act: dict[tuple[int, int], int] = {}
        self._moments: dict[int, dict[int, list[Moment]]] = {}

    # -- per range -------------------------------------------------------------
    def _range_blocks(self, a: int, b: int) -> list[BlockMemory]:
        return ([self.blocks[0]] if a == 0 else []) + self.blocks[1 + a:1 + b] + (
            [self.blocks[-1]] if b == self.num_layers else [])

    def activations(self, a: int, b: int) -> int:
        """Bytes one microbatch keeps on stage ``[a, b)`` for its backward (Note [stage activations])."""
        key = (a, b)
        if key not in self._act:
            total, counted = 0, set()
            for block in self._range_blocks(a, b):
                total += block.own_saved
                for ref, (nbytes, pos, remat) in block.inherited.items():
                    here = remat or (pos == -1 and a == 0) or a <= pos < b
                    if pos >= -1 and here and ref not in counted:
                        counted.add(ref)
                        total += nbytes
            if b < self.num_layers:
                names = {name for name, _ in counted}
                for name, nbytes, _ in self.cuts[b]:
                    if name not in names and not self._received(name, a):
                        total += nbytes
            self._act[key] = total
        return self._act[key]

    def _received(self, name: str, a: int) -> bool:
        return a > 0 and any(n == name for n, _, _ in self.cuts[a])

    def static(self, a: int, b: int) -> tuple[int, int, int]:
        """``(params, grads, optimizer)`` bytes of stage ``[a, b)``."""
        s = self.settings
        blocks = self._range_blocks(a, b)
        params = sum(x.param_bytes for x in blocks) // s.tp
        trainable = sum(x.trainable_bytes for x in blocks) // s.tp
        grads = trainable
        state = 2 * trainable if s.optimizer == "adamw" else 0
        if s.optimizer == "adamw":
            state += 4 * self._trainable_tensors(blocks)
        if s.dp > 1 and s.data_parallel == "fsdp":
            params, grads, state = params + params // s.dp, grads // s.dp, state // s.dp
        return params, grads, state

    @staticmethod
    def _trainable_tensors(blocks) -> int:
        return sum(b.trainable_tensors for b in blocks)

    def buffers(self, a: int, b: int) -> int:
        m = self.settings.num_microbatches
        recv = sum(nb for _, nb, _ in self.cuts[a]) if a > 0 else 0
        grad = sum(g for _, _, g in self.cuts[b]) if b < self.num_layers else 0
        return m * (recv + grad)

    def optimizer_temporaries(self, blocks: list[BlockMemory]) -> int:
        if self.settings.optimizer != "adamw":
            return 0
        foreach = self.settings.foreach if self.settings.foreach is not None else self.device.type == "cuda"
        if foreach:
            return sum(b.trainable_bytes for b in blocks) // self.settings.tp
        return 2 * max((b.largest_param for b in blocks), default=0) // self.settings.tp

    # -- a whole split ---------------------------------------------------------
    def moments(self, num_stages: int) -> dict[int, list[Moment]]:
        if num_stages not in self._moments:
            self._moments[num_stages] = rank_moments(self.settings.schedule, num_stages,
                                                     self.settings.num_microbatches)
        return self._moments[num_stages]

    def rank_memory(self, ranges: list[range], rank: int) -> RankMemory:
        """The predicted peak of ``rank`` when the stages cover ``ranges`` (all of them)."""
        n = len(ranges)
        owner = rank_of_stages(self.settings.schedule, n)
        mine = [s for s in range(n) if owner[s] == rank]
        m = self.settings.num_microbatches
        keep = self.settings.keep_outputs
        last = n - 1
        fixed = {s: (*self.static(ranges[s].start, ranges[s].stop), self.buffers(ranges[s].start, ranges[s].stop))
                 for s in mine}
        base = sum(sum(v) for v in fixed.values())
        act = {s: self.activations(ranges[s].start, ranges[s].stop) for s in mine}
        kept_for_w = {s: sum(b.weight_grads_kept for b in self._range_blocks(ranges[s].start, ranges[s].stop))
                      for s in mine}
        largest = {s: max(b.largest_param for b in self._range_blocks(ranges[s].start, ranges[s].stop)) // self.settings.tp
                   for s in mine}
        lf = 4 * self.logits_numel
        cast = self.logits_bytes if self.logits_bytes != lf else 0
        best = (-1, "pipeline", {s: (0, 0, 0) for s in mine})
        for moment in self.moments(n)[rank]:
            held = dict(moment.held)
            done = dict(moment.done)
            split = dict(moment.split)
            parts = {}
            for s in mine:
                h = held.get(s, 0)
                logits = transient = 0
                if s == last:
                    # Note [logits after the input backward]
                    live = h - split.get(s, 0)
                    kept = done.get(s, h) if keep else live
                    logits = kept * self.logits_bytes + live * lf
                    if moment.backward == s and moment.kind in ("B", "I"):
                        transient = 2 * lf + cast
                if moment.backward == s and moment.kind == "W" and s != 0:
                    # torch's stage_backward_weight: the weight gradients of a parameter group
                    # are made whole, then added to .grad (the largest parameter's at least)
                    transient = largest[s]
                parts[s] = (h * act[s] + split.get(s, 0) * kept_for_w[s], logits, transient)
            total = base + sum(sum(p) for p in parts.values())
            if total > best[0]:
                best = (total, "pipeline", parts)
        blocks = [blk for s in mine for blk in self._range_blocks(ranges[s].start, ranges[s].stop)]
        kept_all = m * self.logits_bytes if keep and last in mine else 0
        opt = base + kept_all + self.optimizer_temporaries(blocks)
        if opt > best[0]:
            best = (opt, "optimizer step", {s: (0, kept_all if s == last else 0,
                                                self.optimizer_temporaries(blocks) if s == mine[0] else 0)
                                            for s in mine})
        if keep and last in mine and base + 2 * kept_all > best[0]:
            best = (base + 2 * kept_all, "end of step", {s: (0, 2 * kept_all if s == last else 0, 0) for s in mine})
        stages = tuple(StageMemory(s, rank, ranges[s], *fixed[s], *best[2][s]) for s in mine)
        return RankMemory(rank, best[0], best[1], stages)

    def split_memory(self, ranges: list[range]) -> list[RankMemory]:
        world = max(rank_of_stages(self.settings.schedule, len(ranges))) + 1
        return [self.rank_memory(ranges, r) for r in range(world)]


def memory_model(gm: GraphModule, num_layers: int, settings: MemorySettings, device: torch.device | str,
                 example_values: dict | None = None, layer_modules=None) -> MemoryModel:
    """The :class:`MemoryModel` of a canonical traced graph whose example is one microbatch."""
    device = torch.device(device)
    blocks = block_memory(gm, num_layers, device, example_values, layer_modules)
    cuts = {}
    for k in range(1, num_layers):
        rows = []
        for node in crossing_values(gm.graph, k):
            flat = [t for t in tree_flatten(node.meta.get("val"))[0] if isinstance(t, torch.Tensor)]
            nbytes = sum(t.numel() * t.element_size() for t in flat)
            grad = sum(t.numel() * t.element_size() for t in flat if t.dtype.is_floating_point and t.requires_grad)
            rows.append((node.name, nbytes, grad))
        cuts[k] = rows
    out = next(n for n in gm.graph.nodes if n.op == "output")
    logits = tree_flatten(out.args[0])[0]
    logits_node = next((n for n in logits if hasattr(n, "meta") and info(n).role == "head"), None)
    val = logits_node.meta.get("val") if logits_node is not None else None
    logits_info = (value_bytes(val), val.numel()) if isinstance(val, torch.Tensor) else (0, 0)
    return MemoryModel(blocks, cuts, logits_info, settings, device)

"""Memory-aware cuts and the memory table: what ``fxpp.pipeline(..., memory_limit=)`` and
``fxpp plan --memory-per-rank`` do with the memory model of ``fxpp.analysis.stage_memory``.

The search (``fxpp.split``) minimises the slowest stage's estimated time among the splits
whose every rank's predicted peak is within the limit. With one stage per rank (GPipe,
1F1B) a rank's peak depends on its own range only, and the dynamic program over
consecutive ranges is exact; with two stages per rank the ranks couple stages ``r`` and
``r + world`` (or ``2 world - 1 - r``), and ``fxpp.split.constrained_split`` searches the
cuts exactly instead.
"""

from __future__ import annotations

import torch

from ..errors import MemoryLimitError, StageSpecError
from ..meta import trace_record
from ..split import SearchTooLarge, balanced_split, constrained_split, even_split
from ..trace import find_decoder_layers
from .schedule_order import rank_of_stages, schedule_class, stages_per_rank
from .stage_memory import KINDS, MemoryModel, MemorySettings, memory_model

GiB = 1024 ** 3
MiB = 1024 ** 2


def _positive_int(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise StageSpecError(f"{name}={v!r} must be a positive integer")


def microbatch_example(model: torch.nn.Module, example_inputs: dict | None, microbatch, schedule, memory_limit,
                       num_stages: int) -> dict | None:
    """Validate the memory arguments of ``fxpp.pipeline``; the example inputs of one microbatch.

    Raises:
        StageSpecError: a memory limit without a schedule or a microbatch, a bad value.
    """
    if memory_limit is not None:
        if isinstance(memory_limit, bool) or not isinstance(memory_limit, (int, float)) or memory_limit <= 0:
            raise StageSpecError(f"memory_limit={memory_limit!r} must be a positive number of bytes per rank")
        if schedule is None or microbatch is None:
            raise StageSpecError("memory_limit needs schedule=NAME and microbatch=(batch, seq): the peak depends on "
                                 "how many microbatches of which shape each rank holds")
    if schedule is not None:
        schedule_class(schedule)
        if num_stages % stages_per_rank(schedule):
            raise StageSpecError(f"schedule {schedule!r} places 2 stages on every rank; num_stages={num_stages} is odd")
    if microbatch is None:
        return example_inputs
    if not (isinstance(microbatch, (tuple, list)) and len(microbatch) == 2):
        raise StageSpecError(f"microbatch={microbatch!r} must be (batch, seq) of one microbatch")
    for name, v in zip(("batch", "seq"), microbatch):
        _positive_int(f"microbatch {name}", v)
    batch, seq = microbatch
    if example_inputs is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tokens = example_inputs.get("input_ids", example_inputs.get("inputs_embeds"))
    if tokens is not None and tuple(tokens.shape[:2]) != (batch, seq):
        raise StageSpecError(f"microbatch={tuple(microbatch)} but example_inputs' tokens have shape "
                             f"{list(tokens.shape[:2])}: give one microbatch of that shape, or leave one out")
    return example_inputs


def memory_model_for(model: torch.nn.Module, model_graph, settings: MemorySettings, device=None) -> MemoryModel:
    """The memory model of a traced pipeline (the device: ``device``, the model's, or CUDA for a meta model)."""
    if device is None:
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        device = dev if dev.type != "meta" else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, layers = find_decoder_layers(model)
    example = trace_record(model_graph).example_inputs
    values = {k: v for k, v in example.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    return memory_model(model_graph, len(layers), settings, device, values, list(layers))


def _fits(model: MemoryModel, num_stages: int, limit: float):
    """A ``prefix_fits`` for :func:`constrained_split`, and a ``stage_fits`` for one stage per rank."""
    owner = rank_of_stages(model.settings.schedule, num_stages)
    cache: dict = {}

    def rank_peak(rank: int, ranges: list) -> int:
        key = (rank, tuple((r.start, r.stop) for s, r in enumerate(ranges) if owner[s] == rank))
        if key not in cache:
            cache[key] = model.rank_memory(ranges, rank).peak
        return cache[key]

    def stage_fits(k: int, a: int, b: int) -> bool:
        ranges = [range(0)] * num_stages
        ranges[k] = range(a, b)
        return rank_peak(k, ranges) <= limit

    def prefix_fits(prefix: list[range]) -> bool:
        k = len(prefix) - 1
        rank = owner[k]
        mine = [s for s in range(num_stages) if owner[s] == rank]
        if max(mine) != k:  # the rank's other stages are still open: its static part so far
            return sum(sum(model.static(prefix[s].start, prefix[s].stop)) for s in mine if s <= k) <= limit
        return rank_peak(rank, prefix + [range(0)] * (num_stages - len(prefix))) <= limit

    return stage_fits, prefix_fits


def _search(model: MemoryModel, costs, num_stages: int, limit: float) -> list[range] | None:
    layer = [c.flops for c in costs[1:-1]]
    stage_fits, prefix_fits = _fits(model, num_stages, limit)
    if stages_per_rank(model.settings.schedule) == 1:
        return balanced_split(layer, num_stages, first_extra=costs[0].flops, last_extra=costs[-1].flops,
                              layer_params=[c.params for c in costs[1:-1]], stage_fits=stage_fits)
    return constrained_split(layer, num_stages, prefix_fits, first_extra=costs[0].flops, last_extra=costs[-1].flops)


def check_ranges_fit(model: MemoryModel, ranges: list[range], limit: float) -> None:
    """Refuse cuts whose predicted peak exceeds ``limit`` bytes on some rank.

    Raises:
        MemoryLimitError: naming the rank with the highest peak, its stages and the peak.
    """
    over = [r for r in model.split_memory(ranges) if r.peak > limit]
    if over:
        worst = max(over, key=lambda r: r.peak)
        raise MemoryLimitError(
            f"the cuts given put a predicted peak of {format_bytes(worst.peak)} on rank {worst.rank} "
            f"(stages {', '.join(str(s.stage) for s in worst.stages)}), over memory_limit={format_bytes(limit)}; "
            "leave the cuts to fxpp or raise the limit")


def memory_aware_ranges(model: MemoryModel, costs, num_stages: int, limit: float) -> list[range]:
    """The cuts under ``limit`` bytes per rank.

    Raises:
        MemoryLimitError: no split fits (naming the smallest stage count that does, or none).
    """
    try:
        found = _search(model, costs, num_stages, limit)
    except SearchTooLarge as e:
        raise MemoryLimitError(f"the memory-aware search for {num_stages} stages of {model.settings.schedule} gave up "
                               f"({e}); give cuts= yourself or use a one-stage-per-rank schedule") from e
    if found is not None:
        return found
    smallest = _smallest_fitting(model, costs, num_stages, limit)
    lowest = _lowest_peak(model, num_stages)
    hint = (f"the smallest stage count that fits is {smallest} ({smallest // stages_per_rank(model.settings.schedule)}"
            f" ranks)" if smallest is not None else
            (f"no stage count from {num_stages + stages_per_rank(model.settings.schedule)} to {model.num_layers} fits"
             if num_stages < model.num_layers else "no stage count fits: every layer has a stage already"))
    raise MemoryLimitError(
        f"no split of {model.num_layers} layers into {num_stages} stages with {model.settings.schedule}, "
        f"{model.settings.num_microbatches} microbatches keeps every rank within memory_limit="
        f"{format_bytes(limit)} (the best split's largest predicted peak is {format_bytes(lowest)}); {hint}. "
        "Use more stages, smaller microbatches, or a larger limit")


def _lowest_peak(model: MemoryModel, num_stages: int) -> float:
    lo, hi = 0, max(r.peak for r in model.split_memory(even_split(model.num_layers, num_stages)))
    while hi - lo > max(hi // 1000, 1):  # to 0.1 %: the message's precision
        mid = (lo + hi) // 2
        stage_fits, prefix_fits = _fits(model, num_stages, mid)
        try:
            ok = _fits_at_all(model, num_stages, stage_fits, prefix_fits)
        except SearchTooLarge:
            return float(hi)
        lo, hi = (lo, mid) if ok else (mid, hi)
    return float(hi)


def _fits_at_all(model, num_stages, stage_fits, prefix_fits) -> bool:
    zeros = [0.0] * model.num_layers
    if stages_per_rank(model.settings.schedule) == 1:
        return balanced_split(zeros, num_stages, stage_fits=stage_fits) is not None
    return constrained_split(zeros, num_stages, prefix_fits) is not None


def _smallest_fitting(model: MemoryModel, costs, num_stages: int, limit: float) -> int | None:
    step = stages_per_rank(model.settings.schedule)
    for n in range(num_stages + step, model.num_layers + 1, step):
        try:
            model.moments(n)
            stage_fits, prefix_fits = _fits(model, n, limit)
            if _fits_at_all(model, n, stage_fits, prefix_fits):
                return n
        except (StageSpecError, SearchTooLarge):
            continue  # this count cannot run with these microbatches, or could not be decided
    return None


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def format_memory_plan(model: MemoryModel, ranges: list[range], costs: list[float], limit: float | None = None) -> str:
    """The per-stage table of ``fxpp plan``: time share and predicted peak with its breakdown."""
    s = model.settings
    total = sum(costs) or 1.0
    rows = [f"memory per rank: {s.schedule}, {s.num_microbatches} microbatches, optimizer {s.optimizer}"
            + (f", dp {s.dp} ({s.data_parallel})" if s.dp > 1 else "") + (f", tp {s.tp}" if s.tp > 1 else "")
            + f", device {model.device.type}" + (f", limit {format_bytes(limit)}" if limit else ""),
            f"{'rank':>4}  {'stage':>5}  {'layers':<9}  {'time':>6}  " + "  ".join(f"{k:>11}" for k in KINDS)
            + f"  {'rank peak':>11}  at"]
    for r in model.split_memory(ranges):
        for i, st in enumerate(r.stages):
            peak = f"{format_bytes(r.peak):>11}  {r.phase}" if i == 0 else ""
            flag = " OVER" if limit and r.peak > limit and i == 0 else ""
            rows.append(f"{r.rank:>4}  {st.stage:>5}  {st.layers.start:>3}-{st.layers.stop - 1:<5}  "
                        f"{costs[st.stage] / total:>6.1%}  " + "  ".join(f"{format_bytes(getattr(st, k)):>11}"
                                                                          for k in KINDS) + f"  {peak}{flag}")
    return "\n".join(rows)

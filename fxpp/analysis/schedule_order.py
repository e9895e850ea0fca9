"""How many microbatches each stage holds at once, read off torch's own schedule order.

Terms
-----
held
    Microbatches whose forward ran on a stage and whose backward has not finished
    (full backward ``B``, or weight backward ``W`` after an input backward ``I``): their
    activations are alive. ``split`` counts those between ``I`` and ``W`` (zero-bubble
    schedules), which also keep the gradients ``W`` will need.
moment
    A point of a rank's action list where memory can peak: the end of a forward (the new
    microbatch's activations exist) or a backward under way (its microbatch still held).

Nothing runs: each schedule class is built with placeholder stages (it only reads their
indices and group size) and its ``pipeline_order`` (multi-stage schedules) or
``_get_pipeline_order()`` (GPipe, 1F1B) is replayed. So the counts follow whatever the
installed torch release schedules, not a formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.pipelining import schedules

from ..errors import StageSpecError

V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")


@dataclass(frozen=True)
class Moment:
    """Per local stage (by stage id): microbatches held, those between ``I`` and ``W``, and
    forwards done this step; ``backward``: the stage whose backward is under way (``None``
    after a forward)."""

    held: tuple[tuple[int, int], ...]
    split: tuple[tuple[int, int], ...]
    done: tuple[tuple[int, int], ...]
    backward: int | None
    kind: str = "F"  # the action under way: F, B (full backward), I or W


class _PlaceholderStage:
    """What a torch schedule's constructor reads of a stage (no module, no process group)."""

    def __init__(self, index: int, num_stages: int, world: int, rank: int):
        self.stage_index, self.num_stages, self.group_size, self.group_rank = index, num_stages, world, rank
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.submod = torch.nn.Identity()
        self.stage_index_to_group_rank: dict = {}


def schedule_class(name: str):
    cls = getattr(schedules, f"Schedule{name}", None)
    if cls is None or not isinstance(cls, type):
        raise StageSpecError(f"schedule={name!r} is not a schedule of torch.distributed.pipelining")
    return cls


def stages_per_rank(name: str) -> int:
    return 2 if issubclass(schedule_class(name), schedules.PipelineScheduleMulti) else 1


def rank_of_stages(name: str, num_stages: int) -> list[int]:
    """The rank of each stage: loop placement, or V for ZBVZeroBubble and DualPipeV."""
    world = num_stages // stages_per_rank(name)
    if name in V_SCHEDULES:
        return [s if s < world else 2 * world - 1 - s for s in range(num_stages)]
    return [s % world for s in range(num_stages)]


def pipeline_order(name: str, num_stages: int, num_microbatches: int) -> dict[int, list]:
    """torch's action list of every rank for ``num_stages`` stages (two per rank for multi-stage schedules)."""
    per = stages_per_rank(name)
    if num_stages % per:
        raise StageSpecError(f"schedule {name} places {per} stages on every rank; num_stages={num_stages} is odd")
    world = num_stages // per
    ranks = rank_of_stages(name, num_stages)
    local = [s for s in range(num_stages) if ranks[s] == 0]
    stages = [_PlaceholderStage(s, num_stages, world, 0) for s in local]
    cls = schedule_class(name)
    try:
        if per == 1:
            order = cls(stages[0], n_microbatches=num_microbatches)._get_pipeline_order()
        else:
            order = cls(stages, n_microbatches=num_microbatches).pipeline_order
    except (ValueError, AssertionError) as e:
        raise StageSpecError(f"schedule {name} with {num_stages} stages and {num_microbatches} microbatches: {e}") from e
    if order is None:
        raise StageSpecError(f"schedule {name} publishes no action order; fxpp cannot count what it holds")
    return order


def _actions(action):
    """The compute steps of one action, an overlapped forward/backward as its forward then its backward."""
    if action is None:
        return []
    sub = getattr(action, "sub_actions", None)
    if sub:
        return [a for s in sub for a in _actions(s)]
    kind = action.computation_type.value
    if kind in ("F", "B", "I", "W"):
        return [(kind, action.stage_index)]
    return []


def rank_moments(name: str, num_stages: int, num_microbatches: int) -> dict[int, list[Moment]]:
    """Every rank's moments (see the module glossary), in the order the rank runs them."""
    out: dict[int, list[Moment]] = {}
    for rank, actions in sorted(pipeline_order(name, num_stages, num_microbatches).items()):
        held: dict[int, int] = {}
        split: dict[int, int] = {}
        done: dict[int, int] = {}
        moments: list[Moment] = []

        def snap(backward, kind):
            moments.append(Moment(tuple(sorted(held.items())), tuple(sorted(split.items())),
                                  tuple(sorted(done.items())), backward, kind))

        for action in actions:
            for kind, s in _actions(action):
                held.setdefault(s, 0)
                split.setdefault(s, 0)
                done.setdefault(s, 0)
                if kind == "F":
                    held[s] += 1
                    done[s] += 1
                    snap(None, kind)
                elif kind == "B":
                    snap(s, kind)
                    held[s] -= 1
                elif kind == "I":
                    snap(s, kind)
                    split[s] += 1
                else:  # W: the graph kept since I is freed now
                    snap(s, kind)
                    held[s] -= 1
                    split[s] -= 1
        out[rank] = moments
    return out


def peak_held(name: str, num_stages: int, num_microbatches: int) -> list[int]:
    """Each stage's largest number of microbatches held at once."""
    peaks = [0] * num_stages
    for moments in rank_moments(name, num_stages, num_microbatches).values():
        for m in moments:
            for s, n in m.held:
                peaks[s] = max(peaks[s], n)
    return peaks

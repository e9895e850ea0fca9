"""Choosing cuts: plain arithmetic over per-layer costs, no process groups."""

from __future__ import annotations

from .errors import StageSpecError


def even_split(num_layers: int, num_stages: int) -> list[range]:
    """Consecutive ranges of as equal a layer count as possible, larger ones first."""
    if not isinstance(num_stages, int) or num_stages < 1:
        raise StageSpecError(f"num_stages={num_stages!r} must be a positive integer")
    if num_stages > num_layers:
        raise StageSpecError(
            f"num_stages={num_stages} is more than the model's {num_layers} decoder layers; every stage needs a layer"
        )
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for i in range(num_stages):
        stop = start + base + (1 if i < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def ranges_from_cuts(num_layers: int, cuts: list[int]) -> list[range]:
    """``cuts=[2, 5]`` on 8 layers gives ``[range(0, 2), range(2, 5), range(5, 8)]``."""
    bounds = [0, *cuts, num_layers]
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise StageSpecError(
            f"cuts={cuts!r} must be strictly increasing layer indices between 1 and {num_layers - 1}"
        )
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def roles_for(num_stages: int) -> list[str]:
    if num_stages == 1:
        return ["full"]
    return ["first"] + ["middle"] * (num_stages - 2) + ["last"]

"""Choosing cuts: plain arithmetic over per-layer costs, no process groups.

The exact balanced partition: split ``L`` layers into ``k`` consecutive stages so that
the most expensive stage is as cheap as possible, where the first stage also pays
for the prelude (embeddings, vision tower) and the last for the head. A dynamic
program over (stages, layers) finds the optimum in ``O(k * L^2)``; ties go to the
split with the smallest largest-stage parameter count, then to the earliest cuts, so
the same costs always give the same cuts.
"""

from __future__ import annotations

from .errors import StageSpecError


def even_split(num_layers: int, num_stages: int) -> list[range]:
    """Consecutive ranges of as equal a layer count as possible, larger ones first."""
    check_counts(num_layers, num_stages)
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for i in range(num_stages):
        stop = start + base + (1 if i < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def check_counts(num_layers: int, num_stages: int) -> None:
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise StageSpecError(f"num_stages={num_stages!r} must be a positive integer")
    if num_stages > num_layers:
        raise StageSpecError(
            f"num_stages={num_stages} is more than the model's {num_layers} decoder layers; every stage needs a layer"
        )


def ranges_from_cuts(num_layers: int, cuts: list[int]) -> list[range]:
    """``cuts=[2, 5]`` on 8 layers gives ``[range(0, 2), range(2, 5), range(5, 8)]``."""
    bounds = [0, *cuts, num_layers]
    if any(not isinstance(c, int) for c in cuts) or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise StageSpecError(
            f"cuts={cuts!r} must be strictly increasing layer indices between 1 and {num_layers - 1}"
        )
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def ranges_from_counts(num_layers: int, layers_per_stage: list[int]) -> list[range]:
    """``layers_per_stage=[3, 3, 2]`` on 8 layers."""
    if sum(layers_per_stage) != num_layers or any(n < 1 for n in layers_per_stage):
        raise StageSpecError(
            f"layers_per_stage={layers_per_stage!r} must be positive counts summing to the model's {num_layers} layers"
        )
    cuts, total = [], 0
    for n in layers_per_stage[:-1]:
        total += n
        cuts.append(total)
    return ranges_from_cuts(num_layers, cuts)


def balanced_split(layer_costs: list[float], num_stages: int, *, first_extra: float = 0.0, last_extra: float = 0.0,
                   layer_params: list[int] | None = None, stage_fits=None) -> list[range] | None:
    """The split minimising the slowest stage (see the module docstring).

    ``stage_fits(k, a, b)``: whether stage ``k`` may hold layers ``[a, b)`` (a memory
    limit); then only such stages are considered, and ``None`` means no split fits.
    """
    n = len(layer_costs)
    check_counts(n, num_stages)
    params = layer_params or [0] * n
    prefix = [0.0]
    pprefix = [0]
    for c, p in zip(layer_costs, params):
        prefix.append(prefix[-1] + c)
        pprefix.append(pprefix[-1] + p)

    def cost(a: int, b: int, first: bool, last: bool) -> float:
        return prefix[b] - prefix[a] + (first_extra if first else 0.0) + (last_extra if last else 0.0)

    inf = (float("inf"), float("inf"))
    # best[k][j]: (max stage cost, max stage params) for layers[0:j] in k stages; choice[k][j]: start of stage k.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    choice = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0)
    for k in range(1, num_stages + 1):
        for j in range(k, n - (num_stages - k) + 1):
            for i in range(k - 1, j):
                prev = best[k - 1][i]
                if prev == inf or (stage_fits is not None and not stage_fits(k - 1, i, j)):
                    continue
                c = cost(i, j, k == 1, k == num_stages)
                cand = (max(prev[0], c), max(prev[1], pprefix[j] - pprefix[i]))
                if cand < best[k][j]:
                    best[k][j] = cand
                    choice[k][j] = i
    if best[num_stages][n] == inf:
        return None
    bounds = [n]
    j = n
    for k in range(num_stages, 0, -1):
        j = choice[k][j]
        bounds.append(j)
    bounds.reverse()
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class SearchTooLarge(Exception):
    """The constrained search visited its node budget without an answer (see :func:`constrained_split`)."""


def constrained_split(layer_costs: list[float], num_stages: int, prefix_fits, *, first_extra: float = 0.0,
                      last_extra: float = 0.0, max_nodes: int = 200_000) -> list[range] | None:
    """The split minimising the slowest stage among those whose every prefix ``prefix_fits``.

    For constraints that couple non-adjacent stages (a rank holding stages ``r`` and
    ``r + world``): ``prefix_fits(ranges)`` judges the first ``len(ranges)`` stages and must
    be monotone (a prefix that fails fails with any continuation). Exact: a binary
    search over every stage cost that can occur for the smallest bound ``T`` that some
    fitting split meets, each bound decided by a depth-first search over the cuts
    (stages cost at most ``T``). ``None``: no split fits.

    Raises:
        SearchTooLarge: one bound needed more than ``max_nodes`` search steps.
    """
    n = len(layer_costs)
    check_counts(n, num_stages)
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int) -> float:
        return prefix[b] - prefix[a] + (first_extra if a == 0 else 0.0) + (last_extra if b == n else 0.0)

    def feasible(bound: float) -> list[range] | None:
        visited = 0

        def go(k: int, start: int, ranges: list[range]) -> list[range] | None:
            nonlocal visited
            if k == num_stages:
                return list(ranges) if start == n else None
            stops = [n] if k == num_stages - 1 else range(start + 1, n - (num_stages - k - 1) + 1)
            for stop in stops:
                if cost(start, stop) > bound:
                    continue
                visited += 1
                if visited > max_nodes:
                    raise SearchTooLarge(f"more than {max_nodes} partial splits")
                ranges.append(range(start, stop))
                if prefix_fits(ranges):
                    found = go(k + 1, stop, ranges)
                    if found is not None:
                        return found
                ranges.pop()
            return None

        return go(0, 0, [])

    bounds = sorted({cost(a, b) for a in range(n) for b in range(a + 1, n + 1)})
    if feasible(float("inf")) is None:
        return None
    lo, hi = 0, len(bounds) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(bounds[mid]) is not None:
            hi = mid
        else:
            lo = mid + 1
    return feasible(bounds[lo])


def roles_for(num_stages: int) -> list[str]:
    if num_stages == 1:
        return ["full"]
    return ["first"] + ["middle"] * (num_stages - 2) + ["last"]

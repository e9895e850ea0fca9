"""Measured memory on CPU: the allocator's own reports, each at the moment it happened.

What the memory model of ``fxpp.analysis.stage_memory`` is checked against
(``benchmarks/bench_memory_plan.py``, ``tests/test_memory_plan.py``).

Terms
-----
report
    One allocation (positive bytes) or free (negative) of the CPU allocator, as
    ``torch.profiler.profile(profile_memory=True)`` records it: the raw ``[memory]``
    records of ``prof.profiler.kineto_results``, each with its own timestamp.
running sum
    The sum of the reports up to a moment: the bytes allocated since the profiler started
    and still alive then. Its largest value is the peak above what was alive before.

Note [allocator timeline]
-------------------------
``prof.events()`` folds each report into the innermost event under way when it
happened (``cpu_memory_usage`` / ``self_cpu_memory_usage``), so *when* inside that event
it happened is lost. A free in Python code between two operators, e.g. AdamW's
single-tensor loop dropping one parameter's ``sqrt`` and ``div`` temporaries before the
next parameter's, is then only known to lie somewhere in ``Optimizer.step``: placed at
the event's end, the step seems to hold every parameter's temporaries at once (the sum
over parameters, not the largest). Sorting the raw reports by their own timestamps gives
the allocator's real timeline.
"""

from __future__ import annotations

import torch


def allocator_reports(prof) -> list[tuple[float, int]]:
    """``[(microseconds since the profiler started, bytes)]`` of every CPU allocator report, in time order
    (ties keep the order torch recorded them in)."""
    results = prof.profiler.kineto_results
    t0 = results.trace_start_ns()
    cpu = torch.autograd.DeviceType.CPU
    reports = [((e.start_ns() - t0) / 1e3, e.nbytes()) for e in results.events()
               if e.name() == "[memory]" and e.device_type() == cpu]
    return sorted(reports, key=lambda r: r[0])


def allocator_peak(prof, after_us: float = 0.0) -> tuple[int, float]:
    """The largest running sum (see the module glossary) at or after ``after_us``, and when it happened.

    Args:
        prof: a finished ``torch.profiler.profile(activities=[CPU], profile_memory=True)``.
        after_us: ignore the moments before this time (the profiler's clock, as
            ``prof.events()``' ``time_range``: microseconds since it started).

    Returns:
        ``(bytes, microseconds)``; ``(running sum at the end, 0.0)`` when nothing was reported after ``after_us``.
    """
    run, peak, at = 0, None, 0.0
    for t, nbytes in allocator_reports(prof):
        run += nbytes
        if t >= after_us and (peak is None or run > peak):
            peak, at = run, t
    return (run, 0.0) if peak is None else (peak, at)


def folded_peak(prof, after_us: float = 0.0) -> int:
    """The largest running sum with each report folded into its innermost profiled event and placed
    at that event's start (an allocation) or end (a free): the measurement Note [allocator timeline]
    replaces, kept to show what it over-counts. Never below :func:`allocator_peak`."""
    points = []
    for e in prof.events():
        usage = e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage
        if usage:
            points.append((e.time_range.start if usage > 0 else e.time_range.end, usage))
    points.sort(key=lambda p: (p[0], -p[1]))
    run, peak = 0, None
    for t, usage in points:
        run += usage
        if t >= after_us and (peak is None or run > peak):
            peak = run
    return run if peak is None else peak


def events_under_way(prof, at_us: float, depth: int = 3) -> str:
    """The innermost ``depth`` profiled events under way at ``at_us``, outermost first (``"a > b > c"``)."""
    under_way = [e for e in prof.events() if e.name != "[memory]" and e.time_range.start <= at_us <= e.time_range.end]
    return " > ".join(e.name for e in sorted(under_way, key=lambda e: e.time_range.start)[-depth:])

"""Checking a pipeline against the unpatched model, case by case: the comparison both sweeps
and the tests share.

Inputs (:func:`make_inputs`, :func:`packed_positions`), the unpatched training forward
(:func:`reference`), one pipeline run (:func:`run_pipeline`, or stages composed by hand:
:func:`run_stages`), the comparison of logits and every gradient (:func:`compare`, and
the test assertion :func:`assert_same`), per-case and per-family results
(:class:`CaseResult`, :class:`SweepResult`, :func:`settle`) and the time budget
(:func:`_deadline`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from ..errors import FxppError
from ..model_facts import forward_signature
from ..pipeline import pipeline
from .tiny import VOCAB

STATUSES = ("pass", "mismatch", "fxpp-error", "model-error", "error")
CASE_STATUSES = (*STATUSES, "skipped")
# A family's status is its worst case's: a silent wrong answer first, then fxpp's
# failures, then the model's own.
SEVERITY = ("mismatch", "error", "fxpp-error", "model-error")
# One character per case in the tables.
MARKS = {"pass": "✓", "mismatch": "≠", "fxpp-error": "✗", "error": "✗", "model-error": "m", "skipped": "–"}
MARKS_LEGEND = ("✓ pass, ≠ mismatch, ✗ fxpp-error or error, m model-error, – skipped (the forward takes no such "
                "input; for a VLM of kind text, no images)")

BATCH, SEQ, LEFT_PAD = 2, 9, 3
ATOL = RTOL = 1e-4


# --------------------------------------------------------------------------------------
# Inputs, reference and comparison
# --------------------------------------------------------------------------------------


def make_inputs(batch: int = BATCH, seq: int = SEQ, left_pad: int = LEFT_PAD, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids in ``[3, VOCAB)``; the first row is left-padded by ``left_pad`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :left_pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def packed_positions(seq: int, restarts: Iterable[Iterable[int]]) -> torch.Tensor:
    """Position ids of packed documents: row ``r`` restarts at 0 at each index of ``restarts[r]``."""
    rows = []
    for cuts in restarts:
        starts = sorted({0, *cuts})
        pos = torch.zeros(seq, dtype=torch.long)
        for a, b in zip(starts, [*starts[1:], seq]):
            pos[a:b] = torch.arange(b - a)
        rows.append(pos)
    return torch.stack(rows)


@dataclass
class Case:
    """One call of a family's pipeline: ``inputs``, or none (``skip`` says why)."""

    name: str
    inputs: dict[str, Any] | None
    skip: str = ""


def _needs(name: str, inputs: dict[str, Any], params: set[str], model_name: str) -> Case:
    """``Case(name, inputs)``, skipped when the forward does not take one of the inputs."""
    missing = [k for k in inputs if k not in params]
    if missing:
        return Case(name, None, f"{model_name}.forward takes no {', '.join(missing)}")
    return Case(name, inputs)


def loss_of(logits: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A loss that weighs every logit differently, so every gradient path matters."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(logits.shape, generator=g).to(logits.dtype)
    return (logits.float() * w.float()).sum()


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a {type(out).__name__}")


def training_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """``use_cache=False`` where the forward takes it, by name or through ``**kwargs``
    that it hands to the inner model: the training forward a pipeline must equal."""
    params = forward_signature(model).parameters
    takes = "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {"use_cache": False} if takes else {}


def _logits_and_grads(model: torch.nn.Module, forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits of ``forward()`` and the gradients :func:`loss_of` them leaves on ``model``'s
    parameters (cleared before and after)."""
    model.zero_grad(set_to_none=True)
    logits = _logits(forward())
    loss_of(logits).backward()
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def reference(model: torch.nn.Module, inputs: dict[str, Any]):
    """Logits and gradients of the unpatched training forward ``model(**inputs, use_cache=False)``."""
    return _logits_and_grads(model, lambda: model(**inputs, **training_kwargs(model)))


def run_pipeline(pipe, model: torch.nn.Module, inputs: dict[str, Any]):
    """Logits and gradients of ``pipe(**inputs)``, a pipeline of ``model``."""
    return _logits_and_grads(model, lambda: pipe(**inputs))


def run_stages(stages, inputs: dict[str, Any], model: torch.nn.Module):
    """Logits and gradients of ``stages`` composed by hand: the first called with ``inputs``
    by keyword, each later one with the tuple the one before returned."""
    def forward():
        out = stages[0](**inputs)
        for stage in stages[1:]:
            out = stage(*out)
        return out

    return _logits_and_grads(model, forward)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.double() - b.double()).abs()
    d = torch.where(torch.isnan(a) & torch.isnan(b), torch.zeros_like(d), d)
    d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)
    return float(d.max()) if d.numel() else 0.0


def compare(ref, got, *, atol: float = ATOL, rtol: float = RTOL) -> tuple[bool, str, float]:
    """``(same, detail, max_diff)`` over the logits and every parameter gradient."""
    ref_logits, ref_grads = ref
    logits, grads = got
    if logits.shape != ref_logits.shape:
        return False, f"logits shape {tuple(logits.shape)} != {tuple(ref_logits.shape)}", math.inf
    if set(grads) != set(ref_grads):
        missing, extra = sorted(set(ref_grads) - set(grads)), sorted(set(grads) - set(ref_grads))
        parts = []
        if missing:
            parts.append(f"no grad for {len(missing)} param(s), e.g. {missing[0]}")
        if extra:
            parts.append(f"unexpected grad for {len(extra)} param(s), e.g. {extra[0]}")
        return False, "; ".join(parts), math.inf
    for name in ref_grads:
        if grads[name].shape != ref_grads[name].shape:
            return False, f"grad {name} shape {tuple(grads[name].shape)} != {tuple(ref_grads[name].shape)}", math.inf

    def close(a, b):
        return torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol, equal_nan=True)

    logits_diff = _max_diff(logits, ref_logits)
    grad_diffs = {n: _max_diff(grads[n], ref_grads[n]) for n in ref_grads}
    worst = max([logits_diff, *grad_diffs.values()])
    logits_ok = close(logits, ref_logits)
    bad = [n for n in ref_grads if not close(grads[n], ref_grads[n])]
    if logits_ok and not bad:
        return True, f"max diff {worst:.2g}", worst
    detail = f"logits max diff {logits_diff:.3g}" + ("" if logits_ok else " (over tolerance)")
    if bad:
        w = max(bad, key=lambda n: grad_diffs[n])
        detail += f"; {len(bad)}/{len(ref_grads)} grads differ, worst {w} ({grad_diffs[w]:.3g})"
    return False, detail, worst


def assert_same(ref, got, *, atol: float, rtol: float, what: str = "") -> None:
    """Assert (as a test does) that ``got`` has ``ref``'s logits and gradients, each within
    ``atol``/``rtol`` (``torch.testing.assert_close``); ``what`` starts each message."""
    ref_logits, ref_grads = ref
    logits, grads = got
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=rtol, msg=lambda m: f"{what} logits: {m}")
    assert set(grads) == set(ref_grads), f"{what}: parameters with gradients differ: {set(grads) ^ set(ref_grads)}"
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=atol, rtol=rtol,
                                   msg=lambda m: f"{what} grad {name}: {m}")


@dataclass
class SweepResult:
    family: str  # the model_type
    class_name: str  # from the auto mapping
    status: str  # one of STATUSES
    detail: str = ""  # message, max diff, ...
    max_diff: float | None = None
    frame: str | None = None  # innermost fxpp frame (status "error")
    exc_type: str | None = None
    cause: str | None = None  # the non-fxpp exception an FxppError wraps (RecursionError, ...)
    phase: str | None = None  # config, build, reference, pipeline, run, compare
    seconds: float = 0.0
    num_params: int | None = None
    model_class: str | None = None  # the class actually built
    traceback: str | None = field(default=None, repr=False)
    case: str | None = None  # the case the status comes from (None: the build, or every case passed)
    cases: list[CaseResult] = field(default_factory=list)  # one per input case, in the sweep's order
    # the pipeline build failed for every case (set by check_pipeline, kept by a later settle)
    build_failure: CaseResult | None = field(default=None, repr=False)
    kind: str = "-"  # the VLM sweep's kind of family: VLM, or text (the config has no vision tower)
    tp: str | None = None  # the causal sweep's tp column (fxpp.testing.sweep_tp.TP_STATUSES); None: to be run
    tp_detail: str = ""

    def case_status(self, name: str) -> str | None:
        """The status of case ``name``; None where the family got no case (model not built)."""
        return next((c.status for c in self.cases if c.name == name), None)

    def marks(self, names: Iterable[str]) -> str:
        """One :data:`MARKS` character per case of ``names`` (blank where the case did not run)."""
        if not self.cases:
            return ""
        return " ".join(MARKS.get(self.case_status(n) or "", "·") for n in names)


@dataclass
class CaseResult:
    """One input case of a family: a status of :data:`CASE_STATUSES` and its details."""

    name: str
    status: str
    detail: str = ""
    max_diff: float | None = None
    phase: str | None = None  # reference, run, compare (pipeline: the build failed)
    frame: str | None = None
    exc_type: str | None = None
    cause: str | None = None
    traceback: str | None = field(default=None, repr=False)


class SweepTimeout(Exception):
    """A family ran past its time budget (raised from a SIGALRM handler)."""


@contextlib.contextmanager
def _deadline(seconds: float | None):
    """Raise :class:`SweepTimeout` after ``seconds`` (SIGALRM; main thread only, else a
    no-op). An interval timer already running (pytest-timeout's) is suspended and
    resumed with its remaining time."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum, frame):
        raise SweepTimeout(f"timed out after {seconds:g}s")

    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, handler)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    if old_delay and old_delay < seconds:
        signal.setitimer(signal.ITIMER_REAL, old_delay)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:
            left = old_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), old_interval)


_FXPP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TESTING_DIR = os.path.dirname(os.path.abspath(__file__))


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it (``__cause__``, else ``__context__``), outermost first."""
    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def root_cause(exc: BaseException) -> BaseException:
    """The deepest exception of ``exc``'s chain that is not an :class:`FxppError`
    (``exc`` itself if every link is one)."""
    plain = [e for e in _chain(exc) if not isinstance(e, FxppError)]
    return plain[-1] if plain else exc


def innermost_fxpp_frame(exc: BaseException) -> str | None:
    """``fxpp/file.py:line in function`` of the deepest traceback frame inside fxpp
    (the testing room excluded), looking at the deepest cause of ``exc`` first: for an
    error that fxpp wrapped (``raise TraceError(...) from e``) that is where it happened."""
    for e in reversed(_chain(exc)):
        found = None
        for fs in traceback.extract_tb(e.__traceback__):
            path = os.path.abspath(fs.filename)
            if path.startswith(_FXPP_DIR + os.sep) and not path.startswith(_TESTING_DIR + os.sep):
                found = f"fxpp/{os.path.relpath(path, _FXPP_DIR)}:{fs.lineno} in {fs.name}"
        if found:
            return found
    return None


def _message(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    cause = root_cause(exc)
    if cause is not exc:
        cause_text = " ".join(str(cause).split())
        if cause_text[:60] not in text:
            text += f" [caused by {type(cause).__name__}: {cause_text}]"
    return _short(text, limit)


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random init leaves norms at exactly 1 and biases at 0; perturb every parameter
    so gradients through every path are distinguishable."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)


def _left(timeout_s: float, start: float) -> float:
    return max(timeout_s - (time.perf_counter() - start), 1.0)


def reference_cases(result: SweepResult, model, cases: list[Case], *, timeout_s: float,
                    start: float) -> list[tuple[str, dict, Any]]:
    """The unpatched model's side of every case, shared by both sweeps: appends a
    :class:`CaseResult` per case to ``result.cases`` (``skipped``, ``model-error`` where
    the model fails or is not deterministic, else a placeholder that
    :func:`check_pipeline` fills) and returns ``(name, inputs, reference)`` of the cases
    to run through the pipeline."""
    checks = []
    for case in cases:
        if case.inputs is None:
            result.cases.append(CaseResult(case.name, "skipped", case.skip))
            continue
        try:
            with _deadline(_left(timeout_s, start)):
                ref = reference(model, case.inputs)
                again = reference(model, case.inputs)
            same, detail, _ = compare(ref, again, atol=0, rtol=0)
            if not same:
                raise RuntimeError(f"the model is not deterministic: two unpatched runs differ ({detail})")
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            result.cases.append(CaseResult(
                case.name, "model-error", f"reference: {type(e).__name__}: {_message(e)}", phase="reference",
                exc_type=type(e).__name__, traceback="".join(traceback.format_exception(e))))
            continue
        result.cases.append(CaseResult(case.name, "error", "not run"))
        checks.append((case.name, case.inputs, ref))
    return checks


def _failure(name: str, phase: str, e: BaseException, timeout_s: float) -> CaseResult:
    """A :class:`CaseResult` for an exception raised on fxpp's side."""
    out = CaseResult(name, "error", phase=phase, exc_type=type(e).__name__,
                     traceback="".join(traceback.format_exception(e)), frame=innermost_fxpp_frame(e))
    cause = root_cause(e)
    if cause is not e:
        out.cause = type(cause).__name__
    if isinstance(e, FxppError):
        out.status, out.detail = "fxpp-error", f"{type(e).__name__}: {_message(e)}"
    elif isinstance(e, SweepTimeout):
        out.detail = f"{phase}: timed out (family budget {timeout_s:g}s)"
    else:
        out.detail = f"{phase}: {type(e).__name__}: {_message(e)}"
    return out


def check_pipeline(result: SweepResult, model, checks: list[tuple[str, dict, Any]], example_inputs: dict | None, *,
                   timeout_s: float, start: float) -> SweepResult:
    """fxpp's half of a family's check, shared by both sweeps: ONE 2-stage pipeline
    (``cuts=[1]``, built from ``example_inputs``) run on every ``(case, inputs,
    reference)`` of ``checks`` and compared with the unpatched reference; fills the
    cases of ``result`` and settles its status (:func:`settle`)."""
    try:
        with _deadline(_left(timeout_s, start)):
            pipe = pipeline(model, 2, example_inputs=example_inputs, cuts=[1])
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        failure = result.build_failure = _failure("", "pipeline", e, timeout_s)
        for name, _, _ in checks:
            _put(result, dataclasses.replace(failure, name=name, traceback=None))
        return settle(result, build_failure=failure)
    timed_out = False
    for name, inputs, ref in checks:
        if timed_out:
            _put(result, CaseResult(name, "error", "not run: the family's time budget is spent", phase="run"))
            continue
        phase = "run"
        try:
            with _deadline(_left(timeout_s, start)):
                got = run_pipeline(pipe, model, inputs)
            phase = "compare"
            same, detail, diff = compare(ref, got)
            _put(result, CaseResult(name, "pass" if same else "mismatch", detail, max_diff=diff,
                                    phase=None if same else "compare"))
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            timed_out = isinstance(e, SweepTimeout)
            _put(result, _failure(name, phase, e, timeout_s))
    return settle(result)


def sweep_families(mapping: dict[str, str], families: Iterable[str] | None, check, *, mapping_name: str,
                   progress: Any = None) -> list[SweepResult]:
    """The loop both sweeps share: ``check(model_type, class_name)`` for every family of
    ``mapping`` (model type -> class name), in its order, or for each of ``families``; a
    name not in ``mapping`` (called ``mapping_name``) is a ``model-error``. ``progress`` is
    called with each :class:`SweepResult` as it is done."""
    names = list(mapping) if families is None else list(families)
    results = []
    for name in names:
        if name not in mapping:
            r = SweepResult(family=name, class_name="", status="model-error", detail=f"not in {mapping_name}")
        else:
            r = check(name, mapping[name])
        results.append(r)
        if progress is not None:
            progress(r)
    return results


def _put(result: SweepResult, case: CaseResult) -> None:
    for i, c in enumerate(result.cases):
        if c.name == case.name:
            result.cases[i] = case
            return
    result.cases.append(case)


def settle(result: SweepResult, build_failure: CaseResult | None = None) -> SweepResult:
    """The family's status from its cases: ``pass`` if every case that applies passes,
    else the worst case's status (:data:`SEVERITY`; a failed pipeline build outranks
    the cases it stopped), its details, and ``case`` naming it."""
    build_failure = build_failure or result.build_failure
    failed = [c for c in result.cases if c.status in SEVERITY]
    diffs = [c.max_diff for c in result.cases if c.max_diff is not None]
    result.max_diff = max(diffs) if diffs else None
    if build_failure is None and not failed:
        ran = [c for c in result.cases if c.status == "pass"]
        if not ran:
            result.status, result.detail = "error", "no case ran"
            return result
        result.status, result.detail, result.case, result.phase = "pass", f"max diff {result.max_diff:.2g}", None, None
        return result
    worst = build_failure or min(failed, key=lambda c: SEVERITY.index(c.status))
    result.status, result.case = worst.status, worst.name or None
    result.phase, result.frame, result.exc_type, result.cause = worst.phase, worst.frame, worst.exc_type, worst.cause
    result.traceback = worst.traceback
    if worst.status == "mismatch":
        result.max_diff = worst.max_diff
    result.detail = f"{worst.name}: {worst.detail}" if worst.name else worst.detail
    others = [c for c in failed if c is not worst and build_failure is None]
    if others:
        result.detail += " (also " + ", ".join(f"{c.name}: {c.status}" for c in others) + ")"
    return result


def _short(text: str, limit: int) -> str:
    """``text`` on one line, at most ``limit`` characters: head and tail kept (the end of
    an error message often says what went wrong, after a long repr)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    tail = max(limit // 3, 0)
    return text[: limit - tail - 5] + " ... " + text[len(text) - tail:] if tail else text[:limit]


"""Sweep transformers' causal-LM auto mapping: which model families does fxpp split?

For every ``model_type`` in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` the sweep builds a
tiny config (2 decoder layers, hidden 64, vocabulary 128, few experts, ...) and the
model with seeded random weights on the CPU, then builds ONE 2-stage pipeline
(``fxpp.pipeline(model, 2, cuts=[1])``, no example inputs: the default signature) and
calls it with every input case of :data:`CAUSAL_CASES`, each compared with the
unpatched training forward ``model(**case, use_cache=False)`` on the same inputs:
logits and every parameter gradient (:func:`compare`).

Cases (:func:`causal_cases`)
----------------------------
``ids``
    token ids only, 2x12 (not the build's 2x8).
``padded``
    ids and a left-padded ``attention_mask``, 2x9.
``unpadded``
    ids and an all-ones ``attention_mask`` (what a tokenizer returns for rows of one
    length: mask builders return no mask for it on real data), 2x11.
``packed``
    ids and packed-document ``position_ids`` restarting mid-row, no mask (the model
    then finds the documents from the positions), 2x12.
``padded+pos``
    ids, a padding mask and ``position_ids`` that follow it, 3x10.
``router``
    mixture-of-experts families only (a config with ``output_router_logits``): the
    padded inputs with ``labels``, router logits on. A second pipeline is built with
    ``output_router_logits=True`` in the config, and ``pipe(**inputs, labels=labels)``
    is compared with ``model(**inputs, labels=labels, use_cache=False)``: logits,
    ``loss`` (language-model loss plus the coefficient times the load-balancing
    loss), ``aux_loss`` and every gradient of ``loss`` (the routers' included).
    Skipped for families without router logits.

A case whose input the model's forward does not take is ``skipped``; a case where the
unpatched model itself fails (or is not deterministic) is ``model-error`` for that case.

Statuses (:data:`STATUSES`) of a family: the worst of its cases (:data:`SEVERITY`),
``detail`` naming the case.

``pass``
    every case that applies: logits and all gradients agree (``atol=rtol=1e-4``).
``mismatch``
    fxpp ran but the numbers differ in some case (a silent wrong answer, the worst
    outcome); ``detail`` names the case, the worst tensor and its max diff.
``fxpp-error``
    fxpp refused the model with an :class:`~fxpp.FxppError` (a clean refusal).
``model-error``
    the tiny config, the model build or the unpatched model's own forward/backward
    failed (or the build took too long, or the model is not deterministic); not
    fxpp's fault.
``error``
    any other exception (or a timeout) while fxpp built or ran the stages; ``frame``
    is the innermost fxpp frame of the traceback.

A case has the same statuses plus ``skipped`` (:data:`CASE_STATUSES`).

Run ``python -m fxpp.sweep [--only llama,gemma] [--write-docs]``; with ``--vlm``, the
image-text-to-text sweep of :mod:`fxpp.testing.sweep_vlm` instead (the command is
:mod:`fxpp.testing.sweep`, also ``python -m fxpp.testing.sweep``).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import warnings
from typing import Any, Iterable

import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..inputs.signature import text_inputs_taken
from ..model_facts import forward_parameters
from ..pipeline import pipeline
from .check import (ATOL, MARKS_LEGEND, Case, CaseResult, SweepResult, SweepTimeout, _deadline, _failure, _left,
                    _message, _needs, _perturb, _put, check_pipeline, compare, grads_of, make_inputs,
                    packed_positions, reference_cases, settle, sweep_families)
from .report import (BEYOND_THE_SWEEP, DOCS_PATH, SECTION_MARK, markdown_results, run_and_report, summary,
                     sweep_parser)
from .report import format_table as _table
from .sweep_tp import TP_MARKS, TP_STATUSES, precheck, tp_column
from .tiny import FAMILY_SETUP, NUM_LAYERS, VOCAB, tiny_config

INPUT_CASES = ("ids", "padded", "unpadded", "packed", "padded+pos")  # one pipeline, built without example inputs
CAUSAL_CASES = (*INPUT_CASES, "router")  # router: a second pipeline, router logits on
COMMAND = "python -m fxpp.sweep --write-docs"


def causal_cases(model: torch.nn.Module, seed: int = 0) -> list[Case]:
    """The input cases of :data:`INPUT_CASES` for ``model`` (see the module docstring)."""
    # the inputs the forward takes, by name or through **kwargs (fxpp.inputs.signature.text_inputs_taken)
    params, name = text_inputs_taken(model, forward_parameters(model)), type(model).__name__
    ids = make_inputs(2, 12, seed=seed)["input_ids"]
    padded = make_inputs(seed=seed + 1)  # 2x9, the first row left-padded by 3
    packed = {"input_ids": make_inputs(2, 12, seed=seed + 2)["input_ids"],
              "position_ids": packed_positions(12, [[5], [7, 10]])}  # 2 and 3 documents
    unpadded = {"input_ids": make_inputs(2, 11, seed=seed + 4)["input_ids"],
                "attention_mask": torch.ones(2, 11, dtype=torch.long)}
    both = make_inputs(3, 10, seed=seed + 3)
    both["attention_mask"][2, :1] = 0  # rows padded by 3, 0 and 1
    both["position_ids"] = (both["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return [_needs("ids", {"input_ids": ids}, params, name), _needs("padded", padded, params, name),
            _needs("unpadded", unpadded, params, name), _needs("packed", packed, params, name),
            _needs("padded+pos", both, params, name)]


def _build(model_type: str, class_name: str, max_params: int):
    config = tiny_config(model_type)
    torch.manual_seed(0)
    with torch.device("meta"):
        try:
            meta = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except Exception:  # noqa: BLE001 - some inits need real tensors; the real build decides
            meta = None
    if meta is not None:
        n = sum(p.numel() for p in meta.parameters())
        del meta
        if n > max_params:
            raise MemoryError(f"tiny config still has {n / 1e6:.1f}M parameters (limit {max_params / 1e6:.0f}M)")
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError as e:
        # a sub-config (FAMILY_CONFIG_TYPE) that the auto class does not map: the mapped class itself
        cls = getattr(transformers, class_name, None)
        if "Unrecognized configuration class" not in str(e) or cls is None:
            raise
        torch.manual_seed(0)
        model = cls._from_config(config, dtype=torch.float32)
    _perturb(model)
    if model_type in FAMILY_SETUP:
        FAMILY_SETUP[model_type](model)
    return model.eval()


MAX_PARAMS = 64_000_000


def build_tiny(model_type: str, class_name: str):
    """The family's tiny model exactly as :func:`check_family` builds it (the tp run's ranks rebuild it)."""
    return _build(model_type, class_name, MAX_PARAMS)


def check_family(
    model_type: str,
    class_name: str = "",
    *,
    timeout_s: float = 60.0,
    build_timeout_s: float = 15.0,
    max_params: int = MAX_PARAMS,
    example_inputs: dict[str, Any] | None = None,
) -> SweepResult:
    """Build a tiny ``model_type`` model, one 2-stage pipeline, and compare it with the
    model on every case of :func:`causal_cases`."""
    result = SweepResult(family=model_type, class_name=class_name, status="error")
    start = time.perf_counter()
    model = None
    try:
        # --- the model's own side: any failure here is a model-error
        try:
            with _deadline(build_timeout_s):
                model = _build(model_type, class_name, max_params)
            result.model_class = type(model).__name__
            result.num_params = sum(p.numel() for p in model.parameters())
            cases = causal_cases(model)
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            result.status, result.phase, result.exc_type = "model-error", "build", type(e).__name__
            result.detail = f"build: {type(e).__name__}: {_message(e)}"
            if isinstance(e, SweepTimeout):
                result.detail = f"skipped: model build took over {build_timeout_s:g}s"
            result.traceback = "".join(traceback.format_exception(e))
            return result
        checks = reference_cases(result, model, cases, timeout_s=timeout_s, start=start)
        if checks:  # else the model fails every case itself: nothing to compare
            # --- fxpp's side
            check_pipeline(result, model, checks, example_inputs, timeout_s=timeout_s, start=start)
        if "router" not in {c.name for c in result.cases}:
            _put(result, check_router_loss(model, timeout_s=timeout_s, start=start))
        settle(result)
        if result.status != "pass":
            result.tp, result.tp_detail = "not run", f"the 2-stage pipeline: {result.status}"
        else:  # refused by name here, or run on 4 ranks by sweep_causal_lm (fxpp.testing.sweep_tp)
            result.tp, result.tp_detail = precheck(model) or (None, "")
        return result
    finally:
        result.seconds = time.perf_counter() - start
        if model is not None:
            model.zero_grad(set_to_none=True)


def router_config(model: torch.nn.Module):
    """The config that switches ``model``'s router logits on (``output_router_logits``), or None."""
    config = model.config
    try:
        text = config.get_text_config()
    except ValueError:  # several text configs: only the top-level one is unambiguous
        text = config
    return next((c for c in (text, config) if hasattr(c, "output_router_logits")), None)


def _with_labels_run(call, model: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor):
    """Logits and every gradient of ``loss`` for ``call(**inputs, labels=labels)``; the
    loss and aux loss join the gradients under ``(loss)`` and ``(aux_loss)``."""
    model.zero_grad(set_to_none=True)
    out = call(**inputs, labels=labels)
    out.loss.backward()
    got = grads_of(model)
    model.zero_grad(set_to_none=True)
    got["(loss)"] = out.loss.detach()
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        got["(aux_loss)"] = aux.detach()
    return out.logits.detach(), got


def check_router_loss(model: torch.nn.Module, *, timeout_s: float, start: float, seed: int = 1) -> CaseResult:
    """The ``router`` case: a pipeline built with router logits on, called with labels,
    against the model's own loss with router logits (see the module docstring)."""
    config = router_config(model)
    if config is None:
        return CaseResult("router", "skipped", f"{type(model.config).__name__} has no output_router_logits")
    inputs = make_inputs(seed=seed)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    before = config.output_router_logits
    config.output_router_logits = True
    phase = "reference"
    try:
        with _deadline(_left(timeout_s, start)):
            try:
                ref = _with_labels_run(lambda **kw: model(**kw, use_cache=False), model, inputs, labels)
                again = _with_labels_run(lambda **kw: model(**kw, use_cache=False), model, inputs, labels)
            except BaseException as e:  # noqa: BLE001
                if isinstance(e, (KeyboardInterrupt, SweepTimeout)):
                    raise
                return CaseResult("router", "model-error", f"reference: {type(e).__name__}: {_message(e)}",
                                  phase="reference", exc_type=type(e).__name__,
                                  traceback="".join(traceback.format_exception(e)))
            if "(aux_loss)" not in ref[1]:
                return CaseResult("router", "skipped", "the model returns no aux_loss with router logits on")
            same, detail, _ = compare(ref, again, atol=0, rtol=0)
            if not same:
                return CaseResult("router", "model-error", f"reference: the model is not deterministic ({detail})",
                                  phase="reference")
            phase = "pipeline"
            pipe = pipeline(model, 2, cuts=[1])
            phase = "run"
            got = _with_labels_run(pipe, model, inputs, labels)
        same, detail, diff = compare(ref, got)
        return CaseResult("router", "pass" if same else "mismatch", detail, max_diff=diff,
                          phase=None if same else "compare")
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        return _failure("router", phase, e, timeout_s)
    finally:
        config.output_router_logits = before
        model.zero_grad(set_to_none=True)


def causal_lm_families() -> dict[str, str]:
    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def sweep_causal_lm(
    families: Iterable[str] | None = None,
    timeout_s: float = 60.0,
    *,
    build_timeout_s: float = 15.0,
    progress: Any = None,
    tp: bool = False,
) -> list[SweepResult]:
    """Check every (or each named) family of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``.

    Args:
        families: model types to check (default: all of the mapping, in its order).
            A name not in the mapping is a ``model-error``.
        timeout_s: the time budget of one family (build, reference and fxpp).
        build_timeout_s: families whose tiny model takes longer to build are skipped
            (``model-error``).
        progress: called with each :class:`SweepResult` as it is done.
        tp: then the tp column (:mod:`fxpp.testing.sweep_tp`): one 4-rank spawn over the
            families that passed and that the tp precheck accepts (``python -m fxpp.sweep``
            runs it unless told ``--no-tp``); without it they are ``not run``.
    """
    results = sweep_families(causal_lm_families(), families,
                             lambda name, cls: check_family(name, cls, timeout_s=timeout_s,
                                                            build_timeout_s=min(build_timeout_s, timeout_s)),
                             mapping_name="MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", progress=progress)
    for r in results:
        if r.model_class is None and r.tp is None:
            r.tp, r.tp_detail = "not run", "the model was not built"
    if not tp:
        for r in results:
            if r.tp is None:
                r.tp, r.tp_detail = "not run", NO_TP
        return results
    return run_tp_column(results, progress=progress is not None)


def run_tp_column(results: list[SweepResult], *, progress: bool = False) -> list[SweepResult]:
    """Fill ``tp`` of the results whose precheck left it None: one 4-rank spawn (:func:`tp_column`)."""
    todo = [r for r in results if r.tp is None]

    def tp_progress(got):
        if progress:
            print(f"  tp {got['family']:<25} {got['status']:<8} {got['detail'][:100]}", file=sys.stderr, flush=True)

    column = tp_column([(r.family, r.class_name) for r in todo], build_tiny, progress=tp_progress)
    for r in todo:
        r.tp, r.tp_detail = column[r.family]["status"], column[r.family]["detail"]
    return results


TP_ONLY_COMMAND = "python -m fxpp.sweep --tp-only --write-docs"
TP_START, TP_END = "<!-- fxpp-tp-column -->", "<!-- /fxpp-tp-column -->"


def docs_rows(path: str = DOCS_PATH) -> list[tuple[str, str, str]]:
    """``(family, class, status)`` of every row of the causal table in ``path``, in order."""
    return [row[:3] for row in _docs_table(path)]


def _docs_table(path: str) -> list[tuple[str, str, str, str | None, str]]:
    """``(family, class, status, tp status or None, tp detail)`` of every row of the causal table in ``path``."""
    with open(path) as f:
        causal = f.read().split(SECTION_MARK, 1)[0]
    by_mark = {mark: status for status, mark in TP_MARKS.items()}
    details = {}
    for line in causal.splitlines():
        if line.startswith("- `") and "` (" in line and "): " in line:
            family, _, rest = line[3:].partition("` (")
            details[family] = rest.partition("): ")[2]
    rows = []
    for line in causal.splitlines():
        if line.startswith("| `"):
            cells = line.split(" | ")
            family = cells[0].strip("| `")
            tp = by_mark.get(cells[4].strip()) if len(cells) > 5 else None
            rows.append((family, cells[1].strip("`"), cells[2].strip(), tp, details.get(family, "")))
    return rows


def sweep_tp_only(path: str = DOCS_PATH, families: Iterable[str] | None = None, *,
                  progress: bool = True) -> list[SweepResult]:
    """The tp column alone for the families of the table in ``path`` (its status column says which passed).

    Each family that passed is built again (:func:`build_tiny`) for the precheck; the
    others are ``not run``. ``families`` restricts the rerun: the others keep the tp
    status and reason the page gives them.
    """
    chosen = None if families is None else set(families)
    results = []
    for family, class_name, status, old_tp, old_detail in _docs_table(path):
        r = SweepResult(family=family, class_name=class_name, status=status)
        if status != "pass":
            r.tp, r.tp_detail = "not run", f"the 2-stage pipeline: {status}"
        elif chosen is not None and family not in chosen:
            r.tp, r.tp_detail = old_tp or "not run", old_detail if old_tp else "not in the page's tp column"
        else:
            try:
                r.tp, r.tp_detail = precheck(build_tiny(family, class_name)) or (None, "")
            except Exception as e:  # noqa: BLE001 - the sweep built it; report, do not stop the column
                r.tp, r.tp_detail = "error", f"build: {type(e).__name__}: {_md(str(e))[:200]}"
        results.append(r)
    return run_tp_column(results, progress=progress)


def write_tp_column(results: list[SweepResult], path: str = DOCS_PATH) -> str:
    """Rewrite the tp cells and the tp section of the causal table in ``path`` (the rest of the page unchanged)."""
    with open(path) as f:
        text = f.read()
    causal, mark, vlm = text.partition(SECTION_MARK)
    by = {r.family: r for r in results}
    out, skipping = [], False
    block = [TP_START, *tp_lines(results, TP_ONLY_COMMAND), TP_END]
    for line in causal.split("\n"):
        if line.startswith("| family | class | status |") and "| tp |" not in line:
            line = line.replace("| detail |", "| tp | detail |")
        elif line.startswith("|---|") and out and "| tp |" in out[-1] and line.count("|---") == 5:
            line = "|---" * 6 + "|"
        elif line.startswith("| `"):
            cells = line.split(" | ")
            family = cells[0].strip("| `")
            mark_cell = TP_MARKS.get(by[family].tp, "·") if family in by else "·"
            if len(cells) == 5:  # no tp column yet
                cells.insert(4, mark_cell)
            else:
                cells[4] = mark_cell
            line = " | ".join(cells)
        if line == TP_START or (line.startswith("**tp column**") and not skipping):
            skipping = True
            continue
        if skipping:
            if line == TP_END or line.startswith("## "):
                skipping = False
                out.extend(block)
                block = []
                if line == TP_END:
                    continue
            else:
                continue
        if line.startswith("## Beyond the sweeps") and block:
            out.extend([*block, ""])
            block = []
        out.append(line)
    with open(path, "w") as f:
        f.write("\n".join(out) + mark + vlm)
    return path


def tp_summary(results: list[SweepResult]) -> str:
    """``tp (pp 2 x tp 2): a pass, b mismatch, ...`` over :data:`TP_STATUSES`."""
    counts = {s: sum(r.tp == s for r in results) for s in TP_STATUSES}
    return "tp (pp 2 x tp 2, 4 gloo ranks): " + ", ".join(f"{counts[s]} {s}" for s in TP_STATUSES)


def tp_lines(results: list[SweepResult], command: str | None = None) -> list[str]:
    """The tp column's prose, summary and the families it refuses or fails, each with its reason."""
    by = f" Generated by `{command}` (the column alone, on the table above)." if command else ""
    lines = [
        "**tp column** (`fxpp.testing.sweep_tp`): families that pass above and whose tensor-parallel plan tp 2 "
        "can apply run once more as pp 2 x tp 2 on 4 gloo ranks in one spawn: `fxpp.pipeline(model, 2, cuts=[1])`, "
        "each rank its stage with `build_stage(p, \"cpu\", mesh=fxpp.pp_dp_tp_mesh(2, 1, 2))` (the model's own "
        "plan, fxpp's styles), one 1F1B step of 2 microbatches (4x8 tokens, left padding) with "
        "`fxpp.causal_lm_loss`; the last stage's loss and every gradient (`.full_tensor()`) against the unpatched "
        f"model on the same microbatches, `atol=rtol={ATOL:g}`. Marks: "
        + ", ".join(f"{TP_MARKS[s]} {s}" for s in TP_STATUSES) + "." + by,
        "",
        f"**{tp_summary(results)}.**",
        "",
    ]
    named = [r for r in results if r.tp in ("refused", "mismatch", "error")]
    if named:
        lines += ["Families the tp column refuses or fails, with the reason:", ""]
        lines += [f"- `{r.family}` ({r.tp}): {_md(r.tp_detail[:400])}" for r in named]
        lines.append("")
    return lines


def _md(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def format_table(results: list[SweepResult], width: int = 160) -> str:
    table = _table(results, width, CAUSAL_CASES)
    tp = [f"  {r.family:<28} {r.tp:<8} {r.tp_detail[:width - 40]}" for r in results if r.tp not in (None, "not run")]
    return table + ("\n\ntp column:\n" + "\n".join(tp) + f"\n{tp_summary(results)}" if tp else "")


def markdown(results: list[SweepResult], command: str = COMMAND) -> str:
    lines = [
        "# Supported models",
        "",
        f"Generated by `{command}`; do not edit by hand.",
        "",
        f"Every causal-LM family of transformers {transformers.__version__} "
        f"(`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, torch {torch.__version__}) is built with a tiny config "
        f"({NUM_LAYERS} decoder layers, hidden 64, vocabulary {VOCAB}, random weights) and split into 2 stages "
        "with `fxpp.pipeline(model, 2, cuts=[1])`, once, without example inputs. That one pipeline is called "
        "with each input case and compared with the unpatched training forward `model(**case, use_cache=False)` "
        f"on the same inputs: logits and every parameter gradient, `atol=rtol={ATOL:g}`. Cases: **ids** — token "
        "ids only (2x12, not the build's 2x8); **padded** — ids and a left-padded `attention_mask` (2x9); "
        "**unpadded** — ids and an all-ones `attention_mask` (2x11); "
        "**packed** — ids and `position_ids` of packed documents restarting mid-row, no mask (2x12); "
        "**padded+pos** — ids, a padding mask and `position_ids` that follow it (3x10); **router** — "
        "mixture-of-experts families (a config with `output_router_logits`) only: a second pipeline built with "
        "router logits on, `pipe(**padded, labels=labels)` against `model(**padded, labels=labels, use_cache=False)`: "
        "logits, `loss` (with the coefficient times the load-balancing loss), `aux_loss` and every gradient of "
        "`loss`, the routers' included.",
        "",
        "Statuses: **pass** — same logits and gradients in every case that applies; **mismatch** — fxpp ran but "
        "the numbers differ in some case (a silent wrong answer); **fxpp-error** — fxpp refused the model or a "
        "case with an `FxppError`; **model-error** — the tiny model itself could not be built or run on a case "
        "(not fxpp's fault); **error** — any other exception inside fxpp. A family's status is its worst case's "
        f"(in that order: mismatch, error, fxpp-error, model-error), named in the detail. Case marks: {MARKS_LEGEND}.",
        "",
        *markdown_results(results, CAUSAL_CASES, column=("tp", lambda r: TP_MARKS.get(r.tp, "·"))),
        "",
        TP_START,
        *tp_lines(results),
        TP_END,
        *BEYOND_THE_SWEEP,
    ]
    return "\n".join(lines) + "\n"


NO_TP = "the sweep ran without its tp column (--no-tp)"


def keep_page_tp(results: list[SweepResult], path: str = DOCS_PATH) -> list[SweepResult]:
    """A sweep run with ``--no-tp``: each family that passes and whose tp check was skipped
    keeps the tp cell and reason the page in ``path`` gives it, so writing the page does not
    blank a column this run did not measure (``--tp-only`` measures it)."""
    if not os.path.exists(path):
        return results
    page = {family: (tp, detail) for family, _, _, tp, detail in _docs_table(path)}
    for r in results:
        tp, detail = page.get(r.family, (None, ""))
        if r.status == "pass" and r.tp_detail == NO_TP and tp is not None:
            r.tp, r.tp_detail = tp, detail
    return results


def write_docs(results: list[SweepResult], path: str = DOCS_PATH, command: str = COMMAND) -> str:
    """Write the causal-LM part of ``path``, keeping a VLM section (:mod:`fxpp.testing.sweep_vlm`) after it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    vlm = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if SECTION_MARK in old:
            vlm = "\n" + SECTION_MARK + old.split(SECTION_MARK, 1)[1]
    with open(path, "w") as f:
        f.write(markdown(results, command) + vlm)
    return path


def main(argv: list[str] | None = None, prog: str = "python -m fxpp.sweep") -> int:
    parser = sweep_parser(prog, __doc__, "llama,gemma", f"write {os.path.relpath(DOCS_PATH)}", 60.0)
    parser.add_argument("--no-tp", action="store_true",
                        help="skip the tp column (pp 2 x tp 2 on 4 gloo ranks, fxpp.testing.sweep_tp)")
    parser.add_argument("--tp-only", action="store_true",
                        help="only the tp column, for the families the docs table says pass; with --write-docs it "
                             "rewrites that column of the table (with --only: those families' cells, the others kept)")
    args = parser.parse_args(argv)
    if args.tp_only:
        transformers.logging.set_verbosity_error()
        warnings.filterwarnings("ignore")
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        results = sweep_tp_only(families=args.only.split(",") if args.only else None, progress=not args.quiet)
        for r in results:
            if r.tp not in ("not run",):
                print(f"  {r.family:<28} {r.tp:<8} {r.tp_detail[:120]}")
        print(f"{tp_summary(results)} ({time.perf_counter() - t0:.0f}s)")
        if args.write_docs:
            print(f"wrote {write_tp_column(results)}")
        return 0

    def sweep(families, **kwargs):
        return sweep_causal_lm(families, tp=not args.no_tp, **kwargs)

    def write(results, **kwargs):
        return write_docs(keep_page_tp(results) if args.no_tp else results, **kwargs)

    return run_and_report(args, sweep, format_table, summary, write, COMMAND)


if __name__ == "__main__":
    sys.exit(main())

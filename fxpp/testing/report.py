"""Reporting a sweep: tables, summaries, the docs page and the command-line flags both sweeps share."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any, Iterable

import torch
import transformers

from .check import CASE_STATUSES, MARKS, STATUSES, SweepResult, _short

# docs/ of the source checkout this package lives in (an editable install), else of the cwd
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS_PATH = os.path.join(_ROOT if os.path.exists(os.path.join(_ROOT, "pyproject.toml")) else os.getcwd(),
                         "docs", "supported_models.md")
# docs/supported_models.md: the causal-LM section, then this mark, then the VLM section.
SECTION_MARK = "<!-- fxpp-vlm-sweep -->"

# The end of the causal-LM section (written with it, kept when the sweeps rewrite the page):
# what the sweeps do not cover, the tests that do, and what is still refused, with why.
BEYOND_THE_SWEEP = (
    "## Beyond the sweeps",
    "",
    "The sweeps build each model with real weights on the CPU, cut it once and call it with inputs shaped like "
    "fxpp's own examples. `tests/test_family_tail.py` checks what they do not, against the unpatched model "
    "(logits and every parameter gradient):",
    "",
    "- **Built on the meta device and loaded per stage**, as large models are: `qwen4_exp` and `qwen4_exp_text` "
    "(causal and VLM) and `glm5_next` pick the tokens each query attends to with `nonzero`, which fake tensors "
    "cannot run. Such a decoder layer takes its contract's shape (hidden states in, hidden states of that shape "
    "out), or, where it returns a tuple (GLM-5 Next's layer also returns its top-k picks), the shapes of a "
    "bounded evaluation (data-dependent sizes at their largest); the stages check them at run time. The test "
    "builds on `meta`, loads each stage from a safetensors checkpoint of a real-weight copy and compares. "
    "`molmo2` refuses to train without `mm_token_type_ids`: the default signature carries it (zeros on text "
    "tokens).",
    "- **The cost split** of `mllama` (causal and VLM) with cross-attention layers, which the forward skips "
    "without images: they cost no time but keep their numbers, so `fxpp.pipeline(model, n)` covers every layer.",
    "- **Images of other sizes than fxpp's example**: `hunyuan_vl` (the image tokens lengthen the sequence; "
    "sdpa and eager attention).",
    "- **Inputs taken through `**kwargs`**: `xlstm` accepts `attention_mask` and ignores it (it builds no mask); "
    "the default signature carries it.",
    "",
    "Still refused, by name, with the reason in the error:",
    "",
    "- On the meta device, fxpp makes no example images for a vision tower that reads its image grid as "
    "numbers (`image_grid_thw`: `qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`, `glm4v`, `glm46v`, `glm5_next`, "
    "`qwen4_exp`, `hunyuan_vl`, `ernie4_5_vl_moe`, `paddleocr_vl`, `kimi_k25`, ...): a meta build's default "
    "signature holds the text inputs, and a call with images is refused naming the media inputs and why "
    "(\"no example images fit ...: Cannot copy out of meta tensor\"). Build such a pipeline from a model with "
    "real weights, with `example_inputs` holding one microbatch with images.",
    "- `molmo2` with images: fxpp cannot make example images for it (its `get_image_features` also needs "
    "`image_token_pooling` and `image_grids`), so the default signature holds the text inputs (images need "
    "`example_inputs` that hold them; not checked here).",
    "- A checkpoint written by `save_pretrained` of a mixture-of-experts model whose experts are fused in "
    "memory (`mlp.experts.gate_up_proj`) stores them per expert (`mlp.experts.0.up_proj.weight`): "
    "`build_stage(..., checkpoint=...)` reads the model's own names and refuses it (`CheckpointError`, missing "
    "keys). A state dict saved under the model's own names loads.",
)


def _detail(r: SweepResult, limit: int = 10_000) -> str:
    """The detail in at most ``limit`` characters, ending with the innermost fxpp frame
    for errors and for refusals that wrap a non-fxpp exception."""
    suffix = ""
    if r.frame and (r.status == "error" or (r.status == "fxpp-error" and r.cause)):
        suffix = f" @ {r.frame}"
    return _short(r.detail, max(limit - len(suffix), 20)) + suffix


def summary(results: list[SweepResult], statuses: Iterable[str] = STATUSES) -> str:
    """``N families: a pass, b mismatch, ...`` over ``statuses`` (the VLM sweep adds ``not-built``)."""
    counts = {s: sum(r.status == s for r in results) for s in statuses}
    return f"{len(results)} families: " + ", ".join(f"{counts[s]} {s}" for s in statuses)


def built(results: list[SweepResult]) -> list[SweepResult]:
    """The families whose tiny model was built (those a pass rate is over)."""
    return [r for r in results if r.model_class is not None and r.status != "not-built"]


def built_summary(results: list[SweepResult]) -> str:
    """``N build tiny, M pass every case (P%)``, and how many more fail only where the
    unpatched model itself fails (every case pass, skipped or model-error, one pass)."""
    ok = built(results)
    passed = sum(r.status == "pass" for r in ok)
    rate = f" ({100 * passed / len(ok):.1f}%)" if ok else ""
    model_only = sum(r.status == "model-error" and any(c.status == "pass" for c in r.cases)
                     and all(c.status in ("pass", "skipped", "model-error") for c in r.cases) for r in ok)
    more = f", {model_only} more pass every case the unpatched model runs" if model_only else ""
    return f"{len(ok)} build tiny, {passed} pass every case{rate}{more}"


def case_summary(results: list[SweepResult], names: Iterable[str]) -> str:
    """Per case: how many families pass it, mismatch, fail in fxpp, fail in the model, skip it."""
    parts = []
    for name in names:
        got = [r.case_status(name) for r in results]
        n = {s: got.count(s) for s in CASE_STATUSES}
        parts.append(f"{name}: {n['pass']} pass, {n['mismatch']} mismatch, {n['fxpp-error'] + n['error']} fxpp-error "
                     f"or error, {n['model-error']} model-error, {n['skipped']} skipped")
    return "; ".join(parts)


def format_table(results: list[SweepResult], width: int = 160, cases: Iterable[str] = (), *,
                 statuses: Iterable[str] = STATUSES, kind: bool = False) -> str:
    """One row per family: its kind (``kind=True``, the VLM sweep), status, one mark per
    case of ``cases``, the detail."""
    cases = tuple(cases)
    fw = max([len("family")] + [len(r.family) for r in results])
    sw = max(len(s) for s in statuses)
    cw = max(len("cases"), 2 * len(cases) - 1)
    kw = 7 if kind else 0  # "kind | "
    rows = [f"{'family':<{fw}} | {'kind | ' if kind else ''}{'status':<{sw}} | {'cases':<{cw}} | detail",
            f"{'-' * fw}-+-{'-----+-' if kind else ''}{'-' * sw}-+-{'-' * cw}-+-{'-' * 20}"]
    for r in results:
        k = f"{r.kind:<4} | " if kind else ""
        rows.append(f"{r.family:<{fw}} | {k}{r.status:<{sw}} | {r.marks(cases):<{cw}} | "
                    f"{_detail(r, max(width - fw - sw - cw - kw - 9, 60))}")
    return "\n".join(rows)


def _md(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def markdown_results(results: list[SweepResult], cases: Iterable[str], *, statuses: Iterable[str] = STATUSES,
                     kind: bool = False, column: tuple[str, Any] | None = None) -> list[str]:
    """A sweep's docs section below its prose: the summaries (family counts of ``statuses``)
    and one table row per family (``kind``: with the VLM sweep's kind column; ``column``:
    ``(header, result -> cell)``, one more column after the cases, the causal sweep's tp)."""
    cases = tuple(cases)
    extra = f"{column[0]} | " if column else ""
    lines = [
        f"**Summary:** {summary(results, statuses)}; {built_summary(results)}.",
        "",
        f"**Per case:** {case_summary(results, cases)}.",
        "",
        f"| family | class | {'kind | ' if kind else ''}status | {' / '.join(cases)} | {extra}detail |",
        "|---" * (5 + bool(kind) + bool(column)) + "|",
    ]
    for r in results:
        cell = f"{column[1](r)} | " if column else ""
        lines.append(f"| `{r.family}` | `{r.class_name}` | {f'{r.kind} | ' if kind else ''}{r.status} | "
                     f"{r.marks(cases)} | {cell}{_md(_detail(r, 300))} |")
    return lines


def sweep_parser(prog: str, doc: str, example: str, docs_help: str, timeout: float) -> argparse.ArgumentParser:
    """The flags both sweep commands take."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--only", default=None, help=f"comma-separated model types, e.g. {example}")
    parser.add_argument("--write-docs", action="store_true", help=docs_help)
    parser.add_argument("--timeout", type=float, default=timeout, help=f"seconds per family (default {timeout:.0f})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no per-family progress on stderr")
    parser.add_argument("--tracebacks", default=None, metavar="PATH",
                        help="write the traceback of every family and case that does not pass to PATH")
    return parser


def write_tracebacks(results: list[SweepResult], path: str) -> str:
    """The traceback of every failed family and case, for investigation."""
    with open(path, "w") as f:
        for r in results:
            if r.status == "pass":
                continue
            f.write(f"=== {r.family} ({r.class_name}): {r.status}\n{r.detail}\n")
            if r.traceback and not any(c.traceback == r.traceback for c in r.cases):
                f.write(r.traceback + "\n")
            for c in r.cases:
                if c.status not in ("pass", "skipped"):
                    f.write(f"--- case {c.name}: {c.status}: {c.detail}\n{c.traceback or ''}\n")
    return path


def run_and_report(args, sweep_fn, format_table_fn, summary_fn, write_docs_fn, command: str) -> int:
    """The part of a sweep command that both sweeps share: run, print, optionally write docs."""
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    families = [f.strip() for f in args.only.split(",") if f.strip()] if args.only else None

    def progress(r):
        if not args.quiet:
            marks = " ".join(f"{c.name} {MARKS.get(c.status, '?')}" for c in r.cases)
            print(f"  {r.family:<28} {r.status:<11} {r.seconds:5.1f}s  {marks}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    results = sweep_fn(families, timeout_s=args.timeout, progress=progress)
    print(format_table_fn(results))
    print()
    print(f"{summary_fn(results)} ({time.perf_counter() - t0:.0f}s)")
    print(built_summary(results))
    names = list(dict.fromkeys(c.name for r in results for c in r.cases))
    if names:
        print("per case: " + case_summary(results, names))
    if getattr(args, "tracebacks", None):
        print(f"wrote {write_tracebacks(results, args.tracebacks)}")
    if args.write_docs:
        command = command if families is None else f"{command} --only {','.join(families)}"
        print(f"wrote {write_docs_fn(results, command=command)}")
    return 0


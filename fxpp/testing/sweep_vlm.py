"""Sweep transformers' image-text-to-text auto mapping: which VLM families does fxpp split?

For every ``model_type`` in ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`` the sweep
builds a tiny model and inputs with real image tokens, builds ONE 2-stage pipeline
(``cuts=[1]``) without example inputs (the default signature holds the media inputs:
fxpp makes its own example images, ``fxpp.inputs.example_media``), and calls it with
every case of :data:`VLM_CASES`, each compared
with the unpatched training forward ``model(**case, use_cache=False)`` on the same
inputs: logits and every parameter gradient, the vision tower's included (the causal
sweep's comparison, :func:`fxpp.testing.check.compare`; statuses per case and per family as in
:mod:`fxpp.testing.sweep_causal`).

Cases (:func:`vlm_cases`)
-------------------------
``images``
    the image inputs (tokens, mask, media and companions): other pixels than the
    build's example images (and for zoo families, other sizes and image offsets).
``text``
    token ids without any image placeholder or other special token and a left-padded
    ``attention_mask``, no media inputs (the text-only path), 2x10.
``ids``
    token ids only, no mask and no media, 2x12.
``packed``
    token ids and ``position_ids`` of packed documents restarting mid-row, no mask and
    no media (where the forward takes ``position_ids``), 2x12.

A family of kind ``text`` (no vision tower) skips ``images``. A family whose forward requires images (BLIP-2, IDEFICS, Kosmos-2)
skips ``text`` and ``ids``: they do not apply where the unpatched model runs the
``images`` case but raises on the other one naming a media input that ``images`` gives
(``pixel_values``, ``qformer_input_ids``); any other failure stays a model-error
(:func:`skip_cases_that_need_media`). A family passes when every case that applies passes.

Terms
-----
zoo family
    One of :data:`fxpp.testing.zoo.VLM_FAMILIES`: hand-written tiny config and inputs
    (``fxpp.testing.zoo.tiny_vlm``), one image per row.
generic attempt
    Every other family: the tiny model and inputs of :mod:`fxpp.testing.generic_vlm`.

Statuses: those of the causal sweep (:data:`fxpp.testing.check.STATUSES`) and ``not-built``:
the generic attempt could not build a config, a model or image inputs (the reason is
in ``detail``); the family may well work with a hand-written config.

Run ``python -m fxpp.sweep --vlm [--only llava,gemma3] [--write-docs]`` (or
``python -m fxpp.testing.sweep_vlm`` with the same flags).
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback

import torch
import transformers

from ..inputs.example_media import NoExampleMedia, token_companions
from ..inputs.signature import text_inputs_taken
from ..model_facts import forward_parameters
from ..trace import find_decoder_layers
from .check import (ATOL, Case, CaseResult, SweepResult, SweepTimeout, _deadline, _message, _needs,
                    check_pipeline, packed_positions, reference_cases, settle, sweep_families)
from .generic_vlm import NotBuilt, decoder_inputs, generic_inputs, generic_model, text_ids, vlm_families
from .report import DOCS_PATH, SECTION_MARK, markdown_results, run_and_report, sweep_parser
from .report import format_table as _table
from .report import summary as _summary
from .tiny import NUM_LAYERS
from .zoo import VLM_FAMILIES, tiny_vlm

STATUSES = ("pass", "mismatch", "fxpp-error", "model-error", "error", "not-built")
VLM_CASES = ("images", "text", "ids", "packed")
COMMAND = "python -m fxpp.sweep --vlm --write-docs"
ZOO_SEQ = {"llava_onevision": 40}


# The case marks of the VLM table: those of the causal sweep, with the VLM reasons to skip.
VLM_MARKS_LEGEND = ("✓ pass, ≠ mismatch, ✗ fxpp-error or error, m model-error, – skipped (the forward takes no "
                    "such input; for a VLM of kind text, images; for a VLM whose forward requires images, the cases "
                    "without media: the unpatched model runs with images and, without them, raises naming a media input)")


def _encoder_gradients(model, grads: dict) -> list[str]:
    """Parameters with a gradient outside the text stack (decoder layers, token embeddings,
    head, and the 1-D norms beside the layers): what shows that the comparison covers an
    image encoder."""
    layers = find_decoder_layers(model)[0]
    parent = layers.rsplit(".", 1)[0] if "." in layers else ""
    text = {id(p) for m in (_embedding(model, "get_input_embeddings"), _embedding(model, "get_output_embeddings"))
            if m is not None for p in m.parameters()}
    owner = model.get_submodule(parent) if parent else model
    for name, child in owner.named_children():
        params = list(child.parameters())
        if params and all(p.ndim == 1 for p in params):
            text |= {id(p) for p in params}
    named = dict(model.named_parameters())
    return [n for n in grads if not n.startswith(layers + ".") and id(named[n]) not in text]


def _embedding(model, getter: str):
    """``model.<getter>()``, or None where the model does not say (PP-FormulaNet raises)."""
    try:
        return getattr(model, getter)()
    except NotImplementedError:
        return None


def vlm_cases(model, kind: str, inputs: dict[str, torch.Tensor]) -> list[Case]:
    """The cases of :data:`VLM_CASES` for ``model``: ``inputs`` with images (kind ``VLM``),
    text with a padding mask and no media, token ids only, token ids with packed-document
    position ids."""
    # the inputs the forward takes, by name or through **kwargs (fxpp.inputs.signature.text_inputs_taken)
    params, name = text_inputs_taken(model, forward_parameters(model)), type(model).__name__
    images = Case("images", inputs) if kind == "VLM" else Case(
        "images", None, "the config has no vision tower (kind text)")
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :2] = 0
    # an encoder-decoder model's decoder tokens, of another length than the encoder's
    decoder = decoder_inputs(model, seed=6, seq=5)
    text = {"input_ids": text_ids(model.config, 2, 10, seed=3), "attention_mask": mask}
    ids = {"input_ids": text_ids(model.config, 2, 12, seed=4)}
    packed = {"input_ids": text_ids(model.config, 2, 12, seed=5),
              "position_ids": packed_positions(12, [[5], [7, 10]])}  # 2 and 3 documents
    if "input_ids" not in params:  # the encoder reads only images (VisionEncoderDecoder, Pix2Struct)
        text, ids = {}, {}
    for case in (text, ids, packed):
        if "input_ids" in case:  # a document-layout model reads each token's box (UDOP)
            case.update(token_companions(case["input_ids"], params))
        case.update(decoder)
    return [images, _needs("text", text, params, name), Case("ids", ids), _needs("packed", packed, params, name)]


def tiny_family(model_type: str, seed: int = 2) -> tuple[torch.nn.Module, dict[str, torch.Tensor], str]:
    """The model, inputs and kind (``VLM`` or ``text``) the sweep checks ``model_type`` with.

    Raises NotBuilt where the sweep reports ``not-built``.
    """
    if model_type in VLM_FAMILIES:
        model, inputs = _zoo_model_and_inputs(model_type)
        return model, inputs, "VLM"
    model = generic_model(model_type)
    inputs, kind = generic_inputs(model, seed=seed)
    return model, inputs, kind


def _zoo_model_and_inputs(family: str):
    model, make_inputs = tiny_vlm(family, NUM_LAYERS)
    return model, make_inputs(2, ZOO_SEQ.get(family, 24), seed=2)


def check_vlm_family(model_type: str, class_name: str = "", *, timeout_s: float = 90.0,
                     build_timeout_s: float = 20.0) -> SweepResult:
    """Build a tiny ``model_type`` VLM, one 2-stage pipeline without example inputs, and
    compare it with the model on every case of :func:`vlm_cases`."""
    result = SweepResult(family=model_type, class_name=class_name, status="error")
    result.kind = "VLM"
    start = time.perf_counter()
    phase = "build"
    model = None
    try:
        try:
            with _deadline(build_timeout_s):
                if model_type in VLM_FAMILIES:
                    model, inputs = _zoo_model_and_inputs(model_type)
                else:
                    model = generic_model(model_type)
                    phase = "inputs"
                    inputs, result.kind = generic_inputs(model, seed=2)
            result.model_class = type(model).__name__
            result.num_params = sum(p.numel() for p in model.parameters())
            phase = "cases"
            cases = vlm_cases(model, result.kind, inputs)
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            return _not_built_or_model_error(result, e, phase, build_timeout_s)
        checks = reference_cases(result, model, cases, timeout_s=timeout_s, start=start)
        with_images = next((ref for name, _, ref in checks if name == "images"), None)
        needs_media = skip_cases_that_need_media(result, cases) if with_images is not None else []
        if with_images is not None and not _encoder_gradients(model, with_images[1]):
            result.cases = []
            return _not_built_or_model_error(result, NotBuilt(
                "no parameter outside the text model gets a gradient: the images reach the text without a "
                "trainable encoder (discrete image codes, or frozen towers)"), "reference", build_timeout_s)
        if not checks:  # the model fails every case itself
            return settle(result)
        check_pipeline(result, model, checks, None, timeout_s=timeout_s, start=start)
        if needs_media:  # say why in the family's detail too
            why = next(c.detail for c in result.cases if c.name == needs_media[0]).split(" (")[0]
            result.detail += f"; {', '.join(needs_media)} skipped: {why}"
        return result
    finally:
        result.seconds = time.perf_counter() - start
        if model is not None:
            model.zero_grad(set_to_none=True)


def skip_cases_that_need_media(result: SweepResult, cases: list[Case]) -> list[str]:
    """Mark ``skipped`` the cases without media that the unpatched model refuses for want
    of them (BLIP-2, IDEFICS, Kosmos-2: their forward has no text-only path).

    A case is skipped when the unpatched model ran the ``images`` case, failed this
    one, and its error names a media input that the ``images`` case gives and this one
    does not (``missing 1 required positional argument: 'pixel_values'``, ``You have to
    specify either `pixel_values` or `image_embeds```). Any other failure stays a
    model-error. Returns the names of the skipped cases.
    """
    inputs = {c.name: c.inputs for c in cases}
    if result.case_status("images") in (None, "model-error", "skipped") or not inputs.get("images"):
        return []  # the unpatched model did not run with images
    skipped = []
    for i, c in enumerate(result.cases):
        given = inputs.get(c.name)
        if c.status != "model-error" or c.phase != "reference" or not given:
            continue
        media = [k for k in inputs["images"] if k not in given]
        named = [k for k in media if re.search(rf"(?<!\w){re.escape(k)}(?!\w)", c.detail)]
        if named:
            result.cases[i] = CaseResult(c.name, "skipped", f"the forward requires {' and '.join(named)} (the "
                                         f"unpatched model runs with images and raises without: {c.detail})")
            skipped.append(c.name)
    return skipped


def _not_built_or_model_error(result: SweepResult, e: BaseException, phase: str,
                              build_timeout_s: float) -> SweepResult:
    result.phase, result.exc_type = phase, type(e).__name__
    result.traceback = "".join(traceback.format_exception(e))
    if isinstance(e, (NotBuilt, NoExampleMedia)):
        result.status, result.detail = "not-built", str(e)
    elif isinstance(e, SweepTimeout) and phase == "build":
        result.status, result.detail = "not-built", f"model build took over {build_timeout_s:g}s"
    else:
        result.status = "model-error"
        result.detail = f"{phase}: {type(e).__name__}: {_message(e)}"
    return result


def sweep_vlm(families=None, timeout_s: float = 90.0, *, progress=None) -> list[SweepResult]:
    """Check every (or each named) family of ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``."""
    return sweep_families(vlm_families(), families,
                          lambda name, cls: check_vlm_family(name, cls, timeout_s=timeout_s,
                                                             build_timeout_s=min(20.0, timeout_s)),
                          mapping_name="MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", progress=progress)


def summary(results) -> str:
    return _summary(results, STATUSES)


def format_table(results, width: int = 160) -> str:
    return _table(results, width, VLM_CASES, statuses=STATUSES, kind=True)


def markdown(results, command: str = COMMAND) -> str:
    lines = [
        SECTION_MARK,
        "## Vision-language models",
        "",
        f"Generated by `{command}`; do not edit by hand.",
        "",
        f"Every family of transformers {transformers.__version__}'s `MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES` "
        f"(torch {torch.__version__}), {NUM_LAYERS} decoder layers, split into 2 stages with `cuts=[1]` once, "
        "without example inputs: the default signature holds the media inputs, traced with example images fxpp "
        "makes itself (`fxpp.inputs.example_media`). That one pipeline is called with each input case "
        "and compared with the unpatched training forward `model(**case, use_cache=False)` on the same inputs: "
        "logits and every parameter gradient (vision tower included), "
        f"`atol=rtol={ATOL:g}`. Cases: **images** — a batch of 2 rows with one image each (tokens, padding "
        "mask, media and companions; other pixels than fxpp's example, and for the zoo families other image "
        "sizes and offsets); **text** — token ids without image placeholders and a left-padded "
        "`attention_mask`, no media inputs (2x10); **ids** — token ids only (2x12); **packed** — token ids and "
        "`position_ids` of packed documents restarting mid-row, no mask, no media (2x12). "
        f"Zoo families ({', '.join(f'`{f}`' for f in VLM_FAMILIES)}) use `fxpp.testing.zoo.tiny_vlm`; the others a generic "
        "attempt (the causal sweep's tiny config with images of 4x4 patches, and fxpp's own example images "
        "with another seed). Kind `text`: the config has no vision tower; "
        "checked on the text cases only. A family whose forward requires images (the unpatched model runs the "
        "**images** case, and raises on a case without media naming a media input it was not given, such as "
        "`pixel_values`) skips those cases, and says so in the detail; a family passes when every case that "
        "applies passes.",
        "",
        "Statuses as above, plus **not-built** — the generic attempt could not build the config, the model or "
        f"its image inputs (the family may work with a hand-written config; the reason is in the detail). "
        f"Case marks: {VLM_MARKS_LEGEND}.",
        "",
        *markdown_results(results, VLM_CASES, statuses=STATUSES, kind=True),
    ]
    return "\n".join(lines) + "\n"


def write_docs(results, path: str = DOCS_PATH, command: str = COMMAND) -> str:
    """Replace (or append) the VLM section of ``path``, keeping the causal-LM part."""
    text = open(path).read() if os.path.exists(path) else "# Supported models\n"
    head = text.split(SECTION_MARK)[0].rstrip("\n")
    with open(path, "w") as f:
        f.write(head + "\n\n" + markdown(results, command))
    return path


def main(argv: list[str] | None = None, prog: str = "python -m fxpp.testing.sweep_vlm") -> int:
    parser = sweep_parser(prog, __doc__, "llava,gemma3", f"write the VLM section of {os.path.relpath(DOCS_PATH)}",
                               90.0)
    parser.add_argument("--vlm", action="store_true", help="accepted for symmetry with python -m fxpp.sweep --vlm")
    args = parser.parse_args(argv)
    return run_and_report(args, sweep_vlm, format_table, summary, write_docs, COMMAND)


if __name__ == "__main__":
    sys.exit(main())

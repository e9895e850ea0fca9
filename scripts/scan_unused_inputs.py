"""Trace tiny models and report every given input the traced graph does not consume.

The rule of :mod:`fxpp.inputs.unused` (every input the caller gives must reach the
graph output) must not fire on models fxpp handles correctly. This script traces, with
their example inputs:

* ``--zoo``: the causal presets of ``fxpp.testing.zoo`` with ``input_ids``, ``attention_mask``
  and ``position_ids`` (the last two are the inputs most likely to be no-ops);
* ``--vlm``: every family the VLM sweep builds (``fxpp.testing.sweep_vlm.tiny_family``), with
  the sweep's inputs;
* ``--causal``: every family of the causal sweep, with its text inputs.

and prints one line per model: ``ok``, ``UNCONSUMED <names>`` (the rule would reject
the model), ``tolerated`` (unconsumed inputs the rule lets pass, with the reason), or
why it was skipped (not built, trace error). Exit status 1 when the rule would reject
some model.

    python scripts/scan_unused_inputs.py --zoo --vlm [--causal] [--only fuyu,llava]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch


def _scan(name: str, build) -> tuple[str, str]:
    from fxpp.testing import check as base
    from fxpp.trace import trace_model
    from fxpp.inputs.unused import tolerated_reason, unconsumed_inputs

    start = time.perf_counter()
    try:
        with base._deadline(30):
            model, inputs = build()
    except Exception as e:  # noqa: BLE001
        return "skip", f"not built: {type(e).__name__}: {base._message(e, 120)}"
    if not inputs:
        return "skip", "no inputs (encoder-decoder)"
    given = {k for k, v in inputs.items() if v is not None}
    try:
        with base._deadline(60), torch.no_grad():
            gm = trace_model(model, inputs)
    except Exception as e:  # noqa: BLE001
        return "skip", f"trace error: {type(e).__name__}: {base._message(e, 120)}"
    missing = unconsumed_inputs(gm, given)
    took = f"{time.perf_counter() - start:.1f}s"
    rejected = [n for n in missing if tolerated_reason(gm, n) is None]
    if rejected:
        return "UNCONSUMED", f"{rejected} of {sorted(given)} ({type(model).__name__}, {took})"
    if missing:
        why = "; ".join(f"{n}: {tolerated_reason(gm, n)}" for n in missing)
        return "tolerated", f"{why} ({type(model).__name__}, {took})"
    return "ok", f"{sorted(given)} ({type(model).__name__}, {took})"


def zoo_builds():
    from fxpp.testing.zoo import FAMILIES, tiny_model

    for family in FAMILIES:
        def build(family=family):
            model = tiny_model(family, 4).eval()
            ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
            mask = torch.ones_like(ids)  # all ones: a no-op for this call, still consumed
            return model, {"input_ids": ids, "attention_mask": mask, "position_ids": torch.arange(8).expand(2, 8)}

        yield f"zoo:{family}", build


def vlm_builds():
    from fxpp.testing.sweep_vlm import tiny_family, vlm_families

    for model_type in vlm_families():
        def build(model_type=model_type):
            model, inputs, _ = tiny_family(model_type)
            return model, inputs

        yield f"vlm:{model_type}", build


def causal_builds():
    from fxpp.testing import check as base, sweep_causal

    for model_type, class_name in sweep_causal.causal_lm_families().items():
        def build(model_type=model_type, class_name=class_name):
            return sweep_causal._build(model_type, class_name, 64_000_000), base.make_inputs()

        yield f"causal:{model_type}", build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", action="store_true")
    parser.add_argument("--vlm", action="store_true")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated family names")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    only = {s for s in args.only.split(",") if s}
    sources = [(args.zoo, zoo_builds), (args.vlm, vlm_builds), (args.causal, causal_builds)]
    hits = 0
    for wanted, builds in sources:
        if not wanted:
            continue
        for name, build in builds():
            if only and name.split(":", 1)[1] not in only:
                continue
            status, detail = _scan(name, build)
            hits += status == "UNCONSUMED"
            print(f"{name:36} {status:10} {detail}", flush=True)
    print(f"{hits} model(s) with unconsumed inputs")
    return 1 if hits else 0


if __name__ == "__main__":
    sys.exit(main())

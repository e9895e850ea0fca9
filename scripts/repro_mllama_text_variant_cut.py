"""Reproduce: a Mllama pipeline built WITH images fails because of its text-only variant.

``python scripts/repro_mllama_text_variant_cut.py``

The VLM sweep's tiny Mllama has 2 text layers, layer 1 a cross-attention layer
(``cross_attention_layers=[1]``). ``MllamaTextModel.forward`` skips cross-attention
layers when there are no ``cross_attention_states`` (no images). The pipeline is built
from an example WITH images, where both layers run, so ``cuts=[1]`` is a valid cut
for the calls it was built for. But ``fxpp.transform.cut_layout`` also takes the
slots of every representative present set (Note [layout union]), among them the
sets without the media inputs; in those traces layer 1 is never called, and
``fxpp.analysis.cuts.stream_at`` raises

    CutError: cut 1: the traced forward calls no decoder layer at or after 1

for the variant, which fails the whole build (before the fixed layout, the same
family passed the sweep with images). Expected: the build succeeds and calls with
images work; a text-only call could be refused (or, better, the variant sends the
hidden states of the last layer it ran: the skipped layer is an identity).
"""

from __future__ import annotations

import traceback
import warnings

warnings.filterwarnings("ignore")


def main() -> int:
    import transformers

    transformers.logging.set_verbosity_error()
    import fxpp
    from fxpp.testing.sweep_vlm import generic_inputs, generic_model

    model = generic_model("mllama")
    example = generic_inputs(model, seed=1)[0]
    print("cross_attention_layers:", model.config.text_config.cross_attention_layers)
    print("example inputs:", {k: tuple(v.shape) for k, v in example.items()})
    try:
        fxpp.pipeline(model, 2, example_inputs=example, cuts=[1])
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    print("built: fixed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The input concept: what each input is, the signature, the examples to trace with.

Files
-----
``names``: what each input name is (text, media, what travels with the media), the
modalities (image, video) and their placeholder tokens; the one definition of each.
``signature``: :class:`InputSignature`, the forward's parameters, default example
inputs and the candidate examples the compile driver traces (it yields them; it never
traces).
``example_media``: example images for a vision-language model built without them.
``unused``: every input a caller gives must reach the graph's output; inputs the model
itself ignores, media given to a model without a media path.

This room sits below ``fxpp.trace``: nothing here traces. What it needs to know about
the model's forward (its parameters with decorators peeled as the tracer peels them,
the training keywords and output) comes from ``fxpp.model_facts``, below both.
"""

from __future__ import annotations

from .example_media import NoExampleMedia, example_media_inputs
from .names import (DECODER_INPUTS, DECODER_TOKEN_INPUTS, IMAGE, MODALITIES, TEXT_INPUTS, TOKEN_COMPANIONS,
                    TOKEN_INPUTS, VIDEO, Modality, is_media_input, is_text_input, media_inputs_of, stream_tokens,
                    travels_with_media)
from .signature import InputSignature, default_example_inputs, representative_present_sets
from .unused import (ignored_by_the_model, reject_media_without_path, reject_unconsumed_inputs, tolerated_reason,
                     unconsumed_inputs)

__all__ = [
    "DECODER_INPUTS",
    "DECODER_TOKEN_INPUTS",
    "IMAGE",
    "InputSignature",
    "MODALITIES",
    "Modality",
    "NoExampleMedia",
    "TEXT_INPUTS",
    "TOKEN_COMPANIONS",
    "TOKEN_INPUTS",
    "VIDEO",
    "default_example_inputs",
    "example_media_inputs",
    "ignored_by_the_model",
    "is_media_input",
    "is_text_input",
    "media_inputs_of",
    "reject_media_without_path",
    "reject_unconsumed_inputs",
    "representative_present_sets",
    "stream_tokens",
    "tolerated_reason",
    "travels_with_media",
    "unconsumed_inputs",
]

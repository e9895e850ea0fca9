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

Note [inputs below trace]
    This room sits below ``fxpp.trace``: nothing here traces. It still reads four
    model helpers that live in the trace room (``unwrap_forward``, which peels the
    forward's decorators as the tracer does; ``is_encoder_decoder``;
    ``model_device`` / ``model_unchanged``; ``TRACE_KWARGS`` / ``select_output``, the
    training forward's keywords and output), because the signature must be the one
    the tracer traces and example media are checked by running the model's own code.
    Nothing in ``fxpp.trace`` imports this room, so this is no circle.
"""

from __future__ import annotations

from .example_media import NoExampleMedia, example_media_inputs
from .names import (DECODER_INPUTS, DECODER_TOKEN_INPUTS, IMAGE, MODALITIES, TEXT_INPUTS, TOKEN_COMPANIONS,
                    TOKEN_INPUTS, VIDEO, Modality, is_media_input, is_text_input, media_inputs_of, stream_tokens,
                    travels_with_media)
from .signature import (InputSignature, default_example_inputs, forward_parameters, forward_signature,
                        representative_present_sets)
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
    "forward_parameters",
    "forward_signature",
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

"""What each model input is, by name: the one place that says so.

Terms
-----
text input
    The tokens, their padding mask and their positions (:data:`TEXT_INPUTS`), the
    other token input (``inputs_embeds``), an encoder-decoder model's decoder inputs
    (:data:`DECODER_INPUTS`) and inputs aligned with the tokens that go wherever they
    go (:data:`TOKEN_COMPANIONS`: a document-layout model's ``bbox``).
media input
    An image, video or audio tensor or one of its companions (``image_sizes``,
    ``image_grid_thw``, ...), told by its name's prefix (:data:`MEDIA_PREFIXES`).
travels with the media
    Every input that is not a text input: the media inputs and what a processor adds
    for them beside the text (``token_type_ids`` marking image tokens, a second text
    encoder's ``qformer_input_ids``). A call without images leaves all of them out, so
    the representative present sets (``fxpp.inputs.signature``) take them or leave
    them together.
modality
    A kind of media item (image, video) and the inputs that carry it one row per item
    or one row per patch (:class:`Modality`); how a batch's items are split into
    microbatches reads these (``fxpp.runtime.microbatch``).
placeholder token
    The token id that a modality's features replace in ``input_ids``, named by the
    config attributes of :attr:`Modality.token_attrs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids")
TOKEN_INPUTS = ("input_ids", "inputs_embeds")  # a call gives one of them
# An encoder-decoder model's decoder inputs: the decoder's tokens are the stream that the
# cut stack carries; the encoder's inputs (input_ids, attention_mask, media) run whole in
# the first stage, and what the decoder layers read of them crosses the cuts.
DECODER_TOKEN_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds")
DECODER_INPUTS = (*DECODER_TOKEN_INPUTS, "decoder_attention_mask", "decoder_position_ids")
# Inputs aligned with the tokens that go wherever the tokens go: a document-layout
# model's box per token (UDOP's ``bbox``), not media.
TOKEN_COMPANIONS = ("bbox",)

MEDIA_PREFIXES = ("pixel_values", "image_", "video_", "audio_", "input_features", "flattened_patches")
IMAGE_TOKEN_ATTRS = ("image_token_id", "image_token_index")
VIDEO_TOKEN_ATTRS = ("video_token_id", "video_token_index")  # placeholders of video-only models


def is_media_input(name: str) -> bool:
    """Whether an input name is an image, video or audio input (or one of their companions)."""
    return name.startswith(MEDIA_PREFIXES)


def media_inputs_of(params: set[str] | list[str]) -> list[str]:
    """The forward parameters that carry media, in a fixed order."""
    return sorted(p for p in params if is_media_input(p))


def is_text_input(name: str) -> bool:
    """Whether an input is a text input (module docstring): the tokens and what goes with them."""
    return name in (*TEXT_INPUTS, *DECODER_INPUTS, *TOKEN_COMPANIONS, "inputs_embeds")


def travels_with_media(name: str) -> bool:
    """Whether a call without media leaves ``name`` out too (every media input does)."""
    return not is_text_input(name)


def stream_tokens(inputs: dict) -> torch.Tensor | None:
    """The token input whose first two dimensions are the stream's batch and sequence:
    the decoder's tokens where given (encoder-decoder models), else ``input_ids`` or
    ``inputs_embeds``; None where the inputs hold none."""
    return next((inputs[n] for n in (*DECODER_TOKEN_INPUTS, *TOKEN_INPUTS)
                 if isinstance(inputs.get(n), torch.Tensor) and inputs[n].dim() >= 2), None)


@dataclass(frozen=True)
class Modality:
    """A kind of media item and the inputs that carry it.

    Attributes:
        name: ``"image"`` or ``"video"``, for messages.
        token_attrs: config attributes that may hold the placeholder token id.
        inputs: input names that are per-item or flattened-patch tensors (media inputs all).
        grid: the input holding each item's ``(t, h, w)`` patch grid, if any.
    """

    name: str
    token_attrs: tuple[str, ...]
    inputs: tuple[str, ...]
    grid: str | None = None

    def __post_init__(self) -> None:
        if not all(is_media_input(n) for n in self.inputs):
            raise ValueError(f"modality {self.name}: {self.inputs} must all be media inputs ({MEDIA_PREFIXES})")


IMAGE = Modality(
    "image", IMAGE_TOKEN_ATTRS,
    ("pixel_values", "image_sizes", "image_grid_thw", "image_position_ids"), grid="image_grid_thw",
)
VIDEO = Modality(
    "video", VIDEO_TOKEN_ATTRS,
    ("pixel_values_videos", "video_grid_thw", "video_position_ids"), grid="video_grid_thw",
)
MODALITIES = (IMAGE, VIDEO)

"""The input signature of a pipeline and the examples it is traced with.

Terms
-----
signature
    The model inputs a pipeline accepts (:class:`InputSignature`): by default
    ``input_ids``, ``attention_mask`` and ``position_ids`` where the forward takes
    them, plus every input of the example inputs, plus a VLM's media inputs (example
    media where the example inputs hold none: ``fxpp.inputs.example_media``), plus the
    other token input as an *alternative*.
present set
    The signature inputs one call carries (see ``fxpp.layout``).
candidate example
    One set of example inputs to trace the model with. This module only makes them,
    most wanted first (:func:`text_input_candidates`, :func:`media_example`,
    :func:`representative_present_sets`); the compile driver (``fxpp.compile``) traces
    them and keeps the first that traces.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from transformers.utils.generic import TransformersKwargs

from ..errors import StageInputError
from ..model_facts import forward_parameters, forward_signature, is_encoder_decoder, model_device
from .example_media import example_media_inputs, token_companions, vision_config_of
from .names import (DECODER_INPUTS, TEXT_INPUTS, TOKEN_COMPANIONS, TOKEN_INPUTS, is_media_input, media_inputs_of,
                    stream_tokens, travels_with_media)

# How a user declares media inputs fxpp could not make examples of.
DECLARE_MEDIA = ("; declare them by building with example_inputs that hold one microbatch with images "
                 "(fxpp.pipeline(model, n, example_inputs=...))")


def default_example_inputs(model: torch.nn.Module, batch_size: int = 2, seq_len: int = 8) -> dict[str, torch.Tensor]:
    """Token ids of shape ``[batch_size, seq_len]``, on the model's device.

    An encoder-decoder model gets its decoder's tokens too, ``[batch_size, seq_len - 2]``
    (where its forward takes ``input_ids``, the encoder's tokens beside them): two
    lengths, so that shapes that follow the encoder's sequence and those that follow
    the decoder's can be told apart (``fxpp.layout.filler_shape``).
    """
    device = model_device(model)
    vocab = getattr(model.config.get_text_config(), "vocab_size", 2) or 2
    ids = torch.arange(batch_size * seq_len, device="cpu").reshape(batch_size, seq_len) % vocab
    if not is_encoder_decoder(model):
        return {"input_ids": ids.to(device)}
    params = forward_parameters(model)
    out = {"input_ids": ids, **token_companions(ids, params)} if "input_ids" in params else {}
    out["decoder_input_ids"] = ids[:, : max(seq_len - 2, 1)].flip(-1)
    return {k: v.to(device) for k, v in out.items()}


# Inputs aligned with the tokens that a forward may require even without media, and
# their value then: token types, 0 on text tokens (a processor marks media tokens
# otherwise). Molmo 2 refuses to train without ``mm_token_type_ids``.
TOKEN_TYPE_INPUTS = ("token_type_ids", "mm_token_type_ids")


def default_text_input(name: str, like: torch.Tensor) -> torch.Tensor:
    """An example of a text input the example inputs lack, shaped like the tokens."""
    b, s = like.shape[0], like.shape[1]
    if name in TOKEN_TYPE_INPUTS:
        return torch.zeros(b, s, dtype=torch.long, device=like.device)
    if name == "attention_mask":
        # Row 0 left-padded by one token where the row is long enough: mask builders then
        # return a mask, so the trace follows the forward's masked branch; an all-ones
        # mask makes some return None (``fxpp.passes.guard_mask_branches``).
        mask = torch.ones(b, s, dtype=torch.long, device=like.device)
        if s > 1:
            mask[0, 0] = 0
        return mask
    return torch.arange(s, device=like.device).expand(b, s).clone()  # position_ids


def required_input(error: BaseException, given: dict[str, Any], params: set[str]) -> str | None:
    """The input of :data:`TOKEN_TYPE_INPUTS` that the forward takes, ``given`` lacks and
    the forward's refusal ``error`` names (Molmo 2 in training mode: "`mm_token_type_ids`
    is required as a model input when training"), so the signature must carry it; None
    where ``error`` names none, or the example has no token input to shape it like."""
    tokens = given.get("input_ids", given.get("inputs_embeds"))
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
        return None
    text = ""
    cause: BaseException | None = error
    while cause is not None:  # a TraceError quotes the model's own error; its cause is that error
        text += f" {cause}"
        cause = cause.__cause__
    return next((n for n in TOKEN_TYPE_INPUTS if n in params and n not in given
                 and re.search(rf"(?<![\w.]){n}(?!\w)", text)), None)


def alternative_token_inputs(given: dict[str, Any], params: set[str]) -> list[str]:
    """The other token input than the given one, where the forward takes it: declared,
    never traced together with it."""
    return [n for n in TOKEN_INPUTS if n not in given and n in params and set(TOKEN_INPUTS) & set(given)]


@dataclass(frozen=True)
class TextCandidate:
    """``given`` plus some of the text inputs it lacks.

    Attributes:
        example: the inputs to trace.
        added: the text inputs fxpp added to ``given``.
        dropped: the text inputs fxpp would add but this candidate leaves out (an
            earlier candidate with them failed to trace).
    """

    example: dict[str, Any]
    added: tuple[str, ...]
    dropped: tuple[str, ...]


def text_inputs_taken(model: torch.nn.Module, params: set[str]) -> set[str]:
    """``params`` and the text inputs the forward takes only through ``**kwargs``.

    Those are traced like named ones: the trace decides. Consumed, the graph computes
    with them as the model does; unconsumed, the unused-inputs pass
    (``fxpp.inputs.unused``) keeps them only where the unpatched model provably ignores
    them (xLSTM accepts an ``attention_mask`` and builds no mask), else the candidate
    fails and they are left out. Not a keyword that transformers routes to attention
    kernels (``TransformersKwargs``: ``position_ids`` marks packed documents for flash
    attention), which a check on this machine's attention could not prove ignored.
    """
    signature = forward_signature(model)
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return set(params)
    routed = set(getattr(TransformersKwargs, "__annotations__", {}))
    return set(params) | {n for n in TEXT_INPUTS if n not in routed}


def text_inputs_not_taken(model: torch.nn.Module, params: set[str]) -> list[tuple[str, str]]:
    """``(name, why)`` for each text input the forward does not take (``params``: see
    :func:`text_inputs_taken`)."""
    return [(n, f"{type(model).__name__}.forward takes no {n}") for n in TEXT_INPUTS if n not in params]


def text_input_candidates(given: dict[str, Any], params: set[str]) -> Iterator[TextCandidate]:
    """``given`` with the text inputs it lacks (``attention_mask``, ``position_ids``) that
    the forward takes; then without ``position_ids``; then ``given`` alone. The driver
    traces them in this order and keeps the first that traces: an added input may not fit."""
    tokens = given.get("input_ids", given.get("inputs_embeds"))
    alternatives = alternative_token_inputs(given, params)
    missing = [n for n in TEXT_INPUTS if n not in given and n in params and n not in alternatives]
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
        missing = []
    for added in (missing, [n for n in missing if n != "position_ids"], []):
        example = dict(given)
        example.update({n: default_text_input(n, tokens) for n in added})
        yield TextCandidate(example, tuple(added), tuple(sorted(set(missing) - set(added))))


def wants_example_media(model: torch.nn.Module, declared: dict[str, Any], params: set[str]) -> bool:
    """Whether fxpp makes example media for the signature (``fxpp.inputs.example_media``):
    the model has an image path and the example inputs name no media input. A media
    input given as None in ``example_inputs`` declares the text-only signature."""
    return (vision_config_of(model) is not None and bool(media_inputs_of(params))
            and not any(is_media_input(n) for n in declared))


def declared_text_only(declared: dict[str, Any], params: set[str]) -> list[tuple[str, str]]:
    """``(name, why)`` for every media input of the forward where ``example_inputs`` gave a
    media input as None (a text-only signature); empty otherwise."""
    absent = sorted(n for n, v in declared.items() if v is None and is_media_input(n))
    if not absent:
        return []
    why = f"example_inputs gave {', '.join(f'{a}=None' for a in absent)}: a text-only signature"
    return [(n, why) for n in media_inputs_of(params)]


def media_left_out(params: set[str], why: str) -> list[tuple[str, str]]:
    """``(name, why)`` for every media input of the forward, with how to declare them."""
    return [(n, why + DECLARE_MEDIA) for n in media_inputs_of(params)]


def media_example_refusal(given: dict[str, Any]) -> str | None:
    """Why fxpp makes no example images for example inputs ``given``, or None where it tries."""
    tokens = given.get("input_ids")
    decoder = {k: v for k, v in given.items() if k in DECODER_INPUTS}
    batch = stream_tokens(given)  # the decoder's tokens, else input_ids
    if batch is None or (tokens is not None and (not isinstance(tokens, torch.Tensor) or tokens.dim() != 2)) \
            or set(given) - set(TEXT_INPUTS) - set(decoder) - set(TOKEN_COMPANIONS):
        return (f"fxpp makes example images only for example inputs of token ids, a mask and positions "
                f"(got {sorted(given)})")
    return None


def media_example(model: torch.nn.Module, given: dict[str, Any]) -> dict[str, Any]:
    """Example images in place of ``given``'s text inputs (``media_example_refusal`` is None).

    The caller's token ids are kept where they have room for the image's tokens (with
    the caller's mask and positions); else only their batch size is, and the example's
    sequence is the image's tokens plus a few text tokens.

    Raises:
        NoExampleMedia (or any error of the model's own code): no example fits.
    """
    tokens = given.get("input_ids")
    decoder = {k: v for k, v in given.items() if k in DECODER_INPUTS}
    batch = stream_tokens(given)
    example = example_media_inputs(model, batch=batch.shape[0], input_ids=tokens, decoder=decoder)
    if tokens is not None and example["input_ids"].shape == tokens.shape:
        # the caller's ids, with the image's tokens
        example.update({k: v for k, v in given.items() if k != "input_ids"})
    example.update(decoder)
    return example


def representative_present_sets(signature: "InputSignature") -> list[tuple[str, ...]]:
    """The present sets whose crossing values make up each cut's layout (Note [layout union]
    in ``fxpp.compile``).

    Every subset of the optional text inputs, with and without all inputs that travel
    with the media (``fxpp.inputs.names.travels_with_media``) together.
    """
    names = [n for n in signature.names if n not in signature.alternatives]  # alternatives: traced on demand
    optional = [n for n in ("attention_mask", "position_ids") if n in names]
    media = [n for n in names if travels_with_media(n)]
    found = []
    for with_media in ((True, False) if media else (True,)):
        for r in range(len(optional), -1, -1):
            for kept in itertools.combinations(optional, r):
                present = tuple(n for n in names
                                if (n not in optional and n not in media) or n in kept or (with_media and n in media))
                if present != tuple(names):
                    found.append(present)
    return found


@dataclass(frozen=True)
class InputSignature:
    """The inputs a pipeline accepts, in a fixed order (the header's bit order).

    Attributes:
        names: the declared inputs.
        left_out: inputs of the default set the model cannot take, with the reason,
            for error messages.
        alternatives: the token input the example did not hold (``inputs_embeds`` for a
            pipeline built from ``input_ids``, or the other way round), declared where
            the forward takes it. A call gives one of the two, as the model's forward
            requires; the stages trace a call with the alternative when it first comes.
    """

    names: tuple[str, ...]
    left_out: tuple[tuple[str, str], ...] = ()
    alternatives: tuple[str, ...] = ()  # declared token inputs the canonical graph was not traced with

    @functools.cached_property  # read on every stage call
    def traced_bits(self) -> int:
        """The canonical graph's present set: every name but the alternatives."""
        return self.bits(n for n in self.names if n not in self.alternatives)

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"input signature {self.names} names an input twice")
        if len(self.names) > 62:
            raise ValueError(f"input signature {self.names} has more than 62 inputs")

    @property
    def all_bits(self) -> int:
        return (1 << len(self.names)) - 1

    def bits(self, present: Iterable[str]) -> int:
        present = set(present)
        return sum(1 << i for i, name in enumerate(self.names) if name in present)

    def present(self, bits: int) -> tuple[str, ...]:
        return tuple(name for i, name in enumerate(self.names) if bits >> i & 1)

    def check_call(self, given: Iterable[str], where: str) -> None:
        """Refuse inputs outside the signature, naming them and how to declare them.

        Raises:
            StageInputError: an input the stages were not built for, or no token input.
        """
        given = sorted(given)
        outside = [name for name in given if name not in self.names]
        if outside:
            reasons = dict(self.left_out)
            why = "; ".join(f"{name}: {reasons[name]}" for name in outside if name in reasons)
            raise StageInputError(
                f"{where}: input(s) {outside} are not in the pipeline's input signature {list(self.names)}"
                + (f" ({why})" if why else "")
                + ". Declare them by building the stages with example_inputs that contain them "
                "(fxpp.pipeline(model, n, example_inputs=...) or fxpp.transform(..., example_inputs=...))"
            )
        token_inputs = [name for name in ("input_ids", "inputs_embeds") if name in self.names]
        if token_inputs and not set(token_inputs) & set(given):
            raise StageInputError(
                f"{where}: the call gives {given or 'no inputs'} but not {' or '.join(token_inputs)}; "
                "the first stage needs the tokens"
            )

"""The fixed layout of what crosses a cut, whatever inputs one call carries.

Terms
-----
signature
    The model inputs a pipeline accepts (:class:`InputSignature`): by default
    ``input_ids``, ``attention_mask`` and ``position_ids`` where the forward takes
    them, plus every input of the example inputs (a VLM's media inputs).
present set
    The signature inputs one call carries. Any subset that names the tokens is
    allowed; an absent input means what the model's forward does without it (no
    ``attention_mask`` is not an all-ones mask: transformers then finds packed
    documents from ``position_ids``; no ``pixel_values`` is the text-only path).
variant
    A stage's graph traced for one present set. The stage keeps one per present set
    it has seen (and per shape decision, Note [guards] in ``fxpp.ops``).
slot
    One tensor of the tuple that crosses cut ``k``, named by its *identity*
    (``fxpp.analysis.cuts.crossing_identity``: ``"hidden states"``, ``"input attention_mask"``,
    ``"per_layer_input of model.layers.3"``, ...).
layout
    The slots of cut ``k`` when every signature input is present, then the *header*.
    It depends only on the model, the signature and ``k``; never on one call.
header
    An ``int64`` tensor ``[layout id, present bits, filled bits...]`` ending every
    crossing tuple. The layout id hashes the signature and the slot identities, so a
    tuple from stages built for another signature is refused, not read in the wrong
    slots; the present bits tell the receiving stage which variant to run; the filled
    bits (62 slots a word) say which slots hold a computed value, so no stage ever
    reads a filler as data.

A variant that does not compute a slot (no padding mask in this call, no image
features) sends a zero *filler* of the slot's shape in its place, so every
microbatch of a schedule step sends the same shapes; the receiving variant never
reads it. A variant that would need to send a value the layout has no slot for is
refused with the value's name.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.fx import GraphModule

from .analysis.annotate import called_modules
from .analysis.cuts import crossing_slots
from .errors import CutError, StageInputError
from .inputs.names import DECODER_INPUTS, DECODER_TOKEN_INPUTS, stream_tokens
from .inputs.signature import InputSignature
from .meta import signature_record

HEADER = "fxpp header (layout id, inputs present, slots filled)"
_WORD = 62  # bits per header word: int64, kept non-negative
_HEADERS: dict = {}  # (layout id, cut, bits, filled, device) -> the header tensor (few: one per call pattern)


@dataclass(frozen=True)
class Slot:
    """One tensor of a crossing tuple, as the canonical variant sends it."""

    identity: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class CutLayout:
    """The slots of cut ``cut`` (then the header) for ``signature``."""

    cut: int
    signature: InputSignature
    slots: tuple[Slot, ...]

    def __post_init__(self) -> None:
        names = [s.identity for s in self.slots]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise StageInputError(f"cut {self.cut}: two crossing values share the identity {twice}")

    @functools.cached_property  # per call of a stage otherwise: a crc over every slot's name
    def id(self) -> int:
        text = "\n".join([*self.signature.names, "|", *(f"{s.identity}:{s.dtype}" for s in self.slots)])
        return zlib.crc32(text.encode()) & 0x7FFFFFFF

    @functools.cached_property
    def identities(self) -> tuple[str, ...]:
        return tuple(s.identity for s in self.slots)

    @property
    def header_size(self) -> int:
        return 2 + (len(self.slots) + _WORD - 1) // _WORD

    def header(self, bits: int, filled: Sequence[bool], device) -> torch.Tensor:
        """The header tensor, made once per (inputs present, slots filled, device) and reused:
        a new tensor from Python ints is a host-to-device copy, which on CUDA waits for the device."""
        key = (self.id, self.cut, bits, tuple(filled), device)
        cached = _HEADERS.get(key)
        if cached is None:
            words = [0] * (self.header_size - 2)
            for i, f in enumerate(filled):
                if f:
                    words[i // _WORD] |= 1 << (i % _WORD)
            cached = torch.tensor([self.id, bits, *words], dtype=torch.int64, device=device)
            _HEADERS[key] = cached
        return cached

    def pack(self, identities: Sequence[str], values: Sequence[torch.Tensor], bits: int, where: str) -> tuple:
        """A variant's outputs in the layout's slots, fillers for the rest, then the header.

        Raises:
            StageInputError: the variant sends a value the layout has no slot for.
        """
        plan = self._pack_plans.get(identities)
        if plan is None:
            unknown = [i for i in identities if i not in self.identities]
            if unknown:
                raise StageInputError(
                    f"{where}: with inputs {list(self.signature.present(bits))} the stage must send {unknown} across "
                    f"cut {self.cut}, but the stages were built to send {list(self.identities)} (with every input of "
                    f"{list(self.signature.names)}). Build the stages with example inputs like this call's"
                )
            position = {identity: i for i, identity in enumerate(identities)}
            plan = self._pack_plans[identities] = tuple(position.get(slot.identity) for slot in self.slots)
        stream = values[0]
        out = [values[i] if i is not None else self._filler(slot, stream) for slot, i in zip(self.slots, plan)]
        out.append(self.header(bits, tuple(i is not None for i in plan), stream.device))
        return tuple(out)

    @functools.cached_property  # per call otherwise: which value goes to which slot, for each tuple of identities
    def _pack_plans(self) -> dict[tuple[str, ...], tuple[int | None, ...]]:
        return {}

    def _filler(self, slot: Slot, stream: torch.Tensor) -> torch.Tensor:
        # Never read (the header marks it unfilled); its shape only keeps the schedule's
        # static metadata, which the sender checks (fxpp.runtime.stage.check_sent_shapes).
        shape = filler_shape(slot.shape, self.slots[0].shape[:2], tuple(stream.shape[:2]))
        # a floating slot takes the compute dtype, as the hidden states do (mixed precision:
        # the receive buffers are bf16, Note [mixed precision] in fxpp.runtime.parallel)
        dtype = stream.dtype if slot.dtype.is_floating_point and stream.is_floating_point() else slot.dtype
        return torch.zeros(shape, dtype=dtype, device=stream.device)

    def unpack(self, args: Sequence, where: str) -> tuple[int, dict[str, torch.Tensor]]:
        """The present bits and the received tensors by identity (fillers left out).

        Reads the header on the host (``tolist``); see :meth:`unpack_as` for the reads a
        schedule step saves.

        Raises:
            StageInputError: not a tuple of this layout (count, header, dtype or rank).
        """
        header = self._check_structure(args, where)
        layout_id, bits, *words = (int(v) for v in header.tolist())
        return bits, self._received(args, layout_id, bits, words, where)

    def unpack_as(self, args: Sequence, where: str, known: "KnownHeader") -> dict[str, torch.Tensor]:
        """The received tensors, read as ``known`` says (the step's first microbatch's header), without a host read.

        The header itself is compared with ``known.header`` on the device and the
        result kept in ``known.differs``; the stage's step end reads it once (Note
        [one header read per step]).
        """
        header = self._check_structure(args, where)
        differs = (header != known.header).any()
        known.differs = differs if known.differs is None else known.differs | differs
        return {slot.identity: value for slot, value in zip(self.slots, args) if slot.identity in known.received}

    def _check_structure(self, args: Sequence, where: str) -> torch.Tensor:
        """The header, after checking count, header dtype and shape, and each value's rank and kind (no data read)."""
        expected = len(self.slots) + 1
        if len(args) != expected:
            raise StageInputError(
                f"{where} expects the {expected} tensors that cross cut {self.cut} "
                f"({', '.join(self.identities)}, then the {HEADER}), got {len(args)}"
                + (" (model inputs go to the first stage only)" if not args else "")
            )
        header = args[-1]
        if (not isinstance(header, torch.Tensor) or header.dtype != torch.int64
                or tuple(header.shape) != (self.header_size,)):
            raise StageInputError(f"{where}: the last value crossing cut {self.cut} must be the {HEADER}; got "
                                  f"{_describe(header)}")
        for slot, value in zip(self.slots, args):
            if not isinstance(value, torch.Tensor):
                raise StageInputError(f"{where}: {slot.identity!r} must be a tensor, got {_describe(value)}")
            if value.dim() != len(slot.shape) or value.is_floating_point() != slot.dtype.is_floating_point:
                raise StageInputError(
                    f"{where}: {slot.identity!r} should be like {slot.dtype}{list(slot.shape)}, got {_describe(value)}"
                )
        return header

    def _received(self, args: Sequence, layout_id: int, bits: int, words: list[int], where: str) -> dict:
        if layout_id != self.id:
            raise StageInputError(
                f"{where}: the tuple crossing cut {self.cut} comes from stages built for another input signature or "
                f"another cut (layout id {layout_id}, expected {self.id}); this stage receives "
                f"{list(self.identities)} for inputs {list(self.signature.names)}. Build every stage of a pipeline "
                "from the same model and example inputs"
            )
        if bits & ~self.signature.all_bits:
            raise StageInputError(f"{where}: the {HEADER} names inputs outside the signature (bits {bits:#x})")
        return {slot.identity: value for i, (slot, value) in enumerate(zip(self.slots, args))
                if words[i // _WORD] >> (i % _WORD) & 1}


@dataclass
class KnownHeader:
    """The header of a schedule step's first microbatch at one cut, as its receiving stage read it.

    Note [one header read per step]
        A receiving stage must know, on the host, which inputs a call carries (to choose
        its graph variant) and which slots are filled (to read values by identity). A
        host read of the header per microbatch would make the CPU wait for each
        microbatch's receive, so it could not queue kernels ahead. Within one schedule
        step every microbatch is a slice of the same inputs, and the sender fills its
        slots the same way for all of them, so a stage inside a step reads the header of
        the first microbatch only (``CutLayout.unpack``), reads the later ones as that
        one said (``CutLayout.unpack_as``), and compares each later header with the
        first on the device, accumulating the result. After torch's step the schedule
        reads that flag, once per stage, and agrees on it over the pipeline group
        (``fxpp.runtime.schedule.PipelineSchedule._headers_differed``). Where a
        microbatch's header differed (the sender ran another graph variant for it, a
        decision on its data, and filled other slots), the step was read wrongly: every
        rank puts the gradients, the RNG state and the losses back as they were when the
        step started and runs the step again reading every header, and the schedule reads
        every header from then on. Microbatches split beforehand
        (``step_with_microbatches``: they may carry different inputs) and calls outside a
        schedule (``pipe(**inputs)``, a stage called directly) read every header.
    """

    header: torch.Tensor
    bits: int
    received: frozenset
    differs: torch.Tensor | None = None


def cut_layout(model_gm: GraphModule, k: int) -> CutLayout:
    """The fixed layout of cut ``k``: the canonical slots, then those only other present sets send.

    ``model_gm``: the canonical whole-model graph (``fxpp.compile.trace_canonical``); the
    layout is kept in its :class:`~fxpp.meta.SignatureRecord`.
    """
    record = signature_record(model_gm)
    if k not in record.layouts:
        slots: dict[str, Slot] = {}
        for gm in [model_gm, *record.variant_graphs.values()]:
            try:
                found = crossing_slots(gm.graph, k, called_modules(gm))
            except CutError:
                if gm is model_gm:
                    raise
                # This input set calls no layer after the cut (Mllama without images skips
                # its cross-attention layers): a call with it gets the CutError itself.
                continue
            for identity, val in found:
                slots.setdefault(identity, Slot(identity, tuple(val.shape), val.dtype))
        record.layouts[k] = CutLayout(k, record.signature, tuple(slots.values()))
    return record.layouts[k]


def step_shape(inputs: dict) -> tuple[int, ...] | None:
    """The sizes that fix a step's stage metadata: the stream's batch and sequence, and
    for an encoder-decoder model's inputs (with decoder tokens) a third entry, the size
    of the encoder's tokens and media per sample (the sum over those tensors, masks and
    positions left out): what crosses the cuts of such a model (the encoder's output)
    has the encoder's length, which does not follow the decoder's and may grow with the
    images (Florence 2 puts their features before the text). None where the inputs hold
    no tokens."""
    tokens = stream_tokens(inputs)
    if tokens is None:
        return None
    shape = (int(tokens.shape[0]), int(tokens.shape[1]))
    if not any(isinstance(inputs.get(n), torch.Tensor) for n in DECODER_TOKEN_INPUTS):
        return shape
    encoder = sum(int(v[0].numel()) for k, v in inputs.items()
                  if isinstance(v, torch.Tensor) and v.dim() > 0 and k not in DECODER_INPUTS
                  and "mask" not in k and "position" not in k)
    return (*shape, encoder)


def filler_shape(shape: tuple[int, ...], built: tuple[int, ...], now: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` (of a slot built for batch and sequence ``built``) for batch and sequence ``now``.

    The batch and sequence dimensions are the first adjacent pair equal to ``built``
    (``[B, S]`` masks, ``[3, B, S]`` multimodal positions, ``[B, S, H]`` features), else
    the first dimension equal to their product (``[B * S, experts]`` router logits);
    a shape with neither does not follow them (``[experts]`` sums) and is returned as is.
    """
    built, now = tuple(built), tuple(now)
    for i in range(len(shape) - 1):
        if tuple(shape[i:i + 2]) == built:
            return tuple(shape[:i]) + now + tuple(shape[i + 2:])
    if len(built) == 2 and built[0] * built[1] in shape:
        i = list(shape).index(built[0] * built[1])
        return tuple(shape[:i]) + (now[0] * now[1],) + tuple(shape[i + 1:])
    return tuple(shape)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"

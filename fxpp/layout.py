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
    ``int64`` values ``[layout id, present bits, filled bits..., shapes of the packed
    slots...]``. The layout id hashes the signature and the slot identities, so a
    tuple from stages built for another signature is refused, not read in the wrong
    slots; the present bits tell the receiving stage which variant to run; the filled
    bits (62 slots a word) say which slots hold a computed value, so no stage ever
    reads a filler as data; the shapes say where each packed slot lies.
packed slots
    The integer and boolean slots (padding masks, position ids, token ids). They cross
    as one ``int64`` tensor, the *packed tensor*: the header, then each packed slot
    flattened, in layout order (Note [packed slots]). So a tuple on the wire is the
    floating slots in layout order, then the packed tensor.

A variant that does not compute a slot (no padding mask in this call, no image
features) sends a zero *filler* of the slot's shape in its place, so every
microbatch of a schedule step sends the same shapes; the receiving variant never
reads it. A variant that would need to send a value the layout has no slot for is
refused with the value's name.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass, field
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
PACKED = "fxpp packed tensor"
_WORD = 62  # bits per header word: int64, kept non-negative
_HEADERS: dict = {}  # (layout id, cut, bits, filled, shapes, device) -> the header tensor (one per call pattern)
_MAX_HEADERS = 4096
# Lossless in int64 and back (what a packed slot may hold).
_PACKABLE = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


def packs(dtype: torch.dtype) -> bool:
    """Whether a slot of ``dtype`` crosses inside the packed tensor (Note [packed slots])."""
    return dtype in _PACKABLE


@dataclass(frozen=True)
class Slot:
    """One tensor of a crossing tuple, as the canonical variant sends it."""

    identity: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class CutLayout:
    """The slots of cut ``cut`` for ``signature``; on the wire, the tensor slots then the packed tensor.

    Note [packed slots]
        A gloo or NCCL message per tensor costs a round of latency on both ranks, and
        the integer values crossing a cut are small (a ``[B, S]`` padding mask and
        position ids, the header): sent one tensor each, a decoder-only model's cut took
        four messages per microbatch where hand-written stages send two (the hidden
        states and the mask). So they cross as one ``int64`` tensor, the header first:
        two messages. The header holds each packed slot's shape, so the receiving
        stage splits the tensor at the sender's own offsets; within a schedule step it
        reads the first microbatch's header only (Note [one header read per step]) and
        compares every later header, shapes included, on the device. Integer and
        boolean dtypes only: they are exact in ``int64`` and back; floating values
        (which may carry gradients) cross as tensors of their own.
    """

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

    @functools.cached_property
    def by_identity(self) -> dict[str, Slot]:
        return {s.identity: s for s in self.slots}

    @functools.cached_property
    def tensor_slots(self) -> tuple[int, ...]:
        """The slots that cross as tensors of their own (floating: they may carry gradients), in layout order."""
        return tuple(i for i, s in enumerate(self.slots) if not packs(s.dtype))

    @functools.cached_property
    def packed_slots(self) -> tuple[int, ...]:
        """The slots that cross inside the packed tensor (Note [packed slots]), in layout order."""
        return tuple(i for i, s in enumerate(self.slots) if packs(s.dtype))

    @functools.cached_property
    def wire_names(self) -> tuple[str, ...]:
        """What each tensor of a tuple on the wire is: the tensor slots' identities, then :data:`PACKED`."""
        return (*(self.slots[i].identity for i in self.tensor_slots), PACKED)

    @property
    def _words(self) -> int:
        return (len(self.slots) + _WORD - 1) // _WORD

    @functools.cached_property
    def header_size(self) -> int:
        return 2 + self._words + sum(len(self.slots[i].shape) for i in self.packed_slots)

    def wire_examples(self, shapes: Sequence[tuple[int, ...]], make) -> tuple:
        """A tuple on the wire for slots of ``shapes`` (layout order), each tensor ``make(shape, dtype)``:
        the static metadata of a schedule's stages (``fxpp.runtime.stage``)."""
        packed = self.header_size + sum(math.prod(shapes[i]) for i in self.packed_slots)
        return (*(make(tuple(shapes[i]), self.slots[i].dtype) for i in self.tensor_slots),
                make((packed,), torch.int64))

    def header(self, bits: int, filled: Sequence[bool], shapes: Sequence[tuple[int, ...]], device) -> torch.Tensor:
        """The header tensor, made once per (inputs present, slots filled, packed shapes, device) and reused:
        a new tensor from Python ints is a host-to-device copy, which on CUDA waits for the device."""
        key = (self.id, self.cut, bits, tuple(filled), tuple(shapes), device)
        cached = _HEADERS.get(key)
        if cached is None:
            words = [0] * self._words
            for i, f in enumerate(filled):
                if f:
                    words[i // _WORD] |= 1 << (i % _WORD)
            dims = [d for shape in shapes for d in shape]
            cached = torch.tensor([self.id, bits, *words, *dims], dtype=torch.int64, device=device)
            if len(_HEADERS) >= _MAX_HEADERS:  # shapes that change every step: start again, not grow
                _HEADERS.clear()
            _HEADERS[key] = cached
        return cached

    def pack(self, identities: Sequence[str], values: Sequence[torch.Tensor], bits: int, where: str) -> tuple:
        """A variant's outputs on the wire: the tensor slots (fillers where the variant sends
        nothing), then the packed tensor (Note [packed slots]).

        Raises:
            StageInputError: the variant sends a value the layout has no slot for, or an
                integer value of another number of dimensions than its slot.
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
        packed = [out[i] for i in self.packed_slots]
        for i, value in zip(self.packed_slots, packed):
            if value.dim() != len(self.slots[i].shape) or not packs(value.dtype):
                raise StageInputError(f"{where}: sends {self.slots[i].identity!r} as {_describe(value)}; its slot "
                                      f"across cut {self.cut} is like {self.slots[i].dtype}{list(self.slots[i].shape)}")
        header = self.header(bits, tuple(i is not None for i in plan), tuple(tuple(v.shape) for v in packed),
                             stream.device)
        # Each op here is a dispatcher call per microbatch: a slot already flat and int64 takes none.
        flat = [v if v.dim() == 1 else v.reshape(-1) for v in packed]
        wire = torch.cat([header, *(v if v.dtype == torch.int64 else v.to(torch.int64) for v in flat)])
        return (*(out[i] for i in self.tensor_slots), wire)

    @functools.cached_property  # per call otherwise: which value goes to which slot, for each tuple of identities
    def _pack_plans(self) -> dict[tuple[str, ...], tuple[int | None, ...]]:
        return {}

    def _filler(self, slot: Slot, stream: torch.Tensor) -> torch.Tensor:
        # Never read (the header marks it unfilled); its shape only keeps the schedule's
        # static metadata, which the sender checks (fxpp.runtime.stage.check_sent_shapes).
        # a floating slot takes the compute dtype, as the hidden states do (mixed precision:
        # the receive buffers are bf16, Note [mixed precision] in fxpp.runtime.parallel)
        dtype = stream.dtype if slot.dtype.is_floating_point and stream.is_floating_point() else slot.dtype
        # Kept for the last shape only (sequence lengths may change every step): never
        # read, never written (a receiver gets its own buffer), so one tensor serves every call.
        key, now = (slot.identity, dtype, stream.device), tuple(stream.shape[:2])
        kept = self._fillers.get(key)
        if kept is None or kept[0] != now:
            shape = filler_shape(slot.shape, self.slots[0].shape[:2], now)
            kept = self._fillers[key] = (now, torch.zeros(shape, dtype=dtype, device=stream.device))
        return kept[1]

    @functools.cached_property
    def _fillers(self) -> dict:
        return {}

    def unpack(self, args: Sequence, where: str) -> tuple[int, dict[str, torch.Tensor]]:
        """The present bits and the received tensors by identity (fillers left out).

        Reads the header on the host (``tolist``); see :meth:`read_header` and
        :meth:`unpack_as` for the reads a schedule step saves.

        Raises:
            StageInputError: not a tuple of this layout (count, header, dtype, rank or size).
        """
        known = self.read_header(args, where)
        return known.bits, self._values(args, known)

    def read_header(self, args: Sequence, where: str) -> "KnownHeader":
        """The header of a tuple on the wire, read on the host and checked (count, layout id, bits, sizes).

        Raises:
            StageInputError: as :meth:`unpack`.
        """
        wire = self._check_structure(args, where)
        layout_id, bits, *rest = (int(v) for v in wire[:self.header_size].tolist())
        words, dims = rest[:self._words], rest[self._words:]
        if layout_id != self.id:
            raise StageInputError(
                f"{where}: the tuple crossing cut {self.cut} comes from stages built for another input signature or "
                f"another cut (layout id {layout_id}, expected {self.id}); this stage receives "
                f"{list(self.identities)} for inputs {list(self.signature.names)}. Build every stage of a pipeline "
                "from the same model and example inputs"
            )
        if bits & ~self.signature.all_bits:
            raise StageInputError(f"{where}: the {HEADER} names inputs outside the signature (bits {bits:#x})")
        shapes = self._packed_shapes(dims)
        sizes = (self.header_size, *(math.prod(shape) for shape in shapes))
        if min((d for shape in shapes for d in shape), default=0) < 0 or sum(sizes) != wire.numel():
            raise StageInputError(
                f"{where}: the {PACKED} crossing cut {self.cut} holds {wire.numel()} values, but its header says "
                f"{self.header_size} + the slots {dict((self.slots[i].identity, list(s)) for i, s in zip(self.packed_slots, shapes))}")
        filled = frozenset(slot.identity for i, slot in enumerate(self.slots) if words[i // _WORD] >> (i % _WORD) & 1)
        return KnownHeader(wire[:self.header_size].clone(), bits, filled, tuple(shapes), sizes)

    def unpack_as(self, args: Sequence, where: str, known: "KnownHeader") -> dict[str, torch.Tensor]:
        """The received tensors, read as ``known`` says (the step's first microbatch's header), without a host read.

        The packed tensor is kept in ``known.later``; its header is compared with
        ``known.header`` on the device once, for every microbatch of the step together,
        when the step ends (:meth:`KnownHeader.differed`, Note [one header read per step]).

        Raises:
            StageInputError: as :meth:`unpack`, or a packed tensor of another size than the first's.
        """
        wire = self._check_structure(args, where)
        if wire.numel() != sum(known.sizes):
            raise StageInputError(f"{where}: the {PACKED} crossing cut {self.cut} holds {wire.numel()} values, the "
                                  f"step's first microbatch's {sum(known.sizes)}")
        known.later.append(wire)
        return self._values(args, known)

    def _values(self, args: Sequence, known: "KnownHeader") -> dict[str, torch.Tensor]:
        """The filled slots of a tuple on the wire by identity, in layout order; packed ones as views of
        the packed tensor (in their own dtype: a cast where it is not int64).

        One split of the packed tensor, and a view only where a filled slot has more than one
        dimension: each op is a dispatcher call per microbatch on a receiving stage's hot path.
        """
        parts = args[-1].split_with_sizes(known.sizes)  # the header, then each packed slot
        values = {}
        for i, slot in enumerate(self.slots):
            if slot.identity not in known.received:
                continue
            at = self._wire_index[i]
            if at < len(self.tensor_slots):
                values[slot.identity] = args[at]
                continue
            k = at - len(self.tensor_slots)  # its place among the packed slots
            shape, value = known.shapes[k], parts[k + 1]
            value = value.view(shape) if len(shape) != 1 else value
            values[slot.identity] = value if slot.dtype == torch.int64 else value.to(slot.dtype)
        return values

    @functools.cached_property
    def _wire_index(self) -> tuple[int, ...]:
        """Per slot, in layout order: its place among the tensor slots, or the number of tensor slots plus
        its place among the packed ones."""
        place = {i: n for n, i in enumerate(self.tensor_slots)}
        place.update((i, len(self.tensor_slots) + n) for n, i in enumerate(self.packed_slots))
        return tuple(place[i] for i in range(len(self.slots)))

    def _check_structure(self, args: Sequence, where: str) -> torch.Tensor:
        """The packed tensor, after checking count, its dtype and rank, and each tensor slot's rank and kind
        (no data read)."""
        expected = len(self.tensor_slots) + 1
        if len(args) != expected:
            raise StageInputError(
                f"{where} expects the {expected} tensors that cross cut {self.cut} "
                f"({', '.join(self.wire_names[:-1])}, then the {PACKED}: the {HEADER}"
                f"{''.join(', ' + self.slots[i].identity for i in self.packed_slots)}), got {len(args)}"
                + (" (model inputs go to the first stage only)" if not args else "")
            )
        wire = args[-1]
        if (not isinstance(wire, torch.Tensor) or wire.dtype != torch.int64 or wire.dim() != 1
                or wire.numel() < self.header_size):
            raise StageInputError(f"{where}: the last value crossing cut {self.cut} must be the {PACKED}; got "
                                  f"{_describe(wire)}")
        for i, value in zip(self.tensor_slots, args):
            slot = self.slots[i]
            if not isinstance(value, torch.Tensor):
                raise StageInputError(f"{where}: {slot.identity!r} must be a tensor, got {_describe(value)}")
            if value.dim() != len(slot.shape) or value.is_floating_point() != slot.dtype.is_floating_point:
                raise StageInputError(
                    f"{where}: {slot.identity!r} should be like {slot.dtype}{list(slot.shape)}, got {_describe(value)}"
                )
        return wire

    def sent_shapes(self, wire: torch.Tensor) -> dict[str, list[int]]:
        """The packed slots' shapes a packed tensor's header gives, by identity (a host read: error messages only)."""
        shapes = self._packed_shapes(wire[2 + self._words:self.header_size].tolist())
        return {self.slots[i].identity: list(shape) for i, shape in zip(self.packed_slots, shapes)}

    def _packed_shapes(self, dims: Sequence[int]) -> list[tuple[int, ...]]:
        """The header's dimensions split into each packed slot's shape, in layout order."""
        shapes, at = [], 0
        for i in self.packed_slots:
            n = len(self.slots[i].shape)
            shapes.append(tuple(dims[at:at + n]))
            at += n
        return shapes


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
        one said (``CutLayout.unpack_as``), and keeps their packed tensors. After torch's
        step the stage compares all their headers with the first at once on the device
        and reads the result (``KnownHeader.differed``: one op per step, not three per
        microbatch on the hot path), and the schedule agrees on it over the pipeline
        group (``fxpp.runtime.schedule.PipelineSchedule._headers_differed``). Where a
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
    received: frozenset  # the identities of the filled slots
    shapes: tuple[tuple[int, ...], ...] = ()  # the packed slots' shapes, in layout order
    sizes: tuple[int, ...] = ()  # the header's size, then each packed slot's number of values: how the tensor splits
    later: list = field(default_factory=list)  # the packed tensors of the step's later microbatches, read as this said

    def differed(self, layout: CutLayout) -> bool:
        """Whether a later microbatch's header differed from this one (one comparison on the device for the
        whole step, and one host read).

        The packed tensors are the schedule's receive buffers (one per microbatch) or a
        previous stage's outputs on this rank, untouched until the next step. Were two of
        them one buffer, the earlier header would be gone: that counts as differing, and
        the step is run again reading every header, so it can only cost time.
        """
        if not self.later:
            return False
        if len({w.data_ptr() for w in self.later}) != len(self.later):
            return True
        # the headers only (views), not every packed value: those may be long (a mask per token)
        headers = torch.stack([w[:layout.header_size] for w in self.later])
        return bool((headers != self.header).any())


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

"""Note [packed slots] (``fxpp.layout``): the integer slots and the header cross a cut as one int64 tensor.

On hand-made layouts (no model): a tuple packed for any filled subset and any batch and
sequence size unpacks to exactly the values sent, read once (``unpack``) or as a step's
first microbatch said (``unpack_as``); a packed tensor whose header disagrees with its
size is refused. On a model: a decoder-only cut sends two tensors (hidden states and the
packed tensor), what hand-written stages send.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxpp
from fxpp.inputs.signature import InputSignature
from fxpp.layout import PACKED, CutLayout, Slot

from .helpers import cached_model, make_inputs

B0, S0 = 2, 5  # the shapes the layout was "built" for
SIGNATURE = InputSignature(names=("input_ids", "attention_mask", "position_ids"))
SLOTS = (
    Slot("hidden states", (B0, S0, 8), torch.float32),
    Slot("input attention_mask", (B0, S0), torch.int64),
    Slot("a boolean mask", (B0, S0), torch.bool),
    Slot("multimodal positions", (3, B0, S0), torch.int32),
    Slot("image features", (B0, S0, 4), torch.float32),
    Slot("input position_ids", (B0, S0), torch.int64),
)


def _value(slot: Slot, b: int, s: int, g: torch.Generator) -> torch.Tensor:
    shape = tuple({B0: b, S0: s}.get(d, d) if i < 3 else d for i, d in enumerate(slot.shape))
    if slot.dtype.is_floating_point:
        return torch.randn(shape, generator=g)
    if slot.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(-2**31, 2**31 - 1, shape, generator=g).to(slot.dtype)


@settings(max_examples=60, deadline=None)
@given(filled=st.lists(st.booleans(), min_size=len(SLOTS) - 1, max_size=len(SLOTS) - 1),
       b=st.integers(1, 4), s=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_a_packed_tuple_unpacks_to_the_values_sent(filled, b, s, seed):
    layout = CutLayout(3, SIGNATURE, SLOTS)
    g = torch.Generator().manual_seed(seed)
    chosen = [SLOTS[0]] + [slot for slot, f in zip(SLOTS[1:], filled) if f]  # hidden states always sent
    values = [_value(slot, b, s, g) for slot in chosen]
    wire = layout.pack(tuple(slot.identity for slot in chosen), values, bits=0b011, where="test")
    # floating slots (fillers included) as tensors of their own, then one int64 tensor
    assert len(wire) == 3 and wire[-1].dtype == torch.int64 and wire[-1].dim() == 1
    bits, got = layout.unpack(wire, "test")
    assert bits == 0b011 and set(got) == {slot.identity for slot in chosen}
    for slot, value in zip(chosen, values):
        assert got[slot.identity].dtype == value.dtype and torch.equal(got[slot.identity], value), slot.identity
    known = layout.read_header(wire, "test")  # a later microbatch read as the first said: the same values
    again = layout.unpack_as(wire, "test", known)
    assert all(torch.equal(again[k], got[k]) for k in got) and not known.differed(layout)


def test_a_header_that_disagrees_with_the_packed_size_is_refused():
    layout = CutLayout(3, SIGNATURE, SLOTS)
    g = torch.Generator().manual_seed(0)
    wire = layout.pack(tuple(s.identity for s in SLOTS), [_value(s, B0, S0, g) for s in SLOTS], 0b111, "test")
    forged = wire[-1].clone()
    forged[layout.header_size - 1] += 1  # the last packed slot's last dimension, one larger than sent
    with pytest.raises(fxpp.StageInputError, match=rf"the {PACKED} crossing cut 3 holds \d+ values, but its header"):
        layout.unpack((*wire[:-1], forged), "test")
    with pytest.raises(fxpp.StageInputError, match=rf"must be the {PACKED}"):
        layout.unpack((*wire[:-1], forged.float()), "test")
    # within a step, a later microbatch of another size than the first is refused, not split wrongly
    known = layout.read_header(wire, "test")
    with pytest.raises(fxpp.StageInputError, match="the step's first microbatch's"):
        layout.unpack_as((*wire[:-1], wire[-1][:-1]), "test", known)


def test_a_later_header_that_differs_is_found_at_the_step_end():
    """Within a step the later microbatches are read as the first's header said; their headers
    are compared with it once, at the step's end (Note [one header read per step])."""
    layout = CutLayout(3, SIGNATURE, SLOTS)
    g = torch.Generator().manual_seed(0)
    all_sent = layout.pack(tuple(s.identity for s in SLOTS), [_value(s, B0, S0, g) for s in SLOTS], 0b111, "test")
    # the same shapes, one slot left unfilled (another graph variant's sends): only the header differs
    fewer = layout.pack(tuple(s.identity for s in SLOTS[:-1]), [_value(s, B0, S0, g) for s in SLOTS[:-1]], 0b111,
                        "test")
    assert fewer[-1].numel() == all_sent[-1].numel()
    for later, differs in (([all_sent, all_sent], False), ([all_sent, fewer], True), ([fewer, all_sent], True)):
        known = layout.read_header(all_sent, "test")
        for wire in later:  # fresh tensors, as a schedule's receive buffers (one per microbatch) are
            layout.unpack_as(tuple(t.clone() for t in wire), "test", known)
        assert known.differed(layout) is differs
    # two microbatches read from one buffer: the earlier header is gone, so it counts as differing
    known = layout.read_header(all_sent, "test")
    layout.unpack_as(all_sent, "test", known)
    layout.unpack_as(all_sent, "test", known)
    assert known.differed(layout)


def test_a_decoder_only_cut_sends_two_tensors():
    """Hidden states and the packed tensor (mask, position ids, header): two messages per
    microbatch and cut, what hand-written stages send (hidden states and the mask)."""
    pipe = fxpp.pipeline(cached_model("llama", 4), 2)
    out = pipe.stages[0](**make_inputs(2, 5))
    assert len(out) == 2 and out[0].dtype == torch.float32 and out[1].dtype == torch.int64
    assert pipe.stages[1].in_layout.wire_names == ("hidden states", PACKED)

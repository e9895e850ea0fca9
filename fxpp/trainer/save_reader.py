"""Reading a saved step: its tensors planned from the stage files' headers, read by rows.

A save's tensors are planned from the stage files' headers (:func:`saved_tensors`: dp
shards and tp parts joined, copies found) and read by rows (:class:`SaveReader`), so ``fxpp export``
(fxpp/trainer/export.py) never holds the model. Only the files the step's ``state.json``
lists are read, after verifying their sizes and checksums (Note [durable saves] in
fxpp/trainer/run_state.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError
from ..runtime.checkpoint import DTYPES, SHARDS_KEY, read_rows, safetensors_header
from ..runtime.tp_checkpoint import TP_INDEX_KEY, Index, blocks, from_json, local_shape
from ..runtime.tp_checkpoint import show_index as show
from .step_files import read_step_state, step_stage_files


def _stage_files(directory: str, state: dict | None, files: list[str] | None = None) -> list[str]:
    """The stage files of a step directory: ``files`` where given, else those its ``state.json``
    (or ``state``) lists, verified (:func:`~fxpp.trainer.step_files.step_stage_files`).

    Raises:
        DamagedSaveError: a listed file is missing or damaged, naming it.
        CheckpointError: ``files`` is empty.
    """
    if files is not None:
        if not files:
            raise CheckpointError(f"{directory}: no stage-*.safetensors files")
        return list(files)
    return step_stage_files(directory, read_step_state(directory) if state is None else state)


@dataclass(frozen=True)
class _Piece:
    """Rows ``[start, stop)`` of a saved tensor, as one stage file holds them (a 0-d tensor: row 0);
    or, with ``index``, the part of a tp stage file (``fxpp.runtime.tp_checkpoint``, Terms: its local
    index; ``start``/``stop`` then span its rows)."""

    file: str
    entry: dict = field(compare=False)  # the file's header entry: dtype, shape, data_offsets
    data_start: int
    start: int
    stop: int
    index: Index | None = None


@dataclass(frozen=True)
class SavedTensor:
    """A tensor of a save, from the stage files' headers: its whole shape, its stored dtype, the
    pieces holding each row once (in row order) and other copies of some rows (dp replicas, a
    weight two stages hold), which must equal them."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    sharded: bool
    pieces: tuple[_Piece, ...]
    copies: tuple[_Piece, ...]

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


def saved_tensors(directory: str, state: dict | None = None, files: list[str] | None = None
                  ) -> dict[str, SavedTensor]:
    """Every tensor of a step directory's stage files, planned from the headers alone (no tensor read).

    Raises:
        CheckpointError: a shard whose rows disagree with its metadata, shards that do not cover
            a tensor's rows exactly once, copies of a tensor of other shapes or dtypes, a tensor
            both whole and sharded.
    """
    found: dict[str, list[tuple[_Piece, tuple[int, ...], torch.dtype, bool]]] = {}
    for path in _stage_files(directory, state, files):
        header, data_start, metadata = safetensors_header(path)
        try:
            shards = json.loads(metadata.get(SHARDS_KEY, "{}"))
            parts = {k: (tuple(v["shape"]), from_json(v["index"]))
                     for k, v in json.loads(metadata.get(TP_INDEX_KEY, "{}")).items()}
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: its {SHARDS_KEY} or {TP_INDEX_KEY} metadata is not fxpp's ({e})") from e
        for key, entry in header.items():
            shape = tuple(entry["shape"])
            if key in parts:
                whole, index = parts[key]
                _check_part(path, key, shape, whole, index)
                rows = index[0] if index else ((0, 1),)
                found.setdefault(key, []).append((_Piece(path, entry, data_start, min((a for a, _ in rows), default=0),
                                                         max((b for _, b in rows), default=0), index),
                                                  whole, DTYPES[entry["dtype"]], True))
                continue
            if key in shards:
                start, stop, total = shards[key]
                if not shape or shape[0] != stop - start:
                    raise CheckpointError(f"{path}: {key} has {shape[0] if shape else 'no'} rows, its metadata says "
                                          f"rows {start}-{stop}")
                whole = (total, *shape[1:])
            else:
                start, stop, whole = 0, shape[0] if shape else 1, shape
            found.setdefault(key, []).append((_Piece(path, entry, data_start, start, stop), whole,
                                              DTYPES[entry["dtype"]], key in shards))
    return {key: _join(key, found[key], directory) for key in sorted(found)}


def _check_part(path: str, key: str, shape: tuple, whole: tuple, index: Index) -> None:
    """A tp part's stored shape is its index's, and its index lies inside the whole shape."""
    if len(index) != len(whole) or local_shape(index) != shape or any(
            not 0 <= a < b <= n for runs, n in zip(index, whole) for a, b in runs):
        raise CheckpointError(f"{path}: {key} has shape {list(shape)}, its metadata says part {show(index)} of "
                              f"{list(whole)}")


def _join(key: str, found: list, directory: str) -> SavedTensor:
    """The pieces of ``key`` as one tensor: each row once, the rest copies (:func:`saved_tensors`)."""
    first, shape, dtype, sharded = found[0]
    for piece, other_shape, other_dtype, other_sharded in found[1:]:
        if other_sharded != sharded or (piece.index is None) != (first.index is None):
            raise CheckpointError(f"{key} is both whole and sharded in {directory}")
        if (other_shape, other_dtype) != (shape, dtype):
            raise CheckpointError(f"{key} is {other_shape} {other_dtype} in {piece.file}, {shape} {dtype} in "
                                  f"{first.file}: copies of one tensor must agree")
    if first.index is not None:
        return _join_parts(key, [f[0] for f in found], shape, dtype, directory)
    total = shape[0] if shape else 1
    pieces: list[_Piece] = []
    copies: list[_Piece] = []
    row = 0
    for piece in sorted((f[0] for f in found), key=lambda p: (p.start, p.stop)):  # stable: files in order
        if piece.start < row:  # the same rows from another file (a weight two stages hold): must be equal
            if not any((p.start, p.stop) == (piece.start, piece.stop) for p in pieces):
                raise CheckpointError(f"{piece.file}: rows {piece.start}-{piece.stop} of {key} overlap other "
                                      "shards' rows without matching one")
            copies.append(piece)
            continue
        if piece.start != row:
            raise CheckpointError(f"{key}: rows {row}-{piece.start} of {total} are in no shard file of {directory}")
        pieces.append(piece)
        row = piece.stop
    if row != total:
        raise CheckpointError(f"{key}: rows {row}-{total} are in no shard file of {directory}")
    return SavedTensor(key, shape, dtype, sharded, tuple(pieces), tuple(copies))


def _overlap(a: Index, b: Index) -> bool:
    """Whether two parts share an element: in every dimension some run of one meets a run of the other."""
    return all(any(max(a0, b0) < min(a1, b1) for a0, a1 in ra for b0, b1 in rb) for ra, rb in zip(a, b))


def _join_parts(key: str, found: list[_Piece], shape: tuple, dtype: torch.dtype, directory: str) -> SavedTensor:
    """The tp parts of ``key`` as one tensor: parts that do not meet, covering every element once;
    a part repeated exactly (a dp replica) is a copy, one that meets another otherwise is refused."""
    pieces: list[_Piece] = []
    copies: list[_Piece] = []
    for piece in sorted(found, key=lambda p: (p.index, p.file)):
        if any(p.index == piece.index for p in pieces):
            copies.append(piece)
            continue
        clash = next((p for p in pieces if _overlap(p.index, piece.index)), None)
        if clash is not None:
            raise CheckpointError(f"{piece.file}: part {show(piece.index)} of {key} meets part {show(clash.index)} of "
                                  f"{clash.file} without matching it")
        pieces.append(piece)
    covered = sum(math.prod(local_shape(p.index)) for p in pieces)
    if covered != math.prod(shape):
        raise CheckpointError(f"{key}: the tp parts in {directory} ({', '.join(show(p.index) for p in pieces)}) hold "
                              f"{covered} of its {math.prod(shape)} elements {list(shape)}; a rank's stage file is "
                              "missing")
    return SavedTensor(key, shape, dtype, True, tuple(pieces), tuple(copies))


CHUNK_BYTES = 32 * 2**20  # the most bytes of one tensor a SaveReader reads at once


def row_chunks(saved: SavedTensor, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int]]:
    """Row ranges of at most :data:`CHUNK_BYTES` (at least one row) covering rows ``[start, stop)``."""
    stop = saved.rows if stop is None else stop
    row_bytes = saved.dtype.itemsize * math.prod(saved.shape[1:])
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    for begin in range(start, stop, step):
        yield begin, min(stop, begin + step)


class SaveReader:
    """Reads rows of a save's tensors (:func:`saved_tensors`) from the stage files, each opened once.

    Nothing is memory-mapped. A read fills a fresh tensor, or one of the reader's scratch
    buffers (:meth:`scratch`), which are kept and grown to the largest chunk: a caller that
    reads :func:`row_chunks` into them allocates a chunk once, not once per chunk (freed
    chunks of tens of MB stay in the process with glibc's default malloc settings, so a
    fresh buffer per chunk would cost several chunks of resident memory).
    """

    def __init__(self):
        self._handles: dict = {}
        self._scratch: dict[int, torch.Tensor] = {}

    def __enter__(self) -> SaveReader:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._scratch.clear()

    def _file(self, path: str):
        if path not in self._handles:
            self._handles[path] = open(path, "rb")  # noqa: SIM115 - closed by __exit__
        return self._handles[path]

    def scratch(self, slot: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A ``shape`` x ``dtype`` view of the reader's scratch buffer ``slot``, valid until the next
        call with that slot."""
        nbytes = math.prod(shape) * dtype.itemsize
        if slot not in self._scratch or self._scratch[slot].numel() < nbytes:
            self._scratch.pop(slot, None)
            self._scratch[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return self._scratch[slot][:nbytes].view(dtype).view(shape)

    def rows(self, saved: SavedTensor, start: int, stop: int, pieces=None, slot: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``saved`` (a 0-d tensor: itself) in its stored dtype, from
        ``pieces`` (default: the pieces holding each row once), in scratch buffer ``slot`` (default:
        a fresh tensor)."""
        shape = (stop - start, *saved.shape[1:]) if saved.shape else ()
        out = torch.empty(shape, dtype=saved.dtype) if slot is None else self.scratch(slot, saved.dtype, shape)
        for p in saved.pieces if pieces is None else pieces:
            if p.index is not None:
                self._part_rows(saved, p, start, stop, out)
                continue
            lo, hi = max(start, p.start), min(stop, p.stop)
            if lo < hi:
                read_rows(self._file(p.file), p.entry, p.data_start, slice(lo - p.start, hi - p.start),
                          out[lo - start:hi - start] if saved.shape else out)
        return out

    def _part_rows(self, saved: SavedTensor, p: _Piece, start: int, stop: int, out: torch.Tensor) -> None:
        """Rows ``[start, stop)`` of a tp part's share of ``saved`` into ``out`` (rows ``start``... of the
        whole tensor): each run of its rows read from the file (one contiguous range of the stored
        part) into scratch buffer 2, then each block of the other dimensions put in its place."""
        if not saved.shape:
            read_rows(self._file(p.file), p.entry, p.data_start, slice(0, 1), out)
            return
        local = 0
        for first, end in p.index[0]:
            lo, hi = max(start, first), min(stop, end)
            if lo < hi:
                rows = self.scratch(2, saved.dtype, (hi - lo, *p.entry["shape"][1:]))
                read_rows(self._file(p.file), p.entry, p.data_start, slice(local + lo - first, local + hi - first), rows)
                for whole, mine in blocks(p.index[1:]):
                    out[(slice(lo - start, hi - start), *whole)] = rows[(slice(None), *mine)]
            local += end - first

    def _stored_rows(self, p: _Piece, dtype: torch.dtype, start: int, stop: int, slot: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of what a stage file stores for ``p`` (a 0-d tensor: itself), in scratch ``slot``."""
        shape = tuple(p.entry["shape"])
        out = self.scratch(slot, dtype, (stop - start, *shape[1:]) if shape else ())
        read_rows(self._file(p.file), p.entry, p.data_start, slice(start, stop), out)
        return out

    def check_copies(self, saved: SavedTensor) -> None:
        """Every copy of ``saved``'s rows (or tp parts) equals the piece it repeats, compared chunk by chunk.

        Raises:
            CheckpointError: naming the key and both files.
        """
        for copy in saved.copies:
            if copy.index is not None:
                primary = next(p for p in saved.pieces if p.index == copy.index)
                stored = tuple(copy.entry["shape"])
                rows = stored[0] if stored else 1
                step = max(1, CHUNK_BYTES // max(saved.dtype.itemsize * math.prod(stored[1:]), 1))
                for start in range(0, rows, step):
                    stop = min(rows, start + step)
                    if not torch.equal(self._stored_rows(copy, saved.dtype, start, stop, 0),
                                       self._stored_rows(primary, saved.dtype, start, stop, 1)):
                        raise CheckpointError(f"{saved.key} part {show(copy.index)} differs between {primary.file} "
                                              f"and {copy.file}: copies of one tensor must be equal")
                continue
            for start, stop in row_chunks(saved, copy.start, copy.stop):
                if not torch.equal(self.rows(saved, start, stop, [copy], slot=0), self.rows(saved, start, stop, slot=1)):
                    primary = next(p for p in saved.pieces if (p.start, p.stop) == (copy.start, copy.stop))
                    rows = f" rows {copy.start}-{copy.stop}" if saved.sharded else ""
                    raise CheckpointError(f"{saved.key}{rows} differs between {primary.file} and {copy.file}: "
                                          "copies of one tensor must be equal")

    def equal(self, a: SavedTensor, b: SavedTensor) -> bool:
        """Whether two saved tensors (a tied weight's two keys) hold the same values, chunk by chunk."""
        return a.shape == b.shape and all(
            torch.equal(self.rows(a, start, stop, slot=0), self.rows(b, start, stop, slot=1))
            for start, stop in row_chunks(a))


def whole_tensors(directory: str, state: dict | None = None, files: list[str] | None = None
                  ) -> dict[str, torch.Tensor]:
    """Every tensor of a step directory's stage files, dp shards joined, replicas checked equal.

    Holds the whole model in memory (tests, a LoRA run's adapters); ``fxpp export`` streams
    instead (fxpp/trainer/export.py).

    Raises:
        CheckpointError: see :func:`saved_tensors`; or two copies of a tensor (dp replicas, a
            weight two stages hold) that differ.
    """
    saved = saved_tensors(directory, state, files)
    with SaveReader() as reader:
        for tensor in saved.values():
            reader.check_copies(tensor)
        return {key: reader.rows(tensor, 0, tensor.rows) for key, tensor in saved.items()}

"""Real text for ``fxpp run --data``: documents read from files, tokenized once, packed into batches.

Terms:
    document: one non-empty line of a text file; the ``--text-field`` value (default
        ``"text"``) of one JSON-lines record (``.jsonl``/``.json``) or of one parquet row
        (``.parquet``). A null value is no document; a document the tokenizer turns into
        no tokens is dropped.
    tokenized documents: the documents' token ids, in file order. ``fxpp run`` keeps them
        in an on-disk cache that every rank memory-maps (``fxpp.trainer.corpus``); a plain
        list of lists of ids works the same (the tests').
    stream: the tokenized documents repeated without end, one *pass* after another;
        every pass in file order, or with ``--shuffle-seed N`` each pass in its own
        permutation (the same on every rank: it depends on N and the pass only).
    packed sequence: ``seq_len`` tokens taken from consecutive documents of the stream;
        a document that does not fit continues in the next sequence.
    position: ``DataPosition(document, token)``, the first token not yet handed out:
        ``document`` counts documents of the stream (pass ``document // n``, its
        ``document % n``-th document, of ``n``), ``token`` the offset in it. Saved with a
        checkpoint so that ``--resume`` continues with exactly the next tokens.

Packed batches carry ``position_ids`` that restart at 0 at every document start and no
``attention_mask``: transformers finds the documents from the restarts and masks attention
across them (``find_packed_sequence_indices`` in ``masking_utils.py``; it does so only when
no attention mask is given).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from transformers import AutoTokenizer

from ..errors import DataError

JSON_LINES = (".jsonl", ".json")
PARQUET = (".parquet",)


@dataclass(frozen=True)
class DataPosition:
    """Where the next token comes from: document index in the stream (over passes), token offset in it."""

    document: int = 0
    token: int = 0


def check_files(paths: Sequence[str], flag: str = "--data") -> None:
    """Raises DataError for a path that is no file (before anything is read)."""
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{flag} {path!r}: no such file")


def is_structured(path: str) -> bool:
    """Whether ``path``'s documents are a field of records (JSON lines, parquet), not lines of text."""
    return path.endswith(JSON_LINES + PARQUET)


def iter_documents(paths: Sequence[str], text_field: str = "text", flag: str = "--data") -> Iterator[str]:
    """The documents of ``paths``, in order, one file at a time (nothing held beyond one line or row group).

    Raises:
        DataError: a missing file, a text or JSON-lines file that is not UTF-8 (naming the
            byte), a JSON line that is no record, a record or parquet file without ``text_field``.
    """
    check_files(paths, flag)
    for path in paths:
        if path.endswith(PARQUET):
            yield from _parquet_documents(path, text_field, flag)
            continue
        structured = path.endswith(JSON_LINES)
        for n, line in _lines(path, flag):
            if not line.strip():
                continue
            if not structured:
                yield line
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{flag} {path}:{n}: not a JSON record ({e})") from None
            if not isinstance(record, dict) or text_field not in record:
                fields = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{flag} {path}:{n}: no field {text_field!r} (--text-field {text_field}; "
                                f"the record has: {fields or 'nothing'})")
            if record[text_field] is not None:
                yield str(record[text_field])


def _lines(path: str, flag: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 file with universal newlines, as text-mode reading splits.

    Read in binary, one ``\\n``-ended line at a time: ``\\n`` never occurs inside a UTF-8
    sequence, so a decoding error's byte offset is the file's. ``\\r\\n`` and a lone ``\\r``
    end lines too (not ``str.splitlines``' other separators).
    """
    offset = n = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{flag} {path}: not UTF-8 text (byte {offset + e.start}: "
                                f"{raw[e.start:e.start + 4]!r})") from None
            offset += len(raw)
            if text.endswith("\n"):
                text = text[:-2] if text.endswith("\r\n") else text[:-1]
            for line in text.split("\r"):
                n += 1
                yield n, line


def _parquet_documents(path: str, text_field: str, flag: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # optional extra: pyarrow comes with datasets (pip install 'fxpp[data]')

    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{flag} {path}: cannot read as parquet ({type(e).__name__}: {e})") from None
    names = f.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{flag} {path}: no column {text_field!r} (--text-field {text_field}; the columns: "
                        f"{', '.join(names) or 'none'})")
    for batch in f.iter_batches(batch_size=1024, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield value if isinstance(value, str) else str(value)


def read_documents(paths: list[str], text_field: str = "text", flag: str = "--data") -> list[str]:
    """Every document of ``paths`` as a list (small files: validation text, the tests).

    Raises:
        DataError: as :func:`iter_documents`, or no documents at all.
    """
    docs = list(iter_documents(paths, text_field, flag))
    if not docs:
        raise DataError(f"{flag} {' '.join(paths)}: no documents")
    return docs


def load_tokenizer(directory: str):
    """The tokenizer saved in ``directory`` (local files only, never a hub)."""
    if not os.path.isdir(directory) or not any(
        os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        raise DataError(f"--data needs a tokenizer, and {directory!r} has none (no tokenizer.json, "
                        "tokenizer_config.json or tokenizer.model); save one next to the weights "
                        "or run without --data (random token ids)")
    try:
        # trust_remote_code=False: never import code from the checkpoint folder, never prompt on stdin
        return AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise DataError(f"{directory}: cannot load its tokenizer ({type(e).__name__}: {e})") from e


def tokenize(documents: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each document (no special tokens added; empty documents dropped).

    The cache (``fxpp.trainer.corpus``) calls the tokenizer the same way, on batches of documents.
    """
    out = tokenizer(list(documents), add_special_tokens=False)["input_ids"] if documents else []
    return [list(ids) for ids in out if len(ids)]


class PackedBatches:
    """Batches of ``batch`` packed sequences of ``seq_len`` tokens, from a position, over the stream.

    Args:
        docs: the tokenized documents: anything with ``len`` whose items slice into token
            ids (lists of ints, or ``fxpp.trainer.corpus.TokenizedDocuments``' memory-mapped views).
        batch, seq_len: the batch's shape.
        position: where to start (a resumed run's saved position).
        shuffle_seed: None for every pass in file order, else each pass in the permutation
            :func:`pass_order` gives.

    Each batch is ``{"input_ids", "position_ids", "labels"}``, all ``[batch, seq_len]``
    int64. Labels are the ids with the first token of every document set to -100.

    Note [labels of packed documents]: transformers' loss shifts labels by one, so the
    label at a document's first token is the target predicted from the previous token,
    the last token of *another* document. Attention cannot cross documents, so that
    prediction would be a guess from an unrelated context; -100 drops it, and each
    document is trained exactly as if it were alone in its sequence (its first token
    has nothing to be predicted from either way). The same holds where a document
    continues into the next sequence: its continuation restarts at position 0 and is a
    new document for the model, so its first token is also -100.
    """

    def __init__(self, docs, batch: int, seq_len: int, position: DataPosition = DataPosition(),
                 shuffle_seed: int | None = None):
        if not len(docs):
            raise DataError("no tokens to train on")
        self.docs, self.batch, self.seq_len, self.shuffle_seed = docs, batch, seq_len, shuffle_seed
        self.position = position
        self._order: tuple[int, np.ndarray] | None = None  # (pass, its permutation): one pass's at a time

    def _document(self, d: int):
        n = len(self.docs)
        p, k = divmod(d, n)
        if self.shuffle_seed is None:
            return self.docs[k]
        if self._order is None or self._order[0] != p:
            self._order = (p, pass_order(n, self.shuffle_seed, p))
        return self.docs[int(self._order[1][k])]

    def _sequence(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, pos, labels = [], [], []
        have = 0
        d, t = self.position.document, self.position.token
        while have < self.seq_len:
            doc = self._document(d)
            take = np.asarray(doc[t: t + self.seq_len - have], dtype=np.int64)
            if len(take):  # nothing only where a position points at a document's end (never saved so)
                ids.append(take)
                pos.append(np.arange(len(take), dtype=np.int64))
                label = take.copy()
                label[0] = -100
                labels.append(label)
                have += len(take)
            t += len(take)
            if t >= len(doc):
                d, t = d + 1, 0
        self.position = DataPosition(d, t)
        return np.concatenate(ids), np.concatenate(pos), np.concatenate(labels)

    def next(self) -> dict[str, torch.Tensor]:
        rows = [self._sequence() for _ in range(self.batch)]
        return {k: torch.from_numpy(np.stack([r[i] for r in rows]))
                for i, k in enumerate(("input_ids", "position_ids", "labels"))}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next()


def pass_order(n: int, seed: int, p: int) -> np.ndarray:
    """The order of the ``n`` documents in pass ``p`` under ``--shuffle-seed seed``: a permutation.

    NumPy's PCG64 seeded with ``(seed, p)``: the same on every rank and in every run of
    one environment (``datasets``' own ``Dataset.shuffle`` permutes the same way), a new
    order each pass, and a function of the pass alone, so a resumed run finds it again.
    """
    return np.random.default_rng([seed, p]).permutation(n)

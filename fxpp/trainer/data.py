"""Real text for ``fxpp run --data``: documents tokenized with the checkpoint's own tokenizer, packed.

Terms:
    document: one line of a text file, or the ``"text"`` field of one JSON-lines record.
    packed sequence: ``seq_len`` tokens taken from consecutive documents; a document that
        does not fit continues in the next sequence.
    position: ``DataPosition(document, token)``, the first token not yet handed out; saved
        with a checkpoint so that ``--resume`` continues with exactly the next tokens.

Packed batches carry ``position_ids`` that restart at 0 at every document start and no
``attention_mask``: transformers finds the documents from the restarts and masks attention
across them (``find_packed_sequence_indices`` in ``masking_utils.py``; it does so only when
no attention mask is given).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import AutoTokenizer

from ..errors import DataError


@dataclass(frozen=True)
class DataPosition:
    """Where the next token comes from: document index over all files, token offset in it."""

    document: int = 0
    token: int = 0


def read_documents(paths: list[str]) -> list[str]:
    """The documents of ``paths``: ``.jsonl``/``.json`` records' ``"text"``, else one per non-empty line."""
    docs: list[str] = []
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"--data {path!r}: no such file")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"--data {path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r})") from None
        # universal newlines, as text-mode reading splits (not str.splitlines' other separators)
        for n, line in enumerate(content.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
            if not line.strip():
                continue
            if path.endswith((".jsonl", ".json")):
                try:
                    record = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(f"--data {path}:{n}: not a JSON record with a \"text\" field ({e})") from e
                docs.append(str(record))
            else:
                docs.append(line)
    if not docs:
        raise DataError(f"--data {' '.join(paths)}: no documents")
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
    """Token ids of each document (no special tokens added; empty documents dropped)."""
    out = [list(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in documents]
    return [ids for ids in out if ids]


class PackedBatches:
    """Batches of ``batch`` packed sequences of ``seq_len`` tokens, from a position, cycling over the data.

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

    def __init__(self, docs: list[list[int]], batch: int, seq_len: int, position: DataPosition = DataPosition()):
        if not docs:
            raise DataError("no tokens to train on")
        self.docs, self.batch, self.seq_len = docs, batch, seq_len
        self.position = DataPosition(position.document % len(docs), position.token)

    def _sequence(self) -> tuple[list[int], list[int], list[int]]:
        ids: list[int] = []
        pos: list[int] = []
        labels: list[int] = []
        d, t = self.position.document, self.position.token
        while len(ids) < self.seq_len:
            doc = self.docs[d]
            take = doc[t: t + self.seq_len - len(ids)]
            ids += take
            pos += range(len(take))
            labels += [-100] + take[1:]
            t += len(take)
            if t >= len(doc):
                d, t = (d + 1) % len(self.docs), 0
        self.position = DataPosition(d, t)
        return ids, pos, labels

    def next(self) -> dict[str, torch.Tensor]:
        rows = [self._sequence() for _ in range(self.batch)]
        return {k: torch.tensor([r[i] for r in rows], dtype=torch.long)
                for i, k in enumerate(("input_ids", "position_ids", "labels"))}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next()

"""The tokenized corpus on disk: ``--data`` files tokenized once with Hugging Face ``datasets``, memory-mapped by every rank.

Terms:
    cache: a directory written by ``Dataset.save_to_disk``: one ``input_ids`` column (a
        list of int32 token ids per document, in file order, documents without tokens
        dropped), plus ``fxpp.json`` (documents, tokens, what it was built from).
    fingerprint: a hash of the data files (path, size, modification time), the
        tokenizer's files, ``--text-field`` and the versions of the code that tokenizes;
        the cache's directory name. Anything that changes the token ids changes it.

Note [one tokenization]: tokenizing is done once per corpus, not once per rank. ``fxpp
run``'s launcher builds the cache before it starts any rank (so a file that is not
UTF-8, a record without the text field or a missing ``datasets`` is one line before any
process starts, and no rank sits idle in a collective while another tokenizes); under
``torchrun`` there is no launcher, so rank 0 builds it while the others wait in a
broadcast that carries rank 0's error, if any (``train.data_ready``). A cache that
exists is reused: a second run, a resume, a sweep over the same files tokenize nothing.

Note [where the cache lives]: ``$FXPP_DATA_CACHE``, else ``$XDG_CACHE_HOME/fxpp/data``
(``~/.cache/fxpp/data``), one directory per fingerprint. Not under ``--save-dir``: a run
needs its data without a save directory, a save directory holds one run while a corpus
serves many (other seeds, sequence lengths, resumes into a new directory), and ``fxpp
export`` copies nothing from it. The key holds no ``--seq-len``, ``--batch`` or
``--shuffle-seed``: packing and shuffling happen when batches are read (a permutation of
document indices, cheap), so one cache serves every packing of the corpus. Under
``torchrun`` on several nodes the cache, like ``--save-dir``, must be on a filesystem
every node sees. Files are fingerprinted by size and modification time, not content
(reading a large corpus to hash it would cost as much as a pass over it): rewriting a
file in place within the filesystem's time resolution at the same size is not noticed.

Memory: ranks read the Arrow file through ``load_from_disk``, which memory-maps it; the
token ids are numpy views of the mapped column (:class:`TokenizedDocuments`), so a
rank's private memory does not grow with the corpus. Pages it reads are file-backed and
shared by every rank on the node (the page cache), and the kernel can drop them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Sequence

import numpy as np
import tokenizers
import transformers

from ..errors import DataError
from .data import is_structured, iter_documents, load_tokenizer
from .step_files import TOKENIZER_FILES

CACHE_ENV = "FXPP_DATA_CACHE"
FORMAT = 1  # the cache's layout; a new one never reads an old one
INFO = "fxpp.json"


def datasets_module():
    """The ``datasets`` package, or a one-line DataError saying how to install it."""
    try:
        import datasets  # optional extra: only --data needs it, so a synthetic run never imports it
    except ImportError as e:
        raise DataError(f"--data needs Hugging Face datasets ({e}): pip install 'fxpp[data]'") from None
    return datasets


def cache_root() -> str:
    """Where the caches live (Note [where the cache lives])."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fxpp", "data")


def fingerprint(paths: Sequence[str], tokenizer_dir: str, text_field: str) -> str:
    """The cache key of ``paths`` tokenized by ``tokenizer_dir``'s tokenizer (Note [where the cache lives])."""
    h = hashlib.sha256()
    versions = {"format": FORMAT, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                "datasets": datasets_module().__version__}
    # the text field matters only where a file has records: a text file's cache is shared
    field = text_field if any(is_structured(p) for p in paths) else None
    h.update(json.dumps([versions, field]).encode())
    for path in paths:
        st = os.stat(path)
        h.update(json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns]).encode())
    for name in TOKENIZER_FILES:
        file = os.path.join(tokenizer_dir, name)
        if os.path.isfile(file):
            h.update(name.encode())
            with open(file, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:24]


def cache_dir(paths: Sequence[str], tokenizer_dir: str, text_field: str) -> str:
    return os.path.join(cache_root(), fingerprint(paths, tokenizer_dir, text_field))


def build(paths: Sequence[str], tokenizer_dir: str, text_field: str = "text", flag: str = "--data") -> str:
    """The cache of ``paths``, tokenized now unless it exists; its directory.

    ``Dataset.from_generator`` writes the documents (:func:`fxpp.trainer.data.iter_documents`)
    to an Arrow file a batch at a time, ``Dataset.map(batched=True)`` tokenizes them a
    batch at a time into another, ``save_to_disk`` writes the cache; memory stays at a few
    batches whatever the corpus. Everything is written into a staging directory beside the
    cache and renamed into place when complete, so a cache directory is always whole and
    two runs building the same cache at once both end with one.

    Raises:
        DataError: as ``iter_documents`` (a missing file or field, text that is not UTF-8),
            no tokenizer, no documents with tokens, no ``datasets``.
    """
    datasets = datasets_module()
    paths = list(paths)
    directory = cache_dir(paths, tokenizer_dir, text_field)
    if os.path.isfile(os.path.join(directory, INFO)):
        return directory
    tokenizer = load_tokenizer(tokenizer_dir)
    key = os.path.basename(directory)
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{key}.building-", dir=os.path.dirname(directory))

    def encode(batch):  # as fxpp.trainer.data.tokenize: no special tokens, documents without tokens dropped
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [i for i in ids if len(i)]}

    bars = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # one bar, the tokenizing one, not one per step of datasets' work
    try:
        try:
            text = datasets.Dataset.from_generator(
                _records, features=datasets.Features({"text": datasets.Value("string")}),
                cache_dir=os.path.join(staging, "text"), fingerprint=f"{key}-text",
                gen_kwargs={"paths": paths, "text_field": text_field, "flag": flag})
        except Exception as e:  # noqa: BLE001 - datasets wraps the generator's error (DatasetGenerationError)
            cause = e
            while cause is not None and not isinstance(cause, DataError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None
        if bars:
            datasets.enable_progress_bars()
        ids = text.map(encode, batched=True, remove_columns=["text"], new_fingerprint=key,
                       features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}),
                       cache_file_name=os.path.join(staging, "ids.arrow"), desc=f"fxpp: tokenizing {flag}")
        if not len(ids):
            raise DataError(f"{flag} {' '.join(paths)}: no documents (no text, or none the tokenizer of "
                            f"{tokenizer_dir} turns into tokens)")
        out = os.path.join(staging, "cache")
        datasets.disable_progress_bars()
        ids.save_to_disk(out)
        info = {"format": FORMAT, "documents": len(ids), "tokens": _count_tokens(ids), "files": [os.path.abspath(p) for p in paths],
                "tokenizer": os.path.abspath(tokenizer_dir), "text_field": text_field}
        with open(os.path.join(out, INFO), "w") as f:
            json.dump(info, f, indent=1)
        del text, ids  # their files are open (memory-mapped) until then
        try:
            os.rename(out, directory)
        except OSError:
            if not os.path.isfile(os.path.join(directory, INFO)):  # not a concurrent build that won the race
                raise
    finally:
        if bars:
            datasets.enable_progress_bars()
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _records(paths: list[str], text_field: str, flag: str):
    """The documents as ``datasets`` records (module level: datasets may pickle the generator)."""
    for document in iter_documents(paths, text_field, flag):
        yield {"text": document}


def _count_tokens(ids) -> int:
    import pyarrow.compute as pc  # optional extra: pyarrow comes with datasets (pip install 'fxpp[data]')

    return int(sum(pc.sum(pc.list_value_length(chunk)).as_py() or 0 for chunk in ids.data.column("input_ids").chunks))


class TokenizedDocuments:
    """The documents of a cache as numpy views of its memory-mapped Arrow column (nothing copied).

    ``len(docs)`` documents; ``docs[i]`` is document ``i``'s int32 token ids, a read-only
    view into the mapped file. What a rank holds is per Arrow record batch (a thousand
    documents): two views and a start index.
    """

    def __init__(self, directory: str):
        datasets = datasets_module()
        with open(os.path.join(directory, INFO)) as f:
            self.info = json.load(f)
        self.directory = directory
        self._dataset = datasets.load_from_disk(directory)  # memory-mapped; kept so the mapping stays open
        self._offsets: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        starts = [0]
        for chunk in self._dataset.data.column("input_ids").chunks:
            if len(chunk):
                # .offsets index into .values, the chunk's whole buffer (also for a sliced chunk)
                self._offsets.append(chunk.offsets.to_numpy(zero_copy_only=True))
                self._values.append(chunk.values.to_numpy(zero_copy_only=True))
                starts.append(starts[-1] + len(chunk))
        self._starts = np.asarray(starts, dtype=np.int64)
        if self._starts[-1] != self.info["documents"]:
            raise DataError(f"{directory}: the cache holds {self._starts[-1]} documents, its {INFO} says "
                            f"{self.info['documents']}; delete the directory to tokenize again")

    @property
    def num_tokens(self) -> int:
        return int(self.info["tokens"])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} of {len(self)}")
        c = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = i - int(self._starts[c])
        offsets = self._offsets[c]
        return self._values[c][offsets[j]:offsets[j + 1]]


def open_documents(paths: Sequence[str], tokenizer_dir: str, text_field: str = "text",
                   flag: str = "--data") -> TokenizedDocuments:
    """The tokenized documents of ``paths`` from their cache, which :func:`build` must have written.

    Raises:
        DataError: no cache for these files (changed since it was built, or never built).
    """
    directory = cache_dir(list(paths), tokenizer_dir, text_field)
    if not os.path.isfile(os.path.join(directory, INFO)):
        raise DataError(f"{flag} {' '.join(paths)}: no tokenized cache at {directory} (a file changed after the "
                        "run started, or the cache was deleted); start the run again")
    return TokenizedDocuments(directory)

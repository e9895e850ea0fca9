"""A training run's state on disk: ``fxpp run --save-dir/--resume``, and what ``fxpp export`` reads.

Layout of a save directory::

    SAVE_DIR/
        config.json, tokenizer files      written at every save (``export`` needs them): config.json
                                          and the model folder's other files (:func:`model_folder_files`)
        model_files.json                  the names of those files, which ``export`` copies
        step-000004/                      one directory per save
            stage-3.dp-1.safetensors      stage 3's tensors as dp rank 1 holds them (FSDP2: its shard)
            optimizer.pp-1.dp-1.safetensors   the optimizer state of that rank, and its RNG state
            state.json                    written last: the step, the data position, the settings

A step directory without ``state.json`` is an interrupted save and is never resumed
from. Resuming restores parameters, optimizer state, RNG state and the data position,
so a run of 2 steps resumed to 4 ends with exactly the tensors of a 4-step run
(``tests/test_save_resume.py``).

A save's tensors are planned from the stage files' headers (:func:`saved_tensors`: dp shards
joined, copies found) and read by rows (:class:`SaveReader`), so ``fxpp export``
(fxpp/trainer/export.py) never holds the model.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import CheckpointError, SaveDirError
from ..runtime.checkpoint import (
    DTYPES,
    SHARDS_KEY,
    load_optimizer,
    read_rows,
    resolve_inside,
    safetensors_header,
    save_optimizer,
    save_stage,
)
from ..runtime.placement import rng_state, set_rng_state

# Settings a resumed run must share with the saved one: each changes the numbers.
RESUME_SETTINGS = ("model", "ranks", "dp", "schedule", "batch", "seq_len", "microbatches", "lr", "seed", "tokens",
                   "data", "lr_schedule", "warmup_steps", "min_lr_ratio", "weight_decay", "max_grad_norm",
                   "mixed_precision", "param_dtype", "lora_rank", "lora_alpha", "lora_targets")
# What a save made before model_files.json holds besides config.json (export's fallback for it).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")
MODEL_FILES = "model_files.json"  # SAVE_DIR: the names copied from the model folder, which export copies
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".pkl")
_RESERVED = (MODEL_FILES, "metrics.jsonl", "config.json")  # SAVE_DIR's own files: never overwritten by a copy
_STEP = re.compile(r"^step-(\d+)$")


def step_dir(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"step-{step:06d}")


def stage_file(directory: str, stage: int, dp_rank: int) -> str:
    return os.path.join(directory, f"stage-{stage}.dp-{dp_rank}.safetensors")


def optimizer_file(directory: str, pp_rank: int, dp_rank: int) -> str:
    return os.path.join(directory, f"optimizer.pp-{pp_rank}.dp-{dp_rank}.safetensors")


def latest_step(save_dir: str) -> int | None:
    """The newest complete save (its ``state.json`` written), or None."""
    if not os.path.isdir(save_dir):
        return None
    steps = [int(m.group(1)) for name in os.listdir(save_dir) if (m := _STEP.match(name))
             and os.path.isfile(os.path.join(save_dir, name, "state.json"))]
    return max(steps, default=None)


def read_state(save_dir: str, step: int | None = None) -> dict:
    """The ``state.json`` of ``step`` (default: the latest complete save).

    Raises:
        SaveDirError: no complete save in ``save_dir``.
    """
    step = latest_step(save_dir) if step is None else step
    if step is None:
        raise SaveDirError(f"{save_dir}: no saved step to resume from (no step-*/state.json); run once with "
                        "--save-dir first, or leave out --resume")
    with open(os.path.join(step_dir(save_dir, step), "state.json")) as f:
        return json.load(f)


def check_start(cfg) -> dict | None:
    """The saved state a run continues from (``--resume``), or None for a new run.

    Raises:
        SaveDirError: a new run into a directory that holds another run's saves (export and
            resume would then pick whichever step is newest, of either run), or a resume
            whose save is past ``--steps``.
    """
    if not cfg.save_dir:
        return None
    if not cfg.resume:
        step = latest_step(cfg.save_dir)
        if step is not None:
            raise SaveDirError(f"--save-dir {cfg.save_dir} already holds a run (saved at step {step}); continue it with "
                            "--resume, or save this run in a new directory")
        return None
    state = read_state(cfg.save_dir)
    if state["step"] > cfg.steps:
        raise SaveDirError(f"--resume: the save in {cfg.save_dir} is at step {state['step']}, past --steps {cfg.steps}")
    return state


def settings_of(cfg) -> dict:
    return {k: getattr(cfg, k) for k in RESUME_SETTINGS}


def check_resumable(state: dict, cfg, layer_ranges: list[range]) -> None:
    """Refuse to resume with any setting that would change the numbers.

    Raises:
        SaveDirError: naming the first setting that differs, with both values.
    """
    saved = state["settings"]
    for key, value in settings_of(cfg).items():
        if saved.get(key) != value:
            raise SaveDirError(f"--resume: the run in {cfg.save_dir} was saved with {key}={saved.get(key)!r}, this run "
                            f"has {key}={value!r}; resume with the same settings (or start a new --save-dir)")
    ranges = [[r.start, r.stop] for r in layer_ranges]
    if state["layer_ranges"] != ranges:
        raise SaveDirError(f"--resume: the saved stages own layers {state['layer_ranges']}, this pipeline {ranges}")


def rank_parameters(stages) -> dict[str, torch.nn.Parameter]:
    """``{"stage<i>.<name>": parameter}`` of a rank's stages (a shared parameter under its first name)."""
    out: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    for stage in stages:
        for name, p in stage.submod.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[f"stage{stage.stage_index}.{name}"] = p
    return out


def save(cfg, step: int, stages, optimizer, *, pp_rank: int, dp_rank: int, position, layer_ranges, model_config,
         device: torch.device, lr_scheduler: dict | None = None) -> None:
    """Every rank writes its stages and optimizer; after a barrier, rank 0 writes ``state.json``."""
    directory = step_dir(cfg.save_dir, step)
    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
        # A step saved before (by a run that crashed after it, then resumed from an earlier
        # step) is incomplete until its new state.json is written, never a mix of two runs.
        stale = os.path.join(directory, "state.json")
        if os.path.exists(stale):
            os.remove(stale)
    dist.barrier()
    for stage in stages:
        save_stage(stage.submod, stage_file(directory, stage.stage_index, dp_rank))
    save_optimizer(optimizer, rank_parameters(stages), optimizer_file(directory, pp_rank, dp_rank),
                   extra=rng_state(device))
    dist.barrier()
    if dist.get_rank() == 0:
        _write_model_files(cfg, model_config)
        state = {"step": step, "data_position": [position.document, position.token], "settings": settings_of(cfg),
                 "layer_ranges": [[r.start, r.stop] for r in layer_ranges], "num_stages": len(layer_ranges),
                 "lr_scheduler": lr_scheduler}
        tmp = os.path.join(directory, "state.json.tmp")
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, os.path.join(directory, "state.json"))  # the save is complete only now
    dist.barrier()


def model_folder_files(folder: str) -> list[str]:
    """The files of a model folder that go with its weights: tokenizer, chat template, generation and
    processor settings. The run copies them into SAVE_DIR, ``fxpp export`` into its output.

    The rule: every regular file directly in ``folder`` except its weights (``*.safetensors``,
    ``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.h5``, ``*.msgpack``, ``*.gguf``, ``*.onnx``,
    ``*.pkl``), their indexes (``*.index.json``), ``config.json`` (fxpp writes its own), hidden
    files (``.gitattributes``) and the names SAVE_DIR keeps for itself (``model_files.json``,
    ``metrics.jsonl``). So ``tokenizer*.json``, ``*.model``, ``vocab.*``, ``merges.txt``,
    ``special_tokens_map.json``, ``added_tokens.json``, ``chat_template.jinja``,
    ``generation_config.json``, ``preprocessor_config.json``, ``processor_config.json``, a
    README or a LICENSE all go. Subfolders do not, nor anything that is not a regular file
    inside the folder (a fifo, a device, a symlink out of it; Note [files inside the folder]
    in fxpp/runtime/checkpoint.py): those are skipped without being opened.
    """
    names = []
    for name in sorted(os.listdir(folder)):
        if (name.startswith(".") or name in _RESERVED or name.endswith(".index.json")
                or name.lower().endswith(_WEIGHT_SUFFIXES)):
            continue
        try:
            resolve_inside(folder, name, folder)
        except CheckpointError:
            continue
        names.append(name)
    return names


def _write_model_files(cfg, model_config) -> None:
    """config.json, the model folder's other files (:func:`model_folder_files`) and their list, for ``fxpp export``."""
    model_config.to_json_file(os.path.join(cfg.save_dir, "config.json"))
    names = model_folder_files(cfg.model) if os.path.isdir(cfg.model) else []
    for name in names:
        shutil.copyfile(os.path.join(cfg.model, name), os.path.join(cfg.save_dir, name))
    tmp = os.path.join(cfg.save_dir, MODEL_FILES + ".tmp")
    with open(tmp, "w") as f:
        json.dump(names, f, indent=1)
    os.replace(tmp, os.path.join(cfg.save_dir, MODEL_FILES))


def load(cfg, state: dict, stages, optimizer, *, pp_rank: int, dp_rank: int, device: torch.device) -> None:
    """The optimizer and RNG state of this rank (the stages were built from their step files)."""
    directory = step_dir(cfg.save_dir, state["step"])
    extra = load_optimizer(optimizer, rank_parameters(stages), optimizer_file(directory, pp_rank, dp_rank))
    set_rng_state(extra, device)


def _stage_files(directory: str, state: dict | None) -> list[str]:
    """The stage files of a step directory: every ``stage-*.safetensors`` in it.

    Raises:
        CheckpointError: there is none.
    """
    del state  # the save's own listing of its files will come from state.json
    files = sorted(f for f in os.listdir(directory) if f.startswith("stage-") and f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no stage-*.safetensors files")
    return [os.path.join(directory, f) for f in files]


@dataclass(frozen=True)
class _Piece:
    """Rows ``[start, stop)`` of a saved tensor, as one stage file holds them (a 0-d tensor: row 0)."""

    file: str
    entry: dict = field(compare=False)  # the file's header entry: dtype, shape, data_offsets
    data_start: int
    start: int
    stop: int


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


def saved_tensors(directory: str, state: dict | None = None) -> dict[str, SavedTensor]:
    """Every tensor of a step directory's stage files, planned from the headers alone (no tensor read).

    Raises:
        CheckpointError: a shard whose rows disagree with its metadata, shards that do not cover
            a tensor's rows exactly once, copies of a tensor of other shapes or dtypes, a tensor
            both whole and sharded.
    """
    found: dict[str, list[tuple[_Piece, tuple[int, ...], torch.dtype, bool]]] = {}
    for path in _stage_files(directory, state):
        header, data_start, metadata = safetensors_header(path)
        try:
            shards = json.loads(metadata.get(SHARDS_KEY, "{}"))
        except ValueError as e:
            raise CheckpointError(f"{path}: its {SHARDS_KEY} metadata is not JSON ({e})") from e
        for key, entry in header.items():
            shape = tuple(entry["shape"])
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


def _join(key: str, found: list, directory: str) -> SavedTensor:
    """The pieces of ``key`` as one tensor: each row once, the rest copies (:func:`saved_tensors`)."""
    first, shape, dtype, sharded = found[0]
    for piece, other_shape, other_dtype, other_sharded in found[1:]:
        if other_sharded != sharded:
            raise CheckpointError(f"{key} is both whole and sharded in {directory}")
        if (other_shape, other_dtype) != (shape, dtype):
            raise CheckpointError(f"{key} is {other_shape} {other_dtype} in {piece.file}, {shape} {dtype} in "
                                  f"{first.file}: copies of one tensor must agree")
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
            lo, hi = max(start, p.start), min(stop, p.stop)
            if lo < hi:
                read_rows(self._file(p.file), p.entry, p.data_start, slice(lo - p.start, hi - p.start),
                          out[lo - start:hi - start] if saved.shape else out)
        return out

    def check_copies(self, saved: SavedTensor) -> None:
        """Every copy of ``saved``'s rows equals the piece it repeats, compared chunk by chunk.

        Raises:
            CheckpointError: naming the key and both files.
        """
        for copy in saved.copies:
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


def whole_tensors(directory: str, state: dict | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a step directory's stage files, dp shards joined, replicas checked equal.

    Holds the whole model in memory (tests, a LoRA run's adapters); ``fxpp export`` streams
    instead (fxpp/trainer/export.py).

    Raises:
        CheckpointError: see :func:`saved_tensors`; or two copies of a tensor (dp replicas, a
            weight two stages hold) that differ.
    """
    saved = saved_tensors(directory, state)
    with SaveReader() as reader:
        for tensor in saved.values():
            reader.check_copies(tensor)
        return {key: reader.rows(tensor, 0, tensor.rows) for key, tensor in saved.items()}

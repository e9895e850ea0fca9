"""A save directory's steps and their files: names, listing, records, verification.

Terms:
    complete step: a ``step-NNNNNN`` directory whose ``state.json`` is written (the last
        file of a save, ``fxpp.trainer.run_state``).
    listed files: ``state["files"]``, ``{name: {"size", "sha256"}}`` of every file of the
        step (Note [checksum] in ``fxpp.runtime.durable``).
    fingerprints: the records of the files a run reads besides its save (``--data``,
        ``--val-data``, the model folder's config.json and tokenizer files), saved in
        ``state.json`` so that a resume refuses files that changed.
"""

from __future__ import annotations

import json
import os
import re

from ..errors import CheckpointError, DamagedSaveError, SaveDirError
from ..runtime.checkpoint import resolve_inside
from ..runtime.durable import file_record

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")
_STEP = re.compile(r"^step-(\d+)$")
STAGE_FILE = re.compile(r"^stage-\d+\.dp-\d+(\.tp-\d+)?\.safetensors$")
MODEL_FILES = "model_files.json"  # SAVE_DIR: the names copied from the model folder, which export copies
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".pkl")
_RESERVED = (MODEL_FILES, "metrics.jsonl", "config.json")  # SAVE_DIR's own files: never overwritten by a copy


def step_dir(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"step-{step:06d}")


def _tp(tp_rank: int | None) -> str:
    return "" if tp_rank is None else f".tp-{tp_rank}"  # a run with tensor parallelism: one file per tp rank


def stage_file(directory: str, stage: int, dp_rank: int, tp_rank: int | None = None) -> str:
    return os.path.join(directory, f"stage-{stage}.dp-{dp_rank}{_tp(tp_rank)}.safetensors")


def optimizer_file(directory: str, pp_rank: int, dp_rank: int, tp_rank: int | None = None) -> str:
    return os.path.join(directory, f"optimizer.pp-{pp_rank}.dp-{dp_rank}{_tp(tp_rank)}.safetensors")


def own_files(stage_ids: list[int], pp_rank: int, dp_rank: int, tp_rank: int | None = None) -> list[str]:
    """The names of the files of a step that this rank writes and reads (``tp_rank``: a run with --tp)."""
    return [os.path.basename(stage_file("", i, dp_rank, tp_rank)) for i in stage_ids] + [
        os.path.basename(optimizer_file("", pp_rank, dp_rank, tp_rank))]


def steps_in(save_dir: str) -> list[int]:
    """Every step directory of ``save_dir``, complete or not, oldest first."""
    if not os.path.isdir(save_dir):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(save_dir) if (m := _STEP.match(name))
                  and os.path.isdir(os.path.join(save_dir, name)))


def complete_steps(save_dir: str) -> list[int]:
    """The steps whose ``state.json`` is written, newest first."""
    return [s for s in reversed(steps_in(save_dir))
            if os.path.isfile(os.path.join(step_dir(save_dir, s), "state.json"))]


def latest_step(save_dir: str) -> int | None:
    """The newest complete save (its ``state.json`` written), or None."""
    return next(iter(complete_steps(save_dir)), None)


def read_step_state(directory: str) -> dict:
    """A step directory's ``state.json``.

    Raises:
        DamagedSaveError: it is missing (an interrupted save) or is no JSON object.
    """
    path = os.path.join(directory, "state.json")
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise DamagedSaveError(f"{path} is missing: the save of this step was interrupted") from None
    except (OSError, ValueError) as e:
        raise DamagedSaveError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "step" not in state:
        raise DamagedSaveError(f"{path}: not a step's state (no \"step\")")
    return state


def read_state(save_dir: str, step: int | None = None) -> dict:
    """The ``state.json`` of ``step`` (default: the latest complete save), not verified.

    Raises:
        SaveDirError: no complete save in ``save_dir``, or no save of ``step``.
        DamagedSaveError: the step's ``state.json`` is missing or unreadable.
    """
    if step is None:
        step = latest_step(save_dir)
        if step is None:
            raise SaveDirError(f"{save_dir}: no saved step to resume from (no step-*/state.json); run once with "
                               "--save-dir first, or leave out --resume")
    elif not os.path.isdir(step_dir(save_dir, step)):
        raise SaveDirError(f"{save_dir}: step {step} was not saved (no {os.path.basename(step_dir(save_dir, step))}); "
                           f"saved steps: {sorted(complete_steps(save_dir)) or 'none'}")
    return read_step_state(step_dir(save_dir, step))


def damage(directory: str, state: dict, names: list[str] | None = None, *, deep: bool = True) -> str | None:
    """Why the files of a step (``names``, default every listed one) cannot be trusted, or None.

    Each file must be listed in ``state["files"]`` and be there with the listed size and,
    with ``deep``, the listed sha256 (Note [checksum] in ``fxpp.runtime.durable``).
    """
    files = state.get("files")
    if not isinstance(files, dict):
        return f"{os.path.join(directory, 'state.json')} lists no files (saved by an fxpp that did not list them)"
    for name in sorted(files) if names is None else names:
        path = os.path.join(directory, name)
        listed = files.get(name)
        if listed is None:
            return f"{path} is not among the files its state.json lists"
        try:
            size = os.path.getsize(path)
        except OSError:
            return f"{path} is missing"
        if size != listed["size"]:
            return f"{path} has {size} bytes, its state.json lists {listed['size']}"
        if deep and file_record(path)["sha256"] != listed["sha256"]:
            return f"{path}: its sha256 differs from the one its state.json lists (changed or damaged since the save)"
    return None


def check_files(directory: str, state: dict, names: list[str] | None = None) -> None:
    """Raises DamagedSaveError naming the first file of :func:`damage`."""
    reason = damage(directory, state, names)
    if reason is not None:
        raise DamagedSaveError(f"step {state.get('step')}: {reason}")


def fingerprints(cfg) -> dict[str, dict]:
    """Size and sha256 of the files a run reads besides its save: ``--data``, ``--val-data``, and the
    model folder's config.json and tokenizer files (keyed as a message names them)."""
    paths = [f"--data {p}" for p in cfg.data or []] + [f"--val-data {p}" for p in cfg.val_data or []]
    if os.path.isdir(cfg.model):
        paths += [os.path.join(cfg.model, n) for n in ("config.json", *TOKENIZER_FILES)]
    out = {}
    for key in paths:
        path = key.split(" ", 1)[1] if key.startswith("--") else key
        if os.path.isfile(path):  # a missing data file is the data reader's error, by name
            out[key] = file_record(path)
    return out


def check_fingerprints(cfg, state: dict, now: dict[str, dict] | None = None) -> None:
    """Refuse to resume when a file the run reads changed since the save.

    Raises:
        SaveDirError: naming the first file that changed, appeared or is gone.
    """
    saved = state.get("fingerprints") or {}
    now = fingerprints(cfg) if now is None else now
    for key in sorted(set(saved) | set(now)):
        before, after = saved.get(key), now.get(key)
        if before == after:
            continue
        if before is None or after is None:
            why = "is new" if before is None else "is gone"
        elif before["size"] != after["size"]:
            why = f"has {after['size']} bytes, {before['size']} when saved"
        else:
            why = "has other contents (sha256) than when saved"
        raise SaveDirError(f"--resume: {key} changed since step {state['step']} was saved: it {why}; resume with "
                           "the files the run was saved with, or start a new --save-dir")


def step_stage_files(directory: str, state: dict) -> list[str]:
    """The verified ``stage-*.safetensors`` paths of a step: those its ``state.json`` lists, no others.

    Also verifies the save folder's config.json and tokenizer files the step lists
    (``state["shared_files"]``), which ``export`` reads.

    Raises:
        DamagedSaveError: a listed file is missing or has another size or sha256 than
            listed (naming it), or the step lists no stage files.
    """
    directory = os.path.normpath(directory)
    names = sorted(n for n in state.get("files") or {} if STAGE_FILE.match(n))
    check_files(directory, state, names)
    if not names:
        raise DamagedSaveError(f"{os.path.join(directory, 'state.json')} lists no stage-*.safetensors files")
    shared = state.get("shared_files") or {}
    check_files(os.path.dirname(directory), {"step": state.get("step"), "files": shared}, sorted(shared))
    return [os.path.join(directory, n) for n in names]


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

"""A training run's state on disk: ``fxpp run --save-dir/--resume`` and ``fxpp export``.

Layout of a save directory::

    SAVE_DIR/
        config.json, tokenizer files      written at every save (``export`` needs them): config.json
                                          and the model folder's other files (``model_folder_files``)
        model_files.json                  the names of those files, which ``export`` copies
        step-000004/                      one directory per save
            stage-3.dp-1.safetensors      stage 3's tensors as dp rank 1 holds them (FSDP2: its shard)
            optimizer.pp-1.dp-1.safetensors   the optimizer state of that rank, and its RNG state
            (with --tp: stage-3.dp-1.tp-0.safetensors, optimizer.pp-1.dp-1.tp-0.safetensors: each
            tp rank's part, Note [tensor parallel checkpoints] in fxpp/runtime/tp_checkpoint.py)
            state.json                    written last: the step, the data position, the settings,
                                          and every file of the step with its size and sha256

Note [durable saves]: every file of a save is written under a temporary name, fsync'ed
and renamed into place, and its folder fsync'ed (``fxpp.runtime.durable``). Each rank
writes and hashes its own files; the ranks then agree on the outcome (a failing rank
ends every rank with its error, no rank waits at a barrier), and rank 0 writes
``state.json``, listing every file of the step with its size and checksum, last. A step
directory without ``state.json`` is an interrupted save and is never resumed from. A
resume takes the newest step whose listed files are all there with their sizes and
checksums (every rank verifies the files it reads, then they agree, and rank 0's choice
is broadcast), says which newer steps it skipped and why, and refuses data, tokenizer or
config files that changed since the save. Export reads only the files the step lists,
after verifying them (``fxpp.trainer.step_files.step_stage_files``).

Resuming restores parameters, optimizer state, RNG state and the data position, so a
run of 2 steps resumed to 4 ends with exactly the tensors of a 4-step run
(``tests/test_run_training.py``).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

from ..errors import DamagedSaveError, SaveDirError
from ..runtime.checkpoint import load_optimizer, save_optimizer, save_stage
from ..runtime.durable import agree, copy_file, fsync_dir, remove_durably, write_bytes, write_probe
from ..runtime.placement import rng_state, set_rng_state
from ..runtime.tp_checkpoint import check_optimizer_parts, parameter_parts, save_tp_stage
from .step_files import (
    MODEL_FILES,
    check_fingerprints,
    complete_steps,
    damage,
    latest_step,
    model_folder_files,
    optimizer_file,
    read_step_state,
    stage_file,
    step_dir,
    steps_in,
)

# Settings a resumed run must share with the saved one: each changes the numbers.
RESUME_SETTINGS = ("model", "ranks", "dp", "tp", "schedule", "batch", "seq_len", "microbatches", "lr", "seed", "tokens",
                   "data", "lr_schedule", "warmup_steps", "min_lr_ratio", "weight_decay", "max_grad_norm",
                   "mixed_precision", "param_dtype", "lora_rank", "lora_alpha", "lora_targets", "shuffle_seed",
                   "text_field")
# Settings added after saves were first written: an older save had their defaults.
ADDED_SETTINGS = {"shuffle_seed": None, "text_field": "text", "tp": 1}


def _candidates(cfg) -> tuple[list[dict], list[tuple[int, str]]]:
    """The steps a resume may take, newest first, with every listed file there at its listed size
    (no checksums: those are each rank's, :func:`choose_resume`); and why others were skipped.

    Raises:
        SaveDirError: ``--resume-step`` names no saved step; no step to resume from.
        DamagedSaveError: the ``--resume-step`` step is damaged, naming the file.
    """
    steps = list(reversed(steps_in(cfg.save_dir)))  # an incomplete one is skipped, and named
    if cfg.resume_step is not None:
        if cfg.resume_step not in steps_in(cfg.save_dir):
            raise SaveDirError(f"--resume-step {cfg.resume_step}: {step_dir(cfg.save_dir, cfg.resume_step)} does not "
                               f"exist; saved steps: {sorted(complete_steps(cfg.save_dir)) or 'none'}")
        steps = [cfg.resume_step]
    states, skipped = [], []
    for step in steps:
        directory = step_dir(cfg.save_dir, step)
        try:
            state = read_step_state(directory)
            reason = damage(directory, state, deep=False)
        except DamagedSaveError as e:
            reason = str(e)
        if reason is None and state["step"] != step:
            reason = f"{directory}/state.json is the state of step {state['step']}"
        if reason is None:
            states.append(state)
        elif cfg.resume_step is not None:
            raise DamagedSaveError(f"--resume-step {step}: {reason}")
        else:
            skipped.append((step, reason))
    if skipped and not states:
        raise DamagedSaveError(f"--resume: no saved step of {cfg.save_dir} is whole: " + _reasons(skipped))
    if not states:
        raise SaveDirError(f"{cfg.save_dir}: no saved step to resume from (no step-*/state.json); run once with "
                           "--save-dir first, or leave out --resume")
    return states, skipped


def _reasons(skipped: list[tuple[int, str]]) -> str:
    return "; ".join(f"step {step}: {reason}" for step, reason in skipped)


def check_start(cfg) -> dict | None:
    """The saved state a run continues from (``--resume``, ``--resume-step``), or None for a new run.

    Runs before any rank starts (and again on every rank): a write probe in ``--save-dir``,
    then the newest step whose files are all there with their listed sizes (checksums are
    verified by the ranks, :func:`choose_resume`).

    Raises:
        SaveIOError: ``--save-dir`` cannot be written (no permission, no space).
        SaveDirError: a new run into a directory that holds another run's saves (export and
            resume would then pick whichever step is newest, of either run), a resume
            whose save is past ``--steps`` or was made with other settings, or no step to
            resume from (naming why each was skipped).
        DamagedSaveError: the ``--resume-step`` step is damaged.
    """
    if not cfg.save_dir:
        return None
    write_probe(cfg.save_dir)
    if not cfg.resuming:
        step = latest_step(cfg.save_dir)
        if step is not None:
            raise SaveDirError(f"--save-dir {cfg.save_dir} already holds a run (saved at step {step}); continue it with "
                            "--resume, or save this run in a new directory")
        return None
    state = _candidates(cfg)[0][0]
    if state["step"] > cfg.steps:
        raise SaveDirError(f"--resume: the save in {cfg.save_dir} is at step {state['step']}, past --steps {cfg.steps}")
    check_settings(state, cfg)
    return state


def choose_resume(cfg, own: list[str], prints: dict[str, dict] | None) -> dict:
    """The saved state every rank resumes from: the newest step whose files all verify (collective).

    Rank 0 lists the candidate steps (:func:`_candidates`) and checks the data, tokenizer
    and config files against their fingerprints (``prints``: this run's, rank 0's); then,
    newest first, every rank verifies the checksums of its ``own`` files of a step and the
    ranks agree; rank 0's choice is broadcast, and rank 0 prints it with the steps skipped.

    Raises:
        DamagedSaveError: ``--resume-step`` names a damaged step (naming the file), or no
            step verifies.
        SaveDirError: a file the run reads changed since the save (:func:`check_fingerprints`).
        PeerFailedError: another rank failed in any of it.
    """
    rank = dist.get_rank()

    def listing():
        if rank != 0:
            return None
        states, skipped = _candidates(cfg)
        check_fingerprints(cfg, states[0], prints)
        return states, skipped

    states, skipped = agree("--resume: choosing the step", listing)[0]
    chosen = None
    for state in states:
        directory = step_dir(cfg.save_dir, state["step"])
        reasons = agree(f"--resume: verifying step {state['step']}", lambda: damage(directory, state, own))
        reason = next((r for r in reasons if r is not None), None)
        if reason is None:
            chosen = state["step"]
            break
        if cfg.resume_step is not None:
            raise DamagedSaveError(f"--resume-step {cfg.resume_step}: {reason}")
        skipped.append((state["step"], reason))
    decision = [chosen, skipped]
    dist.broadcast_object_list(decision, src=0)  # every rank resumes rank 0's choice
    chosen, skipped = decision
    if chosen is None:
        raise DamagedSaveError(f"--resume: no step of {cfg.save_dir} verifies: " + _reasons(skipped))
    newer = sorted((s for s in skipped if s[0] > chosen), reverse=True)
    if rank == 0:
        print(f"resuming from step {chosen} of {cfg.save_dir}" + (f"; skipped {_reasons(newer)}" if newer else ""),
              flush=True)
    return next(s for s in states if s["step"] == chosen)


def settings_of(cfg) -> dict:
    return {k: getattr(cfg, k) for k in RESUME_SETTINGS}


def check_settings(state: dict, cfg) -> None:
    """Refuse to resume with any setting that would change the numbers.

    Raises:
        SaveDirError: naming the first setting that differs, with both values.
    """
    saved = state.get("settings", {})
    for key, value in settings_of(cfg).items():
        was = saved.get(key, ADDED_SETTINGS.get(key))
        if was != value:
            raise SaveDirError(f"--resume: the run in {cfg.save_dir} was saved with {key}={was!r}, this run "
                            f"has {key}={value!r}; resume with the same settings (or start a new --save-dir)")


def check_resumable(state: dict, cfg, layer_ranges: list[range]) -> None:
    """Refuse to resume with any setting that would change the numbers, or other stages.

    Raises:
        SaveDirError: naming the first setting that differs, with both values.
    """
    check_settings(state, cfg)
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
         device: torch.device, lr_scheduler: dict | None = None, prints: dict[str, dict] | None = None,
         tp_rank: int | None = None) -> None:
    """Save a step (Note [durable saves]); every rank calls it.

    Rank 0 empties a reused step directory; every rank writes its stages and optimizer
    durably and hashes them (``tp_rank``: a run with --tp, each rank its parts, with their
    local indices: ``fxpp.runtime.tp_checkpoint``); the records go to rank 0 with the ranks' agreement, and rank
    0 writes the shared files and ``state.json`` (``prints``: the run's fingerprints),
    then prunes to ``--keep-last``.

    Raises:
        SaveIOError: this rank could not write a file, naming it.
        PeerFailedError: another rank failed, naming it and its error.
    """
    directory = step_dir(cfg.save_dir, step)
    rank = dist.get_rank()
    what = f"saving step {step} to {directory}"
    agree(what, lambda: _prepare(cfg.save_dir, step) if rank == 0 else None)

    def write() -> dict[str, dict]:
        records = {}
        for stage in stages:
            path = stage_file(directory, stage.stage_index, dp_rank, tp_rank)
            records[os.path.basename(path)] = (save_stage if tp_rank is None else save_tp_stage)(stage.submod, path)
        path = optimizer_file(directory, pp_rank, dp_rank, tp_rank)
        params = rank_parameters(stages)
        records[os.path.basename(path)] = save_optimizer(
            optimizer, params, path, extra=rng_state(device), metadata=None if tp_rank is None else parameter_parts(params))
        return records

    written = agree(what, write)

    def complete() -> None:
        if rank != 0:
            return
        files = {name: record for records in written for name, record in records.items()}
        state = {"step": step, "data_position": [position.document, position.token], "settings": settings_of(cfg),
                 "layer_ranges": [[r.start, r.stop] for r in layer_ranges], "num_stages": len(layer_ranges),
                 "lr_scheduler": lr_scheduler, "files": dict(sorted(files.items())),
                 "shared_files": _write_model_files(cfg, model_config), "fingerprints": prints or {}}
        # The save is complete only now.
        write_bytes(os.path.join(directory, "state.json"), json.dumps(state, indent=1).encode())
        if cfg.keep_last:
            prune(cfg.save_dir, step, cfg.keep_last)

    agree(what, complete)


def _prepare(save_dir: str, step: int) -> None:
    """Make ``step``'s directory, empty (rank 0, before any rank writes to it).

    A step saved before (by a run that crashed after it, then resumed from an earlier
    step) loses its ``state.json`` first, so it is incomplete from the first removal on,
    never a mix of two runs. Newer step directories are from the timeline the resume
    left (a damaged step skipped, or ``--resume-step``): they are set aside as
    ``abandoned-step-N``, so a later ``--resume`` cannot take them.
    """
    directory = step_dir(save_dir, step)
    os.makedirs(directory, exist_ok=True)
    remove_durably(os.path.join(directory, "state.json"))
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    fsync_dir(directory)
    later = [s for s in steps_in(save_dir) if s > step]
    for s in later:
        aside = os.path.join(save_dir, "abandoned-" + os.path.basename(step_dir(save_dir, s)))
        if os.path.exists(aside):
            shutil.rmtree(aside)
        os.replace(step_dir(save_dir, s), aside)
        print(f"set aside {step_dir(save_dir, s)} (newer than this resumed run) as {aside}", flush=True)
    fsync_dir(save_dir)


def prune(save_dir: str, current: int, keep: int) -> None:
    """Keep ``current`` and the ``keep - 1`` newest complete steps before it; remove older steps,
    complete or not. Each loses its ``state.json`` first (then it is an incomplete step)."""
    complete = [s for s in complete_steps(save_dir) if s < current]
    doomed = set(complete[max(keep - 1, 0):]) | {s for s in steps_in(save_dir) if s < current and s not in complete}
    for s in sorted(doomed):
        remove_durably(os.path.join(step_dir(save_dir, s), "state.json"))
        shutil.rmtree(step_dir(save_dir, s))
    if doomed:
        fsync_dir(save_dir)


def _write_model_files(cfg, model_config) -> dict[str, dict]:
    """config.json, the model folder's other files (``model_folder_files``) and their list
    (``model_files.json``), for ``fxpp export``, durably; their records."""
    records = {"config.json": write_bytes(os.path.join(cfg.save_dir, "config.json"),
                                          model_config.to_json_string().encode())}
    names = model_folder_files(cfg.model) if os.path.isdir(cfg.model) else []
    for name in names:
        records[name] = copy_file(os.path.join(cfg.model, name), os.path.join(cfg.save_dir, name))
    records[MODEL_FILES] = write_bytes(os.path.join(cfg.save_dir, MODEL_FILES), json.dumps(names, indent=1).encode())
    return records


def load(cfg, state: dict, stages, optimizer, *, pp_rank: int, dp_rank: int, device: torch.device,
         tp_rank: int | None = None) -> None:
    """The optimizer and RNG state of this rank (the stages were built from their step files); every rank calls it.

    Raises:
        CheckpointError: this rank's file does not fit its optimizer (with --tp: was saved for
            other parts of the parameters, ``tp_checkpoint.check_optimizer_parts``).
        PeerFailedError: another rank failed to load, naming it and its error.
    """
    directory = step_dir(cfg.save_dir, state["step"])

    def work() -> None:
        path, params = optimizer_file(directory, pp_rank, dp_rank, tp_rank), rank_parameters(stages)
        if tp_rank is not None:
            check_optimizer_parts(path, params)
        extra = load_optimizer(optimizer, params, path)
        set_rng_state(extra, device)

    agree(f"loading step {state['step']} from {directory}", work)

"""A training run's state on disk: ``fxpp run --save-dir/--resume`` and ``fxpp export``.

Layout of a save directory::

    SAVE_DIR/
        config.json, tokenizer files      written at every save (``export`` needs them)
        step-000004/                      one directory per save
            stage-3.dp-1.safetensors      stage 3's tensors as dp rank 1 holds them (FSDP2: its shard)
            optimizer.pp-1.dp-1.safetensors   the optimizer state of that rank, and its RNG state
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
after verifying them (:func:`step_stage_files`).

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
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from ..errors import CheckpointError, DamagedSaveError, SaveDirError
from ..runtime.checkpoint import (
    SHARDS_KEY,
    check_checkpoint,
    load_optimizer,
    recompute_non_persistent_buffers,
    save_optimizer,
    save_stage,
)
from ..runtime.durable import agree, copy_file, fsync_dir, remove_durably, write_bytes, write_probe
from ..runtime.placement import rng_state, set_rng_state
from .models import load_config
from .step_files import (  # noqa: F401 - step_dir, stage_file, latest_step, read_state: run_state's names too
    STAGE_FILE,
    TOKENIZER_FILES,
    check_files,
    check_fingerprints,
    complete_steps,
    damage,
    fingerprints,
    latest_step,
    optimizer_file,
    own_files,
    read_state,
    read_step_state,
    stage_file,
    step_dir,
    steps_in,
)

# Settings a resumed run must share with the saved one: each changes the numbers.
RESUME_SETTINGS = ("model", "ranks", "dp", "schedule", "batch", "seq_len", "microbatches", "lr", "seed", "tokens",
                   "data", "lr_schedule", "warmup_steps", "min_lr_ratio", "weight_decay", "max_grad_norm",
                   "mixed_precision", "param_dtype", "lora_rank", "lora_alpha", "lora_targets")


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
        if saved.get(key) != value:
            raise SaveDirError(f"--resume: the run in {cfg.save_dir} was saved with {key}={saved.get(key)!r}, this run "
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
         device: torch.device, lr_scheduler: dict | None = None, prints: dict[str, dict] | None = None) -> None:
    """Save a step (Note [durable saves]); every rank calls it.

    Rank 0 empties a reused step directory; every rank writes its stages and optimizer
    durably and hashes them; the records go to rank 0 with the ranks' agreement, and rank
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
            path = stage_file(directory, stage.stage_index, dp_rank)
            records[os.path.basename(path)] = save_stage(stage.submod, path)
        path = optimizer_file(directory, pp_rank, dp_rank)
        records[os.path.basename(path)] = save_optimizer(optimizer, rank_parameters(stages), path,
                                                         extra=rng_state(device))
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
    """config.json and the source directory's tokenizer files, for ``fxpp export``, durably; their records."""
    records = {"config.json": write_bytes(os.path.join(cfg.save_dir, "config.json"),
                                          model_config.to_json_string().encode())}
    if os.path.isdir(cfg.model):
        for name in TOKENIZER_FILES:
            source = os.path.join(cfg.model, name)
            if os.path.isfile(source):
                records[name] = copy_file(source, os.path.join(cfg.save_dir, name))
    return records


def load(cfg, state: dict, stages, optimizer, *, pp_rank: int, dp_rank: int, device: torch.device) -> None:
    """The optimizer and RNG state of this rank (the stages were built from their step files); every rank calls it.

    Raises:
        CheckpointError: this rank's file does not fit its optimizer.
        PeerFailedError: another rank failed to load, naming it and its error.
    """
    directory = step_dir(cfg.save_dir, state["step"])

    def work() -> None:
        extra = load_optimizer(optimizer, rank_parameters(stages), optimizer_file(directory, pp_rank, dp_rank))
        set_rng_state(extra, device)

    agree(f"loading step {state['step']} from {directory}", work)


def whole_tensors(directory: str, files: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a step's stage files, dp shards joined, replicas checked equal.

    Args:
        files: the stage files' paths; default: those the step's ``state.json`` lists,
            verified (:func:`step_stage_files`).

    Raises:
        CheckpointError: shards that do not cover a tensor's rows exactly once, or two
            copies of a tensor (dp replicas, a weight two stages hold) that differ.
        DamagedSaveError: a listed file is missing or damaged (with ``files`` left out).
    """
    if files is None:
        files = step_stage_files(directory, read_step_state(directory))
    if not files:
        raise CheckpointError(f"{directory}: no stage-*.safetensors files")
    whole: dict[str, tuple[torch.Tensor, str]] = {}
    pieces: dict[str, list[tuple[int, int, int, torch.Tensor, str]]] = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            shards = json.loads((f.metadata() or {}).get(SHARDS_KEY, "{}"))
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                tensor = f.get_tensor(key)
                if key in shards:
                    start, stop, total = shards[key]
                    if tensor.shape[0] != stop - start:
                        raise CheckpointError(f"{path}: {key} has {tensor.shape[0]} rows, its metadata says rows "
                                              f"{start}-{stop}")
                    pieces.setdefault(key, []).append((start, stop, total, tensor, path))
                elif key in whole:
                    if not torch.equal(whole[key][0], tensor):
                        raise CheckpointError(f"{key} differs between {whole[key][1]} and {path}: copies of one "
                                              "tensor must be equal")
                else:
                    whole[key] = (tensor, path)
    out = {k: v for k, (v, _) in whole.items()}
    for key, parts in pieces.items():
        parts.sort(key=lambda p: (p[0], p[1]))
        total = parts[0][2]
        joined, row = [], 0
        for start, stop, _, tensor, path in parts:
            if start < row:  # the same shard from two files (a weight two stages hold): must be equal
                same = [t for s, e, _, t, _ in parts if (s, e) == (start, stop)]
                if not all(torch.equal(same[0], t) for t in same):
                    raise CheckpointError(f"{key} rows {start}-{stop} differ between copies ({path})")
                continue
            if start != row:
                raise CheckpointError(f"{key}: rows {row}-{start} of {total} are in no shard file of {directory}")
            joined.append(tensor)
            row = stop
        if row != total:
            raise CheckpointError(f"{key}: rows {row}-{total} are in no shard file of {directory}")
        if key in out:
            raise CheckpointError(f"{key} is both whole and sharded in {directory}")
        out[key] = torch.cat(joined)
    return out


def export_adapter(state: dict, tensors: dict[str, torch.Tensor], out_dir: str) -> None:
    """A LoRA run's adapters as a PEFT adapter folder (``PeftModel.from_pretrained(base, out_dir)``).

    The stage tensors carry PEFT's module names (``...q_proj.lora_A.default.weight``); an
    adapter file names them without the adapter (``...q_proj.lora_A.weight``), as
    ``peft.get_peft_model_state_dict`` writes them. The target modules are the ones the
    saved adapters sit on.
    """
    from peft import LoraConfig  # optional extra: only a LoRA run's export needs it

    settings = state["settings"]
    adapter = {k.replace(".default.", "."): v.contiguous() for k, v in tensors.items() if ".lora_" in k}
    if not adapter:
        raise CheckpointError(f"the save of step {state['step']} holds no LoRA adapter tensors (lora_A / lora_B)")
    targets = sorted({k.split(".lora_A")[0].rsplit(".", 1)[-1] for k in adapter if ".lora_A" in k})
    kwargs = {"lora_alpha": settings["lora_alpha"]} if settings.get("lora_alpha") is not None else {}
    config = LoraConfig(r=settings["lora_rank"], target_modules=targets, task_type="CAUSAL_LM", **kwargs)
    config.base_model_name_or_path = settings["model"]
    os.makedirs(out_dir, exist_ok=True)
    save_file(adapter, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)


def export(save_dir: str, out_dir: str, step: int | None = None, max_shard_size: str = "5GB") -> int:
    """Write a Hugging Face checkpoint directory from a save: config, tokenizer, sharded safetensors.

    The model is built on the meta device and given the saved tensors (``assign=True``),
    so the export holds one copy of the weights. Keys are the model's own;
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads the trained weights.

    Returns:
        the step exported.

    Raises:
        CheckpointError: a saved tensor the model does not have, a key of the model the
            save lacks (besides a tied ``lm_head.weight``), a shape the model does not
            have (``fxpp.runtime.checkpoint.check_checkpoint``), or tied copies that differ.
        DamagedSaveError: a file the step lists is missing or damaged, naming it.
    """
    state = read_state(save_dir, step)
    directory = step_dir(save_dir, state["step"])
    tensors = whole_tensors(directory, step_stage_files(directory, state))  # only the files the step lists
    if state["settings"].get("lora_rank"):
        export_adapter(state, tensors, out_dir)
        return state["step"]
    config = load_config(save_dir)
    dtype = getattr(config, "dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if isinstance(dtype, torch.dtype):  # the checkpoint's own dtype; the save holds the master dtype
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # Every key of the model, nothing else, right shapes (a tied lm_head.weight may be absent).
    tied = check_checkpoint(model, {k: (tuple(v.shape), v.dtype, save_dir) for k, v in tensors.items()}, save_dir)
    recompute_non_persistent_buffers(model, model, "cpu")  # never saved: computed before the saved tensors go in
    if tied:  # the last stage's copy of a tied weight must have stayed equal to the first stage's
        embedding = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
        for key in sorted(tied & set(tensors)):
            if not torch.equal(tensors[key], tensors[embedding]):
                raise CheckpointError(f"{save_dir}: {key} differs from {embedding}, to which the config ties it; "
                                      "the stages' tied copies diverged, the save cannot be exported as tied")
    model.load_state_dict(tensors, strict=False, assign=True)  # then every saved tensor, as it was trained
    if tied:
        model.tie_weights()
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(save_dir, name)):
            shutil.copyfile(os.path.join(save_dir, name), os.path.join(out_dir, name))
    return state["step"]

"""A training run's state on disk: ``fxpp run --save-dir/--resume`` and ``fxpp export``.

Layout of a save directory::

    SAVE_DIR/
        config.json, tokenizer files      written at the first save (``export`` needs them)
        step-000004/                      one directory per save
            stage-3.dp-1.safetensors      stage 3's tensors as dp rank 1 holds them (FSDP2: its shard)
            optimizer.pp-1.dp-1.safetensors   the optimizer state of that rank, and its RNG state
            state.json                    written last: the step, the data position, the settings

A step directory without ``state.json`` is an interrupted save and is never resumed
from. Resuming restores parameters, optimizer state, RNG state and the data position,
so a run of 2 steps resumed to 4 ends with exactly the tensors of a 4-step run
(``tests/test_save_resume.py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from ..errors import CheckpointError, SaveDirError
from ..runtime.checkpoint import (
    SHARDS_KEY,
    check_checkpoint,
    load_optimizer,
    recompute_non_persistent_buffers,
    save_optimizer,
    save_stage,
)
from ..runtime.placement import rng_state, set_rng_state
from .models import load_config

# Settings a resumed run must share with the saved one: each changes the numbers.
RESUME_SETTINGS = ("model", "ranks", "dp", "schedule", "batch", "seq_len", "microbatches", "lr", "seed", "tokens",
                   "data", "lr_schedule", "warmup_steps", "min_lr_ratio", "weight_decay", "max_grad_norm",
                   "mixed_precision", "param_dtype", "lora_rank", "lora_alpha", "lora_targets", "shuffle_seed",
                   "text_field")
# Settings added after saves were first written: an older save had their defaults.
ADDED_SETTINGS = {"shuffle_seed": None, "text_field": "text"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")
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
        was = saved.get(key, ADDED_SETTINGS.get(key))
        if was != value:
            raise SaveDirError(f"--resume: the run in {cfg.save_dir} was saved with {key}={was!r}, this run "
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


def _write_model_files(cfg, model_config) -> None:
    """config.json and the source directory's tokenizer files, for ``fxpp export``."""
    model_config.to_json_file(os.path.join(cfg.save_dir, "config.json"))
    if os.path.isdir(cfg.model):
        for name in TOKENIZER_FILES:
            source = os.path.join(cfg.model, name)
            if os.path.isfile(source):
                shutil.copyfile(source, os.path.join(cfg.save_dir, name))


def load(cfg, state: dict, stages, optimizer, *, pp_rank: int, dp_rank: int, device: torch.device) -> None:
    """The optimizer and RNG state of this rank (the stages were built from their step files)."""
    directory = step_dir(cfg.save_dir, state["step"])
    extra = load_optimizer(optimizer, rank_parameters(stages), optimizer_file(directory, pp_rank, dp_rank))
    set_rng_state(extra, device)


def whole_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a step directory's stage files, dp shards joined, replicas checked equal.

    Raises:
        CheckpointError: shards that do not cover a tensor's rows exactly once, or two
            copies of a tensor (dp replicas, a weight two stages hold) that differ.
    """
    files = sorted(f for f in os.listdir(directory) if f.startswith("stage-") and f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no stage-*.safetensors files")
    whole: dict[str, tuple[torch.Tensor, str]] = {}
    pieces: dict[str, list[tuple[int, int, int, torch.Tensor, str]]] = {}
    for name in files:
        path = os.path.join(directory, name)
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
    """
    state = read_state(save_dir, step)
    tensors = whole_tensors(step_dir(save_dir, state["step"]))
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

"""Saves as ``fxpp run --save-dir`` writes them, and the export fxpp made before it streamed.

``write_save``: a model's tensors as a pipeline of 2 stages x ``dp`` ranks saves them
(``fxpp.runtime.checkpoint.save_stage``: FSDP2 row shards with their rows in the metadata,
or whole replicas), plus config.json and state.json, without running training.
``whole_model_export``: the reference export: every tensor joined in memory, loaded into the
model, ``save_pretrained``. tests/test_export.py compares ``fxpp export`` with it;
``benchmarks/bench_memory.py --export`` measures both.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from ..runtime.checkpoint import SHARDS_KEY, check_checkpoint
from ..runtime.durable import file_record
from ..trainer.models import load_config
from ..trainer.step_files import MODEL_FILES, read_state, stage_file, step_dir


def write_save(save_dir: str, model: torch.nn.Module, *, dp: int, sharded: bool = True, config_dtype=None,
               step: int = 1) -> str:
    """Step ``step`` of a save of ``model``: stage 0 holds the embeddings and the first half of the
    layers, stage 1 the rest, the norm and the head (a tied ``lm_head.weight`` too, as the last
    stage's own copy); each on ``dp`` ranks, as FSDP2 row shards (``torch.chunk``'s split, trailing
    ranks possibly empty) or, with ``sharded=False``, whole replicas. config.json says ``config_dtype``."""
    save_dir = str(save_dir)
    directory = step_dir(save_dir, step)
    os.makedirs(directory)
    state = model.state_dict()
    half = model.config.num_hidden_layers // 2

    def on_last_stage(key: str) -> bool:
        if ".layers." in key:
            return int(key.split(".layers.")[1].split(".")[0]) >= half
        return key.startswith(("model.norm", "lm_head"))

    for stage in range(2):
        keys = [k for k in state if on_last_stage(k) == (stage == 1)]
        for rank in range(dp):
            tensors, shards = {}, {}
            for key in keys:
                value = state[key].detach()
                if sharded:
                    size = -(-value.shape[0] // dp)
                    start, stop = min(rank * size, value.shape[0]), min((rank + 1) * size, value.shape[0])
                    shards[key] = [start, stop, value.shape[0]]
                    value = value[start:stop]
                tensors[key] = value.clone().contiguous()
            metadata = {"format": "pt", **({SHARDS_KEY: json.dumps(shards)} if shards else {})}
            save_file(tensors, stage_file(directory, stage, rank), metadata=metadata)
            del tensors
    config = model.config
    config.dtype = config_dtype
    config.to_json_file(os.path.join(save_dir, "config.json"))
    with open(os.path.join(save_dir, MODEL_FILES), "w") as f:
        json.dump([], f)
    list_files(save_dir, step)
    return save_dir


def list_files(save_dir: str, step: int = 1) -> None:
    """Write step ``step``'s ``state.json`` listing its files as they are now, as ``run_state.save``
    lists them (Note [durable saves]: export reads only listed, verified files); a test that
    changes a stage file on purpose lists it again, so the save is as if written so."""
    directory = step_dir(str(save_dir), step)
    files = {name: file_record(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
             if name != "state.json"}
    shared = {name: file_record(os.path.join(save_dir, name)) for name in ("config.json", MODEL_FILES)}
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump({"step": step, "settings": {"lora_rank": 0}, "files": files, "shared_files": shared}, f)


def whole_model_export(save_dir: str, out_dir: str, max_shard_size: str = "5GB") -> None:
    """``fxpp export`` before it streamed: every tensor in memory, then ``save_pretrained``
    (the model folder's files aside)."""
    state = read_state(save_dir)
    directory = step_dir(save_dir, state["step"])
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith("stage-"):
            with safe_open(os.path.join(directory, name), "pt") as f:
                shards = json.loads((f.metadata() or {}).get(SHARDS_KEY, "{}"))
                for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                    pieces.setdefault(key, {}).setdefault(shards.get(key, [0])[0], f.get_tensor(key))
    tensors = {k: torch.cat([p[s] for s in sorted(p)]) if len(p) > 1 else p[0] for k, p in pieces.items()}
    del pieces
    config = load_config(save_dir)
    dtype = getattr(torch, config.dtype) if isinstance(config.dtype, str) else config.dtype
    if isinstance(dtype, torch.dtype):
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    tied = check_checkpoint(model, {k: (tuple(v.shape), v.dtype, save_dir) for k, v in tensors.items()}, save_dir)
    model.load_state_dict(tensors, strict=False, assign=True)
    if tied:
        model.tie_weights()
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)

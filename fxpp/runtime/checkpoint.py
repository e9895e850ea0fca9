"""Checkpoints: per-stage loading and saving with safetensors only (no pickle)."""

from __future__ import annotations

import json
import os
from typing import Iterable

import torch

from ..errors import CheckpointError


def _files_for(path: str, keys: Iterable[str] | None) -> dict[str, list[str]]:
    """``{file: [keys]}`` to read for ``keys`` from a single file or a sharded index."""
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            path = index
        elif os.path.isfile(single):
            path = single
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    if path.endswith(".json"):
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: not a safetensors index ({e})") from e
        base = os.path.dirname(path)
        wanted = set(weight_map) if keys is None else set(keys)
        files: dict[str, list[str]] = {}
        for key in sorted(wanted & set(weight_map)):
            files.setdefault(os.path.join(base, weight_map[key]), []).append(key)
        return files
    return {path: None}  # type: ignore[dict-item]


def key_files(path: str) -> dict[str, str]:
    """``{key: file}`` of every tensor of a safetensors file, directory or sharded index."""
    from safetensors import safe_open

    out: dict[str, str] = {}
    for file, file_keys in _files_for(path, None).items():
        if file_keys is None:
            try:
                with safe_open(file, framework="pt") as f:
                    file_keys = list(f.keys())
            except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
                raise CheckpointError(f"{file}: cannot read as safetensors ({type(e).__name__}: {e})") from e
        out.update(dict.fromkeys(file_keys, file))
    return out


def load_state_dict_from(path: str, keys: Iterable[str] | None = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read ``keys`` (default: all) from a safetensors file, directory or sharded index."""
    from safetensors import safe_open

    wanted = None if keys is None else set(keys)
    out: dict[str, torch.Tensor] = {}
    for file, file_keys in _files_for(path, wanted).items():
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                names = f.keys() if file_keys is None else file_keys
                for name in names:
                    if wanted is None or name in wanted:
                        out[name] = f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
            raise CheckpointError(f"{file}: cannot read as safetensors ({type(e).__name__}: {e})") from e
    return out


def load_stage(stage: torch.nn.Module, path: str, *, strict: bool = True, aliases: dict[str, list[str]] | None = None) -> None:
    """Load exactly this stage's keys from a transformers safetensors checkpoint.

    Tensors are copied into the stage one at a time, straight from each file, so the
    peak memory is the stage's weights plus one tensor, not twice the stage.

    Args:
        aliases: other names a key may be stored under (a tied ``lm_head.weight`` is
            saved by transformers as ``model.embed_tokens.weight`` only).

    Raises:
        CheckpointError: a key is missing, or a tensor has the wrong shape.
    """
    from safetensors import safe_open

    own = stage.state_dict()
    source_of: dict[str, str] = {}  # stored name -> stage name
    for name in own:
        source_of.setdefault(name, name)
    for name, alts in (aliases or {}).items():
        for alt in alts:
            source_of.setdefault(alt, name)
    files = _files_for(path, set(source_of))
    found: set[str] = set()
    for file, file_keys in files.items():
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                stored = set(f.keys()) if file_keys is None else set(file_keys)
                for key in sorted(stored & set(source_of)):
                    target = source_of[key]
                    if target in found:
                        continue  # the stage's own name wins over an alias
                    if key != target and target in stored:
                        continue
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(own[target].shape):
                        raise CheckpointError(
                            f"{file}: {key} has shape {tuple(tensor.shape)}, the stage expects {tuple(own[target].shape)}"
                        )
                    if tensor.dtype != own[target].dtype:
                        raise CheckpointError(
                            f"{file}: {key} has dtype {tensor.dtype}, the stage expects {own[target].dtype}"
                        )
                    with torch.no_grad():
                        own[target].copy_(tensor)
                    found.add(target)
                    del tensor
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
            raise CheckpointError(f"{file}: cannot read as safetensors ({type(e).__name__}: {e})") from e
    missing = sorted(set(own) - found)
    if missing and strict:
        raise CheckpointError(f"{path}: missing {len(missing)} key(s) of this stage, e.g. {missing[:3]}")


def save_stage(stage: torch.nn.Module, path: str) -> None:
    """Write this stage's parameters and buffers under their original names."""
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share storage (tied weights in one stage)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in stage.state_dict().items()}
    save_file(tensors, path, metadata={"format": "pt"})


def save_optimizer(optimizer: torch.optim.Optimizer, stage: torch.nn.Module, path: str) -> None:
    """The optimizer state of a stage's parameters, keyed by parameter name, as safetensors.

    Tensors go in as ``state.<param name>.<key>``; hyper-parameters and non-tensor state
    as JSON in the file's metadata. No pickle.
    """
    from safetensors.torch import save_file

    names = {id(p): n for n, p in stage.named_parameters()}
    sd = optimizer.state_dict()
    index_to_name = {}
    flat_params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(flat_params):
        if id(p) not in names:
            raise CheckpointError("the optimizer holds a parameter that is not in this stage")
        index_to_name[i] = names[id(p)]
    tensors, scalars = {}, {}
    for i, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index_to_name[i]}.{key}"] = value.detach().cpu().clone().contiguous()
            else:
                scalars[f"{index_to_name[i]}.{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [index_to_name[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    save_file(tensors, path, metadata={"format": "pt", "param_groups": json.dumps(groups), "scalars": json.dumps(scalars)})


def load_optimizer(optimizer: torch.optim.Optimizer, stage: torch.nn.Module, path: str) -> None:
    """Restore what :func:`save_optimizer` wrote into an optimizer over the same stage."""
    from safetensors import safe_open

    names = {id(p): n for n, p in stage.named_parameters()}
    flat_params = [p for group in optimizer.param_groups for p in group["params"]]
    name_to_index = {names[id(p)]: i for i, p in enumerate(flat_params)}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            groups = json.loads(meta["param_groups"])
            scalars = json.loads(meta.get("scalars", "{}"))
            state: dict[int, dict] = {}
            for key in f.keys():
                _, rest = key.split(".", 1)
                pname, skey = rest.rsplit(".", 1)
                state.setdefault(name_to_index[pname], {})[skey] = f.get_tensor(key)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: not an fxpp optimizer checkpoint for this stage ({type(e).__name__}: {e})") from e
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read as safetensors ({type(e).__name__}: {e})") from e
    for key, value in scalars.items():
        pname, skey = key.rsplit(".", 1)
        state.setdefault(name_to_index[pname], {})[skey] = value
    for group in groups:
        group["params"] = [name_to_index[n] for n in group["params"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_sharded(module: torch.nn.Module, path: str) -> None:
    """Load ``module``'s parameters and buffers from ``path``, reading only each rank's local shard.

    For a ``DTensor`` (FSDP2's ``Shard(0)`` over a dp mesh) only the rows of the local
    shard are read, with safetensors' ``get_slice``; no full tensor and no full state dict
    is materialised, so the peak is the rank's own tensors plus one shard being copied.
    Non-persistent buffers (rotary ``inv_freq``) are not read: the caller recomputes them
    (as ``build_stage`` does with the model's ``_init_weights``).

    Raises:
        CheckpointError: a key is missing, or a tensor has the wrong shape or dtype.
    """
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    own = dict(module.named_parameters())
    for mod_name, sub in module.named_modules():  # persistent buffers only: rotary inv_freq is recomputed
        for name, buf in sub.named_buffers(recurse=False):
            if name not in sub._non_persistent_buffers_set:
                own[f"{mod_name}.{name}" if mod_name else name] = buf
    found: set[str] = set()
    for file, file_keys in _files_for(path, set(own)).items():
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                stored = set(f.keys()) if file_keys is None else set(file_keys)
                for key in sorted(stored & set(own)):
                    target = own[key]
                    sl = f.get_slice(key)
                    shape = tuple(sl.get_shape())
                    if shape != tuple(target.shape):
                        raise CheckpointError(f"{file}: {key} has shape {shape}, the stage expects {tuple(target.shape)}")
                    if isinstance(target, DTensor):
                        local = target.to_local()
                        lshape, offset = compute_local_shape_and_global_offset(
                            target.shape, target.device_mesh, target.placements)
                        index = tuple(slice(o, o + n) for o, n in zip(offset, lshape))
                        tensor = sl[index] if local.numel() else None
                    else:
                        local, tensor = target, sl[:]
                    if tensor is not None:
                        if tensor.dtype != local.dtype:
                            raise CheckpointError(f"{file}: {key} has dtype {tensor.dtype}, the stage expects {local.dtype}")
                        with torch.no_grad():
                            local.copy_(tensor.reshape(local.shape))
                    found.add(key)
                    del tensor
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
            raise CheckpointError(f"{file}: cannot read as safetensors ({type(e).__name__}: {e})") from e
    missing = sorted(set(own) - found)
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} key(s) of this stage, e.g. {missing[:3]}")

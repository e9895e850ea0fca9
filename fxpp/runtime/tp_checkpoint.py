"""Tensor-parallel checkpoints: each rank reads and writes only its own slices of each tensor.

Terms
-----
local index
    Where a tensor's local part sits in the whole tensor: per dimension, the runs
    ``[start, stop)`` of whole-tensor indices that the local tensor holds, in local order
    (:func:`local_index`). A plain tensor (a norm, replicated over tp) has one run per
    dimension, all of it. A ``Shard(d)`` DTensor (transformers' colwise, rowwise and
    embedding styles) has one run of ``d``: a contiguous block. A
    ``_StridedShard(d, split_factor=k)`` (transformers' ``packed_colwise`` /
    ``packed_rowwise``, a fused ``gate_up_proj``: each rank holds its block of each of the
    ``k`` packed parts) has ``k`` runs of ``d``. FSDP2 over dp splits a tp run further.
block
    One run of every dimension: a box of the whole tensor that is also a box of the local
    tensor (:func:`blocks`). A rank reads its part of a tensor as its blocks,
    ``safe_open(file).get_slice(key)[block]``: the bytes of its part, never the whole.
tp stage file
    ``save_tp_stage``: a stage's tensors as one (dp, tp) rank holds them, the local index of
    each DTensor in the file's metadata under :data:`TP_INDEX_KEY`
    (``{key: {"shape": whole shape, "index": local index}}``). ``fxpp export``
    (``fxpp/trainer/save_reader.py``) joins the parts into whole tensors; a resume reads each
    part back into the same rank, and refuses any other.

Note [tensor parallel checkpoints]
    The local index is derived from the parameter's own placements, after the plan (and
    FSDP2) made it a DTensor, by torch's own splitting: ``distribute_tensor`` of an
    ``arange`` over one dimension with ``src_data_rank=None`` (every rank cuts its part
    locally, no communication), so uneven splits, strided (packed) shards and FSDP2's
    ``_StridedShard`` over dp come out as torch lays them out, not as fxpp re-derives them.
    A wrong offset cannot pass unseen: the index must add up to the local tensor's shape
    (``to_local()``) and to torch's ``compute_local_shape_and_global_offset``, every block
    read must have the shape of its place in the local tensor, a checkpoint tensor must have
    the DTensor's whole shape, and a tp stage file must hold exactly this rank's index; each
    mismatch is a ``CheckpointError`` naming the file, the key and both values.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

from ..errors import CheckpointError
from .checkpoint import DTYPES, SHARDS_KEY, _files_for, refuse_non_finite
from .durable import durable_write

TP_INDEX_KEY = "fxpp_tp_index"  # metadata of a tp stage or optimizer file: {key: {"shape", "index"}}

Index = tuple[tuple[tuple[int, int], ...], ...]  # per dimension, runs [start, stop) in local order


def _runs(indices: list[int]) -> tuple[tuple[int, int], ...]:
    """Consecutive indices as runs ``[start, stop)``, in their order: ``[0, 1, 4, 5]`` -> ``((0, 2), (4, 6))``."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, i + 1])
    return tuple((a, b) for a, b in runs)


def local_index(t: torch.Tensor, key: str = "<tensor>") -> Index:
    """The local index of ``t`` (Terms); a plain tensor's is the whole tensor.

    Raises:
        CheckpointError: a ``Partial`` placement (no part of a checkpoint tensor), or an index
            that disagrees with the local tensor's shape (Note [tensor parallel checkpoints]).
    """
    if not isinstance(t, DTensor):
        return tuple(((0, n),) if n else () for n in t.shape)
    index = []
    for dim, size in enumerate(t.shape):
        placements = []
        for p in t.placements:
            if isinstance(p, (Shard, _StridedShard)):
                placements.append(p if p.dim % t.ndim == dim else Replicate())
            elif isinstance(p, Replicate):
                placements.append(p)
            else:
                raise CheckpointError(f"{key} is placed {t.placements} on mesh {t.device_mesh.mesh_dim_names}: a "
                                      f"{p} part is no slice of a checkpoint tensor")
        probe = torch.arange(size).reshape([size if i == dim else 1 for i in range(t.ndim)])
        mine = distribute_tensor(probe, t.device_mesh, placements, src_data_rank=None).to_local()
        index.append(_runs(mine.reshape(-1).tolist()))
    index = tuple(index)
    shape = local_shape(index)
    torch_shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    first = tuple(runs[0][0] if runs else offset[d] for d, runs in enumerate(index))
    if shape != tuple(t.to_local().shape) or shape != tuple(torch_shape) or (
            all(shape) and first != tuple(offset)):
        raise CheckpointError(f"{key}: its local index {show_index(index)} (shape {list(shape)}, first offset "
                              f"{list(first)}) disagrees with the DTensor's local shape {list(t.to_local().shape)} "
                              f"and torch's {list(torch_shape)} at offset {list(offset)} (placements {t.placements})")
    return index


def local_shape(index: Index) -> tuple[int, ...]:
    return tuple(sum(b - a for a, b in runs) for runs in index)


def show_index(index: Index) -> str:
    """An index as a message shows it: ``[0:32, 64:96] x [0:64]``."""
    return " x ".join("[" + ", ".join(f"{a}:{b}" for a, b in runs) + "]" for runs in index) or "[]"


def as_json(index: Index) -> list:
    return [[list(r) for r in runs] for runs in index]


def from_json(value) -> Index:
    return tuple(tuple((int(a), int(b)) for a, b in runs) for runs in value)


def blocks(index: Index) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """``(slices of the whole tensor, slices of the local tensor)`` of each block (Terms), in local order."""
    per_dim = []
    for runs in index:
        local, placed = 0, []
        for a, b in runs:
            placed.append((slice(a, b), slice(local, local + b - a)))
            local += b - a
        per_dim.append(placed)
    for combo in itertools.product(*per_dim):
        yield tuple(g for g, _ in combo), tuple(loc for _, loc in combo)


def load_tp_stage(stage: torch.nn.Module, path: str, *, strict: bool = True,
                  aliases: dict[str, list[str]] | None = None) -> None:
    """Load a tensor-parallel stage's keys, each rank only its own slices (Note [tensor parallel checkpoints]).

    ``path`` is a checkpoint (a safetensors file, directory or sharded index: every tensor
    whole; each DTensor reads the blocks of its local index with ``get_slice``, plain
    tensors are read whole) or a tp stage file (each DTensor's part, which must be this
    rank's). Floating-point tensors are cast to the stage's dtype, as ``load_stage`` does.

    Args:
        strict: a key of the stage that the checkpoint lacks is an error.
        aliases: other names a key may be stored under (a tied ``lm_head.weight``).

    Raises:
        CheckpointError: a key is missing; a tensor of another whole shape or a dtype that is
            not a floating-point cast; a read whose shape is not its place in the local
            tensor; a tp stage file holding another rank's part; a per-shard file of a run
            without tp; a file that is not safetensors.
    """
    own: dict[str, torch.Tensor] = dict(stage.named_parameters(remove_duplicate=False))
    for mod_name, sub in stage.named_modules(remove_duplicate=False):
        for name, buf in sub.named_buffers(recurse=False):
            if name not in sub._non_persistent_buffers_set:
                own[f"{mod_name}.{name}" if mod_name else name] = buf
    source_of: dict[str, str] = {name: name for name in own}  # stored name -> stage name
    for name, alts in (aliases or {}).items():
        for alt in alts:
            source_of.setdefault(alt, name)
    files = _files_for(path, set(source_of))
    done: set[int] = set()
    for aliased in (False, True):  # the stage's own names first, then an alias where the own name is absent
        for file, file_keys in files.items():
            try:
                with safe_open(file, framework="pt", device="cpu") as f:
                    metadata = f.metadata() or {}
                    if SHARDS_KEY in metadata:
                        raise CheckpointError(f"{file}: a per-shard file of a run without tensor parallelism "
                                              f"({SHARDS_KEY}); it loads only into the stage, dp size and rank that "
                                              "saved it (fxpp export writes a whole checkpoint)")
                    parts = json.loads(metadata.get(TP_INDEX_KEY, "{}"))
                    names = list(f.keys()) if file_keys is None else file_keys
                    for key in sorted(k for k in names if k in source_of and (source_of[k] != k) == aliased):
                        target = own[source_of[key]]
                        if id(target) not in done:
                            _read_into(f, file, key, target, parts.get(key))
                            done.add(id(target))
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read as safetensors ({type(e).__name__}: {e})") from e
    names_of: dict[int, str] = {}
    for name, t in own.items():
        names_of.setdefault(id(t), name)
    missing = sorted(names_of[i] for i in set(names_of) - done)
    if missing and strict:
        raise CheckpointError(f"{path}: missing {len(missing)} key(s) of this stage, e.g. {missing[:3]}")


def _read_into(f, file: str, key: str, target: torch.Tensor, part: dict | None) -> None:
    """Read ``key`` of an open file into this rank's part of ``target`` (:func:`load_tp_stage`)."""
    index = local_index(target, key)
    local = target.to_local() if isinstance(target, DTensor) else target
    stored = f.get_slice(key)
    stored_shape, dtype = tuple(stored.get_shape()), DTYPES.get(stored.get_dtype())
    if dtype is None or (dtype != local.dtype and not (dtype.is_floating_point and local.dtype.is_floating_point)):
        raise CheckpointError(f"{file}: {key} has dtype {stored.get_dtype()}, the stage expects {local.dtype}")
    if part is not None:  # a tp stage file: it holds one rank's part
        saved = from_json(part["index"])
        if tuple(part["shape"]) != tuple(target.shape) or saved != index:
            raise CheckpointError(
                f"{file}: holds part {show_index(saved)} of {key} {list(part['shape'])}, but this rank's part is "
                f"{show_index(index)} of {list(target.shape)}: a tp stage file loads only into the same stage, dp and tp "
                "sizes and ranks (fxpp export writes a whole checkpoint)")
        if stored_shape != tuple(local.shape):
            raise CheckpointError(f"{file}: {key} has shape {stored_shape}, its part {show_index(saved)} is "
                                  f"{tuple(local.shape)}")
        reads = [(tuple(slice(None) for _ in stored_shape), tuple(slice(None) for _ in stored_shape))]
    else:
        if stored_shape != tuple(target.shape):
            raise CheckpointError(f"{file}: {key} has shape {stored_shape}, the stage expects {tuple(target.shape)}")
        reads = list(blocks(index)) if local.numel() else []
    with torch.no_grad():
        if not stored_shape:  # a 0-d tensor: nothing to slice
            local.copy_(f.get_tensor(key))
            return
        for whole, mine in reads:
            piece = stored[whole]
            place = local[mine]
            if tuple(piece.shape) != tuple(place.shape):
                raise CheckpointError(f"{file}: read {list(piece.shape)} of {key} at {whole}, its place in this "
                                      f"rank's part {show_index(index)} is {list(place.shape)}")
            place.copy_(piece)


def local_state(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """``module``'s state as this rank holds it, and the whole shape and local index of each DTensor."""
    tensors: dict[str, torch.Tensor] = {}
    parts: dict[str, dict] = {}
    for key, value in module.state_dict().items():
        if isinstance(value, DTensor):
            parts[key] = {"shape": list(value.shape), "index": as_json(local_index(value, key))}
            value = value.to_local()
        # clone: safetensors refuses tensors that share storage (tied weights in one stage)
        tensors[key] = value.detach().cpu().clone().contiguous()
    return tensors, parts


def save_tp_stage(stage: torch.nn.Module, path: str) -> dict:
    """Write this rank's part of a tensor-parallel stage (a tp stage file, Terms), durably.

    Returns:
        the file's size and sha256 (``fxpp.runtime.durable.file_record``).

    Raises:
        NonFiniteError: a tensor holds NaN or infinity (nothing is written).
        SaveIOError: the file cannot be written, naming it.
    """
    tensors, parts = local_state(stage)
    refuse_non_finite(tensors, path)
    metadata = {"format": "pt", TP_INDEX_KEY: json.dumps(parts)}
    return durable_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def parameter_parts(params: dict[str, torch.nn.Parameter]) -> dict[str, str]:
    """The metadata an optimizer file of a tp rank carries: each DTensor parameter's whole shape and local index."""
    parts = {name: {"shape": list(p.shape), "index": as_json(local_index(p, name))}
             for name, p in params.items() if isinstance(p, DTensor)}
    return {TP_INDEX_KEY: json.dumps(parts)}


def check_optimizer_parts(path: str, params: dict[str, torch.nn.Parameter]) -> None:
    """Refuse an optimizer file saved by a rank that held other parts of the parameters.

    Raises:
        CheckpointError: naming the parameter and both parts.
    """
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            saved = json.loads((f.metadata() or {}).get(TP_INDEX_KEY, "{}"))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as safetensors ({type(e).__name__}: {e})") from e
    now = json.loads(parameter_parts(params)[TP_INDEX_KEY])
    for name in sorted(set(saved) | set(now)):
        if saved.get(name) != now.get(name):
            was, mine = saved.get(name), now.get(name)
            raise CheckpointError(
                f"{path}: the optimizer state of {name} was saved for part "
                f"{show_index(from_json(was['index'])) if was else 'none (a whole parameter)'}, this rank holds "
                f"{show_index(from_json(mine['index'])) if mine else 'the whole parameter'}: an optimizer file loads only "
                "into the same stage, dp and tp sizes and ranks")

"""Checkpoints: per-stage loading and saving with safetensors only (no pickle)."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..errors import CheckpointError, NonFiniteError
from .durable import durable_write


def _special_kind(mode: int) -> str | None:
    """What a non-regular file is ("a fifo", ...), or None for a regular file."""
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a fifo"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "not a regular file"


def _in_hub_cache_blobs(root: str, real: str) -> bool:
    """A Hugging Face hub cache snapshot (``REPO/snapshots/REV``) links its files to ``REPO/blobs``."""
    if os.path.basename(os.path.dirname(root)) != "snapshots":
        return False
    blobs = os.path.join(os.path.dirname(os.path.dirname(root)), "blobs")
    return os.path.commonpath([real, blobs]) == blobs


def resolve_inside(folder: str, name: str, where: str) -> str:
    """The path of ``name``, a regular file that stays inside ``folder`` (Note [files inside the folder]).

    Note [files inside the folder]: a checkpoint folder is data from elsewhere; its index
    names files, and fxpp opens only regular files inside the folder: never an absolute
    path, a ``..`` component, a symlink whose target leaves the folder (except a hub cache
    snapshot's links into its repository's ``blobs``, which is how ``huggingface_hub``
    stores every file), nor a fifo, device, socket or directory (opening a fifo blocks
    forever; a device reads without end).

    Args:
        where: who names the file, for the message (``"DIR/model.safetensors.index.json: KEY"``).

    Raises:
        CheckpointError: naming ``where`` and ``name``.
    """
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise CheckpointError(f"{where}: {name!r} is an absolute path; a checkpoint names files inside its folder")
    if ".." in re.split(r"[\\/]", name):
        raise CheckpointError(f"{where}: {name!r} has a '..' component; a checkpoint names files inside its folder")
    path = os.path.join(folder, name)
    root, real = os.path.realpath(folder), os.path.realpath(path)
    if os.path.commonpath([root, real]) != root and not _in_hub_cache_blobs(root, real):
        raise CheckpointError(f"{where}: {name!r} is a symlink to {real}, outside {folder}; a checkpoint names files "
                              "inside its folder")
    try:
        mode = os.stat(real).st_mode
    except OSError as e:
        raise CheckpointError(f"{where}: {name!r} cannot be read in {folder} ({type(e).__name__}: {e})") from e
    kind = _special_kind(mode)
    if kind is not None:
        raise CheckpointError(f"{where}: {name!r} is {kind}, not a regular file")
    return path


def _files_for(path: str, keys: Iterable[str] | None) -> dict[str, list[str]]:
    """``{file: [keys]}`` to read for ``keys`` from a single file or a sharded index.

    Every file the index names is checked, wanted or not (Note [files inside the folder]).
    """
    if os.path.isdir(path):
        for name in ("model.safetensors.index.json", "model.safetensors"):
            if os.path.lexists(os.path.join(path, name)):
                path = resolve_inside(path, name, path)
                break
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    else:  # a file the user names: it may be a link anywhere, but never a fifo or device
        try:
            kind = _special_kind(os.stat(path).st_mode)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
        if kind is not None:
            raise CheckpointError(f"{path}: is {kind}, not a safetensors file")
    if path.endswith(".json"):
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("weight_map is not {key: file name}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a safetensors index ({e})") from e
        base = os.path.dirname(path)
        checked = {}
        for key in sorted(weight_map):
            name = weight_map[key]
            if name not in checked:
                checked[name] = resolve_inside(base, name, f"{path}: {key}")
        wanted = set(weight_map) if keys is None else set(keys)
        files: dict[str, list[str]] = {}
        for key in sorted(wanted & set(weight_map)):
            files.setdefault(checked[weight_map[key]], []).append(key)
        return files
    return {path: None}  # type: ignore[dict-item]


def key_files(path: str) -> dict[str, str]:
    """``{key: file}`` of every tensor of a safetensors file, directory or sharded index."""
    out: dict[str, str] = {}
    for file, file_keys in _files_for(path, None).items():
        out.update(dict.fromkeys(safetensors_header(file)[0] if file_keys is None else file_keys, file))
    return out


def stored_shapes(path: str) -> dict[str, tuple[tuple[int, ...], torch.dtype, str]]:
    """``{key: (shape, dtype, file)}`` of every tensor of a checkpoint, from the file headers only."""
    out = {}
    for file in sorted(_files_for(path, None)):
        header, _, _ = safetensors_header(file)
        for key, entry in header.items():
            out[key] = (tuple(entry["shape"]), DTYPES[entry["dtype"]], file)
    return out


def check_checkpoint(model: torch.nn.Module, stored: dict[str, tuple[tuple, torch.dtype, str]] | None,
                     source: str) -> set[str]:
    """Check that a checkpoint holds every key of ``model``, nothing else, in the right shapes.

    A tied ``lm_head.weight`` may be absent, as transformers saves it (the model ties it).
    Non-persistent buffers (rotary ``inv_freq``) are not in ``state_dict`` nor in checkpoints.
    Floating-point dtypes may differ (they are cast to the model's, as transformers does).
    Works on a meta model: ``stored`` defaults to the file headers (:func:`stored_shapes`).

    Returns:
        the tied keys the checkpoint may lack.

    Raises:
        CheckpointError: naming the first missing, unexpected or misshapen key and its file.
    """
    if stored is None:
        stored = stored_shapes(source)
    own = model.state_dict()
    tie = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    tied = {k for k in own if k.endswith("lm_head.weight")} if tie else set()
    missing = sorted(set(own) - set(stored) - tied)
    unexpected = sorted(set(stored) - set(own))
    where = sorted({file for _, _, file in stored.values()}) or [source]
    if missing:
        raise CheckpointError(f"{where[0] if len(where) == 1 else source}: missing {len(missing)} key(s) of "
                              f"{type(model).__name__}: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; "
                              f"the checkpoint does not match its config.json")
    if unexpected:
        raise CheckpointError(f"{stored[unexpected[0]][2]}: {len(unexpected)} unexpected key(s), "
                              f"not a parameter or buffer of {type(model).__name__}: unexpected key {unexpected[0]}"
                              f"{', ' + ', '.join(unexpected[1:3]) if len(unexpected) > 1 else ''}")
    for key, (shape, dtype, file) in stored.items():
        if tuple(shape) != tuple(own[key].shape):
            raise CheckpointError(f"{file}: {key} is {tuple(shape)} {dtype} in the "
                                  f"checkpoint, the model expects {tuple(own[key].shape)}")
        if dtype != own[key].dtype and not (dtype.is_floating_point and own[key].is_floating_point()):
            raise CheckpointError(f"{file}: {key} is {dtype} in the checkpoint, "
                                  f"the model expects {own[key].dtype}")
    return tied


def load_state_dict_from(path: str, keys: Iterable[str] | None = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read ``keys`` (default: all) from a safetensors file, directory or sharded index."""
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
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read as safetensors ({type(e).__name__}: {e})") from e
    return out


# safetensors dtype names -> torch dtypes (the subset fxpp reads and writes)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


# safetensors' own limit on the header: MAX_HEADER_SIZE = 100_000_000 in safetensors/src/tensor.rs
# (read_metadata refuses a larger one with HeaderTooLarge). fxpp's reader refuses it before reading it.
MAX_HEADER_BYTES = 100_000_000


def safetensors_header(file: str) -> tuple[dict[str, dict], int, dict[str, str]]:
    """``({key: {"dtype", "shape", "data_offsets"}}, offset of the data, metadata)`` of a safetensors file.

    The format is an 8-byte little-endian header length, a JSON header, then the data
    (https://github.com/huggingface/safetensors, "Format").

    Raises:
        CheckpointError: not a regular file, a header above :data:`MAX_HEADER_BYTES`, not a
            safetensors file.
    """
    try:
        info = os.stat(file)
        kind = _special_kind(info.st_mode)
        if kind is not None:
            raise CheckpointError(f"{file}: is {kind}, not a safetensors file")
        size = info.st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{file}: cannot read as safetensors: a header of {n} bytes, above "
                                      f"safetensors' own limit of {MAX_HEADER_BYTES} bytes (100 MB); not read")
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        metadata = header.pop("__metadata__", None) or {}
        for key, entry in header.items():
            begin, stop = entry["data_offsets"]
            if entry["dtype"] not in DTYPES or stop > size - 8 - n or begin > stop:
                raise ValueError(f"{key}: dtype {entry['dtype']} or offsets {entry['data_offsets']} out of range")
            nbytes = int(torch.Size(entry["shape"]).numel()) * DTYPES[entry["dtype"]].itemsize
            if stop - begin != nbytes:
                raise ValueError(f"{key}: {stop - begin} bytes stored for shape {entry['shape']} {entry['dtype']} "
                                 f"({nbytes} bytes)")
        return header, 8 + n, metadata
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: cannot read as safetensors ({type(e).__name__}: {e})") from e


_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def write_safetensors(path: str, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      pieces: Callable[[str], Iterable[torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file a piece at a time: only one piece of one tensor is in memory.

    The header comes first, from the dtypes and shapes alone (``tensors``, in file order),
    then each tensor's bytes as ``pieces(key)`` yields them: consecutive row ranges of the
    tensor, in its dtype. The file is written as ``path.tmp`` and renamed when complete.
    Readers see what ``safetensors.torch.save_file`` writes (a header padded to 8 bytes,
    the data in the header's offsets).

    Raises:
        CheckpointError: a tensor's pieces are not its dtype or do not add up to its shape.
    """
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, (dtype, shape) in tensors.items():
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key, (dtype, _) in tensors.items():
            begin, stop = header[key]["data_offsets"]  # type: ignore[index]
            for piece in pieces(key):
                if piece.dtype != dtype:
                    raise CheckpointError(f"{path}: a piece of {key} is {piece.dtype}, the header says {dtype}")
                f.write(memoryview(piece.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
                del piece  # before the next piece is made: one piece in memory, not two
            if f.tell() != 8 + len(text) + stop:
                raise CheckpointError(f"{path}: {key} wrote {f.tell() - 8 - len(text) - begin} bytes, its shape and "
                                      f"dtype are {stop - begin}")
    os.replace(tmp, path)


def read_rows(f, entry: dict, data_start: int, rows: slice, out: torch.Tensor) -> None:
    """Read rows ``rows`` of a stored tensor straight into ``out`` (contiguous CPU, the stored dtype).

    Rows of a row-major tensor are one contiguous byte range: one seek and one read into
    ``out``'s own memory, no intermediate copy, no memory-mapped pages left resident.
    """
    shape = entry["shape"]
    row_bytes = out.element_size() * (int(torch.Size(shape[1:]).numel()) if shape else 1)
    begin = data_start + entry["data_offsets"][0] + (rows.start or 0) * row_bytes
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    f.seek(begin)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{f.name}: truncated while reading {len(view)} bytes at offset {begin}")
        got += n


def _local_rows(target: torch.Tensor, key: str, file: str) -> tuple[torch.Tensor, slice]:
    """The tensor to fill and the rows of the stored (global) tensor it holds.

    A ``DTensor`` (FSDP2 ``Shard(0)``, or replicated) holds a range of leading rows; any
    other sharding would need a strided read and is refused rather than read wrongly.
    """
    if not isinstance(target, DTensor):
        return target, slice(0, target.shape[0] if target.dim() else 1)
    local = target.to_local()
    lshape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    if any(o != 0 or n != full for o, n, full in zip(offset[1:], lshape[1:], target.shape[1:])):
        raise CheckpointError(f"{file}: {key} is sharded as {target.placements}; only leading-row shards "
                              "(FSDP2's Shard(0)) or replicas can be read from a checkpoint")
    return local, slice(offset[0] if lshape else 0, (offset[0] + lshape[0]) if lshape else 1)


def load_stage(stage: torch.nn.Module, path: str, *, strict: bool = True, aliases: dict[str, list[str]] | None = None) -> None:
    """Load exactly this stage's keys (and, for FSDP2 ``DTensor`` s, only this rank's rows).

    Each tensor is read from its file straight into the stage's own memory (one read per
    tensor, see :func:`read_rows`), so the peak is the stage's tensors plus, on an
    accelerator, one tensor in host memory: never the whole checkpoint, never a second
    copy of the stage. A ``DTensor`` reads only the rows of its local shard, so an
    FSDP2-sharded stage built on the meta device (``to_empty`` after ``fully_shard``)
    holds only its shard at any time. Non-persistent buffers (rotary ``inv_freq``) are
    not read: the caller recomputes them (``build_stage`` does, with ``_init_weights``).

    Args:
        strict: a key of the stage that the checkpoint lacks is an error.
        aliases: other names a key may be stored under (a tied ``lm_head.weight`` is
            saved by transformers as ``model.embed_tokens.weight`` only).

    Raises:
        CheckpointError: a key is missing, a tensor has the wrong shape or a dtype that
            is not a floating-point cast (an integer buffer stored as float), a file is
            not safetensors.
    """
    own: dict[str, torch.Tensor] = dict(stage.named_parameters(remove_duplicate=False))
    for mod_name, sub in stage.named_modules(remove_duplicate=False):
        for name, buf in sub.named_buffers(recurse=False):
            if name not in sub._non_persistent_buffers_set:
                own[f"{mod_name}.{name}" if mod_name else name] = buf
    names_of: dict[int, list[str]] = {}  # one tensor may have several names (weights tied within the stage)
    for name, t in own.items():
        names_of.setdefault(id(t), []).append(name)
    source_of: dict[str, str] = {name: name for name in own}  # stored name -> stage name
    for name, alts in (aliases or {}).items():
        for alt in alts:
            source_of.setdefault(alt, name)
    files = {}  # file -> (keys of the stage it holds, header, data offset, per-shard rows)
    for file, file_keys in _files_for(path, set(source_of)).items():
        header, data_start, metadata = safetensors_header(file)
        if file_keys is not None and set(file_keys) - set(header):
            missing_here = sorted(set(file_keys) - set(header))
            raise CheckpointError(f"{file}: the index maps {missing_here[0]} to this file, which does not hold it")
        stored = set(header) if file_keys is None else set(file_keys)
        files[file] = (stored & set(source_of), header, data_start, json.loads(metadata.get(SHARDS_KEY, "{}")))
    done: set[int] = set()
    # The stage's own names first, in every file; then an alias, only where the own name is absent.
    for aliased in (False, True):
        for file, (stored, header, data_start, shards) in files.items():
            keys = sorted(k for k in stored if (source_of[k] != k) == aliased)
            if keys:
                with open(file, "rb") as f:
                    _read_keys(f, keys, header, data_start, shards, own, source_of, done)
    missing = sorted(names_of[i][0] for i in set(names_of) - done)
    if missing and strict:
        raise CheckpointError(f"{path}: missing {len(missing)} key(s) of this stage, e.g. {missing[:3]}")


def _read_keys(f, keys: list[str], header: dict, data_start: int, shards: dict, own: dict, source_of: dict,
               done: set[int]) -> None:
    """Read ``keys`` of one open file into the stage's tensors (:func:`load_stage`); ``done`` grows."""
    file = f.name
    for key in keys:
        target = own[source_of[key]]
        if id(target) in done:
            continue
        entry = header[key]
        stored_shape = tuple(entry["shape"])
        local, rows = _local_rows(target, key, file)
        if key in shards:  # a per-shard file (save_stage of a DTensor): it holds rows [start, stop)
            start, stop, total = shards[key]
            if (start, stop) != (rows.start, rows.stop) or local is target:
                mine = (f"rows {rows.start}-{rows.stop}" if local is not target else "the whole tensor")
                raise CheckpointError(
                    f"{file}: holds rows {start}-{stop} of {total} of {key}, but this stage's shard is {mine}: "
                    "a per-shard checkpoint loads only into the same stage, dp size and dp rank "
                    "(fxpp export writes a whole checkpoint)")
            stored_shape = (total, *stored_shape[1:])
            rows = slice(0, stop - start)
        if stored_shape != tuple(target.shape):
            raise CheckpointError(f"{file}: {key} has shape {stored_shape}, the stage expects {tuple(target.shape)}")
        dtype = DTYPES[entry["dtype"]]
        if dtype != target.dtype and not (dtype.is_floating_point and target.dtype.is_floating_point):
            raise CheckpointError(f"{file}: {key} has dtype {dtype}, the stage expects {target.dtype}")
        if local.numel():
            # Floating-point tensors are cast to the stage's dtype, as transformers' loading does.
            direct = local.device.type == "cpu" and local.is_contiguous() and dtype == local.dtype
            buffer = local if direct else torch.empty(local.shape, dtype=dtype)
            with torch.no_grad():
                read_rows(f, entry, data_start, rows, buffer)
                if not direct:
                    local.copy_(buffer)
            del buffer
        done.add(id(target))


def recompute_non_persistent_buffers(model: torch.nn.Module, module: torch.nn.Module,
                                     device: str | torch.device) -> None:
    """Non-persistent buffers (rotary ``inv_freq``) are in no checkpoint: give those still on
    meta memory on ``device``, and compute every one with the model's ``_init_weights``."""
    init = getattr(model, "_init_weights", None)
    for sub in module.modules():
        if not sub._non_persistent_buffers_set:
            continue
        for name in sub._non_persistent_buffers_set:
            buffer = sub._buffers.get(name)
            if buffer is not None and buffer.is_meta:
                sub._buffers[name] = torch.empty_like(buffer, device=device)
        if init is not None:
            init(sub)


SHARDS_KEY = "fxpp_shards"  # safetensors metadata of a per-shard file: {key: [first row, end row, rows]}


def local_tensors(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """``module``'s state as this rank holds it, and which rows of each sharded tensor that is.

    A ``DTensor`` parameter (FSDP2) contributes its local shard; its entry in the second
    dict, ``[first row, end row, rows of the whole tensor]``, lets a loader check that a
    shard goes back where it came from and lets ``fxpp export`` reassemble the tensor.
    """
    tensors: dict[str, torch.Tensor] = {}
    shards: dict[str, list[int]] = {}
    for key, value in module.state_dict().items():
        if isinstance(value, DTensor):
            local, rows = _local_rows(value, key, "<memory>")
            if any(isinstance(p, Shard) for p in value.placements):  # even where this rank holds every row
                shards[key] = [rows.start, rows.stop, value.shape[0]]
            value = local
        # clone: safetensors refuses tensors that share storage (tied weights in one stage)
        tensors[key] = value.detach().cpu().clone().contiguous()
    return tensors, shards


def save_stage(stage: torch.nn.Module, path: str) -> dict:
    """Write this stage's parameters and buffers under their original names, durably.

    An FSDP2-sharded stage writes its local shard only (a per-shard file, the rows in
    its metadata); :func:`load_stage` reads it back into the same shard and refuses any
    other, and ``fxpp export`` joins the shards into whole tensors. The file is written
    under a temporary name, fsync'ed and renamed (``fxpp.runtime.durable``): ``path``
    holds a whole file or none.

    Returns:
        the file's size and sha256 (``fxpp.runtime.durable.file_record``).

    Raises:
        SaveIOError: the file cannot be written, naming it.
    """
    tensors, shards = local_tensors(stage)
    refuse_non_finite(tensors, path)
    metadata = {"format": "pt"}
    if shards:
        metadata[SHARDS_KEY] = json.dumps(shards)
    return durable_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def refuse_non_finite(tensors: dict[str, torch.Tensor], path: str) -> None:
    """A save never holds NaN or infinity: a run resumed or exported from it would go on from
    values no training step can give (the run itself stops at a non-finite loss or norm).

    Raises:
        NonFiniteError: naming the first floating tensor with a non-finite value, and the file.
    """
    floating = [(name, t) for name, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not floating:
        return
    # one host read for the whole file, not one per tensor
    finite = torch.stack([torch.isfinite(t).all() for _, t in floating]).cpu()
    if not bool(finite.all()):
        name = floating[int((~finite).nonzero()[0])][0]
        raise NonFiniteError(f"{path}: {name} holds a non-finite value (NaN or infinity); the save refuses it, "
                             "a resumed or exported run would go on from it")


def _parameter_names(params: torch.nn.Module | dict[str, torch.nn.Parameter]) -> dict[int, str]:
    items = params.named_parameters() if isinstance(params, torch.nn.Module) else params.items()
    return {id(p): n for n, p in items}


def save_optimizer(optimizer: torch.optim.Optimizer, params: torch.nn.Module | dict[str, torch.nn.Parameter],
                   path: str, extra: dict[str, torch.Tensor] | None = None, metadata: dict | None = None) -> dict:
    """The optimizer state of a stage's parameters, keyed by parameter name, as safetensors.

    Tensors go in as ``state.<param name>.<key>``; hyper-parameters and non-tensor state
    as JSON in the file's metadata (with ``metadata``); ``extra`` tensors (an RNG state) as ``extra.<name>``.
    State of an FSDP2 parameter is its local shard. No pickle. Written durably, as
    :func:`save_stage` writes.

    Args:
        params: the stage whose parameters the optimizer holds, or ``{name: parameter}``
            (a rank holding two stages names them apart).

    Returns:
        the file's size and sha256.

    Raises:
        CheckpointError: the optimizer holds a parameter ``params`` does not name.
        SaveIOError: the file cannot be written, naming it.
    """
    names = _parameter_names(params)
    sd = optimizer.state_dict()
    index_to_name = {}
    flat_params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(flat_params):
        if id(p) not in names:
            raise CheckpointError("the optimizer holds a parameter that is not in this stage")
        index_to_name[i] = names[id(p)]
    tensors, scalars, sharded = {}, {}, []
    for i, state in sd["state"].items():
        for key, value in state.items():
            name = f"state.{index_to_name[i]}.{key}"
            if isinstance(value, DTensor):
                value = value.to_local()
                sharded.append(name)
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().cpu().clone().contiguous()
            else:
                scalars[f"{index_to_name[i]}.{key}"] = value
    for key, value in (extra or {}).items():
        tensors[f"extra.{key}"] = value.detach().cpu().clone().contiguous()
    refuse_non_finite(tensors, path)
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [index_to_name[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    metadata = {"format": "pt", "param_groups": json.dumps(groups), "scalars": json.dumps(scalars, sort_keys=True),
                "sharded": json.dumps(sorted(sharded)), **(metadata or {})}  # sorted: a resumed state, the same bytes
    return durable_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_optimizer(optimizer: torch.optim.Optimizer, params: torch.nn.Module | dict[str, torch.nn.Parameter],
                   path: str) -> dict[str, torch.Tensor]:
    """Restore what :func:`save_optimizer` wrote into an optimizer over the same parameters.

    Returns:
        the ``extra`` tensors saved with it.

    Raises:
        CheckpointError: the file names parameters the optimizer does not hold, or holds
            state of another shape (another dp size or rank).
    """
    names = _parameter_names(params)
    flat_params = [p for group in optimizer.param_groups for p in group["params"]]
    name_to_index = {names[id(p)]: i for i, p in enumerate(flat_params)}
    extra: dict[str, torch.Tensor] = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            groups = json.loads(meta["param_groups"])
            scalars = json.loads(meta.get("scalars", "{}"))
            sharded = set(json.loads(meta.get("sharded", "[]")))
            state: dict[int, dict] = {}
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                kind, rest = key.split(".", 1)
                if kind == "extra":
                    extra[rest] = f.get_tensor(key)
                    continue
                pname, skey = rest.rsplit(".", 1)
                param = flat_params[name_to_index[pname]]
                value = f.get_tensor(key)
                if key in sharded:
                    if not isinstance(param, DTensor) or tuple(value.shape) != tuple(param.to_local().shape):
                        raise CheckpointError(f"{path}: {key} is a shard of shape {tuple(value.shape)}; this rank's "
                                              f"parameter is {type(param).__name__} {tuple(param.shape)}: a per-shard "
                                              "optimizer state loads only on the same dp size and rank")
                    value = DTensor.from_local(value.to(param.device), param.device_mesh, param.placements,
                                               shape=param.shape, stride=param.stride())
                state.setdefault(name_to_index[pname], {})[skey] = value
    except CheckpointError:
        raise
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: not an fxpp optimizer checkpoint for this stage ({type(e).__name__}: {e})") from e
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as safetensors ({type(e).__name__}: {e})") from e
    for key, value in scalars.items():
        pname, skey = key.rsplit(".", 1)
        state.setdefault(name_to_index[pname], {})[skey] = value
    for group in groups:
        group["params"] = [name_to_index[n] for n in group["params"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return extra


# The FSDP2 case is load_stage's own: a DTensor reads only its rows.
load_sharded = load_stage

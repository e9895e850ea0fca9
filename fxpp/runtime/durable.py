"""Durable files, and outcomes every rank agrees on: the two halves of a save that survives.

Terms:
    durable write: the file is written under a temporary name in its own folder, flushed
        and ``os.fsync``'ed, renamed over its final name with ``os.replace`` (atomic within
        one filesystem), and the folder ``fsync``'ed so that the rename survives a power
        loss too. A reader finds the old file, the new one or none: never a part of one.
    record: ``{"size": bytes, "sha256": hex digest}`` of a file, as a step's ``state.json``
        lists it (``fxpp.trainer.run_state``).
    agree: every rank runs its own part of a collective job (writing its files, reading
        its state), then all ranks exchange an ok flag and a message before anything else
        waits on them. A failing rank raises its own error; the others raise
        ``PeerFailedError`` naming it, within seconds, under gloo and NCCL alike, instead of
        waiting at a barrier for the process group's timeout.

Note [checksum]: sha256 (``hashlib``), streamed in 8 MiB chunks. A save is verified
against it on resume and export, and by hand with ``sha256sum``. It reads at ~1-2 GB/s
per core with the CPU's SHA instructions (0.8 GB/s measured on a loaded shared CPU),
about the speed a disk writes, so a save's cost grows by a fraction, not a multiple;
zlib.crc32 (~2.5x faster here) would also catch torn and truncated files, but a 32-bit
sum misses one random corruption in 4 billion and no common tool checks it. Each rank
hashes the files it wrote (read back from the page cache right after writing), so no
rank reads another's files.
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any, Callable

import torch.distributed as dist

from ..errors import FxppError, PeerFailedError, SaveIOError

_CHUNK = 8 << 20


def fsync_dir(path: str) -> None:
    """Make the entries of folder ``path`` (a rename, a removal) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(f) -> str:
    digest = hashlib.sha256()  # Note [checksum]
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    while n := f.readinto(buffer):
        digest.update(view[:n])
    return digest.hexdigest()


def _record(f) -> dict[str, Any]:
    return {"size": os.fstat(f.fileno()).st_size, "sha256": _sha256(f)}


def file_record(path: str) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file (Note [checksum])."""
    with open(path, "rb") as f:
        return _record(f)


def durable_write(path: str, write: Callable[[str], None]) -> dict[str, Any]:
    """Write ``path`` durably: ``write(temporary path)`` writes it, then fsync, rename, fsync the folder.

    Returns:
        the file's record (its size and sha256, read back from the written file).

    Raises:
        SaveIOError: naming ``path``, when the file cannot be written (no space, no
            permission, a directory in its place); the temporary file is removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "r+b") as f:
            record = _record(f)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except FxppError:
        _remove_quietly(tmp)
        raise
    except Exception as e:  # noqa: BLE001 - OSError, or a writer's own error (safetensors on a full disk)
        _remove_quietly(tmp)
        raise SaveIOError(f"{path}: cannot be written ({type(e).__name__}: {e})") from e
    return record


def write_bytes(path: str, data: bytes) -> dict[str, Any]:
    """:func:`durable_write` of ``data``."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    return durable_write(path, write)


def copy_file(source: str, path: str) -> dict[str, Any]:
    """A durable copy of ``source`` at ``path``."""
    with open(source, "rb") as f:
        return write_bytes(path, f.read())


def remove_durably(path: str) -> None:
    """Remove a file (if there) and make the removal durable."""
    if os.path.lexists(path):
        os.remove(path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_probe(directory: str, nbytes: int = 1 << 16) -> None:
    """Create, write, fsync and remove a probe file in ``directory`` (made if missing).

    Raises:
        SaveIOError: the folder cannot be made or written (no permission, a file in its
            place, no space left), naming it.
    """
    probe = os.path.join(directory, f".fxpp-write-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(bytes(nbytes))
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.remove(probe)
    except OSError as e:
        _remove_quietly(probe)
        raise SaveIOError(f"--save-dir {directory}: cannot write there ({type(e).__name__}: {e}); choose a "
                          "writable folder with free space") from e


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def agree(what: str, work: Callable[[], Any], group=None) -> list[Any]:
    """Run this rank's ``work``, then agree with every rank on the outcome (one ``all_gather_object``).

    Every rank of ``group`` must call it, with the same ``what``. It is the only
    synchronisation a save or load needs: nothing waits at a barrier on a rank that
    already failed.

    Returns:
        what ``work`` returned on each rank, in rank order (the same list on every rank).

    Raises:
        the error of this rank's ``work``, if it raised; else PeerFailedError naming the
        lowest rank that failed and its error.
    """
    error, value = None, None
    try:
        value = work()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the peers have heard of it
        error = e
    message = None if error is None else f"{type(error).__name__}: {error}"
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (message, value), group=group)
    if error is not None:
        raise error
    failed = [(rank, m) for rank, (m, _) in enumerate(gathered) if m is not None]
    if failed:
        rank, message = failed[0]
        raise PeerFailedError(f"{what}: rank {rank} failed: {message}")
    return [v for _, v in gathered]

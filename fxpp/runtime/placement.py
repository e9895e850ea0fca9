"""Which rank holds which stage, and the device and backend a rank uses.

Terms
-----
placement
    Which rank holds which stage. ``"loop"``: stage ``s`` on rank ``s % world_size``
    (GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble). ``"v"``: ranks
    hold stages ``r`` and ``2 * world_size - 1 - r`` (ZBVZeroBubble, DualPipeV).

Everything here is device-agnostic but :func:`default_backend` and :func:`default_device`:
NCCL and CUDA when CUDA is present, gloo and CPU otherwise.
"""

from __future__ import annotations

import os

import torch

from ..errors import StageSpecError

# Schedules whose ranks hold two stages, and their placement.
MULTI_STAGE = {"Interleaved1F1B": "loop", "LoopedBFS": "loop", "InterleavedZeroBubble": "loop",
               "ZBVZeroBubble": "v", "DualPipeV": "v"}
SCHEDULES = ("GPipe", "1F1B", *MULTI_STAGE)  # every schedule `fxpp run` and the benchmarks offer


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def default_device(rank: int) -> torch.device:
    """CUDA when present: the GPU of the node-local rank (torchrun's ``LOCAL_RANK``), else ``rank``'s."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG state: the CPU generator's, and on CUDA the device's (saved with a run, or put
    back when a schedule step is run again)."""
    out = {"rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["rng_cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"], device)


def stage_ranks(num_stages: int, world_size: int, style: str = "loop") -> list[int]:
    """The rank of each stage under ``style`` placement (see the module glossary)."""
    if world_size < 1 or num_stages % world_size:
        raise StageSpecError(
            f"num_stages={num_stages} must be a multiple of the world size {world_size} "
            "(each rank holds the same number of stages)"
        )
    if style == "loop":
        return [s % world_size for s in range(num_stages)]
    if style == "v":
        if num_stages != 2 * world_size:
            raise StageSpecError(f"V placement needs num_stages == 2 * world_size; got {num_stages} and {world_size}")
        return [s if s < world_size else 2 * world_size - 1 - s for s in range(num_stages)]
    raise StageSpecError(f"placement style={style!r} must be 'loop' or 'v'")


def stage_ids_of_rank(rank: int, num_stages: int, world_size: int, style: str = "loop") -> list[int]:
    """The stage ids a rank holds, in order (what multi-stage schedules expect)."""
    return [s for s, r in enumerate(stage_ranks(num_stages, world_size, style)) if r == rank]


def check_placement(ids: set[int], rank: int, num_stages: int, world: int, *, complete: bool = False) -> str:
    """The placement (``"loop"`` or ``"v"``) of the stages this rank builds.

    Raises:
        StageSpecError: the stage ids fit neither placement (or, with ``complete``, are
            not all of one placement's stages).
    """
    fits = []
    for style in ("loop", "v"):
        try:
            expected = set(stage_ids_of_rank(rank, num_stages, world, style))
        except StageSpecError:
            continue
        if ids == expected or (not complete and ids <= expected):
            fits.append(style)
    if not fits:
        raise StageSpecError(
            f"rank {rank} builds stages {sorted(ids)} of {num_stages} on {world} ranks, which is neither loop placement "
            f"({stage_ids_of_rank(rank, num_stages, world, 'loop')}) nor V placement (stages r and 2 * world - 1 - r); "
            "build the stages fxpp.stage_ids_of_rank(rank, num_stages, world, style) gives"
        )
    return fits[0]

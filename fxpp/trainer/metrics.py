"""Training metrics: one JSON line per logged step, collected without a host read on other steps.

Terms
-----
logged step
    A step ``s`` (counted from 1) with ``s % log_every == 0``, or the last step. Only on
    logged steps does a rank read device values (the loss, the gradient norm) or take
    part in the metrics' collectives (the dp loss sum, the all-gather of peak memory);
    every rank knows which steps those are, so the collectives match.
"""

from __future__ import annotations

import json
import os
import resource

import torch
import torch.distributed as dist


def rank_memory(device: torch.device) -> int:
    """This process's peak memory in bytes: allocated on CUDA, the peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def all_rank_memory(device: torch.device) -> list[int]:
    """Every rank's :func:`rank_memory` (one all-gather over the world; every rank calls it)."""
    mine = torch.tensor([rank_memory(device)], dtype=torch.int64, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [int(v) for v in torch.cat(out).tolist()]


def is_logged(step: int, log_every: int, last: int) -> bool:
    """Whether step ``step`` (counted from 1) is a logged step."""
    return step == last or (log_every > 0 and step % log_every == 0)


class MetricsLog:
    """Appends one JSON object per line to ``path`` (the writing rank only), flushed per line."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.path:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

"""Shared helpers for the fxpp benchmark scripts: environment header, table, JSON rows."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess

import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def environment(device: str) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "fxpp"], cwd=ROOT, capture_output=True, text=True).stdout
        if dirty.strip():
            commit += "-dirty"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "fxpp_commit": commit,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }


def print_header(env: dict) -> None:
    print("# " + "  ".join(f"{k}={v}" for k, v in env.items()), flush=True)


def default_json_path(name: str) -> str:
    return os.path.join(ROOT, "benchmarks", "results", f"{name}.json")


def fmt(v, width: int = 60) -> str:
    if isinstance(v, str) and len(v) > width:
        return v[: width - 3] + "..."
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.2e}"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def report(rows: list[dict], columns: list[str], env: dict, json_path: str) -> None:
    """Print ``rows`` as an aligned table, then as JSON lines, and write them (with env) to ``json_path``."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print("# (long cells cut; full rows below)\n")
    for r in rows:
        print(json.dumps(r))
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        for r in rows:
            f.write(json.dumps({**env, **r}) + "\n")
    print(f"# wrote {len(rows)} rows to {json_path}")


@contextlib.contextmanager
def torchrun_group(timeout_s: float):
    """Under ``torchrun``: ``(rank, world, device, env)`` with the process group up, then torn down.

    The one CUDA-specific place of the benchmarks' torchrun path: NCCL and the node-local
    GPU (``LOCAL_RANK``) when CUDA is present, else gloo on CPU.
    """
    import datetime

    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available()
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()) if cuda
              else torch.device("cpu"))
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        env = environment(str(device) if cuda else "cpu")
        if cuda:
            env["gpu"] = torch.cuda.get_device_name(device)
        env["launcher"] = f"torchrun world={world} backend={dist.get_backend()}"
        yield rank, world, device, env
    finally:
        dist.destroy_process_group()


def gather(obj) -> list:
    """Every rank's ``obj`` on every rank (``all_gather_object``)."""
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

"""Shared helpers for the fxpp benchmark scripts: the prologue (threads, environment header),
the schedules argument, table and JSON rows, the torchrun path."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys

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


def start(device: str = "cpu", *, threads: int | None = None, spawned: bool = False, **extra) -> dict:
    """Every benchmark's prologue: pin torch's threads (where ``threads`` is given), read the
    environment, print it as the header line; returns it for the JSON rows.

    ``extra`` entries join the environment. ``spawned``: the run spawns local processes of
    ``threads`` threads each, so the header also gives ``threads_per_process``, the
    machine's cores and its 1-minute load at the start (other users of the machine).
    """
    if threads:
        torch.set_num_threads(threads)
    env = environment(device)
    env.update(extra)
    if spawned:
        env.update(threads_per_process=threads, cpu_count=os.cpu_count(),
                   loadavg_1m_at_start=round(os.getloadavg()[0], 2))
    print_header(env)
    return env


def schedules_arg(ap: argparse.ArgumentParser, text: str, known) -> list[str]:
    """The schedules of a ``--schedules`` comma list; an unknown one is a usage error."""
    schedules = [s for s in text.split(",") if s]
    unknown = [s for s in schedules if s not in known]
    if unknown:
        ap.error(f"unknown schedule(s) {unknown}; known: {', '.join(known)}")
    return schedules


def under_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (one rank of its group)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def values_or_exit(results: list[dict], what: str = "") -> list:
    """The ranks' values of a ``run_ranks`` run; on a failed rank, its error and traceback
    on stderr and exit status 1."""
    bad = [r for r in results if not r["ok"]]
    if bad:
        print(f"# {what + ' ' if what else ''}failed: {bad[0]['error']}\n{bad[0].get('traceback', '')}",
              file=sys.stderr)
        sys.exit(1)
    return [r["value"] for r in results]


def values_or_errors(results: list[dict]) -> list:
    """The ranks' values of a ``run_ranks`` run, a failed rank's as ``{"rank", "error",
    "traceback"}`` in its place (the script reports the row as an error and goes on)."""
    return [r["value"] if r["ok"] else {"rank": i, "error": r["error"], "traceback": r.get("traceback", "")}
            for i, r in enumerate(results)]


def warn_oversubscribed(world: int) -> None:
    """A warning line where ``world`` spawned ranks outnumber the cores."""
    if world > (os.cpu_count() or 1):
        print(f"# WARNING: {world} ranks on {os.cpu_count()} cores: ranks time-slice (oversubscribed); step times "
              "measure that and gloo, not what one device per rank would give", flush=True)


def require_torchrun_world(script: str, world: int) -> None:
    """Exit with a one-line reason unless ``torchrun`` started ``world`` ranks."""
    if int(os.environ["WORLD_SIZE"]) != world:
        raise SystemExit(f"{script} needs {world} ranks (torchrun --nproc-per-node {world}), "
                         f"got {os.environ['WORLD_SIZE']}")


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

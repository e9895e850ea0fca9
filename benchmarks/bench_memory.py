"""Per-rank memory of a stage loaded from a sharded checkpoint on a meta model, against the whole model.

A Llama with weights that dominate the process's RSS noise: hidden 512, 8 layers,
intermediate 1376, 8 heads, vocab 32000, untied embeddings, fp32 (58.1M parameters,
222 MiB), seeded random weights written by this script with ``save_pretrained(...,
max_shard_size="64MB")`` (a transformers sharded safetensors checkpoint: index + shards
+ config.json) into a temporary directory.

For 2 and 4 ranks (local processes, gloo, file rendezvous, ``torch.set_num_threads(1)``),
each rank builds stage ``rank`` of ``fxpp.pipeline(model, ranks)`` (the cost model's
balanced split) in two ways, each in fresh processes (peak RSS is per process):

* ``fxpp``:  the model built on the meta device (``from_config`` under
  ``torch.device("meta")``), then ``pipe.build_stage(rank, "cpu", checkpoint=dir)``:
  the rank allocates and reads only its own stage's tensors.
* ``whole``: the baseline: every rank materialises the whole model
  (``AutoModelForCausalLM.from_pretrained(dir)``, then ``pipe.build_stage(rank, "cpu")``,
  then every parameter read once). transformers maps the safetensors files, so right
  after ``from_pretrained`` weights nobody has read are not resident yet: that "lazy"
  state is recorded too (``whole_lazy_*``, JSON only); a rank that trains touches at
  least its own stage's weights, and its optimizer writes them.

Per rank it reports

* ``share``: the stage's parameters / the model's parameters, and ``share_MB``, the
  bytes that share is;
* ``param_MB``: bytes of parameter storage actually allocated in the process (distinct
  non-meta storages of the model's and the stage's parameters);
* ``ru_maxrss_MB``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end. Caveat: on
  Linux a spawned process's ru_maxrss starts at its launcher's RSS (fork copies the page
  tables; exec keeps the old address space's high-water mark), so this script keeps the
  launcher small (the checkpoint is written by a child) and prints its RSS;
* ``peak_rss_MB``: the process's own peak RSS (``VmHWM`` of /proc/self/status, which
  exec resets): equal to ru_maxrss when the launcher's RSS is below it;
* ``load_peak_MB``: the peak RSS while loading (VmHWM reset through /proc/self/clear_refs
  just before) minus the RSS just before: what loading cost, transient copies included.
  Both modes build and trace the meta model before that point (the whole-model mode then
  drops it), so imported code and the tracer's own memory are outside it.
  For ``fxpp`` "loading" is ``build_stage(..., checkpoint=...)``; for ``whole`` it is
  ``from_pretrained`` + ``fxpp.pipeline`` + ``build_stage``;
* the ratios fxpp / whole, and ``fxpp_load/share``: fxpp's load peak over the stage's
  share of the weights (1.0 = no transient copies).

Each ``fxpp`` rank also checks that its stage's weights equal the checkpoint's
(``weights_max_abs_diff``, after the memory was measured).

Rows ``2x2`` (``fxpp_dp``): pp 2 x dp 2 on 4 ranks (``fxpp.pp_dp_mesh(2, 2)``): each
rank's stage is sharded with FSDP2 on the meta device, allocated, and reads only its
own rows of each tensor (``build_stage(pp_rank, "cpu", dp_mesh=mesh, checkpoint=dir)``).
``share_MB`` is then the rank's own tensors, stage share / dp, and ``fxpp_load/share``
the load peak over them (the issue's target: at most 1.3).

``--export`` (a separate mode, its own JSON): the peak memory of ``fxpp export`` against the
model's size and its largest tensor. The script writes a save of a seeded random Llama
(hidden 768, 8 layers, intermediate 2048, vocab 32000, untied, fp32: 105.8M parameters,
423 MB; the largest tensors are the embedding and the head, 98 MB each) as ``fxpp run``
with pp 2 x dp 2 (FSDP2) writes it (``fxpp.testing.saves.write_save``: per-stage, per-dp-rank
row shards), then exports it in fresh processes two ways:

* ``stream``: ``fxpp export`` (fxpp/trainer/export.py): tensor by tensor, in row chunks of
  ``save_reader.CHUNK_BYTES`` (32 MiB); ``stream-8MiB``, ``stream-128MiB`` with other chunk
  sizes (``--export-chunks-mb``): the peak follows the chunk, not the model;
* ``whole``: the export fxpp did before (``fxpp.testing.saves.whole_model_export``): every
  tensor joined in memory, loaded into the model, ``save_pretrained``.

``export_peak_MB`` is the rise of the process's peak RSS during the export (``VmHWM`` reset
just before; transformers, fxpp and the tracer imported before), ``peak/model`` and
``peak/largest`` that over the model's bytes and its largest tensor's. Afterwards a third
process checks that both exports hold the same tensors, bit for bit (``same_as_whole``).

Run:  PYTHONPATH=. python benchmarks/bench_memory.py [--ranks 2,4] [--json PATH]
      PYTHONPATH=. python benchmarks/bench_memory.py --export [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch

from _common import default_json_path, report, start

MB = 1024 * 1024
MODEL_NAME = "llama-h512-L8-v32000"


def make_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=512,
                       tie_word_embeddings=False)


def _write_checkpoint(directory: str) -> None:
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(0)
    model = LlamaForCausalLM(make_config()).float()
    model.save_pretrained(directory, max_shard_size="64MB")
    info = {"params": sum(p.numel() for p in model.parameters()),
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "shards": len([f for f in os.listdir(directory) if f.endswith(".safetensors")])}
    with open(os.path.join(directory, "bench_info.json"), "w") as f:
        json.dump(info, f)


def write_checkpoint(directory: str) -> dict:
    """The seeded model's checkpoint, written by a child process so that this one stays small.

    On Linux a child's ru_maxrss starts at its launcher's RSS (fork copies the page
    tables, exec keeps the old address space's high-water mark), so a launcher that had
    held the model would show up in every rank's ru_maxrss.
    """
    import multiprocessing as mp

    p = mp.get_context("spawn").Process(target=_write_checkpoint, args=(directory,))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"writing the checkpoint failed (exit code {p.exitcode})")
    with open(os.path.join(directory, "bench_info.json")) as f:
        return json.load(f)


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def proc_status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def allocated_param_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the distinct non-meta storages behind these modules' parameters."""
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            if p.is_meta:
                continue
            storage = p.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def rank_job(rank: int, world: int, mode: str, ckpt: str) -> dict:
    import fxpp
    from transformers import AutoModelForCausalLM

    ids = torch.zeros(2, 16, dtype=torch.long)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # Both modes first build the meta model and trace it, so that the modelling code and
    # the tracer are imported before "before": the load numbers then hold weights and
    # loading only. The whole-model mode then drops these.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(make_config())
    pipe = fxpp.pipeline(model.train(), world, example_inputs={k: v.to("meta") for k, v in example.items()})
    if mode == "whole":
        del model, pipe
    hwm_before, ru_before, rss_before = proc_status_bytes("VmHWM"), maxrss_bytes(), current_rss_bytes()
    did_reset = reset_peak_rss()
    t0 = time.perf_counter()
    if mode == "fxpp":
        stage = pipe.build_stage(rank, "cpu", checkpoint=ckpt)
    elif mode == "fxpp_dp":
        return _dp_rank_job(rank, world, ckpt, model, example, hwm_before, rss_before, did_reset, t0)
    else:
        model = AutoModelForCausalLM.from_pretrained(ckpt).train()
        pipe = fxpp.pipeline(model, world, example_inputs=example)
        stage = pipe.build_stage(rank, "cpu")
    load_s = time.perf_counter() - t0
    hwm_load = proc_status_bytes("VmHWM")
    lazy = {}
    if mode == "whole":
        # from_pretrained maps the safetensors files: untouched weights are not resident
        # yet. Record that, then materialise: read every parameter once.
        lazy = {"lazy_load_peak": (hwm_load - rss_before) if did_reset and hwm_load is not None else None,
                "lazy_rss": current_rss_bytes()}
        with torch.no_grad():
            for p in model.parameters():
                p.sum()
        hwm_load = proc_status_bytes("VmHWM")
    out = {
        "rank": rank,
        "layers": f"{pipe.layer_ranges[rank].start}-{pipe.layer_ranges[rank].stop - 1}",
        "stage_params": pipe.stage_params()[rank],
        "total_params": sum(p.numel() for p in model.parameters()),
        "param_bytes": allocated_param_bytes(model, stage.submod),
        "rss_before": rss_before,
        # the process's peak RSS since it started (VmHWM is per address space, so exec resets it)
        "peak": max(hwm_before, hwm_load) if hwm_before is not None else None,
        # the peak while loading: VmHWM reset to the current RSS just before
        "load_peak": (hwm_load - rss_before) if did_reset and hwm_load is not None else None,
        "ru_maxrss": max(ru_before, maxrss_bytes()),
        "rss_end": current_rss_bytes(),
        "load_s": load_s,
        **lazy,
    }
    if mode == "fxpp":
        from fxpp.runtime.checkpoint import load_state_dict_from

        own = dict(stage.submod.named_parameters())
        ref = load_state_dict_from(ckpt, own)
        out["weights_max_abs_diff"] = max(float((p.detach() - ref[n]).abs().max()) for n, p in own.items())
    return out


def _dp_rank_job(rank, world, ckpt, model, example, hwm_before, rss_before, did_reset, t0) -> dict:
    """pp (world / 2) x dp 2: the stage sharded with FSDP2 on meta, then only its rows read."""
    import fxpp
    from torch.distributed.tensor import DTensor

    from fxpp.runtime.checkpoint import load_state_dict_from

    del hwm_before
    pp, dp = world // 2, 2
    pipe = fxpp.pipeline(model.train(), pp, example_inputs={k: v.to("meta") for k, v in example.items()})
    mesh = fxpp.pp_dp_mesh(pp, dp)
    pp_rank = mesh.get_local_rank("pp")
    rss_before = current_rss_bytes()  # the second trace above is outside the load
    did_reset = reset_peak_rss()
    t0 = time.perf_counter()
    stage = pipe.build_stage(pp_rank, "cpu", dp_mesh=mesh, checkpoint=ckpt)
    load_s = time.perf_counter() - t0
    hwm_load = proc_status_bytes("VmHWM")
    own = {n: p for n, p in stage.submod.named_parameters()}
    local_bytes = sum(p.to_local().untyped_storage().nbytes() if isinstance(p, DTensor) else
                      p.untyped_storage().nbytes() for p in own.values())
    out = {"rank": rank, "pp_rank": pp_rank, "dp_rank": mesh.get_local_rank("dp"),
           "layers": f"{pipe.layer_ranges[pp_rank].start}-{pipe.layer_ranges[pp_rank].stop - 1}",
           "stage_params": pipe.stage_params()[pp_rank], "total_params": sum(p.numel() for p in model.parameters()),
           "local_bytes": local_bytes, "rss_before": rss_before, "load_s": load_s,
           "load_peak": (hwm_load - rss_before) if did_reset and hwm_load is not None else None}
    ref = load_state_dict_from(ckpt, own)  # after the measurement: each shard equals its rows of the checkpoint
    diff = 0.0
    for name, p in own.items():
        whole = p.full_tensor() if isinstance(p, DTensor) else p
        diff = max(diff, float((whole.detach() - ref[name]).abs().max()))
    out["weights_max_abs_diff"] = diff
    return out


def _rank_job(rank: int, world: int, workdir: str, mode: str, ckpt: str) -> dict:
    import transformers

    import fxpp  # noqa: F401 -- imports belong to the baseline RSS, not to loading

    transformers.utils.logging.disable_progress_bar()
    return rank_job(rank, world, mode, ckpt)


def spawn(world: int, mode: str, ckpt: str, timeout_s: float = 300) -> list[dict]:
    """Local gloo ranks through fxpp's own launcher; every rank measures before any exits."""
    from fxpp.trainer.launch import run_ranks

    results = run_ranks(_rank_job, world, mode, ckpt, timeout_s=timeout_s, pg_timeout_s=120, threads=1,
                        barrier_at_end=True)
    return [{"ok": True, **r["value"]} if r["ok"] else r for r in results]


EXPORT_MODEL_NAME = "llama-h768-L8-i2048-v32000"


def make_export_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=32000, max_position_embeddings=512,
                       tie_word_embeddings=False)


def _write_save(directory: str) -> None:
    from transformers import LlamaForCausalLM

    from fxpp.testing.saves import write_save

    torch.manual_seed(0)
    model = LlamaForCausalLM(make_export_config()).float()
    write_save(os.path.join(directory, "run"), model, dp=2)
    sizes = {k: v.numel() * v.element_size() for k, v in model.state_dict().items()}
    largest = max(sizes, key=sizes.get)
    info = {"params": sum(p.numel() for p in model.parameters()), "model_bytes": sum(sizes.values()),
            "largest": largest, "largest_bytes": sizes[largest]}
    with open(os.path.join(directory, "bench_info.json"), "w") as f:
        json.dump(info, f)


def _export_job(mode: str, save: str, out: str, chunk_bytes: int | None, conn) -> None:
    """One export in a fresh process: the rise of its peak RSS while exporting."""
    import transformers

    from fxpp.testing.saves import whole_model_export
    from fxpp.trainer import save_reader
    from fxpp.trainer.export import export

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    if chunk_bytes:
        save_reader.CHUNK_BYTES = chunk_bytes
    with torch.device("meta"):  # modelling code imported and run once before the measurement
        transformers.AutoModelForCausalLM.from_config(make_export_config())
    rss_before = current_rss_bytes()
    did_reset = reset_peak_rss()
    t0 = time.perf_counter()
    if mode == "stream":
        export(save, out)
    else:
        whole_model_export(save, out)
    seconds = time.perf_counter() - t0
    hwm = proc_status_bytes("VmHWM")
    conn.send({"export_peak": hwm - rss_before if did_reset and hwm is not None else None, "peak_rss": hwm,
               "rss_before": rss_before, "seconds": seconds, "chunk_bytes": save_reader.CHUNK_BYTES})


def _same_exports(a: str, b: str, conn) -> None:
    """Whether two export folders hold the same keys and tensors (one tensor at a time)."""
    from safetensors import safe_open

    def keys(folder):
        out = {}
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(folder, name), "pt") as f:
                    out.update(dict.fromkeys(f.keys(), os.path.join(folder, name)))
        return out

    ka, kb = keys(a), keys(b)
    same = ka.keys() == kb.keys()
    for key in sorted(ka) if same else []:
        with safe_open(ka[key], "pt") as f, safe_open(kb[key], "pt") as g:
            x, y = f.get_tensor(key), g.get_tensor(key)
            same = same and x.dtype == y.dtype and torch.equal(x, y)
    conn.send(same)


def _in_child(target, *args):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=target, args=(*args, child))
    p.start()
    child.close()
    value = parent.recv()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"{target.__name__} failed (exit code {p.exitcode})")
    return value


def export_main(json_path: str, chunks_mb: list[int]) -> None:
    env = start(threads=1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fxpp_bench_export_") as work:
        import multiprocessing as mp

        p = mp.get_context("spawn").Process(target=_write_save, args=(work,))
        p.start()
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"writing the save failed (exit code {p.exitcode})")
        with open(os.path.join(work, "bench_info.json")) as f:
            info = json.load(f)
        print(f"# {EXPORT_MODEL_NAME}: {info['params']:,} parameters, {info['model_bytes'] / MB:.1f} MB fp32; largest "
              f"tensor {info['largest']} {info['largest_bytes'] / MB:.1f} MB; a save of pp 2 x dp 2 row shards",
              flush=True)
        results, same = {}, {}
        for mode, chunk in [("stream", None), *((f"stream-{c}MiB", c * MB) for c in chunks_mb), ("whole", None)]:
            results[mode] = _in_child(_export_job, mode.split("-")[0], os.path.join(work, "run"),
                                      os.path.join(work, mode), chunk)
            print(f"# {mode}: {results[mode]['seconds']:.1f}s", flush=True)
        for mode in results:
            same[mode] = _in_child(_same_exports, os.path.join(work, mode), os.path.join(work, "whole"))
    for mode, r in results.items():
        rows.append({"model": EXPORT_MODEL_NAME, "export": mode, "model_MB": info["model_bytes"] / MB,
                     "largest_tensor_MB": info["largest_bytes"] / MB,
                     "chunk_MB": r["chunk_bytes"] / MB if mode.startswith("stream") else None,
                     "export_peak_MB": r["export_peak"] / MB, "peak/model": r["export_peak"] / info["model_bytes"],
                     "peak/largest": r["export_peak"] / info["largest_bytes"],
                     "peak/whole": r["export_peak"] / results["whole"]["export_peak"],
                     "peak_rss_MB": r["peak_rss"] / MB, "rss_before_MB": r["rss_before"] / MB,
                     "seconds": r["seconds"], "same_as_whole": same[mode]})
    report(rows, ["model", "export", "model_MB", "largest_tensor_MB", "chunk_MB", "export_peak_MB", "peak/model",
                  "peak/largest", "peak/whole", "peak_rss_MB", "seconds", "same_as_whole"], env, json_path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/bench_memory.json "
                    "(bench_memory_export.json with --export)")
    ap.add_argument("--no-dp", dest="dp", action="store_false",
                    help="skip pp 2 x dp 2 (4 ranks; FSDP2 shards of each stage, each reading only its rows)")
    ap.add_argument("--export", action="store_true",
                    help="measure fxpp export's peak memory against the whole-model export instead")
    ap.add_argument("--export-chunks-mb", default="8,128",
                    help="with --export: also stream with these chunk sizes (MiB), besides fxpp's own")
    args = ap.parse_args()
    if args.export:
        export_main(args.json or default_json_path("bench_memory_export"),
                    [int(c) for c in args.export_chunks_mb.split(",") if c])
        return
    args.json = args.json or default_json_path("bench_memory")
    env = start(threads=1, threads_per_process=1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fxpp_bench_ckpt_") as ckpt:
        info = write_checkpoint(ckpt)
        print(f"# {MODEL_NAME}: {info['params']:,} parameters, {info['param_bytes'] / MB:.1f} MB fp32, "
              f"checkpoint of {info['shards']} safetensors shards; launcher RSS {current_rss_bytes() / MB:.0f} MB "
              f"(a floor of every rank's ru_maxrss)", flush=True)
        for world in [int(r) for r in args.ranks.split(",") if r]:
            results = {}
            for mode in ("fxpp", "whole"):
                t0 = time.perf_counter()
                results[mode] = spawn(world, mode, ckpt)
                print(f"# {world} ranks, {mode}: {time.perf_counter() - t0:.0f}s", flush=True)
            for rank in range(world):
                f, w = results["fxpp"][rank], results["whole"][rank]
                row = {"ranks": world, "rank": rank}
                errors = [f"{m}: {r['error']}" for m, r in (("fxpp", f), ("whole", w)) if not r["ok"]]
                for m, r in (("fxpp", f), ("whole", w)):
                    if not r["ok"] and r.get("traceback"):
                        print(f"# {world} ranks, rank {rank}, {m}:\n{r['traceback']}", file=sys.stderr)
                if errors:
                    rows.append({**row, "error": "; ".join(errors)})
                    continue
                share = f["stage_params"] / f["total_params"]
                share_b = share * info["param_bytes"]
                row.update({
                    "layers": f["layers"],
                    "share": share,
                    "share_MB": share_b / MB,
                    "fxpp_param_MB": f["param_bytes"] / MB,
                    "whole_param_MB": w["param_bytes"] / MB,
                    "param_fxpp/whole": f["param_bytes"] / w["param_bytes"],
                    "fxpp_peak_rss_MB": f["peak"] / MB,
                    "whole_peak_rss_MB": w["peak"] / MB,
                    "peak_fxpp/whole": f["peak"] / w["peak"],
                    "fxpp_ru_maxrss_MB": f["ru_maxrss"] / MB,
                    "whole_ru_maxrss_MB": w["ru_maxrss"] / MB,
                    "fxpp_load_peak_MB": f["load_peak"] / MB,
                    "whole_load_peak_MB": w["load_peak"] / MB,
                    "load_fxpp/whole": f["load_peak"] / w["load_peak"],
                    "fxpp_load/share": f["load_peak"] / share_b,
                    "fxpp_rss_before_MB": f["rss_before"] / MB,
                    "whole_rss_before_MB": w["rss_before"] / MB,
                    "fxpp_rss_end_MB": f["rss_end"] / MB,
                    "whole_rss_end_MB": w["rss_end"] / MB,
                    "whole_lazy_load_peak_MB": w["lazy_load_peak"] / MB,
                    "whole_lazy_rss_MB": w["lazy_rss"] / MB,
                    "fxpp_load_s": f["load_s"],
                    "whole_load_s": w["load_s"],
                    "weights_max_abs_diff": f["weights_max_abs_diff"],
                })
                rows.append(row)
        if args.dp:
            t0 = time.perf_counter()
            results = spawn(4, "fxpp_dp", ckpt)
            print(f"# pp 2 x dp 2, fxpp_dp: {time.perf_counter() - t0:.0f}s", flush=True)
            for r in results:
                if not r["ok"]:
                    rows.append({"ranks": "2x2", "rank": "?", "error": r["error"]})
                    continue
                own = r["stage_params"] / r["total_params"] * info["param_bytes"] / 2
                rows.append({"ranks": "2x2", "rank": r["rank"], "layers": r["layers"],
                             "share": r["stage_params"] / r["total_params"] / 2, "share_MB": own / MB,
                             "fxpp_param_MB": r["local_bytes"] / MB, "fxpp_load_peak_MB": r["load_peak"] / MB,
                             "fxpp_load/share": r["load_peak"] / own, "fxpp_load_s": r["load_s"],
                             "weights_max_abs_diff": r["weights_max_abs_diff"]})
    report(rows, ["ranks", "rank", "layers", "share", "share_MB", "fxpp_param_MB", "whole_param_MB",
                  "param_fxpp/whole", "fxpp_ru_maxrss_MB", "whole_ru_maxrss_MB", "fxpp_peak_rss_MB",
                  "whole_peak_rss_MB", "peak_fxpp/whole", "fxpp_load_peak_MB", "whole_load_peak_MB", "load_fxpp/whole",
                  "fxpp_load/share", "error"], env, args.json)


if __name__ == "__main__":
    main()

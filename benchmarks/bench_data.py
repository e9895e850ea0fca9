"""Data at scale: ``--data`` tokenized once into the memory-mapped cache, against every rank tokenizing into lists.

Synthetic corpora of --docs documents (default 10,000 and 100,000), one a line, each 20-200
words drawn (Zipf-like) from 5,000 made-up words, and a BPE tokenizer (vocabulary 4,000)
trained offline on the first corpus with the ``tokenizers`` library, saved as transformers
files. For each corpus, in fresh processes (gloo, file rendezvous, one thread each):

* ``cache`` (``fxpp run --data`` now): one process builds the cache
  (``fxpp.trainer.corpus.build``: ``Dataset.from_generator`` + ``Dataset.map(batched=True)``
  + ``save_to_disk``): ``tokenize_s`` and the builder's memory rise ``build_rise_MiB``
  (VmHWM minus the RSS before: imported code and mapped Arrow pages included) and the
  peak rise of its private part, ``build_anon_rise_MiB`` (RssAnon sampled every 20 ms); then 2 ranks each open it (``open_documents``:
  ``load_from_disk``, memory-mapped) and read --batches batches of --batch x --seq-len
  with ``--shuffle-seed 0`` (``PackedBatches``).
* ``lists`` (before this change): each of 2 ranks reads the whole file, tokenizes every
  document with its own tokenizer call into lists of ints (``tokenize_s`` is a rank's),
  then reads the same batches from the lists.

Per rank (the larger of the 2): resident memory from /proc/self/status after imports
(``start``; in ``cache`` mode after importing ``datasets`` and ``pyarrow``, whose code
costs ``import_MiB`` once, whatever the corpus), after the data is ready (``ready``)
and after reading the batches (``read``):
``VmRSS``, and its private part ``RssAnon`` (what the Python lists are) apart from the
file-backed ``RssFile`` (mapped cache pages: shared by the ranks of a node, the page
cache's, which the kernel can drop). ``rise_MiB`` = VmRSS read - start. Every rank
checksums its batches: both modes and both ranks must agree (``same batches``).

Run:  PYTHONPATH=. python benchmarks/bench_data.py [--docs 10000,100000] [--batches 500] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import tempfile
import time

from _common import default_json_path, report, start, values_or_exit

from fxpp.trainer.launch import run_ranks

RANKS = 2


def status() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process, in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def write_corpus(path: str, docs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(random.Random(i).choice(letters) for _ in range(2 + i % 7)) for i in range(5000)]
    weights = [1 / (i + 1) for i in range(len(words))]
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(" ".join(rng.choices(words, weights, k=rng.randint(20, 200))) + "\n")


def write_tokenizer(directory: str, corpus: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([corpus], trainers.BpeTrainer(vocab_size=4000, special_tokens=["[UNK]"], show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)


def _build(rank, world, workdir, paths, tokenizer_dir):
    import threading

    from fxpp.trainer import corpus

    before = status()
    peaks = {"RssAnon": 0.0, "RssFile": 0.0}
    done = threading.Event()

    def sample():  # the peaks of the private and the file-backed parts (VmHWM has their sum only)
        while not done.wait(0.02):
            now = status()
            for k in peaks:
                peaks[k] = max(peaks[k], now[k])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    corpus.build(paths, tokenizer_dir)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {"tokenize_s": seconds, "build_rise_MiB": status()["VmHWM"] - before["VmRSS"],
            "build_anon_rise_MiB": peaks["RssAnon"] - before["RssAnon"],
            "build_file_rise_MiB": peaks["RssFile"] - before["RssFile"]}


def _read(rank, world, workdir, mode, paths, tokenizer_dir, batches, batch, seq_len):
    from fxpp.trainer import corpus
    from fxpp.trainer.data import PackedBatches, load_tokenizer

    before_import = status()
    if mode == "cache":  # a fixed cost (code), measured apart from the data's
        import datasets  # noqa: F401
        import pyarrow  # noqa: F401
    at_start = status()
    t0 = time.perf_counter()
    if mode == "cache":
        docs = corpus.open_documents(paths, tokenizer_dir)
        tokenize_s = None
    else:  # the code before this change: the whole file read, one tokenizer call a document, lists of ints
        tokenizer = load_tokenizer(tokenizer_dir)
        texts = [line for p in paths for line in open(p, encoding="utf-8").read().split("\n") if line.strip()]
        docs = [ids for ids in (list(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in texts) if ids]
        del texts
        tokenize_s = time.perf_counter() - t0
    ready = status()
    packed = PackedBatches(docs, batch, seq_len, shuffle_seed=0)
    digest = hashlib.sha256()
    t1 = time.perf_counter()
    for _ in range(batches):
        digest.update(packed.next()["input_ids"].numpy().tobytes())
    read_s = time.perf_counter() - t1
    read = status()
    return {"tokenize_s": tokenize_s, "import_MiB": at_start["VmRSS"] - before_import["VmRSS"], "start": at_start, "ready": ready, "read": read, "read_s": read_s,
            "tokens": int(docs.num_tokens if mode == "cache" else sum(len(d) for d in docs)),
            "documents": len(docs), "digest": digest.hexdigest()[:16]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", default="10000,100000")
    ap.add_argument("--batches", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--json", default=default_json_path("bench_data"))
    args = ap.parse_args()
    env = start("cpu", threads=1, spawned=True, ranks=RANKS, batches=args.batches, batch=args.batch,
                seq_len=args.seq_len)
    import datasets
    import tokenizers

    env.update(datasets=datasets.__version__, tokenizers=tokenizers.__version__)
    print(f"# datasets={datasets.__version__} tokenizers={tokenizers.__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fxpp_bench_data_") as tmp:
        os.environ["FXPP_DATA_CACHE"] = os.path.join(tmp, "cache")  # the children inherit it
        tokenizer_dir = os.path.join(tmp, "tok")
        for i, n in enumerate(int(d) for d in args.docs.split(",")):
            path = os.path.join(tmp, f"docs{n}.txt")
            write_corpus(path, n)
            if i == 0:
                write_tokenizer(tokenizer_dir, path)
            built = values_or_exit(run_ranks(_build, 1, [path], tokenizer_dir, threads=1, timeout_s=None), "build")[0]
            digests = set()
            for mode in ("cache", "lists"):
                ranks = values_or_exit(run_ranks(_read, RANKS, mode, [path], tokenizer_dir, args.batches, args.batch,
                                                 args.seq_len, threads=1, timeout_s=None), mode)
                digests |= {r["digest"] for r in ranks}
                worst = max(ranks, key=lambda r: r["read"]["VmRSS"])
                rows.append({
                    "mode": mode, "docs": n, "tokens": worst["tokens"], "file_MiB": os.path.getsize(path) / 2**20,
                    "tokenize_s": built["tokenize_s"] if mode == "cache" else max(r["tokenize_s"] for r in ranks),
                    "build_rise_MiB": built["build_rise_MiB"] if mode == "cache" else None,
                    "build_anon_rise_MiB": built["build_anon_rise_MiB"] if mode == "cache" else None,
                    "import_MiB": worst["import_MiB"] if mode == "cache" else None,
                    "rss_start_MiB": worst["start"]["VmRSS"], "rss_ready_MiB": worst["ready"]["VmRSS"],
                    "rss_read_MiB": worst["read"]["VmRSS"], "rise_MiB": worst["read"]["VmRSS"] - worst["start"]["VmRSS"],
                    "anon_rise_MiB": worst["read"]["RssAnon"] - worst["start"]["RssAnon"],
                    "file_read_MiB": worst["read"]["RssFile"] - worst["start"]["RssFile"],
                    "batch_ms": 1e3 * max(r["read_s"] for r in ranks) / args.batches,
                })
            print(f"# {n} documents: same batches in both modes and on every rank: "
                  f"{'yes' if len(digests) == 1 else 'NO'}", flush=True)
            if len(digests) != 1:
                return 1
    by = {(r["mode"], r["docs"]): r for r in rows}
    sizes = sorted({r["docs"] for r in rows})
    for n in sizes:
        c, lst = by[("cache", n)], by[("lists", n)]
        print(f"# {n} documents: a rank's private memory rise lists / cache = "
              f"{lst['anon_rise_MiB'] / max(c['anon_rise_MiB'], 1e-9):.1f}x; "
              f"tokenize lists (every rank) / cache (once) = {lst['tokenize_s'] / c['tokenize_s']:.2f}x")
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        for mode in ("cache", "lists"):
            a, b = by[(mode, small)]["anon_rise_MiB"], by[(mode, large)]["anon_rise_MiB"]
            print(f"# {mode}: {large // small}x the documents, a rank's private memory rise {a:.1f} -> {b:.1f} MiB "
                  f"({b / max(a, 1e-9):.2f}x)")
    report(rows, ["mode", "docs", "tokens", "file_MiB", "tokenize_s", "build_rise_MiB", "build_anon_rise_MiB", "import_MiB", "rss_start_MiB",
                  "rss_ready_MiB", "rss_read_MiB", "rise_MiB", "anon_rise_MiB", "file_read_MiB", "batch_ms"],
           env, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""fxpp.trainer.data: packing with restarting positions, labels, resume position, tokenizer errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fxpp.errors import DataError, FxppError
from fxpp.trainer.data import DataPosition, PackedBatches, load_tokenizer, pass_order, read_documents, tokenize


def _tokenizer_dir(tmp_path, words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(set(words)))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), unk_token="[UNK]").save_pretrained(tmp_path)
    return vocab


def test_packing_restarts_positions_and_masks_first_tokens():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    data = PackedBatches(docs, batch=2, seq_len=4)
    b = data.next()
    assert b["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0], [0, 0, 1, 2]]
    assert b["labels"].tolist() == [[-100, 2, 3, -100], [-100, -100, 7, 8]]
    assert data.position == DataPosition(2, 3)
    again = PackedBatches(docs, batch=2, seq_len=4, position=DataPosition(2, 3)).next()
    assert torch.equal(again["input_ids"], data.next()["input_ids"])


def test_text_and_jsonl_with_the_directory_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("the cat sat\n\nthe dog ran far\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "a cat ran"}) + "\n")
    docs = read_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    assert docs == ["the cat sat", "the dog ran far", "a cat ran"]
    vocab = _tokenizer_dir(tmp_path, " ".join(docs).split())
    ids = tokenize(docs, load_tokenizer(str(tmp_path)))
    assert ids[0] == [vocab["the"], vocab["cat"], vocab["sat"]]


def test_no_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FxppError, match="--data needs a tokenizer"):
        load_tokenizer(str(tmp_path))


def test_packed_documents_do_not_attend_to_each_other():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    docs = [[1, 2, 3], [4, 5, 6, 7, 8]]
    b = PackedBatches(docs, batch=1, seq_len=8).next()
    packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
    alone = torch.cat([model(input_ids=torch.tensor([d]), use_cache=False).logits for d in docs], dim=1)
    torch.testing.assert_close(packed, alone)


# --- formats, the tokenized cache, shuffling, resuming (fxpp.trainer.corpus) ---------------------------

DOCS = ["the cat sat on a mat", "dog ran far away", "birds sang in tall green trees", "a cat",
        "old stone walls by quiet rivers under grey skies", "the dog sat near the cat and ran",
        "green trees", "far away while birds sang"]


def _write(path, docs, text_field="text"):
    """``docs`` as a text, JSON-lines or parquet file, by ``path``'s extension."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(docs))), text_field: docs}), str(path), row_group_size=3)
    elif path.suffix in (".jsonl", ".json"):
        path.write_text("".join(json.dumps({"id": i, text_field: d}) + "\n" for i, d in enumerate(docs)))
    else:
        path.write_text("".join(d + "\n" for d in docs))
    return str(path)


@pytest.fixture
def words_dir(tmp_path, monkeypatch):
    """A directory with a word-level tokenizer of fxpp.testing.checkpoint_dir.WORDS, and an empty data cache."""
    pytest.importorskip("datasets")
    from fxpp.testing.checkpoint_dir import write_tokenizer

    monkeypatch.setenv("FXPP_DATA_CACHE", str(tmp_path / "cache"))
    write_tokenizer(str(tmp_path / "tok"))
    return tmp_path


def _batches(docs, n=5, **kw):
    packed = PackedBatches(docs, batch=2, seq_len=8, **kw)
    return [packed.next() for _ in range(n)]


def _equal(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_text_jsonl_and_parquet_give_the_same_batches_as_token_lists(words_dir):
    from fxpp.trainer import corpus

    tok = str(words_dir / "tok")
    reference = _batches(tokenize(DOCS, load_tokenizer(tok)))  # lists of ids: today's packing, 5 batches wrap once
    for name in ("d.txt", "d.jsonl", "d.json", "d.parquet"):
        path = _write(words_dir / name, DOCS)
        corpus.build([path], tok)
        docs = corpus.open_documents([path], tok)
        assert isinstance(docs[0], np.ndarray) and not docs[0].flags.writeable  # a view of the mapped file
        assert len(docs) == len(DOCS) and docs.num_tokens == sum(len(d.split()) for d in DOCS)
        assert _equal(_batches(docs), reference), name
    # several files: their documents one after another, in the order given
    two = [_write(words_dir / "a.parquet", DOCS[:3]), _write(words_dir / "b.txt", DOCS[3:])]
    corpus.build(two, tok)
    assert _equal(_batches(corpus.open_documents(two, tok)), reference)


def test_text_lines_keep_todays_rule(tmp_path):
    """One document a non-empty line; \\r\\n and a lone \\r end lines; JSON null is no document."""
    (tmp_path / "a.txt").write_bytes(b"one two\r\n\r\n  \nthree\rfour \xc3\xa9\nlast")
    assert read_documents([str(tmp_path / "a.txt")]) == ["one two", "three", "four \u00e9", "last"]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"text": null}\n{"text": 3}\n')
    assert read_documents([str(tmp_path / "b.jsonl")]) == ["x", "3"]
    (tmp_path / "c.txt").write_bytes(b"ok\r\nstill ok\r\nbad \xe9 byte\n")
    with pytest.raises(DataError, match=r"--data .*c.txt: not UTF-8 text \(byte 18"):
        read_documents([str(tmp_path / "c.txt")])


def test_a_missing_text_field_is_refused_naming_file_and_field(words_dir, capsys):
    from fxpp.trainer import corpus
    from fxpp.trainer.cli import main

    jsonl = _write(words_dir / "d.jsonl", DOCS, text_field="body")
    parquet = _write(words_dir / "d.parquet", DOCS, text_field="body")
    with pytest.raises(DataError, match=r"--data .*d.jsonl:1: no field 'text' \(--text-field text; the record has: "
                                        r"id, body\)"):
        corpus.build([jsonl], str(words_dir / "tok"))
    with pytest.raises(DataError, match=r"--data .*d.parquet: no column 'content' \(--text-field content; the "
                                        r"columns: id, body\)"):
        corpus.build([parquet], str(words_dir / "tok"), text_field="content")
    corpus.build([parquet], str(words_dir / "tok"), text_field="body")
    assert len(corpus.open_documents([parquet], str(words_dir / "tok"), text_field="body")) == len(DOCS)
    # fxpp run: one line, before any rank starts
    from fxpp.testing.checkpoint_dir import write_checkpoint

    write_checkpoint(str(words_dir / "ckpt"))
    assert main(["run", str(words_dir / "ckpt"), "--data", jsonl, "--text-field", "title", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "d.jsonl:1: no field 'title' (--text-field title" in err and "rank" not in err, err


def test_the_cache_is_built_once(words_dir):
    from fxpp.trainer import corpus

    tok, path = str(words_dir / "tok"), _write(words_dir / "d.jsonl", DOCS)
    directory = corpus.build([path], tok)
    arrow = [f for f in os.listdir(directory) if f.endswith(".arrow")]
    stamps = {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in arrow}
    assert corpus.build([path], tok) == directory  # found, not written again
    assert {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in arrow} == stamps
    assert os.listdir(words_dir / "cache") == [os.path.basename(directory)]  # no staging left behind
    # another text field (a new key) or a changed file is tokenized anew
    _write(words_dir / "d.jsonl", DOCS + ["a cat sat"])
    assert corpus.build([path], tok) != directory
    with pytest.raises(DataError, match="no tokenized cache"):
        corpus.open_documents([path], tok, text_field="body")


def test_shuffle_is_deterministic_per_pass_and_not_file_order():
    docs = [[i] * (i + 1) for i in range(1, 9)]  # document i: i+1 copies of i (one pass: 44 tokens)
    plain, a, b, other = (_batches(docs, n=6, shuffle_seed=s) for s in (None, 1, 1, 2))
    assert _equal(a, b) and not _equal(a, plain) and not _equal(a, other)

    # the stream is pass 0's permutation of the documents, then pass 1's, ...: packed as if written in that order
    n = len(docs)
    orders = [pass_order(n, 1, p) for p in range(3)]
    assert all(sorted(o.tolist()) == list(range(n)) for o in orders) and orders[0].tolist() != orders[1].tolist()
    assert _equal(a, _batches([docs[j] for o in orders for j in o], n=6))  # 6 x 16 tokens: into the third pass
    # resuming from a position inside the second pass gives the same batches
    packed = PackedBatches(docs, batch=2, seq_len=8, shuffle_seed=1)
    for _ in range(4):
        packed.next()
    assert packed.position.document >= len(docs)
    resumed = PackedBatches(docs, batch=2, seq_len=8, position=packed.position, shuffle_seed=1)
    assert _equal([resumed.next(), resumed.next()], a[4:6])


def _rank_prepares(rank, world, workdir, cfg_dict, bad):
    from fxpp.trainer import corpus
    from fxpp.trainer.train import RunConfig, data_ready

    try:
        data_ready(RunConfig(**{**cfg_dict, "data": [bad]}))
        refused = None
    except DataError as e:
        refused = str(e)
    cfg = RunConfig(**cfg_dict)
    data_ready(cfg)  # rank 0 builds, rank 1 waits
    return refused, len(corpus.open_documents(cfg.data, cfg.model))


@pytest.mark.heavy  # a torchrun launch of 2 processes: the README's second test command
@pytest.mark.timeout(120)
def test_under_torchrun_rank_0_tokenizes_and_the_others_wait(words_dir):
    """No launcher (torchrun): data_ready builds on rank 0 only; its refusal stops every rank."""
    from tests.dist import run_distributed

    good = _write(words_dir / "d.txt", DOCS)
    bad = words_dir / "bad.txt"
    bad.write_bytes(b"the cat\n\xff\n")
    cfg = {"model": str(words_dir / "tok"), "data": [good]}
    (refused0, n0), (refused1, n1) = run_distributed(_rank_prepares, 2, words_dir, cfg, str(bad))
    assert n0 == n1 == len(DOCS)
    assert "bad.txt: not UTF-8 text (byte 8" in refused0, refused0
    assert refused1.startswith("rank 0 could not prepare the data: --data ") and "(byte 8" in refused1, refused1
    assert len(os.listdir(words_dir / "cache")) == 1  # one cache, built once, no staging left


def test_no_datasets_is_one_line_naming_the_extra(words_dir, monkeypatch):
    from fxpp.trainer.train import RunConfig

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    path = _write(words_dir / "d.txt", DOCS)
    with pytest.raises(DataError, match=r"--data needs Hugging Face datasets .*pip install 'fxpp\[data\]'"):
        RunConfig(model=str(words_dir / "tok"), data=[path])._validate_data()


@pytest.mark.heavy  # a full fxpp run in a subprocess: the README's second test command
def test_a_plain_run_does_not_import_datasets():
    code = ("import sys\nfrom fxpp.trainer.cli import main\n"
            "assert main(['run', 'tiny-llama', '--stages', '2', '--steps', '1', '--batch', '2', '--microbatches', '2',"
            " '--seq-len', '8', '--no-check']) == 0\n"
            "bad = sorted(m for m in ('datasets', 'pyarrow') if m in sys.modules)\n"
            "assert not bad, bad\n")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.heavy  # three full fxpp runs: the README's second test command
@pytest.mark.timeout(300)
def test_resume_with_shuffle_is_bit_for_bit(tmp_path, monkeypatch, capsys):
    """2 steps, resumed to 4 == 4 steps straight: the same losses and tensors (2 gloo ranks, shuffled documents).

    The 2-step run is the straight run's save at step 2 (``--save-every 2``: the save a 2-step
    run writes, settings and all), copied alone into a new directory: one launch fewer.
    """
    pytest.importorskip("datasets")
    import shutil

    from fxpp.testing.checkpoint_dir import write_checkpoint, write_documents
    from fxpp.trainer.save_reader import whole_tensors
    from fxpp.trainer.step_files import step_dir
    from fxpp.trainer.train import RunConfig, launch

    monkeypatch.setenv("FXPP_DATA_CACHE", str(tmp_path / "cache"))
    write_checkpoint(str(tmp_path / "ckpt"))
    write_documents(str(tmp_path / "d.txt"), 12, seed=3)  # ~90 tokens: 4 steps of 2 x 16 wrap into a second pass
    base = dict(model=str(tmp_path / "ckpt"), data=[str(tmp_path / "d.txt")], shuffle_seed=7, ranks=2, batch=2,
                microbatches=2, seq_len=16, steps=4, progress=False, check=False)
    straight = launch(RunConfig(**base, save_dir=str(tmp_path / "a"), save_every=2))
    [cache] = os.listdir(tmp_path / "cache")
    arrow = next((tmp_path / "cache" / cache).glob("*.arrow"))
    stamp = arrow.stat().st_mtime_ns
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=lambda d, names: [n for n in names if n == "step-000004"])
    resumed = launch(RunConfig(**base, save_dir=str(tmp_path / "b"), resume=True))
    straight, resumed = (next(r for r in rs if "losses" in r) for rs in (straight, resumed))
    assert resumed["first_step"] == 2 and resumed["losses"] == straight["losses"][2:], (straight, resumed)
    a, b = (whole_tensors(step_dir(str(tmp_path / d), 4)) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "b" / "step-000004" / "state.json").read_text())
    assert state["settings"]["shuffle_seed"] == 7 and state["data_position"][0] >= 12  # in the second pass
    assert os.listdir(tmp_path / "cache") == [cache] and arrow.stat().st_mtime_ns == stamp  # tokenized once


def test_shuffle_seed_needs_data_and_reaches_the_run(capsys):
    from fxpp.trainer.cli import main

    assert main(["run", "tiny-llama", "--shuffle-seed", "3", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--shuffle-seed 3 needs --data" in err and "rank" not in err, err

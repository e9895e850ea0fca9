"""``fxpp export`` streams (fxpp/trainer/export.py): the same checkpoint as the whole-model path it
replaced, tensor by tensor, and every file of the model folder copied by one rule.

The reference is the export as it was (``fxpp.testing.saves.whole_model_export``: every tensor
joined in memory, loaded into the model, ``save_pretrained``). Saves are written in the format
of ``fxpp.runtime.checkpoint.save_stage`` (FSDP2 row shards with their metadata, or whole
replicas) from a tiny model (``fxpp.testing.saves.write_save``), so each case takes about a
second; one real ``fxpp run`` with pp 2 x dp 2 (FSDP2) checks the format of an actual save
(heavy: four ranks, about a minute).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fxpp.errors import CheckpointError
from fxpp.runtime.checkpoint import SHARDS_KEY
from fxpp.testing.saves import list_files, whole_model_export, write_save
from fxpp.trainer import save_reader, step_files
from fxpp.trainer.export import export
from fxpp.trainer.step_files import MODEL_FILES, model_folder_files, step_dir


def _weights(out_dir: str) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(os.path.join(out_dir, name)) for name in sorted(os.listdir(out_dir))
            if name.endswith(".safetensors")}


def assert_same_export(ours: str, ref: str) -> None:
    """The same files, keys, dtypes and bits, the same index and config; from_pretrained agrees."""
    from transformers import AutoModelForCausalLM

    a, b = _weights(ours), _weights(ref)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert a[name][key].dtype == b[name][key].dtype and torch.equal(a[name][key], b[name][key]), key
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        assert os.path.exists(os.path.join(ours, name)) == os.path.exists(os.path.join(ref, name)), name
        if os.path.exists(os.path.join(ref, name)):
            with open(os.path.join(ours, name)) as f, open(os.path.join(ref, name)) as g:
                assert json.load(f) == json.load(g), name
    loaded = AutoModelForCausalLM.from_pretrained(ours).state_dict()
    expected = AutoModelForCausalLM.from_pretrained(ref).state_dict()
    assert loaded.keys() == expected.keys()
    for key in expected:
        assert loaded[key].dtype == expected[key].dtype and torch.equal(loaded[key], expected[key]), key


CASES = {  # family, tied, dp, FSDP2 row shards (else replicas), checkpoint dtype, output shard size
    "llama-tied-dp2-fsdp": ("llama", True, 2, True, None, "5GB"),
    "llama-untied-dp3-fsdp-bf16-sharded": ("llama", False, 3, True, "bfloat16", "20KB"),
    "qwen3_moe-dp2-replicas-sharded": ("qwen3_moe", False, 2, False, None, "30KB"),
    "mixtral-tied-dp2-fsdp-bf16": ("mixtral", True, 2, True, "bfloat16", "5GB"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_writes_what_the_whole_model_path_wrote(tmp_path, monkeypatch, case):
    from fxpp.testing.zoo import tiny_model

    family, tie, dp, sharded, dtype, shard_size = CASES[case]
    model = tiny_model(family, 4, tie_word_embeddings=tie)
    save = write_save(tmp_path / "run", model, dp=dp, sharded=sharded, config_dtype=dtype)
    whole_model_export(save, str(tmp_path / "ref"), shard_size)
    # Chunks of 1 KiB (4 rows of a hidden-64 fp32 matrix): reads cross every dp piece's edges.
    monkeypatch.setattr(save_reader, "CHUNK_BYTES", 1024)
    largest = []
    real = save_reader.read_rows
    monkeypatch.setattr(save_reader, "read_rows", lambda f, e, d, rows, out: largest.append(out.nbytes) or real(
        f, e, d, rows, out))
    assert export(save, str(tmp_path / "out"), max_shard_size=shard_size) == 1
    assert_same_export(str(tmp_path / "out"), str(tmp_path / "ref"))
    if family == "llama":  # no tensor in another layout: never more than a chunk (or one row) read at once
        assert max(largest) <= 1024, max(largest)
    assert len(_weights(str(tmp_path / "out"))) == len(_weights(str(tmp_path / "ref"))) > (shard_size != "5GB")


def test_a_second_export_into_the_same_folder_leaves_no_stale_weight_file(tmp_path):
    from transformers import AutoModelForCausalLM

    from fxpp.testing.zoo import tiny_model

    model = tiny_model("llama", 4, tie_word_embeddings=False)
    save = write_save(tmp_path / "run", model, dp=1)
    out = str(tmp_path / "out")
    for size, files in (("20KB", None), ("5GB", ["model.safetensors"]), ("20KB", None)):
        export(save, out, max_shard_size=size)
        names = sorted(n for n in os.listdir(out) if n.startswith("model"))
        if files is None:
            index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
            assert names == sorted({*index["weight_map"].values(), "model.safetensors.index.json"}), names
        else:
            assert names == files
        loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_copies_that_differ_are_refused_before_anything_is_written(tmp_path):
    from fxpp.testing.zoo import tiny_model

    save = write_save(tmp_path / "run", tiny_model("llama", 4, tie_word_embeddings=True), dp=2)
    last = step_files.stage_file(step_dir(save, 1), 1, 1)
    tensors = load_file(last)
    with safe_open(last, "pt") as f:
        metadata = f.metadata()
    tensors["lm_head.weight"][0, 0] += 1  # the last stage's copy of the tied embedding diverged
    save_file(tensors, last, metadata=metadata)
    list_files(save)  # as if saved so: the checksums are not what this test is about
    with pytest.raises(CheckpointError, match=r"lm_head.weight differs from model.embed_tokens.weight, to which the "
                                              r"config ties it"):
        export(save, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")
    replicas = write_save(tmp_path / "replicas", tiny_model("llama", 4), dp=2, sharded=False)
    first = step_files.stage_file(step_dir(replicas, 1), 0, 1)
    tensors = load_file(first)
    tensors["model.layers.1.mlp.up_proj.weight"][-1, -1] += 1
    save_file(tensors, first, metadata={"format": "pt"})
    list_files(replicas)
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight differs between .*stage-0.dp-0"
                                              r".safetensors and .*stage-0.dp-1.safetensors: copies of one tensor"):
        export(replicas, str(tmp_path / "out2"))


def test_the_model_folder_files_rule(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    keep = ["README.md", "added_tokens.json", "chat_template.jinja", "generation_config.json", "merges.txt",
            "preprocessor_config.json", "processor_config.json", "special_tokens_map.json", "tokenizer.json",
            "tokenizer.model", "tokenizer_config.json", "vocab.json"]
    drop = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
            "pytorch_model.bin", "pytorch_model.bin.index.json", "consolidated.pth", ".gitattributes",
            "metrics.jsonl", MODEL_FILES]
    for name in keep + drop:
        (folder / name).write_text(name)
    (folder / "original").mkdir()  # a subfolder
    os.mkfifo(folder / "fifo.json")
    (tmp_path / "secret.txt").write_text("not the model's")
    os.symlink(tmp_path / "secret.txt", folder / "linked.txt")  # a link out of the folder
    os.symlink("tokenizer.json", folder / "inside.json")  # a link inside it: an ordinary file
    assert model_folder_files(str(folder)) == sorted(keep + ["inside.json"])


def test_a_listed_model_file_outside_the_save_is_refused(tmp_path):
    from fxpp.testing.zoo import tiny_model

    save = write_save(tmp_path / "run", tiny_model("llama", 2), dp=1)
    with open(os.path.join(save, MODEL_FILES), "w") as f:
        json.dump(["../secret.txt"], f)
    list_files(save)  # listed as saved: the list's own content is what is refused
    with pytest.raises(CheckpointError, match=r"model_files.json: '../secret.txt' has a '..' component"):
        export(save, str(tmp_path / "out"))


@pytest.mark.heavy  # four ranks: the README's second test command
@pytest.mark.timeout(300)
def test_a_real_pp2_dp2_save_exports_as_before_with_the_folders_files(tmp_path, capsys):
    """fxpp run on a tied checkpoint folder with a chat template, its own generation config and a
    processor config: pp 2 x dp 2 (FSDP2 row shards), then fxpp export."""
    from transformers import AutoModelForCausalLM

    from fxpp.testing.checkpoint_dir import write_checkpoint
    from fxpp.trainer.cli import main

    source = tmp_path / "my-model"
    write_checkpoint(str(source), num_layers=4, tie=True)
    extra = {"chat_template.jinja": "{{ messages }}", "preprocessor_config.json": "{}",
             "generation_config.json": json.dumps({"max_new_tokens": 7, "do_sample": True, "temperature": 0.5})}
    for name, text in extra.items():
        (source / name).write_text(text)
    save = str(tmp_path / "run")
    rc = main(["run", str(source), "--stages", "2", "--dp", "2", "--steps", "1", "--batch", "4", "--microbatches", "2",
               "--seq-len", "8", "--no-check", "--save-dir", save])
    assert rc == 0, capsys.readouterr().err
    names = json.load(open(os.path.join(save, MODEL_FILES)))
    assert names == sorted(model_folder_files(str(source))) and set(extra) <= set(names), names
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(names)
    assert main(["export", save, str(tmp_path / "out")]) == 0
    whole_model_export(save, str(tmp_path / "ref"))
    for name in names:  # the folder's own generation_config.json replaced the one built from the config
        with open(source / name) as f, open(tmp_path / "out" / name) as g:
            assert f.read() == g.read(), name
    os.remove(tmp_path / "out" / "generation_config.json")
    os.remove(tmp_path / "ref" / "generation_config.json")
    assert_same_export(str(tmp_path / "out"), str(tmp_path / "ref"))
    trained = save_reader.whole_tensors(step_dir(save, 1))
    with safe_open(step_files.stage_file(step_dir(save, 1), 0, 0), "pt") as f:
        assert any(stop < rows for _, stop, rows in json.loads(f.metadata()[SHARDS_KEY]).values()), "row shards"
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(exported[k], v) for k, v in trained.items())


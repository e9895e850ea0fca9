"""``fxpp run`` end to end: pipeline x data parallel on gloo ranks, and its errors."""

import pytest


# fxpp run with --dp 2, with and without --activation-checkpointing, on a checkpoint
# directory and text, saved, resumed and exported: tests/test_walkthrough.py.


def test_run_batch_not_divisible_by_dp_times_microbatches(capsys):
    from fxpp.trainer.cli import main

    assert main(["run", "tiny-llama", "--stages", "2", "--dp", "2", "--batch", "6", "--steps", "1"]) == 2
    assert "--batch 6 must be a multiple of --dp 2 x --microbatches 4" in capsys.readouterr().err


def _checkpoint_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fxpp.testing.zoo import tiny_model

    words = "the cat sat on a mat and dog ran far away".split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), unk_token="[UNK]").save_pretrained(tmp_path)
    tiny_model("llama", 4).save_pretrained(tmp_path)
    return words


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_run_on_text_data_with_the_checkpoints_tokenizer(tmp_path, capsys, fmt):
    import json

    from fxpp.trainer.cli import main

    words = _checkpoint_with_tokenizer(tmp_path)
    docs = [" ".join(words[i % 5: i % 5 + 3 + i % 4]) for i in range(20)]
    data = tmp_path / f"docs.{fmt}"
    data.write_text("\n".join(json.dumps({"text": d}) if fmt == "jsonl" else d for d in docs) + "\n")
    rc = main(["run", str(tmp_path), "--data", str(data), "--stages", "2", "--steps", "2", "--batch", "4",
               "--microbatches", "2", "--seq-len", "8", "--check"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "MATCH" in out.out and "MISMATCH" not in out.out, out.out


def test_data_on_a_preset_without_tokenizer_is_one_line(tmp_path, capsys):
    from fxpp.trainer.cli import main

    data = tmp_path / "docs.txt"
    data.write_text("a b c\n")
    assert main(["run", "tiny-llama", "--data", str(data), "--steps", "1"]) == 2
    assert "--data needs a tokenizer" in capsys.readouterr().err


def test_run_on_a_checkpoint_missing_a_key_names_it_before_any_rank_starts(tmp_path, capsys):
    import json

    from fxpp.trainer.cli import main
    from fxpp.testing.checkpoint_dir import write_checkpoint

    write_checkpoint(str(tmp_path), max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["model.layers.2.self_attn.q_proj.weight"]
    index.write_text(json.dumps(data))
    assert main(["run", str(tmp_path), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "missing 1 key(s) of LlamaForCausalLM: model.layers.2.self_attn.q_proj.weight" in err, err
    assert "rank" not in err, err  # refused in the launcher, not by a failing rank

"""fxpp.trainer.data: packing with restarting positions, labels, resume position, tokenizer errors."""

import json

import pytest
import torch

from fxpp.errors import FxppError
from fxpp.trainer.data import DataPosition, PackedBatches, load_tokenizer, read_documents, tokenize


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

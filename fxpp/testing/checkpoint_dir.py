"""A small Hugging Face checkpoint directory, written offline: weights, config, tokenizer, text.

``python -m fxpp.testing.checkpoint_dir OUT [--family llama] [--layers 4] [--untied] [--docs FILE]``
writes what ``save_pretrained`` writes for a tiny preset (sharded safetensors, config.json),
a word-level tokenizer trained offline with the ``tokenizers`` library, and optionally
a text file of documents in that tokenizer's words. The tests and the walk-through
in docs/runtime.md train on it in place of a hub checkpoint.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .zoo import tiny_model

WORDS = ("the cat sat on a mat and dog ran far away while birds sang in tall green trees near "
         "old stone walls by quiet rivers under grey skies").split()


def write_tokenizer(path: str) -> int:
    """A word-level tokenizer of :data:`WORDS` (plus ``[UNK]``) saved as transformers files; its size."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"), unk_token="[UNK]").save_pretrained(path)
    return len(vocab)


def write_documents(path: str, count: int = 60, seed: int = 0) -> None:
    """``count`` lines of 3-12 words of :data:`WORDS` (one document a line)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "\n")


def write_checkpoint(path: str, family: str = "llama", num_layers: int = 4, *, tie: bool = True,
                     max_shard_size: str = "40KB", seed: int = 0) -> None:
    """A tiny ``family`` model (fxpp.testing.zoo) saved as sharded safetensors, with a tokenizer."""
    size = write_tokenizer(path)
    model = tiny_model(family, num_layers, seed=seed, tie_word_embeddings=tie)
    if model.config.get_text_config().vocab_size < size:
        raise ValueError(f"{family}'s tiny vocabulary is smaller than the tokenizer's {size} words")
    model.save_pretrained(path, max_shard_size=max_shard_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fxpp.testing.checkpoint_dir", description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--family", default="llama")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--untied", action="store_true", help="untied input and output embeddings")
    p.add_argument("--docs", help="also write this many-line text file of documents")
    args = p.parse_args(argv)
    write_checkpoint(args.out, args.family, args.layers, tie=not args.untied)
    if args.docs:
        write_documents(args.docs)
    print(f"wrote {args.out}" + (f" and {args.docs}" if args.docs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

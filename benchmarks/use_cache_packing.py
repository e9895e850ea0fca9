"""How far transformers' default ``use_cache=True`` forward is from the training forward on packed documents.

fxpp reproduces ``model(..., use_cache=False)``. With packed documents (position ids
that restart mid-row, no padding mask) transformers builds a block-diagonal mask only
when no cache is used; with the default ``use_cache=True`` the documents attend to
each other. Run: ``python benchmarks/use_cache_packing.py``.
"""

from __future__ import annotations

import torch

from fxpp.testing.zoo import tiny_model

if __name__ == "__main__":
    print("family | max |logits(use_cache=True) - logits(use_cache=False)|, packed documents 5 + 7 tokens")
    for family in ("llama", "gemma2", "gemma4", "qwen3_moe"):
        model = tiny_model(family, 4).eval()
        ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
        pos = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)
        with torch.no_grad():
            train = model(input_ids=ids, position_ids=pos, use_cache=False).logits
            default = model(input_ids=ids, position_ids=pos).logits
        print(f"{family} | {float((train - default).abs().max()):.3f}")

"""PEFT models (LoRA) through the pipeline: only the adapters train, frozen weights get no gradient.

``fxpp.pipeline(get_peft_model(model, LoraConfig(...)), n)`` traces the PEFT wrapper like
any model (its LoRA layers sit inside the decoder layers, which are leaves), so stage
parameters keep PEFT's names. On 2 gloo ranks under 1F1B, with a frozen tied embedding
(the case that used to get a zero gradient and a full-size exchange every step), the
adapters' gradients equal the unpatched PEFT model's stepped the same way
(``test_runtime.reference_step``) and every frozen ``.grad`` stays ``None``.
"""

from __future__ import annotations

import pytest
import torch

import fxpp
from fxpp.runtime.schedule import make_schedule
from fxpp.testing.zoo import tiny_model

from .dist import run_distributed
from .test_runtime import _assert_within, _batch, _diff, reference_step

peft = pytest.importorskip("peft")  # the test extra installs it; the library does not need it

M = 4


def _lora(model):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    torch.manual_seed(1)
    lora = peft.get_peft_model(model, config)
    for name, p in lora.named_parameters():  # LoRA B starts at zero: give it values so A's gradient is not zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return lora


def lora_rank(rank, world, workdir):
    model = _lora(tiny_model("llama", 4, tie_word_embeddings=True).train())
    ref = _lora(tiny_model("llama", 4, tie_word_embeddings=True).train())
    inputs, labels = _batch()
    pipe = fxpp.pipeline(model, 2, example_inputs={k: v[: v.shape[0] // M] for k, v in inputs.items()})
    stage = pipe.build_stage(rank, "cpu")
    loss_fn = fxpp.causal_lm_loss(labels, M)
    make_schedule("1F1B", [stage], M, loss_fn).step(**inputs, target=labels)
    reference_step(ref, inputs, labels, loss_fn, M)
    named = dict(stage.submod.named_parameters())
    return {
        "trainable": {n: _diff(p.grad, ref.get_parameter(n).grad) if p.grad is not None else "missing"
                      for n, p in named.items() if p.requires_grad},
        "frozen_with_grad": sorted(n for n, p in named.items() if not p.requires_grad and p.grad is not None),
        "frozen": sum(not p.requires_grad for p in named.values()),
        "names": sorted(named),
    }


@pytest.mark.timeout(300)
def test_lora_gradients_equal_unpatched_peft_model(tmp_path):
    reports = run_distributed(lora_rank, 2, tmp_path, timeout_s=240)
    names = set().union(*(r["names"] for r in reports))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in names, "PEFT's names kept"
    assert "base_model.model.lm_head.weight" in names
    for rank, r in enumerate(reports):
        assert r["frozen"] > 0 and r["trainable"], rank
        assert r["frozen_with_grad"] == [], f"rank {rank}: frozen parameters got a gradient: {r['frozen_with_grad']}"
        for name, d in r["trainable"].items():
            assert d != "missing", f"rank {rank}: {name} has no gradient"
            # The same float32 operations on the same microbatches: the bound of
            # test_runtime._check (2 ulps per microbatch of the gradient's largest entry).
            _assert_within(d, 2 * M, f"rank {rank} grad {name}")

"""Encoder-decoder models: the decoder's layer stack is cut, the encoder runs whole in stage 0.

What crosses each cut is found from the graph as for any model: the decoder's hidden
states, and what its layers read of the encoder (its output, its mask, T5's relative
position bias). Stages are built with no example inputs (fxpp's default signature of
an encoder-decoder model holds the encoder's tokens or images and ``decoder_input_ids``)
and called with other batch sizes, decoder and encoder lengths, with and without
images and a padding mask. Logits and every parameter gradient, the encoder's and the
vision tower's included, must equal the unpatched ``model(**inputs, use_cache=False)``.

Tolerance: as in ``tests/test_signature.py``: the stages run the model's own modules on
the same tensors in the same order; only float32 sums may reassociate (a few ulps of
values of order 1-10, far below 1e-5), while an encoder output read in a wrong slot or
a lost mask moves logits by 1e-2 or more.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxpp
from fxpp.testing.check import reference, run_pipeline
from fxpp.testing.sweep_vlm import generic_inputs, generic_model, text_ids

from .test_signature import property_examples

ATOL32, RTOL32 = 1e-5, 1e-5  # see the module docstring
# T5Gemma 2 (a SigLIP tower in its encoder, image tokens among the encoder's text),
# Florence 2 (image features put before BART's encoder text) and VisionEncoderDecoder
# (a ViT encoder, a BERT decoder with cross-attention): the three ways images reach an encoder.
FAMILIES = ("t5gemma2", "florence2", "vision-encoder-decoder")


@functools.lru_cache(maxsize=None)
def _model(family: str):
    # eval: Florence 2's BART keeps its dropout of 0.1, which no two runs draw alike;
    # the comparison is of the deterministic forward and its gradients (use_cache=False)
    return generic_model(family).eval()


@functools.lru_cache(maxsize=None)
def _pipeline(family: str):
    return fxpp.pipeline(_model(family), 2, cuts=[1])  # no example inputs


def test_the_decoder_stack_is_cut():
    from fxpp.trace import find_decoder_layers

    assert find_decoder_layers(_model("t5gemma2"))[0] == "model.decoder.layers"
    assert find_decoder_layers(_model("florence2"))[0] == "model.language_model.decoder.layers"
    # BERT as a decoder keeps its layers in bert.encoder: the model's encoder (get_encoder) decides, not a name
    assert find_decoder_layers(_model("vision-encoder-decoder"))[0] == "decoder.bert.encoder.layer"
    assert _pipeline("t5gemma2").signature.names[:4] == ("input_ids", "attention_mask", "pixel_values",
                                                         "decoder_input_ids")


def test_t5_text_to_text():
    """A plain seq2seq model (T5) with a padded encoder batch and decoder tokens of another length."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=3, num_heads=2, vocab_size=64,
                                                d_kv=16, dropout_rate=0.0))
    pipe = fxpp.pipeline(model, 3)
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :3] = 0
    inputs = {"input_ids": torch.randint(2, 64, (3, 9), generator=g), "attention_mask": mask,
              "decoder_input_ids": torch.randint(2, 64, (3, 4), generator=g)}
    assert_same_run(model, pipe, inputs, "t5")


def assert_same_run(model, pipe, inputs, what):
    from .helpers import assert_same

    assert_same(reference(model, inputs), run_pipeline(pipe, model, inputs), atol=ATOL32, rtol=RTOL32,
                what=f"{what}, inputs={ {k: list(v.shape) for k, v in inputs.items()} }")


def call_inputs(family: str, batch: int, dec_len: int, images: bool, padding: bool, seed: int) -> dict:
    model = _model(family)
    inputs, _ = generic_inputs(model, seed=seed)
    inputs = {k: v[:batch] if k != "decoder_input_ids" else v for k, v in inputs.items()}
    if not images:
        text = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        if "input_ids" not in text:
            return {}  # the encoder reads only images
        ids = text_ids(model.config, batch, 6 + seed % 5, seed)  # no image token: the text-only path
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "attention_mask" in inputs:
        if padding:
            inputs["attention_mask"] = inputs["attention_mask"].clone()
            inputs["attention_mask"][0, :1] = 0  # row 0 starts with a text token: never an image's
        else:
            del inputs["attention_mask"]
    inputs["decoder_input_ids"] = text_ids(model.config, batch, dec_len, seed + 7)
    return inputs


@settings(max_examples=property_examples(10), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(FAMILIES),
    images=st.booleans(),
    padding=st.booleans(),
    batch=st.integers(1, 2),
    dec_len=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_encoder_decoder_any_input_set(family, images, padding, batch, dec_len, seed):
    inputs = call_inputs(family, batch, dec_len, images, padding, seed)
    if not inputs:
        return  # VisionEncoderDecoder without images: no encoder input at all (the model refuses it too)
    assert_same_run(_model(family), _pipeline(family), inputs, family)


def encoder_decoder_rank(rank, world, workdir):
    """1F1B over two microbatches of T5Gemma 2 with images, stages built without example
    inputs (so for the build's shapes), then two steps every rank must refuse."""
    from fxpp.runtime.schedule import make_schedule

    from .test_signature import microbatch_report

    model = generic_model("t5gemma2").eval()  # as _model: no dropout draws
    ref = generic_model("t5gemma2").eval()
    pipe = fxpp.pipeline(model, world, cuts=[1])
    built = pipe.example_inputs
    mbs = [{"input_ids": built["input_ids"], "pixel_values": built["pixel_values"] * (1 + i),
            "decoder_input_ids": text_ids(model.config, 2, built["decoder_input_ids"].shape[1], 20 + i)}
           for i in range(2)]
    mbs[1]["attention_mask"] = torch.ones_like(built["input_ids"])
    targets = [mb["decoder_input_ids"] for mb in mbs]
    stage = pipe.build_stage(rank, "cpu")
    loss_fn = fxpp.causal_lm_loss(torch.cat(targets), 2)
    schedule = make_schedule("1F1B", [stage], 2, loss_fn)
    losses = []
    fxpp.step_with_microbatches(schedule, mbs if rank == 0 else None, targets, losses)
    report = microbatch_report(stage, ref, mbs, targets, loss_fn, losses)
    # Steps the build's shapes do not fit are refused on every rank, before anything runs:
    # longer encoder inputs, and one microbatch without its images.
    longer = [{**mb, "input_ids": torch.cat([mb["input_ids"], mb["input_ids"][:, -3:]], 1)} for mb in mbs]
    longer[1]["attention_mask"] = torch.ones_like(longer[1]["input_ids"])
    mixed = [mbs[0], {k: v for k, v in mbs[1].items() if k != "pixel_values"}]
    report["refused"] = []
    for bad in (longer, mixed):
        try:
            fxpp.step_with_microbatches(schedule, bad if rank == 0 else None, targets, [])
            report["refused"].append(None)
        except fxpp.StageInputError as e:
            report["refused"].append(str(e))
    return report


@pytest.mark.heavy  # two ranks, an encoder-decoder (about 13 s): the README's second test command
@pytest.mark.timeout(300)
def test_two_ranks_1f1b_encoder_decoder(tmp_path):
    from .dist import run_distributed
    from .test_signature import _check_reports

    reports = run_distributed(encoder_decoder_rank, 2, tmp_path, timeout_s=240)
    _check_reports(reports)
    for r in reports:
        longer, mixed = r["refused"]
        assert longer and "encoder-decoder model's stages keep the shapes" in longer, longer
        assert mixed and "the microbatches of this step differ in size" in mixed, mixed

"""The sweeps (``fxpp.testing.sweep_causal``, ``fxpp.testing.sweep_vlm``): every family of transformers'
causal-LM and image-text-to-text auto mappings, tiny config, ONE 2-stage pipeline per
family called with several input cases (token ids only, padding mask, packed
positions, both; for VLMs images, text only, ids only), each compared with the
unpatched training forward on the same inputs: logits and gradients."""

from __future__ import annotations

import time

import pytest
import torch

from fxpp.testing.check import (
    CASE_STATUSES,
    STATUSES,
    Case,
    CaseResult,
    SweepResult,
    check_pipeline,
    reference,
    reference_cases,
    settle,
)
from fxpp.testing.report import built_summary, case_summary, summary
from fxpp.testing.sweep_causal import CAUSAL_CASES, INPUT_CASES, _build, causal_cases, format_table, markdown, sweep_causal_lm
from fxpp.testing.sweep_vlm import VLM_CASES, text_ids, vlm_cases
from fxpp.testing.sweep_vlm import format_table as format_vlm_table
from fxpp.testing.sweep_vlm import markdown as vlm_markdown
from fxpp.testing.sweep_vlm import summary as vlm_summary
from fxpp.testing.sweep_vlm import sweep_vlm
from fxpp.testing.zoo import FAMILIES, IMAGE_TOKEN, VLM_FAMILIES, VOCAB

# zoo preset name -> transformers model_type, where they differ
_ZOO_MODEL_TYPE = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}
ZOO_MODEL_TYPES = tuple(_ZOO_MODEL_TYPE.get(f, f) for f in FAMILIES)
FXPP_FAILURES = ("mismatch", "fxpp-error", "error")


def test_zoo_model_types():
    assert set(ZOO_MODEL_TYPES) == {
        "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "gemma4_text",
        "qwen3_moe", "mixtral", "olmo2", "olmoe", "qwen2_moe",
    }


def _llama():
    return _build("llama", "LlamaForCausalLM", 64_000_000)


def test_causal_cases_cover_the_input_sets():
    cases = {c.name: c for c in causal_cases(_llama())}
    assert tuple(cases) == INPUT_CASES
    assert set(cases["ids"].inputs) == {"input_ids"}
    assert tuple(cases["ids"].inputs["input_ids"].shape) != (2, 8)  # not the build's default shape
    assert set(cases["padded"].inputs) == {"input_ids", "attention_mask"}
    assert (cases["padded"].inputs["attention_mask"] == 0).any()
    packed = cases["packed"].inputs
    assert set(packed) == {"input_ids", "position_ids"}
    restarts = (packed["position_ids"][:, 1:] == 0).sum(-1)
    assert (restarts >= 1).all()  # every row holds at least two documents
    both = cases["padded+pos"].inputs
    assert set(both) == {"input_ids", "attention_mask", "position_ids"}
    mask = both["attention_mask"]
    torch.testing.assert_close(both["position_ids"], (mask.cumsum(-1) - 1).clamp(min=0))


def test_sweep_llama_and_qwen2_every_case():
    results = sweep_causal_lm(["llama", "qwen2"])
    assert [r.family for r in results] == ["llama", "qwen2"]
    assert all(r.status in STATUSES for r in results)
    failed = [r for r in results if r.status != "pass"]
    assert not failed, "\n" + format_table(failed)
    for r in results:
        assert [c.name for c in r.cases] == list(CAUSAL_CASES)
        assert all(c.status == "pass" for c in r.cases if c.name != "router"), r.cases
        assert r.case_status("router") == "skipped"  # dense models: no router logits
        assert r.marks(CAUSAL_CASES) == "✓ ✓ ✓ ✓ ✓ –"


def test_router_case_checks_the_load_balancing_loss(monkeypatch):
    """MoE families get the ``router`` case: loss, aux_loss and gradients with router
    logits on. A pipeline whose loss drops the auxiliary term is a mismatch there (the
    default coefficient times the load-balancing loss is about 1e-3, ten times atol)."""
    import sys

    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    pipeline_module = sys.modules["fxpp.pipeline"]  # fxpp.pipeline is also the function

    (mixtral,) = sweep_causal_lm(["mixtral"])
    assert mixtral.status == "pass", format_table([mixtral])
    assert mixtral.case_status("router") == "pass"
    assert not mixtral.build_failure

    real = pipeline_module.model_loss

    def without_aux(model, out, labels):
        full = real(model, out, labels)
        lm = full.loss - model.config.router_aux_loss_coef * full.aux_loss
        return MoeCausalLMOutputWithPast(loss=lm, aux_loss=full.aux_loss, logits=full.logits)

    monkeypatch.setattr(pipeline_module, "model_loss", without_aux)
    (dropped,) = sweep_causal_lm(["mixtral"])
    assert dropped.case_status("router") == "mismatch", format_table([dropped])
    assert dropped.status == "mismatch" and dropped.case == "router"


def test_cases_the_forward_cannot_take_are_skipped():
    # Bloom's forward takes no position_ids: the packed cases are skipped, not failed
    [r] = sweep_causal_lm(["bloom"])
    assert r.status == "pass", format_table([r])
    status = {c.name: c.status for c in r.cases}
    assert status == {"ids": "pass", "padded": "pass", "unpadded": "pass", "packed": "skipped", "padded+pos": "skipped",
                      "router": "skipped"}
    assert "takes no position_ids" in next(c.detail for c in r.cases if c.name == "packed")
    assert r.marks(CAUSAL_CASES) == "✓ ✓ ✓ – – –"


def test_one_pipeline_a_wrong_reference_is_a_mismatch_naming_the_case():
    """A case whose answer differs from its reference is a mismatch of the family, with
    the case named: here the reference of 'padded' is the unpadded forward."""
    model = _llama()
    cases = {c.name: c for c in causal_cases(model)}
    unpadded = {"input_ids": cases["padded"].inputs["input_ids"]}
    checks = [("ids", cases["ids"].inputs, reference(model, cases["ids"].inputs)),
              ("padded", cases["padded"].inputs, reference(model, unpadded))]
    result = SweepResult("llama", "LlamaForCausalLM", "error",
                         cases=[CaseResult("ids", "error"), CaseResult("padded", "error")])
    check_pipeline(result, model, checks, None, timeout_s=60, start=time.perf_counter())
    assert [c.status for c in result.cases] == ["pass", "mismatch"]
    assert result.status == "mismatch" and result.case == "padded"
    assert result.detail.startswith("padded: logits max diff") and result.max_diff > 1e-3


def test_a_case_the_model_itself_fails_is_a_model_error_of_that_case():
    model = _llama()
    good = {"input_ids": torch.randint(3, VOCAB, (2, 6))}
    bad = {"input_ids": torch.full((2, 6), VOCAB + 5), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    result = SweepResult("llama", "LlamaForCausalLM", "error")
    start = time.perf_counter()
    checks = reference_cases(result, model, [Case("ids", good), Case("padded", bad), Case("packed", None, "why")],
                             timeout_s=60, start=start)
    assert [name for name, _, _ in checks] == ["ids"]
    assert [c.status for c in result.cases] == ["error", "model-error", "skipped"]  # ids: not run yet
    check_pipeline(result, model, checks, None, timeout_s=60, start=start)
    assert [c.status for c in result.cases] == ["pass", "model-error", "skipped"]
    assert result.status == "model-error" and result.case == "padded"
    assert result.detail.startswith("padded: reference:")


def test_settle_worst_case_first():
    def family(*statuses):
        r = SweepResult("f", "F", "error", cases=[CaseResult(f"c{i}", s, s, max_diff=0.0 if s == "pass" else None)
                                                  for i, s in enumerate(statuses)])
        return settle(r)

    assert family("pass", "skipped", "pass").status == "pass"
    assert family("pass", "model-error", "fxpp-error", "mismatch").status == "mismatch"
    r = family("pass", "model-error", "fxpp-error", "error")
    assert r.status == "error" and r.case == "c3" and "also c1: model-error, c2: fxpp-error" in r.detail
    assert family("model-error", "fxpp-error").status == "fxpp-error"
    assert family("model-error", "pass").status == "model-error"
    assert set(CASE_STATUSES) == {*STATUSES, "skipped"}


def test_docs_table_has_a_column_per_case():
    results = [settle(SweepResult("a", "A", "error", model_class="A",
                                  cases=[CaseResult(n, s, max_diff=0.0) for n, s in
                                         zip(CAUSAL_CASES, ("pass", "pass", "skipped", "mismatch"))])),
               SweepResult("b", "B", "model-error", detail="build: ValueError: no")]
    text = markdown(results)
    assert "| family | class | status | ids / padded / unpadded / packed / padded+pos / router | tp | detail |" in text
    assert "| `a` | `A` | mismatch | ✓ ✓ – ≠ · · |" in text  # · : the family got no router case
    assert "| `b` | `B` | model-error |  |" in text
    assert markdown(results) == text  # deterministic
    assert built_summary(results) == "1 build tiny, 0 pass every case (0.0%)"
    assert case_summary(results, ["packed"]) == (
        "packed: 0 pass, 1 mismatch, 0 fxpp-error or error, 0 model-error, 0 skipped")
    results[0] = settle(SweepResult("a", "A", "error", model_class="A", cases=[
        CaseResult("ids", "pass", max_diff=0.0), CaseResult("padded", "model-error", "reference: no")]))
    assert results[0].status == "model-error"
    assert built_summary(results) == "1 build tiny, 0 pass every case (0.0%), 1 more pass every case the unpatched model runs"


def test_vlm_text_cases_carry_no_image_tokens():
    import transformers

    config = transformers.LlavaConfig(image_token_index=IMAGE_TOKEN)
    ids = text_ids(config, 2, 200, seed=0)
    assert not (ids == IMAGE_TOKEN).any() and ids.min() >= 3


# Generic VLM attempts (no zoo config) that each exercise one general mechanism:
# blip-2: the decoder layers are the stack beside the token embeddings, not the Q-Former's;
# hunyuan_vl: a helper that calls int() on tensor data inside another helper becomes opaque;
# qwen2_vl: multimodal rotary sections sized for the tiny model by the sweep's builder;
# kosmos-2: its causal mask is written in place (``mask.masked_fill_(...)``), a write every
# stage must keep (before, the stages silently used a mask without the causal part).
GENERIC_VLMS = ("blip-2", "hunyuan_vl", "qwen2_vl", "kosmos-2")
# Their forwards need images: the text-only cases do not apply (skipped, the reason in the detail);
# the others run text-only and must pass those cases, not skip them.
NEEDS_IMAGES = {"blip-2": "pixel_values", "kosmos-2": "pixel_values"}


@pytest.mark.heavy  # a slice of the VLM sweep (about 15 s): the README's second test command
def test_vlm_sweep_generic_families():
    results = sweep_vlm(list(GENERIC_VLMS))
    assert [r.family for r in results] == list(GENERIC_VLMS)
    for r in results:
        status = {c.name: c.status for c in r.cases}
        assert tuple(status) == VLM_CASES, format_vlm_table([r])
        assert status["images"] == "pass", format_vlm_table([r])
        expected = "skipped" if r.family in NEEDS_IMAGES else "pass"
        assert status["text"] == status["ids"] == expected, format_vlm_table([r])
        # packed: skipped where the forward needs images or takes no position_ids
        assert status["packed"] == expected or r.family in NEEDS_IMAGES, format_vlm_table([r])
        assert r.status == "pass", format_vlm_table([r])
        if r.family in NEEDS_IMAGES:
            assert f"skipped: the forward requires {NEEDS_IMAGES[r.family]}" in r.detail
            assert r.marks(VLM_CASES) == "✓ – – –"


def test_only_cases_refused_for_want_of_media_are_skipped():
    """The text and ids cases are skipped only where the unpatched model ran with images
    and its error names a media input the images case gives; another failure stays a
    model-error, and nothing is skipped when the images case itself failed."""
    from fxpp.testing.sweep_vlm import skip_cases_that_need_media

    images = {"input_ids": torch.ones(2, 8, dtype=torch.long), "pixel_values": torch.zeros(2, 3, 4, 4)}
    text = {"input_ids": torch.ones(2, 10, dtype=torch.long), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    cases = [Case("images", images), Case("text", text), Case("ids", {"input_ids": text["input_ids"]})]

    def family(images_status, text_error, ids_error):
        def refused(name, message):
            return CaseResult(name, "model-error", f"reference: {message}", phase="reference")

        return SweepResult("f", "F", "error", cases=[
            CaseResult("images", images_status), refused("text", text_error), refused("ids", ids_error)])

    missing = "TypeError: F.forward() missing 1 required positional argument: 'pixel_values'"
    r = family("error", missing, "RuntimeError: size mismatch at dimension 3")
    assert skip_cases_that_need_media(r, cases) == ["text"]
    assert [c.status for c in r.cases] == ["error", "skipped", "model-error"]
    assert r.cases[1].detail.startswith("the forward requires pixel_values (the unpatched model runs with images")
    r = family("model-error", missing, missing)  # no evidence the model runs at all
    assert skip_cases_that_need_media(r, cases) == []
    assert [c.status for c in r.cases] == ["model-error", "model-error", "model-error"]
    r = family("error", "ValueError: pixel_values_videos is not supported", missing)  # names no given input
    assert skip_cases_that_need_media(r, cases) == ["ids"]
    r.cases[0] = CaseResult("images", "pass", max_diff=0.0)  # the pipeline's result
    assert settle(r).status == "model-error" and r.case == "text"  # a case that applies fails


def test_vlm_sweep_zoo_family_images_text_ids_and_packed():
    [r] = sweep_vlm(["llava"])
    assert r.status == "pass", format_vlm_table([r])
    assert r.marks(VLM_CASES) == "✓ ✓ ✓ ✓"
    assert "| `llava` | `LlavaForConditionalGeneration` | VLM | pass | ✓ ✓ ✓ ✓ |" in vlm_markdown([r])


def test_vlm_cases_text_kind_skips_images():
    model = _llama()
    cases = {c.name: c for c in vlm_cases(model, "text", {})}
    assert cases["images"].inputs is None and "no vision tower" in cases["images"].skip
    assert set(cases["text"].inputs) == {"input_ids", "attention_mask"}
    assert set(cases["ids"].inputs) == {"input_ids"}


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sweep_every_causal_lm_family():
    """Every zoo family passes every case; no family gives a wrong answer (mismatch) or
    fails un-cleanly (status "error": an exception from fxpp that is not an FxppError).
    Clean refusals and model errors are allowed."""
    results = sweep_causal_lm()
    by_family = {r.family: r for r in results}
    zoo_failed = [by_family[t] for t in ZOO_MODEL_TYPES if by_family[t].status != "pass"]
    errors = [r for r in results if r.status in ("error", "mismatch")]
    report = summary(results) + "\n" + built_summary(results) + "\n" + case_summary(results, CAUSAL_CASES)
    if zoo_failed:
        report += "\n\nzoo families that do not pass:\n" + format_table(zoo_failed)
    if errors:
        report += "\n\nfamilies with wrong answers or un-clean failures:\n" + format_table(errors)
    assert not zoo_failed and not errors, report


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sweep_every_vlm_family():
    """No VLM family gives a wrong answer or fails un-cleanly; the zoo families pass every case."""
    results = sweep_vlm()
    errors = [r for r in results if r.status in ("error", "mismatch")
              or (r.family in VLM_FAMILIES and r.status != "pass")]
    assert not errors, vlm_summary(results) + "\n\n" + format_vlm_table(errors)


def test_router_case_for_data_dependent_routers_and_other_coefficient_names():
    """JetMoE's gating dispatches on tensor data inside the decoder layer, and reads its
    coefficient as ``aux_loss_coef``; Qwen4-Exp's later layer needs a real evaluation
    that replays the recorded router logits of the earlier one. Both must pass."""
    results = sweep_causal_lm(["jetmoe", "qwen4_exp_text"])
    for r in results:
        assert r.case_status("router") == "pass", format_table([r])


def test_an_aux_loss_without_a_known_coefficient_is_refused(monkeypatch):
    import sys

    import fxpp
    from fxpp.testing.zoo import tiny_model

    model = tiny_model("mixtral", 2, output_router_logits=True)
    ids = torch.randint(3, 100, (2, 6))
    pipe = fxpp.pipeline(model, 2)
    monkeypatch.setattr(sys.modules["fxpp.runtime.loss"], "AUX_LOSS_COEF_NAMES", ("no_such_coefficient",))
    with pytest.raises(fxpp.StageInputError, match="returns an aux_loss but fxpp finds no coefficient"):
        pipe(input_ids=ids, labels=ids)


def test_vlm_sweep_mllama_text_only_skips_the_layers_after_the_cut():
    """Mllama's tiny text model: layer 1 of 2 is a cross-attention layer, which the forward
    skips without images. A text-only call to the pipeline cut at 1 calls no layer on the
    second stage: the hidden states of layer 0 cross to the norm and head there, and
    logits and gradients equal the unpatched model's."""
    (r,) = sweep_vlm(["mllama"])
    assert [c.status for c in r.cases] == ["pass", "pass", "pass", "pass"], format_vlm_table([r])


def test_a_layer_list_that_picks_some_layers_picks_some_tiny_ones():
    """Flint's mlp_only_layers [0, 1] of 49 layers names its dense layers; with 2 tiny
    layers it must keep one MoE layer, or the router case has no router to check."""
    from fxpp.testing.tiny import tiny_config

    assert tiny_config("flint").mlp_only_layers == [0]


def test_mla_head_dim_keeps_the_partial_rotary_tie():
    """MLA configs size their rotary embedding from ``head_dim * partial_rotary_factor``,
    which must equal ``qk_rope_head_dim``: Mistral 4 (128 * 0.5 = 64) keeps the tie at the
    tiny size; a config without a partial factor (DeepSeek-V3) gets head_dim = the rotary width."""
    from fxpp.testing.tiny import SHRINK, tiny_config

    mistral4 = tiny_config("mistral4")
    assert mistral4.qk_rope_head_dim == SHRINK["qk_rope_head_dim"]
    assert mistral4.head_dim * mistral4.rope_parameters["partial_rotary_factor"] == mistral4.qk_rope_head_dim
    deepseek = tiny_config("deepseek_v3")
    assert deepseek.head_dim == deepseek.qk_rope_head_dim == SHRINK["qk_rope_head_dim"]


def test_mrope_sections_follow_the_full_models_proportions():
    """Tiny multimodal rotary sections add up to half the tiny rotary width, in the full
    model's proportions with its equal sections kept equal: Ernie 4.5 VL stacks its height
    and width sections (its code default [22, 22, 20]), so they must stay equal; an MLA
    text model (HY-V4-VL) sizes them from qk_rope_head_dim."""
    from transformers import AutoConfig

    from fxpp.testing.generic_vlm import _mrope_sections
    from fxpp.testing.tiny import SHRINK

    def sections(model_type):
        return _mrope_sections(AutoConfig.for_model(model_type).get_text_config(), model_type)

    assert sections("ernie4_5_vl_moe") == [3, 3, 2]
    assert sections("qwen2_vl") == [2, 3, 3]
    assert sum(sections("hy_v4_vl")) == SHRINK["qk_rope_head_dim"] // 2


def test_config_reads_the_config_does_not_declare_are_filled_from_the_family():
    """Qwen2.5-Omni's thinker reads ``self.config.vision_start_token_id``, declared only by
    its talker config: the generic model gets the talker's default. A family whose config
    declares everything its code reads (LLaVA) gets nothing."""
    from fxpp.testing.generic_vlm import _fill_unset_config_reads, generic_model

    omni = generic_model("qwen2_5_omni_thinker")
    assert omni.config.vision_start_token_id == 151652
    assert _fill_unset_config_reads(omni) == {}  # declared now
    assert _fill_unset_config_reads(generic_model("llava")) == {}


def test_an_unset_window_of_a_model_without_sliding_layers_gets_the_tiny_window():
    """Step 3.7 builds its sliding-window mask whatever its layer types, and refuses an
    unset window: with no sliding layer, the tiny config sets one (no layer reads it).
    Qwen2's window stays off (its use_sliding_window switch is off)."""
    from fxpp.testing.generic_vlm import generic_config
    from fxpp.testing.tiny import SHRINK, tiny_config

    text = generic_config("step3p7").get_text_config()
    assert set(text.layer_types) == {"full_attention"} and text.sliding_window == SHRINK["sliding_window"]
    assert tiny_config("qwen2").sliding_window is None


def test_vlm_generic_configs_take_the_family_rules_written_for_their_layer_count():
    """The causal sweep's family rules (FAMILY_KWARGS) apply to the VLM sweep's generic
    configs too: Qwen4-Exp's indexer sizes and Cohere Compass's rope parameters (without
    them the model does not build). Mllama's, written for 3 layers, do not: its 2 tiny
    layers keep the default rule (the cross-attention layer last)."""
    from fxpp.testing.generic_vlm import generic_config

    assert generic_config("qwen4_exp").text_config.indexer_n_heads == 2
    rope = generic_config("cohere_compass").text_config.rope_parameters
    assert rope["full_attention"]["rope_type"] == "default"
    assert generic_config("mllama").text_config.cross_attention_layers == [1]


def test_a_sparse_indexer_keeps_its_top_k_a_multiple_of_its_key_pool():
    """GLM-5 Next pools keys in groups of index_kpool and validates index_topk % index_kpool
    == 0: the tiny pool divides the tiny top-k, so the config builds."""
    from fxpp.testing.generic_vlm import generic_config

    text = generic_config("glm5_next").get_text_config()
    assert text.index_topk % text.index_kpool == 0 and text.index_kpool < 16


def test_tp_column_precheck_names_the_reason_without_ranks():
    """The tp column's precheck runs in the sweep's process: no plan, and a plan tp 2 cannot apply, by name."""
    import transformers as tf

    from fxpp.testing.sweep_tp import precheck
    from fxpp.testing.zoo import tiny_config, tiny_model

    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    status, reason = precheck(gpt2)
    assert status == "no plan" and reason.startswith("GPT2LMHeadModel has no tensor-parallel plan"), reason
    config = tiny_config("llama", 2)
    config.num_key_value_heads = 1
    status, reason = precheck(tf.AutoModelForCausalLM.from_config(config))
    assert status == "refused" and "tp=2 does not divide the 1 heads of model.layers.0.self_attn.k_proj" in reason
    assert precheck(tiny_model("qwen3_moe", 2)) is None  # routed experts stay whole: run on the ranks


@pytest.mark.heavy  # one 4-rank spawn
@pytest.mark.timeout(600)
def test_tp_column_runs_pp2_tp2_and_reports_each_family():
    from fxpp.testing.sweep_causal import tp_summary

    results = sweep_causal_lm(["llama", "qwen3_moe", "gpt2"], tp=True)
    assert [(r.family, r.tp) for r in results] == [("llama", "pass"), ("qwen3_moe", "pass"), ("gpt2", "no plan")], [
        (r.family, r.tp, r.tp_detail) for r in results]
    assert tp_summary(results).endswith("2 pass, 0 mismatch, 0 refused, 1 no plan, 0 error, 0 not run")
    text = markdown(results)
    assert "| `llama` | `LlamaForCausalLM` | pass | ✓ ✓ ✓ ✓ ✓ – | ✓ | max diff 0 |" in text, text


def test_tp_only_rewrites_the_column_and_its_section_and_nothing_else(tmp_path):
    """``python -m fxpp.sweep --tp-only --write-docs`` on a page without a tp column, then again on its own output."""
    from fxpp.testing.sweep_causal import TP_END, TP_START, docs_rows, write_tp_column

    page = tmp_path / "supported_models.md"
    page.write_text("# Supported models\n\n| family | class | status | ids / padded | detail |\n|---|---|---|---|---|\n"
                    "| `a` | `A` | pass | ✓ ✓ | max diff 0 |\n| `b` | `B` | model-error |  | build: no |\n\n"
                    "## Beyond the sweeps\n\ntext\n<!-- fxpp-vlm-sweep -->\n## VLM\n| `v` | `V` | pass | x |\n")
    assert docs_rows(str(page)) == [("a", "A", "pass"), ("b", "B", "model-error")]
    results = [SweepResult("a", "A", "pass", tp="refused", tp_detail="X: tp=2 does not divide"),
               SweepResult("b", "B", "model-error", tp="not run", tp_detail="the 2-stage pipeline: model-error")]
    for _ in range(2):  # the second time it replaces what the first wrote
        write_tp_column(results, str(page))
        text = page.read_text()
        assert "| family | class | status | ids / padded | tp | detail |\n|---|---|---|---|---|---|\n" in text, text
        assert "| `a` | `A` | pass | ✓ ✓ | ✗ | max diff 0 |" in text and "| `b` | `B` | model-error |  | · |" in text
        assert text.count(TP_START) == 1 and text.count(TP_END) == 1, text
        assert "- `a` (refused): X: tp=2 does not divide" in text
        assert "1 refused" in text and text.index(TP_END) < text.index("## Beyond the sweeps")
        assert text.endswith("<!-- fxpp-vlm-sweep -->\n## VLM\n| `v` | `V` | pass | x |\n"), text
    # What a rerun of some families keeps of the others: the status and the reason the page gives.
    from fxpp.testing.sweep_causal import _docs_table

    assert _docs_table(str(page)) == [("a", "A", "pass", "refused", "X: tp=2 does not divide"),
                                      ("b", "B", "model-error", "not run", "")]


def test_a_sweep_without_its_tp_column_keeps_the_page_s_column(tmp_path):
    """``python -m fxpp.sweep --no-tp --write-docs`` writes the tp cells and reasons the page had
    (it did not measure them), except for a family that no longer passes."""
    from fxpp.testing.sweep_causal import NO_TP, keep_page_tp, markdown

    page = tmp_path / "supported_models.md"
    page.write_text(markdown([SweepResult("a", "A", "pass", tp="refused", tp_detail="X: tp=2 does not divide"),
                              SweepResult("b", "B", "pass", tp="pass"),
                              SweepResult("c", "C", "pass", tp="pass")]))
    rerun = [SweepResult("a", "A", "pass", tp="not run", tp_detail=NO_TP),
             SweepResult("b", "B", "pass", tp="not run", tp_detail=NO_TP),
             SweepResult("c", "C", "mismatch", tp="not run", tp_detail="the 2-stage pipeline: mismatch")]
    keep_page_tp(rerun, str(page))
    assert [(r.tp, r.tp_detail) for r in rerun] == [("refused", "X: tp=2 does not divide"), ("pass", ""),
                                                    ("not run", "the 2-stage pipeline: mismatch")]

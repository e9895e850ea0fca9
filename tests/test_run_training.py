"""``fxpp run`` as a real job: the optimizer step, metrics, validation, LoRA, the check's default, torchrun.

Each run is checked against the unpatched model trained in one process the same way
(clipping with ``torch.nn.utils.clip_grad_norm_``, the same decay groups, LR schedule
and LoRA adapters; ``fxpp.trainer.train.reference_run``): the command prints ``MATCH``
for the losses (within 1e-3: the same float32 program up to summation order,
measured ~1e-6) and for the gradient norms.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fxpp.runtime.optim import LRFactor
from fxpp.testing.checkpoint_dir import write_checkpoint, write_documents
from fxpp.trainer.cli import main
from fxpp.trainer.metrics import read_metrics
from fxpp.trainer.save_reader import whole_tensors
from fxpp.trainer.step_files import step_dir


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err + out.out
    return out.out


@pytest.mark.timeout(300)
def test_optimizer_step_and_metrics_match_unpatched_model(tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"
    out = _run(["run", "tiny-llama", "--stages", "2", "--steps", "4", "--lr", "1e-2", "--lr-schedule", "cosine",
                "--warmup-steps", "2", "--min-lr-ratio", "0.1", "--weight-decay", "0.1", "--max-grad-norm", "0.5",
                "--log-every", "2", "--metrics", str(metrics)], capsys)
    assert out.count("MATCH") == 2 and "MISMATCH" not in out, out  # losses and gradient norms
    records = read_metrics(str(metrics))
    assert [r["step"] for r in records] == [2, 4]
    factor = LRFactor("cosine", 2, 4, 0.1)
    for r in records:
        assert set(r) == {"step", "loss", "grad_norm", "lr", "tokens_per_s", "peak_memory_bytes"}
        assert r["lr"] == pytest.approx(1e-2 * factor(r["step"] - 1), rel=1e-12)  # the LR its update used
        assert len(r["peak_memory_bytes"]) == 2 and all(m > 0 for m in r["peak_memory_bytes"])
        assert r["grad_norm"] > 0.5, "the test must clip"
        assert r["tokens_per_s"] > 0 and r["loss"] > 0


@pytest.mark.heavy  # several full runs: the README's second test command
@pytest.mark.timeout(300)
def test_resume_inside_warmup_is_bit_exact(tmp_path, capsys):
    flags = ["--stages", "2", "--lr", "1e-2", "--lr-schedule", "cosine", "--warmup-steps", "3", "--weight-decay",
             "0.1", "--no-check"]
    _run(["run", "tiny-llama", "--steps", "4", "--save-dir", str(tmp_path / "a"), *flags], capsys)
    _run(["run", "tiny-llama", "--steps", "2", "--save-dir", str(tmp_path / "b"), *flags], capsys)
    _run(["run", "tiny-llama", "--steps", "4", "--save-dir", str(tmp_path / "b"), "--resume", *flags], capsys)
    straight, resumed = (whole_tensors(step_dir(str(tmp_path / d), 4)) for d in "ab")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.heavy  # several full runs: the README's second test command
@pytest.mark.timeout(300)
def test_validation_loss_equals_unpatched_eval_loss(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    write_checkpoint(str(ckpt))
    write_documents(str(tmp_path / "train.txt"), 60, seed=0)
    write_documents(str(tmp_path / "val.txt"), 12, seed=1)
    out = _run(["run", str(ckpt), "--data", str(tmp_path / "train.txt"), "--val-data", str(tmp_path / "val.txt"),
                "--val-every", "2", "--steps", "3", "--batch", "4", "--microbatches", "2", "--seq-len", "16",
                "--check"], capsys)
    assert "validation loss vs the unpatched model" in out and "MISMATCH" not in out, out
    assert "validation loss: step 2" in out and "step 3" in out, out


@pytest.mark.timeout(300)
def test_the_check_is_opt_in_for_a_checkpoint_directory(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    write_checkpoint(str(ckpt))
    out = _run(["run", str(ckpt), "--steps", "1"], capsys)
    assert "unpatched" not in out, out  # the whole model would be trained again on one rank


@pytest.mark.heavy  # several full runs: the README's second test command
@pytest.mark.timeout(300)
def test_lora_run_trains_adapters_and_exports_a_peft_adapter(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from fxpp.testing.zoo import tiny_model

    save = tmp_path / "run"
    out = _run(["run", "tiny-llama", "--stages", "2", "--steps", "3", "--lr", "1e-2", "--lora-rank", "4",
                "--lora-targets", "q_proj,v_proj", "--save-dir", str(save)], capsys)
    assert out.count("MATCH") == 2 and "MISMATCH" not in out, out
    saved = whole_tensors(step_dir(str(save), 3))
    base = tiny_model("llama", 4)  # the preset's weights (seed 0): the frozen base, unchanged by training
    for name, p in base.named_parameters():
        assert torch.equal(saved[f"base_model.model.{name}".replace(".q_proj.", ".q_proj.base_layer.")
                                 .replace(".v_proj.", ".v_proj.base_layer.")], p), name
    _run(["export", str(save), str(tmp_path / "adapter")], capsys)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert lora and all(torch.equal(p, saved[n]) for n, p in lora.items())


@pytest.mark.heavy  # several full runs: the README's second test command
@pytest.mark.timeout(300)
def test_torchrun_is_the_multi_node_path(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "-m", "fxpp",
           "run", "tiny-llama", "--stages", "2", "--dp", "2", "--steps", "2", "--log-every", "1", "--metrics",
           str(tmp_path / "m.jsonl")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MATCH" in done.stdout and "MISMATCH" not in done.stdout, done.stdout
    assert [r["step"] for r in read_metrics(str(tmp_path / "m.jsonl"))] == [1, 2]
    wrong = subprocess.run([*cmd[:5], "3", *cmd[6:]], capture_output=True, text=True, timeout=240, env=env,
                           cwd=tmp_path)
    assert wrong.returncode != 0
    assert "torchrun started 3 processes, but --stages 2 x --dp 2 = 4" in wrong.stderr


@pytest.mark.heavy  # several full runs: the README's second test command
@pytest.mark.timeout(300)
def test_a_bf16_checkpoint_trains_fp32_masters_and_exports_bf16(tmp_path, capsys):
    from safetensors import safe_open

    from fxpp.testing.zoo import tiny_model

    ckpt = tmp_path / "ckpt"
    tiny_model("llama", 4).to(torch.bfloat16).save_pretrained(ckpt)  # config.json says bfloat16
    save = tmp_path / "run"
    _run(["run", str(ckpt), "--stages", "2", "--steps", "1", "--save-dir", str(save)], capsys)
    saved = whole_tensors(step_dir(str(save), 1))
    assert {v.dtype for v in saved.values()} == {torch.float32}, "the save holds the fp32 masters"
    _run(["export", str(save), str(tmp_path / "out")], capsys)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, "the export has the checkpoint's dtype"


@pytest.mark.heavy  # several full runs: the README's second test command
@pytest.mark.timeout(300)
def test_a_non_finite_step_stops_the_run_before_the_optimizer_step(tmp_path, capsys):
    rc = main(["run", "tiny-llama", "--stages", "2", "--steps", "3", "--lr", "inf", "--save-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "NonFiniteError: step 2: the global gradient norm is nan" in err, err
    assert not (tmp_path / "r" / "step-000003").exists(), "nothing of a non-finite run is saved"


@pytest.mark.parametrize("argv, message", [
    (["--batch", "6"], "--batch 6 must be a multiple of --dp 1 x --microbatches 4"),
    (["--seq-len", "100000"], "--seq-len 100000 is above the model's max_position_embeddings"),
    (["--steps", "0"], "--steps 0 must be at least 1"),
    (["--lr-schedule", "cosine", "--min-lr-ratio", "2"], "--min-lr-ratio 2.0"),
])
def test_bad_settings_are_one_line_before_any_rank_starts(argv, message, capsys):
    assert main(["run", "tiny-llama", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_data_file_that_is_not_utf8_is_named(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    write_checkpoint(str(ckpt))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"the cat\nsat \xff\xfe on\n")
    assert main(["run", str(ckpt), "--data", str(bad), "--steps", "1"]) == 2
    assert f"--data {bad}: not UTF-8 text (byte 12" in capsys.readouterr().err

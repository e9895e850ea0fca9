"""docs/runtime.md's walk-through, run as written: a real checkpoint directory trained with
pipeline x data parallel on packed text, saved, resumed, exported and loaded back."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "runtime.md"


def walkthrough_commands() -> list[str]:
    text = DOC.read_text()
    match = re.search(r"<!-- walk-through -->\n```bash\n(.*?)```", text, re.DOTALL)
    assert match, "docs/runtime.md has no <!-- walk-through --> bash block"
    return [line for line in match.group(1).splitlines() if line.strip()]


def _run(command: str, cwd: Path) -> str:
    args = shlex.split(command)
    if args[0] == "python":
        args[0] = sys.executable
    elif args[0] == "fxpp":  # the installed entry point, run with this interpreter
        args = [sys.executable, "-m", "fxpp", *args[1:]]
    env = {**os.environ, "PYTHONPATH": str(DOC.parent.parent)}
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.heavy  # several full fxpp runs (pp2 x dp2, resume, export): the README's second test command
@pytest.mark.timeout(900)
def test_the_walkthrough_runs_and_resumes_bit_for_bit(tmp_path):
    """pp 2 x dp 2 (FSDP2) on a tied checkpoint directory and packed text, as docs/runtime.md says."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fxpp.trainer.save_reader import whole_tensors

    commands = walkthrough_commands()
    assert any("--resume" in c for c in commands) and any(c.startswith("fxpp export") for c in commands)
    for command in commands:
        out = _run(command, tmp_path)
        if command.startswith("fxpp run"):
            assert "MATCH" in out and "MISMATCH" not in out, out
            assert re.search(r"peak memory per rank \(\w+\): r0 [\d.]+ GiB, r1 [\d.]+ GiB, r2 [\d.]+ GiB, r3", out), out
    # An uninterrupted run of the same 4 steps, with per-layer activation checkpointing
    # (which must change no bit): the resumed save holds exactly its tensors.
    resumed = next(c for c in commands if "--resume" in c)
    out = _run(resumed.replace("--save-dir run --resume", "--save-dir straight --activation-checkpointing"), tmp_path)
    assert "MATCH" in out and "MISMATCH" not in out, out
    files = sorted(p.name for p in (tmp_path / "straight" / "step-000004").glob("*.safetensors"))
    assert len(files) == 8  # 2 stages x 2 dp shards of parameters, 2 x 2 ranks of optimizer state
    for name in files:
        a = load_file(tmp_path / "straight" / "step-000004" / name)
        b = load_file(tmp_path / "run" / "step-000004" / name)
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"
    # The dp shards are real shards (a row range each), and the export holds the trained weights.
    shard = load_file(tmp_path / "run" / "step-000004" / "stage-0.dp-1.safetensors")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "my-model-trained").state_dict()
    trained = whole_tensors(str(tmp_path / "run" / "step-000004"))
    embed = "model.embed_tokens.weight"
    assert shard[embed].shape[0] < trained[embed].shape[0]
    assert set(exported) == set(trained)
    for key, value in trained.items():
        assert torch.equal(exported[key], value), key
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "my-model").state_dict()
    assert not torch.equal(original[embed], exported[embed])  # it did train
    assert exported["lm_head.weight"].data_ptr() == exported[embed].data_ptr() or torch.equal(
        exported["lm_head.weight"], exported[embed])
    assert (tmp_path / "my-model-trained" / "tokenizer.json").is_file()

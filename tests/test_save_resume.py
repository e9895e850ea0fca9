"""The save directory's guards (fxpp.runtime.run_state): no silent resume or export of the wrong thing.

The end-to-end save / resume / export run is tests/test_walkthrough.py."""

import json

import pytest
import torch

import fxpp
from fxpp.runtime import run_state
from fxpp.runtime.train import RunConfig


def test_resume_refuses_another_setting_and_names_it(tmp_path):
    cfg = RunConfig(save_dir=str(tmp_path), steps=4)
    state = {"step": 2, "settings": run_state.settings_of(cfg), "layer_ranges": [[0, 2], [2, 4]]}
    run_state.check_resumable(state, cfg, [range(0, 2), range(2, 4)])  # the same run: fine
    other = RunConfig(save_dir=str(tmp_path), steps=4, microbatches=2)
    with pytest.raises(fxpp.FxppError, match=r"saved with microbatches=4, this run has microbatches=2"):
        run_state.check_resumable(state, other, [range(0, 2), range(2, 4)])
    with pytest.raises(fxpp.FxppError, match=r"the saved stages own layers \[\[0, 2\], \[2, 4\]\]"):
        run_state.check_resumable(state, cfg, [range(0, 1), range(1, 4)])
    with pytest.raises(fxpp.FxppError, match="past --steps 1"):
        run_state.check_resumable(state, RunConfig(save_dir=str(tmp_path), steps=1), [range(0, 2), range(2, 4)])


def test_an_interrupted_save_is_never_resumed(tmp_path):
    with pytest.raises(fxpp.FxppError, match="no saved step to resume from"):
        run_state.read_state(str(tmp_path))
    (tmp_path / "step-000002").mkdir()
    (tmp_path / "step-000002" / "state.json").write_text(json.dumps({"step": 2}))
    (tmp_path / "step-000004").mkdir()  # files written, state.json not yet: interrupted
    assert run_state.latest_step(str(tmp_path)) == 2
    assert run_state.read_state(str(tmp_path))["step"] == 2


def test_resume_and_save_every_need_a_save_dir():
    with pytest.raises(fxpp.FxppError, match="--resume needs --save-dir"):
        RunConfig(resume=True).validate()
    with pytest.raises(fxpp.FxppError, match="--save-every 2 needs --save-dir"):
        RunConfig(save_every=2).validate()


def _shard_file(path, rows, total):
    from safetensors.torch import save_file

    from fxpp.runtime.checkpoint import SHARDS_KEY

    save_file({"weight": torch.zeros(rows[1] - rows[0], 3)}, str(path),
              metadata={"format": "pt", SHARDS_KEY: json.dumps({"weight": [rows[0], rows[1], total]})})


def test_a_shard_file_loads_only_into_its_own_shard(tmp_path):
    from fxpp.runtime.checkpoint import load_stage

    _shard_file(tmp_path / "shard.safetensors", (2, 4), 4)
    layer = torch.nn.Linear(3, 4, bias=False)  # the whole tensor, not a shard
    with pytest.raises(fxpp.CheckpointError, match=r"holds rows 2-4 of 4 of weight, but this stage's shard is the "
                                                   r"whole tensor"):
        load_stage(layer, str(tmp_path / "shard.safetensors"))


def test_export_refuses_shards_that_miss_rows(tmp_path):
    from safetensors.torch import save_file

    from fxpp.runtime.checkpoint import SHARDS_KEY

    step = tmp_path / "step-000001"
    step.mkdir()
    save_file({"w": torch.ones(2, 3)}, str(step / "stage-0.dp-0.safetensors"),
              metadata={"format": "pt", SHARDS_KEY: json.dumps({"w": [0, 2, 5]})})
    save_file({"w": torch.ones(2, 3)}, str(step / "stage-0.dp-1.safetensors"),
              metadata={"format": "pt", SHARDS_KEY: json.dumps({"w": [3, 5, 5]})})
    with pytest.raises(fxpp.CheckpointError, match=r"w: rows 2-3 of 5 are in no shard file"):
        run_state.whole_tensors(str(step))
    save_file({"w": torch.ones(2, 3), "b": torch.zeros(1)}, str(step / "stage-0.dp-1.safetensors"),
              metadata={"format": "pt", SHARDS_KEY: json.dumps({"w": [2, 5, 5]})})
    with pytest.raises(fxpp.CheckpointError, match=r"stage-0.dp-1.safetensors: w has 2 rows, its metadata says rows 2-5"):
        run_state.whole_tensors(str(step))
    save_file({"b": torch.ones(1)}, str(step / "stage-1.dp-0.safetensors"))
    save_file({"w": torch.ones(3, 3), "b": torch.zeros(1)}, str(step / "stage-0.dp-1.safetensors"),
              metadata={"format": "pt", SHARDS_KEY: json.dumps({"w": [2, 5, 5]})})
    with pytest.raises(fxpp.CheckpointError, match=r"b differs between .*stage-0.dp-1.* and .*stage-1.dp-0"):
        run_state.whole_tensors(str(step))

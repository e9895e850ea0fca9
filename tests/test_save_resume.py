"""The save directory's guards (fxpp.trainer.run_state): no silent resume or export of the wrong thing.

The end-to-end save / resume / export run is tests/test_walkthrough.py."""

import json

import pytest
import torch

import fxpp
from fxpp.trainer import run_state, save_reader, step_files
from fxpp.trainer.train import RunConfig


def test_resume_refuses_another_setting_and_names_it(tmp_path):
    cfg = RunConfig(save_dir=str(tmp_path), steps=4)
    state = {"step": 2, "settings": run_state.settings_of(cfg), "layer_ranges": [[0, 2], [2, 4]]}
    run_state.check_resumable(state, cfg, [range(0, 2), range(2, 4)])  # the same run: fine
    other = RunConfig(save_dir=str(tmp_path), steps=4, microbatches=2)
    with pytest.raises(fxpp.FxppError, match=r"saved with microbatches=4, this run has microbatches=2"):
        run_state.check_resumable(state, other, [range(0, 2), range(2, 4)])
    with pytest.raises(fxpp.FxppError, match=r"the saved stages own layers \[\[0, 2\], \[2, 4\]\]"):
        run_state.check_resumable(state, cfg, [range(0, 1), range(1, 4)])


def test_a_save_dir_holds_one_run(tmp_path):
    """A new run into a directory with saves is refused (export and resume would take the newest
    step of either run); a resume past --steps is refused; at --steps there is nothing to do."""
    (tmp_path / "step-000004").mkdir()
    state = {"step": 4, "files": {}, "settings": run_state.settings_of(RunConfig())}  # a step that lists no file
    (tmp_path / "step-000004" / "state.json").write_text(json.dumps(state))
    with pytest.raises(fxpp.FxppError, match=r"already holds a run \(saved at step 4\); continue it with --resume"):
        RunConfig(save_dir=str(tmp_path), steps=6).validate()
    with pytest.raises(fxpp.FxppError, match="the save in .* is at step 4, past --steps 3"):
        RunConfig(save_dir=str(tmp_path), steps=3, resume=True).validate()
    assert run_state.check_start(RunConfig(save_dir=str(tmp_path), steps=4, resume=True))["step"] == 4


def test_an_interrupted_save_is_never_resumed(tmp_path):
    with pytest.raises(fxpp.FxppError, match="no saved step to resume from"):
        step_files.read_state(str(tmp_path))
    (tmp_path / "step-000002").mkdir()
    (tmp_path / "step-000002" / "state.json").write_text(json.dumps({"step": 2}))
    (tmp_path / "step-000004").mkdir()  # files written, state.json not yet: interrupted
    assert step_files.latest_step(str(tmp_path)) == 2
    assert step_files.read_state(str(tmp_path))["step"] == 2


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
    files = [str(step / "stage-0.dp-0.safetensors"), str(step / "stage-0.dp-1.safetensors")]
    with pytest.raises(fxpp.CheckpointError, match=r"w: rows 2-3 of 5 are in no shard file"):
        save_reader.whole_tensors(str(step), files=files)
    save_file({"w": torch.ones(2, 3), "b": torch.zeros(1)}, str(step / "stage-0.dp-1.safetensors"),
              metadata={"format": "pt", SHARDS_KEY: json.dumps({"w": [2, 5, 5]})})
    with pytest.raises(fxpp.CheckpointError, match=r"stage-0.dp-1.safetensors: w has 2 rows, its metadata says rows 2-5"):
        save_reader.whole_tensors(str(step), files=files)
    save_file({"b": torch.ones(1)}, str(step / "stage-1.dp-0.safetensors"))
    save_file({"w": torch.ones(3, 3), "b": torch.zeros(1)}, str(step / "stage-0.dp-1.safetensors"),
              metadata={"format": "pt", SHARDS_KEY: json.dumps({"w": [2, 5, 5]})})
    with pytest.raises(fxpp.CheckpointError, match=r"b differs between .*stage-0.dp-1.* and .*stage-1.dp-0"):
        save_reader.whole_tensors(str(step), files=[*files, str(step / "stage-1.dp-0.safetensors")])


def _shard_rank(rank, world, workdir):
    """FSDP2 over 3 ranks: rows 5 (uneven: 2, 2, 1) and 1 (rank 0 holds every row, the others none)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fxpp.runtime.checkpoint import load_stage, save_stage

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.tall = torch.nn.Parameter(torch.randn(5, 3))
    module.row = torch.nn.Parameter(torch.randn(1, 4))
    whole = {k: v.detach().clone() for k, v in module.state_dict().items()}
    fully_shard(module, mesh=init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)))
    step = f"{workdir}/step-000001"
    if rank == 0:
        import os

        os.makedirs(step)
    dist.barrier()
    save_stage(module, f"{step}/stage-0.dp-{rank}.safetensors")
    dist.barrier()
    with torch.no_grad():
        for p in module.parameters():
            p.to_local().zero_()
    load_stage(module, f"{step}/stage-0.dp-{rank}.safetensors")  # each shard back into its own rows
    reloaded = {k: v.full_tensor() for k, v in module.state_dict().items()}
    if rank == 1:  # a shard file of another rank is refused by name
        try:
            load_stage(module, f"{step}/stage-0.dp-0.safetensors")
        except fxpp.CheckpointError as e:
            refused = str(e)
        else:
            refused = ""
    else:
        refused = None
    files = [f"{step}/stage-0.dp-{r}.safetensors" for r in range(world)]
    joined = save_reader.whole_tensors(step, files=files) if rank == 0 else None
    return whole, reloaded, joined, refused


@pytest.mark.timeout(120)
def test_per_shard_files_join_and_reload_with_uneven_and_single_row_shards(tmp_path):
    from tests.dist import run_distributed

    out = run_distributed(_shard_rank, 3, tmp_path)
    whole, _, joined, _ = out[0]
    for key, value in whole.items():
        assert torch.equal(joined[key], value), key
        for rank in range(3):
            assert torch.equal(out[rank][1][key], value), (rank, key)
    assert "holds rows 0-" in out[1][3] and "a per-shard checkpoint loads only into the same" in out[1][3]


def test_a_stages_own_name_wins_over_an_alias_in_another_file(tmp_path):
    from safetensors.torch import save_file

    from fxpp.runtime.checkpoint import load_stage

    save_file({"lm_head.weight": torch.full((3, 2), 7.0)}, str(tmp_path / "a.safetensors"))  # read first
    save_file({"embed.weight": torch.full((3, 2), 1.0)}, str(tmp_path / "b.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "a.safetensors", "embed.weight": "b.safetensors"}}))
    stage = torch.nn.Module()
    stage.embed = torch.nn.Embedding(3, 2)
    load_stage(stage, str(tmp_path), aliases={"embed.weight": ["lm_head.weight"]})
    assert torch.equal(stage.embed.weight.detach(), torch.full((3, 2), 1.0))


def test_a_header_whose_offsets_do_not_fit_the_shape_is_refused(tmp_path):
    from safetensors.torch import save_file

    from fxpp.runtime.checkpoint import load_stage

    path = tmp_path / "bad.safetensors"
    save_file({"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, str(path))
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["weight"]["shape"] = [1, 2]  # 8 bytes claimed, 16 stored
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    path.write_bytes(bytes(data[:8]) + text + bytes(data[8 + n:]))
    with pytest.raises(fxpp.CheckpointError, match=r"weight: 16 bytes stored for shape \[1, 2\] F32 \(8 bytes\)"):
        load_stage(torch.nn.Linear(2, 1), str(path))

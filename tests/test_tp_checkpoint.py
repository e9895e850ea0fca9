"""Tensor-parallel checkpoints (fxpp.runtime.tp_checkpoint): each rank reads and writes only its slices.

The fast test runs every rank of a tp mesh one after another in this process, on torch's
``fake`` process group (no communication: reading, saving and cutting a DTensor's local
part need none, Note [tensor parallel checkpoints]). It counts the bytes each rank reads
per key through a recording ``safe_open`` and checks every local part against torch's own
cut of the whole tensor (``distribute_tensor(src_data_rank=None)``). The heavy tests run
gloo ranks: pp 2 x tp 2 built from a checkpoint on the meta device against the unpatched
model, and ``fxpp run --tp 2 --save-dir`` resumed bit for bit and exported.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

import fxpp

TP = 2


class Recording:
    """``safe_open`` that counts the bytes each key's reads return (``get_slice(key)[...]``, ``get_tensor``)."""

    read: dict[str, int] = {}
    whole: list[str] = []  # keys read with get_tensor

    def __init__(self, *args, **kwargs):
        from safetensors import safe_open

        self._f = safe_open(*args, **kwargs)

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def keys(self):
        return self._f.keys()

    def metadata(self):
        return self._f.metadata()

    def get_tensor(self, key):
        t = self._f.get_tensor(key)
        Recording.whole.append(key)
        Recording.read[key] = Recording.read.get(key, 0) + t.numel() * t.element_size()
        return t

    def get_slice(self, key):
        stored = self._f.get_slice(key)

        class Slice:
            get_shape, get_dtype = stored.get_shape, stored.get_dtype

            def __getitem__(self, index):
                t = stored[index]
                Recording.read[key] = Recording.read.get(key, 0) + t.numel() * t.element_size()
                return t

        return Slice()


def _fake_rank(rank: int, world: int) -> None:
    """Become ``rank`` of a fake group. DTensor caches the output specs of its ops, meshes included, and a
    mesh equals the previous rank's (the same ranks and names), so the caches would hand back a mesh
    whose coordinate is the previous rank's: cleared first."""
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache
    from torch.testing._internal.distributed.fake_pg import FakeStore

    _clear_sharding_prop_cache()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _expected(whole: torch.Tensor, p) -> torch.Tensor:
    """torch's own cut of ``whole`` for ``p``'s placements (local, no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(p, DTensor):
        return whole
    return distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local()


def test_each_tp_rank_reads_only_its_slices_saves_its_parts_and_export_joins_them(tmp_path, monkeypatch):
    """Row (colwise, embedding), column (rowwise), packed (transformers' packed_colwise /
    packed_rowwise: _StridedShard) and FSDP2-over-tp (_StridedShard over dp then Shard over tp)
    parts: read with get_slice, byte for byte the part; saved as parts; a part of another rank
    refused; joined into the whole tensors."""
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard
    from transformers import AutoModelForCausalLM
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

    from fxpp.runtime import tp_checkpoint
    from fxpp.runtime.tensor_parallel import apply_tensor_parallel, stage_plan, tp_plan_of
    from fxpp.testing.zoo import tiny_model
    from fxpp.trainer.save_reader import whole_tensors

    monkeypatch.setattr(tp_checkpoint, "safe_open", Recording)
    source = tiny_model("llama", 2, tie_word_embeddings=False)
    source.save_pretrained(tmp_path / "ckpt")
    whole = {k: v.detach().clone() for k, v in source.state_dict().items()}
    torch.manual_seed(0)
    packed = {"gate_up.weight": torch.randn(12, 4), "down.weight": torch.randn(4, 12), "two_d.weight": torch.randn(8, 6),
              "cols.weight": torch.randn(8, 6)}
    save_file(packed, str(tmp_path / "packed.safetensors"))

    def packed_module(mesh):
        m = torch.nn.Module()
        with torch.device("meta"):
            m.gate_up, m.down = torch.nn.Linear(4, 12, bias=False), torch.nn.Linear(12, 4, bias=False)
            m.two_d, m.cols = torch.nn.Linear(6, 8, bias=False), torch.nn.Linear(6, 8, bias=False)
        ALL_PARALLEL_STYLES["packed_colwise"].shard_param(m.gate_up, "weight", mesh["tp"])
        ALL_PARALLEL_STYLES["packed_rowwise"].shard_param(m.down, "weight", mesh["tp"])
        for lin, placements in ((m.two_d, [_StridedShard(0, split_factor=TP), Shard(0)]), (m.cols, [Shard(0), Shard(1)])):
            lin.weight = torch.nn.Parameter(distribute_tensor(lin.weight, mesh, placements, src_data_rank=None))
        return m.to_empty(device="cpu")

    parts = tmp_path / "step"
    parts.mkdir()
    files, packed_files, refused = [], [], None
    for rank in range(2 * TP):  # mesh (dp 2, tp 2): the llama stage on dp rank 0's tp ranks only
        _fake_rank(rank, 2 * TP)
        try:
            mesh = init_device_mesh("cpu", (2, TP), mesh_dim_names=("dp", "tp"))
            dp, tp = divmod(rank, TP)
            Recording.read, Recording.whole = {}, []
            m = packed_module(mesh)
            tp_checkpoint.load_tp_stage(m, str(tmp_path / "packed.safetensors"))
            for key, p in m.named_parameters():
                assert torch.equal(_local(p), _expected(packed[key], p)), (rank, key)
                assert Recording.read[key] == _local(p).numel() * 4 < packed[key].numel() * 4, (rank, key)
            # transformers' packed meaning: rank t holds block t of each of the two packed halves
            gate, up = packed["gate_up.weight"].chunk(2)
            assert torch.equal(_local(m.gate_up.weight), torch.cat([gate.chunk(TP)[tp], up.chunk(TP)[tp]]))
            assert torch.equal(_local(m.two_d.weight), packed["two_d.weight"].chunk(TP)[tp].chunk(2)[dp])
            packed_files.append(str(parts / f"packed.tp-{rank}.safetensors"))
            tp_checkpoint.save_tp_stage(m, packed_files[-1])
            if dp:
                continue
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(source.config)
            apply_tensor_parallel(model, stage_plan(tp_plan_of(model), model), mesh["tp"], model.config)
            model.to_empty(device="cpu")
            Recording.read, Recording.whole = {}, []
            tp_checkpoint.load_tp_stage(model, str(tmp_path / "ckpt"))
            sharded = 0
            for key, p in model.named_parameters():
                local = _local(p)
                assert torch.equal(local, _expected(whole[key], p)), (rank, key)
                assert Recording.read[key] == local.numel() * local.element_size(), (rank, key, Recording.read[key])
                sharded += local.numel() < whole[key].numel()
            assert sharded == 2 + 7 * 2 and not Recording.whole  # embedding, head, 7 linears a layer
            files.append(str(parts / f"stage-0.dp-0.tp-{tp}.safetensors"))
            tp_checkpoint.save_tp_stage(model, files[-1])
            with torch.no_grad():
                for p in model.parameters():
                    _local(p).zero_()
            tp_checkpoint.load_tp_stage(model, files[-1])  # each part back into its own rank
            assert all(torch.equal(_local(p), _expected(whole[k], p)) for k, p in model.named_parameters())
            if tp == 1:  # tp rank 0's file on tp rank 1: refused by name
                with pytest.raises(fxpp.CheckpointError, match=r"holds part \[0:64\] x \[0:64\] of lm_head\.weight "
                                   r"\[128, 64\], but this rank's part is \[64:128\] x \[0:64\] of \[128, 64\]"):
                    tp_checkpoint.load_tp_stage(model, files[0])
                refused = True
        finally:
            dist.destroy_process_group()
    assert refused
    joined = whole_tensors(str(parts), files=files)
    assert joined.keys() == whole.keys() and all(torch.equal(joined[k], v) for k, v in whole.items())
    joined = whole_tensors(str(parts), files=packed_files)
    assert all(torch.equal(joined[k], v) for k, v in packed.items())
    with pytest.raises(fxpp.CheckpointError, match=r"cols\.weight: the tp parts in .* \(\[0:4\] x \[0:3\]\) hold 12 of "
                       r"its 48 elements \[8, 6\]; a rank's stage file is missing"):
        whole_tensors(str(parts), files=packed_files[:1])


# --- heavy: gloo ranks ----------------------------------------------------------------------------------------


def _from_checkpoint_rank(rank, world, workdir, config):
    """pp 2 x tp 2 built on the meta device from a checkpoint, each read counted, then trained against
    the unpatched model (tests/test_tensor_parallel.run_config)."""
    from fxpp.runtime import tp_checkpoint

    from .test_tensor_parallel import PP, run_config

    tp_checkpoint.safe_open = Recording  # this process only
    mesh = fxpp.pp_dp_tp_mesh(PP, 1, TP)
    report = run_config(mesh, config, checkpoint=os.path.join(workdir, "ckpt"))
    return {**report, "read": dict(Recording.read), "get_tensor": list(Recording.whole)}


@pytest.mark.heavy  # 4 gloo ranks
@pytest.mark.timeout(600)
def test_pp2_tp2_from_a_meta_model_reads_only_slices_and_matches_the_unpatched_model(tmp_path):
    from fxpp.testing.zoo import tiny_model

    from .dist import run_distributed
    from .test_tensor_parallel import CONFIGS, PP, check_report

    config = CONFIGS[0]  # llama, GQA, tied embeddings: the last stage reads lm_head under its alias
    tiny_model(config.family, 4, tie_word_embeddings=config.tie).save_pretrained(tmp_path / "ckpt")
    runs = run_distributed(_from_checkpoint_rank, PP * TP, tmp_path, config, timeout_s=540, pg_timeout_s=120)
    check_report(runs, tied=config.tie)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        stored = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    for rank, r in enumerate(runs):
        assert not r["get_tensor"], (rank, r["get_tensor"])
        # The gradient hooks installed after allocation (to_empty drops those installed on meta).
        assert all(r["grad_placements"][n] == r["placements"][n] for n in r["grad_placements"]), r["grad_placements"]
        for name, shape in r["local_shapes"].items():
            key = "model.embed_tokens.weight" if name == "lm_head.weight" and config.tie else name
            local, whole = torch.Size(shape).numel() * 4, torch.Size(stored[key]).numel() * 4
            assert r["read"][key] == local, (rank, name, r["read"][key], local)  # its part, byte for byte
            assert r["placements"][name] == "None" or local < whole, (rank, name)


@pytest.mark.heavy  # three full fxpp runs on 4 processes
@pytest.mark.timeout(900)
def test_fxpp_run_tp_saves_resumes_bit_for_bit_and_exports(tmp_path, capsys):
    """pp 2 x tp 2 on a tied checkpoint folder: 4 steps saved at 2 and 4; the same run resumed from
    step 2 ends with the same losses and the same tensors in every stage and optimizer file of step 4
    (AdamW's DTensor states included); fxpp export joins the tp parts into what from_pretrained loads."""
    import shutil

    from transformers import AutoModelForCausalLM

    from fxpp.testing.checkpoint_dir import write_checkpoint
    from fxpp.trainer.cli import main
    from fxpp.trainer.metrics import read_metrics
    from fxpp.trainer.save_reader import whole_tensors
    from fxpp.trainer.step_files import step_dir

    source = str(tmp_path / "my-model")
    write_checkpoint(source, num_layers=4, tie=True)
    flags = [source, "--stages", "2", "--tp", "2", "--batch", "4", "--microbatches", "2", "--seq-len", "8",
             "--lr", "1e-2", "--weight-decay", "0.1", "--no-check", "--log-every", "1"]
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(["run", *flags, "--steps", "4", "--save-every", "2", "--save-dir", straight]) == 0, capsys.readouterr()
    shutil.copytree(straight, resumed)
    shutil.rmtree(step_dir(resumed, 4))
    with open(os.path.join(resumed, "metrics.jsonl"), "w") as f:  # the resumed run's own metrics only
        f.write("")
    assert main(["run", *flags, "--steps", "4", "--save-dir", resumed, "--resume"]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "steps 3-4 (resumed)" in out, out
    a, b = read_metrics(os.path.join(straight, "metrics.jsonl")), read_metrics(os.path.join(resumed, "metrics.jsonl"))
    assert [r["step"] for r in b] == [3, 4]
    assert [r["loss"] for r in a[2:]] == [r["loss"] for r in b], (a, b)  # exactly
    with open(os.path.join(step_dir(straight, 4), "state.json")) as f:
        files = json.load(f)["files"]
    assert "stage-1.dp-0.tp-1.safetensors" in files and "optimizer.pp-0.dp-0.tp-1.safetensors" in files, files
    with open(os.path.join(step_dir(resumed, 4), "state.json")) as f:
        again = json.load(f)["files"]
    assert again.keys() == files.keys() and all(again[n]["size"] == files[n]["size"] for n in files)
    # Every tensor and metadata entry of every stage and optimizer file, bit for bit. (Not the files'
    # sha256: safetensors writes its metadata in a per-process random order, a Rust HashMap's.)
    from safetensors import safe_open

    for name in files:
        with safe_open(os.path.join(step_dir(straight, 4), name), "pt") as f, \
                safe_open(os.path.join(step_dir(resumed, 4), name), "pt") as g:
            assert f.metadata() == g.metadata() and sorted(f.keys()) == sorted(g.keys()), name
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                assert torch.equal(f.get_tensor(key), g.get_tensor(key)), (name, key)
    assert main(["export", straight, str(tmp_path / "out")]) == 0, capsys.readouterr()
    trained = whole_tensors(step_dir(straight, 4))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert trained.keys() - {"lm_head.weight"} <= exported.keys()
    assert all(torch.equal(exported[k], v) for k, v in trained.items()), "export differs from the joined save"

"""Stages built on the meta device from a real (sharded) transformers checkpoint directory."""

import pytest
import torch


def _tiny_dir(path, tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(3)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True, max_shard_size="20KB")
    return cfg


@pytest.mark.timeout(90)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_meta_stages_from_a_sharded_directory_equal_from_pretrained(tmp_path, tie):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import fxpp
    from fxpp.trainer.models import build_model

    _tiny_dir(tmp_path, tie)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    try:
        meta = build_model(str(tmp_path), device="meta")
        pipe = fxpp.pipeline(meta, 2)
        stages = [pipe.build_stage(i, torch.device("cpu"), checkpoint=str(tmp_path), style="loop") for i in range(2)]
        ids = torch.randint(0, 64, (2, 7))
        first, last = (s.submod.eval() for s in stages)
        out = last(*first(input_ids=ids))
        torch.testing.assert_close(out, ref(input_ids=ids, use_cache=False).logits, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(90)
def test_a_key_missing_from_the_sharded_index_is_a_checkpoint_error(tmp_path):
    import json

    import torch.distributed as dist

    import fxpp
    from fxpp.trainer.models import build_model

    _tiny_dir(tmp_path, False)
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    assert len(set(data["weight_map"].values())) > 1  # several shards
    del data["weight_map"]["model.layers.3.mlp.down_proj.weight"]
    index.write_text(json.dumps(data))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    try:
        pipe = fxpp.pipeline(build_model(str(tmp_path), device="meta"), 2)
        with pytest.raises(fxpp.CheckpointError, match=r"model.layers.3.mlp.down_proj.weight"):
            pipe.build_stage(1, torch.device("cpu"), checkpoint=str(tmp_path), style="loop")
    finally:
        dist.destroy_process_group()


def _shard_rank(rank, world, workdir, path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    from fxpp.runtime.checkpoint import load_sharded

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    load_sharded(model, path)
    for sub in model.modules():  # non-persistent buffers (rotary inv_freq) are recomputed, not read
        if sub._non_persistent_buffers_set:
            model._init_weights(sub)
    ref = AutoModelForCausalLM.from_pretrained(path)
    want = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        full = p.full_tensor()
        assert torch.equal(full, want[name]), name
    return sorted(n for n, p in model.named_parameters() if p.to_local().shape[0] < p.shape[0])


@pytest.mark.timeout(120)
def test_fsdp2_shards_read_only_their_rows(tmp_path):
    from tests.dist import run_distributed

    _tiny_dir(tmp_path / "ckpt", False)
    out = run_distributed(_shard_rank, 2, tmp_path, str(tmp_path / "ckpt"), timeout_s=100)
    assert out[0] and out[0] == out[1]

"""A checkpoint folder is data from elsewhere: fxpp opens only regular files inside it, reads no
header above safetensors' own limit, imports none of its code and never asks on stdin.

Each bad case is built in ``tmp_path`` from tiny safetensors files and indexes; every loader
(``load_state_dict_from``, ``load_stage``, ``key_files``, ``stored_shapes``) must refuse it
with a ``CheckpointError`` naming the index and the key (or the file).
"""

from __future__ import annotations

import builtins
import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

from fxpp.errors import CheckpointError, DataError, ModelSourceError
from fxpp.runtime import checkpoint
from fxpp.runtime.checkpoint import MAX_HEADER_BYTES, key_files, load_stage, load_state_dict_from, stored_shapes

LOADERS = {
    "load_state_dict_from": lambda path: load_state_dict_from(path),
    "load_stage": lambda path: load_stage(torch.nn.Linear(2, 3), path),
    "key_files": key_files,
    "stored_shapes": stored_shapes,
}
INDEX = "model.safetensors.index.json"


def _folder(tmp_path, bad_name: str) -> str:
    """A checkpoint folder whose index maps ``bias`` to ``bad_name`` (``weight`` to a good file)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"weight": torch.ones(3, 2)}, str(folder / "a.safetensors"))
    (folder / INDEX).write_text(json.dumps({"weight_map": {"weight": "a.safetensors", "bias": bad_name}}))
    return str(folder)


def _outside(tmp_path) -> str:
    save_file({"bias": torch.ones(3)}, str(tmp_path / "outside.safetensors"))
    return str(tmp_path / "outside.safetensors")


def _absolute(tmp_path):
    return _folder(tmp_path, _outside(tmp_path)), "is an absolute path"


def _dotdot(tmp_path):
    _outside(tmp_path)
    return _folder(tmp_path, "../outside.safetensors"), "has a '..' component"


def _dotdot_inside(tmp_path):  # even one that would land back inside the folder
    return _folder(tmp_path, "sub/../a.safetensors"), "has a '..' component"


def _symlink_out(tmp_path):
    folder = _folder(tmp_path, "b.safetensors")
    os.symlink(_outside(tmp_path), os.path.join(folder, "b.safetensors"))
    return folder, "is a symlink to .*outside.safetensors, outside"


def _symlinked_subfolder(tmp_path):
    folder = _folder(tmp_path, "sub/outside.safetensors")
    _outside(tmp_path)
    os.symlink(str(tmp_path), os.path.join(folder, "sub"))
    return folder, "is a symlink to .*outside.safetensors, outside"


def _fifo(tmp_path):
    folder = _folder(tmp_path, "b.safetensors")
    os.mkfifo(os.path.join(folder, "b.safetensors"))
    return folder, "is a fifo, not a regular file"


def _directory(tmp_path):
    folder = _folder(tmp_path, "b.safetensors")
    os.mkdir(os.path.join(folder, "b.safetensors"))
    return folder, "is a directory, not a regular file"


def _missing(tmp_path):
    return _folder(tmp_path, "b.safetensors"), "cannot be read in"


BAD = {f.__name__[1:]: f for f in (_absolute, _dotdot, _dotdot_inside, _symlink_out, _symlinked_subfolder, _fifo,
                                   _directory, _missing)}


@pytest.mark.timeout(30)  # a fifo opened for reading would block: the timeout turns that into a failure
@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("case", sorted(BAD))
def test_an_index_entry_outside_the_folder_or_not_a_regular_file_is_refused_by_name(tmp_path, case, loader):
    folder, message = BAD[case](tmp_path)
    with pytest.raises(CheckpointError, match=message) as info:
        LOADERS[loader](folder)
    text = str(info.value)
    assert f"{os.path.join(folder, INDEX)}: bias: " in text, text  # the index and the key
    assert "\n" not in text


def test_a_hub_cache_snapshot_links_into_its_blobs_and_loads(tmp_path):
    """huggingface_hub stores every file of REPO/snapshots/REV as a link to REPO/blobs/SHA."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    save_file({"weight": torch.full((3, 2), 2.0), "bias": torch.ones(3)}, str(repo / "blobs" / "f00d"))
    (repo / "blobs" / "beef").write_text(json.dumps({"weight_map": {"weight": "model.safetensors",
                                                                    "bias": "model.safetensors"}}))
    os.symlink("../../blobs/f00d", snapshot / "model.safetensors")
    os.symlink("../../blobs/beef", snapshot / INDEX)
    assert torch.equal(load_state_dict_from(str(snapshot))["weight"], torch.full((3, 2), 2.0))
    (tmp_path / "elsewhere").mkdir()  # a link anywhere else from a snapshot is still refused
    save_file({"bias": torch.ones(3)}, str(tmp_path / "elsewhere" / "x"))
    os.remove(snapshot / "model.safetensors")
    os.symlink(str(tmp_path / "elsewhere" / "x"), snapshot / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"bias: 'model.safetensors' is a symlink to .*elsewhere/x, outside"):
        load_state_dict_from(str(snapshot))


@pytest.mark.timeout(30)
def test_a_single_file_checkpoint_that_is_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.safetensors' is a fifo, not a regular file"):
        load_state_dict_from(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"model.safetensors: is a fifo, not a safetensors file"):
        load_state_dict_from(str(tmp_path / "model.safetensors"))  # named directly
    with pytest.raises(CheckpointError, match=r"model.safetensors: is a fifo, not a safetensors file"):
        checkpoint.safetensors_header(str(tmp_path / "model.safetensors"))


def test_a_header_above_100_mb_is_refused_by_name_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    n = MAX_HEADER_BYTES + 8
    with open(path, "wb") as f:
        f.write(n.to_bytes(8, "little"))
        f.truncate(8 + n + 16)  # sparse: a header that would fit the file
    reads = []
    real_loads = json.loads
    monkeypatch.setattr(checkpoint.json, "loads", lambda text, *a, **k: reads.append(len(text)) or real_loads(text))
    for read in (checkpoint.safetensors_header, stored_shapes, lambda p: load_stage(torch.nn.Linear(2, 3), p)):
        with pytest.raises(CheckpointError, match=rf"model.safetensors: cannot read as safetensors: a header of {n} bytes, "
                                                  rf"above safetensors' own limit of 100000000 bytes \(100 MB\); not read"):
            read(str(path))
    assert not reads, "the header was parsed"


def test_index_entries_that_are_no_file_names_are_refused(tmp_path):
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"weight": ["a.safetensors"]}}))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not a safetensors index"):
        load_state_dict_from(str(tmp_path))


# ----- no remote code, no prompt -------------------------------------------------------------

EVIL = "import pathlib\npathlib.Path(__file__).with_name('IMPORTED').write_text('ran')\n"


@pytest.fixture
def no_stdin(monkeypatch, tmp_path):
    """stdin closed, and input() fails the test: loading must neither prompt nor read stdin."""
    closed = open(tmp_path / "stdin", "w+")  # noqa: SIM115 - closed right away
    closed.close()
    monkeypatch.setattr(sys, "stdin", closed)
    prompts = []

    def no_input(prompt=""):
        prompts.append(prompt)
        raise AssertionError(f"fxpp prompted on stdin: {prompt!r}")

    monkeypatch.setattr(builtins, "input", no_input)
    return prompts


def _custom_code_folder(tmp_path, model_type: str) -> str:
    """A tiny llama checkpoint whose config and tokenizer name custom code (auto_map) that would
    leave a file ``IMPORTED`` next to it if it ran."""
    from fxpp.testing.checkpoint_dir import write_checkpoint

    folder = tmp_path / "custom"
    write_checkpoint(str(folder), num_layers=2)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                   "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(EVIL)
    return str(folder)


def test_a_known_model_type_with_auto_map_loads_transformers_own_class(tmp_path, no_stdin):
    from transformers import LlamaForCausalLM

    from fxpp.trainer.data import load_tokenizer
    from fxpp.trainer.models import build_model

    folder = _custom_code_folder(tmp_path, "llama")
    assert type(build_model(folder)) is LlamaForCausalLM
    assert type(build_model(folder, device="meta")) is LlamaForCausalLM
    try:
        load_tokenizer(folder)  # a plain load, or a one-line refusal
    except DataError as e:
        assert "\n" not in str(e)
    assert not os.path.exists(os.path.join(folder, "IMPORTED")) and not no_stdin


def test_an_unknown_model_type_with_auto_map_is_refused_in_one_line(tmp_path, no_stdin, capsys):
    from fxpp.trainer.cli import main
    from fxpp.trainer.models import build_model

    folder = _custom_code_folder(tmp_path, "evil")
    message = (r"config.json: model_type 'evil' is not a model type of transformers and names custom code "
               r"\(auto_map\), which fxpp never runs; fxpp loads models of transformers' own classes only "
               r"\(trust_remote_code=False\)")
    with pytest.raises(ModelSourceError, match=message):
        build_model(folder, device="meta")
    capsys.readouterr()
    assert main(["plan", folder, "--stages", "2"]) == 2
    err = capsys.readouterr().err
    assert "model_type 'evil' is not a model type of transformers" in err and len(err.splitlines()) == 2, err
    assert not os.path.exists(os.path.join(folder, "IMPORTED")) and not no_stdin

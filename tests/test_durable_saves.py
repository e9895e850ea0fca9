"""Saves that survive faults (fxpp.trainer.run_state, fxpp.runtime.durable): each fault made to happen.

The fast tests save small stand-in stages (one ``nn.Linear`` per rank, AdamW) with the
trainer's own ``run_state.save`` on 2 gloo ranks, damage the save, and resume with the
trainer's own ``run_state.choose_resume``; the pre-launch refusals go through
``fxpp run``'s ``main``. One heavy test runs ``fxpp run`` itself: damaged newest step,
``--resume`` from the one before, export with an unlisted file in the step.

The ranks import this module: it imports only ``run_state`` at the top (the trainer's
command line and ``RunConfig`` inside the tests), and the ranks get their settings as
``asdict(RunConfig(...))``; one 2-rank run makes every save the resume, keep-last and
export tests look at.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import time
from contextlib import redirect_stdout
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from transformers import PretrainedConfig

import fxpp
from fxpp.errors import DamagedSaveError
from fxpp.testing.checkpoint_dir import write_documents, write_tokenizer
from fxpp.trainer import export as export_module
from fxpp.trainer import run_state, save_reader, step_files
from fxpp.trainer.data import DataPosition
from tests.dist import run_distributed


def _config(**settings):
    """``RunConfig`` and its defaults (imported in the test process only: the ranks get a namespace)."""
    from fxpp.trainer.train import RunConfig  # the trainer's job module: slow to import in every rank

    return asdict(RunConfig(**settings))


def _ns(settings: dict) -> SimpleNamespace:
    settings = {k: v for k, v in settings.items() if k != "resuming"}
    return SimpleNamespace(**settings, resuming=settings["resume"] or settings["resume_step"] is not None)


def _save_steps(cfg, steps, rank: int) -> None:
    """This rank's stand-in stage (stage ``rank``) trained one AdamW step per saved step, saved each time."""
    torch.manual_seed(rank)
    stage = SimpleNamespace(submod=torch.nn.ModuleDict({f"layer{rank}": torch.nn.Linear(4, 4)}), stage_index=rank)
    opt = torch.optim.AdamW(stage.submod.parameters(), lr=0.1)
    prints = step_files.fingerprints(cfg) if rank == 0 else None
    for step in steps:
        stage.submod[f"layer{rank}"](torch.ones(1, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        run_state.save(cfg, step, [stage], opt, pp_rank=rank, dp_rank=0, position=DataPosition(0, step),
                       layer_ranges=[range(0, 2), range(2, 4)], model_config=PretrainedConfig(),
                       device=torch.device("cpu"), prints=prints)


def _stage1(save, step):
    return os.path.join(save, f"step-{step:06d}", "stage-1.dp-0.safetensors")


def _truncate(path, keep=100):
    with open(path, "r+b") as f:
        f.truncate(keep)


def _flip_a_byte(path):
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF  # a tensor byte: same size, other contents
    open(path, "wb").write(bytes(data))


# Each damage, done by rank 0 to a copy of the 3-step save, with the resume's settings.
_CASES = {
    "truncated": (lambda s: _truncate(_stage1(s, 3)), {}),
    "flipped": (lambda s: _flip_a_byte(_stage1(s, 3)), {}),
    "no_state": (lambda s: os.remove(os.path.join(s, "step-000003", "state.json")), {}),
    "older": (lambda s: None, {"resume_step": 1}),
    "damaged_pick": (lambda s: _flip_a_byte(_stage1(s, 2)), {"resume_step": 2}),
    "no_such_step": (lambda s: None, {"resume_step": 7}),
    "edited_data": (lambda s: open(os.path.join(os.path.dirname(s), "docs.txt"), "a").write("far away\n"), {}),
}


def _saves(rank, world, workdir, settings):
    """Every save the fast tests look at: the resume cases, keep-last, one step to export."""
    out = _resume_cases(rank, workdir, settings)
    _keep_last(rank, workdir, settings)
    _save_steps(_ns({**settings, "save_dir": os.path.join(workdir, "export")}), [1], rank)
    return out


def _resume_cases(rank, workdir, settings):
    base = os.path.join(workdir, "base")
    cfg = _ns({**settings, "save_dir": base, "data": [os.path.join(workdir, "docs.txt")]})
    _save_steps(cfg, [1, 2, 3], rank)
    out = {}
    for name, (damage, overrides) in _CASES.items():  # in order: the data file is edited last
        save = os.path.join(workdir, name)
        if rank == 0:
            shutil.copytree(base, save)
            damage(save)
        dist.barrier()
        resume = _ns({**vars(cfg), "save_dir": save, "resume": True, **overrides})
        printed = io.StringIO()
        try:
            with redirect_stdout(printed):
                prints = step_files.fingerprints(resume) if rank == 0 else None
                chosen = run_state.choose_resume(resume, step_files.own_files([rank], rank, 0), prints)["step"]
        except fxpp.FxppError as e:
            chosen = f"{type(e).__name__}: {e}"
        out[name] = (chosen, printed.getvalue())
    return out


@pytest.fixture(scope="module")
def saves(tmp_path_factory):
    """The folder of every save, and per rank ``{case: (the step chosen or the error, what rank 0
    printed)}`` (one 2-rank run for all)."""
    workdir = tmp_path_factory.mktemp("saves")
    write_documents(str(workdir / "docs.txt"), count=5)
    return run_distributed(_saves, 2, workdir, _config(steps=3), timeout_s=240), workdir



@pytest.mark.timeout(300)
def test_a_truncated_file_of_the_newest_step_falls_back_and_says_why(saves):
    (r0, r1), workdir = saves
    assert r0["truncated"][0] == r1["truncated"][0] == 2
    path = workdir / "truncated" / "step-000003" / "stage-1.dp-0.safetensors"
    assert f"resuming from step 2 of {workdir / 'truncated'}; skipped step 3: {path} has 100 bytes, its state.json " \
           "lists" in r0["truncated"][1]


@pytest.mark.timeout(300)
def test_a_changed_byte_is_found_by_the_rank_that_reads_the_file(saves):
    """Same size, other contents: only the checksum sees it, and only rank 1 (whose file it is) reads it."""
    (r0, r1), workdir = saves
    assert r0["flipped"][0] == r1["flipped"][0] == 2
    assert "skipped step 3: " in r0["flipped"][1] and "stage-1.dp-0.safetensors: its sha256 differs" in r0["flipped"][1]


@pytest.mark.timeout(300)
def test_a_step_without_state_json_is_skipped_and_named(saves):
    (r0, r1), _ = saves
    assert r0["no_state"][0] == r1["no_state"][0] == 2
    assert "skipped step 3: " in r0["no_state"][1] and "state.json is missing: the save of this step was " \
           "interrupted" in r0["no_state"][1]


@pytest.mark.timeout(300)
def test_resume_step_picks_an_older_step(saves):
    (r0, r1), _ = saves
    assert r0["older"][0] == r1["older"][0] == 1
    assert r0["older"][1].startswith("resuming from step 1 of")


@pytest.mark.timeout(300)
def test_resume_step_of_a_damaged_step_refuses_naming_the_file(saves):
    (r0, r1), workdir = saves
    path = workdir / "damaged_pick" / "step-000002" / "stage-1.dp-0.safetensors"
    for chosen, _ in (r0["damaged_pick"], r1["damaged_pick"]):  # both ranks, the same error
        assert chosen == f"DamagedSaveError: --resume-step 2: {path}: its sha256 differs from the one its " \
                         "state.json lists (changed or damaged since the save)"
    assert r0["no_such_step"][0].startswith("SaveDirError: --resume-step 7: ") and "does not exist" in \
        r0["no_such_step"][0]


@pytest.mark.timeout(300)
def test_an_edited_data_file_refuses_resume_naming_it(saves):
    (r0, r1), workdir = saves
    message = f"--resume: --data {workdir / 'docs.txt'} changed since step 3 was saved: it has "
    assert r0["edited_data"][0].startswith(f"SaveDirError: {message}"), r0["edited_data"][0]
    # the other rank stops with rank 0's error, not at a barrier
    assert r1["edited_data"][0].startswith(f"PeerFailedError: --resume: choosing the step: rank 0 failed: "
                                           f"SaveDirError: {message}"), r1["edited_data"][0]


def _keep_last(rank, workdir, settings):
    for keep in (1, 2):
        save = os.path.join(workdir, f"keep{keep}")
        if rank == 0:
            os.makedirs(os.path.join(save, "step-000000"))  # an older interrupted save: pruned too
        dist.barrier()
        _save_steps(_ns({**settings, "save_dir": save, "steps": 5, "keep_last": keep}), [1, 2, 3, 4, 5], rank)


@pytest.mark.timeout(300)
def test_keep_last_leaves_exactly_k_complete_steps(saves):
    _, tmp_path = saves
    assert sorted(p.name for p in (tmp_path / "keep1").glob("step-*")) == ["step-000005"]
    assert sorted(p.name for p in (tmp_path / "keep2").glob("step-*")) == ["step-000004", "step-000005"]
    for step in (tmp_path / "keep2").glob("step-*"):
        state = json.loads((step / "state.json").read_text())
        step_files.check_files(str(step), state)  # whole, as listed
        assert sorted(state["files"]) == ["optimizer.pp-0.dp-0.safetensors", "optimizer.pp-1.dp-0.safetensors",
                                          "stage-0.dp-0.safetensors", "stage-1.dp-0.safetensors"]
    assert not list((tmp_path / "keep2").rglob(".*.tmp-*")), "no temporary file is left"


def _fail_on_rank1(rank, world, workdir, phase, settings):
    """Rank 1 fails in ``phase``: its save cannot write (a full disk), or its load finds its file cut short."""
    import fxpp.runtime.checkpoint as checkpoint  # patched in this rank's process only

    cfg = _ns({**settings, "save_dir": os.path.join(workdir, "run")})
    if phase == "save" and rank == 1:
        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        checkpoint.save_file = full_disk
    if phase == "load":
        _save_steps(cfg, [1], rank)
        if rank == 1:
            _truncate(os.path.join(cfg.save_dir, "step-000001", "optimizer.pp-1.dp-0.safetensors"))
    with open(os.path.join(workdir, f"t0-{rank}"), "w") as f:
        f.write(repr(time.time()))
    if phase == "save":
        _save_steps(cfg, [1], rank)
    else:
        stage = SimpleNamespace(submod=torch.nn.ModuleDict({f"layer{rank}": torch.nn.Linear(4, 4)}), stage_index=rank)
        opt = torch.optim.AdamW(stage.submod.parameters())
        state = step_files.read_state(cfg.save_dir, 1)
        run_state.load(cfg, state, [stage], opt, pp_rank=rank, dp_rank=0, device=torch.device("cpu"))


@pytest.mark.heavy  # two 2-rank spawns: the README's second test command
@pytest.mark.timeout(180)
@pytest.mark.parametrize("phase", ["save", "load"])
def test_one_rank_failing_to_save_or_load_ends_both_with_its_message(tmp_path, phase):
    pg_timeout = 120
    results = run_distributed(_fail_on_rank1, 2, tmp_path, phase, _config(steps=1), pg_timeout_s=pg_timeout,
                              expect_ok=False)
    ended = time.time()
    assert not results[0]["ok"] and not results[1]["ok"]
    own, peer = results[1]["error"], results[0]["error"]
    if phase == "save":
        path = tmp_path / "run" / "step-000001" / "stage-1.dp-0.safetensors"
        assert own == f"SaveIOError: {path}: cannot be written (OSError: [Errno 28] No space left on device)"
        assert peer == f"PeerFailedError: saving step 1 to {tmp_path / 'run' / 'step-000001'}: rank 1 failed: {own}"
        assert not (tmp_path / "run" / "step-000001" / "state.json").exists(), "a failed save is never complete"
    else:
        assert own.startswith("CheckpointError: ") and "optimizer.pp-1.dp-0.safetensors" in own, own
        assert peer == f"PeerFailedError: loading step 1 from {tmp_path / 'run' / 'step-000001'}: rank 1 failed: {own}"
    started = min(float((tmp_path / f"t0-{r}").read_text()) for r in range(2))
    assert ended - started < pg_timeout / 4, "the ranks waited for the process group's timeout"


@pytest.mark.timeout(300)
def test_export_reads_only_listed_files_and_refuses_a_damaged_one(saves, tmp_path):
    """A stage file left in the step folder and not in its state.json is never read; a listed file
    whose bytes changed is refused by name."""
    shutil.copytree(saves[1] / "export", tmp_path / "run")
    step = tmp_path / "run" / "step-000001"
    expected = save_reader.whole_tensors(str(step))
    torch.save({}, step / "stage-7.dp-0.safetensors")  # not even safetensors: reading it would fail
    shutil.copy(step / "stage-0.dp-0.safetensors", step / "stage-0.dp-1.safetensors")
    _flip_a_byte(step / "stage-0.dp-1.safetensors")  # another copy of stage 0's tensors: read, it would clash
    assert save_reader.whole_tensors(str(step)).keys() == expected.keys()
    _flip_a_byte(step / "stage-0.dp-0.safetensors")
    with pytest.raises(DamagedSaveError, match=r"step 1: .*step-000001/stage-0.dp-0.safetensors: its sha256 differs"):
        export_module.export(str(tmp_path / "run"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make", ["a file", "under a file", "full"])
def test_an_unusable_save_dir_is_refused_before_any_rank_starts(tmp_path, capsys, monkeypatch, make):
    from fxpp.trainer.cli import main

    (tmp_path / "file").write_text("")
    save = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "run", "full": tmp_path / "run"}[make]
    if make == "full":  # the disk fills up: writing works until the data must reach it
        def no_space(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "fsync", no_space)
    assert main(["run", "tiny-llama", "--steps", "1", "--save-dir", str(save)]) == 2
    err = capsys.readouterr().err
    assert f"fxpp: error: --save-dir {save}: cannot write there (" in err, err
    assert err.count("\n") == 2 and "rank" not in err, err  # one line and the hint, from the launcher
    assert not list(tmp_path.rglob(".fxpp-write-probe-*"))


def test_an_edited_data_or_tokenizer_file_is_refused_before_any_rank_starts(tmp_path, capsys):
    """Pre-launch: the saved fingerprints against the files as they are now (data, tokenizer, config)."""
    from fxpp.testing.zoo import tiny_model
    from fxpp.trainer.cli import main
    from fxpp.trainer.train import RunConfig

    model = tmp_path / "model"
    write_tokenizer(str(model))
    tiny_model("llama", 4).save_pretrained(model)
    docs = tmp_path / "docs.txt"
    write_documents(str(docs), count=5)
    save = tmp_path / "run"
    cfg = RunConfig(model=str(model), data=[str(docs)], save_dir=str(save), steps=3)
    (save / "step-000002").mkdir(parents=True)
    state = {"step": 2, "files": {}, "settings": run_state.settings_of(cfg),
             "fingerprints": step_files.fingerprints(cfg)}
    (save / "step-000002" / "state.json").write_text(json.dumps(state))
    argv = ["run", str(model), "--data", str(docs), "--save-dir", str(save), "--steps", "3", "--resume"]
    with open(docs, "a") as f:
        f.write("the cat\n")
    assert main(argv) == 2
    assert f"--resume: --data {docs} changed since step 2 was saved: it has " in capsys.readouterr().err
    write_documents(str(docs), count=5)  # as saved again
    settings = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 123}))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--resume: {model / 'tokenizer_config.json'} changed since step 2 was saved" in err, err
    assert "rank" not in err


def test_the_header_says_when_the_run_saves():
    from fxpp.trainer.cli import header
    from fxpp.trainer.train import RunConfig

    assert header(RunConfig()).endswith("; no saves (no --save-dir)")
    assert header(RunConfig(save_dir="r")).endswith("saves to r: save-every 0 (only at the end)")
    assert header(RunConfig(save_dir="r", save_every=5, keep_last=2, resume=True)).endswith(
        "saves to r: save-every 5 and at the end, keep-last 2, resuming the newest step that verifies")


def test_keep_last_and_resume_step_need_a_save_dir(capsys):
    from fxpp.trainer.cli import main

    assert main(["run", "tiny-llama", "--keep-last", "2"]) == 2
    assert "--keep-last 2 needs --save-dir" in capsys.readouterr().err
    assert main(["run", "tiny-llama", "--resume-step", "2"]) == 2
    assert "--resume needs --save-dir" in capsys.readouterr().err


@pytest.mark.heavy  # two fxpp runs
@pytest.mark.timeout(400)
def test_fxpp_run_resumes_from_the_step_before_a_damaged_one_and_exports(tmp_path, capfd):
    from transformers import AutoModelForCausalLM

    from fxpp.trainer.cli import main

    save = tmp_path / "run"
    flags = ["--stages", "2", "--no-check", "--save-dir", str(save), "--save-every", "1"]
    assert main(["run", "tiny-llama", "--steps", "2", *flags]) == 0
    _flip_a_byte(save / "step-000002" / "stage-1.dp-0.safetensors")
    capfd.readouterr()
    assert main(["run", "tiny-llama", "--steps", "3", "--resume", "--keep-last", "2", *flags]) == 0
    out = capfd.readouterr().out
    assert "saves to " in out and "keep-last 2, resuming the newest step that verifies" in out, out
    assert f"resuming from step 1 of {save}; skipped step 2: {save / 'step-000002' / 'stage-1.dp-0.safetensors'}: " \
           "its sha256 differs" in out, out
    assert "steps 2-3 (resumed)" in out, out
    assert sorted(p.name for p in save.glob("step-*")) == ["step-000002", "step-000003"]
    shutil.copy(save / "step-000003" / "stage-0.dp-0.safetensors", save / "step-000003" / "stage-0.dp-1.safetensors")
    _flip_a_byte(save / "step-000003" / "stage-0.dp-1.safetensors")  # unlisted; read, it would clash
    assert main(["export", str(save), str(tmp_path / "out")]) == 0  # the unlisted file is not read
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    trained = save_reader.whole_tensors(str(save / "step-000003"))
    assert all(torch.equal(exported[k], v) for k, v in trained.items())


def test_a_save_refuses_non_finite_tensors_and_writes_nothing(tmp_path):
    """Issue 21, item 2: NaN or infinity never reaches a file a run would resume or export from."""
    from fxpp.errors import NonFiniteError
    from fxpp.runtime.checkpoint import save_optimizer, save_stage

    module = torch.nn.Linear(3, 2)
    with torch.no_grad():
        module.bias[1] = float("nan")
    path = tmp_path / "stage-0.dp-0.safetensors"
    with pytest.raises(NonFiniteError, match=r"stage-0.dp-0.safetensors: bias holds a non-finite value"):
        save_stage(module, str(path))
    assert not os.listdir(tmp_path)  # not even a temporary file
    with torch.no_grad():
        module.bias[1] = 0.0
    save_stage(module, str(path))  # finite again: saved
    opt = torch.optim.Adam(module.parameters())
    module(torch.ones(1, 3)).sum().backward()
    opt.step()
    opt.state[module.weight]["exp_avg"][0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"optimizer.pp-0.dp-0.safetensors: state.weight.exp_avg holds a non-finite"):
        save_optimizer(opt, module, str(tmp_path / "optimizer.pp-0.dp-0.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["stage-0.dp-0.safetensors"]

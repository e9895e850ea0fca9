"""The main job: train a model for a few steps with a pipeline schedule, then check it.

Runs in every rank's process (spawned by ``fxpp run`` or started by ``torchrun``).
The last stage's rank also trains the unpatched model for the same steps on the same
data in-process and compares the losses: the end-to-end proof that the pipeline
trains the model it was given.
"""

from __future__ import annotations

import itertools
import os
import resource
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..errors import DataError, RunConfigError, RunFailedError
from ..pipeline import pipeline
from ..runtime.checkpoint import check_checkpoint
from ..runtime.loss import causal_lm_loss
from ..runtime.parallel import local_batch, pp_dp_mesh
from ..runtime.placement import MULTI_STAGE, default_device, stage_ids_of_rank
from ..runtime.schedule import make_schedule
from . import run_state
from .data import DataPosition, PackedBatches, load_tokenizer, read_documents, tokenize
from .launch import run_ranks
from .models import build_model


@dataclass
class RunConfig:
    model: str = "tiny-llama"
    ranks: int = 2  # pipeline ranks; the world is ranks * dp
    dp: int = 1
    activation_checkpointing: bool = False
    schedule: str = "1F1B"
    steps: int = 5
    batch: int = 8
    seq_len: int = 32
    microbatches: int = 4
    lr: float = 1e-3
    seed: int = 0
    tokens: str | None = None
    data: list[str] | None = None  # text / JSON-lines files, tokenized with the model directory's tokenizer
    check: bool = True
    progress: bool = True
    save_dir: str | None = None  # per-stage (per-shard) checkpoints with optimizer state (fxpp.trainer.run_state)
    save_every: int = 0  # save every K steps (and after the last); 0: after the last step only
    resume: bool = False  # continue from the latest save in save_dir

    @property
    def num_stages(self) -> int:
        return self.ranks * (2 if self.schedule in MULTI_STAGE else 1)

    def validate(self, meta_model: torch.nn.Module | None = None) -> dict | None:
        """Raises RunConfigError for settings no rank can run (checked before any process starts).

        Args:
            meta_model: the directory's model already built on the meta device (a rank
                builds it anyway); else it is built here to check the checkpoint's keys.

        Returns:
            the saved state a ``--resume`` continues from, else None.
        """
        if self.ranks < 1 or self.dp < 1:
            raise RunConfigError(f"--stages {self.ranks} and --dp {self.dp} must be positive")
        if self.dp > 1 and self.batch % (self.dp * self.microbatches):
            raise RunConfigError(f"--batch {self.batch} must be a multiple of --dp {self.dp} x --microbatches "
                            f"{self.microbatches}: every dp replica runs --microbatches equal microbatches")
        if self.resume and not self.save_dir:
            raise RunConfigError("--resume needs --save-dir (the directory of the run to continue)")
        state = None
        if self.save_dir:
            state = run_state.check_start(self)  # another run's saves, or a save past --steps: before any rank starts
        if self.save_every < 0 or (self.save_every and not self.save_dir):
            raise RunConfigError(f"--save-every {self.save_every} needs --save-dir and a positive number of steps")
        if os.path.isdir(self.model) and not self.resume:
            # every key, nothing else, right shapes: from the file headers, before any rank starts
            check_checkpoint(meta_model or build_model(self.model, device="meta"), None, self.model)
        if self.data:
            load_tokenizer(self.model)  # a directory without a tokenizer fails here, before any rank starts
        return state

    @property
    def world(self) -> int:
        return self.ranks * self.dp


def batches_from(cfg: RunConfig, vocab: int, start: int = 0, position=None):
    """``(step, batch, data position after it)`` for steps ``start`` .. ``cfg.steps - 1``.

    With ``cfg.data``: packed documents (``fxpp.trainer.data``), with ``labels``, continuing
    from ``position`` (a resumed run's saved ``DataPosition``); else token ids (random,
    or from ``cfg.tokens``) that depend only on the step, so a resumed run sees exactly
    the batches a straight run would.
    """
    if cfg.data:
        packed = PackedBatches(tokenize(read_documents(list(cfg.data)), load_tokenizer(cfg.model)), cfg.batch,
                               cfg.seq_len, position or DataPosition())
        for step in range(start, cfg.steps):
            batch = packed.next()
            yield step, batch, packed.position
        return
    flat = _token_file(cfg.tokens) if cfg.tokens else None
    n = cfg.batch * cfg.seq_len
    for step in range(start, cfg.steps):
        if flat is None:
            ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
        else:
            ids = flat[torch.arange(step * n, (step + 1) * n) % flat.numel()] % vocab
        ids = ids.reshape(cfg.batch, cfg.seq_len)
        yield step, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, DataPosition(0, (step + 1) * n)


def synthetic_batches(cfg: RunConfig, vocab: int) -> list[dict[str, torch.Tensor]]:
    """Every batch of the run, from step 0 (:func:`batches_from`)."""
    return [batch for _, batch, _ in batches_from(cfg, vocab)]


def split_labels(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The model inputs and the labels (the batch's own, else the ids with padding -100)."""
    batch = dict(batch)
    labels = batch.pop("labels", None)
    if labels is None:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch, labels


def _token_file(path: str) -> torch.Tensor:
    """Token ids of a .pt LongTensor or a text file of integers, flattened."""
    if path.endswith(".pt"):
        flat = torch.load(path, weights_only=True).reshape(-1).long()
    else:
        with open(path) as f:
            flat = torch.tensor([int(t) for t in f.read().split()], dtype=torch.long)
    if not flat.numel():
        raise DataError(f"--tokens {path}: no token ids")
    return flat


def rank_memory(device: torch.device) -> int:
    """This process's peak memory in bytes: allocated on CUDA, the peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _all_memory(device: torch.device) -> list[int]:
    """Every rank's :func:`rank_memory` (one all-gather)."""
    mine = torch.tensor([rank_memory(device)], dtype=torch.int64, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}G"


def run_rank(rank: int, world: int, cfg: RunConfig) -> dict:
    """One rank's share of the job; the process group must be initialised.

    A directory source is built on the meta device and every rank reads only its
    stages' (and, with ``--dp``, its shards') tensors from the safetensors files
    (``build_stage(checkpoint=...)``); a resumed run reads them from its save instead.
    """
    device = default_device(rank)
    from_directory = os.path.isdir(cfg.model)
    meta = build_model(cfg.model, device="meta") if from_directory else None
    state = cfg.validate(meta_model=meta)  # and the checkpoint's keys, on the model this rank builds from
    start = state["step"] if state else 0
    if start == cfg.steps:  # the save is the end of the run: nothing to train
        return _nothing_to_do(rank, start, device)
    mesh = pp_dp_mesh(cfg.ranks, cfg.dp) if cfg.dp > 1 else None
    pp_rank = mesh.get_local_rank("pp") if mesh is not None else rank
    dp_rank = mesh.get_local_rank("dp") if mesh is not None else 0
    local = (lambda b: local_batch(b, mesh)) if mesh is not None else (lambda b: b)
    model = meta if from_directory else build_model(cfg.model, seed=cfg.seed).to(device)
    vocab = model.config.get_text_config().vocab_size
    position = DataPosition(*state["data_position"]) if state else None
    batches = batches_from(cfg, vocab, start, position)
    first_batch = next(batches)  # its shapes are the example; it is trained on first
    batches = itertools.chain([first_batch], batches)
    example = split_labels(local(first_batch[1]))[0]
    example_device = "meta" if from_directory else device
    mb = {k: v[: v.shape[0] // cfg.microbatches].to(example_device) for k, v in example.items()}
    pipe = pipeline(model, cfg.num_stages, example_inputs=mb)
    if state:
        run_state.check_resumable(state, cfg, pipe.layer_ranges)
    saved = run_state.step_dir(cfg.save_dir, start) if state else None
    style = MULTI_STAGE.get(cfg.schedule, "loop")
    ids = stage_ids_of_rank(pp_rank, cfg.num_stages, cfg.ranks, style)
    checkpoint = {i: run_state.stage_file(saved, i, dp_rank) if saved else (cfg.model if from_directory else None)
                  for i in ids}
    stages = [pipe.build_stage(i, device, style=style, dp_mesh=mesh, checkpoint=checkpoint[i],
                               activation_checkpointing=cfg.activation_checkpointing) for i in ids]
    params = list(run_state.rank_parameters(stages).values())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    if state:
        run_state.load(cfg, state, stages, opt, pp_rank=pp_rank, dp_rank=dp_rank, device=device)
    holds_last = any(st.is_last for st in stages)
    losses_per_step, times, memory = [], [], []
    bar = None
    if holds_last and dp_rank == 0 and cfg.progress:
        bar = tqdm(total=cfg.steps, initial=start, desc=f"{os.path.basename(cfg.model.rstrip('/'))} {cfg.schedule} "
                   f"x{cfg.num_stages}" + (f" dp{cfg.dp}" if cfg.dp > 1 else ""), unit="step")
    for step, batch, position in batches:
        batch, labels = split_labels({k: v.to(device) for k, v in local(batch).items()})
        # Every dp rank calls it: the global target-token count is an all-reduce over dp.
        loss_fn = causal_lm_loss(labels, cfg.microbatches, dp_mesh=mesh)
        schedule = make_schedule(cfg.schedule, stages, cfg.microbatches, loss_fn)
        t0 = time.perf_counter()
        losses: list = []
        opt.zero_grad(set_to_none=True)
        schedule.step(**batch, target=labels, losses=losses)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        memory = _all_memory(device)  # every rank takes part: per-rank peak memory for the bar and the report
        if holds_last:
            share = loss_fn.whole_batch(losses).reshape(1)
            if mesh is not None:  # the global loss is the sum of the replicas' shares
                share = share.to(device)
                dist.all_reduce(share, group=mesh["dp"].get_group())
            loss = float(share[0])
            losses_per_step.append(loss)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{cfg.batch * cfg.seq_len / times[-1]:,.0f}",
                                mem="/".join(_gib(m) for m in memory))
                bar.update()
        done = step + 1
        if cfg.save_dir and (done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0)):
            run_state.save(cfg, done, stages, opt, pp_rank=pp_rank, dp_rank=dp_rank, position=position,
                           layer_ranges=pipe.layer_ranges, model_config=model.config, device=device)
    if bar is not None:
        bar.close()
    result = {"rank": rank, "stages": ids, "dp_rank": dp_rank, "step_s": times, "first_step": start,
              "memory": memory, "device": str(device)}
    if holds_last and dp_rank == 0:
        result["losses"] = losses_per_step
        if cfg.check:
            result["reference_losses"] = reference_losses(cfg, synthetic_batches(cfg, vocab), device)[start:]
    return result


def _nothing_to_do(rank: int, step: int, device) -> dict:
    """The result of a resume whose save is already at ``--steps`` (rank 0 reports it)."""
    return {"rank": rank, "stages": [], "dp_rank": 0, "step_s": [], "first_step": step, "memory": [],
            "device": str(device), **({"losses": []} if rank == 0 else {})}


def reference_losses(cfg: RunConfig, batches, device) -> list[float]:
    """The unpatched model, trained in this process on the same batches."""
    model = build_model(cfg.model, seed=cfg.seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    out = []
    for batch in batches:
        batch, labels = split_labels({k: v.to(device) for k, v in batch.items()})
        opt.zero_grad(set_to_none=True)
        loss = model(**batch, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    return out


def _rank_job(rank: int, world: int, workdir: str, cfg_dict: dict) -> dict:
    return run_rank(rank, world, RunConfig(**cfg_dict))


def launch(cfg: RunConfig, workdir: str | None = None, timeout_s: float = 600) -> list[dict]:
    """Run the job on ``cfg.ranks`` local processes; return their results.

    Raises:
        RunFailedError: naming the first rank that failed and its error, or the run's timeout.
    """
    state = cfg.validate()
    if state is not None and state["step"] == cfg.steps:
        return [_nothing_to_do(0, cfg.steps, "cpu")]  # no process to start
    threads = max(1, (os.cpu_count() or 1) // cfg.world)
    try:
        results = run_ranks(_rank_job, cfg.world, asdict(cfg), workdir=workdir, timeout_s=timeout_s,
                            pg_timeout_s=min(timeout_s, 300), threads=threads)
    except TimeoutError as e:
        raise RunFailedError(str(e)) from None
    failed = [(r, res) for r, res in enumerate(results) if not res["ok"]]
    if failed:
        # The first rank to fail is the likeliest cause; its peers then fail on the broken connection.
        rank, res = min(failed, key=lambda f: "Connection" in f[1]["error"] or "peer" in f[1]["error"])
        raise RunFailedError(f"rank {rank} failed: {res['error']}")
    return [res["value"] for res in results]

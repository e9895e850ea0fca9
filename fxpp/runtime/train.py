"""The main job: train a model for a few steps with a pipeline schedule, then check it.

Runs in every rank's process (spawned by ``fxpp run`` or started by ``torchrun``).
The last stage's rank also trains the unpatched model for the same steps on the same
data in-process and compares the losses: the end-to-end proof that the pipeline
trains the model it was given.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import FxppError

# Schedules whose ranks hold two stages, and their placement.
MULTI_STAGE = {"Interleaved1F1B": "loop", "LoopedBFS": "loop", "InterleavedZeroBubble": "loop",
               "ZBVZeroBubble": "v", "DualPipeV": "v"}
SCHEDULES = ("GPipe", "1F1B", *MULTI_STAGE)


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

    @property
    def num_stages(self) -> int:
        return self.ranks * (2 if self.schedule in MULTI_STAGE else 1)

    def validate(self) -> None:
        """Raises FxppError for settings no rank can run (checked before any process starts)."""
        if self.ranks < 1 or self.dp < 1:
            raise FxppError(f"--stages {self.ranks} and --dp {self.dp} must be positive")
        if self.dp > 1 and self.batch % (self.dp * self.microbatches):
            raise FxppError(f"--batch {self.batch} must be a multiple of --dp {self.dp} x --microbatches "
                            f"{self.microbatches}: every dp replica runs --microbatches equal microbatches")
        if self.data:
            from .data import load_tokenizer

            load_tokenizer(self.model)  # a directory without a tokenizer fails here, before any rank starts

    @property
    def world(self) -> int:
        return self.ranks * self.dp


def synthetic_batches(cfg: RunConfig, vocab: int) -> list[dict[str, torch.Tensor]]:
    """With ``cfg.data``: packed documents (``fxpp.runtime.data``), with ``labels``; else:
    """
    if cfg.data:
        from .data import PackedBatches, load_tokenizer, read_documents, tokenize

        packed = PackedBatches(tokenize(read_documents(list(cfg.data)), load_tokenizer(cfg.model)), cfg.batch,
                               cfg.seq_len)
        return [packed.next() for _ in range(cfg.steps)]
    return _token_batches(cfg, vocab)


def split_labels(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The model inputs and the labels (the batch's own, else the ids with padding -100)."""
    batch = dict(batch)
    labels = batch.pop("labels", None)
    if labels is None:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch, labels


def _token_batches(cfg: RunConfig, vocab: int) -> list[dict[str, torch.Tensor]]:
    """``cfg.steps`` batches: token ids from ``cfg.tokens`` (a .pt LongTensor or a text file of ints) or random."""
    g = torch.Generator().manual_seed(cfg.seed)
    need = cfg.steps * cfg.batch * cfg.seq_len
    if cfg.tokens:
        if cfg.tokens.endswith(".pt"):
            flat = torch.load(cfg.tokens, weights_only=True).reshape(-1).long()
        else:
            with open(cfg.tokens) as f:
                flat = torch.tensor([int(t) for t in f.read().split()], dtype=torch.long)
        if flat.numel() < need:
            flat = flat.repeat(need // max(flat.numel(), 1) + 1)
        flat = flat[:need] % vocab
    else:
        flat = torch.randint(0, vocab, (need,), generator=g)
    ids = flat.reshape(cfg.steps, cfg.batch, cfg.seq_len)
    return [{"input_ids": ids[s], "attention_mask": torch.ones_like(ids[s])} for s in range(cfg.steps)]


def run_rank(rank: int, world: int, cfg: RunConfig) -> dict:
    """One rank's share of the job; the process group must be initialised."""
    import fxpp
    from .models import build_model
    from .placement import default_device
    from .schedule import make_schedule

    from .parallel import local_batch

    device = default_device(rank)
    cfg.validate()
    mesh = fxpp.pp_dp_mesh(cfg.ranks, cfg.dp) if cfg.dp > 1 else None
    pp_rank = mesh.get_local_rank("pp") if mesh is not None else rank
    dp_rank = mesh.get_local_rank("dp") if mesh is not None else 0
    local = (lambda b: local_batch(b, mesh)) if mesh is not None else (lambda b: b)
    model = build_model(cfg.model, seed=cfg.seed).to(device)
    vocab = model.config.get_text_config().vocab_size
    batches = synthetic_batches(cfg, vocab)
    first = split_labels(local(batches[0]))[0]
    mb = {k: v[: v.shape[0] // cfg.microbatches].to(device) for k, v in first.items()}
    pipe = fxpp.pipeline(model, cfg.num_stages, example_inputs=mb)
    style = MULTI_STAGE.get(cfg.schedule, "loop")
    ids = fxpp.stage_ids_of_rank(pp_rank, cfg.num_stages, cfg.ranks, style)
    stages = [pipe.build_stage(i, device, style=style, dp_mesh=mesh,
                               activation_checkpointing=cfg.activation_checkpointing) for i in ids]
    params = list({id(p): p for st in stages for p in st.submod.parameters()}.values())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    holds_last = any(st.is_last for st in stages)
    losses_per_step, times = [], []
    bar = None
    if holds_last and dp_rank == 0 and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc=f"{cfg.model} {cfg.schedule} x{cfg.num_stages}", unit="step")
    for step, batch in enumerate(batches):
        batch, labels = split_labels({k: v.to(device) for k, v in local(batch).items()})
        # Every dp rank calls it: the global target-token count is an all-reduce over dp.
        loss_fn = fxpp.causal_lm_loss(labels, cfg.microbatches, dp_mesh=mesh)
        schedule = make_schedule(cfg.schedule, stages, cfg.microbatches, loss_fn)
        t0 = time.perf_counter()
        losses: list = []
        opt.zero_grad(set_to_none=True)
        schedule.step(**batch, target=labels, losses=losses)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if holds_last:
            share = loss_fn.whole_batch(losses).reshape(1)
            if mesh is not None:  # the global loss is the sum of the replicas' shares
                import torch.distributed as dist

                share = share.to(device)
                dist.all_reduce(share, group=mesh["dp"].get_group())
            loss = float(share[0])
            losses_per_step.append(loss)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{cfg.batch * cfg.seq_len / times[-1]:,.0f}")
                bar.update()
    if bar is not None:
        bar.close()
    result = {"rank": rank, "stages": ids, "dp_rank": dp_rank, "step_s": times}
    if holds_last and dp_rank == 0:
        result["losses"] = losses_per_step
        if cfg.check:
            result["reference_losses"] = reference_losses(cfg, batches, device)
    return result


def reference_losses(cfg: RunConfig, batches, device) -> list[float]:
    """The unpatched model, trained in this process on the same batches."""
    from .models import build_model

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
        FxppError: naming the first rank that failed and its error.
    """
    from .launch import run_ranks

    cfg.validate()
    threads = max(1, (os.cpu_count() or 1) // cfg.world)
    try:
        results = run_ranks(_rank_job, cfg.world, asdict(cfg), workdir=workdir, timeout_s=timeout_s,
                            pg_timeout_s=min(timeout_s, 300), threads=threads)
    except TimeoutError as e:
        raise FxppError(str(e)) from None
    failed = [(r, res) for r, res in enumerate(results) if not res["ok"]]
    if failed:
        # The first rank to fail is the likeliest cause; its peers then fail on the broken connection.
        rank, res = min(failed, key=lambda f: "Connection" in f[1]["error"] or "peer" in f[1]["error"])
        raise FxppError(f"rank {rank} failed: {res['error']}")
    return [res["value"] for res in results]

"""The main job: train a model with a pipeline schedule, and (for presets, or with ``--check``) check it.

Runs in every rank's process (spawned by ``fxpp run`` or started by ``torchrun``).
A step is: the schedule's forward and backward over the microbatches (gradients of
tied weights exchanged), the global gradient norm and clipping
(``fxpp.clip_grad_norm_``), AdamW and the LR schedule. Metrics are read from the
device on logged steps only (``fxpp.trainer.metrics``). With the parity check, the
last stage's rank also trains the unpatched model for the same steps on the same data
in-process, the same way (clipping, decay groups, schedule, LoRA), and compares the
losses: the end-to-end proof that the pipeline trains the model it was given.
"""

from __future__ import annotations

import copy
import itertools
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..errors import DataError, FxppError, NonFiniteError, RunConfigError, RunFailedError, TensorParallelError
from ..pipeline import pipeline
from ..runtime.checkpoint import check_checkpoint
from ..runtime.compiled import compile_stats
from ..runtime.loss import causal_lm_loss
from ..runtime.parallel import local_batch, pp_dp_mesh, pp_dp_tp_mesh
from ..runtime.placement import MULTI_STAGE, default_device, stage_ids_of_rank
from ..runtime.optim import LR_SCHEDULES, clip_grad_norm_
from ..runtime.schedule import make_schedule
from ..runtime.tensor_parallel import check_model as check_tp_model
from . import corpus, run_state, step_files
from .metrics import MetricsLog, all_rank_memory, is_logged
from .optimizer import make_optimizer, with_lora
from .data import DataPosition, PackedBatches, check_files, load_tokenizer
from .launch import run_ranks
from .models import build_model, load_config


@dataclass
class RunConfig:
    model: str = "tiny-llama"
    ranks: int = 2  # pipeline ranks; the world is ranks * dp * tp
    dp: int = 1
    tp: int = 1  # tensor-parallel ranks of every stage (the model's own tp plan)
    activation_checkpointing: bool = False
    compile: bool = False  # every decoder layer compiled in place with inductor (fxpp.runtime.compiled)
    schedule: str = "1F1B"
    steps: int = 5
    batch: int = 8
    seq_len: int = 32
    microbatches: int = 4
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | linear | cosine, after --warmup-steps of linear warm-up
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # where linear and cosine end, as a fraction of --lr
    weight_decay: float = 0.0  # AdamW's decoupled decay; never on biases and normalization weights
    max_grad_norm: float = 1.0  # clip the global gradient norm to it; 0 disables
    mixed_precision: str | None = None  # fp32 | bf16; None: bf16 on CUDA, fp32 on CPU
    param_dtype: str = "fp32"  # the master parameters' dtype; bf16: pure bf16 training
    lora_rank: int = 0  # > 0: train PEFT LoRA adapters of this rank, base weights frozen
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None  # module names (q_proj, v_proj, ...); None: PEFT's default for the model
    log_every: int = 0  # a metrics line every K steps (and the last); 0: the last step only
    metrics: str | None = None  # the JSON-lines file; default SAVE_DIR/metrics.jsonl
    val_data: list[str] | None = None  # text / JSON-lines files for the validation loss
    val_every: int = 0
    seed: int = 0
    tokens: str | None = None
    data: list[str] | None = None  # text / JSON-lines / parquet files, tokenized with the model directory's tokenizer
    text_field: str = "text"  # the documents' field in JSON-lines records and parquet rows
    shuffle_seed: int | None = None  # None: documents in file order; else each pass over them permuted by this seed
    check: bool | None = None  # None: on for built-in presets, off for checkpoint directories (--check)
    progress: bool = True
    save_dir: str | None = None  # per-stage (per-shard) checkpoints with optimizer state (fxpp.trainer.run_state)
    save_every: int = 0  # save every K steps (and after the last); 0: after the last step only
    resume: bool = False  # continue from the newest save in save_dir whose files all verify
    resume_step: int | None = None  # continue from this saved step (it must verify); implies resume
    keep_last: int = 0  # keep the K newest complete saves, removing older ones; 0: keep every save

    @property
    def resuming(self) -> bool:
        return self.resume or self.resume_step is not None

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
        if self.ranks < 1 or self.dp < 1 or self.tp < 1:
            raise RunConfigError(f"--stages {self.ranks}, --dp {self.dp} and --tp {self.tp} must be positive")
        if self.batch % (self.dp * self.microbatches):
            raise RunConfigError(f"--batch {self.batch} must be a multiple of --dp {self.dp} x --microbatches "
                            f"{self.microbatches}: every dp replica runs --microbatches equal microbatches")
        if self.resuming and not self.save_dir:
            raise RunConfigError("--resume needs --save-dir (the directory of the run to continue)")
        if self.keep_last < 0 or (self.keep_last and not self.save_dir):
            raise RunConfigError(f"--keep-last {self.keep_last} needs --save-dir and a positive number of saves")
        if self.resume_step is not None and self.resume_step < 1:
            raise RunConfigError(f"--resume-step {self.resume_step}: a saved step is at least 1")
        self._validate_training()
        if self.tp > 1:
            self._validate_tp(meta_model)
        state = None
        if self.save_dir:
            # a folder that cannot be written, another run's saves, a save past --steps: before any rank starts
            state = run_state.check_start(self)
        if self.save_every < 0 or (self.save_every and not self.save_dir):
            raise RunConfigError(f"--save-every {self.save_every} needs --save-dir and a positive number of steps")
        if os.path.isdir(self.model) and not self.resuming:
            # every key, nothing else, right shapes: from the file headers, before any rank starts
            check_checkpoint(meta_model or build_model(self.model, device="meta"), None, self.model)
        if self.data or self.val_data:
            self._validate_data()
            tokenizer = load_tokenizer(self.model)  # a directory without a tokenizer fails here, before any rank starts
            rows = (meta_model or build_model(self.model, device="meta")).get_input_embeddings().weight.shape[0]
            if len(tokenizer) > rows:
                raise RunConfigError(f"the tokenizer of {self.model} has {len(tokenizer)} tokens, but the model's "
                                     f"embedding has {rows} rows: ids beyond them would index out of range")
        positions = getattr(load_config(self.model).get_text_config(), "max_position_embeddings", None)
        if isinstance(positions, int) and self.seq_len > positions:
            raise RunConfigError(f"--seq-len {self.seq_len} is above the model's max_position_embeddings {positions}")
        return state

    def _validate_training(self) -> None:
        """The optimizer, precision, LoRA, metrics and validation settings (before any rank starts)."""
        if self.steps < 1:
            raise RunConfigError(f"--steps {self.steps} must be at least 1")
        if not self.max_grad_norm >= 0:
            raise RunConfigError(f"--max-grad-norm {self.max_grad_norm} must be >= 0 (0 disables clipping)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise RunConfigError(f"--lr-schedule {self.lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or not self.weight_decay >= 0:
            raise RunConfigError(f"--warmup-steps {self.warmup_steps}, --min-lr-ratio {self.min_lr_ratio}, "
                                 f"--weight-decay {self.weight_decay}: need warm-up >= 0, a ratio in [0, 1] and "
                                 "decay >= 0")
        if self.mixed_precision not in (None, "fp32", "bf16") or self.param_dtype not in ("fp32", "bf16"):
            raise RunConfigError(f"--mixed-precision {self.mixed_precision!r} / --param-dtype {self.param_dtype!r}: "
                                 "each is fp32 or bf16")
        if self.lora_rank < 0 or (self.lora_rank == 0 and (self.lora_alpha is not None or self.lora_targets)):
            raise RunConfigError(f"--lora-rank {self.lora_rank}: must be >= 0, and --lora-alpha / --lora-targets "
                                 "need a positive --lora-rank")
        if self.log_every < 0 or self.val_every < 0:
            raise RunConfigError(f"--log-every {self.log_every} and --val-every {self.val_every} must be >= 0")
        if bool(self.val_data) != bool(self.val_every):
            raise RunConfigError("--val-data and --val-every go together (the files, and how often to evaluate)")
        if self.shuffle_seed is not None and not self.data:
            raise RunConfigError(f"--shuffle-seed {self.shuffle_seed} needs --data (it orders the documents of the "
                                 "files; synthetic token ids have none)")

    def _validate_data(self) -> None:
        """The data files exist and ``datasets`` is installed (reading them is :func:`prepare_data`'s)."""
        check_files(self.data or [], "--data")
        check_files(self.val_data or [], "--val-data")
        if not self.text_field:
            raise RunConfigError("--text-field '': name the field of the records that holds the text")
        corpus.datasets_module()

    def _validate_tp(self, meta_model: torch.nn.Module | None) -> None:
        """``--tp``: what is not built with tensor parallelism yet, and the model's plan (before any rank starts)."""
        for flag, used in (("--lora-rank", self.lora_rank),
                           ("--mixed-precision bf16", self.mixed_precision == "bf16"),
                           ("--param-dtype bf16", self.param_dtype == "bf16")):
            if used:
                raise RunConfigError(f"--tp {self.tp} with {flag} is not built yet (docs/runtime.md, section 3-D)")
        try:
            check_tp_model(meta_model or build_model(self.model, device="meta"), self.tp)
        except TensorParallelError as e:
            raise RunConfigError(f"--tp {self.tp}: {e}") from e

    @property
    def world(self) -> int:
        return self.ranks * self.dp * self.tp

    @property
    def metrics_path(self) -> str | None:
        if self.metrics:
            return self.metrics
        return os.path.join(self.save_dir, "metrics.jsonl") if self.save_dir else None

    def compute_dtype(self, device: torch.device) -> str:
        """``--mixed-precision``, or its default: bf16 on CUDA, fp32 on CPU."""
        if self.tp > 1:  # mixed precision under tensor parallelism is not built yet
            return self.mixed_precision or "fp32"
        return self.mixed_precision or ("bf16" if device.type == "cuda" else "fp32")

    def checks(self) -> bool:
        """Whether the parity check runs: ``--check``/``--no-check``, else for built-in presets only."""
        return self.check if self.check is not None else not os.path.isdir(self.model)


def batches_from(cfg: RunConfig, vocab: int, start: int = 0, position=None):
    """``(step, batch, data position after it)`` for steps ``start`` .. ``cfg.steps - 1``.

    With ``cfg.data``: packed documents (``fxpp.trainer.data``) read from the memory-mapped
    cache (``fxpp.trainer.corpus``, built by :func:`prepare_data`), with ``labels``,
    shuffled by ``cfg.shuffle_seed``, continuing from ``position`` (a resumed run's saved
    ``DataPosition``); else token ids (random, or from ``cfg.tokens``) that depend only on
    the step, so a resumed run sees exactly the batches a straight run would.
    """
    if cfg.data:
        packed = PackedBatches(corpus.open_documents(cfg.data, cfg.model, cfg.text_field), cfg.batch, cfg.seq_len,
                               position or DataPosition(), shuffle_seed=cfg.shuffle_seed)
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


class _StepLoss:
    """The loss a schedule calls, set anew each step (the schedule object is kept while shapes hold)."""

    def __init__(self):
        self.current = None

    def __call__(self, output, target):
        return self.current(output, target)


def validation_batches(cfg: RunConfig) -> list[dict[str, torch.Tensor]]:
    """One pass over ``--val-data``, packed as the training data: ``ceil(tokens / (batch * seq_len))`` batches."""
    docs = corpus.open_documents(cfg.val_data, cfg.model, cfg.text_field, flag="--val-data")
    packed = PackedBatches(docs, cfg.batch, cfg.seq_len)
    return [packed.next() for _ in range(max(1, -(-docs.num_tokens // (cfg.batch * cfg.seq_len))))]


def prepare_data(cfg: RunConfig) -> None:
    """Tokenize ``--data`` and ``--val-data`` into their caches, where not done yet (Note [one tokenization])."""
    if cfg.data:
        corpus.build(cfg.data, cfg.model, cfg.text_field, "--data")
    if cfg.val_data:
        corpus.build(cfg.val_data, cfg.model, cfg.text_field, "--val-data")


def data_ready(cfg: RunConfig) -> None:
    """Every rank: rank 0 makes sure the caches exist, the others wait for it (Note [one tokenization]).

    Under ``fxpp run``'s launcher the caches exist already and rank 0 only finds them.
    Rank 0's refusal reaches every rank, so all of them stop with it rather than wait.
    """
    error: list = [None]
    if dist.get_rank() == 0:
        try:
            prepare_data(cfg)
        except Exception as e:  # noqa: BLE001 - any failure must reach the waiting ranks
            error = [str(e) if isinstance(e, FxppError) else f"{type(e).__name__}: {e}"]
            dist.broadcast_object_list(error, src=0)
            raise
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise DataError(f"rank 0 could not prepare the data: {error[0]}")


def _is_val_step(cfg: RunConfig, done: int) -> bool:
    return bool(cfg.val_every) and (done % cfg.val_every == 0 or done == cfg.steps)


def run_rank(rank: int, world: int, cfg: RunConfig) -> dict:
    """One rank's share of the job; the process group must be initialised.

    A directory source is built on the meta device and every rank reads only its
    stages' (and, with ``--dp``, its shards') tensors from the safetensors files
    (``build_stage(checkpoint=...)``); a resumed run reads them from its save instead.
    A LoRA run builds the whole model with its weights on every rank (the adapters are
    created on real modules) and trains the adapters only.
    """
    device = default_device(rank)
    dtype = torch.bfloat16 if cfg.param_dtype == "bf16" else torch.float32
    from_directory = os.path.isdir(cfg.model)
    on_meta = from_directory and not cfg.lora_rank
    meta = build_model(cfg.model, device="meta", dtype=dtype) if from_directory else None
    state = cfg.validate(meta_model=meta)  # and the checkpoint's keys, on the model this rank builds from
    if cfg.tp > 1:
        mesh = pp_dp_tp_mesh(cfg.ranks, cfg.dp, cfg.tp)
    else:
        mesh = pp_dp_mesh(cfg.ranks, cfg.dp) if cfg.dp > 1 else None
    pp_rank = mesh.get_local_rank("pp") if mesh is not None else rank
    dp_rank = mesh.get_local_rank("dp") if mesh is not None else 0
    tp_rank = mesh.get_local_rank("tp") if cfg.tp > 1 else 0
    tp_file = tp_rank if cfg.tp > 1 else None  # a run with --tp saves a file per tp rank
    style = MULTI_STAGE.get(cfg.schedule, "loop")
    ids = stage_ids_of_rank(pp_rank, cfg.num_stages, cfg.ranks, style)
    prints = step_files.fingerprints(cfg) if cfg.save_dir and rank == 0 else None  # saved with every step
    if state is not None:  # every rank verifies its files of the step; rank 0's choice is every rank's
        state = run_state.choose_resume(cfg, step_files.own_files(ids, pp_rank, dp_rank, tp_file), prints)
    start = state["step"] if state else 0
    if start == cfg.steps:  # the save is the end of the run: nothing to train
        return _nothing_to_do(rank, start, device)
    local = (lambda b: local_batch(b, mesh)) if mesh is not None else (lambda b: b)
    model = meta if on_meta else build_model(cfg.model, seed=cfg.seed, dtype=dtype).to(device)
    model = with_lora(cfg, model)
    vocab = model.config.get_text_config().vocab_size
    if cfg.data or cfg.val_data:
        data_ready(cfg)
    position = DataPosition(*state["data_position"]) if state else None
    batches = batches_from(cfg, vocab, start, position)
    first_batch = next(batches)  # its shapes are the example; it is trained on first
    batches = itertools.chain([first_batch], batches)
    example = split_labels(local(first_batch[1]))[0]
    example_device = "meta" if on_meta else device
    mb = {k: v[: v.shape[0] // cfg.microbatches].to(example_device) for k, v in example.items()}
    pipe = pipeline(model, cfg.num_stages, example_inputs=mb)
    if state:
        run_state.check_resumable(state, cfg, pipe.layer_ranges)
    saved = step_files.step_dir(cfg.save_dir, start) if state else None
    checkpoint = {i: step_files.stage_file(saved, i, dp_rank, tp_file) if saved else (cfg.model if on_meta else None)
                  for i in ids}
    stages = [pipe.build_stage(i, device, style=style, dp_mesh=mesh, checkpoint=checkpoint[i],
                               activation_checkpointing=cfg.activation_checkpointing,
                               mixed_precision=cfg.compute_dtype(device), compile=cfg.compile) for i in ids]
    named = list(run_state.rank_parameters(stages).items())
    opt, lr_sched = make_optimizer(cfg, [(n.split(".", 1)[1], p) for n, p in named], [st.submod for st in stages])
    if state:
        run_state.load(cfg, state, stages, opt, pp_rank=pp_rank, dp_rank=dp_rank, device=device, tp_rank=tp_file)
        lr_sched.load_state_dict(state["lr_scheduler"])
    holds_last = any(st.is_last for st in stages)
    writes = holds_last and dp_rank == 0 and tp_rank == 0  # the tp ranks of a last stage hold the same loss
    metrics = MetricsLog(cfg.metrics_path if writes else None)
    val = validation_batches(cfg) if cfg.val_data else []
    step_loss, shares, norms, times, memory, val_losses = _StepLoss(), [], [], [], [], []
    schedule = make_schedule(cfg.schedule, stages, cfg.microbatches, step_loss)
    bar = None
    if writes and cfg.progress:
        bar = tqdm(total=cfg.steps, initial=start, desc=f"{os.path.basename(cfg.model.rstrip('/'))} {cfg.schedule} "
                   f"x{cfg.num_stages}" + (f" dp{cfg.dp}" if cfg.dp > 1 else "") + (f" tp{cfg.tp}" if cfg.tp > 1 else ""),
                   unit="step")
    t_log, tokens_since = time.perf_counter(), 0
    for step, batch, position in batches:
        batch, labels = split_labels({k: v.to(device) for k, v in local(batch).items()})
        # Every dp rank calls it: the global target-token count is an all-reduce over dp.
        step_loss.current = loss_fn = causal_lm_loss(labels, cfg.microbatches, dp_mesh=mesh)
        t0 = time.perf_counter()
        losses: list = []
        opt.zero_grad(set_to_none=True)
        # the logits are not read: keeping them would hold the whole batch's twice on the last rank
        schedule.step(**batch, target=labels, losses=losses, return_outputs=False)
        grad_norm = clip_grad_norm_(schedule.stages, cfg.max_grad_norm or float("inf"))
        norms.append(grad_norm.reshape(1))
        # The global norm is the same on every rank, so every rank stops at the same step,
        # before the optimizer uses the gradients (one host read per step, not per microbatch).
        # A non-finite loss makes the gradients, hence the norm, non-finite too.
        if not bool(torch.isfinite(grad_norm)):
            raise NonFiniteError(f"step {step + 1}: the global gradient norm is {float(grad_norm)} (a non-finite "
                                 "loss or gradient); stopped before the optimizer step, nothing of this step saved")
        lr = lr_sched.get_last_lr()[0]
        opt.step()
        lr_sched.step()
        times.append(time.perf_counter() - t0)  # the host's time: on CUDA, queued work may still run
        tokens_since += cfg.batch * cfg.seq_len
        if holds_last:
            shares.append(loss_fn.whole_batch(losses).reshape(1).to(device))  # a device value: read when logged
        done = step + 1
        if _is_val_step(cfg, done):
            val_losses.append((done, _validation_loss(cfg, schedule, step_loss, stages, val, local, mesh, device, holds_last)))
        if is_logged(done, cfg.log_every, cfg.steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed, t_log = time.perf_counter() - t_log, time.perf_counter()
            memory = all_rank_memory(device)  # every rank takes part, on logged steps only
            loss = _global_share(shares[-1], mesh) if holds_last else None
            record = {"step": done, "loss": loss, "grad_norm": float(grad_norm), "lr": lr,
                      "tokens_per_s": tokens_since / elapsed, "peak_memory_bytes": memory}
            if cfg.compile:  # this rank's compile events so far (fxpp.compile_stats)
                record.update({k: v for k, v in compile_stats().items() if k != "backward_compiles"})
            if val_losses and val_losses[-1][0] == done:
                record["val_loss"] = val_losses[-1][1]
            tokens_since = 0
            metrics.write(record)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                mem="/".join(_gib(m) for m in memory))
        if bar is not None:
            bar.update()
        if cfg.save_dir and (done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0)):
            run_state.save(cfg, done, stages, opt, pp_rank=pp_rank, dp_rank=dp_rank, position=position,
                           layer_ranges=pipe.layer_ranges, model_config=model.config, device=device,
                           lr_scheduler=lr_sched.state_dict(), prints=prints, tp_rank=tp_file)
    if bar is not None:
        bar.close()
    losses_per_step = _global_losses(shares, mesh) if holds_last else []
    result = {"rank": rank, "stages": ids, "dp_rank": dp_rank, "tp_rank": tp_rank, "step_s": times, "first_step": start,
              "memory": memory, "device": str(device), **({"compile": compile_stats()} if cfg.compile else {})}
    if writes:
        result["losses"] = losses_per_step
        result["grad_norms"] = [float(v) for v in torch.cat(norms).tolist()]
        result["val_losses"] = val_losses
        if cfg.checks():
            reference = reference_run(cfg, synthetic_batches(cfg, vocab), device, val)
            result["reference_losses"] = reference["losses"][start:]
            result["reference_grad_norms"] = reference["grad_norms"][start:]
            result["reference_val_losses"] = [v for v in reference["val_losses"] if v[0] > start]
    return result


def _global_share(share: torch.Tensor, mesh) -> float:
    """The global batch's loss from this replica's share (a sum over dp)."""
    if mesh is not None:
        share = share.clone()
        dist.all_reduce(share, group=mesh["dp"].get_group())
    return float(share[0])


def _global_losses(shares: list[torch.Tensor], mesh) -> list[float]:
    """Every step's global loss, read once at the end (one sum over dp for all steps)."""
    if not shares:
        return []
    stacked = torch.cat(shares)
    if mesh is not None:
        dist.all_reduce(stacked, group=mesh["dp"].get_group())
    return [float(v) for v in stacked.tolist()]


def _validation_loss(cfg, schedule, step_loss, stages, val, local, mesh, device, holds_last) -> float | None:
    """The token-weighted loss over the validation batches, forward only (the global batch's on every dp rank)."""
    for st in stages:
        st.submod.eval()
    total = torch.zeros(1, dtype=torch.float64, device=device)
    tokens = 0
    try:
        for batch in val:
            batch, labels = split_labels({k: v.to(device) for k, v in local(batch).items()})
            step_loss.current = loss_fn = causal_lm_loss(labels, cfg.microbatches, dp_mesh=mesh)
            losses: list = []
            schedule.eval(**batch, target=labels, losses=losses)
            if holds_last:
                total += loss_fn.whole_batch(losses).double().reshape(1).to(device) * loss_fn.num_target_tokens
            tokens += loss_fn.num_target_tokens
    finally:
        for st in stages:
            st.submod.train()
    return _global_share(total, mesh) / tokens if holds_last else None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}G"


def _nothing_to_do(rank: int, step: int, device) -> dict:
    """The result of a resume whose save is already at ``--steps`` (rank 0 reports it)."""
    return {"rank": rank, "stages": [], "dp_rank": 0, "step_s": [], "first_step": step, "memory": [],
            "device": str(device), **({"losses": [], "val_losses": []} if rank == 0 else {})}


def reference_run(cfg: RunConfig, batches, device, val=()) -> dict:
    """The unpatched model, trained in this process on the same batches the same way.

    Same optimizer construction (decay groups, LR schedule), ``torch.nn.utils.clip_grad_norm_``
    where the pipeline clips, the same LoRA adapters, the same validation batches. Under bf16
    mixed precision the parameters are cast to bf16 for each step's compute and the
    gradients accumulated into the fp32 masters, as FSDP2's policy does on the stages.
    """
    dtype = torch.bfloat16 if cfg.param_dtype == "bf16" else torch.float32
    model = with_lora(cfg, build_model(cfg.model, seed=cfg.seed, dtype=dtype).to(device))
    opt, sched = make_optimizer(cfg, list(model.named_parameters()), [model])
    mixed = cfg.compute_dtype(device) == "bf16" and dtype == torch.float32
    compute = _bf16_copy(model) if mixed else model
    out = {"losses": [], "grad_norms": [], "val_losses": []}
    for step, batch in enumerate(batches):
        batch, labels = split_labels({k: v.to(device) for k, v in batch.items()})
        opt.zero_grad(set_to_none=True)
        if mixed:
            _copy_params(model, compute)
        loss = compute(**batch, labels=labels, use_cache=False).loss
        loss.backward()
        if mixed:
            for p, c in zip(model.parameters(), compute.parameters()):
                p.grad = None if c.grad is None else c.grad.float()
                c.grad = None
        grads = [p for p in model.parameters() if p.grad is not None]
        out["grad_norms"].append(float(torch.nn.utils.clip_grad_norm_(grads, cfg.max_grad_norm or float("inf"))))
        opt.step()
        sched.step()
        out["losses"].append(float(loss.detach()))
        if _is_val_step(cfg, step + 1):
            out["val_losses"].append((step + 1, _reference_val_loss(model if not mixed else _copy_params(model, compute),
                                                                    val, device)))
    return out


def _bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    compute = copy.deepcopy(model)
    for p in compute.parameters():
        p.data = p.data.to(torch.bfloat16)
    return compute


def _copy_params(model: torch.nn.Module, compute: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p, c in zip(model.parameters(), compute.parameters()):
            c.copy_(p)
    return compute


def _reference_val_loss(model: torch.nn.Module, val, device) -> float:
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in val:
            batch, labels = split_labels({k: v.to(device) for k, v in batch.items()})
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(**batch, labels=labels, use_cache=False).loss.double()) * n
            tokens += n
    model.train()
    return total / tokens


def _rank_job(rank: int, world: int, workdir: str, cfg_dict: dict) -> dict:
    return run_rank(rank, world, RunConfig(**cfg_dict))


def launch(cfg: RunConfig, workdir: str | None = None, timeout_s: float | None = None) -> list[dict]:
    """Run the job on ``cfg.ranks`` local processes; return their results.

    Raises:
        RunFailedError: naming the first rank that failed and its error, or the run's timeout.
    """
    state = cfg.validate()
    if state is not None:
        step_files.check_fingerprints(cfg, state)  # data, tokenizer, config changed since the save
        # At --steps with every checksum right there is nothing to do (and no process to start);
        # a damaged last step is the ranks' to skip (run_state.choose_resume).
        if state["step"] == cfg.steps and step_files.damage(step_files.step_dir(cfg.save_dir, cfg.steps), state) is None:
            return [_nothing_to_do(0, cfg.steps, "cpu")]
    prepare_data(cfg)  # tokenized here, once, before any rank starts (Note [one tokenization])
    threads = max(1, (os.cpu_count() or 1) // cfg.world)
    try:
        # No default time limit: the run lives as long as its ranks. A collective waits up
        # to 30 minutes for a peer (a slow save, a first compile) before the group fails.
        results = run_ranks(_rank_job, cfg.world, asdict(cfg), workdir=workdir, timeout_s=timeout_s,
                            pg_timeout_s=1800 if timeout_s is None else min(timeout_s, 1800), threads=threads)
    except TimeoutError as e:
        raise RunFailedError(str(e)) from None
    failed = [(r, res) for r, res in enumerate(results) if not res["ok"]]
    if failed:
        # The first rank to fail is the likeliest cause; its peers then fail on the broken connection,
        # or (saves, loads) with a PeerFailedError that names it.
        rank, res = min(failed, key=lambda f: (f[1]["error"].startswith("PeerFailedError"),
                                               "Connection" in f[1]["error"] or "peer" in f[1]["error"]))
        raise RunFailedError(f"rank {rank} failed: {res['error']}")
    return [res["value"] for res in results]

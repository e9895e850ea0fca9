"""The optimizer step over pipeline stages: the global gradient norm, weight-decay groups, LR schedules.

Terms
-----
counted gradient
    A gradient that enters the global norm: every parameter gradient of every stage,
    except the gradient of a stage's *tie copy*. After the tie exchange (Note
    [tied-weight sync] in ``fxpp.runtime.ties``) both holders of a tied weight carry the
    summed gradient; the unpatched model has one parameter there, so the pipeline
    counts it once, on the first holder.
tie copy
    A parameter a stage holds as its own copy of a weight another, earlier stage owns
    (the last stage's tied LM head); ``FxppPipelineStage.tie_copies`` names them.

Note [global gradient norm]
    ``clip_grad_norm_`` must return, on every rank, the norm that
    ``torch.nn.utils.clip_grad_norm_`` computes on the unpatched model. Each rank
    computes the norm of its counted gradients with ``torch.nn.utils.get_total_norm``:
    per data-parallel mesh, a ``DTensor`` result (FSDP2 shards: a partial norm) is
    reduced over its own mesh with ``full_tensor()``, as torchtitan does; then the local
    stages' norms are combined (``get_total_norm`` of the norms). Ranks of one pipeline
    hold disjoint parameters, so ``norm ** p`` is summed (for ``inf``: the maximum) over
    the pipeline group, the group every stage of the rank was built on. Data-parallel
    replicas of one pipeline hold the same (reduced) gradients and compute the same
    value, so nothing is summed over dp twice. The gradients are then scaled in place by
    ``torch.nn.utils.clip_grads_with_norm_`` with that total, tie copies included (they
    must stay equal to their first holder).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR
from transformers.trainer_pt_utils import get_parameter_names

from ..errors import OptimizerSettingsError

LR_SCHEDULES = ("constant", "linear", "cosine")

# transformers' Trainer.get_decay_parameter_names: no decay for biases and normalization weights.
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def _counted_and_clipped(stages) -> tuple[list[torch.Tensor], list[torch.nn.Parameter]]:
    counted, clipped = [], []
    for stage in stages:
        copies = getattr(stage, "tie_copies", frozenset())
        for name, p in stage.submod.named_parameters():
            if p.grad is None:  # frozen (LoRA) or unused this step
                continue
            clipped.append(p)
            if name not in copies:
                counted.append(p.grad)
    return counted, clipped


def _local_norm(grads: list[torch.Tensor], norm_type: float, device) -> torch.Tensor:
    """The norm of this rank's counted gradients, each DTensor group reduced over its own mesh."""
    by_mesh: dict = {}  # None: plain tensors
    for g in grads:
        by_mesh.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    norms = []
    for group in by_mesh.values():
        total = torch.nn.utils.get_total_norm(group, norm_type)
        norms.append((total.full_tensor() if isinstance(total, DTensor) else total).to(device, torch.float32))
    if not norms:
        return torch.zeros((), device=device, dtype=torch.float32)
    return torch.nn.utils.get_total_norm(norms, norm_type)


def _pipeline_norm(counted: list[torch.Tensor], stages: list, norm_type: float) -> torch.Tensor:
    """The local norm of ``counted``, combined over the stages' pipeline group (Note [global gradient norm])."""
    local = _local_norm(counted, norm_type, stages[0].device)
    group = stages[0].group
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        if math.isinf(norm_type):
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
        else:
            local = local ** norm_type
            dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
            local = local ** (1.0 / norm_type)
    return local


def _checked_stages(stages) -> list:
    stages = list(stages)
    if not stages:
        raise OptimizerSettingsError("clip_grad_norm_ needs this rank's stages (the list given to fxpp.schedule)")
    return stages


def global_grad_norm(stages, norm_type: float = 2.0) -> torch.Tensor:
    """The gradient norm of the whole pipeline (Note [global gradient norm]), the same on every rank."""
    stages = _checked_stages(stages)
    counted, _ = _counted_and_clipped(stages)
    return _pipeline_norm(counted, stages, float(norm_type))


def clip_grad_norm_(stages, max_norm: float, norm_type: float = 2.0, *, foreach: bool | None = None) -> torch.Tensor:
    """Clip the gradients of this rank's stages in place by the pipeline's global norm.

    Equals ``torch.nn.utils.clip_grad_norm_`` on the unpatched model: the norm is taken
    over every pipeline and data-parallel rank (DTensor shards reduced over their mesh),
    a tied weight counted once (Note [global gradient norm]). Every rank of the pipeline
    must call it after ``schedule.step`` (it is a collective over the pipeline group).

    Args:
        stages: this rank's stages (``PipelineStage`` objects from ``build_stage``).
        max_norm: the largest norm the gradients keep; ``inf`` only measures.
        norm_type: the p of the p-norm (``inf`` for the largest magnitude).

    Returns:
        The total norm before clipping, a scalar tensor on the stages' device, the same
        on every rank.

    Raises:
        OptimizerSettingsError: no stages, or a negative ``max_norm``.
    """
    if not max_norm >= 0:
        raise OptimizerSettingsError(f"max_norm={max_norm!r}: the norm to clip to must be >= 0")
    stages = _checked_stages(stages)
    counted, clipped = _counted_and_clipped(stages)  # one walk over the parameters
    total = _pipeline_norm(counted, stages, float(norm_type))
    if clipped and not math.isinf(max_norm):
        # One call per kind of gradient: torch's foreach kernels refuse a list that mixes
        # plain tensors and DTensors (tensor parallelism keeps norms plain), or meshes.
        by_mesh: dict = {}
        for p in clipped:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
        for group in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=foreach)
    return total


def decay_parameter_names(module: torch.nn.Module) -> set[str]:
    """Names of the parameters weight decay applies to: not biases, not normalization weights (as transformers' Trainer)."""
    return set(get_parameter_names(module, [torch.nn.LayerNorm], NO_DECAY_PATTERNS))


def param_groups(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float,
                 decay_names: set[str]) -> list[dict]:
    """Optimizer parameter groups: trainable parameters with and without weight decay; frozen ones get no slot.

    Args:
        named_parameters: ``(name, parameter)`` pairs (each parameter once).
        weight_decay: the decay of the decayed group.
        decay_names: the names that decay (``decay_parameter_names`` of the modules they come from).
    """
    if not weight_decay >= 0:
        raise OptimizerSettingsError(f"weight_decay={weight_decay!r}: must be >= 0")
    decay, no_decay = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (decay if name in decay_names else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class LRFactor:
    """The factor on the base learning rate at step ``s`` (a picklable ``LambdaLR`` function).

    Linear warm-up from ``1 / (warmup_steps + 1)`` to 1 over ``warmup_steps`` steps, then
    ``constant`` (1), ``linear`` (down to ``min_lr_ratio`` at ``total_steps``) or
    ``cosine`` (half a cosine down to ``min_lr_ratio``), as transformers' schedules.
    """

    kind: str
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if self.kind not in LR_SCHEDULES:
            raise OptimizerSettingsError(f"lr schedule {self.kind!r}: expected one of {', '.join(LR_SCHEDULES)}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise OptimizerSettingsError(
                f"warmup_steps={self.warmup_steps}, total_steps={self.total_steps}: need warmup_steps >= 0 and "
                "total_steps >= 1")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise OptimizerSettingsError(f"min_lr_ratio={self.min_lr_ratio!r}: must be within [0, 1]")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        if self.kind == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def lr_scheduler(optimizer: torch.optim.Optimizer, kind: str = "constant", *, warmup_steps: int = 0,
                 total_steps: int = 1, min_lr_ratio: float = 0.0) -> LambdaLR:
    """A ``torch.optim.lr_scheduler.LambdaLR`` with warm-up and a constant, linear or cosine decay.

    Its ``state_dict`` holds the step and the schedule's settings, so a resumed run
    continues at the same learning rate, bit for bit. Call ``scheduler.step()`` after
    each ``optimizer.step()``.
    """
    return LambdaLR(optimizer, LRFactor(kind, warmup_steps, total_steps, min_lr_ratio))

"""fxpp: pipeline parallelism for Hugging Face models by one torch.fx rewrite pass."""

from .errors import (
    CheckpointError,
    CompileError,
    CutError,
    FxppError,
    MemoryLimitError,
    OptimizerSettingsError,
    StageInputError,
    StageSpecError,
    TensorParallelError,
    TraceError,
    UnsupportedModelError,
    VerificationError,
)
from .compile import transform
from .pipeline import Pipeline, pipeline
from .runtime.compiled import compile_stats
from .runtime.loss import CausalLMLoss, causal_lm_loss, count_target_tokens
from .runtime.microbatch import split_microbatches
from .runtime.optim import clip_grad_norm_, lr_scheduler
from .runtime.parallel import local_batch, pp_dp_mesh, pp_dp_tp_mesh
from .runtime.placement import stage_ids_of_rank as _stage_ids_of_rank
from .runtime.schedule import PipelineSchedule, step_with_microbatches
from .spec import StageRole
from .stage_module import StageModule


def schedule(schedule, stages, n_microbatches: int, loss_fn, **kwargs):
    """A schedule of ``torch.distributed.pipelining`` over this rank's fxpp stages (see ``fxpp.runtime.schedule.PipelineSchedule``).

    ``schedule``: a name (``"1F1B"``, ``"ZBVZeroBubble"``, ...) or a schedule class. Its
    ``step`` is torch's, preceded by agreeing on the step's shapes and followed by the
    tied-weight exchange.
    """
    return PipelineSchedule(schedule, stages, n_microbatches, loss_fn, **kwargs)


def stage_ids_of_rank(rank: int, num_stages: int, world_size: int, style: str = "loop") -> list[int]:
    """The stage ids a rank holds under ``style`` placement (``"loop"`` or ``"v"``)."""
    return _stage_ids_of_rank(rank, num_stages, world_size, style)

__all__ = [
    "CausalLMLoss",
    "CheckpointError",
    "CompileError",
    "CutError",
    "FxppError",
    "OptimizerSettingsError",
    "Pipeline",
    "StageInputError",
    "StageModule",
    "StageRole",
    "StageSpecError",
    "MemoryLimitError",
    "TensorParallelError",
    "TraceError",
    "UnsupportedModelError",
    "VerificationError",
    "causal_lm_loss",
    "clip_grad_norm_",
    "compile_stats",
    "count_target_tokens",
    "lr_scheduler",
    "pipeline",
    "local_batch",
    "pp_dp_mesh",
    "pp_dp_tp_mesh",
    "schedule",
    "split_microbatches",
    "stage_ids_of_rank",
    "step_with_microbatches",
    "transform",
]

"""fxpp: pipeline parallelism for Hugging Face models by one torch.fx rewrite pass."""

from .errors import (
    CheckpointError,
    CutError,
    FxppError,
    StageInputError,
    StageSpecError,
    TraceError,
    UnsupportedModelError,
    VerificationError,
)
from .pipeline import Pipeline, pipeline
from .spec import StageRole
from .transform import StageModule, transform

__all__ = [
    "CheckpointError",
    "CutError",
    "FxppError",
    "Pipeline",
    "StageInputError",
    "StageModule",
    "StageRole",
    "StageSpecError",
    "TraceError",
    "UnsupportedModelError",
    "VerificationError",
    "pipeline",
    "transform",
]

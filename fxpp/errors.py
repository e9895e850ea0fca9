"""The exceptions fxpp raises.

Every error fxpp raises on purpose derives from :class:`FxppError`, so a caller can
catch "fxpp refused this" in one place. Subclasses are named for the user's problem,
not for the place in fxpp that noticed it. Configuration errors also derive from
``ValueError`` (or ``TypeError``) so that code written against the builtin types
keeps working.
"""

from __future__ import annotations


class FxppError(Exception):
    """Root of every error fxpp raises deliberately."""


class StageSpecError(FxppError, ValueError):
    """A stage role, layer range or pipeline setting is invalid."""


class TraceError(FxppError):
    """The model's forward cannot be traced into a module-granularity graph."""


class UnsupportedModelError(FxppError, TypeError):
    """The model is not a kind fxpp can split (encoder-decoder, no decoder layers, ...)."""


class CutError(FxppError):
    """A value that a later stage needs cannot cross the cut (not a tensor, ...)."""


class StageInputError(FxppError, ValueError):
    """A stage was called with inputs that do not match what it was built for."""


class CheckpointError(FxppError, ValueError):
    """A checkpoint is missing keys, has wrong shapes or cannot be read."""


class VerificationError(FxppError):
    """The composed stages disagree with the original model."""


class TiedWeightError(FxppError):
    """A weight tied across stages cannot get its whole gradient: its holders keep it
    differently, or a step ended without the tied-weight exchange."""


class LossSetupError(FxppError, ValueError):
    """The loss function does not fit the batch or the last stage's output (no target
    tokens, an auxiliary loss it was not told to add, ...)."""


class ScheduleStepError(FxppError, RuntimeError):
    """A schedule was stepped in a state it cannot run in (a training step with gradients off, ...)."""

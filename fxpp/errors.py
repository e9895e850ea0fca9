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


class OptimizerSettingsError(FxppError, ValueError):
    """An optimizer-step setting is invalid (clipping norm, weight decay, learning-rate schedule)."""

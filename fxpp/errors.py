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


class MemoryLimitError(FxppError, ValueError):
    """No split of the model into the requested stages keeps every rank's predicted peak memory
    within ``memory_limit``."""


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
    """A tied weight's gradients are used before its stages exchanged them, or its holders shard it differently."""


class LossConfigError(FxppError, ValueError):
    """A loss function does not fit the batch or what the last stage returns (no target tokens, an
    auxiliary loss it was not built to add)."""


class ScheduleUsageError(FxppError, RuntimeError):
    """A schedule is stepped in a way it cannot run (a training schedule with gradients disabled)."""


class RunConfigError(FxppError, ValueError):
    """``fxpp run`` settings that no rank can run (a count that is not positive, a batch that does not
    split over the replicas, a flag that needs another)."""


class ModelSourceError(FxppError, ValueError):
    """The model argument of ``fxpp run`` / ``fxpp plan`` is no preset, no directory with a
    ``config.json`` and no transformers ``config.json`` file."""


class DataError(FxppError, ValueError):
    """The training data cannot be used: a missing file, a record without text, no tokenizer, no tokens."""


class SaveDirError(FxppError, ValueError):
    """A ``--save-dir`` does not hold what the run needs: no save to resume, another run's saves, a save
    past ``--steps`` or one made with other settings."""


class RunFailedError(FxppError):
    """A rank of a local run failed, or the run did not finish in time."""


class OptimizerSettingsError(FxppError, ValueError):
    """An optimizer-step setting is invalid (clipping norm, weight decay, learning-rate schedule)."""


class NonFiniteError(FxppError, FloatingPointError):
    """Training produced a non-finite loss or gradient; the run stopped before the optimizer step."""


class DamagedSaveError(SaveDirError):
    """A saved step cannot be trusted: its ``state.json`` is unreadable or lists no files, or a file it
    lists is missing or has another size or checksum than the list says."""


class SaveIOError(FxppError):
    """A file of a run's save cannot be written or read: an unwritable or full ``--save-dir``, a path
    taken by a directory."""


class PeerFailedError(FxppError):
    """Another rank failed while the ranks saved, loaded or chose a step; this rank stops as well,
    naming that rank and its error, instead of waiting for the process group's timeout."""


class TensorParallelError(FxppError, ValueError):
    """A model or stage cannot be split over tensor-parallel ranks as asked: no tensor-parallel plan,
    parameters already sharded, or a tp size that does not divide the heads or another dimension the
    plan shards."""


class CompileError(FxppError, ValueError):
    """A stage cannot be compiled as asked (``build_stage(..., compile=...)``, ``fxpp run --compile``): a
    value that is no backend, a backend torch does not know, no C++ compiler for inductor on CPU, no
    Triton for inductor on CUDA, or a combination that is not built yet (tensor parallelism)."""

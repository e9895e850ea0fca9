"""Where a traced value comes from in the model's source, for error messages.

Terms
-----
user frame
    A Python frame outside fxpp, torch and ``contextlib``: the model's own code (a
    modeling file of transformers, or the user's).
source line
    ``file.py:line`` of the innermost user frame: of the Python stack being traced now
    (:func:`short_stack`), or of an exception's traceback (:func:`user_source_line`).
    ``"<unknown>"`` when there is none.
"""

from __future__ import annotations

import traceback
from typing import Any

UNKNOWN = "<unknown>"


def _is_user_frame(filename: str) -> bool:
    return "/fxpp/" not in filename and "/torch/" not in filename and "/contextlib" not in filename


def short_stack() -> str:
    """The innermost model source line of the current Python stack."""
    for frame in reversed(traceback.extract_stack()):
        if _is_user_frame(frame.filename) and "/transformers/utils/" not in frame.filename:
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return UNKNOWN


def user_source_line(e: BaseException) -> str:
    """The innermost model source line in an exception's traceback."""
    frames = traceback.extract_tb(e.__traceback__)
    for frame in reversed(frames):
        if _is_user_frame(frame.filename):
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return UNKNOWN


def failure_source_line(e: BaseException) -> str:
    """Where a node being evaluated failed: the exception's model frame, else the line being traced."""
    line = user_source_line(e)
    if line != UNKNOWN:
        return line
    return short_stack()


def recorded_user_frame(stack_trace: str | None) -> str | None:
    """The innermost user frame's ``File "...", line N, in name`` of a node's recorded
    stack trace (``node.stack_trace``); None where it has none."""
    frames = [line.strip() for line in (stack_trace or "").splitlines() if line.strip().startswith("File ")]
    frames = [f for f in frames if _is_user_frame(f.partition(", line ")[0])]
    return frames[-1] if frames else None


def target_name(target: Any) -> str:
    """A node target as an error message names it."""
    if isinstance(target, str):
        return target
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)

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
stack trace
    ``node.stack_trace``: the Python stack that created a node, from the outermost
    ``forward`` frame in, as torch.fx's ``record_stack_traces`` records it
    (:class:`StackTraces`).
"""

from __future__ import annotations

import sys
import traceback
from typing import Any, Callable

from torch.utils._traceback import CapturedTraceback

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


class StackTraces:
    """The stack trace of each node a tracer creates, made once per call stack.

    torch.fx's ``record_stack_traces`` symbolizes and formats the whole Python stack for
    every node, a quarter of a millisecond each: more than the rest of a node's making
    once the decoder layers' meta values are shared. What it records depends only on the
    frames from the outermost ``forward`` in (it drops the frames outside, then those in
    torch's uninteresting files, and reads each frame's line from ``linecache``), so the
    text is kept by those frames' file, line and function, and the nodes of one stack
    share it: the calls of a decoder-layer loop, the same line in each trace of a build.
    A text is made as torch.fx makes it, by ``filter_frames`` (the tracer's
    ``_filter_traceback_frames``).
    """

    def __init__(self):
        # (id(code), f_lasti) of each frame, innermost first, to the outermost ``forward``
        # -> (text, the code objects: kept alive, so that no other takes their ids)
        self._texts: dict[tuple, tuple[str | None, list]] = {}

    def current(self, filter_frames: Callable[[traceback.StackSummary], traceback.StackSummary]) -> str | None:
        """The stack trace of a node created by the caller, None where the stack has no ``forward``."""
        key, codes, outermost = [], [], None
        frame = sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            key.append((id(code), frame.f_lasti))
            codes.append(code)
            if code.co_name == "forward":
                outermost = len(key)
            frame = frame.f_back
        if outermost is None:
            return None
        key = tuple(key[:outermost])
        entry = self._texts.get(key)
        if entry is None:
            summary = CapturedTraceback.extract().summary()
            if summary:
                summary = filter_frames(summary)
            entry = self._texts[key] = ("".join(summary.format()).strip() or None if summary else None, codes)
        return entry[0]

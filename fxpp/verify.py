"""``verify=True``: run the composed stages against the model and name where they diverge.

The model runs once with forward hooks on every module a stage calls, recording each
call's output in call order per module. The stages then run one after another under
an ``fx.Interpreter`` that compares every ``call_module`` node's output with the
model's output of the same module at the same call. The first node whose values
differ beyond the tolerance is reported with its stage, node name, module and source
line; if every module agrees but the final outputs do not, the stage output is named.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Interpreter

from .errors import VerificationError


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> tuple[bool, float]:
    if a.shape != b.shape:
        return False, float("inf")
    diff = (a.detach().float() - b.detach().float()).abs()
    return bool((diff <= atol + rtol * b.detach().float().abs()).all()), float(diff.max()) if diff.numel() else 0.0


def verify_pipeline(pipe, inputs: dict[str, Any], *, atol: float = 1e-4, rtol: float = 1e-4) -> float:
    """Compare ``pipe``'s stages with ``pipe.model`` on ``inputs``; return the output's max difference.

    Raises:
        VerificationError: naming the first stage and node whose output diverges.
    """
    model = pipe.model
    targets = sorted({n.target for s in pipe.stages for n in s.graph.nodes if n.op == "call_module"})
    recorded: dict[str, list[torch.Tensor | None]] = {t: [] for t in targets}
    handles = []
    for target in targets:
        module = model.get_submodule(target)
        handles.append(module.register_forward_hook(
            lambda m, a, out, t=target: recorded[t].append(_first_tensor(out))))
    try:
        with torch.no_grad():
            expected = model(**inputs)
    finally:
        for h in handles:
            h.remove()
    expected = getattr(expected, "logits", None) if hasattr(expected, "logits") else expected.last_hidden_state

    seen: dict[str, int] = {}

    class Checking(Interpreter):
        def __init__(self, gm, stage_index):
            super().__init__(gm)
            self.stage_index = stage_index

        def run_node(self, n):
            self.current = n
            return super().run_node(n)

        def call_module(self, target, args, kwargs):
            out = super().call_module(target, args, kwargs)
            k = seen.get(target, 0)
            seen[target] = k + 1
            want = recorded[target][k] if k < len(recorded[target]) else None
            got = _first_tensor(out)
            if want is not None and got is not None:
                ok, diff = _close(got, want, atol, rtol)
                if not ok:
                    node = self.current
                    where = _model_source_lines(node.stack_trace)
                    raise VerificationError(
                        f"stage {self.stage_index} ({pipe.stages[self.stage_index].spec.role.value}, layers "
                        f"{pipe.layer_ranges[self.stage_index]}): node {node.name} ({target}) differs from the model's "
                        f"output of {target} by {diff:.3g} (shape {tuple(got.shape)} vs {tuple(want.shape)})"
                        + (f"; called at {where}" if where else "")
                    )
            return out

    with torch.no_grad():
        out = Checking(pipe.stages[0], 0).run(*_ordered(pipe.stages[0], inputs))
        for i, stage in enumerate(pipe.stages[1:], start=1):
            out = Checking(stage, i).run(*out)
    ok, diff = _close(out, expected, atol, rtol)
    if not ok:
        raise VerificationError(
            f"stage {len(pipe.stages) - 1}: the composed output differs from the model's by {diff:.3g} although every "
            "module call agreed; the difference is in the graph's own ops after the last module"
        )
    return diff


def _model_source_lines(stack_trace: str | None) -> str:
    """The innermost ``File ..., line N`` of the model's own code in a node's stack trace."""
    if not stack_trace:
        return ""
    lines = [line.strip() for line in stack_trace.splitlines() if line.strip().startswith("File ")]
    model_lines = [line for line in lines if "/fxpp/" not in line and "/torch/" not in line]
    if not model_lines:
        return ""
    path, _, rest = model_lines[-1].partition(", line ")
    return f"{path.rsplit('/', 1)[-1].rstrip(chr(34))}:{rest.split(',')[0]}"


def _ordered(stage, inputs):
    names = [n.target for n in stage.graph.nodes if n.op == "placeholder"]
    missing = [n for n in names if inputs.get(n) is None]
    if missing:
        raise VerificationError(f"verify: example inputs lack {missing}")
    return [inputs[n] for n in names]

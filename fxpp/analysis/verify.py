"""``verify=True``: run the composed stages against the model and name where they diverge.

Two comparisons, both on the example inputs:

1. the traced whole-model graph against ``model(**inputs)`` (is the trace faithful?);
2. every stage, run under an ``fx.Interpreter``, node by node against the same node of
   the whole-model graph (stage nodes keep the names of the nodes they were copied
   from). The first node whose value differs beyond the tolerance is reported with its
   stage, node, module and the model's source line.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Interpreter

from ..errors import VerificationError
from ..meta import source_of


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _max_diff(a: Any, b: Any, atol: float, rtol: float) -> float | None:
    """The largest violation of ``|a - b| <= atol + rtol |b|``, or None when within it."""
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        return float("inf")
    worst = None
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            return float("inf")
        if not (x.is_floating_point() or y.is_floating_point()):
            if not torch.equal(x, y):
                return float("inf")
            continue
        diff = (x.detach().float() - y.detach().float()).abs()
        if not bool((diff <= atol + rtol * y.detach().float().abs()).all()):
            d = float(diff.max())
            worst = d if worst is None else max(worst, d)
    return worst


class _Recording(Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n):
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def _model_source_line(stack_trace: str | None) -> str:
    """The innermost model source line (``file.py:N``) of a node's recorded stack."""
    if not stack_trace:
        return ""
    frames = [line.strip() for line in stack_trace.splitlines() if line.strip().startswith("File ")]
    frames = [f for f in frames if "/fxpp/" not in f and "/torch/" not in f]
    if not frames:
        return ""
    path, _, rest = frames[-1].partition(", line ")
    return f"{path.rsplit('/', 1)[-1].rstrip(chr(34))}:{rest.split(',')[0]}"


def verify_pipeline(pipe, inputs: dict[str, Any], *, atol: float = 1e-4, rtol: float = 1e-4) -> float:
    """Compare ``pipe``'s stages with ``pipe.model`` on ``inputs``; return the output's max difference.

    Raises:
        VerificationError: naming the first stage and node whose output diverges.
    """
    model_gm = pipe.model_graph
    names = [n.target for n in model_gm.graph.nodes if n.op == "placeholder"]
    missing = [n for n in names if inputs.get(n) is None]
    if missing:
        raise VerificationError(f"verify: the example inputs lack {missing}")
    with torch.no_grad():
        expected = pipe.model(**inputs)
        expected = expected.logits if getattr(expected, "logits", None) is not None else expected.last_hidden_state
        whole = _Recording(model_gm)
        traced_out = whole.run(*[inputs[n] for n in names])
    diff = _max_diff(traced_out, expected, atol, rtol)
    if diff is not None:
        raise VerificationError(
            f"{type(pipe.model).__name__}: the traced graph's output differs from model(**inputs) by {diff:.3g}; "
            "the trace is not faithful to the forward (please report this model)"
        )

    class Checking(Interpreter):
        def __init__(self, gm, index):
            super().__init__(gm)
            self.index = index

        def run_node(self, n):
            out = super().run_node(n)
            source = source_of(n)
            if source is None or source not in whole.values:
                return out  # plumbing fxpp added (receive, send), not a model value
            d = _max_diff(out, whole.values[source], atol, rtol)
            if d is not None:
                stage = pipe.stages[self.index]
                what = f" ({n.target})" if n.op == "call_module" else ""
                line = _model_source_line(n.stack_trace)
                raise VerificationError(
                    f"stage {self.index} ({stage.spec.role.value}, layers {pipe.layer_ranges[self.index]}): node "
                    f"{n.name}{what} differs from the model by {d:.3g}" + (f"; model source {line}" if line else "")
                )
            return out

    with torch.no_grad():
        first = pipe.stages[0]
        out = Checking(first, 0).run(*[inputs[n] for n in first.input_names])
        for i, stage in enumerate(pipe.stages[1:], start=1):
            out = Checking(stage, i).run(*out)
    diff = _max_diff(out, expected, atol, rtol)
    if diff is not None:
        raise VerificationError(f"the composed stages' output differs from the model's by {diff:.3g}")
    return float((out.float() - expected.float()).abs().max()) if out.numel() else 0.0

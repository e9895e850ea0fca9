"""What the runtime reads from objects of other rooms, named here so it never imports them back.

``fxpp.pipeline.Pipeline`` imports the runtime to build its stages; the runtime only
needs the attributes below. A ``Protocol`` keeps the annotations precise without an
import of ``fxpp.pipeline`` (or of ``stage`` from ``ties``): no circle, not even one
for type checkers.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch.fx import GraphModule


class SplitModel(Protocol):
    """An ``fxpp.Pipeline``: the model, its traced graph and its stage modules (no rank
    state: what a rank built is in ``fxpp.runtime.rank_state``)."""

    model: torch.nn.Module
    model_graph: GraphModule
    stages: list
    example_inputs: dict[str, Any] | None

    def build_stage(self, index: int, device, group=None, **kwargs) -> Any: ...


class TiedStage(Protocol):
    """An ``fxpp.runtime.stage.FxppPipelineStage`` as the tied-weight exchange sees it."""

    stage_index: int
    submod: torch.nn.Module
    _fxpp_owed: bool

    def _fxpp_increment(self, p: torch.nn.Parameter) -> torch.Tensor: ...

    def _fxpp_finish(self) -> None: ...

"""What this rank has built of a pipeline: the runtime's state, not the ``Pipeline``'s.

A ``fxpp.Pipeline`` is the compiler's result and holds no rank state. What
``build_stage`` made on this process (the stages by index, for placement and the
tied-weight exchange, and each stage's runtime GraphModule by ``(index, device)``, reused
when a stage is rebuilt for new shapes) is kept here, per pipeline, for as long as the
pipeline lives (a weak key: dropping the pipeline drops its rank state).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from torch.fx import GraphModule

from .protocols import SplitModel


@dataclass
class RankState:
    """Attributes:
        stages: stage index -> the ``FxppPipelineStage`` built on this rank.
        submodules: ``(index, device)`` -> the stage's runtime GraphModule on this rank.
    """

    stages: dict = field(default_factory=dict)
    submodules: dict[tuple[int, str], GraphModule] = field(default_factory=dict)


_STATES: "weakref.WeakKeyDictionary[SplitModel, RankState]" = weakref.WeakKeyDictionary()


def rank_state(pipe: SplitModel) -> RankState:
    """This rank's state for ``pipe``, made empty on first use."""
    state = _STATES.get(pipe)
    if state is None:
        state = _STATES[pipe] = RankState()
    return state

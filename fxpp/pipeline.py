"""``fxpp.pipeline``: all stages of a model, cut once, traced once."""

from __future__ import annotations

from typing import Any

import torch

from .cuts import crossing_values
from .split import even_split, ranges_from_cuts, roles_for
from .spec import StageRole, StageSpec
from .transform import StageModule, default_example_inputs, num_decoder_layers, trace_annotated, _check_model


class Pipeline:
    """The stages of one model.

    Attributes:
        stages: one :class:`~fxpp.transform.StageModule` per stage, in order.
        layer_ranges: the decoder layers of each stage.
        crossing: for each cut, the names of the values that cross it.
    """

    def __init__(self, model: torch.nn.Module, layer_ranges: list[range], example_inputs: dict[str, Any]):
        self.model = model
        self.layer_ranges = list(layer_ranges)
        self.example_inputs = example_inputs
        model_gm = trace_annotated(model, example_inputs)
        n = num_decoder_layers(model)
        self.stages: list[StageModule] = []
        for role, layers in zip(roles_for(len(layer_ranges)), layer_ranges):
            spec = StageSpec(role=StageRole.parse(role), layers=layers, num_layers=n)
            self.stages.append(StageModule.build(model, model_gm, spec))
        self.crossing = [[v.name for v in crossing_values(model_gm.graph, r.start)] for r in layer_ranges[1:]]
        self.model_graph = model_gm
        self._runtime_stages: dict = {}  # built by build_stage on this rank, by index

    def build_stage(self, index: int, device, group=None, *, style: str = "loop"):
        """Stage ``index`` as a ``torch.distributed.pipelining.PipelineStage``.

        Static input/output metadata come from the example inputs, which must have the
        microbatch's shape. The stage's parameters are the model's own where they
        already live on ``device``; otherwise copies (the model is never moved). The
        last stage holds its own copy of weights tied to the first stage, and their
        gradients are summed between the two ranks at the end of every
        ``schedule.step`` over point-to-point ops on ``group`` (default: the world
        group); see Note [tied-weight sync] in ``fxpp.stage``.

        Args:
            index: the stage id. device: where its parameters and activations live.
            group: the pipeline's process group. style: stage placement, ``"loop"``
                (stage s on rank s % world) or ``"v"`` (ZBVZeroBubble, DualPipeV).
        """
        from .stage import build_stage

        return build_stage(self, index, device, group, style=style)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def __call__(self, **inputs: Any) -> Any:
        """Run every stage in this process, one after another."""
        out = self.stages[0](**inputs)
        for stage in self.stages[1:]:
            out = stage(*out)
        return out

    def __repr__(self) -> str:
        rows = [f"Pipeline({type(self.model).__name__}, {self.num_stages} stages)"]
        for i, (stage, layers) in enumerate(zip(self.stages, self.layer_ranges)):
            params = sum(p.numel() for p in stage.parameters())
            rows.append(f"  stage {i} {stage.spec.role.value:<6} layers {layers.start}-{layers.stop - 1}  params {params:,}")
            if i < len(self.crossing):
                rows.append(f"    cut {layers.stop}: {', '.join(self.crossing[i])}")
        return "\n".join(rows)


def pipeline(
    model: torch.nn.Module,
    num_stages: int,
    example_inputs: dict[str, Any] | None = None,
    *,
    cuts: list[int] | None = None,
) -> Pipeline:
    """Split ``model`` into ``num_stages`` consecutive stages.

    Args:
        model: a transformers decoder-only model (see :func:`fxpp.transform`).
        num_stages: how many stages.
        example_inputs: model inputs by keyword that fix which inputs exist; defaults
            to ``input_ids`` and ``attention_mask``.
        cuts: explicit cut points (``num_stages - 1`` increasing layer indices);
            default: an even split by layer count.

    Raises:
        StageSpecError: impossible ``num_stages`` or ``cuts``.
    """
    _check_model(model)
    n = num_decoder_layers(model)
    if cuts is not None:
        ranges = ranges_from_cuts(n, list(cuts))
        if len(ranges) != num_stages:
            from .errors import StageSpecError

            raise StageSpecError(f"cuts={cuts!r} gives {len(ranges)} stages, not num_stages={num_stages}")
    else:
        ranges = even_split(n, num_stages)
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    return Pipeline(model, ranges, example_inputs)

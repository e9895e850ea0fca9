"""Stage roles and the validated description of one stage."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import StageSpecError


class StageRole(str, enum.Enum):
    """Which part of the model a stage holds.

    FIRST: inputs -> embeddings (and vision) -> layers[0:b]; returns the cut tuple.
    MIDDLE: cut tuple -> layers[a:b]; returns the next cut tuple.
    LAST: cut tuple -> layers[a:L] -> final norm, head, softcapping; returns logits.
    FULL: the whole model.
    """

    FIRST = "first"
    MIDDLE = "middle"
    LAST = "last"
    FULL = "full"

    @classmethod
    def parse(cls, value: "StageRole | str") -> "StageRole":
        if isinstance(value, StageRole):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        raise StageSpecError(
            f"stage_role={value!r} is not a stage role; use fxpp.StageRole.FIRST, MIDDLE, LAST or FULL "
            "(or the strings 'first', 'middle', 'last', 'full')"
        )


@dataclass(frozen=True)
class StageSpec:
    """One stage: its role and the decoder layers ``[layers.start, layers.stop)`` it owns."""

    role: StageRole
    layers: range
    num_layers: int

    def __post_init__(self) -> None:
        role, layers, n = self.role, self.layers, self.num_layers
        if not isinstance(layers, range) or layers.step != 1:
            raise StageSpecError(f"layers={layers!r} must be a range with step 1, e.g. range(0, 4)")
        if layers.start < 0 or layers.stop > n or len(layers) == 0:
            raise StageSpecError(
                f"layers={layers!r} must be a non-empty range inside range(0, {n}) (the model has {n} decoder layers)"
            )
        starts_at_zero = layers.start == 0
        ends_at_last = layers.stop == n
        if role is StageRole.FULL and not (starts_at_zero and ends_at_last):
            raise StageSpecError(f"stage_role='full' owns every layer, range(0, {n}); got layers={layers!r}")
        if role is StageRole.FIRST and not starts_at_zero:
            raise StageSpecError(f"stage_role='first' must start at layer 0; got layers={layers!r}")
        if role is StageRole.FIRST and ends_at_last:
            raise StageSpecError(
                f"stage_role='first' with layers={layers!r} owns every layer, leaving nothing for a last stage; "
                "use stage_role='full' or end the range earlier"
            )
        if role is StageRole.LAST and not ends_at_last:
            raise StageSpecError(f"stage_role='last' must end at the last layer ({n}); got layers={layers!r}")
        if role is StageRole.LAST and starts_at_zero:
            raise StageSpecError(
                f"stage_role='last' with layers={layers!r} starts at layer 0, so nothing embeds the tokens; "
                "use stage_role='full' or start the range later"
            )
        if role is StageRole.MIDDLE and (starts_at_zero or ends_at_last):
            raise StageSpecError(
                f"stage_role='middle' must neither start at layer 0 nor end at layer {n}; got layers={layers!r}"
            )

    @property
    def takes_model_inputs(self) -> bool:
        return self.role in (StageRole.FIRST, StageRole.FULL)

    @property
    def returns_model_output(self) -> bool:
        return self.role in (StageRole.LAST, StageRole.FULL)

"""Graph constants: the objects a trace holds by reference (configs, tensors the forward made).

Terms
-----
constant
    An object that graph code cannot spell as a literal (a config, a module's helper
    object, a tensor the forward created) and that is neither a parameter nor a buffer
    of the model. It becomes a ``get_attr`` node of a numbered name
    (:data:`CONSTANT_PREFIX` + N) on the traced GraphModule.
"""

from __future__ import annotations

import enum
from typing import Any

import torch

# get_attr names of the objects a trace holds as constants (configs, tensors it made);
# numbered per trace, so the same name means different objects in two traces.
CONSTANT_PREFIX = "_fxpp_const_"


class Constants:
    """The constants of one trace, by name (one name per object)."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self._names: dict[int, str] = {}

    def name_of(self, obj: Any) -> str:
        """The ``get_attr`` name of ``obj``, numbered on first sight."""
        name = self._names.get(id(obj))
        if name is None:
            name = f"{CONSTANT_PREFIX}{len(self.objects)}"
            self.objects[name] = obj
            self._names[id(obj)] = name
        return name


def needs_constant(a: Any) -> bool:
    """Objects torch.fx cannot print into code: configs, modules' helper objects."""
    simple = (str, int, float, bool, complex, torch.dtype, torch.device, torch.memory_format, torch.layout, slice, range)
    if a is None or a is ... or isinstance(a, simple):
        return False
    if isinstance(a, (tuple, list, dict)):
        return False
    if isinstance(a, enum.Enum):
        return False
    return True

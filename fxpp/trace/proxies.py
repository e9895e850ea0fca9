"""The proxies of an ``HFTracer``: each carries its node's meta value, so Python can ask it questions.

Terms
-----
meta proxy
    A ``torch.fx.Proxy`` whose node has a meta value (``node.meta["val"]``). Python
    questions on it (``len(x)``, ``int(n)``, ``x.dtype``, ``k in d``) are answered from
    that value and recorded as guards by the tracer it belongs to (``fxpp.trace.guards``).
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch
from torch.fx import Proxy
from torch.fx.proxy import Attribute

from .. import ops
from .targets import CONCRETE_TENSOR_ATTRS


class MetaProxy(Proxy):
    """A Proxy whose node carries a meta value, so Python can ask it questions."""

    def __getattr__(self, name: str) -> Any:
        val = self.node.meta.get("val")
        if name in CONCRETE_TENSOR_ATTRS and isinstance(val, torch.Tensor):
            return getattr(val, name)
        if name == "prod" and isinstance(val, torch.Size):
            # numpy reductions call obj.prod(); torch.Size has none: multiply the dims symbolically.
            dims = [self[i] for i in range(len(val))]
            return lambda *args, **kwargs: functools.reduce(operator.mul, dims, 1)
        if name == "dtype" and isinstance(val, torch.Tensor):
            # Forwards pass dtypes to Python APIs (tensor.type(dtype), torch.finfo): a
            # concrete dtype, guarded so that a stage run in another dtype retraces.
            self.tracer.guards.guard(MetaAttribute(self, "dtype"), val.dtype)
            return val.dtype
        return MetaAttribute(self, name)

    def __len__(self) -> int:
        return self.tracer.concrete_len(self)

    def __int__(self) -> int:
        return self.tracer.concretize(self, int)

    def __index__(self) -> int:
        return self.tracer.concretize(self, int)

    def __float__(self) -> float:
        return self.tracer.concretize(self, float)

    def __contains__(self, item: Any) -> bool:
        return item in self.tracer.meta_of(self)

    def __setitem__(self, key: Any, value: Any) -> None:
        # ``h[mask, :] = v`` (Qwen3-VL's deepstack merge): record the write and make this
        # proxy stand for the written tensor from now on.
        self.node = self.tracer.create_proxy("call_function", ops.setitem, (self, key, value), {}).node


class MetaAttribute(MetaProxy, Attribute):
    pass

"""Stand-ins: a shape-keeping output where MoE dispatch or a data-dependent layer cannot run on fake tensors.

Terms
-----
expert block
    A module inside the decoder-layer stack whose class name says ``expert`` or
    ``moe`` (and not ``vision``, ``visual`` or ``audio``): the routed experts of an MoE
    layer. Their dispatch is data-dependent (``nonzero``, loops over the experts hit)
    or uses kernels whose meta functions are stricter than the CPU kernels
    (``grouped_mm`` in fp32).
stand-in
    ``torch.empty_like`` of the block's first tensor input, as its meta value during
    the meta evaluation of the leaf that holds it: the block is assumed to keep the
    shape of its input. That only feeds meta values, never the numbers a stage
    computes. Each use is listed in :attr:`StandIns.used` (class names).
layer contract
    A decoder layer maps hidden states to hidden states of the same shape. On the meta
    device only (no real example inputs), a whole decoder layer whose own evaluation
    fails on data (MoE dispatch, a sparse-attention token selector) takes the shape of
    its hidden-states input (:meth:`StandIns.layer_contract_applies`). That shape is
    an assumption, checked at run time: it is the shape of the hidden states that cross
    the next cut, which the sending stage checks before it sends
    (``fxpp.runtime.stage.check_sent_shapes``) and the receiving stage checks against
    its inputs ("expected shape like", ``fxpp.stage_module``).
bounded evaluation
    The same for a decoder layer that returns a tuple (GLM-5 Next's returns the hidden
    states and the top-k token picks a later layer reuses): its outputs cannot all be
    taken from its input, so the layer is evaluated again with every data-dependent
    size at its bound (Note [sizes at their bounds] in ``fxpp.trace.values``), and
    kept only if its first output keeps the shape of the hidden states. The other
    outputs' shapes are checked at run time like the hidden states' where they cross a
    cut.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from typing import TYPE_CHECKING, Callable

import torch

from .values import RecordedNeedsData, is_data_dependent

if TYPE_CHECKING:  # the tracer passes itself in; only its type is named here
    from .tracer import HFTracer


@functools.lru_cache(maxsize=None)
def returns_tuple(cls: type) -> bool:
    """Whether ``cls.forward`` has a ``return a, b`` (read from its source, not from its
    return annotation, which is often wrong: Lfm2MoeSparseMoeBlock's says tuple and it
    returns one tensor). Unknown source: ``False``."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(cls.forward))))
    except (OSError, TypeError, SyntaxError, AttributeError):
        return False
    return any(isinstance(n, ast.Return) and isinstance(n.value, ast.Tuple) for n in ast.walk(tree))


class StandIns:
    """Where ``tracer``'s meta evaluation may give an expert block a stand-in."""

    def __init__(self, tracer: "HFTracer", layers_fqn: str, layer_stack: Callable[[str], tuple[set[int], set[int]]]):
        """``layer_stack(layers_fqn)``: the ids of the modules of the decoder-layer stack (the
        only place expert blocks get a stand-in) and of the layers themselves, as a build's
        module walk keeps them (``fxpp.trace.driver.ModuleTree.layer_stack``)."""
        self.tracer = tracer
        self.used: list[str] = []  # class names of the modules given a stand-in
        self._layer_stack_ids, self._layer_ids = layer_stack(layers_fqn)

    def eval_submodule(self, m, forward, args, kwargs):
        """Run a module nested inside a leaf, during the leaf's meta evaluation.

        The stand-in is an assumption, so it is confined to expert blocks inside the
        decoder layers (:meth:`is_expert_block`) that return one tensor, and the leaf
        itself gets none (but see :meth:`layer_contract_applies`): any other failure
        propagates, and the leaf is evaluated on the real example inputs (data-dependent)
        or refused with its node named, rather than given the shape of its input
        (Ernie 4.5 VL's resampler, "Moe" only in its family's name, merges 2x2 patches:
        32 rows in, 8 out).
        """
        tracer = self.tracer
        if tracer.real.running:
            # Real values feed decisions (a mask builder's None, a data guard): a module that
            # fails on them is an error, never an empty_like stand-in with made-up numbers.
            return forward(*args, **kwargs)
        if m is tracer.meta.leaf:
            try:
                return forward(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                if not self.layer_contract_applies(m, e, args):
                    raise  # evaluated on the real example inputs (data-dependent), else refused
                out = self._bounded(forward, args, kwargs) if returns_tuple(type(m)) else torch.empty_like(args[0])
                if out is None:
                    raise
                self.used.append(type(m).__name__)
                return out
        try:
            return forward(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, RecordedNeedsData):
                raise
            if is_data_dependent(e) and tracer.recording.is_recorded(m):
                # a module whose output the model records (a router) must really run: a
                # shape-keeping stand-in would record nothing (Note [data-dependent values])
                raise RecordedNeedsData(f"{type(m).__name__} is recorded and depends on tensor data") from e
            if not self.is_expert_block(m):
                raise  # data-dependent: the leaf is evaluated on the real example inputs; else refused
            first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if first is None or returns_tuple(type(m)):
                # one tensor standing for a tuple would be unpacked along its first dim by the
                # caller (``hidden, _ = self.mlp(x)``: a wrong shape, right only by broadcasting)
                raise
            self.used.append(type(m).__name__)
            return torch.empty_like(first)

    def _bounded(self, forward, args: tuple, kwargs: dict):
        """*bounded evaluation* of a decoder layer that returns a tuple: its outputs with
        data-dependent sizes at their bounds, or None where that fails too or where its
        first output does not keep the shape of the hidden states (the layer contract)."""
        try:
            with self.tracer.fake_mode.sizes_at_bounds():
                out = forward(*args, **kwargs)
        except Exception:  # noqa: BLE001 - the layer's first failure is the one to report
            return None
        first = out[0] if isinstance(out, tuple) and out else None
        hidden = args[0]
        if not isinstance(first, torch.Tensor) or (first.shape, first.dtype) != (hidden.shape, hidden.dtype):
            return None
        return out

    def layer_contract_applies(self, m: torch.nn.Module, e: BaseException, args: tuple) -> bool:
        """Whether a decoder layer whose own meta evaluation failed on tensor data may take
        the shape of its hidden-states input (*layer contract* above).

        Only without real example inputs (a meta-device model: nothing to evaluate; JetMoE's
        layers route their attention through data-dependent experts, GLM-5 Next's and
        Qwen4-Exp's pick the tokens each query attends to with ``nonzero``), only for an
        entry of the decoder-layer stack, which maps hidden states to the next layer's
        hidden states, returning one tensor, and never for a layer holding a recorded
        module (a router: its output must really be computed). With real inputs the layer
        is evaluated on them instead, so its meta value is the real shape.
        """
        return (
            not self.tracer.real.inputs
            and is_data_dependent(e)
            and not isinstance(e, RecordedNeedsData)
            and id(m) in self._layer_ids
            and bool(args) and isinstance(args[0], torch.Tensor)
        )

    def is_expert_block(self, m: torch.nn.Module) -> bool:
        """Whether ``m`` is an expert block, whose data-dependent dispatch keeps the shape
        of its input (see :meth:`eval_submodule`); other modules get real evaluation."""
        if id(m) not in self._layer_stack_ids:
            # expert blocks are parts of decoder layers; elsewhere "moe" in a class name is
            # often only the family's (Ernie4_5_VLMoeVariableResolutionResamplerModel)
            return False
        name = type(m).__name__.lower()
        if any(v in name for v in ("vision", "visual", "audio")):
            return False  # towers of MoE VLMs (Qwen3VLMoeVisionModel) are not expert blocks
        return "expert" in name or "moe" in name

"""Outputs that transformers records with hooks inside leaf modules (router logits).

transformers 5 collects some outputs of submodules through forward hooks: a forward
decorated with ``capture_outputs`` activates a collector, and hooks on the classes of
its ``_can_record_outputs`` (``OutputRecorder(Qwen3MoeTopKRouter, index=0)`` for
``router_logits``) append what those modules return. The decoder layers that hold
those modules are leaves for fxpp, so the trace never runs the hooks: the collected
tuple would be empty and, for a MoE model with ``output_router_logits=True``, the
load-balancing loss lost.

fxpp records them explicitly instead. While a forward that captures outputs is traced
with a *recordable* output requested (anything but hidden states and attentions,
which fxpp does not return), each leaf module call gets one
``fxpp.ops.take_recorded(path, index, occurrence, after=<the call>)`` node per value a
recorded submodule produced during the call (found by running the leaf on fake
tensors with temporary hooks), and the forward sees those nodes as its collected
tuple. At run time a stage registers temporary hooks on exactly those submodules for
the duration of its call (:func:`recording_hooks`), so each ``take_recorded`` node
reads the value its submodule returned in that call. The values are then ordinary
graph values: they cross cuts like any other and carry gradients back to the routers.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from .. import ops

# Recorded outputs that fxpp does not return (it returns logits), so never records.
NOT_RECORDED = frozenset({"hidden_states", "attentions", "cross_attentions", "mask_decoder_attentions"})


def recorder_specs(module: torch.nn.Module, kwargs: dict) -> list[tuple[str, Any]]:
    """``(key, OutputRecorder)`` of each output ``module``'s forward would collect for this call."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, OutputRecorder
    except ImportError:  # pragma: no cover - older transformers
        return []
    flags = _CAN_RECORD_REGISTRY.get(module)
    config = getattr(module, "config", None)
    specs = []
    for key, layer_specs in sorted(flags.items()):
        if key in NOT_RECORDED:
            continue
        requested = kwargs.get(f"output_{key}", getattr(config, f"output_{key}", False))
        if not isinstance(requested, bool) or not requested:
            continue
        for spec in layer_specs if isinstance(layer_specs, list) else [layer_specs]:
            if not isinstance(spec, OutputRecorder):  # transformers' own normalisation
                spec = OutputRecorder(target_class=None if isinstance(spec, str) else spec, index=1,
                                      class_name=spec if isinstance(spec, str) else None)
            specs.append((key, spec))
    return specs


def recorded_submodules(leaf: torch.nn.Module, leaf_path: str, specs: list[tuple[str, Any]]) -> list[tuple[str, str, int]]:
    """``(key, submodule path, output index)`` of each submodule of ``leaf`` a spec records.

    The matching rules of transformers' ``recursively_install_hooks``: an instance of
    the spec's class, or a path ending in its class name; and, if the spec names a
    layer, a path containing it.
    """
    found = []
    for name, sub in leaf.named_modules():
        path = f"{leaf_path}.{name}" if name else leaf_path
        for key, spec in specs:
            by_class = spec.target_class is not None and isinstance(sub, spec.target_class)
            by_name = spec.class_name is not None and path.endswith(spec.class_name)
            if not (by_class or by_name):
                continue
            if spec.layer_name is not None and f".{spec.layer_name.strip('.')}." not in f"{path}.":
                continue
            found.append((key, path, spec.index))
    return found


def _selected(output: Any, index: int) -> Any:
    return output[index] if isinstance(output, tuple) else output


@contextlib.contextmanager
def recording_hooks(root: torch.nn.Module, targets: list[tuple[str, int]]) -> Iterator[dict[str, list]]:
    """Temporary forward hooks that collect what each ``(submodule path, index)`` returns.

    Yields the collector (path -> values in call order); the hooks are removed on exit,
    so the model is left as it was.
    """
    collected: dict[str, list] = {path: [] for path, _ in targets}
    handles = []
    try:
        for path, index in targets:
            def hook(module, args, output, path=path, index=index):
                value = _selected(output, index)
                if value is not None:
                    collected[path].append(value)

            handles.append(root.get_submodule(path).register_forward_hook(hook))
        token = ops.RECORDED.set(collected)
        try:
            yield collected
        finally:
            ops.RECORDED.reset(token)
    finally:
        for handle in handles:
            handle.remove()


def recording_targets(graph: torch.fx.Graph) -> list[tuple[str, int]]:
    """The ``(submodule path, index)`` pairs a graph's ``take_recorded`` nodes read, sorted."""
    return sorted({(n.args[0], n.args[1]) for n in graph.nodes
                   if n.op == "call_function" and n.target is ops.take_recorded})

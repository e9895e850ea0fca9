"""Per-block memory, read off the trace: what each module keeps for the backward.

Terms
-----
block
    The prelude (modules before the first decoder layer: embeddings, vision tower), one
    decoder layer, or the head (final norm, LM head), as in ``fxpp.analysis.costs``.
saved bytes
    What the autograd graph keeps of a block's forward for its backward: every tensor
    packed through ``torch.autograd.graph.saved_tensors_hooks``, each storage once,
    parameters left out (a matmul saves its weight, but that memory is the parameters').
    Measured by running each module of the block once under a ``FakeTensorMode`` on the
    device the stages will run on (so the device's own kernels decide what is saved:
    CPU and CUDA flash attention save ``O(S)``, the math kernel ``O(S^2)``), with the
    input shapes the trace recorded for the microbatch. Nothing is allocated.
own / inherited
    A saved storage the block made itself is its *own*; one of its inputs (the previous
    layer's output, rotary ``cos``/``sin``, a mask) is *inherited* and counted once per
    stage by the node that made it (Note [stage activations] in ``fxpp.analysis.stage_memory``).

A module the fake mode cannot run (data-dependent shapes, e.g. MoE routing with
``nonzero``) runs for real on the CPU with random values of the recorded shapes and
random parameters of the same shapes, once; its saved bytes are then those of that run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_flatten, tree_map

from .annotate import info


@dataclass(frozen=True)
class BlockMemory:
    """Memory facts of one block (see the module glossary).

    Attributes:
        name: ``"prelude"``, ``"layer i"`` or ``"head"``.
        param_bytes: its parameters (each once, at their dtype); the head counts a weight
            tied to the embeddings again (the last stage holds its own copy).
        trainable_bytes: the share of ``param_bytes`` that requires grad.
        largest_param: the largest single parameter tensor, in bytes.
        trainable_tensors: how many parameter tensors require grad (AdamW keeps a step per tensor).
        own_saved: saved bytes of storages the block made.
        inherited: ``{(node name, output index): (bytes, position, rematerialized)}`` of saved
            inputs made by other nodes, with that node's position and whether every stage
            recomputes it (``fxpp.analysis.annotate``).
        out_bytes: bytes of the block's (last module's) output.
        weight_grads_kept: bytes a zero-bubble schedule keeps between a microbatch's input
            backward (``I``) and its weight backward (``W``): torch's ``stage_backward_input``
            stores the gradient at the output of every operation that uses a weight, i.e.
            the output size of every submodule with trainable parameters.
    """

    name: str
    param_bytes: int = 0
    trainable_bytes: int = 0
    largest_param: int = 0
    trainable_tensors: int = 0
    own_saved: int = 0
    inherited: dict = field(default_factory=dict)
    out_bytes: int = 0
    weight_grads_kept: int = 0


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def value_bytes(v) -> int:
    """Bytes of every tensor in a (nested) value, e.g. a node's ``meta["val"]``."""
    return sum(tensor_bytes(t) for t in tree_flatten(v)[0])


def _storage_key(t: torch.Tensor):
    return t.untyped_storage()._cdata


class _SavedTensors:
    """``saved_tensors_hooks`` that record each saved storage once, keeping the tensors alive
    while recording so no storage address is reused."""

    def __init__(self, skip: set):
        self.skip = skip
        self.seen: dict = {}
        self._alive: list = []

    def pack(self, t):
        if isinstance(t, torch.Tensor):
            key = _storage_key(t)
            if key not in self.skip and key not in self.seen:
                self.seen[key] = t.untyped_storage().nbytes()
                self._alive.append(t)
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def _module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}


def _fresh(val, device, make):
    """A new tensor like a traced value (shape, dtype, requires_grad), made by ``make``."""
    if not isinstance(val, torch.Tensor):
        return val
    t = make(val.shape, val.dtype, device)
    if val.requires_grad and val.dtype.is_floating_point:
        t.requires_grad_(True)
    return t


def _run_module(module, node: Node, device, make, example_values: dict):
    """Run ``module`` on new tensors shaped like ``node``'s traced inputs; return the saved storages
    split into own bytes and ``{(input node, index): bytes}``, and the output's bytes."""
    state = {name: make(t.shape, t.dtype, device).requires_grad_(t.requires_grad) if t.dtype.is_floating_point
             else make(t.shape, t.dtype, device) for name, t in _module_state(module).items()}
    param_keys = {_storage_key(t) for t in state.values()}
    origins: dict = {}

    def value_of(arg):
        if not isinstance(arg, Node):
            return arg
        if arg.op == "placeholder" and arg.name in example_values and make is _random:
            v = example_values[arg.name]
            return v.to(device) if isinstance(v, torch.Tensor) else v
        val = arg.meta.get("val")
        flat, spec = tree_flatten(val)
        new = [_fresh(v, device, make) for v in flat]
        for i, t in enumerate(new):
            if isinstance(t, torch.Tensor):
                origins.setdefault(_storage_key(t), (arg.name, i))
        return spec.unflatten(new) if flat else val

    args = tree_map(value_of, node.args, is_leaf=lambda x: isinstance(x, Node))
    kwargs = tree_map(value_of, dict(node.kwargs), is_leaf=lambda x: isinstance(x, Node))
    weighted = [0]

    def keep_output(_mod, _inp, output):  # what the input backward of a zero-bubble schedule keeps for W
        weighted[0] += value_bytes(output)

    hooks = [m.register_forward_hook(keep_output) for m in module.modules()
             if any(p.requires_grad for p in m.parameters(recurse=False))]
    try:
        with _SavedTensors(param_keys) as saved:
            out = torch.func.functional_call(module, state, tuple(args), kwargs)
    finally:
        for h in hooks:
            h.remove()
    own, inherited = 0, {}
    for key, nbytes in saved.seen.items():
        if key in origins:
            inherited[origins[key]] = inherited.get(origins[key], 0) + nbytes
        else:
            own += nbytes
    return own, inherited, value_bytes(out), weighted[0]


def _fake(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def _random(shape, dtype, device):
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype, device=device) * 0.02
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def module_saved_bytes(module: torch.nn.Module, node: Node, device: torch.device, example_values: dict | None = None):
    """``(own, inherited, out_bytes, weighted)`` of one traced ``call_module`` node (see the module
    glossary; ``weighted``: the output bytes of its submodules with trainable parameters).

    Under a ``FakeTensorMode`` on ``device``; where that cannot run the module
    (data-dependent shapes), for real on the CPU with random values of the traced shapes.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: F401 - private torch module, loaded on use

    try:
        with FakeTensorMode(allow_non_fake_inputs=False):
            return _run_module(module, node, device, _fake, example_values or {})
    except Exception:  # noqa: BLE001 - any fake-mode refusal (data-dependent op) falls back to a real run
        return _run_module(module, node, torch.device("cpu"), _random, example_values or {})


def block_of(node: Node, num_layers: int) -> int:
    """The block index of a node: 0 the prelude, ``1 + i`` layer ``i``, ``num_layers + 1`` the head."""
    rec = info(node)
    if rec.role == "layer":
        return 1 + rec.layer
    if rec.position >= 0:
        return num_layers + 1
    return 0


def _param_facts(modules: list[torch.nn.Module]) -> tuple[int, int, int, int]:
    seen: set[int] = set()
    total = trainable = largest = count = 0
    for m in modules:
        for p in m.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = tensor_bytes(p)
            total += n
            trainable += n if p.requires_grad else 0
            count += 1 if p.requires_grad else 0
            largest = max(largest, n)
    return total, trainable, largest, count


def block_memory(gm: GraphModule, num_layers: int, device: torch.device, example_values: dict | None = None,
                 layer_modules: list[torch.nn.Module] | None = None) -> list[BlockMemory]:
    """``[prelude, layer 0, ..., layer L-1, head]`` memory facts (see :class:`BlockMemory`).

    Each distinct decoder layer (same class, layer type and parameter shapes) is run once;
    the others reuse its numbers. Layers the trace does not call keep their parameters
    and save nothing.
    """
    modules = dict(gm.named_modules())
    members: dict[int, list] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            members.setdefault(block_of(node, num_layers), []).append(node)
    cache: dict = {}
    blocks = []
    names = ["prelude"] + [f"layer {i}" for i in range(num_layers)] + ["head"]
    for b, name in enumerate(names):
        nodes = members.get(b, [])
        mods = [modules[n.target] for n in nodes]
        if not nodes and 1 <= b <= num_layers and layer_modules is not None:
            mods = [layer_modules[b - 1]]
        total, trainable, largest, count = _param_facts(mods)
        own, inherited, out, kept = 0, {}, 0, 0
        for n in nodes:
            m = modules[n.target]
            key = None
            if info(n).role == "layer":
                shapes = tuple((k, tuple(t.shape), t.dtype) for k, t in _module_state(m).items())
                key = (type(m), info(n).layer_type, shapes, _arg_shapes(n))
            if key is not None and key in cache:
                o, inh_by_pos, out, w = cache[key]
                inh = {(_input_names(n)[pos], i): v for (pos, i), v in inh_by_pos.items()}
            else:
                o, inh, out, w = module_saved_bytes(m, n, device, example_values)
                if key is not None:
                    pos_of = {nm: p for p, nm in enumerate(_input_names(n))}
                    cache[key] = (o, {(pos_of[nm], i): v for (nm, i), v in inh.items()}, out, w)
            own += o
            kept += w
            producers = {a.name: a for a in n.all_input_nodes}
            for (nm, i), v in inh.items():
                rec = info(producers[nm])
                # model inputs (position -2 here) are the caller's tensors, never a stage's
                pos = -2 if producers[nm].op == "placeholder" else rec.position
                prev = inherited.get((nm, i), (0, pos, rec.rematerialize))
                inherited[(nm, i)] = (max(prev[0], v), pos, rec.rematerialize)
        blocks.append(BlockMemory(name, total, trainable, largest, count, own, inherited, out, kept))
    return blocks


def _input_names(node: Node) -> list[str]:
    return [a.name for a in node.all_input_nodes]


def _arg_shapes(node: Node) -> tuple:
    out = []
    for a in node.all_input_nodes:
        flat = tree_flatten(a.meta.get("val"))[0]
        out.append(tuple((tuple(t.shape), t.dtype, t.requires_grad) if isinstance(t, torch.Tensor) else type(t)
                         for t in flat))
    return tuple(out)

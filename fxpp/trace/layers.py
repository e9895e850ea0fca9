"""Where the decoder layers are, and which modules the tracer traces through (the trace path).

Terms:

*layer stack*
    An ``nn.ModuleList`` of blocks (modules with submodules of their own, not bare
    ``Linear``/``LayerNorm``/rotary lists such as Gemma 3n's ``altup_projections``)
    that no other ``ModuleList`` contains (Longcat's per-layer ``self_attn`` pairs and
    MoE expert lists are parts of a layer, not stacks) and that lies outside the
    media towers (``vision``, ``visual``, ``audio`` in its name).
*decoder-layer stack*
    The layer stack fxpp cuts: cut ``k`` sits before its entry ``k``. See
    Note [Which stack is the decoder's].
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import torch
import torch.fx

from ..errors import UnsupportedModelError
from ..model_facts import is_encoder_decoder

# Note [Which stack is the decoder's]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Structure decides, not a count: a model with one layer stack is cut in that stack,
# whatever its length (Longcat Flash counts num_hidden_layers = 2 * len(layers), one
# per attention sublayer of its two-sublayer layers). Only among several stacks does
# the text config's num_hidden_layers pick one (XLM's parallel attentions/ffns lists,
# a stack beside a media encoder whose name does not say so, BLIP-2's Q-Former), then
# the stack sharing the longest path with the token embeddings, then the shallowest.
# Several stacks and none of the layer count: the model runs more than one stack on
# the text path (BLT's byte encoder, patch transformer, byte decoder and entropy
# patcher; HRM's L and H stacks, run alternately in cycles), and fxpp, which cuts one
# stack run once in order, refuses it naming the stacks and any stack run in a loop.

MEDIA_PARTS = ("vision", "visual", "audio")


def find_decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The qualified name and the ``ModuleList`` of the text decoder layers.

    See Note [Which stack is the decoder's].

    Raises:
        UnsupportedModelError: not a transformers model, an encoder-decoder model, no
            layer stack, or several stacks of which none is the decoder's.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no .config; fxpp needs a transformers model")
    stacks = layer_stacks(model)
    if is_encoder_decoder(model):
        stacks = _outside_encoder(model, stacks)
    if not stacks:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no nn.ModuleList of layer blocks outside its media towers; "
            "fxpp needs a decoder-only model whose layers live in one nn.ModuleList"
        )
    if len(stacks) == 1:
        return stacks[0]
    num_layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    counted = [(name, stack) for name, stack in stacks if len(stack) == num_layers]
    if not counted:
        raise UnsupportedModelError(_several_stacks_message(model, stacks))
    # Other stacks of the same length (BLIP-2's Q-Former layers) are not the text decoder:
    # prefer the stack that shares the longest path with the token embeddings, then the
    # shallowest.
    text_path = _token_embedding_path(model)
    counted.sort(key=lambda c: (-_shared_parts(c[0], text_path), c[0].count("."), c[0]))
    return counted[0]


def _outside_encoder(model: torch.nn.Module, stacks):
    """The stacks of an encoder-decoder model outside its encoder (``get_encoder()``):
    the encoder runs whole in the first stage, the decoder's stack is cut."""
    try:
        encoder = model.get_encoder()
    except Exception as e:  # noqa: BLE001
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder model whose get_encoder() fails "
            f"({type(e).__name__}: {e}); fxpp cuts the decoder's layer stack and needs to know the encoder") from e
    path = next((n for n, m in model.named_modules() if m is encoder), None)
    if not path:
        return stacks
    return [(n, s) for n, s in stacks if not n.startswith(path + ".")]


def layer_stacks(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """The model's layer stacks (see the module docstring), in ``named_modules`` order."""
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) > 0]
    stacks = []
    for name, module in lists:
        if any(part in name for part in MEDIA_PARTS):
            continue
        if any(name.startswith(outer + ".") for outer, _ in lists):
            continue
        if not all(any(True for _ in block.children()) for block in module):
            continue
        stacks.append((name, module))
    return stacks


def _several_stacks_message(model: torch.nn.Module, stacks: list[tuple[str, torch.nn.ModuleList]]) -> str:
    described = ", ".join(f"{name} ({_blocks(stack)})" for name, stack in stacks)
    loops = [loop for name, _ in stacks if (loop := _run_in_loop(model, name)) is not None]
    found = f"{type(model).__name__} has {len(stacks)} stacks of layers: {described}"
    if loops:
        return (
            f"{found}; {'; '.join(dict.fromkeys(loops))}. fxpp cuts one stack of decoder layers, each run "
            "once in order: no range of these layers is a pipeline stage"
        )
    return (
        f"{found}. fxpp cuts a decoder that is one stack of layers run once in order, not several "
        "stacks run one after another"
    )


def _blocks(stack: torch.nn.ModuleList) -> str:
    classes = list(dict.fromkeys(type(block).__name__ for block in stack))
    return f"{len(stack)} x {' / '.join(classes)}"


def _run_in_loop(model: torch.nn.Module, fqn: str) -> str | None:
    """Where an ancestor's forward calls the next module towards ``fqn`` inside a loop.

    The stack's own ``for layer in self.layers`` is not such a loop; a loop around the
    module that owns the stack (HRM's ``for ... in range(L_cycles): self.L_module(...)``)
    runs every layer of the stack several times in one forward.
    """
    parts = fqn.split(".")
    for i in range(len(parts) - 1):
        parent = model.get_submodule(".".join(parts[:i]))
        line = _loop_call_line(type(parent), parts[i])
        if line is not None:
            child = ".".join(parts[: i + 1])
            return f"{type(parent).__name__}.forward calls {child} in a loop ({line}), so its layers run more than once"
    return None


def _loop_call_line(cls: type, attr: str) -> str | None:
    """``file:line`` of a ``self.<attr>(...)`` call inside a ``for``/``while`` of ``cls.forward``."""
    forward = inspect.unwrap(cls.forward)
    try:
        lines, first = inspect.getsourcelines(forward)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return None
    for loop in ast.walk(tree):
        if not isinstance(loop, (ast.For, ast.While)):
            continue
        for node in ast.walk(loop):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"):
                return f"{inspect.getsourcefile(forward).rsplit('/', 1)[-1]}:{first + node.lineno - 1}"
    return None


def _token_embedding_path(model: torch.nn.Module) -> list[str]:
    """The qualified name of the module holding the input token embeddings, as parts."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return []
    for name, module in model.named_modules():
        if module is embeddings:
            return name.split(".")[:-1]
    return []


def _shared_parts(name: str, path: list[str]) -> int:
    shared = 0
    for a, b in zip(name.split("."), path):
        if a != b:
            break
        shared += 1
    return shared


def trace_path(layers_fqn: str) -> frozenset[str]:
    parts = layers_fqn.split(".")
    return frozenset([""] + [".".join(parts[:i]) for i in range(1, len(parts))])

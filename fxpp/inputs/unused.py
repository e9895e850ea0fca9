"""No input the caller gives may vanish from the graph.

A traced forward can drop an input without any error: the input reaches a parameter
the forward never reads (an old argument name whose renaming decorator was lost), a
branch the trace did not take, or ``**kwargs`` that nothing consumes. The stages would
then compute the model *without* that input, and the only symptom is wrong numbers.
So after tracing, every input the caller gave (not ``None``) must be *consumed*: its
placeholder must have a path to the graph output.

Consumed, even where the input changes nothing for one particular call: an all-ones
``attention_mask`` is read by the mask builder node, which feeds every decoder layer
whatever it returns at run time, or, where the builder returned ``None`` and the
forward took its own ``mask is None`` branch, feeds the ``check_is_none`` guard that
re-checks that decision on every call (a mask that needs masking retraces);
``inputs_embeds`` read by a mask builder only for its shape is an argument of that
node. Not consumed: a placeholder without users, or one whose only readers lead
nowhere, such as a ``check_guard`` node (a guard asserts the shapes the graph was
built for; nothing reads its result).

Tolerated (:func:`tolerated_reason`): two inputs that tokenizers and processors return
for every model, which some models accept and ignore exactly as the unpatched model
does, so ignoring them changes nothing:

* ``attention_mask`` when the graph calls no mask builder of
  ``transformers.masking_utils`` at all: the model has no padding-mask machinery for
  the mask to feed (xLSTM is recurrent; CPM-Ant builds its mask from its own span
  inputs and documents ``attention_mask`` as a dummy). A model that builds masks and
  still drops ``attention_mask`` is the tracer's fault and is rejected.
* ``mm_token_type_ids``: multimodal token types select a masking scheme that a config
  may switch off (Gemma 4 reads them only when ``use_bidirectional_attention ==
  "vision"``). The price: a trace that wrongly dropped them elsewhere (Qwen3-VL's
  ``get_rope_index``) would not be caught here.

Also accepted, after running the model (:func:`ignored_by_the_model`): an unconsumed input whose changes leave the unpatched model's
logits bit-identical on the example inputs, so the model itself takes it and ignores it
(GraniteMoeHybrid without rotary embeddings and ``position_ids``). A lost input that the
model does read moves its logits and is still refused.

Media inputs given to a model without a vision or audio path would only reach
``**kwargs``: :func:`reject_media_without_path` refuses them by name.

All but :func:`ignored_by_the_model` (which runs the model, never the tracer) are pure
functions of the graph: they read it and raise, nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx

from .. import ops
from ..errors import StageInputError
from ..model_facts import TRACE_KWARGS, forward_parameters, model_unchanged, select_output
from .names import is_media_input


# Guards whose check is a use of the value: the branch the forward took on a mask builder's
# result (see the module docstring) or on other tensor data; shape guards (check_guard) are not.
_DECIDING_GUARDS = (ops.check_is_none, ops.check_is_not_none, ops.check_data)


def consumed_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Every node from which some path reaches the output node or a mask-branch guard
    (those included)."""
    outputs = [n for n in graph.nodes if n.op == "output" or (n.op == "call_function"
                                                                and n.target in _DECIDING_GUARDS)]
    seen: set[torch.fx.Node] = set(outputs)
    stack = list(outputs)
    while stack:
        node = stack.pop()
        for parent in node.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def unconsumed_inputs(gm: torch.fx.GraphModule, given: Iterable[str]) -> list[str]:
    """The names in ``given`` whose placeholder does not reach ``gm``'s output, sorted.

    ``given``: the inputs the caller passed (``None`` values already left out). A name
    without a placeholder counts as unconsumed too: the trace did not even make it a
    graph input. Tolerated inputs are reported here as well; see
    :func:`reject_unconsumed_inputs`.
    """
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    reached = consumed_nodes(gm.graph)
    return sorted(name for name in set(given) if placeholders.get(name) not in reached)


def _builds_masks(graph: torch.fx.Graph) -> bool:
    return any(n.op == "call_function" and getattr(n.target, "__module__", "") == "transformers.masking_utils"
               for n in graph.nodes)


def tolerated_reason(gm: torch.fx.GraphModule, name: str) -> str | None:
    """Why leaving the unconsumed input ``name`` out of ``gm`` is harmless, or None."""
    if name == "attention_mask" and not _builds_masks(gm.graph):
        return ("the model builds no attention mask (no masking_utils mask builder); the unpatched model ignores "
                "it too")
    if name == "mm_token_type_ids":
        return "multimodal token types select a masking scheme that the model's config may switch off"
    return None


def reject_unconsumed_inputs(model_class_name: str, gm: torch.fx.GraphModule, given: Iterable[str]) -> None:
    """Raise :class:`~fxpp.errors.StageInputError` if an input in ``given`` vanished from ``gm``.

    Call it right after tracing, with the names of the inputs the *caller* gave (not
    inputs fxpp added itself). Tolerated inputs (:func:`tolerated_reason`) pass.
    """
    missing = [n for n in unconsumed_inputs(gm, given) if tolerated_reason(gm, n) is None]
    if not missing:
        return
    names = ", ".join(repr(n) for n in missing)
    many = len(missing) > 1
    it = "them" if many else "it"
    raise StageInputError(
        f"{model_class_name}: input{'s' if many else ''} {names} {'are' if many else 'is'} given, but the model's "
        f"traced forward does not use {it}: nothing it computes depends on {it}, so fxpp would silently ignore "
        f"{it}. Leave out inputs this model does not take (check the name{'s' if many else ''} against "
        f"{model_class_name}.forward: an argument it accepts but never reads, or one that only reaches **kwargs); "
        "if the unpatched model does use it, the trace lost it, which is a bug in fxpp to report"
    )


def _perturbations(value: torch.Tensor) -> list[torch.Tensor]:
    """Other values of an input, each a change any model that reads it would see: the
    values reversed along the sequence, and a constant (zeros for ids and positions,
    the value plus one for floats)."""
    other = torch.zeros_like(value) if not value.is_floating_point() else value + 1
    return [value.flip(-1), other]


def ignored_by_the_model(model: torch.nn.Module, inputs: dict[str, Any], names: list[str]) -> set[str]:
    """The inputs of ``names`` (unconsumed by the traced graph) that the unpatched model
    ignores as well: its training forward gives bit-identical logits when the input is
    changed (:func:`_perturbations`) on the example inputs.

    The graph not reading an input is the tracer's fault when the model does read it
    (a lost renaming decorator: Fuyu's ``image_patches``), and then the logits move;
    when they do not move for two different changes, the model itself takes the input
    and ignores it (GraniteMoeHybrid without rotary embeddings ignores ``position_ids``;
    its masks do not read them either). Not checkable on the meta device or without
    real example values: such inputs stay unconsumed and the build refuses them.
    """
    candidates = [n for n in names if isinstance(inputs.get(n), torch.Tensor) and inputs[n].numel()]
    if not candidates or any(p.is_meta for p in model.parameters()):
        return set()
    if any(isinstance(v, torch.Tensor) and v.is_meta for v in inputs.values()):
        return set()

    def logits(call_inputs):
        # the same random stream for every call: dropout in train mode is not a change
        with torch.random.fork_rng(devices=[]), torch.no_grad(), model_unchanged(model):
            torch.manual_seed(0)
            return select_output(model(**call_inputs, **TRACE_KWARGS))

    ignored = set()
    base = logits(inputs)
    for name in candidates:
        if all(torch.equal(base, logits({**inputs, name: other})) for other in _perturbations(inputs[name])):
            ignored.add(name)
    return ignored


def reject_media_without_path(model: torch.nn.Module, gm: torch.fx.GraphModule) -> None:
    """Image or audio inputs given to a model without that modality would only reach
    ``**kwargs`` and be dropped; that is a mistake to report, not to ignore.

    Raises:
        StageInputError: a media input reached the graph of a model without a vision or audio path.
    """
    named = forward_parameters(model)
    config = model.config
    has_media = any(getattr(config, k, None) is not None for k in ("vision_config", "audio_config"))
    ignored = [n.target for n in gm.graph.nodes if n.op == "placeholder" and n.target not in named
               and is_media_input(n.target)]
    if ignored and not has_media:
        raise StageInputError(
            f"{type(model).__name__}.forward does not use input(s) {ignored}: it has no vision or audio path, so "
            "they would only reach **kwargs. Image and audio inputs go to vision-language models"
        )

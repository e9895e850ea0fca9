"""The compile driver: a model and a stage request in, a :class:`StageModule` out.

One descent, no return trips: the door validates the request; ``fxpp.inputs`` says
which examples to trace (it yields them); each example is compiled by the passes of
:data:`PASSES`, in that order; the stage is extracted from the canonical graph and
wrapped (``fxpp.stage_module``). ``fxpp.transform`` is the door for one stage,
``fxpp.pipeline`` (``fxpp/pipeline.py``) the door for all of them.

Terms
-----
canonical graph
    The whole model traced for every input of the signature (:func:`trace_canonical`).
pass
    One step of :func:`compile_example`, a function ``(ctx, gm)`` that checks or
    rewrites the whole-model graph in place. Each pass's graph is logged at debug level
    on ``logging.getLogger("fxpp.compile")``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.fx import GraphModule

from .analysis.annotate import annotate
from .errors import StageSpecError, UnsupportedModelError
from .inputs.signature import (InputSignature, alternative_token_inputs, declared_text_only, default_example_inputs,
                               default_text_input, forward_parameters, media_example, media_example_refusal,
                               media_left_out, representative_present_sets, required_input, text_input_candidates,
                               text_inputs_not_taken, text_inputs_taken, wants_example_media)
from .inputs.unused import (ignored_by_the_model, reject_media_without_path, reject_unconsumed_inputs,
                            tolerated_reason, unconsumed_inputs)
from .meta import SIGNATURE_KEY, TRACE_KEY, SignatureRecord, TraceRecord, trace_record
from .model_facts import model_device
from .passes.dense_masked_rows import dense_masked_rows
from .passes.guard_mask_branches import guard_mask_branches
from .spec import StageRole, StageSpec
from .stage_module import StageModule
from .trace import find_decoder_layers, module_tree, trace_model
from .trace.meta_eval import LeafValues

log = logging.getLogger("fxpp.compile")


def check_model(model: Any) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is a transformers model."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise UnsupportedModelError(
            f"model={type(model).__name__!s} is not a transformers model (an nn.Module with a .config); "
            "pass e.g. a LlamaForCausalLM, LlamaModel or *ForConditionalGeneration instance"
        )


def num_decoder_layers(model: torch.nn.Module) -> int:
    check_model(model)
    return len(find_decoder_layers(model)[1])


# ---------------------------------------------------------------------------------------
# One example: trace, then each pass in order


@dataclass(frozen=True)
class CompileContext:
    """What the passes of one example read: the model, the inputs it is traced with, and
    its decoder-layer stack (``fxpp.trace.find_decoder_layers``, found once per example)."""

    model: torch.nn.Module
    inputs: dict[str, Any]
    layers_fqn: str
    num_layers: int


def _reject_media_without_path(ctx: CompileContext, gm: GraphModule) -> None:
    reject_media_without_path(ctx.model, gm)


def _reject_unused_inputs(ctx: CompileContext, gm: GraphModule) -> None:
    given = [k for k, v in ctx.inputs.items() if v is not None]
    ignored = ignored_by_the_model(ctx.model, ctx.inputs, [n for n in unconsumed_inputs(gm, given)
                                                           if tolerated_reason(gm, n) is None])
    reject_unconsumed_inputs(type(ctx.model).__name__, gm, [k for k in given if k not in ignored])


def _guard_mask_branches(ctx: CompileContext, gm: GraphModule) -> None:
    guard_mask_branches(gm)


def _annotate(ctx: CompileContext, gm: GraphModule) -> None:
    model = ctx.model
    annotate(
        gm,
        layers_fqn=ctx.layers_fqn,
        layer_types=getattr(model.config.get_text_config(), "layer_types", None),
        input_embeddings=_safe_call(model, "get_input_embeddings"),
        output_embeddings=_safe_call(model, "get_output_embeddings"),
    )


def _dense_masked_rows(ctx: CompileContext, gm: GraphModule) -> None:
    dense_masked_rows(gm)


def _record_trace(ctx: CompileContext, gm: GraphModule) -> None:
    gm.meta[TRACE_KEY] = TraceRecord(
        model_class=type(ctx.model).__name__,
        num_layers=ctx.num_layers,
        example_inputs={k: v for k, v in ctx.inputs.items() if v is not None},
    )


# The passes after the trace, in order.
PASSES: tuple[tuple[str, Callable[[CompileContext, GraphModule], None]], ...] = (
    ("reject media inputs of a model without a media path", _reject_media_without_path),
    ("reject unused inputs", _reject_unused_inputs),
    ("guard mask branches", _guard_mask_branches),
    ("annotate", _annotate),
    ("dense masked rows", _dense_masked_rows),
    ("record the trace", _record_trace),
)


def compile_example(model: torch.nn.Module, example_inputs: dict[str, Any],
                    leaf_values: LeafValues | None = None) -> GraphModule:
    """Trace and annotate the whole model for inputs shaped like ``example_inputs``:
    check the model, trace, then each pass of :data:`PASSES` in order.

    ``leaf_values``: the leaf cache shared by the traces of one build (*shared leaf
    values* in ``fxpp.trace.meta_eval``); None: a cache of this trace's own.
    """
    check_model(model)
    device = model_device(model)
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in example_inputs.items()}
    # a trace alone gets a cache of its own, as trace_model would make it: the module walk
    # that finds the layers is then the trace's too
    shared = leaf_values if leaf_values is not None else LeafValues()
    layers_fqn, layers = module_tree(model, shared).decoder_layers  # found once per build
    ctx = CompileContext(model, inputs, layers_fqn, len(layers))
    gm = trace_model(model, inputs, shared, layers_fqn=layers_fqn)  # the model left as it was
    _log_graph("trace", gm)
    for name, run in PASSES:
        run(ctx, gm)
        _log_graph(name, gm)
    if leaf_values is not None:
        leaf_values.keep(gm)
    return gm


def _log_graph(step: str, gm: GraphModule) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("graph after %s:\n%s", step, gm.graph)


def _safe_call(model, name):
    try:
        return getattr(model, name)()
    except (AttributeError, NotImplementedError):
        return None


# ---------------------------------------------------------------------------------------
# The signature: the candidate examples of fxpp.inputs, traced


def trace_canonical(model: torch.nn.Module, example_inputs: dict[str, Any] | None) -> GraphModule:
    """Trace the model for its whole input signature (see ``fxpp.layout``).

    The signature is every input of ``example_inputs`` plus ``attention_mask`` and
    ``position_ids`` where the forward takes them, and for a model with an image path
    whose example inputs hold no media, the media inputs of example images fxpp makes
    (``fxpp.inputs.example_media``). An added input the trace cannot take (its example
    does not fit the model) is left out and the reason kept for the error a call with it
    gets. The graph's :class:`~fxpp.meta.SignatureRecord` holds the signature and the
    graphs of the representative present sets; its :class:`~fxpp.meta.TraceRecord` the
    inputs it was traced with.
    """
    check_model(model)
    leaf_values = LeafValues()
    gm = _trace_signature(model, example_inputs, leaf_values)
    if not leaf_values.intact():
        # a later trace changed in place a meta value an earlier graph holds: each trace
        # alone, as every graph must be the graph a trace of its own gives
        gm = _trace_signature(model, example_inputs, None)
    return gm


def _trace_signature(model: torch.nn.Module, example_inputs: dict[str, Any] | None,
                     leaf_values: LeafValues | None) -> GraphModule:
    """:func:`trace_canonical`, its traces sharing ``leaf_values`` (None: none shared)."""
    declared = example_inputs or default_example_inputs(model)
    given = {k: v for k, v in declared.items() if v is not None}
    params = forward_parameters(model)
    gm, left_out, media_reasons = None, [], []
    if wants_example_media(model, declared, params):
        gm, left_out, media_reasons = _trace_with_example_media(model, given, params, leaf_values)
    media_reasons = declared_text_only(declared, params) or media_reasons
    if gm is None:
        gm, left_out = _trace_with_text_inputs(model, given, params, leaf_values)
    traced = trace_record(gm).example_inputs
    alternatives = alternative_token_inputs(traced, params)
    names = tuple(n for n in traced) + tuple(alternatives)
    left_out += [(n, why) for n, why in media_reasons if n not in names]
    signature = InputSignature(names=names, left_out=tuple(left_out), alternatives=tuple(alternatives))
    gm.meta[SIGNATURE_KEY] = SignatureRecord(signature, _trace_other_present_sets(model, traced, signature, leaf_values))
    return gm


def _trace_with_text_inputs(model, given: dict[str, Any], params: set[str], leaf_values: LeafValues | None):
    """The trace of the first text candidate (``fxpp.inputs.signature.text_input_candidates``)
    that traces; each added input left out, with the reason, in ``left_out``. A token-type
    input that a failing trace's error names (``fxpp.inputs.signature.required_input``:
    the forward refuses to run without it) is added to ``given`` and the candidates
    traced again, once."""
    taken = text_inputs_taken(model, params)
    left_out = text_inputs_not_taken(model, taken)
    errors, tried = [], set()
    for candidate in text_input_candidates(given, taken):
        try:
            gm = compile_example(model, candidate.example, leaf_values)
        except Exception as e:  # noqa: BLE001 - the example fxpp added may not fit; try without it
            required = required_input(e, candidate.example, params)
            if required is not None and required not in tried:  # the forward refuses to run without it
                tried.add(required)
                tokens = given.get("input_ids", given.get("inputs_embeds"))
                try:
                    return _trace_with_text_inputs(model, {**given, required: default_text_input(required, tokens)},
                                                   params, leaf_values)
                except Exception:  # noqa: BLE001 - it did not help: go on as without it
                    pass
            if not candidate.added:
                raise
            errors.append(e)
            continue
        for name in candidate.dropped:
            left_out.append((name, f"a trace with an example {name} failed: {str(errors[0]).splitlines()[0][:200]}"))
        return gm, left_out
    raise AssertionError("unreachable: the last candidate adds nothing and raises on failure")


def _trace_with_example_media(model, given: dict[str, Any], params: set[str], leaf_values: LeafValues | None):
    """``(gm, left_out, media_left_out)`` of the trace with example images in place of
    ``given``'s text inputs; ``(None, [], reasons)`` where no example fits or its trace
    fails, with, for every media input of the forward, why it is not in the signature."""
    refusal = media_example_refusal(given)
    if refusal is not None:
        return None, [], media_left_out(params, refusal)
    try:
        example = media_example(model, given)
        gm, left_out = _trace_with_text_inputs(model, example, params, leaf_values)
    except Exception as e:  # noqa: BLE001 - any failure leaves the media out, with its reason
        return None, [], media_left_out(params, f"no example images fit {type(model).__name__}: "
                                                f"{' '.join(str(e).split())[:400]}")
    unused = f"the example images fxpp made for {type(model).__name__} do not use it"
    return gm, left_out, [(n, why) for n, why in media_left_out(params, unused) if n not in example]


def _trace_other_present_sets(model, example: dict, signature: InputSignature,
                              leaf_values: LeafValues | None) -> dict[int, GraphModule]:
    """Note [layout union]: what crosses a cut when a call leaves inputs out.

    A call without ``position_ids`` may send what the forward computes from the other
    inputs (Qwen-VL's rotary embeddings from ``get_rope_index``); one without images
    sends no image features. The layout of a cut is the union of the slots of these
    traces, so every such call finds its values a slot; present sets outside this list
    are traced when a call brings them and refused if they need a slot none of these
    has. A trace that fails here is left out: the call that needs it gets the error.
    """
    graphs = {}
    for present in representative_present_sets(signature):
        try:
            graphs[signature.bits(present)] = compile_example(model, {k: example[k] for k in present}, leaf_values)
        except Exception:  # noqa: BLE001 - see the docstring
            continue
    return graphs


# ---------------------------------------------------------------------------------------
# The door


def make_spec(model: torch.nn.Module, stage_role: StageRole | str, layers: range | None) -> StageSpec:
    role = StageRole.parse(stage_role)
    n = num_decoder_layers(model)
    if layers is None:
        if role is not StageRole.FULL:
            raise StageSpecError(f"stage_role={stage_role!r} needs layers=range(start, stop); only 'full' may omit it")
        layers = range(n)
    return StageSpec(role=role, layers=layers, num_layers=n)


def build_stage_module(model: torch.nn.Module, model_gm: GraphModule, spec: StageSpec, **fields) -> StageModule:
    """The stage ``spec`` of the canonical graph ``model_gm``, retracing with :func:`compile_example`."""
    return StageModule.build(model, model_gm, spec, retrace=compile_example, **fields)


def transform(
    model: torch.nn.Module,
    stage_role: StageRole | str,
    layers: range | None = None,
    *,
    example_inputs: dict[str, Any] | None = None,
) -> StageModule:
    """One pipeline stage of ``model`` as a GraphModule.

    Args:
        model: a transformers decoder-only model (``*ForCausalLM``, its base model, or a
            vision-language ``*ForConditionalGeneration``), on any device including meta.
        stage_role: ``StageRole`` or ``"first" | "middle" | "last" | "full"``.
        layers: the decoder layers the stage owns, ``range(start, stop)``; optional for FULL.
        example_inputs: keyword inputs of the model that widen the input signature
            (a VLM's ``pixel_values`` and companions); ``input_ids``,
            ``attention_mask`` and ``position_ids`` are in it anyway where the forward
            takes them, and ``inputs_embeds`` as the alternative to ``input_ids``.
            Shapes are only an example: the stage accepts other batch and sequence
            sizes, and any call with a subset of the signature. Every stage of one
            pipeline must be built from the same example inputs.

    Returns:
        A :class:`StageModule`: FIRST/FULL take the model inputs by keyword, MIDDLE/LAST
        take positionally the tuple the previous stage returned; FIRST/MIDDLE return the
        tuple that crosses the next cut; LAST/FULL return logits (or hidden states).

    Raises:
        StageSpecError: invalid role or range. UnsupportedModelError: not a decoder-only
        transformers model. TraceError: the forward cannot be traced.
    """
    check_model(model)
    spec = make_spec(model, stage_role, layers)
    model_gm = trace_canonical(model, example_inputs)
    return build_stage_module(model, model_gm, spec)

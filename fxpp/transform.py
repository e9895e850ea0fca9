"""``fxpp.transform``: one stage of a model as a GraphModule.

The door between the user and the rooms behind it: validate the request, trace
(``fxpp.trace``), annotate (``fxpp.analysis.annotate``), rewrite (``fxpp.passes``) and wrap
the result in a :class:`StageModule` that checks its inputs and retraces itself when
a shape decision baked into the graph no longer holds (see Note [guards] in
``fxpp.ops``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.fx import GraphModule

from .analysis.annotate import annotate, info
from .errors import CutError, StageInputError, StageSpecError, UnsupportedModelError
from .ops import GUARD_OPS, GuardFailure
from .passes.dense_masked_rows import dense_masked_rows
from .passes.extract_stage import extract_stage
from .passes.guard_mask_branches import guard_mask_branches
from .spec import StageRole, StageSpec
from .analysis.cuts import crossing_slots
from .trace import reject_unconsumed_inputs
from .trace.unused_inputs import tolerated_reason, unconsumed_inputs
from .trace.recording import recording_hooks, recording_targets
from .layout import (DECODER_INPUTS, TEXT_INPUTS, TOKEN_COMPANIONS, TOKEN_INPUTS, CutLayout,
                     InputSignature, Slot, stream_tokens)
from .trace import find_decoder_layers, trace_model
from .trace.layers import is_encoder_decoder
from .trace.model_state import model_device, model_unchanged
from .trace.tracer import CONSTANT_PREFIX
from .trace.example_media import (example_media_inputs, is_media_input, media_inputs_of, token_companions,
                                  vision_config_of)


def num_decoder_layers(model: torch.nn.Module) -> int:
    _check_model(model)
    return len(find_decoder_layers(model)[1])


def _check_model(model: Any) -> None:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise UnsupportedModelError(
            f"model={type(model).__name__!s} is not a transformers model (an nn.Module with a .config); "
            "pass e.g. a LlamaForCausalLM, LlamaModel or *ForConditionalGeneration instance"
        )


def default_example_inputs(model: torch.nn.Module, batch_size: int = 2, seq_len: int = 8) -> dict[str, torch.Tensor]:
    """Token ids of shape ``[batch_size, seq_len]``, on the model's device.

    An encoder-decoder model gets its decoder's tokens too, ``[batch_size, seq_len - 2]``
    (where its forward takes ``input_ids``, the encoder's tokens beside them): two
    lengths, so that shapes that follow the encoder's sequence and those that follow
    the decoder's can be told apart (``fxpp.layout.filler_shape``).
    """
    device = model_device(model)
    vocab = getattr(model.config.get_text_config(), "vocab_size", 2) or 2
    ids = torch.arange(batch_size * seq_len, device="cpu").reshape(batch_size, seq_len) % vocab
    if not is_encoder_decoder(model):
        return {"input_ids": ids.to(device)}
    params = forward_parameters(model)
    out = {"input_ids": ids, **token_companions(ids, params)} if "input_ids" in params else {}
    out["decoder_input_ids"] = ids[:, : max(seq_len - 2, 1)].flip(-1)
    return {k: v.to(device) for k, v in out.items()}


def forward_parameters(model: torch.nn.Module) -> set[str]:
    import inspect

    from .trace import unwrap_forward

    return set(inspect.signature(unwrap_forward(type(model).forward)).parameters)


def _default_text_input(name: str, like: torch.Tensor) -> torch.Tensor:
    """An example of a text input the example inputs lack, shaped like the tokens."""
    b, s = like.shape[0], like.shape[1]
    if name == "attention_mask":
        # Row 0 left-padded by one token where the row is long enough: mask builders then
        # return a mask, so the trace follows the forward's masked branch; an all-ones
        # mask makes some return None (``fxpp.passes.guard_mask_branches``).
        mask = torch.ones(b, s, dtype=torch.long, device=like.device)
        if s > 1:
            mask[0, 0] = 0
        return mask
    return torch.arange(s, device=like.device).expand(b, s).clone()  # position_ids


def trace_canonical(model: torch.nn.Module, example_inputs: dict[str, Any] | None) -> GraphModule:
    """Trace the model for its whole input signature (see ``fxpp.layout``).

    The signature is every input of ``example_inputs`` plus ``attention_mask`` and
    ``position_ids`` where the forward takes them, and for a model with an image path
    whose example inputs hold no media, the media inputs of example images fxpp makes
    (``fxpp.trace.example_media``). An added input the trace cannot take (its example
    does not fit the model) is left out and the reason kept for the error a call with it
    gets. The graph's ``meta["fxpp_signature"]`` is the signature,
    ``meta["fxpp_example_inputs"]`` the inputs it was traced with.
    """
    _check_model(model)
    declared = example_inputs or default_example_inputs(model)
    given = {k: v for k, v in declared.items() if v is not None}
    params = forward_parameters(model)
    gm, left_out, media_left_out = None, [], []
    if _wants_example_media(model, declared, params):
        gm, left_out, media_left_out = _trace_with_example_media(model, given, params)
    declared_absent = sorted(n for n, v in declared.items() if v is None and is_media_input(n))
    if declared_absent:
        media_left_out = [(n, f"example_inputs gave {', '.join(f'{a}=None' for a in declared_absent)}: a text-only "
                              "signature") for n in media_inputs_of(params)]
    if gm is None:
        gm, left_out = _trace_with_text_inputs(model, given, params)
    alternatives = _alternative_token_inputs(gm.meta["fxpp_example_inputs"], params)
    names = tuple(n for n in gm.meta["fxpp_example_inputs"]) + tuple(alternatives)
    left_out += [(n, why) for n, why in media_left_out if n not in names]
    signature = InputSignature(names=names, left_out=tuple(left_out), alternatives=tuple(alternatives))
    gm.meta["fxpp_signature"] = signature
    gm.meta["fxpp_variant_graphs"] = _trace_other_present_sets(model, gm.meta["fxpp_example_inputs"], signature)
    gm.meta["fxpp_layouts"] = {}
    return gm


def _alternative_token_inputs(given: dict[str, Any], params: set[str]) -> list[str]:
    """The other token input than the given one, where the forward takes it: declared,
    never traced together with it."""
    return [n for n in TOKEN_INPUTS if n not in given and n in params and set(TOKEN_INPUTS) & set(given)]


def _trace_with_text_inputs(model, given: dict[str, Any], params: set[str]):
    """The trace of ``given`` plus the text inputs it lacks (``attention_mask``,
    ``position_ids``) that the forward takes; each added input that makes the trace fail
    is dropped again, with the reason, in ``left_out``."""
    tokens = given.get("input_ids", given.get("inputs_embeds"))
    alternatives = _alternative_token_inputs(given, params)
    missing = [n for n in TEXT_INPUTS if n not in given and n in params and n not in alternatives]
    left_out = [(n, f"{type(model).__name__}.forward takes no {n}") for n in TEXT_INPUTS if n not in params]
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
        missing = []
    errors = []
    for added in (missing, [n for n in missing if n != "position_ids"], []):
        example = dict(given)
        example.update({n: _default_text_input(n, tokens) for n in added})
        try:
            gm = trace_annotated(model, example)
        except Exception as e:  # noqa: BLE001 - the example fxpp added may not fit; try without it
            if not added:
                raise
            errors.append(e)
            continue
        for name in sorted(set(missing) - set(added)):
            left_out.append((name, f"a trace with an example {name} failed: {str(errors[0]).splitlines()[0][:200]}"))
        return gm, left_out
    raise AssertionError("unreachable: the last attempt adds nothing and raises on failure")


def _wants_example_media(model: torch.nn.Module, declared: dict[str, Any], params: set[str]) -> bool:
    """Whether fxpp makes example media for the signature (``fxpp.trace.example_media``):
    the model has an image path and the example inputs name no media input. A media
    input given as None in ``example_inputs`` declares the text-only signature."""
    return (vision_config_of(model) is not None and bool(media_inputs_of(params))
            and not any(is_media_input(n) for n in declared))


def _trace_with_example_media(model, given: dict[str, Any], params: set[str]):
    """``(gm, left_out, media_left_out)`` of the trace with example images in place of
    ``given``'s text inputs; ``(None, [], reasons)`` where no example fits or its trace
    fails, with, for every media input of the forward, why it is not in the signature.

    The caller's token ids are kept where they have room for the image's tokens (with
    the caller's mask and positions); else only their batch size is, and the example's
    sequence is the image's tokens plus a few text tokens.
    """
    tokens = given.get("input_ids")
    decoder = {k: v for k, v in given.items() if k in DECODER_INPUTS}
    media_names = media_inputs_of(params)
    how = ("; declare them by building with example_inputs that hold one microbatch with images "
           "(fxpp.pipeline(model, n, example_inputs=...))")
    batch = stream_tokens(given)  # the decoder's tokens, else input_ids
    if batch is None or (tokens is not None and (not isinstance(tokens, torch.Tensor) or tokens.dim() != 2)) \
            or set(given) - set(TEXT_INPUTS) - set(decoder) - set(TOKEN_COMPANIONS):
        why = (f"fxpp makes example images only for example inputs of token ids, a mask and positions "
               f"(got {sorted(given)})")
        return None, [], [(n, why + how) for n in media_names]
    try:
        example = example_media_inputs(model, batch=batch.shape[0], input_ids=tokens, decoder=decoder)
        if tokens is not None and example["input_ids"].shape == tokens.shape:
            # the caller's ids, with the image's tokens
            example.update({k: v for k, v in given.items() if k != "input_ids"})
        example.update(decoder)
        gm, left_out = _trace_with_text_inputs(model, example, params)
    except Exception as e:  # noqa: BLE001 - any failure leaves the media out, with its reason
        why = f"no example images fit {type(model).__name__}: {' '.join(str(e).split())[:400]}"
        return None, [], [(n, why + how) for n in media_names]
    unused = f"the example images fxpp made for {type(model).__name__} do not use it"
    return gm, left_out, [(n, unused + how) for n in media_names if n not in example]


def representative_present_sets(signature: InputSignature) -> list[tuple[str, ...]]:
    """The present sets whose crossing values make up each cut's layout (Note [layout union]).

    Every subset of the optional text inputs, with and without all media inputs
    (everything that is not a text input) together.
    """
    import itertools

    names = [n for n in signature.names if n not in signature.alternatives]  # alternatives: traced on demand
    optional = [n for n in ("attention_mask", "position_ids") if n in names]
    media = [n for n in names if n not in (*TEXT_INPUTS, *DECODER_INPUTS, *TOKEN_COMPANIONS, "inputs_embeds")]
    found = []
    for with_media in ((True, False) if media else (True,)):
        for r in range(len(optional), -1, -1):
            for kept in itertools.combinations(optional, r):
                present = tuple(n for n in names
                                if (n not in optional and n not in media) or n in kept or (with_media and n in media))
                if present != tuple(names):
                    found.append(present)
    return found


def _trace_other_present_sets(model, example: dict, signature: InputSignature) -> dict[int, GraphModule]:
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
            graphs[signature.bits(present)] = trace_annotated(model, {k: example[k] for k in present})
        except Exception:  # noqa: BLE001 - see the docstring
            continue
    return graphs


def cut_layout(model_gm: GraphModule, k: int) -> CutLayout:
    """The fixed layout of cut ``k``: the canonical slots, then those only other present sets send."""
    cache = model_gm.meta["fxpp_layouts"]
    if k not in cache:
        slots: dict[str, Slot] = {}
        for gm in [model_gm, *model_gm.meta["fxpp_variant_graphs"].values()]:
            modules = dict(gm.named_modules())
            try:
                found = crossing_slots(gm.graph, k, modules)
            except CutError:
                if gm is model_gm:
                    raise
                # This input set calls no layer after the cut (Mllama without images skips
                # its cross-attention layers): a call with it gets the CutError itself.
                continue
            for identity, val in found:
                slots.setdefault(identity, Slot(identity, tuple(val.shape), val.dtype))
        cache[k] = CutLayout(k, model_gm.meta["fxpp_signature"], tuple(slots.values()))
    return cache[k]


def trace_annotated(model: torch.nn.Module, example_inputs: dict[str, Any]) -> GraphModule:
    """Trace and annotate the whole model for inputs shaped like ``example_inputs``."""
    _check_model(model)
    device = model_device(model)
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in example_inputs.items()}
    gm = trace_model(model, inputs)  # leaves the model as it was (model_unchanged inside)
    _reject_ignored_inputs(model, gm)
    given = [k for k, v in inputs.items() if v is not None]
    ignored = ignored_by_the_model(model, inputs, [n for n in unconsumed_inputs(gm, given)
                                                   if tolerated_reason(gm, n) is None])
    reject_unconsumed_inputs(type(model).__name__, gm, [k for k in given if k not in ignored])
    guard_mask_branches(gm)
    layers_fqn, layers = find_decoder_layers(model)
    text_config = model.config.get_text_config()
    annotate(
        gm,
        layers_fqn=layers_fqn,
        layer_types=getattr(text_config, "layer_types", None),
        input_embeddings=_safe_call(model, "get_input_embeddings"),
        output_embeddings=_safe_call(model, "get_output_embeddings"),
    )
    dense_masked_rows(gm)
    gm.meta["fxpp_example_inputs"] = {k: v for k, v in inputs.items() if v is not None}
    gm.meta["fxpp_num_layers"] = len(layers)
    gm.meta["fxpp_model_class"] = type(model).__name__
    return gm


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
    from .trace.driver import TRACE_KWARGS, select_output

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


def _reject_ignored_inputs(model: torch.nn.Module, gm: GraphModule) -> None:
    """Image or audio inputs given to a model without that modality would only reach
    ``**kwargs`` and be dropped; that is a mistake to report, not to ignore."""
    import inspect

    from .trace import unwrap_forward

    named = set(inspect.signature(unwrap_forward(type(model).forward)).parameters)
    config = model.config
    has_media = any(getattr(config, k, None) is not None for k in ("vision_config", "audio_config"))
    ignored = [n.target for n in gm.graph.nodes if n.op == "placeholder" and n.target not in named
               and is_media_input(n.target)]
    if ignored and not has_media:
        raise StageInputError(
            f"{type(model).__name__}.forward does not use input(s) {ignored}: it has no vision or audio path, so "
            "they would only reach **kwargs. Image and audio inputs go to vision-language models"
        )


def _safe_call(model, name):
    try:
        return getattr(model, name)()
    except (AttributeError, NotImplementedError):
        return None


def make_spec(model: torch.nn.Module, stage_role: StageRole | str, layers: range | None) -> StageSpec:
    role = StageRole.parse(stage_role)
    n = num_decoder_layers(model)
    if layers is None:
        if role is not StageRole.FULL:
            raise StageSpecError(f"stage_role={stage_role!r} needs layers=range(start, stop); only 'full' may omit it")
        layers = range(n)
    return StageSpec(role=role, layers=layers, num_layers=n)


def transform(
    model: torch.nn.Module,
    stage_role: StageRole | str,
    layers: range | None = None,
    *,
    example_inputs: dict[str, Any] | None = None,
) -> "StageModule":
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
    _check_model(model)
    spec = make_spec(model, stage_role, layers)
    model_gm = trace_canonical(model, example_inputs)
    return StageModule.build(model, model_gm, spec)


class StageModule(GraphModule):
    """A stage's GraphModule that takes any input set of its signature and checks what it receives.

    Note [stage outputs]
        A LAST or FULL stage returns the logits (the final hidden states for a base
        model). Where the model's forward also computes loss terms (``aux_loss`` of the
        router logits when the config sets ``output_router_logits``; ``loss`` when
        ``labels`` are in the signature), the graph returns them too, and
        ``output_mode`` says what a call gives: ``"logits"`` (the default; a
        ``ModelOutput`` with ``loss`` when the graph computed one), ``"tuple"``
        (``(logits, *loss terms)``: what ``build_stage`` sets, for a schedule's loss
        function) or ``"dict"``.

    ``self.graph`` is the *canonical* variant: the stage traced with every input of the
    signature (see ``fxpp.layout``). A FIRST or MIDDLE stage returns the fixed layout
    of its cut (the canonical slots, then the header); a MIDDLE or LAST stage takes
    that tuple and matches its values by identity. A call with another present set,
    or whose shapes make a traced shape decision (a guard) false, runs a variant
    traced for it, kept for later calls.
    """

    @classmethod
    def build(cls, model: torch.nn.Module, model_gm: GraphModule, spec: StageSpec) -> "StageModule":
        stage_gm = extract_stage(model_gm, spec=spec)
        stage = cls(stage_gm, stage_gm.graph, class_name=f"Stage{spec.role.value.capitalize()}")
        object.__setattr__(stage, "_fxpp_model", model)
        stage.meta.update(model_gm.meta)
        stage.meta["fxpp_spec"] = spec
        object.__setattr__(stage, "_fxpp_variants", {})  # present bits -> [GraphModule]
        object.__setattr__(stage, "_fxpp_last_ok", {})  # present bits -> the variant the last such call ran
        object.__setattr__(stage, "in_layout", None if spec.takes_model_inputs else cut_layout(model_gm, spec.layers.start))
        object.__setattr__(stage, "out_layout", None if spec.returns_model_output else cut_layout(model_gm, spec.layers.stop))
        object.__setattr__(stage, "_fxpp_traced_sets", model_gm.meta.get("fxpp_variant_graphs", {}))
        return stage

    @property
    def spec(self) -> StageSpec:
        return self.meta["fxpp_spec"]

    @property
    def signature(self) -> InputSignature:
        return self.meta["fxpp_signature"]

    @property
    def input_names(self) -> list[str]:
        return [n.target for n in self.graph.nodes if n.op == "placeholder"]

    def recompile(self):
        result = super().recompile()
        generated = type(self).forward

        def forward(self, *args, **kwargs):
            return self._fxpp_dispatch(generated, args, kwargs)

        forward.__signature__ = __import__("inspect").signature(generated)
        type(self).forward = forward
        object.__setattr__(self, "_fxpp_generated", generated)
        return result

    def _where(self) -> str:
        spec = self.spec
        return f"{self.meta['fxpp_model_class']} {spec.role.value} stage layers {spec.layers}"

    def _fxpp_dispatch(self, generated, args, kwargs):
        spec = self.meta.get("fxpp_spec")
        if spec is None:  # during GraphModule construction
            return generated(self, *args, **kwargs)
        where = self._where()
        if spec.takes_model_inputs:
            if args:
                raise StageInputError(
                    f"{where} takes the model's inputs by keyword ({', '.join(self.signature.names)}); "
                    f"got {len(args)} positional argument(s)"
                )
            inputs = {k: v for k, v in kwargs.items() if v is not None}
            self.signature.check_call(inputs, where)
            bits = self.signature.bits(inputs)
            variant, out = self._run(bits, inputs=inputs)
        else:
            if kwargs and getattr(self, "_fxpp_ignore_model_kwargs", False):
                kwargs = {}  # schedules pass model inputs to every stage of a rank
            if kwargs:
                raise StageInputError(f"{where} takes the tuple the previous stage returned, positionally; got "
                                      f"keyword input(s) {sorted(kwargs)} (model inputs go to the first stage only)")
            bits, received = self.in_layout.unpack(args, where)
            variant, out = self._run(bits, received=received)
        if spec.returns_model_output:
            return self._final_output(out)
        sent = _graph_facts(variant)["sent"]
        passed = _passed_inputs(self.out_layout, sent, inputs if spec.takes_model_inputs else received)
        return self.out_layout.pack((*sent, *passed), (*out, *passed.values()), bits, where)

    def _run(self, bits: int, *, inputs: dict | None = None, received: dict | None = None):
        """Run the variant for the present ``bits`` that fits the shapes, tracing one if none does."""
        if bits not in self._fxpp_variants and bits in self._fxpp_traced_sets:
            self._fxpp_variants[bits] = [self._variant_of(self._fxpp_traced_sets[bits], received is not None)]
        candidates = list(self._fxpp_variants.get(bits, ()))
        if bits == self.signature.traced_bits:
            candidates.insert(0, self)
        last_ok = self._fxpp_last_ok.get(bits)
        if last_ok is not None:  # a repeating call pattern tries its own graph first, not every guard before it
            candidates.sort(key=lambda v: v is not last_ok)
        why = f"no variant for inputs {list(self.signature.present(bits))} yet"
        for variant in candidates:
            args, problem = ((), None) if received is None else self._receiving_args(variant, received, bits)
            if problem is not None:
                why = problem
                continue
            try:
                out = self._call(variant, args, inputs or {})
                self._fxpp_last_ok[bits] = variant
                return variant, out
            except GuardFailure as e:
                why = str(e)
            except Exception as e:  # noqa: BLE001 - see below
                # Guards run in graph order: an op may fail on this call's data before the
                # guard that would have said the graph does not fit it (a length decided on
                # the example, checked after its first use). A graph with guards that fails
                # is treated as one whose guard failed; without guards, it is the call's error.
                if not _graph_facts(variant)["guarded"]:
                    raise
                why = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        variant = self._trace_variant(bits, inputs, received, why)
        args = () if received is None else self._receiving_args(variant, received, bits)[0]
        try:
            out = self._call(variant, args, inputs or {})
        except GuardFailure as e:
            # Kept, it would be traced again on every such call. A later stage retraces from
            # the inputs it receives; a decision on values it cannot see takes another branch.
            raise StageInputError(
                f"{self._where()}: traced again for this call ({why}), and the new graph's own check fails on it "
                f"({e}): the decision depends on values this stage does not receive. Keep the layers around it "
                "on one stage (move the cut), or report the model") from e
        self._fxpp_variants.setdefault(bits, []).append(variant)
        self._fxpp_last_ok[bits] = variant
        return variant, out

    def _call(self, variant: GraphModule, args, inputs: dict):
        targets = _graph_facts(variant)["recorded"]
        with recording_hooks(variant, targets) if targets else contextlib.nullcontext():
            if variant is self:
                return self._fxpp_generated(self, *args, **inputs)
            return variant(*args, **inputs)

    def _final_output(self, out):
        """What a LAST or FULL stage returns (Note [stage outputs])."""
        if not isinstance(out, dict):
            return out
        mode = getattr(self, "output_mode", "logits")
        if mode == "dict":
            return out
        if mode == "tuple":
            # Scalars as [1]: a schedule concatenates the last stage's outputs per microbatch.
            return tuple(v.reshape(1) if v.dim() == 0 else v for v in out.values())
        if "loss" in out:
            from transformers.utils import ModelOutput

            return ModelOutput(out)
        return out["logits"]

    def _receiving_args(self, variant: GraphModule, received: dict, bits: int) -> tuple[list, str | None]:
        """``(args, None)`` where ``variant`` is the receiving half of the sender's trace
        and takes the received values; else ``([], why not)``."""
        problem = _fit_problem(variant, received)
        if problem is not None:
            return [], problem
        args = self._args_for(variant, received, bits)
        return args, _received_problem(variant, args)

    def _args_for(self, variant: GraphModule, received: dict, bits: int) -> list:
        """The received values a variant reads, by identity; a filler is never read."""
        args = []
        for ph in (n for n in variant.graph.nodes if n.op == "placeholder"):
            identity = ph.meta["fxpp_identity"]
            if identity not in received:
                raise StageInputError(
                    f"{self._where()}: with inputs {list(self.signature.present(bits))} it reads {identity!r}, which "
                    f"the previous stage did not compute for this call (it sent a stand-in). The stages disagree on "
                    f"what crosses cut {self.spec.layers.start}; build them from the same model and example inputs"
                )
            args.append(received[identity])
        return args

    def _trace_variant(self, bits: int, inputs: dict | None, received: dict | None, why: str) -> GraphModule:
        """Trace the model for this present set and shapes; the stage of that trace, on this stage's modules."""
        present = self.signature.present(bits)
        example = inputs if inputs is not None else self._example_for(present, received)
        try:
            model_gm = trace_annotated(self._fxpp_model, example)
        except Exception as e:  # noqa: BLE001 - the caller's inputs are the likelier problem
            if inputs is not None:
                raise
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise StageInputError(f"{self._where()}: {why}, and tracing the model for them failed: {first}") from e
        variant = self._variant_of(model_gm, received is not None)
        if received is not None:
            _, problem = self._receiving_args(variant, received, bits)
            if problem is not None:
                again = "" if problem == why else f" (before the retrace: {why})"
                raise StageInputError(
                    f"{self._where()}: {problem}, even traced for this call{again}. The stages disagree on what "
                    f"crosses cut {self.spec.layers.start}; build them from the same model and example inputs")
        return variant

    def _variant_of(self, model_gm: GraphModule, receives: bool) -> GraphModule:
        """This stage of another trace, on this stage's modules; refused if its values have no slot."""
        present = [n for n in self.signature.names if n in model_gm.meta["fxpp_example_inputs"]]
        variant = _on_modules_of(extract_stage(model_gm, spec=self.spec), self)
        variant.meta.update(model_gm.meta)
        variant.meta["fxpp_spec"] = self.spec
        for layout, names in ((self.in_layout, [p.meta["fxpp_identity"] for p in variant.graph.nodes
                                                if p.op == "placeholder"] if receives else []),
                              (self.out_layout, [i for n in variant.graph.nodes if n.op == "output"
                                                 for i in n.meta.get("fxpp_identities", ())])):
            unknown = [i for i in names if layout is not None and i not in layout.identities]
            if unknown:
                raise StageInputError(
                    f"{self._where()}: with inputs {list(present)}, {unknown} must cross cut {layout.cut}, but the "
                    f"stages were built to send {list(layout.identities)} (with every input of "
                    f"{list(self.signature.names)}). Build the stages with example inputs like this call's"
                )
        return variant

    def _example_for(self, present: tuple[str, ...], received: dict) -> dict[str, Any]:
        """Model inputs of this present set that produce the received values' shapes."""
        built = self.meta["fxpp_example_inputs"]
        example = {k: v for k, v in built.items() if k in present}
        stream = received["hidden states"]  # always computed, always first
        old = stream_tokens(built)
        b0, s0 = old.shape[0], old.shape[1]
        # Batch and sequence sit where they sat in the built hidden states ([B, S, H], or
        # Gemma 3n's stack of altup streams [4, B, S, H]).
        built_stream = self.in_layout.slots[0].shape
        at = next((i for i in range(len(built_stream) - 1) if tuple(built_stream[i:i + 2]) == (b0, s0)), 0)
        b, s = stream.shape[at], stream.shape[at + 1]
        # Other sizes that changed with the call (an encoder-decoder model's encoder
        # sequence, which its output crossing the cut shows): built size -> received size,
        # read against the shapes this present set's own trace sent where there is one
        # (the encoder's sequence holds the image's patches only when images are present).
        built_shapes = {slot.identity: slot.shape for slot in self.in_layout.slots}
        traced = self._fxpp_traced_sets.get(self.signature.bits(present))
        if traced is not None:
            with contextlib.suppress(CutError):
                found = crossing_slots(traced.graph, self.in_layout.cut, dict(traced.named_modules()))
                built_shapes.update((identity, tuple(val.shape)) for identity, val in found)
        resized = {s0: s}
        for identity, shape in built_shapes.items():
            value = received.get(identity)
            if identity != "hidden states" and isinstance(value, torch.Tensor) and value.dim() == len(shape):
                for d0, d in zip(shape[1:], value.shape[1:]):
                    if d0 != d and d0 not in (b0, s0):
                        resized.setdefault(d0, d)
        out = {}
        for name in self.signature.alternatives:  # the other token input: only its shape matters here
            if name in present:
                out[name] = (torch.zeros(b, s, dtype=torch.long, device=stream.device) if name == "input_ids" else
                             torch.zeros(b, s, stream.shape[-1], dtype=stream.dtype, device=stream.device))
        for name, value in example.items():
            if f"input {name}" in received:
                out[name] = received[f"input {name}"]
            elif isinstance(value, torch.Tensor) and ((b, s) != (b0, s0) or len(resized) > 1):
                shape = [b if d == b0 and i == 0 else resized.get(d, d) for i, d in enumerate(value.shape)]
                out[name] = torch.zeros(shape, dtype=value.dtype, device=value.device)
            else:
                out[name] = value
        return out


def _passed_inputs(layout: CutLayout, sent, available: dict) -> dict[str, torch.Tensor]:
    """Model inputs this call has (given to a first stage, or received) that the layout
    has a slot for and the variant does not send itself.

    A later stage whose variant no longer fits this call retraces from the inputs it
    receives (``_example_for``). A variant that took another branch on data (an all-ones
    mask whose builder returns ``None``) may not need an input any more, but the later
    stage's retrace does, to take the same branch; so inputs travel on while a slot
    awaits them. They are never computed, only handed on.
    """
    slots = {s.identity: s for s in layout.slots}
    passed = {}
    for name, value in available.items():
        identity = name if name.startswith("input ") else f"input {name}"
        slot = slots.get(identity)
        if slot is None or identity in sent or not isinstance(value, torch.Tensor) or value.dim() != len(slot.shape):
            continue
        if value.dtype != slot.dtype and not (value.is_floating_point() or slot.dtype.is_floating_point):
            value = value.to(slot.dtype)  # a bool or int32 mask in an int64 slot: the same mask
        if value.dtype == slot.dtype:
            passed[identity] = value
    return passed


def _graph_facts(variant: GraphModule) -> dict:
    """What a call of ``variant`` needs from its graph, read once per graph, not per call:
    the identities it sends (FIRST/MIDDLE) and the submodules whose outputs it records."""
    facts = variant.meta.get("fxpp_graph_facts")
    if facts is None or facts["graph"] is not variant.graph:
        (out,) = [n for n in variant.graph.nodes if n.op == "output"]
        facts = {"graph": variant.graph, "sent": out.meta.get("fxpp_identities", ()),
                 "recorded": recording_targets(variant.graph),
                 "guarded": any(n.op == "call_function" and n.target in GUARD_OPS for n in variant.graph.nodes)}
        variant.meta["fxpp_graph_facts"] = facts
    return facts


def _fit_problem(variant: GraphModule, received: dict) -> str | None:
    """Why ``variant`` is not the receiving half of the trace the sender ran, or None.

    It must read nothing the sender did not compute, and read everything the sender
    computed: a value sent but unread comes from a sender that took another branch
    (a retrace on a guard: packed positions make a mask builder return a mask where the
    example gave None), and a receiver traced without that branch would silently drop
    it (its layers would run without the mask). Model inputs handed on unchanged
    (``input ...``, ``_passed_inputs``) may go unread.
    """
    reads = [p.meta["fxpp_identity"] for p in variant.graph.nodes if p.op == "placeholder"]
    missing = [i for i in reads if i not in received]
    if missing:
        return f"it reads {missing}, which the previous stage did not compute for this call"
    unread = [i for i in received if i not in reads and not i.startswith("input ")]
    if unread:
        return f"the previous stage computed {unread} for this call, which this variant does not read"
    return None


def _received_problem(variant: GraphModule, args) -> str | None:
    """Why ``args`` cannot be this variant's inputs (rank, width, dtype), or None if they can."""
    for ph, value in zip([n for n in variant.graph.nodes if n.op == "placeholder"], args):
        expected = ph.meta.get("val")
        name = ph.meta.get("fxpp_identity", ph.target)
        if isinstance(expected, torch.Tensor):
            # A float tensor's last dimension is a width (hidden size); an integer one's may be
            # the sequence (multimodal positions [3, B, S]), which follows the call.
            width_differs = expected.is_floating_point() and expected.dim() >= 3 and value.shape[-1] != expected.shape[-1]
            if value.dim() != expected.dim() or width_differs:
                return f"stage input {name!r}: expected shape like {tuple(expected.shape)}, got {tuple(value.shape)}"
            if value.dtype.is_floating_point != expected.dtype.is_floating_point:
                return f"stage input {name!r}: expected dtype like {expected.dtype}, got {value.dtype}"
    return None


def _on_modules_of(variant: GraphModule, owner: GraphModule) -> GraphModule:
    """``variant`` calling the submodules and parameters ``owner`` holds under the same names.

    A runtime stage holds copies on its device (and its own copy of a tied weight);
    a variant traced later must use those, not the user's model's.
    """
    def resolve(root, target):
        obj = root
        for part in target.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj

    def is_model_state(root, target) -> bool:
        # Submodules, parameters and buffers are the model's; anything else under a
        # get_attr (configs, traced constants) is the variant's own, numbered per trace.
        # A traced tensor constant is a buffer of its GraphModule too (torch.fx registers
        # tensors so), but never the model's: by name it could be another trace's constant.
        if target.startswith(CONSTANT_PREFIX):
            return False
        parent_name, _, name = target.rpartition(".")
        parent = resolve(root, parent_name) if parent_name else root
        obj = getattr(parent, name, None)
        return isinstance(obj, (torch.nn.Module, torch.nn.Parameter)) or name in getattr(parent, "_buffers", {})

    targets = {}
    for node in variant.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            mine = resolve(owner, node.target) if is_model_state(variant, node.target) else None
            targets[node.target] = mine if mine is not None else resolve(variant, node.target)
    return GraphModule(targets, variant.graph, class_name=type(variant).__name__)


def stage_info(stage: GraphModule) -> list[tuple[str, str]]:
    """``(node name, role)`` for every node of a stage, for tests and docs."""
    return [(n.name, info(n).role) for n in stage.graph.nodes if "fxpp" in n.meta]

"""A stage of the pipeline as a GraphModule, and its variants.

Terms
-----
stage
    :class:`StageModule`: the graph of one stage extracted from the canonical
    whole-model graph (``fxpp.passes.extract_stage``), on the model's own modules.
variant
    The same stage extracted from another trace: for a present set the canonical graph
    was not traced with, or for shapes that make one of its guards false (Note [guards]
    in ``fxpp.ops``). Chosen per call (:meth:`StageModule._run`), traced on demand
    with the ``retrace`` function the compile driver hands in, kept for later calls.
receiving check
    A MIDDLE or LAST stage's check that a variant is the receiving half of the trace
    the sender ran (:func:`_fit_problem`) and that the received values fit its inputs
    (:func:`_received_problem`).

This module never traces itself: it is below the compile driver (``fxpp.compile``),
which passes ``retrace`` in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, Callable

import torch
from torch.fx import GraphModule
from transformers.utils import ModelOutput

from .analysis.annotate import called_modules, info
from .analysis.cuts import crossing_slots
from .errors import CutError, StageInputError
from .inputs.names import stream_tokens
from .inputs.signature import InputSignature
from .layout import CutLayout, cut_layout
from .meta import (GRAPH_FACTS_KEY, STAGE_KEY, GraphFacts, StageRecord, identities_of, identity_of, signature_record,
                   stage_record, trace_record)
from .ops import GUARD_OPS, GuardFailure
from .passes.extract_stage import extract_stage
from .spec import StageSpec
from .trace.recording import recording_hooks, recording_targets
from .trace.tracer import CONSTANT_PREFIX

Retrace = Callable[[torch.nn.Module, dict[str, Any]], GraphModule]
OUTPUT_MODES = ("logits", "tuple", "dict")


@dataclasses.dataclass(frozen=True)
class _StageFields:
    """A stage's constructor fields (:meth:`StageModule.build`), set once."""

    model: torch.nn.Module
    retrace: Retrace
    output_mode: str
    ignore_model_kwargs: bool
    in_layout: CutLayout | None
    out_layout: CutLayout | None
    traced_sets: dict[int, GraphModule]

    def __post_init__(self) -> None:
        if self.output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode={self.output_mode!r}: expected one of {OUTPUT_MODES}")


class StageModule(GraphModule):
    """A stage's GraphModule that takes any input set of its signature and checks what it receives.

    Note [stage outputs]
        A LAST or FULL stage returns the logits (the final hidden states for a base
        model). Where the model's forward also computes loss terms (``aux_loss`` of the
        router logits when the config sets ``output_router_logits``; ``loss`` when
        ``labels`` are in the signature), the graph returns them too, and
        ``output_mode`` (a constructor field) says what a call gives: ``"logits"``
        (the default; a ``ModelOutput`` with ``loss`` when the graph computed one),
        ``"tuple"`` (``(logits, *loss terms)``: what ``build_stage`` asks for, for a
        schedule's loss function) or ``"dict"`` (:meth:`call_returning_dict` gives it
        for any stage).

    ``self.graph`` is the *canonical* variant: the stage traced with every input of the
    signature (see ``fxpp.layout``). A FIRST or MIDDLE stage returns the fixed layout
    of its cut (the canonical slots, then the header); a MIDDLE or LAST stage takes
    that tuple and matches its values by identity. A call with another present set,
    or whose shapes make a traced shape decision (a guard) false, runs a variant
    traced for it, kept for later calls.
    """

    @classmethod
    def build(cls, model: torch.nn.Module, model_gm: GraphModule, spec: StageSpec, *, retrace: Retrace,
              output_mode: str = "logits", ignore_model_kwargs: bool = False) -> "StageModule":
        """Stage ``spec`` of the canonical whole-model graph ``model_gm``.

        Args:
            retrace: traces the whole model for one example (``fxpp.compile.compile_example``):
                how a variant for a new present set or shape is made.
            output_mode: what a LAST or FULL stage returns (Note [stage outputs]).
            ignore_model_kwargs: a MIDDLE or LAST stage accepts and drops keyword model
                inputs (schedules pass them to every stage of a rank).
        """
        stage_gm = extract_stage(model_gm, spec=spec)
        fields = _StageFields(
            model=model, retrace=retrace, output_mode=output_mode, ignore_model_kwargs=ignore_model_kwargs,
            in_layout=None if spec.takes_model_inputs else cut_layout(model_gm, spec.layers.start),
            out_layout=None if spec.returns_model_output else cut_layout(model_gm, spec.layers.stop),
            traced_sets=signature_record(model_gm).variant_graphs)
        meta = {**model_gm.meta, STAGE_KEY: StageRecord(spec)}
        return cls._assemble(stage_gm, stage_gm.graph, meta, fields, f"Stage{spec.role.value.capitalize()}")

    def with_fields(self, *, output_mode: str | None = None, ignore_model_kwargs: bool | None = None) -> "StageModule":
        """This stage again, over the same graph and the same modules (not a second
        extraction), with another output mode or keyword policy and variants of its own.

        ``fxpp.runtime.stage`` builds a rank's stage so, then swaps some of its modules
        for copies on the rank's device: the user's stage keeps the user's modules.
        """
        fields = dataclasses.replace(
            self._fxpp_fields,
            output_mode=self.output_mode if output_mode is None else output_mode,
            ignore_model_kwargs=self.ignore_model_kwargs if ignore_model_kwargs is None else ignore_model_kwargs)
        return StageModule._assemble(self, self.graph, dict(self.meta), fields, type(self).__name__)

    @classmethod
    def _assemble(cls, root: torch.nn.Module, graph, meta: dict, fields: "_StageFields", class_name: str):
        stage = cls(root, graph, class_name=class_name)
        stage.meta.update(meta)
        object.__setattr__(stage, "_fxpp_fields", fields)
        object.__setattr__(stage, "_fxpp_variants", {})  # present bits -> [GraphModule]
        object.__setattr__(stage, "_fxpp_step", None)  # inside a schedule step: the step's KnownHeader (or False)
        object.__setattr__(stage, "_fxpp_last_ok", {})  # present bits -> the variant the last such call ran
        return stage

    @property
    def output_mode(self) -> str:
        return self._fxpp_fields.output_mode

    @property
    def ignore_model_kwargs(self) -> bool:
        return self._fxpp_fields.ignore_model_kwargs

    @property
    def in_layout(self) -> CutLayout | None:
        return self._fxpp_fields.in_layout

    @property
    def out_layout(self) -> CutLayout | None:
        return self._fxpp_fields.out_layout

    @property
    def _fxpp_model(self) -> torch.nn.Module:
        return self._fxpp_fields.model

    @property
    def _fxpp_traced_sets(self) -> dict[int, GraphModule]:
        return self._fxpp_fields.traced_sets

    @property
    def spec(self) -> StageSpec:
        return stage_record(self).spec

    @property
    def signature(self) -> InputSignature:
        return signature_record(self).signature

    @property
    def input_names(self) -> list[str]:
        return [n.target for n in self.graph.nodes if n.op == "placeholder"]

    def recompile(self):
        result = super().recompile()
        generated = type(self).forward

        def forward(self, *args, **kwargs):
            return self._fxpp_dispatch(generated, args, kwargs)

        forward.__signature__ = inspect.signature(generated)
        type(self).forward = forward
        object.__setattr__(self, "_fxpp_generated", generated)
        return result

    def _where(self) -> str:
        # Every call names the stage for its errors: made once (spec and trace never change).
        where = self.__dict__.get("_fxpp_where")
        if where is None:
            spec = self.spec
            where = f"{trace_record(self).model_class} {spec.role.value} stage layers {spec.layers}"
            self.__dict__["_fxpp_where"] = where
        return where

    def call_returning_dict(self, *args, **kwargs):
        """Call the stage; a LAST or FULL stage returns its outputs as a dict
        (``logits`` and any loss terms, Note [stage outputs]) whatever its output mode."""
        return self._fxpp_dispatch(self._fxpp_generated, args, kwargs, output_mode="dict")

    def _fxpp_dispatch(self, generated, args, kwargs, output_mode: str | None = None):
        record = stage_record(self)
        if record is None:  # during GraphModule construction
            return generated(self, *args, **kwargs)
        spec = record.spec
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
            if kwargs and self.ignore_model_kwargs:
                kwargs = {}  # schedules pass model inputs to every stage of a rank
            if kwargs:
                raise StageInputError(f"{where} takes the tuple the previous stage returned, positionally; got "
                                      f"keyword input(s) {sorted(kwargs)} (model inputs go to the first stage only)")
            bits, received = self._unpack(args, where)
            variant, out = self._run(bits, received=received)
        if spec.returns_model_output:
            return self.final_output(out, output_mode)
        sent = _graph_facts(variant).sent
        passed = _passed_inputs(self.out_layout, sent, inputs if spec.takes_model_inputs else received)
        return self.out_layout.pack((*sent, *passed), (*out, *passed.values()), bits, where)

    def begin_step(self, one_header_read: bool = True) -> None:
        """A schedule step starts; with ``one_header_read`` only the first microbatch's header is read
        on the host (Note [one header read per step]), else every one."""
        object.__setattr__(self, "_fxpp_step", False if one_header_read else None)

    def end_step(self) -> bool:
        """A schedule step ended: whether a later microbatch's header differed from the first's (one host read)."""
        known = self._fxpp_step
        object.__setattr__(self, "_fxpp_step", None)
        return bool(known) and known.differed(self.in_layout)

    def _unpack(self, args, where: str) -> tuple[int, dict]:
        known = self._fxpp_step
        if known is None or self.in_layout is None:
            return self.in_layout.unpack(args, where)  # outside a schedule step: read every header
        if known is False:  # the step's first microbatch: read its header, once
            known = self.in_layout.read_header(args, where)
            object.__setattr__(self, "_fxpp_step", known)
        return known.bits, self.in_layout.unpack_as(args, where, known)

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
        why = None  # why no variant fitted: said only where one is traced for this call
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
                if not _graph_facts(variant).guarded:
                    raise
                why = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        why = why or f"no variant for inputs {list(self.signature.present(bits))} yet"
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
        targets = _graph_facts(variant).recorded
        with recording_hooks(variant, targets) if targets else contextlib.nullcontext():
            if variant is self:
                return self._fxpp_generated(self, *args, **inputs)
            return variant(*args, **inputs)

    def final_output(self, out, output_mode: str | None = None):
        """What a LAST or FULL stage returns for its graph's output ``out`` (Note [stage outputs]),
        in ``output_mode`` (default: the stage's own)."""
        if not isinstance(out, dict):
            return out
        mode = self.output_mode if output_mode is None else output_mode
        if mode == "dict":
            return out
        if mode == "tuple":
            # Scalars as [1]: a schedule concatenates the last stage's outputs per microbatch.
            return tuple(v.reshape(1) if v.dim() == 0 else v for v in out.values())
        if "loss" in out:
            return ModelOutput(out)
        return out["logits"]

    def _receiving_args(self, variant: GraphModule, received: dict, bits: int) -> tuple[list, str | None]:
        """``(args, None)`` where ``variant`` is the receiving half of the sender's trace
        and takes the received values; else ``([], why not)``.

        The answer depends only on the received identities, shapes and dtypes; one found
        to fit is kept in the variant's :class:`~fxpp.meta.GraphFacts`, so the microbatches
        of a schedule step (one shape) are checked once.
        """
        facts = _graph_facts(variant)
        key = tuple((identity, value.shape, value.dtype) for identity, value in received.items())
        if key in facts.fits:
            return [received[identity] for identity in facts.reads], None
        problem = _fit_problem(variant, received)
        if problem is not None:
            return [], problem
        args = self._args_for(variant, received, bits)
        problem = _received_problem(variant, args)
        if problem is None:
            facts.fits.add(key)
        return args, problem

    def _args_for(self, variant: GraphModule, received: dict, bits: int) -> list:
        """The received values a variant reads, by identity; a filler is never read."""
        args = []
        for identity in _graph_facts(variant).reads:
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
            model_gm = self._fxpp_fields.retrace(self._fxpp_model, example)
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
        present = [n for n in self.signature.names if n in trace_record(model_gm).example_inputs]
        variant = _on_modules_of(extract_stage(model_gm, spec=self.spec), self)
        variant.meta.update(model_gm.meta)
        variant.meta[STAGE_KEY] = StageRecord(self.spec)
        for layout, names in ((self.in_layout, [identity_of(p) for p in variant.graph.nodes
                                                if p.op == "placeholder"] if receives else []),
                              (self.out_layout, [i for n in variant.graph.nodes if n.op == "output"
                                                 for i in identities_of(n)])):
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
        built = trace_record(self).example_inputs
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
                found = crossing_slots(traced.graph, self.in_layout.cut, called_modules(traced))
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
    slots = layout.by_identity
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


def _graph_facts(variant: GraphModule) -> GraphFacts:
    """What a call of ``variant`` needs from its graph, read once per graph, not per call:
    the identities it sends (FIRST/MIDDLE) and the submodules whose outputs it records."""
    facts = variant.meta.get(GRAPH_FACTS_KEY)
    if facts is None or facts.graph is not variant.graph:
        (out,) = [n for n in variant.graph.nodes if n.op == "output"]
        facts = GraphFacts(
            graph=variant.graph, sent=tuple(identities_of(out)),
            recorded=recording_targets(variant.graph),
            guarded=any(n.op == "call_function" and n.target in GUARD_OPS for n in variant.graph.nodes),
            reads=tuple(identity_of(n) for n in variant.graph.nodes if n.op == "placeholder"))
        variant.meta[GRAPH_FACTS_KEY] = facts
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
    reads = _graph_facts(variant).reads
    missing = [i for i in reads if i not in received]
    if missing:
        return f"it reads {missing}, which the previous stage did not compute for this call"
    unread = [i for i in received if i not in reads and not i.startswith("input ")]
    if unread:
        return f"the previous stage computed {unread} for this call, which this variant does not read"
    return None


def _sequences(variant: GraphModule, placeholders: list, args) -> tuple[int | None, int | None]:
    """The sequence length ``variant`` was traced for and the one the received hidden states
    (always first) have, read where the built ones held it; ``(None, None)`` where unknown."""
    tokens = stream_tokens(trace_record(variant).example_inputs) if trace_record(variant) else None
    built = placeholders[0].meta.get("val") if placeholders else None
    if tokens is None or not isinstance(built, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
        return None, None
    pair = (tokens.shape[0], tokens.shape[1])
    at = next((i for i in range(built.dim() - 1) if tuple(built.shape[i:i + 2]) == pair), None)
    if at is None or args[0].dim() != built.dim():
        return None, None
    return pair[1], args[0].shape[at + 1]


def _received_problem(variant: GraphModule, args) -> str | None:
    """Why ``args`` cannot be this variant's inputs (rank, width, dtype), or None if they can."""
    placeholders = [n for n in variant.graph.nodes if n.op == "placeholder"]
    built_seq, seq = _sequences(variant, placeholders, args)
    for ph, value in zip(placeholders, args):
        expected = ph.meta.get("val")
        name = identity_of(ph) or ph.target
        if isinstance(expected, torch.Tensor):
            # A float tensor's last dimension is a width (hidden size); an integer one's may be
            # the sequence (multimodal positions [3, B, S]), which follows the call, and so
            # does a float mask's ([B, 1, S, S] of eager attention: its keys).
            if expected.is_floating_point() and expected.dim() >= 3 and value.dim() >= 1:
                follows = built_seq is not None and (expected.shape[-1], value.shape[-1]) == (built_seq, seq)
                width_differs = value.shape[-1] != expected.shape[-1] and not follows
            else:
                width_differs = False
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

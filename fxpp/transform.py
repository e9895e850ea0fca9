"""``fxpp.transform``: one stage of a model as a GraphModule.

The door between the user and the rooms behind it: validate the request, trace
(``fxpp.trace``), annotate (``fxpp.annotate``), rewrite (``fxpp.passes``) and wrap
the result in a :class:`StageModule` that checks its inputs and retraces itself when
a shape decision baked into the graph no longer holds (see Note [guards] in
``fxpp.ops``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.fx import GraphModule

from .annotate import annotate, info
from .errors import StageInputError, StageSpecError, UnsupportedModelError
from .ops import GuardFailure
from .passes.dense_masked_rows import dense_masked_rows
from .passes.extract_stage import extract_stage
from .passes.none_safe_masks import none_safe_masks
from .spec import StageRole, StageSpec
from .trace import find_decoder_layers, trace_model


def num_decoder_layers(model: torch.nn.Module) -> int:
    _check_model(model)
    return len(find_decoder_layers(model)[1])


def _check_model(model: Any) -> None:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise UnsupportedModelError(
            f"model={type(model).__name__!s} is not a transformers model (an nn.Module with a .config); "
            "pass e.g. a LlamaForCausalLM, LlamaModel or *ForConditionalGeneration instance"
        )


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def default_example_inputs(model: torch.nn.Module, batch_size: int = 2, seq_len: int = 8) -> dict[str, torch.Tensor]:
    """Token ids and an all-ones attention mask, on the model's device."""
    device = model_device(model)
    vocab = getattr(model.config.get_text_config(), "vocab_size", 2) or 2
    ids = torch.arange(batch_size * seq_len, device="cpu").reshape(batch_size, seq_len) % vocab
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device),
    }


def trace_annotated(model: torch.nn.Module, example_inputs: dict[str, Any]) -> GraphModule:
    """Trace and annotate the whole model for inputs shaped like ``example_inputs``."""
    _check_model(model)
    device = model_device(model)
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in example_inputs.items()}
    with model_unchanged(model):
        gm = trace_model(model, inputs)
    _reject_ignored_inputs(model, gm)
    none_safe_masks(gm)
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


_MODALITY_PREFIXES = ("pixel_values", "image_", "video_", "audio_", "input_features")


def _reject_ignored_inputs(model: torch.nn.Module, gm: GraphModule) -> None:
    """Image or audio inputs given to a model without that modality would only reach
    ``**kwargs`` and be dropped; that is a mistake to report, not to ignore."""
    import inspect

    from .trace import unwrap_forward

    named = set(inspect.signature(unwrap_forward(type(model).forward)).parameters)
    config = model.config
    has_media = any(getattr(config, k, None) is not None for k in ("vision_config", "audio_config"))
    ignored = [n.target for n in gm.graph.nodes if n.op == "placeholder" and n.target not in named
               and n.target.startswith(_MODALITY_PREFIXES)]
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
        example_inputs: keyword inputs of the model that fix which inputs exist
            (``input_ids``, ``attention_mask``, ``position_ids``, ...). Shapes are only
            an example: the stage accepts other batch and sequence sizes. Defaults to
            ``input_ids`` and ``attention_mask``. Every stage of one pipeline must be
            built from the same set of inputs.

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
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    model_gm = trace_annotated(model, example_inputs)
    return StageModule.build(model, model_gm, spec)


@contextlib.contextmanager
def model_unchanged(model: torch.nn.Module):
    """Restore every module's parameters, buffers, submodules, forward and hooks on exit."""
    saved = []
    for module in model.modules():
        state = {
            "_parameters": dict(module._parameters),
            "_buffers": dict(module._buffers),
            "_modules": dict(module._modules),
            "training": module.training,
        }
        for key in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            state[key] = dict(getattr(module, key))
        saved.append((module, state, "forward" in module.__dict__, module.__dict__.get("forward")))
    try:
        yield
    finally:
        for module, state, had_forward, forward in saved:
            for key in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
                        "_backward_hooks"):
                current = getattr(module, key)
                if not _same_entries(current, state[key]):
                    current.clear()
                    current.update(state[key])
            module.training = state["training"]
            if had_forward:
                module.__dict__["forward"] = forward
            else:
                module.__dict__.pop("forward", None)


def _same_entries(a: dict, b: dict) -> bool:
    # By identity: a forward may have stored a traced value (a Proxy) whose == is symbolic.
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


class StageModule(GraphModule):
    """A stage's GraphModule that checks its inputs and retraces on new shapes.

    ``self.graph`` is the graph for the example inputs it was built from. When a call's
    inputs make a traced shape decision (a guard) false, the stage traces the model
    again for those shapes, keeps the new graph as an alternate and runs it; later
    calls with such shapes use the alternate directly.
    """

    @classmethod
    def build(cls, model: torch.nn.Module, model_gm: GraphModule, spec: StageSpec) -> "StageModule":
        stage_gm = extract_stage(model_gm, spec=spec)
        stage = cls(stage_gm, stage_gm.graph, class_name=f"Stage{spec.role.value.capitalize()}")
        object.__setattr__(stage, "_fxpp_model", model)
        stage.meta.update(model_gm.meta)
        stage.meta["fxpp_spec"] = spec
        object.__setattr__(stage, "_fxpp_alternates", [])
        return stage

    @property
    def spec(self) -> StageSpec:
        return self.meta["fxpp_spec"]

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

    def _fxpp_dispatch(self, generated, args, kwargs):
        spec = self.meta.get("fxpp_spec")
        if spec is None:  # during GraphModule construction
            return generated(self, *args, **kwargs)
        if spec.takes_model_inputs:
            names = self.input_names
            given = {k for k, v in kwargs.items() if v is not None}
            if args:
                raise StageInputError(
                    f"{self.meta['fxpp_model_class']} {spec.role.value} stage takes the model's inputs by keyword "
                    f"({', '.join(names)}); got {len(args)} positional argument(s)"
                )
            if given != set(names):
                return self._fxpp_alternate(args, kwargs, f"inputs {sorted(given)} differ from {sorted(names)}")
        else:
            if kwargs and getattr(self, "_fxpp_ignore_model_kwargs", False):
                kwargs = {}  # schedules pass model inputs to every stage of a rank
            problem = self._received_problem(args, kwargs)
            if problem is not None and "dtype" in problem:
                raise StageInputError(problem)  # no retrace turns an integer mask into hidden states
            if problem is not None:
                return self._fxpp_alternate(args, kwargs, problem)
        try:
            return generated(self, *args, **kwargs)
        except GuardFailure as e:
            return self._fxpp_alternate(args, kwargs, str(e))

    def _received_problem(self, args, kwargs) -> str | None:
        """Why ``args`` is not the tuple this stage receives, or None if it is."""
        spec = self.spec
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        if len(args) != len(placeholders):
            hint = ""
            if kwargs and not args:
                hint = " (model inputs go to the first stage only)"
            return (
                f"{self.meta['fxpp_model_class']} {spec.role.value} stage layers {spec.layers} expects the "
                f"{len(placeholders)} tensor(s) that cross cut {spec.layers.start} "
                f"({', '.join(p.target for p in placeholders)}), got {len(args)}{hint}"
            )
        for ph, value in zip(placeholders, args):
            expected = ph.meta.get("val")
            if not isinstance(value, torch.Tensor):
                return f"stage input {ph.target!r} must be a tensor, got {type(value).__name__}"
            if isinstance(expected, torch.Tensor):
                if value.dim() != expected.dim() or (expected.dim() >= 3 and value.shape[-1] != expected.shape[-1]):
                    return f"stage input {ph.target!r}: expected shape like {tuple(expected.shape)}, got {tuple(value.shape)}"
                if value.dtype.is_floating_point != expected.dtype.is_floating_point:
                    return f"stage input {ph.target!r}: expected dtype like {expected.dtype}, got {value.dtype}"
        return None

    def _fxpp_alternate(self, args, kwargs, why: str):
        """Run an alternate graph for these inputs, tracing one if none fits."""
        for alt in self._fxpp_alternates:
            if alt.spec.takes_model_inputs:
                if set(alt.input_names) != {k for k, v in kwargs.items() if v is not None}:
                    continue
            elif alt._received_problem(args, kwargs) is not None:
                continue
            try:
                return alt._fxpp_generated(alt, *args, **kwargs)
            except GuardFailure:
                continue
        if not self.spec.takes_model_inputs and (not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2):
            raise StageInputError(why)
        example = self._example_for(args, kwargs)
        try:
            model_gm = trace_annotated(self._fxpp_model, example)
        except Exception as e:  # noqa: BLE001 - the caller's inputs are the likelier problem
            if self.spec.takes_model_inputs:
                raise
            raise StageInputError(why) from e
        alt = StageModule.build(self._fxpp_model, model_gm, self.spec)
        if not alt.spec.takes_model_inputs:
            problem = alt._received_problem(args, kwargs)
            if problem is not None:
                raise StageInputError(why)
        self._fxpp_alternates.append(alt)
        return alt._fxpp_generated(alt, *args, **kwargs)

    def _example_for(self, args, kwargs) -> dict[str, Any]:
        """Model inputs that produce the given stage inputs' shapes."""
        if self.spec.takes_model_inputs:
            return {k: v for k, v in kwargs.items() if v is not None}
        example = dict(self.meta["fxpp_example_inputs"])
        received = {}
        for ph, value in zip([n for n in self.graph.nodes if n.op == "placeholder"], args):
            received[ph.meta.get("fxpp_crossing", ph.target)] = value
        stream = args[0]  # the hidden states cross first
        old = next(iter(example.values()))
        b0, s0 = old.shape[0], old.shape[1] if old.dim() > 1 else None
        b, s = stream.shape[0], stream.shape[1]
        out = {}
        for name, value in example.items():
            if name in received:
                out[name] = received[name]
            elif isinstance(value, torch.Tensor):
                shape = [b if d == b0 and i == 0 else s if d == s0 else d for i, d in enumerate(value.shape)]
                out[name] = torch.zeros(shape, dtype=value.dtype, device=value.device)
            else:
                out[name] = value
        return out


def stage_info(stage: GraphModule) -> list[tuple[str, str]]:
    """``(node name, role)`` for every node of a stage, for tests and docs."""
    return [(n.name, info(n).role) for n in stage.graph.nodes if "fxpp" in n.meta]

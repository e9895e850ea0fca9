"""``fxpp.pipeline``: all stages of a model, cut once, traced once.

The top door: it imports the compile driver (``fxpp.compile``) to build the stages and
the runtime (``fxpp.runtime``) to place them on ranks. Neither imports it back; the
runtime reads a :class:`Pipeline` through ``fxpp.runtime.protocols.SplitModel``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

from .analysis.costs import BlockCost, estimate_block_costs
from .analysis.annotate import called_modules
from .analysis.cuts import crossing_values, describe_crossing
from .analysis.stage_memory import MemoryModel, MemorySettings, RankMemory
from .analysis.verify import verify_pipeline
from .compile import build_stage_module, check_model, num_decoder_layers, trace_canonical
from .errors import StageInputError, StageSpecError
from .analysis.memory_plan import (check_ranges_fit, format_memory_plan, memory_aware_ranges, memory_model_for,
                                   microbatch_example)
from .meta import signature_record, trace_record
from .runtime.loss import AUX_LOSS_COEF_NAMES, router_aux_loss_coef
from .runtime.stage import build_stage
from .split import balanced_split, check_counts, ranges_from_counts, ranges_from_cuts, roles_for
from .spec import StageRole, StageSpec
from .stage_module import StageModule


class Pipeline:
    """The stages of one model.

    Attributes:
        stages: one :class:`~fxpp.stage_module.StageModule` per stage, in order.
        layer_ranges: the decoder layers of each stage.
        crossing: for each cut, the names of the values that cross it.
        block_costs: the cost model's ``[prelude, layer 0, ..., head]`` estimates.
    """

    def __init__(self, model: torch.nn.Module, model_graph, layer_ranges: list[range], example_inputs: dict[str, Any],
                 block_costs: list[BlockCost], memory: MemoryModel | None = None):
        self.model = model
        self.memory = memory
        self.model_graph = model_graph
        self.layer_ranges = list(layer_ranges)
        self.example_inputs = example_inputs
        self.block_costs = block_costs
        n = trace_record(model_graph).num_layers  # num_decoder_layers(model), found by the trace
        self.stages: list[StageModule] = []
        for role, layers in zip(roles_for(len(layer_ranges)), layer_ranges):
            spec = StageSpec(role=StageRole.parse(role), layers=layers, num_layers=n)
            self.stages.append(build_stage_module(model, model_graph, spec))
        graph, modules = model_graph.graph, called_modules(model_graph)
        cut_values = [(r.start, crossing_values(graph, r.start)) for r in layer_ranges[1:]]
        self.crossing = [[v.name for v in values] for _, values in cut_values]
        self.signature = signature_record(model_graph).signature
        self.crossing_described = [
            [f"{v.name} ({describe_crossing(graph, v, k, modules)})" for v in values] for k, values in cut_values
        ]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def __call__(self, **inputs: Any) -> Any:
        """Run every stage in this process, one after another.

        Returns the logits, or with ``labels=...`` what the model returns for them: an
        output with ``.loss``, ``.logits`` and, for a MoE model with router logits,
        ``.aux_loss`` (the loss includes ``router_aux_loss_coef`` times it).
        """
        labels = None
        if "labels" not in self.signature.names:
            labels = inputs.pop("labels", None)
        out = self.stages[0](**inputs)
        last = self.stages[-1]
        for stage in self.stages[1:]:
            out = stage.call_returning_dict(*out)
        if not isinstance(out, dict):
            out = {"logits": out}
        if labels is None:
            return last.final_output(out) if len(out) > 1 else out["logits"]
        return model_loss(self.model, out, labels)

    def stage_costs(self) -> list[float]:
        """Estimated forward FLOPs of each stage (prelude on the first, head on the last)."""
        layers = self.block_costs[1:-1]
        costs = [sum(layers[i].flops for i in r) for r in self.layer_ranges]
        costs[0] += self.block_costs[0].flops
        costs[-1] += self.block_costs[-1].flops
        return costs

    def stage_params(self) -> list[int]:
        return [sum(p.numel() for p in stage.parameters()) for stage in self.stages]

    def plan(self) -> str:
        """The stage plan as a table: layers, parameters, cost share, what crosses each cut."""
        costs = self.stage_costs()
        params = self.stage_params()
        total = sum(costs) or 1.0
        rows = [f"{type(self.model).__name__}: {self.num_stages} stages, "
                f"example {', '.join(f'{k}{list(v.shape)}' for k, v in self.example_inputs.items() if hasattr(v, 'shape'))}",
                f"{'stage':>5}  {'role':<6}  {'layers':<9}  {'params':>12}  {'cost share':>10}  crosses the next cut"]
        for i, (stage, layers) in enumerate(zip(self.stages, self.layer_ranges)):
            crossing = ", ".join(self.crossing_described[i]) if i < len(self.crossing) else "-"
            rows.append(
                f"{i:>5}  {stage.spec.role.value:<6}  {layers.start:>3}-{layers.stop - 1:<5}  "
                f"{params[i]:>12,}  {costs[i] / total:>9.1%}  {crossing}"
            )
        rows.append(f"balance: slowest stage {max(costs) / total:.1%} of the work (ideal {1 / self.num_stages:.1%})")
        return "\n".join(rows)

    def memory_plan(self) -> list[RankMemory]:
        """Each rank's predicted peak memory, by stage and kind (``fxpp.analysis.stage_memory``).

        Raises:
            StageSpecError: the pipeline was built without ``schedule=`` (no memory model).
        """
        if self.memory is None:
            raise StageSpecError("this pipeline has no memory model: build it with fxpp.pipeline(model, n, "
                                 "schedule=NAME, microbatch=(B, S)) to predict memory")
        return self.memory.split_memory(self.layer_ranges)

    def __repr__(self) -> str:
        plan = self.plan()
        if self.memory is not None:
            plan += "\n" + format_memory_plan(self.memory, self.layer_ranges, self.stage_costs())
        return plan

    def build_stage(self, index: int, device, group=None, *, style: str | None = None, checkpoint: str | None = None,
                    microbatch: dict | None = None, dp_mesh=None, data_parallel: str = "fsdp",
                    mesh=None, mixed_precision: str | None = None, mp_policy=None,
                    activation_checkpointing: bool = False, compile: bool | str = False):
        """Stage ``index`` as a ``torch.distributed.pipelining.PipelineStage``.

        Static input/output metadata come from the example inputs, which must have the
        microbatch's shape. The stage's parameters are the model's own where they
        already live on ``device``; otherwise copies (the model is never moved). The
        last stage holds its own copy of weights tied to the first stage, and their
        gradients are summed between the two ranks at the end of every
        ``schedule.step`` over point-to-point ops on ``group`` (default: the world
        group); see Note [tied-weight sync] in ``fxpp.runtime.ties``.

        Args:
            index: the stage id. device: where its parameters and activations live.
            group: the pipeline's process group. style: stage placement, ``"loop"``
                (stage s on rank s % world) or ``"v"`` (ZBVZeroBubble, DualPipeV);
                by default inferred from the stages this rank builds (known at the
                first step; a set that fits neither is a ``StageSpecError``).
            checkpoint: a transformers safetensors checkpoint (file, directory or
                sharded index); the stage reads only its own keys (over dp or tp, only
                each rank's part of each: Note [tensor parallel checkpoints] in
                ``fxpp.runtime.tp_checkpoint``). Required when the model lives on the
                meta device.
            microbatch: example inputs of a new microbatch shape. Building a stage
                again with it (and a new schedule) changes sequence length or
                microbatch count between steps; the stage keeps its parameters, so
                gradients accumulated so far are kept.
            dp_mesh: replicate the stage over data-parallel ranks: the 2-D
                ``("pp", "dp")`` mesh of ``fxpp.runtime.parallel.pp_dp_mesh`` (its
                ``"pp"`` group is then the pipeline group) or its ``mesh["dp"]`` with
                ``group=mesh["pp"].get_group()``. See Note [pipeline x data parallel]
                in ``fxpp.runtime.parallel``.
            data_parallel: ``"fsdp"`` (FSDP2 ``fully_shard`` on each decoder layer and
                on the stage) or ``"replicate"`` (the same with FSDP2's ``replicate``:
                DDP-style full copies). Only with ``dp_mesh``.
            mesh: a device mesh with dimensions among ``("pp", "dp", "tp")`` in that
                order (``fxpp.pp_dp_mesh``, ``fxpp.pp_dp_tp_mesh``); the same as
                ``dp_mesh=`` (its older spelling). With ``"tp"`` (size > 1) the stage's
                own copy is split by the model's tensor-parallel plan before FSDP2 over
                dp (Note [tensor parallel stages] in ``fxpp.runtime.tensor_parallel``).
            mixed_precision: ``"bf16"``: fp32 master parameters and optimizer state,
                bf16 compute and cut messages, fp32 gradient reduction (FSDP2's
                ``MixedPrecisionPolicy``; Note [mixed precision] in
                ``fxpp.runtime.parallel``); ``None`` or ``"fp32"``: no casting.
            mp_policy: a full ``MixedPrecisionPolicy`` instead of ``mixed_precision``.
            activation_checkpointing: recompute each decoder layer's activations in
                the backward (torch's composable ``checkpoint``; parameter names
                unchanged, gradients identical).
            compile: ``True`` compiles every decoder layer of the stage in place with
                inductor (``layer.compile()``, regional compilation); a string names
                another ``torch.compile`` backend (``"aot_eager"``). The stage stays a
                plain module that every schedule takes, zero-bubble ones included, and
                the user's model is untouched (Note [compiled stages] in
                ``fxpp.runtime.compiled``; counts and time: ``fxpp.compile_stats()``).

            A stage is wrapped once, on its first build on the rank, on this rank's
            own copy of its modules (the user's model is untouched); building it
            again (a new microbatch shape) reuses it, and different wrapping
            arguments (``compile`` included) are a ``StageSpecError``.

        Raises:
            StageSpecError: no process group, bad index, a meta model without a
                checkpoint, CUDA with gloo, a mesh with dimensions other than
                ``"pp"``, ``"dp"``, ``"tp"`` (in that order), a stage built again with
                other wrapping arguments.
            TensorParallelError: with a ``"tp"`` dimension, a model without a
                tensor-parallel plan, with DTensor parameters, or a tp that does not
                divide the heads (or another dimension) the plan shards.
            CheckpointError: missing keys, wrong shapes.
            CompileError: ``compile`` names no backend, inductor finds no C++ compiler
                (CPU) or no Triton (CUDA).
        """
        return build_stage(self, index, device, group, style=style, checkpoint=checkpoint, microbatch=microbatch,
                           dp_mesh=dp_mesh, data_parallel=data_parallel,
                           activation_checkpointing=activation_checkpointing, mesh=mesh,
                           mixed_precision=mixed_precision, mp_policy=mp_policy, compile=compile)


def pipeline(
    model: torch.nn.Module,
    num_stages: int,
    example_inputs: dict[str, Any] | None = None,
    *,
    cuts: list[int] | None = None,
    layers_per_stage: list[int] | None = None,
    verify: bool = False,
    schedule: str | None = None,
    microbatch: tuple[int, int] | None = None,
    num_microbatches: int | None = None,
    memory_limit: int | None = None,
    optimizer: str = "adamw",
    dp: int = 1,
    tp: int = 1,
    data_parallel: str = "fsdp",
    device: torch.device | str | None = None,
    keep_outputs: bool = True,
) -> Pipeline:
    """Split ``model`` into ``num_stages`` consecutive stages.

    Args:
        model: a transformers decoder-only model (see :func:`fxpp.transform`).
        num_stages: how many stages (a multiple of the ranks for multi-stage schedules).
        example_inputs: one microbatch of model inputs by keyword; widens the input
            signature (a VLM's media inputs; ``input_ids``, ``attention_mask`` and
            ``position_ids`` are in it anyway where the forward takes them, and
            ``inputs_embeds`` as the alternative to ``input_ids``, see ``fxpp.layout``) and gives the shapes the cost model uses. Defaults to
            ``input_ids`` of shape ``[2, 8]``. Calls may carry any subset of the
            signature that names the tokens.
        cuts: explicit cut points (``num_stages - 1`` increasing layer indices), or
        layers_per_stage: explicit layer counts. Default: the cost model's balanced split.
        verify: run the composed stages against the model on the example inputs
            (which must then hold real values) and raise on any divergence.
        schedule: the ``torch.distributed.pipelining`` schedule the stages will run
            (``"1F1B"``, ``"ZBVZeroBubble"``, ...): with it the pipeline predicts each
            rank's peak memory (:meth:`Pipeline.memory_plan`; see
            ``fxpp.analysis.stage_memory``). Multi-stage schedules hold two stages per rank.
        microbatch: ``(batch, seq)`` of one microbatch; without ``example_inputs``, the
            example is ``input_ids`` and ``attention_mask`` of that shape (give a VLM's
            media through ``example_inputs``, whose tokens must then have this shape).
        num_microbatches: microbatches per step (default: ``num_stages``, the fewest
            torch's 1F1B accepts); GPipe and LoopedBFS hold all of them at once.
        memory_limit: bytes per rank. The cuts then minimise the slowest stage among the
            splits whose every rank's predicted peak is within it (exact: a dynamic
            program over consecutive layer ranges, or for multi-stage schedules a search
            over the coupled ranks). Needs ``schedule`` and ``microbatch``.
        optimizer: ``"adamw"`` (two moments per parameter), ``"sgd"`` or ``"none"``.
        dp, tp, data_parallel: data- and tensor-parallel degrees and FSDP (``"fsdp"``) or
            full replicas (``"replicate"``), for the memory model.
        device: the device the stages will run on, whose kernels decide what the
            backward keeps (default: the model's, or CUDA when present for a meta model).
        keep_outputs: the steps will keep the last stage's outputs, as ``schedule.step``
            does by default (``return_outputs=True``, torch's default): the last rank then
            holds every microbatch's logits until the next step and, at the end of each step,
            their concatenation. Pass ``False`` for steps called with
            ``return_outputs=False`` (as ``fxpp run`` does), which keep neither.

    Raises:
        StageSpecError: impossible ``num_stages``, ``cuts`` or ``layers_per_stage``; a
            ``memory_limit`` without ``schedule`` or ``microbatch``, or a bad value of any
            memory argument.
        MemoryLimitError: no split fits ``memory_limit``; says the smallest stage count
            that fits, or that none does.
        VerificationError: with ``verify=True``, the first stage and node whose output
            differs from the model's.
    """
    check_model(model)
    n = num_decoder_layers(model)
    if cuts is not None and layers_per_stage is not None:
        raise StageSpecError("give cuts or layers_per_stage, not both")
    if cuts is not None:
        ranges = ranges_from_cuts(n, list(cuts))
    elif layers_per_stage is not None:
        ranges = ranges_from_counts(n, list(layers_per_stage))
    else:
        ranges = None
    if ranges is not None and len(ranges) != num_stages:
        raise StageSpecError(f"{'cuts' if cuts is not None else 'layers_per_stage'} gives {len(ranges)} stages, "
                             f"not num_stages={num_stages}")
    if ranges is None:
        check_counts(n, num_stages)
    settings = None
    if memory_limit is not None or schedule is not None or microbatch is not None:
        settings = MemorySettings(schedule=schedule, num_microbatches=num_stages if num_microbatches is None
                                  else num_microbatches, optimizer=optimizer, dp=dp, tp=tp,
                                  data_parallel=data_parallel, keep_outputs=keep_outputs) if schedule is not None else None
        example_inputs = microbatch_example(model, example_inputs, microbatch, schedule, memory_limit, num_stages)
    model_graph = trace_canonical(model, example_inputs)
    example = trace_record(model_graph).example_inputs
    costs = estimate_block_costs(model_graph, model, example)
    memory = memory_model_for(model, model_graph, settings, device) if settings is not None else None
    if memory_limit is not None and ranges is None:
        ranges = memory_aware_ranges(memory, costs, num_stages, memory_limit)
    if ranges is None:
        ranges = balanced_split(
            [c.flops for c in costs[1:-1]], num_stages, first_extra=costs[0].flops, last_extra=costs[-1].flops,
            layer_params=[c.params for c in costs[1:-1]],
        )
    pipe = Pipeline(model, model_graph, ranges, example, costs, memory)
    if memory_limit is not None:  # the cuts given, and the search's (whose fit the whole split confirms)
        check_ranges_fit(memory, ranges, memory_limit)
    if verify:
        verify_pipeline(pipe, pipe.example_inputs)
    return pipe


def model_loss(model: torch.nn.Module, out: dict, labels: torch.Tensor):
    """What the model's forward returns for ``labels``, from a stage's outputs (Note [stage outputs]).

    The language-model loss is the model's own ``loss_function``; a router auxiliary
    loss is added with the coefficient the forward uses (``fxpp.runtime.loss.router_aux_loss_coef``).

    Raises:
        StageInputError: the forward computes a loss term fxpp does not know how to add.
    """
    unknown = sorted(set(out) - {"logits", "aux_loss"})
    if unknown:
        raise StageInputError(f"{type(model).__name__}: its forward computes {unknown}, which fxpp does not add to the "
                              "loss; compute the loss from the logits yourself")
    logits = out["logits"]
    vocab = model.config.get_text_config().vocab_size
    loss = model.loss_function(logits=logits, labels=labels, vocab_size=vocab)
    if "aux_loss" not in out:
        return CausalLMOutputWithPast(loss=loss, logits=logits)
    coef = router_aux_loss_coef(model)
    if coef is None:
        raise StageInputError(f"{type(model).__name__}: its forward returns an aux_loss but fxpp finds no coefficient "
                              f"for it (none of {', '.join(AUX_LOSS_COEF_NAMES)} on the model or its config); "
                              "compute the loss from the logits and aux_loss yourself")
    loss = loss + coef * out["aux_loss"].to(loss.device)
    return MoeCausalLMOutputWithPast(loss=loss, aux_loss=out["aux_loss"], logits=logits)

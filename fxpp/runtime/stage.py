"""Runtime glue: fxpp stages as ``torch.distributed.pipelining.PipelineStage``.

The runtime room (``fxpp.runtime``) is the only one that imports
``torch.distributed.pipelining``. Everything here is device-agnostic: the same code
runs on CPU with gloo and on CUDA with NCCL (``fxpp.runtime.placement``).
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage

from ..errors import StageInputError, StageSpecError, TiedWeightError
from ..inputs.names import stream_tokens
from ..layout import PACKED, filler_shape, step_shape
from ..meta import trace_record
from .checkpoint import load_stage, recompute_non_persistent_buffers
from .compiled import check_compile, compile_backend, own_layer_shells
from .parallel import (check_parallel_args, decoder_layer_modules, mixed_precision_policy, parallelize_stage,
                       resolve_meshes, single_rank_mesh)
from .placement import check_placement
from .protocols import SplitModel
from .rank_state import rank_state
from .tensor_parallel import (apply_tensor_parallel, check_crossings, check_stage_plan, check_tp_args,
                              check_unplanned_grads, head_name, hook_grads, stage_plan, tp_plan_of,
                              unplanned_parameters)
from .tp_checkpoint import load_tp_stage
from .ties import LIVE_STAGES, UNSYNCHRONISED, guard_optimizers, tie_exchanges, tied_parameters


class FxppPipelineStage(PipelineStage):
    """A PipelineStage that knows its tied weights (Note [tied-weight sync]) and can be rebuilt for new shapes."""

    def __init__(self, *args, tied: list = (), local_partners: list = (), sends: list = (), rebuild=None,
                 batch_seq: tuple[int, int] | None = None, tie_copies: frozenset = frozenset(),
                 compute_dtype: torch.dtype | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.compute_dtype = compute_dtype  # the dtype floating values cross the cuts in (None: as traced)
        self.tie_copies = frozenset(tie_copies)  # names of this stage's copies of weights an earlier stage owns
        self._fxpp_ties = list(tied) + list(local_partners or [])
        self._fxpp_pending_ties = None  # resolved at the first step when the placement was inferred
        self._fxpp_owed = False  # a backward ran this step, exchange not yet done
        self._fxpp_grad_before: dict = {}
        self._fxpp_sends = list(sends)  # (what, shape, dtype) of each tensor sent to the next stage
        self._fxpp_rebuild = rebuild  # (batch, seq) -> a stage with those static shapes; None: shapes fixed
        self._fxpp_batch_seq = batch_seq
        self._fxpp_tp_check = None  # (stage) -> bool: the unplanned parameters' check, once (Note [unplanned parameters])
        LIVE_STAGES.add(self)
        guard_optimizers()

    @property
    def has_ties(self) -> bool:
        return bool(self._fxpp_ties) or self._fxpp_pending_ties is not None

    def backward_one_chunk(self, *args, **kwargs):
        self._fxpp_backward_ran()
        return super().backward_one_chunk(*args, **kwargs)

    def backward_weight_one_chunk(self, *args, **kwargs):
        self._fxpp_backward_ran()
        return super().backward_weight_one_chunk(*args, **kwargs)

    def _fxpp_backward_ran(self) -> None:
        # torch's 1F1B calls backward_one_chunk under eval() too, which then computes nothing
        if self.has_ties and self.has_backward:
            self._fxpp_owed = True

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        output = super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)
        if self._fxpp_sends:
            check_sent_shapes(self.stage_index, fwd_chunk_id, output, self._fxpp_sends,
                              getattr(self.submod, "out_layout", None))
        return output

    def _fxpp_increment(self, p: torch.nn.Parameter) -> torch.Tensor:
        """What this step added to ``p.grad`` (its value at the step's start is in the snapshot)."""
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        before = self._fxpp_grad_before.get(p)
        return p.grad.detach().clone() if before is None else p.grad.detach() - before

    def _fxpp_finish(self) -> None:
        """The tied-weight exchange of this step; called by :class:`PipelineSchedule` after the step."""
        if not self._fxpp_owed:
            return
        self._fxpp_owed = False
        for tie in self._fxpp_ties:
            tie.exchange(self)

    def check_tp_gradients(self) -> None:
        """The unplanned parameters' check (Note [unplanned parameters]), once; called by :class:`PipelineSchedule`
        at the very end of a training step, after every collective of the step, so that a refusal here leaves no
        rank of the pipeline waiting in one."""
        if self._fxpp_tp_check is not None and self._fxpp_tp_check(self):
            self._fxpp_tp_check = None

    def scale_grads(self, grad_scale_factor: int) -> None:
        """Divide this step's gradient increment by ``grad_scale_factor``.

        torch's own ``scale_grads`` divides the whole ``.grad``, so gradients accumulated
        over earlier steps (no ``zero_grad`` in between, or a step with a new sequence
        length or microbatch count) would be divided again at every step. Only what this
        step added is scaled here.
        """
        if grad_scale_factor != 1:
            for p in self.submod.parameters():
                if p.grad is None:
                    continue
                before = self._fxpp_grad_before.get(p)
                if before is None:
                    p.grad.div_(grad_scale_factor)
                else:
                    p.grad.sub_(before).div_(grad_scale_factor).add_(before)

    def clear_runtime_states(self) -> None:
        if self._fxpp_pending_ties is not None:
            tied, local = self._fxpp_pending_ties()
            self._fxpp_ties = tied + local
            self._fxpp_pending_ties = None
        if self._fxpp_owed:
            raise TiedWeightError(UNSYNCHRONISED.format(stage=self.stage_index, when="a new step started"))
        # Gradients already accumulated before this step (see scale_grads and the
        # tied-weight exchange); kept until the next step starts.
        self._fxpp_grad_before = {p: p.grad.detach().clone() for p in self.submod.parameters() if p.grad is not None}
        super().clear_runtime_states()

    def begin_step(self, one_header_read: bool = True) -> None:
        """``fxpp.schedule`` starts a step (Note [one header read per step])."""
        if hasattr(self.submod, "begin_step"):
            self.submod.begin_step(one_header_read)

    def restore_step_start_grads(self) -> None:
        """Every gradient as it was when the step started (the step is about to be run again)."""
        for p in self.submod.parameters():
            p.grad = self._fxpp_grad_before.get(p)
        self._fxpp_owed = False

    def end_step(self) -> bool:
        """Whether a microbatch of this step was read as the step's first said while its header differed."""
        return self.submod.end_step() if hasattr(self.submod, "end_step") else False


def check_sent_shapes(stage_index: int, microbatch: int, outputs, sends: list[tuple[str, tuple, torch.dtype]],
                      layout=None) -> None:
    """Every tensor a stage sends must have the shape and dtype the receive buffers were made for.

    A point-to-point receive into a buffer of another size or dtype fails far from the
    cause, on the other rank, or reads a wrong value (bf16 bits read as half of an fp32
    buffer); so the sender checks (no communication) and names the value.

    Raises:
        StageInputError: a sent tensor's shape differs from the example microbatch's, or
            its dtype from the slot's (the compute dtype for floating values).
    """
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    for (what, expected, dtype), tensor in zip(sends, outputs):
        if tensor.dtype != dtype:
            raise StageInputError(
                f"stage {stage_index}, microbatch {microbatch}: sends {what} as {tensor.dtype}, but its slot is "
                f"{dtype} (floating values cross the cuts in the stage's compute dtype, mixed_precision). A value "
                "the model computes in another dtype than its parameters' cannot cross this cut: build the stages "
                "without mixed_precision, or cut elsewhere (fxpp.pipeline(..., cuts=[...]))")
        if tuple(tensor.shape) != tuple(expected):
            if what == PACKED and layout is not None:  # name the integer slots, as the header gives them
                what = f"{what} (its integer slots {layout.sent_shapes(tensor)})"
            raise StageInputError(
                f"stage {stage_index}, microbatch {microbatch}: sends {what} with shape {list(tensor.shape)}, but the "
                f"stages were built for {list(expected)}. A stage's static shapes are fixed when it is built: "
                "pipe.build_stage(i, device, microbatch=<a microbatch of this step's shape>) and a new schedule "
                "change them between steps (the stage keeps its parameters and gradients); within one step every "
                "microbatch needs one batch size and sequence length"
            )


def _runtime_submodule(pipe: SplitModel, index: int, device: torch.device, *, own: bool = False,
                       keep_meta: bool = False):
    """The stage's GraphModule for a rank: on ``device``, last stage with its own tied copy.

    Modules already on ``device`` are the model's own; others are copied (never moved,
    so the user's model is untouched); meta modules are allocated empty, or with
    ``keep_meta`` stay on meta (to be sharded first, then allocated: :func:`_allocate`).
    With ``own`` every module is copied: the stage is about to be wrapped in place
    (data parallelism, activation checkpointing), which must not reach the user's model.

    The stage is ``pipe.stages[index]`` again over the same graph (not extracted a second
    time), with its own module tree so that the swaps below leave the user's stage alone:
    a last stage whose graph returns loss terms returns ``(logits, *loss terms)`` for the
    schedule's loss (Note [stage outputs]), and a stage that is not the first drops the
    model inputs a schedule passes to every stage of a rank.
    """
    source = pipe.stages[index]
    returns_terms = isinstance(next(n for n in source.graph.nodes if n.op == "output").args[0], dict)
    stage = source.with_fields(output_mode="tuple" if returns_terms else source.output_mode,
                               ignore_model_kwargs=not source.spec.takes_model_inputs)
    tied_here = set()
    if index == len(pipe.stages) - 1:
        for owners in tied_parameters(pipe):
            if index in owners and min(owners) != index:
                tied_here.add(owners[index])
    replaced: dict[int, torch.nn.Module] = {}
    for node in stage.graph.nodes:
        if node.op != "call_module":
            continue
        module = stage.get_submodule(node.target)
        tensors = list(module.parameters()) + list(module.buffers())
        own_names = {f"{node.target}.{n}" for n, _ in module.named_parameters()}
        needs_copy = own or any(t.device != device for t in tensors) or bool(own_names & tied_here)
        if not needs_copy:
            continue
        if id(module) not in replaced:
            replaced[id(module)] = _copy_to(pipe.model, module, device, keep_meta=keep_meta)
        stage.set_submodule(node.target, replaced[id(module)])
    stage.recompile()
    return stage


def _wrapping_text(wrapping) -> str:
    if wrapping is None:
        return "no data parallelism, no tensor parallelism, no activation checkpointing and no compile"
    dp, ac, policy, tp, backend = wrapping
    where = "no data parallelism" if dp is None else f"data_parallel={dp[1]!r} over ranks {list(dp[0])}"
    split = "no tensor parallelism" if tp is None else f"tensor parallel over ranks {list(tp)}"
    return (f"{where}, {split}, activation_checkpointing={ac}, mixed precision {policy or 'none'}, "
            f"compile={backend or False!r}")


def _materialize(pipe: SplitModel, index: int, submodule, checkpoint: str | None, *, tp: bool = False) -> None:
    """Load the stage's own keys from ``checkpoint`` (``tp``: each rank its slices, Note [tensor parallel
    checkpoints]); refuse to train uninitialised memory."""
    if checkpoint is None:
        if any(t.is_meta for t in pipe.stages[index].parameters()):
            raise StageSpecError(
                f"stage {index}: the model's parameters are on the meta device; pass checkpoint=<safetensors file "
                "or directory> so the stage loads its own weights"
            )
        return
    aliases = {}
    for owners in tied_parameters(pipe):
        if index in owners:
            aliases[owners[index]] = [name for i, name in sorted(owners.items()) if i != index]
    (load_tp_stage if tp else load_stage)(submodule, checkpoint, aliases=aliases)


def _copy_to(model: torch.nn.Module, module: torch.nn.Module, device: torch.device, *,
             keep_meta: bool = False) -> torch.nn.Module:
    if any(t.is_meta for t in list(module.parameters()) + list(module.buffers())):
        fresh = copy.deepcopy(module)
        return fresh if keep_meta else _allocate(model, fresh, device)
    return copy.deepcopy(module).to(device)


def _allocate(model: torch.nn.Module, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Give a meta module uninitialised memory on ``device`` (after FSDP2: only the local shards)."""
    module.to_empty(device=device)
    recompute_non_persistent_buffers(model, module, device)
    return module


def _sends(stage) -> list[str]:
    """What each tensor a stage sends is, as its cut's layout names them (``fxpp.layout``: the tensor
    slots, then the packed tensor)."""
    layout = stage.out_layout
    return [] if layout is None else list(layout.wire_names)


def _example_args(stage, device: torch.device, batch_seq: tuple[int, int] | None,
                  compute_dtype: torch.dtype | None = None):
    """Static input/output metadata of a stage: its cuts' layouts at the microbatch's batch and sequence size.

    Floating slots take ``compute_dtype`` where the stage computes in another dtype than
    it was traced in (mixed precision: the hidden states cross in bf16).
    """

    def real(shape, dtype):
        if compute_dtype is not None and dtype.is_floating_point:
            dtype = compute_dtype
        # Floating tensors carry gradients across the cut; integer ones (masks, ids, the header) do not.
        return torch.empty(shape, dtype=dtype, device=device, requires_grad=dtype.is_floating_point)

    def resized(shape, built):
        return shape if batch_seq is None else filler_shape(shape, built, batch_seq[:2])

    def layout_args(layout):
        built = layout.slots[0].shape[:2]
        return layout.wire_examples([resized(s.shape, built) for s in layout.slots], real)

    inputs = () if stage.in_layout is None else layout_args(stage.in_layout)
    if stage.out_layout is not None:
        return inputs, layout_args(stage.out_layout)
    (out,) = [n for n in stage.graph.nodes if n.op == "output"]
    result = out.args[0]
    vals = [n.meta["val"] for n in (result.values() if isinstance(result, dict) else [result])]
    example = trace_record(stage).example_inputs
    tokens = stream_tokens(example)
    built = tuple(tokens.shape[:2]) if tokens is not None else tuple(vals[0].shape[:2])
    return inputs, tuple(real(resized(tuple(v.shape), built) or (1,), v.dtype) for v in vals)  # scalars as [1]


def build_stage(pipe: SplitModel, index: int, device: torch.device | str, group=None, *, style: str | None = None,
                checkpoint: str | None = None, microbatch: dict | None = None,
                batch_seq: tuple[int, int] | None = None, dp_mesh=None, data_parallel: str = "fsdp",
                activation_checkpointing: bool = False, mesh=None, mixed_precision: str | None = None,
                mp_policy=None, compile: bool | str = False) -> FxppPipelineStage:
    """``pipe.build_stage``: see :meth:`fxpp.Pipeline.build_stage`.

    What the rank built is kept in ``fxpp.runtime.rank_state``, not on the pipeline.
    """
    device = torch.device(device)
    if mesh is not None:
        if dp_mesh is not None:
            raise StageSpecError("pass mesh= or dp_mesh=, not both (dp_mesh= is the older spelling of mesh=)")
        dp_mesh = mesh
    policy = mixed_precision_policy(mixed_precision, mp_policy)
    num_stages = len(pipe.stages)
    if not 0 <= index < num_stages:
        raise StageSpecError(f"stage index {index} is out of range for a {num_stages}-stage pipeline")
    if not dist.is_initialized():
        raise StageSpecError(
            "build_stage needs torch.distributed to be initialised (dist.init_process_group); "
            "for a single process, run the stages with pipe(**inputs)"
        )
    check_parallel_args(dp_mesh, data_parallel, activation_checkpointing)
    backend = compile_backend(compile)
    mesh_arg, tp_mesh, tp_entries = dp_mesh, None, None
    if dp_mesh is not None:
        meshes = resolve_meshes(dp_mesh, group)
        dp_mesh, tp_mesh, group = meshes.dp, meshes.tp, meshes.group
    if tp_mesh is not None:
        check_tp_args(tp_mesh.size(), dp_mesh, data_parallel, policy)
        tp_entries = stage_plan(tp_plan_of(pipe.model), pipe.stages[index])
        check_stage_plan(index, pipe.model, pipe.stages[index], tp_entries, tp_mesh.size())
        check_crossings(index, pipe.stages[index], tp_mesh.size())
    if dp_mesh is None and policy is not None:
        dp_mesh = single_rank_mesh(device)  # FSDP2 carries the policy; over one rank it shards nothing
    if device.type == "cuda" and dist.get_backend(group) == "gloo":
        raise StageSpecError(f"device={device} with the gloo backend: use NCCL for CUDA stages")
    if backend is not None:
        check_compile(backend, device)
    key = (index, str(device))
    state = rank_state(pipe)
    submodule = state.submodules.get(key)
    wrapping = None
    # Every wrapping but compile needs the stage's own copy of each module; compile alone
    # swaps only the shared decoder layers for shells (Note [compiled stages]).
    own = dp_mesh is not None or activation_checkpointing or tp_mesh is not None
    if own or backend is not None:
        wrapping = (None if dp_mesh is None else (tuple(dp_mesh.mesh.flatten().tolist()), data_parallel),
                    activation_checkpointing, None if policy is None else str(policy),
                    None if tp_mesh is None else tuple(tp_mesh.mesh.flatten().tolist()), backend)
    if submodule is None:
        # A meta stage sharded over dp or tp is sharded on meta, then allocated: each
        # rank only ever holds its own shards, and the checkpoint fills them (load_stage;
        # under tp, load_tp_stage: Note [tensor parallel checkpoints]).
        keep_meta = checkpoint is not None and (dp_mesh is not None or tp_mesh is not None)
        submodule = _runtime_submodule(pipe, index, device, own=own, keep_meta=keep_meta)
        if tp_mesh is not None:
            apply_tensor_parallel(submodule, tp_entries, tp_mesh, pipe.model.config, head=head_name(pipe.model))
        if wrapping is not None:
            if backend is not None and not own:
                users = {id(m) for m in pipe.stages[index].modules()}
                own_layer_shells(submodule, decoder_layer_modules(submodule), users)
            # Wrapped once, here, before any PipelineStage sees it; a rebuild for new
            # shapes finds it in the rank state and reuses it.
            parallelize_stage(submodule, dp_mesh=dp_mesh, data_parallel=data_parallel,
                              activation_checkpointing=activation_checkpointing, mp_policy=policy,
                              compile_backend=backend)
            object.__setattr__(submodule, "_fxpp_wrapping", wrapping)
        if keep_meta:
            _allocate(pipe.model, submodule, device)
            if tp_mesh is not None and dp_mesh is None:  # FSDP2 lays gradients out itself
                hook_grads(submodule)
        _materialize(pipe, index, submodule, checkpoint, tp=tp_mesh is not None)
        state.submodules[key] = submodule
    else:
        done = getattr(submodule, "_fxpp_wrapping", None)
        if wrapping is not None and wrapping != done:
            raise StageSpecError(
                f"stage {index} was built on this rank before with {_wrapping_text(done)}; building it again with "
                f"{_wrapping_text(wrapping)} would wrap it twice. Build each stage with the same dp_mesh, "
                "data_parallel, activation_checkpointing, mixed_precision and compile every time (or leave them "
                "out to reuse the stage)"
            )
        if checkpoint is not None:
            _materialize(pipe, index, submodule, checkpoint, tp=tp_mesh is not None)
    world = dist.get_world_size(group)
    registry = state.stages
    if style is None:
        check_placement(set(registry) | {index}, dist.get_rank(group), num_stages, world)
    stage_style = style or ("loop" if num_stages == world else None)
    tied, local = tie_exchanges(pipe, index, submodule, group, stage_style) if stage_style else ([], [])
    if microbatch is not None:
        rebuild = None  # a stage built for a given microbatch is not rebuilt for other shapes
        batch_seq = step_shape(microbatch)
        built = step_shape(pipe.example_inputs)
        if len(batch_seq) > 2 and batch_seq != built:
            raise StageSpecError(
                f"stage {index}: the microbatch has sizes (batch, decoder length, encoder input size) "
                f"{list(batch_seq)}, the pipeline was built for {list(built)}: an encoder-decoder model's stages keep "
                "the shapes the pipeline was built for (what crosses the cuts has the encoder's length). Build the "
                "pipeline with example_inputs of one such microbatch (fxpp.pipeline(model, n, example_inputs=...))")
    else:
        # The rank state holds this stage and is held for the pipeline's lifetime (a weak
        # key), so the stage refers to the pipeline weakly: a strong reference would keep
        # every pipeline that ever built a stage alive.
        pipe_ref = weakref.ref(pipe)

        def rebuild(shape):
            return build_stage(_alive(pipe_ref, index), index, device, group, style=style, batch_seq=shape,
                               dp_mesh=mesh_arg, data_parallel=data_parallel,
                               activation_checkpointing=activation_checkpointing, mp_policy=policy,
                               compile=backend or False)

        if batch_seq is None:
            batch_seq = step_shape(pipe.example_inputs)
    compute_dtype = None if policy is None else policy.param_dtype
    inputs, outputs = _example_args(submodule, device, batch_seq, compute_dtype)
    stage = FxppPipelineStage(
        submodule, index, num_stages, device, input_args=inputs, output_args=outputs, group=group,
        tied=tied, local_partners=local,
        sends=[(what, tuple(o.shape), o.dtype) for what, o in zip(_sends(submodule), outputs)],
        rebuild=rebuild, batch_seq=batch_seq, compute_dtype=compute_dtype,
        tie_copies=frozenset(o[index] for o in tied_parameters(pipe) if index in o and index != min(o)),
    )
    if tp_mesh is not None:
        unplanned = unplanned_parameters(submodule, tp_entries)
        stage._fxpp_tp_check = lambda st: check_unplanned_grads(index, st.submod, unplanned, tp_mesh)
    if stage_style is None and any(index in owners for owners in tied_parameters(pipe)):
        # Placement is known once the rank has built all its stages: at the first step.
        pipe_ref = weakref.ref(pipe)
        stage._fxpp_pending_ties = lambda: tie_exchanges(_alive(pipe_ref, index), index, submodule, group,
                                                         check_placement(set(registry), dist.get_rank(group),
                                                                         num_stages, world, complete=True))
    registry[index] = stage
    return stage


def _alive(pipe_ref: "weakref.ref", index: int) -> SplitModel:
    """The pipeline a stage was built from; it must outlive the stage's schedule."""
    pipe = pipe_ref()
    if pipe is None:
        raise StageSpecError(f"stage {index}: the fxpp.Pipeline it was built from no longer exists; keep the "
                             "pipeline (pipe = fxpp.pipeline(...)) alive while its stages run")
    return pipe

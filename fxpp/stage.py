"""Runtime glue: fxpp stages as ``torch.distributed.pipelining.PipelineStage``.

The only module that imports ``torch.distributed.pipelining``. Everything here is
device-agnostic: the same code runs on CPU with gloo and on CUDA with NCCL; the only
device-specific decision is :func:`default_backend`.

Terms
-----
placement
    Which rank holds which stage. ``"loop"``: stage ``s`` on rank ``s % world_size``
    (GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble). ``"v"``: ranks
    hold stages ``r`` and ``2 * world_size - 1 - r`` (ZBVZeroBubble, DualPipeV).
tied weight
    A parameter used by more than one stage: tied input/output embeddings
    (``lm_head.weight is model.embed_tokens.weight``). The last stage holds its own
    copy; see Note [tied-weight sync]
    The first stage's copy gets its gradient last (stage 0 finishes the backward),
    the last stage's copy early. Both must end the step with the sum. Point-to-point
    messages between two ranks are matched in the order they are posted (NCCL has no
    tags), so the exchange must not interleave with the schedule's own activation and
    gradient messages: :class:`PipelineSchedule` does it after torch's ``step`` has
    returned on the rank (torch waits for all of the step's sends before returning),
    on every rank that holds a tied stage: the last stage's rank sends its gradient
    increment and receives the sum into ``.grad``; the first stage's rank receives,
    adds and sends the sum back. Only those two ranks take part, over point-to-point
    ops on the pipeline's process group (the ``group`` given to ``build_stage``, else
    the default group), so no rank waits for a collective another rank never joins,
    however many stages a rank holds. When both stages sit on one rank (V placement)
    the sum is taken locally. Nothing here reads torch's call stack or relies on which
    private methods a schedule calls: a stage only notes that a backward ran
    (``backward_one_chunk`` / ``backward_weight_one_chunk``, public methods of
    ``PipelineStage``), and the exchange is owed from then on. A torch schedule stepped
    directly, without the exchange, leaves it owed: the next optimizer step over those
    parameters (a global ``register_optimizer_step_pre_hook``) or the next schedule
    step raises ``FxppError`` before any unsynchronised gradient is used;
    ``finish_step(stages)`` does the exchange by hand.
"""

from __future__ import annotations

import copy
import weakref
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage

from .errors import FxppError, StageInputError, StageSpecError
from .layout import HEADER, filler_shape

if TYPE_CHECKING:
    from .pipeline import Pipeline


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def default_device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def stage_ranks(num_stages: int, world_size: int, style: str = "loop") -> list[int]:
    """The rank of each stage under ``style`` placement (see the module glossary)."""
    if world_size < 1 or num_stages % world_size:
        raise StageSpecError(
            f"num_stages={num_stages} must be a multiple of the world size {world_size} "
            "(each rank holds the same number of stages)"
        )
    if style == "loop":
        return [s % world_size for s in range(num_stages)]
    if style == "v":
        if num_stages != 2 * world_size:
            raise StageSpecError(f"V placement needs num_stages == 2 * world_size; got {num_stages} and {world_size}")
        return [s if s < world_size else 2 * world_size - 1 - s for s in range(num_stages)]
    raise StageSpecError(f"placement style={style!r} must be 'loop' or 'v'")


def stage_ids_of_rank(rank: int, num_stages: int, world_size: int, style: str = "loop") -> list[int]:
    """The stage ids a rank holds, in order (what multi-stage schedules expect)."""
    return [s for s, r in enumerate(stage_ranks(num_stages, world_size, style)) if r == rank]


def tied_parameters(pipe: "Pipeline") -> list[dict[int, str]]:
    """Parameters used by more than one stage: ``[{stage: name, ...}, ...]``."""
    owners: dict[int, dict[int, str]] = {}
    for i, stage in enumerate(pipe.stages):
        for name, p in stage.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), {}).setdefault(i, name)
    return [o for o in owners.values() if len(o) > 1]


class _TiedSync:
    """One tied parameter's exchange between its first and last holder (Note [tied-weight sync]).

    What is exchanged is this step's *increment* of the gradient (see
    ``FxppPipelineStage._fxpp_increment``), so gradients accumulated over several steps
    without ``zero_grad`` are summed once, not again at every step.
    """

    def __init__(self, param: torch.nn.Parameter, *, is_first_holder: bool, peer: int, group):
        self.param = param
        self.is_first_holder = is_first_holder
        self.peer = peer  # global rank of the other holder
        self.group = group

    def exchange(self, stage: "FxppPipelineStage") -> None:
        mine = stage._fxpp_increment(self.param)
        theirs = torch.empty_like(mine)
        if self.is_first_holder:
            dist.recv(theirs, src=self.peer, group=self.group)
            dist.send(mine, dst=self.peer, group=self.group)
        else:
            dist.send(mine, dst=self.peer, group=self.group)
            dist.recv(theirs, src=self.peer, group=self.group)
        self.param.grad.add_(theirs)


class _LocalTie:
    """A tied parameter whose two holders are stages on this rank; the first holder sums."""

    def __init__(self, param: torch.nn.Parameter, partner):
        self.param = param
        self.partner = partner  # () -> (other stage, its parameter), once that stage is built

    def exchange(self, stage: "FxppPipelineStage") -> None:
        found = self.partner()
        if found is None:
            return
        other_stage, other = found
        mine, theirs = stage._fxpp_increment(self.param), other_stage._fxpp_increment(other)
        self.param.grad.add_(theirs)
        other.grad.add_(mine)


class FxppPipelineStage(PipelineStage):
    """A PipelineStage that knows its tied weights (Note [tied-weight sync]) and can be rebuilt for new shapes."""

    def __init__(self, *args, tied: list = (), local_partners: list = (), sends: list = (), rebuild=None,
                 batch_seq: tuple[int, int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._fxpp_ties = list(tied) + list(local_partners or [])
        self._fxpp_pending_ties = None  # resolved at the first step when the placement was inferred
        self._fxpp_owed = False  # a backward ran this step, exchange not yet done
        self._fxpp_grad_before: dict = {}
        self._fxpp_sends = list(sends)  # (what, shape) of each tensor sent to the next stage
        self._fxpp_rebuild = rebuild  # (batch, seq) -> a stage with those static shapes; None: shapes fixed
        self._fxpp_batch_seq = batch_seq
        _LIVE_STAGES.add(self)
        _guard_optimizers()

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
        if self.has_ties:
            self._fxpp_owed = True

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        output = super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)
        if self._fxpp_sends:
            check_sent_shapes(self.stage_index, fwd_chunk_id, output, self._fxpp_sends)
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
            raise FxppError(_UNSYNCHRONISED.format(stage=self.stage_index, when="a new step started"))
        # Gradients already accumulated before this step (see scale_grads and the
        # tied-weight exchange); kept until the next step starts.
        self._fxpp_grad_before = {p: p.grad.detach().clone() for p in self.submod.parameters() if p.grad is not None}
        super().clear_runtime_states()


_LIVE_STAGES: "weakref.WeakSet[FxppPipelineStage]" = weakref.WeakSet()
_UNSYNCHRONISED = (
    "stage {stage}: {when} while the tied-weight gradients of the last step are not synchronised (a torch "
    "schedule was stepped directly). Step fxpp stages with fxpp.schedule(...) (or fxpp.stage.make_schedule), whose "
    "step ends with the exchange, or call fxpp.stage.finish_step(stages) right after schedule.step()"
)
_OPTIMIZER_GUARD = []


def _guard_optimizers() -> None:
    """Refuse an optimizer step over tied weights whose exchange is still owed (once per process).

    A torch schedule stepped directly (not through :class:`PipelineSchedule`) ends
    without the exchange; the optimizer must not use those gradients.
    """
    if _OPTIMIZER_GUARD:
        return

    def check(optimizer, args, kwargs):
        params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for stage in list(_LIVE_STAGES):
            if stage._fxpp_owed and any(id(p) in params for p in stage.submod.parameters()):
                raise FxppError(_UNSYNCHRONISED.format(stage=stage.stage_index, when="an optimizer step"))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    _OPTIMIZER_GUARD.append(register_optimizer_step_pre_hook(check))


def check_sent_shapes(stage_index: int, microbatch: int, outputs, sends: list[tuple[str, tuple]]) -> None:
    """Every tensor a stage sends must have the shape the receive buffers were made for.

    A point-to-point receive into a buffer of another size fails far from the cause,
    on the other rank, or reads a wrong value; so the sender checks (shapes only, no
    communication) and names the value.

    Raises:
        StageInputError: a sent tensor's shape differs from the example microbatch's.
    """
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    for (what, expected), tensor in zip(sends, outputs):
        if tuple(tensor.shape) != tuple(expected):
            raise StageInputError(
                f"stage {stage_index}, microbatch {microbatch}: sends {what} with shape {list(tensor.shape)}, but the "
                f"stages were built for {list(expected)}. A stage's static shapes are fixed when it is built: "
                "pipe.build_stage(i, device, microbatch=<a microbatch of this step's shape>) and a new schedule "
                "change them between steps (the stage keeps its parameters and gradients); within one step every "
                "microbatch needs one batch size and sequence length"
            )


def schedule_class(name_or_class):
    """A ``torch.distributed.pipelining`` schedule class from its name (``"1F1B"``) or itself."""
    from torch.distributed.pipelining import schedules

    if isinstance(name_or_class, type):
        if not issubclass(name_or_class, (schedules.PipelineScheduleSingle, schedules.PipelineScheduleMulti)):
            raise StageSpecError(f"schedule={name_or_class.__name__} is not a torch.distributed.pipelining schedule")
        return name_or_class
    cls = getattr(schedules, f"Schedule{name_or_class}", None)
    if cls is None:
        raise StageSpecError(f"schedule={name_or_class!r} is not a schedule of torch.distributed.pipelining")
    return cls


class PipelineSchedule:
    """A ``torch.distributed.pipelining`` schedule over this rank's fxpp stages.

    ``step`` (and :meth:`step_microbatches`) is torch's, with two things around it:

    * before: when the stages were built without a ``microbatch``, the rank of stage 0
      tells every rank of the pipeline the step's microbatch batch and sequence size
      (one broadcast on the pipeline's group), and stages whose static shapes differ
      are rebuilt with those shapes (same submodules, so parameters and gradients are
      kept) with a new torch schedule; so every step may have its own shapes;
    * after: the tied-weight exchange (Note [tied-weight sync]), once torch's step has
      returned on this rank, so it never interleaves with the schedule's messages and
      never depends on which private methods a torch release calls.

    Attributes:
        stages: this rank's stages, in order. n_microbatches, loss_fn: as given.
        torch_schedule: the torch schedule of the current shapes.
    """

    def __init__(self, schedule, stages: list, n_microbatches: int, loss_fn, **kwargs):
        self._cls = schedule_class(schedule)
        self.stages = list(stages)
        if not self.stages or not all(isinstance(s, FxppPipelineStage) for s in self.stages):
            raise StageSpecError("fxpp.schedule takes the stages that Pipeline.build_stage returned on this rank")
        self.n_microbatches = n_microbatches
        self.loss_fn = loss_fn
        self._kwargs = kwargs
        self.torch_schedule = self._make()

    def _make(self):
        from torch.distributed.pipelining import schedules

        if issubclass(self._cls, schedules.PipelineScheduleSingle):
            if len(self.stages) != 1:
                raise StageSpecError(
                    f"schedule {self._cls.__name__} runs one stage per rank; this rank holds {len(self.stages)}")
            return self._cls(self.stages[0], n_microbatches=self.n_microbatches, loss_fn=self.loss_fn, **self._kwargs)
        return self._cls(self.stages, n_microbatches=self.n_microbatches, loss_fn=self.loss_fn, **self._kwargs)

    def step(self, *args, target=None, losses=None, **kwargs):
        tokens = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        shape = None
        if isinstance(tokens, torch.Tensor):
            shape = (-(-tokens.shape[0] // self.n_microbatches), tokens.shape[1])
        self._follow_shapes(shape)
        result = self.torch_schedule.step(*args, target=target, losses=losses, **kwargs)
        finish_step(self.stages)
        return result

    def step_microbatches(self, microbatches, targets=None, losses=None, *, return_outputs: bool = False):
        """One step on microbatches split beforehand (see :func:`fxpp.step_with_microbatches`)."""
        from .microbatch import run_microbatches

        shape = None
        if microbatches:
            tokens = microbatches[0].get("input_ids", microbatches[0].get("inputs_embeds"))
            shape = tuple(tokens.shape[:2])
        self._follow_shapes(shape)
        result = run_microbatches(self.torch_schedule, microbatches, targets, losses, return_outputs=return_outputs)
        finish_step(self.stages)
        return result

    def _follow_shapes(self, shape: tuple[int, int] | None) -> None:
        if not any(s._fxpp_rebuild is not None for s in self.stages):
            return  # built for a fixed microbatch shape
        stage = self.stages[0]
        group = stage.group
        src = 0 if group is None else dist.get_global_rank(group, 0)
        holder = any(s.stage_index == 0 for s in self.stages)
        if holder and shape is None:
            raise StageInputError("the rank of stage 0 must give the step's inputs (input_ids or inputs_embeds)")
        agreed = torch.tensor(shape if holder else (0, 0), dtype=torch.int64, device=stage.device)
        dist.broadcast(agreed, src=src, group=group)
        batch_seq = tuple(int(v) for v in agreed.tolist())
        if all(s._fxpp_batch_seq == batch_seq for s in self.stages):
            return
        self.stages = [s._fxpp_rebuild(batch_seq) if s._fxpp_batch_seq != batch_seq else s for s in self.stages]
        self.torch_schedule = self._make()


def make_schedule(name, stages: list, n_microbatches: int, loss_fn, **kwargs) -> PipelineSchedule:
    """A :class:`PipelineSchedule` of the torch schedule ``name`` (``"1F1B"``, ``"ZBVZeroBubble"``, ... or a class).

    Single-stage schedules get the rank's one stage, multi-stage ones the list.
    """
    return PipelineSchedule(name, stages, n_microbatches, loss_fn, **kwargs)


def finish_step(stages) -> None:
    """Do the tied-weight exchange of the step that just ended (needed only after stepping a torch schedule directly)."""
    for stage in stages:
        stage._fxpp_finish()


def _runtime_submodule(pipe: "Pipeline", index: int, device: torch.device):
    """The stage's GraphModule for a rank: on ``device``, last stage with its own tied copy.

    Modules already on ``device`` are the model's own; others are copied (never moved,
    so the user's model is untouched); meta modules are allocated empty.
    """
    from .transform import StageModule

    source = pipe.stages[index]
    stage = StageModule.build(pipe.model, pipe.model_graph, source.spec)
    object.__setattr__(stage, "_fxpp_ignore_model_kwargs", not source.spec.takes_model_inputs)
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
        needs_copy = any(t.device != device for t in tensors) or bool(own_names & tied_here)
        if not needs_copy:
            continue
        if id(module) not in replaced:
            replaced[id(module)] = _copy_to(pipe.model, module, device)
        stage.set_submodule(node.target, replaced[id(module)])
    stage.recompile()
    return stage


def _materialize(pipe: "Pipeline", index: int, submodule, checkpoint: str | None) -> None:
    """Load the stage's own keys from ``checkpoint``; refuse to train uninitialised memory."""
    if checkpoint is None:
        if any(t.is_meta for t in pipe.stages[index].parameters()):
            raise StageSpecError(
                f"stage {index}: the model's parameters are on the meta device; pass checkpoint=<safetensors file "
                "or directory> so the stage loads its own weights"
            )
        return
    from .checkpoint import load_stage

    aliases = {}
    for owners in tied_parameters(pipe):
        if index in owners:
            aliases[owners[index]] = [name for i, name in sorted(owners.items()) if i != index]
    load_stage(submodule, checkpoint, aliases=aliases)


def _copy_to(model: torch.nn.Module, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if any(t.is_meta for t in list(module.parameters()) + list(module.buffers())):
        fresh = copy.deepcopy(module).to_empty(device=device)
        # Non-persistent buffers (rotary inv_freq) are not in checkpoints: recompute them.
        init = getattr(model, "_init_weights", None)
        for sub in fresh.modules():
            if sub._non_persistent_buffers_set and init is not None:
                init(sub)
        return fresh
    return copy.deepcopy(module).to(device)


def _sends(stage) -> list[str]:
    """What each tensor a stage sends is, as its cut's layout names them (``fxpp.layout``)."""
    layout = stage.out_layout
    return [] if layout is None else [*layout.identities, HEADER]


def _example_args(stage, device: torch.device, batch_seq: tuple[int, int] | None):
    """Static input/output metadata of a stage: its cuts' layouts at the microbatch's batch and sequence size."""

    def real(shape, dtype):
        # Floating tensors carry gradients across the cut; integer ones (masks, ids, the header) do not.
        return torch.empty(shape, dtype=dtype, device=device, requires_grad=dtype.is_floating_point)

    def resized(shape, built):
        return shape if batch_seq is None else (filler_shape(shape, built, batch_seq) or shape)

    def layout_args(layout):
        built = layout.slots[0].shape[:2]
        return (*(real(resized(s.shape, built), s.dtype) for s in layout.slots),
                real((layout.header_size,), torch.int64))

    inputs = () if stage.in_layout is None else layout_args(stage.in_layout)
    if stage.out_layout is not None:
        return inputs, layout_args(stage.out_layout)
    (out,) = [n for n in stage.graph.nodes if n.op == "output"]
    val = out.args[0].meta["val"]
    built = tuple(stage.meta["fxpp_example_inputs"]["input_ids"].shape[:2]) if "input_ids" in \
        stage.meta["fxpp_example_inputs"] else tuple(val.shape[:2])
    return inputs, (real(resized(tuple(val.shape), built), val.dtype),)


def _check_placement(ids: set[int], rank: int, num_stages: int, world: int, *, complete: bool = False) -> str:
    """The placement (``"loop"`` or ``"v"``) of the stages this rank builds.

    Raises:
        StageSpecError: the stage ids fit neither placement (or, with ``complete``, are
            not all of one placement's stages).
    """
    fits = []
    for style in ("loop", "v"):
        try:
            expected = set(stage_ids_of_rank(rank, num_stages, world, style))
        except StageSpecError:
            continue
        if ids == expected or (not complete and ids <= expected):
            fits.append(style)
    if not fits:
        raise StageSpecError(
            f"rank {rank} builds stages {sorted(ids)} of {num_stages} on {world} ranks, which is neither loop placement "
            f"({stage_ids_of_rank(rank, num_stages, world, 'loop')}) nor V placement (stages r and 2 * world - 1 - r); "
            "build the stages fxpp.stage_ids_of_rank(rank, num_stages, world, style) gives"
        )
    return fits[0]


def _ties(pipe: "Pipeline", index: int, submodule, group, style: str) -> tuple[list, list]:
    """The tied-weight exchanges stage ``index`` takes part in under ``style`` placement."""
    ranks = stage_ranks(len(pipe.stages), dist.get_world_size(group), style)
    registry = pipe._runtime_stages
    tied, local = [], []
    for owners in tied_parameters(pipe):
        if index not in owners:
            continue
        first, last = min(owners), max(owners)
        if index not in (first, last):
            continue
        mine = submodule.get_parameter(owners[index])
        other = first if index == last else last
        if ranks[other] == ranks[index]:
            if index == first:  # the first holder finishes last: it sums for both
                local.append(_LocalTie(mine, lambda o=other, n=owners[other]: (
                    (registry[o], registry[o].submod.get_parameter(n)) if o in registry else None)))
            continue
        peer = ranks[other] if group is None else dist.get_global_rank(group, ranks[other])
        tied.append(_TiedSync(mine, is_first_holder=index == first, peer=peer, group=group))
    return tied, local


def build_stage(pipe: "Pipeline", index: int, device: torch.device | str, group=None, *, style: str | None = None,
                checkpoint: str | None = None, microbatch: dict | None = None,
                batch_seq: tuple[int, int] | None = None) -> FxppPipelineStage:
    """``pipe.build_stage``: see :meth:`fxpp.Pipeline.build_stage`."""
    device = torch.device(device)
    num_stages = len(pipe.stages)
    if not 0 <= index < num_stages:
        raise StageSpecError(f"stage index {index} is out of range for a {num_stages}-stage pipeline")
    if not dist.is_initialized():
        raise StageSpecError(
            "build_stage needs torch.distributed to be initialised (dist.init_process_group); "
            "for a single process, run the stages with pipe(**inputs)"
        )
    if device.type == "cuda" and dist.get_backend(group) == "gloo":
        raise StageSpecError(f"device={device} with the gloo backend: use NCCL for CUDA stages")
    key = (index, str(device))
    submodule = pipe._runtime_submods.get(key)
    if submodule is None:
        submodule = _runtime_submodule(pipe, index, device)
        _materialize(pipe, index, submodule, checkpoint)
        pipe._runtime_submods[key] = submodule
    elif checkpoint is not None:
        _materialize(pipe, index, submodule, checkpoint)
    world = dist.get_world_size(group)
    registry = pipe._runtime_stages
    if style is None:
        _check_placement(set(registry) | {index}, dist.get_rank(group), num_stages, world)
    stage_style = style or ("loop" if num_stages == world else None)
    tied, local = _ties(pipe, index, submodule, group, stage_style) if stage_style else ([], [])
    rebuild = None
    if microbatch is not None:
        tokens = microbatch.get("input_ids", microbatch.get("inputs_embeds"))
        batch_seq = tuple(tokens.shape[:2])
    else:
        def rebuild(shape):
            return build_stage(pipe, index, device, group, style=style, batch_seq=shape)

        if batch_seq is None:
            tokens = pipe.example_inputs.get("input_ids", pipe.example_inputs.get("inputs_embeds"))
            batch_seq = tuple(tokens.shape[:2])
    inputs, outputs = _example_args(submodule, device, batch_seq)
    stage = FxppPipelineStage(
        submodule, index, num_stages, device, input_args=inputs, output_args=outputs, group=group,
        tied=tied, local_partners=local, sends=list(zip(_sends(submodule), (tuple(o.shape) for o in outputs))),
        rebuild=rebuild, batch_seq=batch_seq,
    )
    if stage_style is None and any(index in owners for owners in tied_parameters(pipe)):
        # Placement is known once the rank has built all its stages: at the first step.
        stage._fxpp_pending_ties = lambda: _ties(pipe, index, submodule, group, _check_placement(
            set(registry), dist.get_rank(group), num_stages, world, complete=True))
    registry[index] = stage
    return stage

"""Tied weights: parameters used by more than one stage, and their gradient exchange.

Terms
-----
tied weight
    A parameter used by more than one stage: tied input/output embeddings
    (``lm_head.weight is model.embed_tokens.weight``). The last stage holds its own
    copy; see Note [tied-weight sync].

Note [tied-weight sync]
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
    step raises ``TiedWeightError`` before any unsynchronised gradient is used;
    ``finish_step(stages)`` does the exchange by hand.

    Under data parallelism (Note [pipeline x data parallel] in ``fxpp.runtime.parallel``)
    the exchange runs after torch's step has reduced the gradients over dp, between the
    first and last stage of the same dp index (the pipeline group is one dp index's),
    and exchanges the local shards of the ``DTensor`` gradients. Under tensor parallelism
    (Note [tensor parallel stages] in ``fxpp.runtime.tensor_parallel``) the model's plan
    shards the input embedding (``embedding_rowwise``) and the head (``colwise``) both
    on the vocabulary dimension over tp, so the first stage's shard ``t`` and the last
    stage's shard ``t`` are the same rows; the pipeline group is the ranks of one
    (dp, tp) coordinate, so the exchange pairs exactly those, shard for shard. The first exchange of
    every tied pair, with or without data parallelism, first swaps a few integers that
    describe each holder's part (global and local shape, mesh size, placement), and both
    raise if they differ, so a shard is never added to another part of the weight.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..errors import TiedWeightError
from .placement import stage_ranks
from .protocols import SplitModel, TiedStage
from .rank_state import rank_state


def tied_parameters(pipe: SplitModel) -> list[dict[int, str]]:
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

    def __init__(self, param: torch.nn.Parameter, *, is_first_holder: bool, peer: int, group, name: str = ""):
        self.param = param
        self.is_first_holder = is_first_holder
        self.peer = peer  # global rank of the other holder
        self.group = group
        self.name = name
        self.checked = False  # the two holders' shards agree (data parallel; see _check_shards)

    def _send_recv(self, mine: torch.Tensor, theirs: torch.Tensor) -> None:
        if self.is_first_holder:
            dist.recv(theirs, src=self.peer, group=self.group)
            dist.send(mine, dst=self.peer, group=self.group)
        else:
            dist.send(mine, dst=self.peer, group=self.group)
            dist.recv(theirs, src=self.peer, group=self.group)

    def exchange(self, stage: TiedStage) -> None:
        with torch.no_grad():
            mine = local_tensor(stage._fxpp_increment(self.param))
            if not self.checked:
                self._check_shards(stage, mine)
            theirs = torch.empty_like(mine)
            self._send_recv(mine.contiguous(), theirs)
            local_tensor(self.param.grad).add_(theirs)

    def _check_shards(self, stage: TiedStage, mine: torch.Tensor) -> None:
        """Under data parallelism both holders must hold the same part of the gradient (Note [pipeline x data parallel]).

        A sharded gradient is exchanged shard for shard: the holders of one dp index
        (and tp index: the pipeline group is one (dp, tp) coordinate's) must shard the
        same shape over the same mesh sizes the same way. Checked once, on both ranks
        (each raises), before any gradient is exchanged.
        """
        grad = self.param.grad
        described = describe_shard(grad, mine)
        ours = torch.tensor(described, dtype=torch.int64, device=mine.device)
        theirs = torch.empty_like(ours)
        self._send_recv(ours, theirs)
        if not torch.equal(ours, theirs):
            raise TiedWeightError(
                f"stage {stage.stage_index}: the tied weight {self.name or 'parameter'} is held as "
                f"{_shard_text(ours.tolist())} here but as {_shard_text(theirs.tolist())} on rank {self.peer}; the "
                "first and last stage of one (dp, tp) coordinate must hold the same part of it (build every stage "
                "with the same data_parallel and one mesh: fxpp.pp_dp_mesh or fxpp.pp_dp_tp_mesh)"
            )
        self.checked = True


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view sharing its storage, under no_grad), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


_PLACEMENT_CODES = {"Replicate": -1, "Partial": -2}
_MAX_DIMS, _MAX_MESH = 4, 3  # a fixed-size description: both holders send and receive the same number of integers
_PAD = -9


def describe_shard(value: torch.Tensor, local: torch.Tensor) -> list[int]:
    """What part of a weight a rank holds, as ``_MAX_DIMS * 2 + _MAX_MESH * 2 + 1`` integers.

    ``[ndim, *global shape, *local shape, *(mesh size, placement) per mesh dimension]``,
    padded; a placement is the dimension it shards (FSDP2's strided shards included) or
    a code for replicated and partial. A tensor-parallel weight under FSDP2 lies on a
    2-D ``("dp", "tp")`` mesh: both dimensions are described, so the first and last
    stage of one (dp, tp) coordinate compare the same shard.
    """
    if isinstance(value, DTensor):
        parts = []
        for size, placement in zip(value.device_mesh.mesh.shape, value.placements):
            code = getattr(placement, "dim", None)
            parts += [int(size), _PLACEMENT_CODES.get(type(placement).__name__, -3) if code is None else code]
    else:
        parts = [1, -1]
    shape = [*value.shape] + [_PAD] * (_MAX_DIMS - value.dim())
    local_shape = [*local.shape] + [_PAD] * (_MAX_DIMS - local.dim())
    return [value.dim(), *shape, *local_shape, *parts, *[_PAD] * (2 * _MAX_MESH - len(parts))]


def _shard_text(described: list[int]) -> str:
    ndim = described[0]
    shape = described[1:1 + ndim]
    local = described[1 + _MAX_DIMS:1 + _MAX_DIMS + ndim]
    parts = described[1 + 2 * _MAX_DIMS:]
    hows = []
    for size, code in zip(parts[::2], parts[1::2]):
        if size == _PAD:
            break
        hows.append(f"{ {-1: 'replicated', -2: 'partial'}.get(code, f'sharded on dim {code}')} over {size} rank(s)")
    return f"shape {shape}, local {local}, {' and '.join(hows)}"


class _LocalTie:
    """A tied parameter whose two holders are stages on this rank; the first holder sums."""

    def __init__(self, param: torch.nn.Parameter, partner):
        self.param = param
        self.partner = partner  # () -> (other stage, its parameter), once that stage is built

    def exchange(self, stage: TiedStage) -> None:
        found = self.partner()
        if found is None:
            return
        other_stage, other = found
        mine, theirs = stage._fxpp_increment(self.param), other_stage._fxpp_increment(other)
        self.param.grad.add_(theirs)
        other.grad.add_(mine)


def tie_exchanges(pipe: SplitModel, index: int, submodule, group, style: str) -> tuple[list, list]:
    """The tied-weight exchanges stage ``index`` takes part in under ``style`` placement."""
    ranks = stage_ranks(len(pipe.stages), dist.get_world_size(group), style)
    registry = rank_state(pipe).stages
    tied, local = [], []
    for owners in tied_parameters(pipe):
        if index not in owners:
            continue
        first, last = min(owners), max(owners)
        if index not in (first, last):
            continue
        mine = submodule.get_parameter(owners[index])
        if not mine.requires_grad:  # frozen (LoRA's base weights): no gradient, nothing to exchange
            continue
        other = first if index == last else last
        if ranks[other] == ranks[index]:
            if index == first:  # the first holder finishes last: it sums for both
                local.append(_LocalTie(mine, lambda o=other, n=owners[other]: (
                    (registry[o], registry[o].submod.get_parameter(n)) if o in registry else None)))
            continue
        peer = ranks[other] if group is None else dist.get_global_rank(group, ranks[other])
        tied.append(_TiedSync(mine, is_first_holder=index == first, peer=peer, group=group, name=owners[index]))
    return tied, local


LIVE_STAGES: "weakref.WeakSet" = weakref.WeakSet()
UNSYNCHRONISED = (
    "stage {stage}: {when} while the tied-weight gradients of the last step are not synchronised (a torch "
    "schedule was stepped directly). Step fxpp stages with fxpp.schedule(...) (or fxpp.runtime.schedule.make_schedule), whose "
    "step ends with the exchange, or call fxpp.runtime.ties.finish_step(stages) right after schedule.step()"
)
_OPTIMIZER_GUARD = []


def guard_optimizers() -> None:
    """Refuse an optimizer step over tied weights whose exchange is still owed (once per process).

    A torch schedule stepped directly (not through :class:`PipelineSchedule`) ends
    without the exchange; the optimizer must not use those gradients.
    """
    if _OPTIMIZER_GUARD:
        return

    def check(optimizer, args, kwargs):
        params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for stage in list(LIVE_STAGES):
            if stage._fxpp_owed and any(id(p) in params for p in stage.submod.parameters()):
                raise TiedWeightError(UNSYNCHRONISED.format(stage=stage.stage_index, when="an optimizer step"))

    _OPTIMIZER_GUARD.append(register_optimizer_step_pre_hook(check))


def finish_step(stages) -> None:
    """Do the tied-weight exchange of the step that just ended (needed only after stepping a torch schedule directly)."""
    for stage in stages:
        stage._fxpp_finish()

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
    and exchanges the local shards of the ``DTensor`` gradients. The first exchange of
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
        must shard the same shape over the same dp size the same way. Checked once,
        on both ranks (each raises), before any gradient is exchanged.
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
                "first and last stage of one dp index must replicate it over the same dp size (build every stage "
                "with the same data_parallel and a dp_mesh of one fxpp.runtime.parallel.pp_dp_mesh)"
            )
        self.checked = True


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view sharing its storage, under no_grad), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


_PLACEMENT_CODES = {"Replicate": -1, "Partial": -2}


def describe_shard(value: torch.Tensor, local: torch.Tensor) -> list[int]:
    """``[ndim, *global shape, *local shape, mesh size, placement]`` with placement the shard dim or a code."""
    if isinstance(value, DTensor):
        (placement,) = value.placements
        code = getattr(placement, "dim", None)
        code = _PLACEMENT_CODES.get(type(placement).__name__, -3) if code is None else code
        size = value.device_mesh.size()
    else:
        code, size = -1, 1
    return [value.dim(), *value.shape, *local.shape, size, code]


def _shard_text(described: list[int]) -> str:
    ndim = described[0]
    shape, local, (size, code) = described[1:1 + ndim], described[1 + ndim:1 + 2 * ndim], described[1 + 2 * ndim:]
    how = {-1: "replicated", -2: "partial"}.get(code, f"sharded on dim {code}")
    return f"shape {shape}, local {local}, {how} over {size} rank(s)"


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

"""Schedules over fxpp stages: shapes that follow the step, the tied-weight exchange at its end.

``PipelineSchedule`` wraps a ``torch.distributed.pipelining`` schedule; the functions
below step it on microbatches split beforehand (images per sample, see
``fxpp.runtime.microbatch``).
"""

from __future__ import annotations


import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining import schedules

from ..errors import ScheduleUsageError, StageInputError, StageSpecError
from ..layout import step_shape
from .placement import rng_state, set_rng_state
from .stage import FxppPipelineStage
from .ties import finish_step

# What the rank of stage 0 broadcasts in place of a step's sizes where it must refuse the
# step, so that every rank refuses it (PipelineSchedule._follow_shapes).
_MIXED_SIZES, _NO_TOKENS, _OTHER_KIND = -1, -2, -3


def schedule_class(name_or_class):
    """A ``torch.distributed.pipelining`` schedule class from its name (``"1F1B"``) or itself."""
    if isinstance(name_or_class, type):
        if not issubclass(name_or_class, (schedules.PipelineScheduleSingle, schedules.PipelineScheduleMulti)):
            raise StageSpecError(f"schedule={name_or_class.__name__} is not a torch.distributed.pipelining schedule")
        return name_or_class
    cls = getattr(schedules, f"Schedule{name_or_class}", None)
    if cls is None:
        raise StageSpecError(f"schedule={name_or_class!r} is not a schedule of torch.distributed.pipelining")
    return cls


_DTYPE_CODES = {None: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}


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
        self._dtype_agreed = False
        self._reads_every_header = False  # set once a step's microbatches ran different variants
        self.torch_schedule = self._make()

    def _make(self):
        if issubclass(self._cls, schedules.PipelineScheduleSingle):
            if len(self.stages) != 1:
                raise StageSpecError(
                    f"schedule {self._cls.__name__} runs one stage per rank; this rank holds {len(self.stages)}")
            return self._cls(self.stages[0], n_microbatches=self.n_microbatches, loss_fn=self.loss_fn, **self._kwargs)
        return self._cls(self.stages, n_microbatches=self.n_microbatches, loss_fn=self.loss_fn, **self._kwargs)

    def step(self, *args, target=None, losses=None, return_outputs: bool = True, **kwargs):
        """One training step on the whole batch (torch's ``step``): ``kwargs`` are the model's inputs.

        Args:
            return_outputs: keep every microbatch's last-stage output until the next step and
                return their concatenation (torch's default). ``False`` keeps neither: on the
                last stage's rank that saves the whole batch's logits twice over at the end of
                the step (``fxpp.analysis.stage_memory``; build the pipeline with
                ``keep_outputs=False`` to predict it).

        Returns:
            On the last stage's rank with ``return_outputs``, the merged outputs; otherwise ``None``.
        """
        return self._run_step(lambda: self.torch_schedule.step(*args, target=target, losses=losses,
                                                               return_outputs=return_outputs, **kwargs),
                              self._split_shape(kwargs), losses, train=True)

    def eval(self, *args, target=None, losses=None, **kwargs):
        """Forward only over the microbatches (torch's ``eval``), the losses in ``losses``; no gradients."""
        def call():
            with torch.no_grad():
                return self.torch_schedule.eval(*args, target=target, losses=losses, **kwargs)

        return self._run_step(call, self._split_shape(kwargs), losses, train=False)

    def step_microbatches(self, microbatches, targets=None, losses=None, *, return_outputs: bool = False):
        """One step on microbatches split beforehand (see :func:`fxpp.step_with_microbatches`).

        Such microbatches may carry different inputs (with and without images): every
        receiving stage reads every microbatch's header (Note [one header read per step]).
        """
        shape = None
        if microbatches:
            shapes = {step_shape(mb) for mb in microbatches}
            # microbatches of other sizes in one step: the metadata fits none of them all,
            # and every rank must hear it (a refusal, below), not only this one
            shape = shapes.pop() if len(shapes) == 1 else (_MIXED_SIZES,) * len(step_shape(microbatches[0]) or (0, 0))
        self._start_step(shape, one_header_read=False)
        result = run_microbatches(self.torch_schedule, microbatches, targets, losses, return_outputs=return_outputs)
        finish_step(self.stages)
        _check_tp_gradients(self.stages)
        return result

    def _split_shape(self, kwargs: dict) -> tuple[int, ...] | None:
        shape = step_shape(kwargs)
        return None if shape is None else (-(-shape[0] // self.n_microbatches), *shape[1:])

    def _run_step(self, call, shape, losses, *, train: bool):
        """One step with one header read per stage (Note [one header read per step]); redone, reading
        every header, on every rank, where a microbatch's header differed from its step's first."""
        one_header_read = not self._reads_every_header  # the same on every rank: set on all together
        self._start_step(shape, one_header_read=one_header_read)
        rng = rng_state(self.stages[0].device)
        kept = len(losses) if losses is not None else 0
        result = call()
        if train:
            finish_step(self.stages)
        # A step that read every header has nothing to check (no collective, no host read).
        if one_header_read and self._headers_differed():
            # The step's microbatches ran different graph variants (data decisions) and were
            # read as the first one said: undo the step (gradients, RNG, losses) and run it
            # again reading every header; this schedule reads every header from now on.
            self._reads_every_header = True
            for stage in self.stages:
                stage.restore_step_start_grads()
            set_rng_state(rng, self.stages[0].device)
            if losses is not None:
                del losses[kept:]
            self._start_step(shape, one_header_read=False)
            result = call()
            if train:
                finish_step(self.stages)
        if train:
            _check_tp_gradients(self.stages)
        return result

    def _headers_differed(self) -> bool:
        """Whether a stage of any rank of the pipeline read a microbatch as its step's first said while its header
        differed (one host read per stage and one all-reduce over the pipeline group per step)."""
        differed = any(s.end_step() for s in self.stages)
        stage = self.stages[0]
        flag = torch.tensor([int(differed)], dtype=torch.int64, device=stage.device)
        if dist.get_world_size(stage.group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=stage.group)
        return bool(int(flag[0]))

    def _start_step(self, shape: tuple[int, ...] | None, *, one_header_read: bool) -> None:
        """Agree on the compute dtype (first step), follow the microbatch ``shape``, start each stage's step."""
        if not self._dtype_agreed:
            self._agree_compute_dtype()
        self._follow_shapes(shape)
        for stage in self.stages:
            stage.begin_step(one_header_read)

    def _agree_compute_dtype(self) -> None:
        """Every rank of the pipeline computes in one dtype (the cut slots' dtype), or every rank refuses.

        Once, at the first step: one all-reduce of ``[code, -code]`` (MAX) over the
        pipeline group tells every rank the largest and smallest code of any rank.
        """
        codes = {getattr(s, "compute_dtype", None) for s in self.stages}
        mine = _DTYPE_CODES.get(codes.pop(), 0) if len(codes) == 1 else -1
        stage = self.stages[0]
        both = torch.tensor([mine, -mine], dtype=torch.int64, device=stage.device)
        if dist.get_world_size(stage.group) > 1:
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=stage.group)
        high, low = int(both[0]), -int(both[1])
        if high != low:
            names = {code: str(dtype) for dtype, code in _DTYPE_CODES.items()}
            raise StageInputError(
                f"the stages of this pipeline compute in different dtypes ({names.get(low, 'mixed')} and "
                f"{names.get(high, 'mixed')}): what crosses a cut is sent in the sender's compute dtype and received "
                "in the receiver's. Build every stage with the same mixed_precision (or mp_policy)")
        self._dtype_agreed = True

    def _follow_shapes(self, shape: tuple[int, int] | None) -> None:
        if not any(s._fxpp_rebuild is not None for s in self.stages):
            return  # built for a fixed microbatch shape
        stage = self.stages[0]
        group = stage.group
        src = 0 if group is None else dist.get_global_rank(group, 0)
        holder = any(s.stage_index == 0 for s in self.stages)
        width = len(stage._fxpp_batch_seq)
        # Problems the rank of stage 0 sees travel as negative codes, so that every rank refuses.
        if holder and shape is None:
            shape = (_NO_TOKENS,) * width
        elif holder and len(shape) != width:
            shape = (_OTHER_KIND,) * width
        agreed = torch.tensor(shape if holder else (0,) * width, dtype=torch.int64, device=stage.device)
        dist.broadcast(agreed, src=src, group=group)
        batch_seq = tuple(int(v) for v in agreed.tolist())
        if all(s._fxpp_batch_seq == batch_seq for s in self.stages):
            return
        if batch_seq[0] == _NO_TOKENS:
            raise StageInputError("the rank of stage 0 must give the step's inputs (input_ids or inputs_embeds; an "
                                  "encoder-decoder model's decoder_input_ids)")
        if batch_seq[0] == _OTHER_KIND:
            raise StageInputError(
                f"the step's inputs and the stages' build differ in kind: the stages were built for sizes "
                f"{list(stage._fxpp_batch_seq)}; an encoder-decoder pipeline's steps give the decoder's tokens "
                "(decoder_input_ids) beside the encoder's inputs, as its build did, and a decoder-only one's do not")
        if batch_seq[0] == _MIXED_SIZES:
            raise StageInputError(
                "the microbatches of this step differ in size (batch, sequence"
                + (", encoder input size" if len(batch_seq) > 2 else "") + "): one step's microbatches share the "
                "shapes the stages send; give microbatches of one shape (pad them alike)")
        if len(batch_seq) > 2:  # every rank knows the step's sizes now: all refuse together
            raise StageInputError(
                f"this step's microbatches have sizes (batch, decoder length, encoder input size) {list(batch_seq)}, "
                f"the stages were built for {list(stage._fxpp_batch_seq)}: an encoder-decoder model's stages keep "
                "the shapes they were built for (what crosses the cuts has the encoder's length, which does not "
                "follow the decoder's). Build the pipeline with example_inputs of one microbatch of this step "
                "(fxpp.pipeline(model, n, example_inputs=...)) and its stages again")
        self.stages = [s._fxpp_rebuild(batch_seq) if s._fxpp_batch_seq != batch_seq else s for s in self.stages]
        self.torch_schedule = self._make()


def _check_tp_gradients(stages) -> None:
    """Each tensor-parallel stage's check of its unplanned parameters' gradients (Note [unplanned parameters])."""
    for stage in stages:
        check = getattr(stage, "check_tp_gradients", None)
        if check is not None:
            check()


def make_schedule(name, stages: list, n_microbatches: int, loss_fn, **kwargs) -> PipelineSchedule:
    """A :class:`PipelineSchedule` of the torch schedule ``name`` (``"1F1B"``, ``"ZBVZeroBubble"``, ... or a class).

    Single-stage schedules get the rank's one stage, multi-stage ones the list.
    """
    return PipelineSchedule(name, stages, n_microbatches, loss_fn, **kwargs)


def step_with_microbatches(schedule, microbatches: list[dict[str, Any]] | None, targets: list | None = None,
                           losses: list | None = None, *, return_outputs: bool = False):
    """Run one step of a ``torch.distributed.pipelining`` schedule on pre-split microbatches.

    ``schedule.step(**batch)`` splits the batch itself, along dim 0 of every tensor,
    which cuts media inputs wrongly (see :func:`split_microbatches`). This does what
    ``step`` does around the split for ``PipelineScheduleSingle`` and
    ``PipelineScheduleMulti`` of torch 2.13 (set ``has_backward`` on the rank's
    stages, clear their per-step state), then calls the schedule's **private**
    ``_step_microbatches(arg_mbs, kwarg_mbs, target_mbs, losses)``: a torch version
    that renames or changes it breaks this function, not fxpp's stages. With an
    fxpp schedule (``fxpp.schedule``) the step's shapes follow the microbatches and
    the tied-weight exchange ends the step (Note [tied-weight sync] in ``fxpp.runtime.ties``).

    Args:
        schedule: a single- or multi-stage schedule over this rank's stages.
        microbatches: one dict of first-stage keyword inputs per microbatch, as many
            as the schedule's ``n_microbatches``. Ranks without the first stage may
            pass ``None`` (non-first fxpp stages ignore keyword inputs anyway).
        targets: one target per microbatch (e.g. ``mb.pop("labels")`` from each),
            needed on the rank of the last stage when the schedule has a loss.
        losses: a list that receives each microbatch's loss on the last stage's rank.
        return_outputs: keep and return the last stage's output per microbatch.

    Returns:
        On the last stage's rank with ``return_outputs``, the list of its per-microbatch
        outputs; otherwise ``None``.

    Raises:
        StageInputError: the number of microbatches or targets is not the schedule's
            ``n_microbatches``, or ``targets`` is a tensor rather than a list.
        ScheduleUsageError: a training schedule stepped under ``torch.no_grad()``.
    """
    if isinstance(schedule, PipelineSchedule):
        return schedule.step_microbatches(microbatches, targets, losses, return_outputs=return_outputs)
    return run_microbatches(schedule, microbatches, targets, losses, return_outputs=return_outputs)


def run_microbatches(schedule, microbatches, targets=None, losses=None, *, return_outputs: bool = False):
    """:func:`step_with_microbatches` on a torch schedule (no shape following, no tied-weight exchange)."""
    n = schedule._n_microbatches
    stages = list(schedule._stages) if hasattr(schedule, "_stages") else [schedule._stage]
    if microbatches is not None and len(microbatches) != n:
        raise StageInputError(f"microbatches: got {len(microbatches)}, the schedule was built for n_microbatches={n}")
    if isinstance(targets, torch.Tensor):
        raise StageInputError(
            "targets: pass one target per microbatch (a list), split as the inputs were, e.g. by putting labels "
            "into the dict given to split_microbatches and popping them from each microbatch"
        )
    if targets is not None and len(targets) != n:
        raise StageInputError(f"targets: got {len(targets)}, the schedule was built for n_microbatches={n}")
    if schedule._has_backward and not torch.is_grad_enabled():
        raise ScheduleUsageError("step_with_microbatches() needs gradients enabled for a training schedule; "
                           "it must not run under torch.no_grad()")
    for stage in stages:
        stage.has_backward = schedule._has_backward
    for stage in stages:
        stage.clear_runtime_states()
    kwarg_mbs = None if microbatches is None else [dict(mb) for mb in microbatches]
    kwargs = {}
    if "return_outputs" in inspect.signature(schedule._step_microbatches).parameters:
        kwargs["return_outputs"] = return_outputs
    schedule._step_microbatches(None, kwarg_mbs, None if targets is None else list(targets), losses, **kwargs)
    if return_outputs:
        for stage in stages:
            if stage.is_last:
                return list(stage.output_chunks)
    return None

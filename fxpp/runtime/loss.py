"""Losses for pipeline schedules that reproduce transformers' whole-batch loss.

Note [auxiliary loss]
    A mixture-of-experts model with ``output_router_logits`` adds
    ``router_aux_loss_coef * load_balancing_loss(router logits of every layer)`` to its
    loss. The router logits cross the cuts (``fxpp.trace.recording``) and the last
    stage returns ``(logits, aux_loss)`` to the schedule. The load-balancing loss is not
    linear in the batch, so a microbatched step defines it per microbatch: the step's
    loss is the whole batch's language-model loss plus the coefficient times the *mean
    over microbatches* of each microbatch's auxiliary loss, which is what the unpatched
    model gives run on the same microbatches (``model(**mb, use_cache=False).aux_loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from ..errors import LossConfigError
from .parallel import dp_size, global_target_tokens
from .tensor_parallel import sharded_cross_entropy


class CausalLMLoss:
    """Next-token cross entropy per microbatch, normalised by the whole batch.

    transformers' ``ForCausalLMLoss`` shifts the labels by one, ignores ``-100`` and
    divides the summed cross entropy by the number of target tokens *in the whole
    batch*. A schedule calls the loss once per microbatch and, with
    ``scale_grads=True`` (the default), divides gradients by the number of
    microbatches ``M``. So each microbatch returns ``sum_ce / N * M``: after the
    schedule's scaling, gradients equal the unpatched model's on the whole batch,
    even when padding gives microbatches different numbers of target tokens.

    Use :meth:`whole_batch` to turn the schedule's per-microbatch losses back into
    the loss transformers reports.

    Under data parallelism over ``data_parallel`` replicas (Note [pipeline x data
    parallel] in ``fxpp.runtime.parallel``), ``num_target_tokens`` counts the *global*
    batch and each microbatch returns ``sum_ce / N * M * data_parallel``: the
    replicas' gradients, averaged over dp and divided by ``M``, are the global batch's.
    """

    def __init__(self, num_target_tokens: int, num_microbatches: int, *, scale_grads: bool = True, ignore_index: int = -100,
                 aux_loss_coef: float | None = None, data_parallel: int = 1):
        if num_target_tokens < 1:
            raise LossConfigError(f"num_target_tokens={num_target_tokens}: the batch has no target tokens")
        if data_parallel < 1:
            raise LossConfigError(f"data_parallel={data_parallel} must be at least 1")
        self.num_target_tokens = num_target_tokens
        self.num_microbatches = num_microbatches
        self.scale_grads = scale_grads
        self.ignore_index = ignore_index
        self.aux_loss_coef = aux_loss_coef
        self.data_parallel = data_parallel
        # What the loss of a microbatch is multiplied by: undone by the schedule's
        # division by M and the data-parallel average over the replicas.
        self._scale = (num_microbatches if scale_grads else 1) * data_parallel

    def __call__(self, output, labels: torch.Tensor) -> torch.Tensor:
        """The microbatch's loss; ``output`` is the logits, or ``(logits, aux_loss)`` (Note [auxiliary loss])."""
        aux = None
        if isinstance(output, (tuple, list)):
            logits, aux = output
            if self.aux_loss_coef is None:
                raise LossConfigError(
                    "the last stage returns an auxiliary loss (the model's config sets output_router_logits); build "
                    "the loss with fxpp.causal_lm_loss(labels, num_microbatches, model=model) so it adds "
                    "router_aux_loss_coef times it, as the model's forward does"
                )
        else:
            logits = output
        loss = self._lm_loss(logits, labels)
        if aux is not None:
            # Not multiplied by the microbatch count: after the schedule divides the
            # gradients by it, the step has the mean of the microbatches' aux losses.
            loss = loss + self.aux_loss_coef * aux.float().sum()  # a stage sends the scalar as [1]
        return loss

    def _lm_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = F.pad(labels.to(logits.device), (0, 1), value=self.ignore_index)[..., 1:]
        if isinstance(logits, DTensor):  # vocabulary-sharded logits (Note [loss parallel])
            ce = sharded_cross_entropy(logits, labels, self.ignore_index)
        else:
            ce = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=self.ignore_index, reduction="sum",
            )
        loss = ce / self.num_target_tokens
        return loss * self._scale if self._scale != 1 else loss

    def whole_batch(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The whole batch's loss from the schedule's per-microbatch losses.

        Under data parallelism, this replica's share of the global batch's loss: the
        sum over the dp replicas is the global batch's loss (with a router auxiliary
        loss, its term is the mean over every microbatch of the global batch).
        """
        total = torch.stack([l.detach().float() for l in losses]).sum()
        return total / self._scale if self._scale != 1 else total


def count_target_tokens(labels: torch.Tensor, ignore_index: int = -100) -> int:
    """Target tokens after the one-token shift: labels[:, 1:] that are not ignored."""
    return int((labels[..., 1:] != ignore_index).sum())


def causal_lm_loss(labels: torch.Tensor, num_microbatches: int, *, scale_grads: bool = True, ignore_index: int = -100,
                   model: torch.nn.Module | None = None, dp_mesh=None, mesh=None) -> CausalLMLoss:
    """A :class:`CausalLMLoss` for the whole batch's ``labels``.

    With ``model`` whose config sets ``output_router_logits``, the loss also adds the
    model's ``router_aux_loss_coef`` times the auxiliary loss the last stage returns
    (Note [auxiliary loss]).

    With ``dp_mesh`` (a mesh with a ``"dp"`` dimension: ``fxpp.pp_dp_mesh``,
    ``fxpp.pp_dp_tp_mesh``, or its ``mesh["dp"]``), ``labels`` are this dp replica's part
    of the global batch; the target tokens of the global batch are counted with one
    all-reduce over dp, so every rank of the dp mesh must call this (Note [pipeline x
    data parallel]). The tp ranks of a replica hold the same labels and each reduce over
    their own dp group (Note [3-D mesh]).
    ``mesh`` is the same as ``dp_mesh`` (the spelling ``build_stage`` takes).
    """
    if mesh is not None:
        if dp_mesh is not None:
            raise LossConfigError("pass mesh= or dp_mesh=, not both")
        dp_mesh = mesh
    coef = router_aux_loss_coef(model) if model is not None else None
    count = global_target_tokens(count_target_tokens(labels, ignore_index), dp_mesh)
    return CausalLMLoss(count, num_microbatches, scale_grads=scale_grads, ignore_index=ignore_index,
                        aux_loss_coef=coef, data_parallel=dp_size(dp_mesh))


# The names MoE forwards read their auxiliary-loss coefficient from (``self.<name>``):
# ``router_aux_loss_coef`` (Mixtral, Qwen-MoE, OLMoE, ...), ``aux_loss_coef`` (JetMoE).
AUX_LOSS_COEF_NAMES = ("router_aux_loss_coef", "aux_loss_coef")


def router_aux_loss_coef(model: torch.nn.Module) -> float | None:
    """The coefficient the model's forward puts on its auxiliary router loss, or None when it computes none.

    Where the model's forward reads it: the model's own attribute (``self.router_aux_loss_coef``,
    set from the config by every MoE ``*ForCausalLM``; JetMoE's ``self.aux_loss_coef``), else the
    text config's or the config's. None for a model that computes an auxiliary loss under another
    name: the callers refuse it rather than drop the term.
    """
    config = model.config
    configs = [config.get_text_config(), config]
    if not any(getattr(c, "output_router_logits", False) for c in configs):
        return None
    for name in AUX_LOSS_COEF_NAMES:
        for source in (model, *configs):
            coef = getattr(source, name, None)
            if isinstance(coef, (int, float)) and not isinstance(coef, bool):
                return float(coef)
    return None

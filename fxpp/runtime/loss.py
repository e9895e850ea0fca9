"""Losses for pipeline schedules that reproduce transformers' whole-batch loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """

    def __init__(self, num_target_tokens: int, num_microbatches: int, *, scale_grads: bool = True, ignore_index: int = -100):
        if num_target_tokens < 1:
            raise ValueError(f"num_target_tokens={num_target_tokens}: the batch has no target tokens")
        self.num_target_tokens = num_target_tokens
        self.num_microbatches = num_microbatches
        self.scale_grads = scale_grads
        self.ignore_index = ignore_index

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = F.pad(labels.to(logits.device), (0, 1), value=self.ignore_index)[..., 1:]
        ce = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
            ignore_index=self.ignore_index, reduction="sum",
        )
        loss = ce / self.num_target_tokens
        return loss * self.num_microbatches if self.scale_grads else loss

    def whole_batch(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The whole batch's loss from the schedule's per-microbatch losses."""
        total = torch.stack([l.detach().float() for l in losses]).sum()
        return total / self.num_microbatches if self.scale_grads else total


def count_target_tokens(labels: torch.Tensor, ignore_index: int = -100) -> int:
    """Target tokens after the one-token shift: labels[:, 1:] that are not ignored."""
    return int((labels[..., 1:] != ignore_index).sum())


def causal_lm_loss(labels: torch.Tensor, num_microbatches: int, *, scale_grads: bool = True, ignore_index: int = -100) -> CausalLMLoss:
    """A :class:`CausalLMLoss` for the whole batch's ``labels``."""
    return CausalLMLoss(count_target_tokens(labels, ignore_index), num_microbatches, scale_grads=scale_grads, ignore_index=ignore_index)

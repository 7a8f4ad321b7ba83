"""Decoupled contrastive learning (Yeh et al., ECCV 2022): no positive in the denominator.

Row i's loss is ``logsumexp(logits of its negatives) - logit of its
positive``: InfoNCE's objective on a row whose positives the walker has
excluded (``exclude_target``, or the positives' labels), so the gradient
is still ``softmax(negatives) - onehot(target)``. The one difference is a
row left with no negative at all (every paired negative padded, a batch of
one, one label for all): its loss is 0 and it has no gradient, where
InfoNCE's formula would give -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from info_nce.objectives.base import ColumnSoftmax, RowContext
from info_nce.objectives.infonce import InfoNCEObjective


@dataclass(frozen=True)
class DecoupledObjective(InfoNCEObjective):
    """InfoNCE over the negatives alone; a row without negatives costs 0."""

    empty_rows_free = True

    def forward_(
        self,
        block: Tensor,
        context: RowContext,
        row_stat: Tensor,
        target_logit: Tensor | None,
        keys: Tensor | None = None,
    ) -> Tensor:
        assert keys is None, "the walker takes no column statistics from this objective"
        empty = torch.isneginf(block.amax(dim=1, keepdim=True))  # (R, 1) rows without a negative
        # On the CPU one (free) host sync per block skips the masking where
        # no row is empty; on an accelerator: always masked, no sync.
        if _may_sync(empty) and not bool(empty.any()):
            return super().forward_(block, context, row_stat, target_logit)
        block.masked_fill_(empty, 0.0)  # any finite row: its softmax is discarded below
        loss = super().forward_(block, context, row_stat, target_logit)
        block.masked_fill_(empty, 0.0)  # no gradient
        # +inf makes exp(logit - statistic) 0 in the gradient pass, and marks the row.
        row_stat.masked_fill_(empty, float("inf"))
        return loss.masked_fill(empty[:, 0], 0.0)

    def gradient_from_forward_(
        self, block: Tensor, context: RowContext, row_stat: Tensor, weight: Tensor | float
    ) -> None:
        super().gradient_from_forward_(block, context, row_stat, _alive(row_stat, weight))

    def gradient_(
        self,
        logits: Tensor,
        context: RowContext,
        first_column: int,
        row_stat: Tensor,
        weight: Tensor | float,
        columns: ColumnSoftmax | None = None,
    ) -> None:
        alive = _alive(row_stat, weight)
        super().gradient_(logits, context, first_column, row_stat, alive, columns)


def _alive(row_stat: Tensor, weight: Tensor | float) -> Tensor | float:
    """The rows' weights, 0 for rows without negatives (their statistic is +inf)."""
    empty = torch.isposinf(row_stat[:, :1])  # (R, 1)
    if _may_sync(empty) and not bool(empty.any()):
        return weight
    return torch.where(empty, 0.0, weight)


def _may_sync(tensor: Tensor) -> bool:
    """Whether reading ``tensor`` on the host is free: on the CPU."""
    return tensor.device.type == "cpu"

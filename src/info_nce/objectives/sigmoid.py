"""SigLIP's sigmoid loss (Zhai et al., ICCV 2023): every logit scored alone.

With ``z = logit + bias`` and ``s`` = -1 for a target (the row's positives:
its diagonal key, or every key with its label) and +1 for any other
candidate, the row's loss is ``sum_j softplus(s_j z_j)``, which is
``-log sigmoid(z)`` for a positive and ``-log sigmoid(-z)`` for a negative,
and its gradient is ``d loss / d z_j = s_j sigmoid(s_j z_j)`` (``sigmoid(z)
- 1`` at a positive, ``sigmoid(z)`` elsewhere). An excluded entry (-inf)
costs 0 and has no gradient.

No row statistic enters the loss, so ``forward_`` leaves the gradient itself
in the block and the walker builds every gradient in the same pass: three
matrix products in all. The one statistic is the row's gradient sum,
``d loss / d bias``; the bias's gradient is its (weighted) sum over the rows.
Each step runs a cache-sized chunk of columns at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from info_nce._backend import kernels_for
from info_nce.objectives.base import (
    ColumnSoftmax,
    RowContext,
    column_slices,
    forward_then_gradient_,
    target_entries,
)

# softplus(z) is z itself, to the last bit of a float64, above this
# (exp(-40) < 2^-53 * 40); below it log1p(exp(z)) never overflows in float32.
_LINEAR_ABOVE = 40.0


@dataclass(frozen=True)
class SigmoidObjective:
    """Each logit plus the bias scored alone: ``softplus(-z)`` at targets, else ``softplus(z)``."""

    # The softplus values of a slice, reused from slice to slice within one loss call.
    _scratch: list[Tensor] = field(default_factory=list, init=False, compare=False, repr=False)

    num_stats = 1  # the row's d loss / d bias
    needs_candidates = False
    # Blocks of 4x the walker's target logits: at B = 16384, D = 128 (2 cores,
    # AVX2, forward+backward alternating in one process) 1024 rows per block
    # took 1.12-1.16x the three-product floor, 512 rows 1.19x, 256 rows
    # 1.21-1.30x, 2048 rows 1.18x. InfoNCE gained 2% there, within the noise.
    block_scale = 4
    bias_stat = 0
    tileable = False  # not through a log-sum-exp (any tiling would do; none is needed)

    def parts(self) -> tuple[float, ...]:
        return ()

    def forward_(
        self,
        block: Tensor,
        context: RowContext,
        row_stat: Tensor,
        target_logit: Tensor | None,
        keys: Tensor | None = None,
    ) -> Tensor:
        assert keys is None, "the walker takes no column statistics from this objective"
        kernels = kernels_for(block)
        if kernels is not None:
            found: Tensor = kernels.sigmoid_rows_(
                block, *_kernel_targets(context, 0), 1.0, row_stat[:, 0]
            )
            return found
        loss = block.new_zeros(len(block))  # (R,)
        bias_grad = row_stat[:, 0].zero_()  # (R,)
        slices = column_slices(block)
        width = slices[0].stop - slices[0].start if slices else 0
        if not self._scratch or self._scratch[0].numel() < len(block) * width:
            self._scratch[:] = [block.new_empty(len(block) * width)]
        for columns in slices:
            chunk = block[:, columns]  # (R, k) view
            signs = _signed_(chunk, context, columns.start)
            terms = self._scratch[0][: chunk.numel()].view(chunk.shape)  # (R, k)
            torch.ops.aten.softplus.out(chunk, 1.0, _LINEAR_ABOVE, out=terms)
            loss += terms.sum(dim=1)
            chunk.sigmoid_()
            _unsign_(chunk, context, columns.start, signs)  # d loss / d z
            bias_grad += chunk.sum(dim=1)
        return loss

    def gradient_from_forward_(
        self, block: Tensor, context: RowContext, row_stat: Tensor, weight: Tensor | float
    ) -> None:
        if isinstance(weight, Tensor) or weight != 1.0:
            block.mul_(weight)

    def forward_with_gradient_(
        self,
        block: Tensor,
        context: RowContext,
        row_stat: Tensor,
        target_logit: Tensor | None,
        keys: Tensor | None,
    ) -> Tensor:
        kernels = kernels_for(block)
        if kernels is None:
            return forward_then_gradient_(self, block, context, row_stat, target_logit, keys)
        # The forward pass leaves the gradient (weight 1) already: one kernel.
        found: Tensor = kernels.sigmoid_rows_(
            block, *_kernel_targets(context, 0), 1.0, row_stat[:, 0], keys
        )
        return found

    def gradient_(
        self,
        logits: Tensor,
        context: RowContext,
        first_column: int,
        row_stat: Tensor,
        weight: Tensor | float,
        columns: ColumnSoftmax | None = None,
    ) -> None:
        assert columns is None, "no column softmax: the walker takes none from this objective"
        kernels = kernels_for(logits)
        if kernels is not None:
            kernels.sigmoid_rows_(logits, *_kernel_targets(context, first_column), weight, None)
            return
        signs = _signed_(logits, context, first_column)
        logits.sigmoid_()
        _unsign_(logits, context, first_column, signs)
        self.gradient_from_forward_(logits, context, row_stat, weight)


def _kernel_targets(
    context: RowContext, first_column: int
) -> tuple[tuple[int, int] | None, tuple[Tensor, Tensor, int] | None, Tensor | float]:
    """The kernel's targets, labels and bias for a slice from ``first_column``."""
    labels = context.target_labels
    by_label = None
    if labels is not None:
        by_label = (labels.rows, labels.keys, labels.key_start - first_column)
    return context.target_columns(first_column), by_label, context.logit_bias


def _signed_(logits: Tensor, context: RowContext, first_column: int) -> Tensor | None:
    """In place: logits become ``s * (logit + bias)``; the (R, k) signs by label, if any."""
    logits.add_(context.logit_bias)
    if context.target_labels is not None:
        mask = context.target_labels.mask(first_column, logits.shape[1])
        if mask is None:
            return None
        signs = 1 - 2 * mask.to(logits.dtype)  # (R, k) -1 at the targets
        logits.mul_(signs)
        return signs
    targets, _ = target_entries(logits, context, first_column)
    targets.neg_()
    return None


def _unsign_(logits: Tensor, context: RowContext, first_column: int, signs: Tensor | None) -> None:
    """In place: the targets' entries negated back (``sigmoid(s z)`` becomes ``s sigmoid(s z)``)."""
    if signs is not None:
        logits.mul_(signs)
    elif context.target_labels is None:
        targets, _ = target_entries(logits, context, first_column)
        targets.neg_()

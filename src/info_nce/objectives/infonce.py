"""InfoNCE's row objective: ``logsumexp(row) - logit[target]``, and its positives under labels.

The gradient of the row loss with respect to its logits is
``softmax(row) - onehot(target)``. Rows whose positives are not a single
target column (labels, NT-Xent's other views) have no target here: their
positive term is ``mean_positive_logit``, computed from class sums in
O((B + classes) * D) without a (B, B) mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from info_nce._backend import kernels_for
from info_nce.objectives.base import (
    ColumnSoftmax,
    RowContext,
    add_to_targets_,
    forward_then_gradient_,
)


@dataclass(frozen=True)
class InfoNCEObjective:
    """Cross-entropy of each row's logits with its target column (none: the log-sum-exp alone)."""

    num_stats = 1  # the row log-sum-exp
    needs_candidates = False
    block_scale = 1
    bias_stat = None  # no bias: a row's softmax does not move when all its logits do
    tileable = True  # the loss is the log-sum-exp minus the target logit
    # A row without candidates: its loss is -inf here (the log-sum-exp of
    # nothing); the decoupled loss's subclass makes it 0, without gradient.
    empty_rows_free = False

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
        lse = row_stat[:, 0]
        kernels = kernels_for(block)
        if kernels is not None:
            loss: Tensor = kernels.infonce_forward_(block, lse, target_logit, keys)
            return loss
        if keys is not None:  # widened into the block, whose own columns are scratch
            block[:, block.shape[1] - keys.shape[1] :].copy_(keys)
        row_max = block.amax(dim=1)  # (R,)
        torch.ops.aten._softmax.out(block, 1, False, out=block)  # probabilities, in place
        # The row's largest probability, at its largest logit, is
        # 1 / sum(exp(logit - max)) >= 1 / W: no underflow.
        torch.sub(row_max, block.amax(dim=1).log_(), out=lse)
        return lse if target_logit is None else lse - target_logit

    def gradient_from_forward_(
        self, block: Tensor, context: RowContext, row_stat: Tensor, weight: Tensor | float
    ) -> None:
        kernels = kernels_for(block)
        if kernels is not None:
            kernels.infonce_gradient_(block, context.target_columns(0), weight, None)
            return
        if isinstance(weight, Tensor):
            block.mul_(weight)
        add_to_targets_(block, context, 0, _negated(weight))

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
        loss: Tensor = kernels.infonce_forward_gradient_(
            block,
            row_stat[:, 0],
            target_logit,
            context.target_columns(0),
            keys,
            empty_rows_free=self.empty_rows_free,
        )
        return loss

    def gradient_(
        self,
        logits: Tensor,
        context: RowContext,
        first_column: int,
        row_stat: Tensor,
        weight: Tensor | float,
        columns: ColumnSoftmax | None = None,
    ) -> None:
        kernels = kernels_for(logits)
        if kernels is not None:
            targets = context.target_columns(first_column)
            column_term = None
            if columns is not None:
                column_term = (columns.lse, columns.weight, columns.targets)
            kernels.infonce_gradient_(logits, targets, weight, row_stat[:, 0], column_term)
            return
        column_probabilities = None if columns is None else columns.probabilities(logits)
        logits.sub_(row_stat).exp_()
        if isinstance(weight, Tensor):
            logits.mul_(weight)
        add_to_targets_(logits, context, first_column, _negated(weight))
        if columns is not None and column_probabilities is not None:
            logits.add_(column_probabilities)
            columns.subtract_at_targets_(logits, context, first_column)


def _negated(weight: Tensor | float) -> Tensor | float:
    """``-weight`` per row: (R,) from an (R, 1) weight, or a number."""
    return -weight[:, 0] if isinstance(weight, Tensor) else -weight


def mean_positive_logit(
    rows: Tensor,
    keys: tuple[Tensor, ...],
    labels: tuple[Tensor, ...],
    offset: int,
    temperature: float | Tensor,
    *,
    exclude_self: bool,
    candidates: Tensor | None = None,
) -> Tensor:
    """Each row's mean logit over the keys that share its label. (R,)

    Row i is key ``offset + i`` of the first key set; its label is that key's.
    Its positives are the keys of every set whose label equals it (in-batch
    keys, then e.g. a queue's entries), without row i's own key if
    ``exclude_self``. Their mean logit is ``(x_i . class_sum - x_i . k_i) /
    ((class size - 1) t)`` (without the ``- 1`` and ``k_i`` terms when the
    row is not excluded), from per-class sums: no (R, N) mask, no
    concatenated keys, and the temperature divides the (R,) result.

    Args:
        rows: (R, D) rows, normalised as in the logits.
        keys: (N_k, D) key sets, normalised as in the logits.
        labels: (N_k,) integer labels of each set's keys.
        offset: local row i is key ``offset + i`` of ``keys[0]``.
        temperature: the logits' temperature.
        exclude_self: a row is not its own positive (NT-Xent, where the rows
            are among the keys). Every class then has at least two members.
        candidates: (R,) each row's number of candidates (the decoupled
            loss): a row with as many positives has no negative, and gets 0.
    """
    all_labels = labels[0] if len(labels) == 1 else torch.cat(labels)  # (sum N_k,)
    label_index, counts = _classes(all_labels)
    local = label_index[offset : offset + len(rows)]  # (R,) each row's class
    sums = keys[0].new_zeros(len(counts), keys[0].shape[1])  # (N, D), rows past the classes 0
    start = 0
    for key_set in keys:
        sums = sums.index_add(0, label_index[start : start + len(key_set)], key_set)
        start += len(key_set)
    dots = torch.sum(rows * sums[local], dim=1)  # (R,) x_i . class sum
    sizes = counts[local].to(rows.dtype)  # (R,)
    if exclude_self:
        dots = dots - torch.sum(rows * keys[0][offset : offset + len(rows)], dim=1)
        sizes = sizes - 1
    mean: Tensor = dots / (sizes * temperature)
    if candidates is not None:
        mean = torch.where(sizes < candidates, mean, 0.0)
    return mean


def _classes(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Each label's class index (in [0, C), C distinct labels) and each class's size.

    As ``torch.unique(labels, return_inverse=True, return_counts=True)``,
    except that the sizes are a (N,) table whose entries past the C classes
    are 0: no shape depends on the data, so a compiled graph needs no break.
    """
    ordered, order = torch.sort(labels)  # (N,)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]  # where a new label begins
    index = torch.empty_like(order).scatter_(0, order, torch.cumsum(starts, 0) - 1)  # (N,)
    counts = torch.zeros_like(index).index_add_(0, index, torch.ones_like(index))  # (N,)
    return index, counts

"""What an objective is: a loss of full rows of logits, and its gradient, written in place.

The block walker (`info_nce.engine.walker`) computes a block of logits for R
consecutive rows against all their candidates, reads each row's target logit,
applies the exclusion rules (the entry is -inf; with ``exclude_target`` the
target too), and hands the block to the objective together with a
`RowContext`. The block's columns are the extra columns (e.g. a query's own
positive), a few -inf padding columns that align the keys, then the keys; an
entry at -inf is no candidate. The objective does everything that depends on the loss itself:
the per-row statistics and loss, and ``d loss / d logits`` written into the
block. It never sees a key or an embedding.

Three ways in, as the walker has two passes and a one-pass walk:

* ``forward_`` on a whole block (the statistics pass): record each row's
  ``num_stats`` statistics and its loss, and leave in the block whatever
  ``gradient_from_forward_`` needs (InfoNCE: the row's softmax). The walker
  may read those leftovers (the symmetric loss takes its column sums from
  InfoNCE's row probabilities; under the kernels, with the key columns in
  ``keys``, from the logits, which stay as they are).
* ``forward_with_gradient_`` on a whole block where the walk builds the
  gradients in forward: both of the above with weight 1, in one kernel
  where the objective has one.
* ``gradient_`` on a slice of a block's columns (the gradient pass), with the
  statistics saved by ``forward_``: the logits of those columns become
  ``weight * d loss / d logits``.

Rows too long for a block of complete rows (a queue of a million keys) are
split into column tiles where the objective is ``tileable``: ``forward_``
then gets each row's log-sum-exp over its candidates as a one-column block.

An objective that scores logits on an absolute scale (the sigmoid loss) adds
``context.logit_bias`` to every logit itself, and records each row's
``d loss / d bias`` as its statistic ``bias_stat``; the others have no bias
(``bias_stat`` None) and never see one.

The gradient with respect to an excluded target is the objective's to write
(it is the only entry of an excluded column that is not 0).

Adding an objective means one file here that implements this protocol, its
export from `info_nce.objectives`, and the problem builder (`info_nce._problem`)
setting it as a walk's ``objective`` where the user's flags ask for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

# Elementwise work over several steps is done this many logits at a time, so
# that a slice of columns stays in cache between the steps.
CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class TargetLabels:
    """Targets by label: row r's targets are the first segment's keys with its label."""

    rows: Tensor  # (R,) the block's rows' labels
    keys: Tensor  # (N_0,) the first segment's keys' labels
    key_start: int  # the block column of the first segment's key 0

    def mask(self, first_column: int, width: int) -> Tensor | None:
        """(R, width) bool, True at the targets among ``width`` columns from ``first_column``.

        None where the columns hold no key of the first segment.
        """
        start = max(first_column, self.key_start)
        stop = min(first_column + width, self.key_start + len(self.keys))
        if start >= stop:
            return None
        keys = self.keys[start - self.key_start : stop - self.key_start]
        equal = self.rows.unsqueeze(1) == keys  # (R, stop - start)
        if stop - start == width:
            return equal
        found = equal.new_zeros(len(self.rows), width)
        found[:, start - first_column : stop - first_column] = equal
        return found


@dataclass(frozen=True)
class ColumnSoftmax:
    """The symmetric loss's key-to-query term on a slice of key columns, for ``gradient_``.

    Column j's term is ``weight_j * (lse_j - its target logit)``, ``lse_j``
    its log-sum-exp over all rows: its gradient is ``weight_j`` times the
    column's softmax over the rows, added to the rows' own gradient, minus
    ``weight_j`` at the column's target. With ``targets`` a column's target
    is the entry that is its row's target (in-batch: the diagonal, column j
    pairing with row j); without, the columns have none. Only objectives
    whose ``forward_`` leaves the row softmax, from which the walker takes
    the column sums (InfoNCE), get one.
    """

    lse: Tensor  # (k,) each column's log-sum-exp over all rows
    weight: Tensor | float  # (k,) each column's weight, or one for all
    targets: bool = False  # each column's target is a row's target entry
    # The PyTorch ops' buffer, allocated on first use and shared by a pass's slices.
    scratch: list[Tensor] = field(default_factory=list)

    def probabilities(self, logits: Tensor) -> Tensor:
        """``weight_j * exp(logit_ij - lse_j)`` of (R, k) logits, in the scratch buffer."""
        if not self.scratch or self.scratch[0].numel() < logits.numel():
            self.scratch[:] = [logits.new_empty(logits.numel())]
        out = self.scratch[0][: logits.numel()].view(logits.shape)
        found = torch.sub(logits, self.lse, out=out).exp_()
        if isinstance(self.weight, Tensor) or self.weight != 1.0:
            found.mul_(self.weight)
        return found

    def subtract_at_targets_(self, logits: Tensor, context: RowContext, first_column: int) -> None:
        """In place: ``weight_j`` off each column's target entry in the slice (with ``targets``)."""
        if not self.targets:
            return
        entries, rows = target_entries(logits, context, first_column)
        if not entries.numel():
            return
        offset = context.target_diagonal(first_column)
        assert offset is not None, "column targets lie on the rows' target diagonal"
        weight = self.weight
        if isinstance(weight, Tensor):
            weight = weight[rows.start + offset : rows.stop + offset]
        entries.sub_(weight)


@dataclass(frozen=True)
class RowContext:
    """Where each row's special columns are, in block coordinates, and the logits' bias.

    Row ``r`` (counted over all rows, not within the block) has its target,
    if any, at block column ``target_start + r * target_step``: ``target_step``
    is 1 for a diagonal (in-batch positives: key ``offset + r``) and 0 for a
    fixed column (a query's own positive in the first extra column). With
    ``target_labels`` a row's targets are instead every key with its label
    (objectives that score each logit alone: the sigmoid loss).
    """

    first_row: int  # the block's first row
    target_start: int | None = None
    target_step: int = 1
    candidates: Tensor | None = None  # (R,) each row's number of candidates, if asked for
    target_labels: TargetLabels | None = None
    logit_bias: Tensor | float = 0.0  # added to every logit by objectives with a bias

    def target_columns(self, first_column: int) -> tuple[int, int] | None:
        """``(first, step)``: row r's target is column ``first + r * step`` of a slice.

        The slice's first column is ``first_column``; None without target columns.
        """
        if self.target_start is None:
            return None
        step = self.target_step
        return self.target_start + self.first_row * step - first_column, step

    def target_diagonal(self, first_column: int) -> int | None:
        """Offset of the targets' diagonal in a slice whose first column is ``first_column``."""
        if self.target_start is None or self.target_step != 1:
            return None
        return self.target_start + self.first_row - first_column


class RowObjective(Protocol):
    """A loss of full rows of logits; see the module docstring."""

    @property
    def num_stats(self) -> int:
        """How many statistics per row ``forward_`` records for ``gradient_``."""
        ...

    @property
    def needs_candidates(self) -> bool:
        """Whether ``forward_`` needs ``context.candidates``."""
        ...

    @property
    def block_scale(self) -> int:
        """How many times the walker's target logits per block suit the objective (1: as many).

        Blocks of complete rows hold up to ``block_scale`` times
        `walker.TARGET_BLOCK_ELEMENTS` logits, never more than
        `walker.MAX_BLOCK_ELEMENTS`: an objective of several elementwise
        steps per logit runs them over fewer, taller blocks.
        """
        ...

    @property
    def bias_stat(self) -> int | None:
        """Which statistic is the row's ``d loss / d bias`` (None: the objective has no bias).

        The bias's gradient is then the statistic's sum over the rows,
        weighted as the rows' losses are: no gradient pass needed.
        """
        ...

    @property
    def tileable(self) -> bool:
        """Whether the walker may split long rows into column tiles.

        True when ``forward_`` depends on a row's candidates only through
        their log-sum-exp, so that a one-column block holding it gives the
        same statistics and loss as the complete row, ``gradient_`` works on
        any slice of columns, and ``d loss / d logit`` of every candidate but
        the target is the row's softmax times a row weight that
        ``gradient_from_forward_`` applies to the extra columns and that is
        0 only for rows without candidates (the walker's one-pass walk
        builds the keys' part itself). InfoNCE and the decoupled loss are.
        """
        ...

    def parts(self) -> tuple[float, ...]:
        """The objective's settings: ``type(objective)(*parts)`` rebuilds it."""
        ...

    def forward_(
        self,
        block: Tensor,
        context: RowContext,
        row_stat: Tensor,
        target_logit: Tensor | None,
        keys: Tensor | None = None,
    ) -> Tensor:
        """Statistics and loss of an (R, W) logits block; the block is overwritten.

        Args:
            block: (R, W) logits, excluded entries at -inf.
            context: where the block's rows have their targets.
            row_stat: (R, num_stats) out: the statistics ``gradient_`` needs
                (InfoNCE: the row log-sum-exp).
            target_logit: (R,) each row's target logit (read before any
                exclusion), or None without targets.
            keys: (R, K), the block's last K columns instead of the block's
                own (in the products' dtype): then only the statistics and
                the loss, no leftovers (the walker takes the symmetric
                loss's column statistics from the logits). Only objectives
                that leave the row softmax (InfoNCE) get one.

        Returns:
            (R,) the rows' loss.
        """
        ...

    def gradient_from_forward_(
        self, block: Tensor, context: RowContext, row_stat: Tensor, weight: Tensor | float
    ) -> None:
        """In place: ``forward_``'s leftovers in ``block`` become ``weight * d loss / d logits``."""
        ...

    def gradient_(
        self,
        logits: Tensor,
        context: RowContext,
        first_column: int,
        row_stat: Tensor,
        weight: Tensor | float,
        columns: ColumnSoftmax | None = None,
    ) -> None:
        """In place: (R, k) logits become ``weight * d loss / d logits``.

        The logits are the block's columns from ``first_column`` on, excluded
        entries at -inf; under the kernels they may be in the products'
        dtype (the walker leaves them unwidened only then), computed at the
        statistics' precision all the same. ``row_stat`` is (R, num_stats),
        what ``forward_`` recorded; ``weight`` is (R, 1) or a number. With
        ``columns`` (the symmetric loss, objectives that leave the row
        softmax only) the columns' softmax term and its targets' part are
        added.
        """
        ...

    def forward_with_gradient_(
        self,
        block: Tensor,
        context: RowContext,
        row_stat: Tensor,
        target_logit: Tensor | None,
        keys: Tensor | None,
    ) -> Tensor:
        """``forward_``, then ``gradient_from_forward_`` with weight 1: the one-pass walk.

        ``d loss / d logits`` goes into the block. With ``keys`` ((R, K),
        maybe of another dtype: the products') the block's last K columns
        live there instead: their logits are read from it and their
        gradient written back to it (the block's own last K columns are
        scratch). An objective with a kernel does it all in one
        (`forward_then_gradient_` is the composition).

        Returns:
            (R,) the rows' loss.
        """
        ...


def forward_then_gradient_(
    objective: RowObjective,
    block: Tensor,
    context: RowContext,
    row_stat: Tensor,
    target_logit: Tensor | None,
    keys: Tensor | None,
) -> Tensor:
    """``forward_with_gradient_`` as its steps, for an objective's PyTorch ops. (R,)"""
    key_columns = block[:, block.shape[1] - (0 if keys is None else keys.shape[1]) :]
    if keys is not None:
        key_columns.copy_(keys)  # widened to the block's dtype
    loss = objective.forward_(block, context, row_stat, target_logit)
    objective.gradient_from_forward_(block, context, row_stat, 1.0)
    if keys is not None:
        keys.copy_(key_columns)  # rounded to the products' dtype once
    return loss


def column_slices(block: Tensor) -> list[slice]:
    """The block's columns in cache-sized slices (`CHUNK_ELEMENTS` logits each)."""
    step = max(1, CHUNK_ELEMENTS // max(1, len(block)))
    return [slice(a, min(a + step, block.shape[1])) for a in range(0, block.shape[1], step)]


def target_entries(block: Tensor, context: RowContext, first_column: int) -> tuple[Tensor, slice]:
    """A view of the targets that fall in a slice of columns, and the rows they belong to."""
    if context.target_start is None:
        return block[:0, 0], slice(0, 0)
    if context.target_step == 0:
        column = context.target_start - first_column
        if 0 <= column < block.shape[1]:
            return block[:, column], slice(0, len(block))
        return block[:0, 0], slice(0, 0)
    offset = context.target_diagonal(first_column)
    assert offset is not None
    diagonal = torch.diagonal(block, offset=offset)  # entries (r, r + offset)
    first = max(0, -offset)
    return diagonal, slice(first, first + len(diagonal))


def add_to_targets_(
    block: Tensor, context: RowContext, first_column: int, values: Tensor | float
) -> None:
    """In place: ``values`` ((R,) or a number) added at each row's target in a column slice."""
    targets, rows = target_entries(block, context, first_column)
    if targets.numel():
        targets.add_(values[rows] if isinstance(values, Tensor) else values)

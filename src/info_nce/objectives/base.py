"""What an objective is: a loss of full rows of logits, and its gradient, written in place.

The block walker (`info_nce.engine.walker`) computes a block of logits for R
consecutive rows against all their candidates, applies the exclusion rules
(the entry is -inf), and hands the block to the objective together with a
`RowContext`. The objective does everything that depends on the loss itself:
the per-row statistics and loss, and ``d loss / d logits`` written into the
block. It never sees a key, an embedding or a temperature.

Two ways in, as the walker has two passes:

* ``forward_`` on a whole block (the statistics pass): record each row's
  statistics and loss, and leave in the block whatever ``gradient_from_forward_``
  needs (InfoNCE: the row's softmax). The walker may read those leftovers
  (the symmetric loss takes its column sums from the row probabilities).
* ``gradient_`` on a slice of a block's columns (the gradient pass), with the
  statistics saved by ``forward_``: the logits of those columns become
  ``weight * d loss / d logits``.

Adding an objective means one file here that implements this protocol, its
export from `info_nce.objectives`, and the problem builder (`info_nce._problem`)
setting it as a walk's ``objective`` where the user's flags ask for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass(frozen=True)
class RowContext:
    """Where each row's special columns are, in block coordinates.

    Row ``r`` (counted over all rows, not within the block) has its target,
    if any, at block column ``target_start + r * target_step``: ``target_step``
    is 1 for a diagonal (in-batch positives: key ``offset + r``) and 0 for a
    fixed column (a query's own positive in the first extra column).
    """

    first_row: int  # the block's first row
    target_start: int | None = None
    target_step: int = 1

    def target_diagonal(self, first_column: int) -> int | None:
        """Offset of the targets' diagonal in a slice whose first column is ``first_column``."""
        if self.target_start is None or self.target_step != 1:
            return None
        return self.target_start + self.first_row - first_column


class RowObjective(Protocol):
    """A loss of full rows of logits; see the module docstring."""

    def forward_(
        self, block: Tensor, context: RowContext, row_stat: Tensor, target_logit: Tensor | None
    ) -> Tensor:
        """Statistics and loss of an (R, W) logits block; the block is overwritten.

        Args:
            block: (R, W) logits, excluded entries at -inf.
            context: where the block's rows have their targets.
            row_stat: (R,) out: the statistic ``gradient_`` needs (InfoNCE:
                the row log-sum-exp).
            target_logit: (R,) out, or None: each row's target logit.

        Returns:
            (R,) the rows' loss.
        """
        ...

    def gradient_from_forward_(
        self, block: Tensor, context: RowContext, weight: Tensor | float
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
    ) -> None:
        """In place: (R, k) logits become ``weight * d loss / d logits``.

        The logits are the block's columns from ``first_column`` on.
        ``row_stat`` is (R, 1), what ``forward_`` recorded; ``weight`` is (R, 1)
        or a number.
        """
        ...

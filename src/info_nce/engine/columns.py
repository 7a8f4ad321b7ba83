"""Column statistics for the symmetric loss: each key's log-sum-exp over all rows.

A key's log-sum-exp over the queries needs every row block before any
key-to-query probability is known, so the walker collects it during the
statistics pass, from each block's row probabilities, and checks once at the
end whether a float32 term could have underflowed (then it takes a pass of its
own here).
"""

from __future__ import annotations

import torch
from torch import Tensor

from info_nce._backend import kernels_for

# Column work on a block (column sums in the statistics pass, column
# probabilities in the gradient pass) is done this many logits at a time, so
# that it stays in cache and needs no second block-sized buffer.
COLUMN_CHUNK_ELEMENTS = 1 << 18
# On an accelerator, where a cache-sized chunk would be one kernel launch per
# few hundred columns: this many logits (64 MiB in float32) at a time.
ACCELERATOR_COLUMN_CHUNK_ELEMENTS = 1 << 24
# Column log-sum-exps taken from the blocks' row probabilities (`column_lse`)
# are exact to rounding when none is more than this below the largest row
# log-sum-exp; otherwise the column statistics take a pass of their own.
COLUMN_LSE_MARGIN = 50.0


def column_chunk_elements(device: torch.device) -> int:
    """Logits per step of the column work on ``device``."""
    return COLUMN_CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_COLUMN_CHUNK_ELEMENTS


def column_chunks(split: int, num_columns: int, chunk: int) -> list[slice]:
    """Slices of at most ``chunk`` columns: ``[0, split)``, then ``[split, num_columns)``."""
    return [
        slice(a, min(a + chunk, stop))
        for begin, stop in ((0, split), (split, num_columns))
        for a in range(begin, stop, chunk)
    ]


def column_lse(probabilities: Tensor, row_lse: Tensor, chunk: int) -> Tensor:
    """Each column's log-sum-exp over a block's rows, from the rows' softmax. (C,)

    ``sum_i exp(logit_ij) = sum_i probabilities_ij * exp(row_lse_i)``, shifted
    by the block's largest ``row_lse`` and summed by torch's (cascade) sum, a
    chunk of columns at a time; the probabilities are overwritten. A term
    below about e^-87 of the shift may underflow: with B rows in all, that
    changes a column log-sum-exp within `COLUMN_LSE_MARGIN` of the largest
    row log-sum-exp by less than B * e^-37 relative, nothing at float32
    rounding, which `needs_separate_pass` checks once all blocks are in.
    Under the Triton backend one kernel reads the block once instead.
    """
    shift = row_lse.amax()
    weights = (row_lse - shift).exp_().unsqueeze(1)  # (R, 1), in (0, 1]
    kernels = kernels_for(probabilities)
    if kernels is not None:  # one read of the block
        found: Tensor = kernels.column_sums(probabilities, weights[:, 0])
        return found.log_().add_(shift)
    sums = probabilities.new_empty(probabilities.shape[1])  # (C,)
    for columns in column_chunks(len(sums), len(sums), chunk):
        torch.sum(probabilities[:, columns].mul_(weights), dim=0, out=sums[columns])
    return sums.log_().add_(shift)


def column_lse_of_logits(logits: Tensor, row_lse: Tensor) -> Tensor:
    """Each column's log-sum-exp over a block's rows, from the logits themselves. (C,)

    For a walk under the kernels whose logits stay in the products' buffer
    (the objective leaves no softmax there): ``sum_i exp(logit_ij -
    shift)`` by one kernel that reads the block once, shifted by the
    block's largest ``row_lse``, which no logit exceeds; the same underflow
    bound as `column_lse`.
    """
    kernels = kernels_for(logits)
    assert kernels is not None, "the logits stay unwidened only under the kernels"
    shift = row_lse.amax()
    found: Tensor = kernels.column_exp_sums(logits, shift)
    return found.log_().add_(shift)


def needs_separate_pass(column_stats: Tensor, row_lse: Tensor) -> bool:
    """Whether a column log-sum-exp fell so far below the rows' that `column_lse` may be off.

    One host sync per statistics pass.
    """
    return bool(column_stats.amin() < row_lse.amax() - COLUMN_LSE_MARGIN)


def column_lse_pass(
    rows: Tensor,
    keys: Tensor,
    row_scales: Tensor,
    column_scales: Tensor | None,
    column_keys: int,
    buffer: Tensor,
    chunk: int,
) -> Tensor:
    """Key j's log-sum-exp over all scaled rows (j < ``column_keys``), a pass of its own. (C,)

    The safe way, for when `column_lse` cannot be trusted (a column far below
    the largest row log-sum-exp): each block's logits against the first
    ``column_keys`` keys are recomputed in ``buffer`` and reduced over the rows a
    chunk of columns at a time. The products are taken in the keys' dtype
    (the walk's product dtype), the logits kept in the rows'.
    """
    result = rows.new_full((column_keys,), float("-inf"))  # (C,)
    block_rows = len(buffer)
    flat = buffer.view(-1)
    for start in range(0, len(rows), block_rows):
        block = slice(start, min(start + block_rows, len(rows)))
        logits = flat[: (block.stop - start) * column_keys].view(-1, column_keys)  # (R, C)
        scaled = rows[block] * row_scales[block].unsqueeze(1)  # (R, D)
        if keys.dtype == rows.dtype:
            torch.mm(scaled, keys[:column_keys].T, out=logits)
        else:
            logits.copy_(torch.mm(scaled.to(keys.dtype), keys[:column_keys].T))
        for columns in column_chunks(column_keys, column_keys, chunk):
            chunk_logits = logits[:, columns]
            if column_scales is not None:
                chunk_logits.mul_(column_scales[columns])
            chunk_lse = torch.logsumexp(chunk_logits, dim=0)
            result[columns] = torch.logaddexp(result[columns], chunk_lse)
    return result

"""InfoNCE's row kernels: log-sum-exp and softmax in place; ``weight * (softmax - onehot)``.

The one-pass walk (gradients built in forward) takes both in one kernel,
which reads each row twice and writes its gradient once; the key columns
may live in a buffer of the products' dtype, read and written there.

A row's target is its column ``target + r * step`` of the block (``step`` 1:
a diagonal, 0: one column for every row), absent where that column is
outside the block. A row without candidates (every logit -inf) has
log-sum-exp -inf and probabilities 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from info_nce.kernels._online import finish, load_row, shifted, store_row

# Columns per step of a row's loop: the block of one program.
MAX_COLUMNS = 2048


@triton.jit
def _forward_kernel(
    block,
    row_stride,
    column_stride,
    width,
    lse_out,
    lse_stride,
    target_logit,
    target_stride,
    loss_out,
    keys,
    keys_row_stride,
    keys_column_stride,
    split,
    target,
    target_step,
    HAS_TARGET: tl.constexpr,
    GRADIENT: tl.constexpr,
    TARGET_COLUMN: tl.constexpr,
    SPLIT: tl.constexpr,
    EMPTY_ROWS_FREE: tl.constexpr,
    WRITE: tl.constexpr,
    F64: tl.constexpr,
    COLUMNS: tl.constexpr,
):
    r = tl.program_id(0)
    acc: tl.constexpr = tl.float64 if F64 else tl.float32
    row = block + r.to(tl.int64) * row_stride
    keys_row = keys + r.to(tl.int64) * keys_row_stride
    running_max = tl.full([COLUMNS], float("-inf"), acc)
    running_sum = tl.zeros([COLUMNS], acc)
    for start in range(0, width, COLUMNS):
        columns = start + tl.arange(0, COLUMNS)
        x = load_row(
            row, column_stride, keys_row, keys_column_stride, columns, width, split, acc, SPLIT
        )
        running_max, old, new = shifted(running_max, x)
        running_sum = running_sum * tl.exp(old) + tl.exp(new)
    lse = finish(running_max, running_sum, 1.0)
    empty = lse == float("-inf")  # no candidate
    loss = lse
    if HAS_TARGET:
        loss = lse - tl.load(target_logit + r * target_stride).to(acc)
    statistic = lse
    if EMPTY_ROWS_FREE:  # the decoupled loss: such a row costs 0, its statistic marks it
        loss = tl.where(empty, 0.0, loss)
        statistic = tl.where(empty, float("inf"), lse)
    tl.store(lse_out + r * lse_stride, statistic.to(lse_out.dtype.element_ty))
    tl.store(loss_out + r, loss.to(loss_out.dtype.element_ty))
    if WRITE:  # (without: the statistics only, the logits stay where they are)
        # exp(x - lse); a row without candidates (lse -inf) gets 0, not 0 / 0.
        shift = tl.where(empty, float("inf"), lse)
        target_column = target + r * target_step
        for start in range(0, width, COLUMNS):
            columns = start + tl.arange(0, COLUMNS)
            x = load_row(
                row, column_stride, keys_row, keys_column_stride, columns, width, split, acc, SPLIT
            )
            value = tl.exp(x - shift)  # the softmax
            if GRADIENT:  # softmax - onehot(target)
                if TARGET_COLUMN:
                    value = tl.where(columns == target_column, value - 1.0, value)
                if EMPTY_ROWS_FREE:
                    value = tl.where(empty, 0.0, value)
            store_row(
                row,
                column_stride,
                keys_row,
                keys_column_stride,
                columns,
                width,
                split,
                value,
                SPLIT,
            )


@triton.jit
def _gradient_kernel(
    block,
    row_stride,
    column_stride,
    width,
    lse,
    lse_stride,
    weight,
    weight_stride,
    target,
    target_step,
    column_lse,
    column_lse_stride,
    column_weight,
    column_weight_stride,
    EXP: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    COLUMN_TERM: tl.constexpr,
    COLUMN_TARGETS: tl.constexpr,
    F64: tl.constexpr,
    COLUMNS: tl.constexpr,
):
    r = tl.program_id(0)
    acc: tl.constexpr = tl.float64 if F64 else tl.float32
    row = block + r.to(tl.int64) * row_stride
    w = tl.load(weight + r * weight_stride).to(acc)  # stride 0: one weight for all rows
    shift = 0.0
    if EXP:
        shift = tl.load(lse + r * lse_stride).to(acc)
        shift = tl.where(shift == float("-inf"), float("inf"), shift)
    target_column = target + r * target_step
    for start in range(0, width, COLUMNS):
        columns = start + tl.arange(0, COLUMNS)
        inside = columns < width
        logit = tl.load(row + columns * column_stride, mask=inside, other=0.0).to(acc)
        x = logit
        if EXP:
            x = tl.exp(logit - shift)
        grad = x * w
        if HAS_TARGET:
            grad = tl.where(columns == target_column, grad - w, grad)
        if COLUMN_TERM:  # the columns' softmax over all rows, weighted per column
            lse_j = tl.load(column_lse + columns * column_lse_stride, mask=inside, other=0.0).to(
                acc
            )
            weight_j = tl.load(
                column_weight + columns * column_weight_stride, mask=inside, other=0.0
            ).to(acc)
            grad += weight_j * tl.exp(logit - lse_j)
            if COLUMN_TARGETS:  # a column's target is its row's: minus its weight there
                grad = tl.where(columns == target_column, grad - weight_j, grad)
        tl.store(row + columns * column_stride, grad.to(block.dtype.element_ty), mask=inside)


@triton.jit
def _column_sums_kernel(
    probabilities,
    row_stride,
    column_stride,
    num_rows,
    width,
    weight,
    weight_stride,
    shift,
    sums,
    FROM_LOGITS: tl.constexpr,
    F64: tl.constexpr,
    ROWS: tl.constexpr,
    COLUMNS: tl.constexpr,
):
    acc: tl.constexpr = tl.float64 if F64 else tl.float32
    columns = tl.program_id(0) * COLUMNS + tl.arange(0, COLUMNS)
    inside = columns < width
    total = tl.zeros([COLUMNS], acc)
    m = tl.load(shift).to(acc)
    for start in range(0, num_rows, ROWS):
        rows = start + tl.arange(0, ROWS)
        below = rows < num_rows
        offsets = rows[:, None].to(tl.int64) * row_stride + columns[None, :] * column_stride
        found = below[:, None] & inside[None, :]
        if FROM_LOGITS:  # exp(logit - shift), every logit at most the shift
            x = tl.load(probabilities + offsets, mask=found, other=float("-inf")).to(acc)
            total += tl.sum(tl.exp(x - m), 0)
        else:
            w = tl.load(weight + rows * weight_stride, mask=below, other=0.0).to(acc)  # (ROWS,)
            p = tl.load(probabilities + offsets, mask=found, other=0.0)
            total += tl.sum(p.to(acc) * w[:, None], 0)  # a tile's rows summed as a tree
    tl.store(sums + columns, total.to(sums.dtype.element_ty), mask=inside)


# Rows and columns per tile of the column sums: one program per column range.
COLUMN_SUM_ROWS = 32
COLUMN_SUM_COLUMNS = 128


def column_sums(probabilities: Tensor, weight: Tensor) -> Tensor:
    """``sum_i weight_i * probabilities_ij`` of an (R, C) block, reading it once. (C,)

    The symmetric loss's column statistics from the rows' softmax (in the
    block's precision, float32 at least; each tile of rows summed as a tree).
    """
    return _column_sums(probabilities, weight, weight[:1], from_logits=False)


def column_exp_sums(logits: Tensor, shift: Tensor) -> Tensor:
    """``sum_i exp(logits_ij - shift)`` of an (R, C) block, reading it once. (C,)

    The symmetric loss's column statistics from the logits themselves (any
    dtype; summed in ``shift``'s, float32 at least), for a ``shift`` (a
    0-dim tensor) no logit exceeds: the largest row log-sum-exp.
    """
    return _column_sums(logits, shift.reshape(1), shift.reshape(1), from_logits=True)


def _column_sums(
    probabilities: Tensor, weight: Tensor, shift: Tensor, *, from_logits: bool
) -> Tensor:
    """The column sums' launch: of weighted probabilities, or (``from_logits``) shifted logits."""
    num_rows, width = probabilities.shape
    sums = probabilities.new_zeros(width, dtype=weight.dtype)
    if num_rows == 0 or width == 0:
        return sums
    _column_sums_kernel[(triton.cdiv(width, COLUMN_SUM_COLUMNS),)](
        probabilities,
        probabilities.stride(0),
        probabilities.stride(1),
        num_rows,
        width,
        weight,
        weight.stride(0),
        shift,
        sums,
        FROM_LOGITS=from_logits,
        F64=sums.dtype == torch.float64,
        ROWS=COLUMN_SUM_ROWS,
        COLUMNS=COLUMN_SUM_COLUMNS,
    )
    return sums


def columns_for(width: int) -> int:
    """Columns per step of a row's loop: a power of two, at most `MAX_COLUMNS`."""
    return min(MAX_COLUMNS, int(triton.next_power_of_2(max(1, width))))


def infonce_forward_(
    block: Tensor, lse: Tensor, target_logit: Tensor | None, keys: Tensor | None = None
) -> Tensor:
    """Each row's log-sum-exp into ``lse`` (R,), its softmax into ``block``; the rows' loss.

    The loss is ``lse - target_logit`` (the log-sum-exp alone without targets).
    With ``keys`` (R, K), the block's last K columns are there instead (the
    products' dtype), and only the statistics and the loss are computed:
    the logits stay as they are.
    """
    return _forward(block, lse, target_logit, None, keys, write=keys is None)


def infonce_forward_gradient_(
    block: Tensor,
    lse: Tensor,
    target_logit: Tensor | None,
    targets: tuple[int, int] | None,
    keys: Tensor | None,
    *,
    empty_rows_free: bool,
) -> Tensor:
    """`infonce_forward_` and ``softmax - onehot(target)`` in one kernel; the rows' loss.

    The gradient goes into ``block``; with ``keys`` (R, K), the block's last
    K columns are there instead (in its dtype: the products'), logits in
    and gradient out. With ``empty_rows_free`` a row without candidates
    costs 0, has gradient 0 and the statistic +inf (the decoupled loss).
    """
    return _forward(block, lse, target_logit, targets, keys, gradient=True, empty=empty_rows_free)


def _forward(
    block: Tensor,
    lse: Tensor,
    target_logit: Tensor | None,
    targets: tuple[int, int] | None = None,
    keys: Tensor | None = None,
    *,
    gradient: bool = False,
    empty: bool = False,
    write: bool = True,
) -> Tensor:
    rows, width = block.shape
    loss = block.new_empty(rows, dtype=lse.dtype)
    if rows == 0:
        return loss
    logits = target_logit if target_logit is not None else lse
    target, step = targets if targets is not None else (0, 0)
    out = keys if keys is not None else block
    split = width - (keys.shape[1] if keys is not None else 0)
    _forward_kernel[(rows,)](
        block,
        block.stride(0),
        block.stride(1),
        width,
        lse,
        lse.stride(0),
        logits,
        logits.stride(0),
        loss,
        out,
        out.stride(0),
        out.stride(1),
        split,
        target,
        step,
        HAS_TARGET=target_logit is not None,
        GRADIENT=gradient,
        TARGET_COLUMN=targets is not None,
        SPLIT=keys is not None,
        EMPTY_ROWS_FREE=empty,
        WRITE=write,
        F64=block.dtype == torch.float64,
        COLUMNS=columns_for(width),
    )
    return loss


def infonce_gradient_(
    block: Tensor,
    targets: tuple[int, int] | None,
    weight: Tensor | float,
    lse: Tensor | None,
    column_term: tuple[Tensor, Tensor | float, bool] | None = None,
) -> None:
    """In place: ``weight * (exp(block - lse) - onehot(target))``; without ``lse``,
    ``weight * (block - onehot(target))`` (the block holds the softmax already).

    ``weight`` is (R, 1) or a number; ``lse`` (R,). With ``column_term``,
    ``(column_lse, column_weight, column_targets)`` ((W,), (W,) or a number,
    a flag; only with ``lse``), ``column_weight_j * exp(block_ij -
    column_lse_j)`` is added, the symmetric loss's key-to-query softmax, and
    with ``column_targets`` ``column_weight_j`` subtracted at each row's
    target (a column's target is its row's).
    """
    rows, width = block.shape
    if rows == 0 or width == 0:
        return
    assert column_term is None or lse is not None, "the column term needs the logits"
    target, step = targets if targets is not None else (0, 0)
    weights = weight[:, 0] if isinstance(weight, Tensor) else block.new_full((1,), weight)
    column_lse, column_weight, column_targets = (
        column_term if column_term is not None else (weights, weights, False)
    )
    if not isinstance(column_weight, Tensor):
        column_weight = block.new_full((1,), column_weight)
    _gradient_kernel[(rows,)](
        block,
        block.stride(0),
        block.stride(1),
        width,
        lse if lse is not None else block,
        lse.stride(0) if lse is not None else 0,
        weights,
        weights.stride(0) if len(weights) == rows else 0,
        target,
        step,
        column_lse,
        column_lse.stride(0),
        column_weight,
        column_weight.stride(0) if len(column_weight) == width else 0,
        EXP=lse is not None,
        HAS_TARGET=targets is not None,
        COLUMN_TERM=column_term is not None,
        COLUMN_TARGETS=column_targets and targets is not None,
        F64=block.dtype == torch.float64,
        COLUMNS=columns_for(width),
    )

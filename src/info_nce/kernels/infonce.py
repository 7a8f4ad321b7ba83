"""InfoNCE's row kernels: log-sum-exp and softmax in place; ``weight * (softmax - onehot)``.

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

from info_nce.kernels._online import finish, shifted

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
    HAS_TARGET: tl.constexpr,
    F64: tl.constexpr,
    COLUMNS: tl.constexpr,
):
    r = tl.program_id(0)
    acc: tl.constexpr = tl.float64 if F64 else tl.float32
    row = block + r.to(tl.int64) * row_stride
    running_max = tl.full([COLUMNS], float("-inf"), acc)
    running_sum = tl.zeros([COLUMNS], acc)
    for start in range(0, width, COLUMNS):
        columns = start + tl.arange(0, COLUMNS)
        inside = columns < width
        x = tl.load(row + columns * column_stride, mask=inside, other=float("-inf")).to(acc)
        running_max, old, new = shifted(running_max, x)
        running_sum = running_sum * tl.exp(old) + tl.exp(new)
    lse = finish(running_max, running_sum, 1.0)
    tl.store(lse_out + r * lse_stride, lse.to(lse_out.dtype.element_ty))
    # exp(x - lse); a row without candidates (lse -inf) gets 0, not 0 / 0.
    shift = tl.where(lse == float("-inf"), float("inf"), lse)
    for start in range(0, width, COLUMNS):
        columns = start + tl.arange(0, COLUMNS)
        inside = columns < width
        x = tl.load(row + columns * column_stride, mask=inside, other=float("-inf")).to(acc)
        probability = tl.exp(x - shift)
        tl.store(row + columns * column_stride, probability.to(block.dtype.element_ty), mask=inside)
    loss = lse
    if HAS_TARGET:
        loss = lse - tl.load(target_logit + r * target_stride).to(acc)
    tl.store(loss_out + r, loss.to(loss_out.dtype.element_ty))


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
    EXP: tl.constexpr,
    HAS_TARGET: tl.constexpr,
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
        x = tl.load(row + columns * column_stride, mask=inside, other=0.0).to(acc)
        if EXP:
            x = tl.exp(x - shift)
        grad = x * w
        if HAS_TARGET:
            grad = tl.where(columns == target_column, grad - w, grad)
        tl.store(row + columns * column_stride, grad.to(block.dtype.element_ty), mask=inside)


def columns_for(width: int) -> int:
    """Columns per step of a row's loop: a power of two, at most `MAX_COLUMNS`."""
    return min(MAX_COLUMNS, int(triton.next_power_of_2(max(1, width))))


def infonce_forward_(block: Tensor, lse: Tensor, target_logit: Tensor | None) -> Tensor:
    """Each row's log-sum-exp into ``lse`` (R,), its softmax into ``block``; the rows' loss.

    The loss is ``lse - target_logit`` (the log-sum-exp alone without targets).
    """
    rows, width = block.shape
    loss = block.new_empty(rows, dtype=lse.dtype)
    if rows == 0:
        return loss
    has_target = target_logit is not None
    targets = target_logit if target_logit is not None else lse
    _forward_kernel[(rows,)](
        block,
        block.stride(0),
        block.stride(1),
        width,
        lse,
        lse.stride(0),
        targets,
        targets.stride(0),
        loss,
        HAS_TARGET=has_target,
        F64=block.dtype == torch.float64,
        COLUMNS=columns_for(width),
    )
    return loss


def infonce_gradient_(
    block: Tensor,
    targets: tuple[int, int] | None,
    weight: Tensor | float,
    lse: Tensor | None,
) -> None:
    """In place: ``weight * (exp(block - lse) - onehot(target))``; without ``lse``,
    ``weight * (block - onehot(target))`` (the block holds the softmax already).

    ``weight`` is (R, 1) or a number; ``lse`` (R,).
    """
    rows, width = block.shape
    if rows == 0 or width == 0:
        return
    target, step = targets if targets is not None else (0, 0)
    weights = weight[:, 0] if isinstance(weight, Tensor) else block.new_full((1,), weight)
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
        EXP=lse is not None,
        HAS_TARGET=targets is not None,
        F64=block.dtype == torch.float64,
        COLUMNS=columns_for(width),
    )

"""The sigmoid loss's row kernels: ``softplus(s z)`` and ``s sigmoid(s z)`` per logit.

``z = logit + bias``, ``s`` = -1 at a row's targets (its column ``target + r
* step``, or every key with its label) and +1 elsewhere; an excluded entry
(-inf) costs 0 and has no gradient. One program per row, as
`info_nce.kernels.infonce`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from info_nce.kernels._online import load_row, store_row
from info_nce.kernels.infonce import columns_for


@triton.jit
def _sigmoid_kernel(
    block,
    row_stride,
    column_stride,
    width,
    bias,
    weight,
    weight_stride,
    loss_out,
    stat_out,
    stat_stride,
    target,
    target_step,
    row_labels,
    key_labels,
    key_start,
    num_keys,
    keys,
    keys_row_stride,
    keys_column_stride,
    split,
    FORWARD: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    BY_LABEL: tl.constexpr,
    SPLIT: tl.constexpr,
    F64: tl.constexpr,
    COLUMNS: tl.constexpr,
):
    r = tl.program_id(0)
    acc: tl.constexpr = tl.float64 if F64 else tl.float32
    row = block + r.to(tl.int64) * row_stride
    keys_row = keys + r.to(tl.int64) * keys_row_stride
    b = tl.load(bias).to(acc)
    w = tl.load(weight + r * weight_stride).to(acc)  # stride 0: one weight for all rows
    loss = tl.zeros([COLUMNS], acc)
    bias_grad = tl.zeros([COLUMNS], acc)
    target_column = target + r * target_step
    label = tl.load(row_labels + r * BY_LABEL)
    for start in range(0, width, COLUMNS):
        columns = start + tl.arange(0, COLUMNS)
        inside = columns < width
        logit = load_row(
            row, column_stride, keys_row, keys_column_stride, columns, width, split, acc, SPLIT
        )
        z = logit + b
        is_target = columns < 0  # all False
        if HAS_TARGET:
            is_target = inside & (columns == target_column)
        if BY_LABEL:
            key = columns - key_start
            is_key = inside & (key >= 0) & (key < num_keys)
            key_label = tl.load(key_labels + key, mask=is_key, other=0)
            is_target = is_key & (key_label == label)
        signed = tl.where(is_target, -z, z)  # -inf stays an excluded negative
        sign = tl.where(is_target, -1.0, 1.0)
        sigmoid = 1.0 / (1.0 + tl.exp(-signed))  # 0 at -inf
        grad = sign * sigmoid
        if FORWARD:
            small = tl.exp(-tl.abs(signed))  # exp(-|s z|) in (0, 1]
            # log1p(small): below 1e-4 its series, exact to float64 rounding.
            log1p = tl.where(small < 1e-4, small * (1.0 - 0.5 * small), tl.log(1.0 + small))
            term = tl.maximum(signed, 0.0) + log1p  # softplus(s z)
            loss += tl.where(signed == float("-inf"), 0.0, term)
            bias_grad += grad
        grad = grad * w
        store_row(
            row, column_stride, keys_row, keys_column_stride, columns, width, split, grad, SPLIT
        )
    if FORWARD:
        tl.store(loss_out + r, tl.sum(loss, 0).to(loss_out.dtype.element_ty))
        tl.store(stat_out + r * stat_stride, tl.sum(bias_grad, 0).to(stat_out.dtype.element_ty))


def sigmoid_rows_(
    block: Tensor,
    targets: tuple[int, int] | None,
    labels: tuple[Tensor, Tensor, int] | None,
    bias: Tensor | float,
    weight: Tensor | float,
    bias_grad: Tensor | None,
    keys: Tensor | None = None,
) -> Tensor | None:
    """In place: ``weight * s sigmoid(s z)``; with ``bias_grad`` (R,) the forward pass.

    A row's targets are its column ``first + r * step`` (``targets``), or
    with ``labels`` = (its rows' (R,) labels, the keys' (N,) labels, the
    block column of key 0) every key with its label. The forward pass
    (``weight`` 1) also writes each row's ``d loss / d bias`` (its
    gradients' sum) into ``bias_grad`` and returns the rows' loss (R,).
    With ``keys`` (R, K) the block's last K columns are there instead (in
    its dtype: the products'), logits in and gradient out.
    """
    rows, width = block.shape
    forward = bias_grad is not None
    loss = block.new_zeros(rows) if forward else None
    if rows == 0 or width == 0:
        if bias_grad is not None:
            bias_grad.zero_()
        return loss
    target, step = targets if targets is not None else (0, 0)
    biases = bias.reshape(1) if isinstance(bias, Tensor) else block.new_full((1,), bias)
    weights = weight[:, 0] if isinstance(weight, Tensor) else block.new_full((1,), weight)
    row_labels, key_labels, key_start = (
        labels if labels is not None else (block.new_zeros(1, dtype=torch.long),) * 2 + (0,)
    )
    out = keys if keys is not None else block
    _sigmoid_kernel[(rows,)](
        block,
        block.stride(0),
        block.stride(1),
        width,
        biases,
        weights,
        weights.stride(0) if len(weights) == rows else 0,
        loss if loss is not None else block,
        bias_grad if bias_grad is not None else block,
        bias_grad.stride(0) if bias_grad is not None else 0,
        target,
        step,
        row_labels,
        key_labels,
        key_start,
        len(key_labels) if labels is not None else 0,
        out,
        out.stride(0),
        out.stride(1),
        width - (keys.shape[1] if keys is not None else 0),
        FORWARD=forward,
        HAS_TARGET=targets is not None and labels is None,
        BY_LABEL=labels is not None,
        SPLIT=keys is not None,
        F64=block.dtype == torch.float64,
        COLUMNS=columns_for(width),
    )
    return loss

"""What the kernels share: a row's logits, and its online log-sum-exp.

`load_row` reads a step of a row whose last columns may live in a buffer
of their own (the keys' logits in the products' dtype); `store_row` writes
it back the same way.

The online log-sum-exp is a running maximum and rescaled sums of a row.

For ``c > 0`` the largest ``c x`` is at the largest ``x``, so one running
maximum ``m`` serves any number of scales: each step returns the new
maximum and ``old - m``, ``x - m`` (-inf kept, never -inf - -inf), and a
sum of ``exp(c (x - m))`` is rescaled by ``exp(c (old - m))``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def shifted(running_max, x):
    """The new maximum, and the old maximum and ``x`` relative to it (-inf stays -inf)."""
    new_max = tl.maximum(running_max, x)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    old = tl.where(running_max == float("-inf"), float("-inf"), running_max - shift)
    new = tl.where(x == float("-inf"), float("-inf"), x - shift)
    return new_max, old, new


@triton.jit
def finish(running_max, running_sum, scale):
    """``lse(scale x)`` of the row from its lanes' maxima and sums (-inf: no candidate)."""
    row_max = tl.max(running_max, 0)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    lanes = tl.where(running_max == float("-inf"), float("-inf"), running_max - shift)
    return tl.log(tl.sum(running_sum * tl.exp(scale * lanes), 0)) + scale * shift


@triton.jit
def load_row(
    row,
    column_stride,
    keys_row,
    keys_stride,
    columns,
    width,
    split,
    acc: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """A step of a row's logits: columns before ``split`` from the block, the rest from the keys'
    buffer (with ``SPLIT``), in ``acc``; -inf past the row's end."""
    inside = columns < width
    if SPLIT:
        x = tl.load(row + columns * column_stride, mask=inside & (columns < split), other=0.0)
        past = (columns - split) * keys_stride
        y = tl.load(keys_row + past, mask=inside & (columns >= split), other=0.0)
        found = tl.where(columns < split, x.to(acc), y.to(acc))
    else:
        found = tl.load(row + columns * column_stride, mask=inside, other=0.0).to(acc)
    return tl.where(inside, found, float("-inf"))


@triton.jit
def store_row(
    row, column_stride, keys_row, keys_stride, columns, width, split, value, SPLIT: tl.constexpr
):
    """Stores a step of a row where `load_row` reads it: columns before ``split`` into the
    block, the rest into the keys' buffer (with ``SPLIT``), each in its own dtype."""
    inside = columns < width
    in_block = inside
    if SPLIT:
        in_block = inside & (columns < split)
        past = (columns - split) * keys_stride
        kept = value.to(keys_row.dtype.element_ty)
        tl.store(keys_row + past, kept, mask=inside & (columns >= split))
    tl.store(row + columns * column_stride, value.to(row.dtype.element_ty), mask=in_block)

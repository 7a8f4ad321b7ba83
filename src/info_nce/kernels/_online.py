"""The online log-sum-exp the kernels share: a running maximum and rescaled sums of a row.

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

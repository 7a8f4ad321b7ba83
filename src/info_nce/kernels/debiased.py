"""The debiased and hard-negative loss's row kernels: two softmaxes without a second buffer.

With ``c_P = 1 + beta`` and ``c_Q = beta``, a row's negatives ``s_j`` give
``lse(c_P s)`` and ``lse(c_Q s)`` (one pass, one running maximum, as
``c > 0`` keeps the argmax), and the negatives' gradient
``coef_P exp(c_P s_j - lse_P) - coef_Q exp(c_Q s_j - lse_Q)``, written in
place. ``beta = 0`` has no ``Q`` term. The loss's per-row arithmetic stays
in the objective (`info_nce.objectives.debiased`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from info_nce.kernels._online import finish, shifted
from info_nce.kernels.infonce import columns_for


@triton.jit
def _dual_lse_kernel(
    block,
    row_stride,
    column_stride,
    width,
    beta,
    lse_p,
    lse_q,
    HAS_Q: tl.constexpr,
    F64: tl.constexpr,
    COLUMNS: tl.constexpr,
):
    r = tl.program_id(0)
    acc: tl.constexpr = tl.float64 if F64 else tl.float32
    row = block + r.to(tl.int64) * row_stride
    running_max = tl.full([COLUMNS], float("-inf"), acc)
    sum_p = tl.zeros([COLUMNS], acc)
    sum_q = tl.zeros([COLUMNS], acc)
    for start in range(0, width, COLUMNS):
        columns = start + tl.arange(0, COLUMNS)
        x = tl.load(row + columns * column_stride, mask=columns < width, other=float("-inf"))
        x = x.to(acc)
        running_max, old, new = shifted(running_max, x)
        sum_p = sum_p * tl.exp((1.0 + beta) * old) + tl.exp((1.0 + beta) * new)
        if HAS_Q:
            sum_q = sum_q * tl.exp(beta * old) + tl.exp(beta * new)
    lse = finish(running_max, sum_p, 1.0 + beta)
    tl.store(lse_p + r, lse.to(lse_p.dtype.element_ty))
    if HAS_Q:
        tl.store(lse_q + r, finish(running_max, sum_q, beta).to(lse_q.dtype.element_ty))


@triton.jit
def _dual_gradient_kernel(
    block,
    row_stride,
    column_stride,
    width,
    beta,
    lse_p,
    lse_q,
    coef_p,
    coef_q,
    HAS_Q: tl.constexpr,
    F64: tl.constexpr,
    COLUMNS: tl.constexpr,
):
    r = tl.program_id(0)
    acc: tl.constexpr = tl.float64 if F64 else tl.float32
    row = block + r.to(tl.int64) * row_stride
    log_p = tl.load(lse_p + r).to(acc)
    a = tl.load(coef_p + r).to(acc)
    log_q = 0.0
    b = 0.0
    if HAS_Q:
        log_q = tl.load(lse_q + r).to(acc)
        b = tl.load(coef_q + r).to(acc)
    for start in range(0, width, COLUMNS):
        columns = start + tl.arange(0, COLUMNS)
        inside = columns < width
        x = tl.load(row + columns * column_stride, mask=inside, other=float("-inf")).to(acc)
        excluded = x == float("-inf")
        p = tl.where(excluded, 0.0, tl.exp((1.0 + beta) * x - log_p))
        grad = a * p
        if HAS_Q:
            grad -= b * tl.where(excluded, 0.0, tl.exp(beta * x - log_q))
        tl.store(row + columns * column_stride, grad.to(block.dtype.element_ty), mask=inside)


def dual_lse(block: Tensor, beta: float) -> tuple[Tensor, Tensor | None]:
    """Each row's ``lse((1 + beta) s)`` and, for ``beta > 0``, ``lse(beta s)`` (R,) each."""
    rows, width = block.shape
    stats = torch.promote_types(block.dtype, torch.float32)
    lse_p = block.new_empty(rows, dtype=stats)
    lse_q = block.new_empty(rows, dtype=stats) if beta else None
    if rows and width:
        _dual_lse_kernel[(rows,)](
            block,
            block.stride(0),
            block.stride(1),
            width,
            float(beta),
            lse_p,
            lse_q if lse_q is not None else lse_p,
            HAS_Q=bool(beta),
            F64=block.dtype == torch.float64,
            COLUMNS=columns_for(width),
        )
    elif rows:
        lse_p.fill_(float("-inf"))
        if lse_q is not None:
            lse_q.fill_(float("-inf"))
    return lse_p, lse_q


def dual_gradient_(
    block: Tensor,
    beta: float,
    lse_p: Tensor,
    lse_q: Tensor | None,
    coef_p: Tensor,
    coef_q: Tensor | None,
) -> None:
    """In place: ``coef_p exp((1 + beta) s - lse_p) - coef_q exp(beta s - lse_q)``, 0 at -inf.

    ``lse_*`` and ``coef_*`` are (R,) contiguous; without ``lse_q`` no Q term.
    """
    rows, width = block.shape
    if rows == 0 or width == 0:
        return
    has_q = lse_q is not None and coef_q is not None
    _dual_gradient_kernel[(rows,)](
        block,
        block.stride(0),
        block.stride(1),
        width,
        float(beta),
        lse_p.contiguous(),
        lse_q.contiguous() if lse_q is not None else lse_p,
        coef_p.contiguous(),
        coef_q.contiguous() if coef_q is not None else coef_p,
        HAS_Q=has_q,
        F64=block.dtype == torch.float64,
        COLUMNS=columns_for(width),
    )

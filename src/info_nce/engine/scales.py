"""Normalisation and temperature as per-row and per-column factors, and their gradients.

The walker never writes a normalised or scaled copy of a (B, D) input: row i
of a logits block is ``(query_i * row_scale_i) @ (keys * column_scales).T``,
and the factors' own gradients are applied in place to the gradient buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Scales:
    """The factors that turn raw rows and keys into logits, and the norms behind them."""

    temperature: Tensor | float
    rows: Tensor  # (B,) 1 / (temperature * |q_i|), or 1 / temperature
    columns: list[Tensor | None]  # per key segment: (N_k,) 1 / |k_j|, or None without normalisation
    row_norms: Tensor | None  # (B,) clamped at eps
    key_norms: list[Tensor | None]  # per key segment: (N_k,) clamped at eps


def scales(
    rows: Tensor,
    segments: tuple[Tensor, ...],
    temperature: Tensor | float,
    *,
    normalize: bool,
    eps: float,
) -> Scales:
    """The row factors ``1 / (t |q_i|)`` and each segment's column factors ``1 / |k_j|``."""
    t = temperature.detach() if isinstance(temperature, Tensor) else temperature
    if not normalize:
        nothing: list[Tensor | None] = [None] * len(segments)
        return Scales(t, rows.new_ones(len(rows)).div_(t), nothing, None, list(nothing))
    row_norms = torch.linalg.vector_norm(rows, dim=1).clamp_min_(eps)  # (B,)
    key_norms: list[Tensor | None] = [
        torch.linalg.vector_norm(keys, dim=1).clamp_min_(eps) for keys in segments
    ]
    columns: list[Tensor | None] = [None if n is None else n.reciprocal() for n in key_norms]
    return Scales(t, (row_norms * t).reciprocal_(), columns, row_norms, key_norms)


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(1)`` for (B, D) tensors, with a product of at most ~1M elements at a time."""
    out = a.new_empty(len(a))  # (B,)
    step = max(1, (1 << 20) // max(1, a.shape[1]))
    for start in range(0, len(a), step):
        rows = slice(start, start + step)
        torch.sum(a[rows] * b[rows], dim=1, out=out[rows])
    return out


def unit_backward_(grad: Tensor, x: Tensor, norms: Tensor, dot: Tensor, eps: float) -> Tensor:
    """In place: the gradient through ``x / max(|x|, eps)`` from the one at fixed norms.

    ``grad`` is the gradient with the norms held fixed (so already divided by
    them); the norms' own share removes its radial part,
    ``grad - x (x . grad) / |x|^2``, where ``|x| > eps``: rows at the clamp
    have a constant denominator. ``dot`` is ``x . grad`` per row.
    """
    radial = torch.where(norms > eps, dot / norms.square(), 0.0)  # (B,)
    return grad.addcmul_(x, radial.unsqueeze(1), value=-1.0)


def input_grads_(
    rows: Tensor,
    segments: tuple[Tensor, ...],
    grad_rows: Tensor | None,
    grad_segments: list[Tensor | None],
    factors: Scales,
    *,
    eps: float,
    temperature_grad: bool,
) -> Tensor | None:
    """Gradients of the raw rows and segments from those of the scaled ones, in place.

    The scaled row is ``x_i = q_i s_i`` with ``s_i = 1 / (t |q_i|)``: with
    ``u_i = dL/dx_i``, the gradient at fixed norms is ``s_i u_i``, the norms add
    ``-q_i (q_i . s_i u_i) / |q_i|^2``, and ``dL/dt = -sum_i q_i . s_i u_i / t``.
    ``grad_segments`` arrive at fixed column norms; the norms' share is the same.
    ``grad_rows`` is None where the rows need no gradient (then neither does
    the temperature).

    Returns:
        The temperature's gradient (a 0-dim tensor) if ``temperature_grad``, else None.
    """
    grad_temperature = None
    if grad_rows is not None:
        grad_rows.mul_(factors.rows.unsqueeze(1))
    if grad_rows is not None and (factors.row_norms is not None or temperature_grad):
        dot = row_dot(rows, grad_rows)  # (B,)
        if temperature_grad:
            grad_temperature = -dot.sum() / factors.temperature
        if factors.row_norms is not None:
            unit_backward_(grad_rows, rows, factors.row_norms, dot, eps)
    for keys, grad, norms in zip(segments, grad_segments, factors.key_norms, strict=True):
        if grad is not None and norms is not None:
            unit_backward_(grad, keys, norms, row_dot(keys, grad), eps)
    return grad_temperature

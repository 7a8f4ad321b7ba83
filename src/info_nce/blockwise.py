"""The exact blockwise engine: InfoNCE without the (B, N) logits matrix.

Two problem shapes, one custom autograd Function each:

* **Matrix** (in-batch or unpaired negatives): every query is scored against the
  same N candidate keys. The queries are walked in blocks of ``block_rows``
  rows; each block's logits ``(block_rows, N)`` live in one reused buffer, are
  turned into probabilities in place, and feed the two gradient products before
  the next block overwrites them. Peak extra memory is
  ``block_rows * N + O((B + N) * D)`` instead of several ``B * N`` matrices.
  For ``'mean'``/``'sum'`` the gradients are built during the forward pass (the
  upstream gradient is a scalar, so backward only rescales them): the matrix
  products are exactly the three any implementation needs. For ``'none'`` the
  forward keeps per-row log-sum-exp statistics and backward recomputes each
  block weighted by the upstream gradient of its rows.
* **Paired** negatives (B, M, D): the logits are only (B, M); the engine avoids
  every (B, M, D) temporary it can. The normalisation of the negatives is folded
  into the Function (scaling the (B, M) dot products by inverse norms) instead of
  writing a normalised copy of the negatives.

The temperature is folded into the queries by the caller: the Functions see
``query / temperature`` and unit keys, and ordinary autograd carries the
gradient through the normalisation and the temperature.

The math lives in the plain functions; the Functions only save, call and scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from info_nce._validation import Reduction

# Rows per logits block, chosen by measurement (docs/benchmarks.md): about 256
# query rows keep the matrix products efficient; fewer candidates allow more
# rows up to ~4M logits per block; the block never exceeds ~16M logits (64 MiB
# in float32) however many candidates there are.
MIN_BLOCK_ROWS = 256
TARGET_BLOCK_ELEMENTS = 1 << 22
MAX_BLOCK_ELEMENTS = 1 << 24


def default_block_rows(num_queries: int, num_candidates: int) -> int:
    """Queries per logits block for `num_candidates` candidates per query."""
    candidates = max(1, num_candidates)
    rows = max(MIN_BLOCK_ROWS, TARGET_BLOCK_ELEMENTS // candidates)
    rows = min(rows, MAX_BLOCK_ELEMENTS // candidates)
    return max(1, min(num_queries, rows))


@dataclass(frozen=True)
class MatrixOptions:
    """Settings of the matrix Function.

    Attributes:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        block_rows: queries per logits block.
        positive_in_keys: True when key i is query i's positive (in-batch
            negatives); False when the positive logit is an extra candidate in
            front of the keys (unpaired negatives).
        grads_in_forward: build the gradients during forward (scalar reductions
            with an input that needs a gradient).
    """

    reduction: Reduction
    block_rows: int
    positive_in_keys: bool
    grads_in_forward: bool


@dataclass
class MatrixPass:
    """What one pass over the logits blocks produces."""

    row_loss: Tensor  # (B,) lse - positive logit
    grad_query: Tensor | None = None  # (B, D)
    grad_positive: Tensor | None = None  # (B, D)
    grad_keys: Tensor | None = None  # (N, D)


def matrix_pass(
    scaled_query: Tensor,
    positive_key: Tensor,
    keys: Tensor,
    *,
    positive_in_keys: bool,
    block_rows: int,
    compute_grads: bool,
    key_grads: bool = True,
    row_weight: Tensor | None = None,
) -> MatrixPass:
    """Loss rows and (optionally) gradients of InfoNCE, one block of queries at a time.

    Query i's candidates are ``keys`` (N, D), plus its positive key in front when
    ``positive_in_keys`` is False; its loss is ``logsumexp(candidates) - q_i . p_i``.
    The gradients are those of ``sum_i row_weight[i] * loss_i`` (weight 1 when
    ``row_weight`` is None).

    Args:
        scaled_query: (B, D) queries already divided by the temperature.
        positive_key: (B, D) positive keys.
        keys: (N, D) candidate keys.
        positive_in_keys: key i is query i's positive (requires N == B).
        block_rows: queries per block.
        compute_grads: also return the gradients.
        key_grads: with ``compute_grads``, also the keys' gradient (False skips
            one of the three matrix products, e.g. for a frozen queue of negatives).
        row_weight: (B,) weight of each row's loss in the gradients.

    Returns:
        A MatrixPass with the (B,) row losses and, if asked, the gradients.
    """
    num_queries = scaled_query.shape[0]
    num_keys = keys.shape[0]
    extra = 0 if positive_in_keys else 1  # leading column for a separate positive logit
    positive_logit = torch.sum(scaled_query * positive_key, dim=1)  # (B,)
    lse = torch.empty_like(positive_logit)  # (B,)
    buffer = scaled_query.new_empty(min(block_rows, num_queries), extra + num_keys)
    if compute_grads:
        grad_query = torch.empty_like(scaled_query)  # (B, D)
        grad_keys = torch.zeros_like(keys) if key_grads else None  # (N, D)
        positive_weight = torch.empty_like(positive_logit)  # (B,) weight * P(positive)

    for start in range(0, num_queries, block_rows):
        rows = slice(start, min(start + block_rows, num_queries))
        block = buffer[: rows.stop - start]  # (R, extra + N)
        key_block = block[:, extra:]  # (R, N) view
        if extra:
            block[:, 0] = positive_logit[rows]
        torch.mm(scaled_query[rows], keys.T, out=key_block)
        row_max, argmax = block.max(dim=1)  # (R,), (R,)
        torch.ops.aten._softmax.out(block, 1, False, out=block)  # probabilities, in place
        # P at the row maximum is 1 / sum(exp(logit - max)) >= 1 / (N + 1): no underflow.
        lse[rows] = row_max - block.gather(1, argmax.unsqueeze(1)).squeeze(1).log()
        if compute_grads:
            if row_weight is not None:
                block.mul_(row_weight[rows].unsqueeze(1))
            torch.mm(key_block, keys, out=grad_query[rows])
            if grad_keys is not None:
                grad_keys.addmm_(key_block.T, scaled_query[rows])
            if extra:
                positive_weight[rows] = block[:, 0]

    result = MatrixPass(row_loss=lse - positive_logit)
    if compute_grads:
        weight = (torch.ones_like(positive_logit) if row_weight is None else row_weight).unsqueeze(
            1
        )  # (B, 1)
        if extra:
            # d loss_i / d positive logit = P(positive) - 1
            positive_coef = positive_weight.unsqueeze(1) - weight  # (B, 1)
            result.grad_query = grad_query.add_(positive_key * positive_coef)
            result.grad_positive = scaled_query * positive_coef
        else:
            # The target's -1 on the diagonal: key i pulls query i and vice versa.
            result.grad_query = grad_query.sub_(positive_key * weight)
            result.grad_positive = scaled_query * -weight
        result.grad_keys = grad_keys
    return result


def _reduce(row_loss: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return row_loss.mean()
    if reduction == "sum":
        return row_loss.sum()
    return row_loss


def _row_weight(grad_output: Tensor, reduction: Reduction, num_rows: int) -> Tensor:
    """The upstream gradient as a weight per row: (B,)."""
    if reduction == "none":
        return grad_output
    scale = grad_output / num_rows if reduction == "mean" else grad_output
    return scale.expand(num_rows)


class MatrixInfoNCE(torch.autograd.Function):
    """Autograd Function for in-batch and unpaired negatives; see `matrix_pass`."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        scaled_query: Tensor,
        positive_key: Tensor,
        keys: Tensor,
        options: MatrixOptions,
    ) -> Tensor:
        key_grads = ctx.needs_input_grad[2]  # type: ignore[attr-defined]
        result = matrix_pass(
            scaled_query,
            positive_key,
            keys,
            positive_in_keys=options.positive_in_keys,
            block_rows=options.block_rows,
            compute_grads=options.grads_in_forward,
            key_grads=key_grads,
        )
        ctx.options = options  # type: ignore[attr-defined]
        if options.grads_in_forward:
            grads = (result.grad_query, result.grad_positive, result.grad_keys)
            ctx.save_for_backward(*grads)  # type: ignore[arg-type]  # grad_keys may be None
        else:
            ctx.save_for_backward(scaled_query, positive_key, keys)
        return _reduce(result.row_loss, options.reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        options: MatrixOptions = ctx.options
        if options.grads_in_forward:
            grads = ctx.saved_tensors  # query, positive, keys (None if not needed)
            scale = grad_output / len(grads[0]) if options.reduction == "mean" else grad_output
            return *(None if grad is None else grad * scale for grad in grads), None
        scaled_query, positive_key, keys = ctx.saved_tensors
        result = matrix_pass(
            scaled_query,
            positive_key,
            keys,
            positive_in_keys=options.positive_in_keys,
            block_rows=options.block_rows,
            compute_grads=True,
            key_grads=ctx.needs_input_grad[2],
            row_weight=_row_weight(grad_output, options.reduction, len(scaled_query)),
        )
        return result.grad_query, result.grad_positive, result.grad_keys, None


@dataclass(frozen=True)
class PairedOptions:
    """Settings of the paired Function.

    Attributes:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        normalize_negatives: divide each negative's logit by its norm (the
            negatives arrive unnormalised).
        eps: smallest norm divided by, as in `F.normalize`.
    """

    reduction: Reduction
    normalize_negatives: bool
    eps: float


def paired_logits(
    scaled_query: Tensor, negative_keys: Tensor, normalize_negatives: bool, eps: float
) -> tuple[Tensor, Tensor]:
    """Logits of each query against its own negatives, and the negatives' norms.

    Returns:
        logits (B, M) and norms (B, M) (ones when not normalising).
    """
    dots = torch.bmm(negative_keys, scaled_query.unsqueeze(2)).squeeze(2)  # (B, M)
    if not normalize_negatives:
        return dots, torch.ones_like(dots)
    norms = torch.linalg.vector_norm(negative_keys, dim=2)  # (B, M)
    return dots.div_(norms.clamp_min(eps)), norms


def paired_lse(positive_logit: Tensor, negative_logits: Tensor) -> Tensor:
    """logsumexp over [positive_logit, negative_logits] per row, without concatenating."""
    row_max = positive_logit
    if negative_logits.shape[1]:
        row_max = torch.maximum(positive_logit, negative_logits.amax(dim=1))  # (B,)
    total = torch.exp(positive_logit - row_max)
    total += torch.exp(negative_logits - row_max.unsqueeze(1)).sum(dim=1)
    return row_max + total.log()


class PairedInfoNCE(torch.autograd.Function):
    """Autograd Function for paired negatives (B, M, D).

    Saves the inputs and the (B, M) logits and norms; backward needs no product
    of the forward to be recomputed, so it is exact for any upstream gradient.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        scaled_query: Tensor,
        positive_key: Tensor,
        negative_keys: Tensor,
        options: PairedOptions,
    ) -> Tensor:
        positive_logit = torch.sum(scaled_query * positive_key, dim=1)  # (B,)
        negative_logits, norms = paired_logits(
            scaled_query, negative_keys, options.normalize_negatives, options.eps
        )  # (B, M), (B, M)
        lse = paired_lse(positive_logit, negative_logits)  # (B,)
        ctx.options = options  # type: ignore[attr-defined]
        ctx.save_for_backward(
            scaled_query, positive_key, negative_keys, positive_logit, negative_logits, norms, lse
        )
        return _reduce(lse - positive_logit, options.reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        options: PairedOptions = ctx.options
        query, positive, negatives, positive_logit, logits, norms, lse = ctx.saved_tensors
        weight = _row_weight(grad_output, options.reduction, len(query))  # (B,)
        grad_positive_logit = weight * (torch.exp(positive_logit - lse) - 1)  # (B,)
        grad_logits = weight.unsqueeze(1) * torch.exp(logits - lse.unsqueeze(1))  # (B, M)
        if options.normalize_negatives:
            inverse_norms = norms.clamp_min(options.eps).reciprocal()  # (B, M)
            grad_dots = grad_logits * inverse_norms  # (B, M)
        else:
            grad_dots = grad_logits

        needs_query, needs_positive, needs_negatives, _ = ctx.needs_input_grad
        grad_query = grad_positive = grad_negatives = None
        if needs_query:
            grad_query = torch.baddbmm(
                (grad_positive_logit.unsqueeze(1) * positive).unsqueeze(1),
                grad_dots.unsqueeze(1),
                negatives,
            ).squeeze(1)  # (B, D)
        if needs_positive:
            grad_positive = grad_positive_logit.unsqueeze(1) * query
        if needs_negatives:
            if options.normalize_negatives:
                # d(x / |x|) / dx = (I - x x^T / |x|^2) / |x|; no second term where |x| < eps.
                radial = -(grad_dots * logits * inverse_norms) * (norms > options.eps)  # (B, M)
                grad_negatives = negatives * radial.unsqueeze(2)  # (B, M, D)
            else:
                grad_negatives = torch.zeros_like(negatives)
            grad_negatives.baddbmm_(grad_dots.unsqueeze(2), query.unsqueeze(1))
        return grad_query, grad_positive, grad_negatives, None


def matrix_info_nce(
    scaled_query: Tensor, positive_key: Tensor, keys: Tensor, options: MatrixOptions
) -> Tensor:
    """InfoNCE with in-batch or unpaired negatives through `MatrixInfoNCE`.

    Same as ``F.cross_entropy(logits, targets, reduction=options.reduction)``
    with ``logits = scaled_query @ keys.T`` (in-batch, targets ``arange(B)``) or
    ``cat([(scaled_query * positive_key).sum(1, keepdim=True),
    scaled_query @ keys.T], 1)`` (unpaired, targets 0), without the logits.
    """
    loss = MatrixInfoNCE.apply(scaled_query, positive_key, keys, options)  # type: ignore[no-untyped-call]
    return cast(Tensor, loss)


def paired_info_nce(
    scaled_query: Tensor, positive_key: Tensor, negative_keys: Tensor, options: PairedOptions
) -> Tensor:
    """InfoNCE with paired negatives through `PairedInfoNCE`.

    Same as ``F.cross_entropy(cat([q.p, q_i.n_ij / |n_ij|]), 0)`` on the
    (B, 1 + M) logits (without the division when ``normalize_negatives`` is
    False), where q is ``scaled_query``.
    """
    loss = PairedInfoNCE.apply(scaled_query, positive_key, negative_keys, options)  # type: ignore[no-untyped-call]
    return cast(Tensor, loss)

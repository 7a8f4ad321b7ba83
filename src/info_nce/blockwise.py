"""The exact blockwise engine: InfoNCE without the (B, N) logits matrix.

The engine splits the loss the way its cost splits. The positive logits (what
each query must pick) cost O(B * D) and are plain autograd ops in
`info_nce.functional`; what costs O(B * N * D) is the log-sum-exp of every
query over its candidates, and that is what the Functions here compute:

* `LogSumExp` (in-batch and unpaired candidates): query i's candidates are
  ``extra[i]`` (E logits computed by the caller, e.g. its positive logit or its
  paired negatives) followed by its scores against the N shared ``keys``. The
  queries are walked in blocks of ``block_rows`` rows against all keys; each
  block's logits ``(block_rows, E + N)`` live in one reused buffer and are
  turned into probabilities in place, which feed the two gradient products
  before the next block overwrites them. Peak extra memory is
  ``block_rows * (E + N) + O((B + N) * D)`` instead of several B * N matrices.

  - Scalar reductions, one direction: the gradients are built during the
    forward pass (the upstream gradient is a scalar, so backward only rescales
    them), so forward+backward costs exactly the three matrix products any
    implementation needs.
  - ``reduction='none'``: forward keeps the row statistics only; backward
    recomputes each block weighted by its rows' upstream gradients.
  - Symmetric (CLIP) loss: the first ``column_keys`` keys also get the
    log-sum-exp over all queries (the key-to-query direction). Forward makes one
    pass collecting row and column statistics together; backward makes one
    recomputing pass that combines both directions' probabilities before the
    two gradient products (four matrix products in all: the column statistics
    need every row before any column probability is known).
* `PairedLogits` (paired negatives (B, M, D)): the logits are only (B, M); the
  negatives' normalisation is folded in (dot products scaled by inverse norms)
  instead of writing a normalised copy of the negatives, and backward writes
  the negatives' gradient with one (B, M, D) pass.

The temperature is folded into the queries by the caller: the Functions see
``query / temperature`` and unit keys, and ordinary autograd carries the
gradients through the normalisation and into a tensor temperature.

The math lives in plain functions; the Functions only save, call and scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from info_nce._validation import Reduction, reduce_loss

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


@dataclass
class BlockPass:
    """What one pass over the logits blocks produces."""

    row_lse: Tensor  # (B,)
    column_lse: Tensor | None = None  # (C,), in a statistics pass with columns
    grad_query: Tensor | None = None  # (B, D)
    grad_keys: Tensor | None = None  # (N, D)
    grad_extra: Tensor | None = None  # (B, E)


def block_pass(
    query: Tensor,
    keys: Tensor,
    extra: Tensor | None,
    *,
    block_rows: int,
    column_keys: int = 0,
    compute_grads: bool = False,
    key_grads: bool = True,
    row_weight: Tensor | None = None,
    column_weight: Tensor | float = 1.0,
    column_lse: Tensor | None = None,
) -> BlockPass:
    """Row (and column) log-sum-exp of the logits ``[extra, query @ keys.T]``, block by block.

    Row i's logits are ``extra[i]`` (E values) followed by ``query[i] @ keys.T``
    (N values). Column j < ``column_keys`` is key j's scores against all B
    queries.

    Without ``column_lse`` this is a statistics pass: it returns the row
    log-sum-exp and, if ``column_keys``, the column log-sum-exp. If
    ``compute_grads``, it also returns the gradients of
    ``sum_i row_weight[i] * row_lse[i]`` (weights 1 when None); only valid
    without columns.

    With ``column_lse`` (the result of a statistics pass) it is a gradient pass
    for ``sum_i row_weight[i] * row_lse[i] + sum_j column_weight[j] * column_lse[j]``.

    Args:
        query: (B, D) queries, already divided by the temperature.
        keys: (N, D) keys shared by all queries.
        extra: (B, E) logits of per-query candidates, or None (E = 0).
        block_rows: queries per block.
        column_keys: number C of leading keys that get column statistics.
        compute_grads: return the gradients.
        key_grads: with ``compute_grads``, also the keys' gradient (False skips
            one of the three matrix products, e.g. for a frozen queue of keys).
        row_weight: (B,) weights of the row terms.
        column_weight: (C,) weights of the column terms (gradient pass), or
            one weight for all (relative to rows weighted 1).
        column_lse: (C,) column statistics (gradient pass).

    Returns:
        A BlockPass.
    """
    num_queries, num_keys = len(query), len(keys)
    width = 0 if extra is None else extra.shape[1]
    compute_grads = compute_grads or column_lse is not None
    statistics_columns = column_keys if column_lse is None else 0
    row_lse = query.new_empty(num_queries)  # (B,)
    column_stats = query.new_full((statistics_columns,), float("-inf"))  # (C,)
    buffer = query.new_empty(min(block_rows, num_queries), width + num_keys)
    column_buffer = query.new_empty(0)
    if column_lse is not None and column_keys:
        column_buffer = query.new_empty(len(buffer), column_keys)
    if compute_grads:
        grad_query = torch.empty_like(query)  # (B, D)
        grad_keys = torch.zeros_like(keys) if key_grads else None  # (N, D)
        grad_extra = None if extra is None else query.new_empty(num_queries, width)  # (B, E)

    for start in range(0, num_queries, block_rows):
        rows = slice(start, min(start + block_rows, num_queries))
        block = buffer[: rows.stop - start]  # (R, E + N)
        key_block = block[:, width:]  # (R, N) view
        column_block = key_block[:, :column_keys]  # (R, C) view
        if extra is not None:
            block[:, :width] = extra[rows]
        torch.mm(query[rows], keys.T, out=key_block)
        if statistics_columns:
            column_stats = torch.logaddexp(column_stats, torch.logsumexp(column_block, dim=0))
        if column_lse is not None and column_keys:
            # Key-to-query probabilities, weighted: (R, C)
            column_probs = torch.sub(column_block, column_lse, out=column_buffer[: len(block)])
            column_probs.exp_()
            if not isinstance(column_weight, float) or column_weight != 1.0:
                column_probs.mul_(column_weight)
        row_max, argmax = block.max(dim=1)  # (R,), (R,)
        torch.ops.aten._softmax.out(block, 1, False, out=block)  # probabilities, in place
        # P at the row maximum is 1 / sum(exp(logit - max)) >= 1 / (E + N): no underflow.
        row_lse[rows] = row_max - block.gather(1, argmax.unsqueeze(1)).squeeze(1).log()
        if compute_grads:
            if row_weight is not None:
                block.mul_(row_weight[rows].unsqueeze(1))
            if column_lse is not None and column_keys:
                column_block.add_(column_probs)
            torch.mm(key_block, keys, out=grad_query[rows])
            if grad_keys is not None:
                grad_keys.addmm_(key_block.T, query[rows])
            if grad_extra is not None:
                grad_extra[rows] = block[:, :width]

    result = BlockPass(row_lse=row_lse)
    if statistics_columns:
        result.column_lse = column_stats
    if compute_grads:
        result.grad_query, result.grad_keys, result.grad_extra = grad_query, grad_keys, grad_extra
    return result


@dataclass(frozen=True)
class LogSumExpOptions:
    """Settings of `LogSumExp`.

    The output is ``reduce(row_scale * row_lse + column_scale * column_lse)``
    over the B rows; column j pairs with row j, so ``column_keys`` is 0 or B.

    Attributes:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        block_rows: queries per logits block.
        column_keys: leading keys that get column statistics (0: one direction).
        row_scale: weight of the row log-sum-exp (1, or 1/2 in the symmetric loss).
        column_scale: weight of the column log-sum-exp.
        grads_in_forward: build the gradients during forward (scalar reduction,
            no columns, an input needs a gradient).
    """

    reduction: Reduction
    block_rows: int
    column_keys: int = 0
    row_scale: float = 1.0
    column_scale: float = 0.0
    grads_in_forward: bool = False


def refuse_double_backward(function: str) -> None:
    """Raise if a backward is being differentiated (``create_graph=True``).

    The engine's backward passes are not built from differentiable ops, and
    ``once_differentiable`` only raises when the incoming gradient itself needs
    a gradient, which is not the case for a loss's first derivative: without
    this check a second derivative would silently be wrong.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{function}: the blockwise engine does not support differentiating the loss "
            "twice (create_graph=True / double backward); the dense path does, and is "
            "taken for small problems with chunk_size=None"
        )


class LogSumExp(torch.autograd.Function):
    """Autograd Function: reduced row (and column) log-sum-exp; see `block_pass`."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        query: Tensor,
        keys: Tensor,
        extra: Tensor | None,
        options: LogSumExpOptions,
    ) -> Tensor:
        needs_grad = ctx.needs_input_grad  # type: ignore[attr-defined]
        result = block_pass(
            query,
            keys,
            extra,
            block_rows=options.block_rows,
            column_keys=options.column_keys,
            compute_grads=options.grads_in_forward,
            key_grads=needs_grad[1],
        )
        ctx.options = options  # type: ignore[attr-defined]
        if options.grads_in_forward:
            grads = (result.grad_query, result.grad_keys, result.grad_extra)
            ctx.save_for_backward(*grads)  # type: ignore[arg-type]  # keys', extra's may be None
        else:
            ctx.save_for_backward(query, keys, extra, result.column_lse)  # type: ignore[arg-type]
        output = options.row_scale * result.row_lse  # (B,)
        if result.column_lse is not None:
            output = output + options.column_scale * result.column_lse
        return reduce_loss(output, options.reduction)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        refuse_double_backward("LogSumExp")
        options: LogSumExpOptions = ctx.options
        if options.grads_in_forward:
            grads = ctx.saved_tensors  # query, keys, extra (None where not needed)
            scale = _scalar_scale(grad_output, options, len(grads[0]))
            return *(None if grad is None else grad * scale for grad in grads), None
        query, keys, extra, column_lse = ctx.saved_tensors
        row_weight: Tensor | None = None
        column_weight: Tensor | float
        if options.reduction == "none":
            row_weight = options.row_scale * grad_output  # (B,)
            column_weight = options.column_scale * grad_output  # (B,): column j pairs with row j
        else:
            # Every row weighs alike: weigh the columns relative to the rows and
            # scale the (B, D) gradients once instead of every (R, N) block.
            column_weight = options.column_scale / options.row_scale
        result = block_pass(
            query,
            keys,
            extra,
            block_rows=options.block_rows,
            column_keys=options.column_keys,
            compute_grads=True,
            key_grads=ctx.needs_input_grad[1],
            row_weight=row_weight,
            column_weight=column_weight,
            column_lse=column_lse,
        )
        grads = (result.grad_query, result.grad_keys, result.grad_extra)
        if row_weight is None:
            scale = _scalar_scale(grad_output, options, len(query))
            grads = tuple(None if grad is None else grad.mul_(scale) for grad in grads)
        return *grads, None


def _scalar_scale(grad_output: Tensor, options: LogSumExpOptions, num_rows: int) -> Tensor:
    """The weight of every row's log-sum-exp under a scalar reduction."""
    scale = grad_output * options.row_scale
    return scale / num_rows if options.reduction == "mean" else scale


def log_sum_exp(
    query: Tensor, keys: Tensor, extra: Tensor | None, options: LogSumExpOptions
) -> Tensor:
    """``reduce(row_scale * row_lse + column_scale * column_lse)`` through `LogSumExp`.

    Same as, with ``logits = cat([extra, query @ keys.T], 1)`` (B, E + N):
    ``row_scale * logits.logsumexp(1) + column_scale * logits[:, E:E + C].logsumexp(0)``,
    reduced, without the logits matrix.
    """
    output = LogSumExp.apply(query, keys, extra, options)  # type: ignore[no-untyped-call]
    return cast(Tensor, output)


@dataclass(frozen=True)
class PairedOptions:
    """Settings of `PairedLogits`.

    Attributes:
        normalize_negatives: divide each negative's logit by its norm (the
            negatives arrive unnormalised).
        eps: smallest norm divided by, as in `F.normalize`.
    """

    normalize_negatives: bool
    eps: float


class PairedLogits(torch.autograd.Function):
    """Autograd Function: logits (B, M) of each query against its own negatives (B, M, D).

    ``query[i] . negative_keys[i, j] / max(|negative_keys[i, j]|, eps)`` (no
    division without normalisation), with no (B, M, D) temporary in forward.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, query: Tensor, negative_keys: Tensor, options: PairedOptions
    ) -> Tensor:
        logits = torch.bmm(negative_keys, query.unsqueeze(2)).squeeze(2)  # (B, M) dot products
        norms = None
        if options.normalize_negatives:
            norms = torch.linalg.vector_norm(negative_keys, dim=2)  # (B, M)
            logits.div_(norms.clamp_min(options.eps))
        ctx.options = options  # type: ignore[attr-defined]
        ctx.save_for_backward(query, negative_keys, logits, norms)  # type: ignore[arg-type]
        return logits

    @staticmethod
    def backward(ctx: Any, grad_logits: Tensor) -> tuple[Tensor | None, ...]:
        refuse_double_backward("PairedLogits")
        options: PairedOptions = ctx.options
        query, negatives, logits, norms = ctx.saved_tensors
        grad_dots = grad_logits  # (B, M) gradient of the raw dot products
        if norms is not None:
            inverse_norms = norms.clamp_min(options.eps).reciprocal()  # (B, M)
            grad_dots = grad_logits * inverse_norms
        needs_query, needs_negatives, _ = ctx.needs_input_grad
        grad_query = grad_negatives = None
        if needs_query:
            grad_query = torch.bmm(grad_dots.unsqueeze(1), negatives).squeeze(1)  # (B, D)
        if needs_negatives:
            if norms is not None:
                # d(x / |x|) / dx = (I - x x^T / |x|^2) / |x|; no radial term where |x| < eps.
                radial = -(grad_dots * logits * inverse_norms) * (norms > options.eps)  # (B, M)
                grad_negatives = negatives * radial.unsqueeze(2)  # (B, M, D)
            else:
                grad_negatives = torch.zeros_like(negatives)
            grad_negatives.baddbmm_(grad_dots.unsqueeze(2), query.unsqueeze(1))
        return grad_query, grad_negatives, None


def paired_logits(query: Tensor, negative_keys: Tensor, options: PairedOptions) -> Tensor:
    """(B, M) logits of each query against its own negatives through `PairedLogits`."""
    logits = PairedLogits.apply(query, negative_keys, options)  # type: ignore[no-untyped-call]
    return cast(Tensor, logits)

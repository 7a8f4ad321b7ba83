"""The exact blockwise engine: InfoNCE without the (B, N) logits matrix.

The engine splits the loss the way its cost splits. What costs O(B * N * D) is
each query's log-sum-exp over its candidates, and that is what the Functions
here compute:

* `LogSumExp` (in-batch and unpaired candidates): query i's candidates are
  ``extra[i]`` (E logits computed by the caller, e.g. its positive logit or its
  paired negatives) followed by its logits against the N shared ``keys``. The
  queries are walked in blocks of ``block_rows`` rows against all keys; each
  block's logits ``(block_rows, E + N)`` live in one reused buffer and are
  turned into probabilities in place, which feed the two gradient products
  before the next block overwrites them.

  - It takes the raw queries and keys: L2 normalisation and the temperature
    are per-row and per-column factors applied to each block, and their
    gradients are applied in place to the engine's own (B, D) and (N, D)
    gradient buffers. With in-batch candidates it also subtracts the positive
    logits (query i's target is key ``offset + i``, the block's diagonal) and
    folds their gradient into the same products. So the whole in-batch loss,
    symmetric or not, holds no normalised or scaled copy of its inputs: peak
    extra memory is the two gradients, one logits block and O(B + N).
  - Scalar reductions, one direction: the gradients are built during the
    forward pass (the upstream gradient is a scalar, so backward only rescales
    them), so forward+backward costs exactly the three matrix products any
    implementation needs.
  - ``reduction='none'``: forward keeps the row statistics only; backward
    recomputes each block weighted by its rows' upstream gradients.
  - Symmetric (CLIP) loss: the first ``column_keys`` keys also get the
    log-sum-exp over all queries (the key-to-query direction). Forward makes one
    pass collecting row and column statistics together; backward makes one
    recomputing pass that combines both directions' probabilities, from the
    known statistics and a few columns at a time, before the two gradient
    products (four matrix products in all: the column statistics need every row
    before any column probability is known).
* `PairedLogits` (paired negatives (B, M, D)): the logits are only (B, M); the
  negatives' normalisation is folded in (dot products scaled by inverse norms)
  instead of writing a normalised copy of the negatives, and backward writes
  the negatives' gradient with one (B, M, D) pass.

What the engine does not cover (positives under labels, a positive outside the
keys, paired negatives) the caller computes with O(B * D) autograd ops.

The math lives in plain functions; the Functions only save, call and scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from info_nce._validation import Reduction, reduce_loss

# Rows per logits block, chosen by measurement (docs/benchmarks.md): at least
# 256 query rows, and up to ~4M logits per block. Each block's product with the
# keys repacks all the keys, so small blocks cost time: for 8192 keys of 768
# features, 256-row blocks made the symmetric loss 14% slower than 512-row ones,
# while more rows buy nothing and grow MKL's own buffers (about 27 MiB at 256
# rows, 38 MiB at 512). The block never exceeds ~16M logits (64 MiB in float32)
# however many candidates there are.
MIN_BLOCK_ROWS = 256
TARGET_BLOCK_ELEMENTS = 1 << 22
MAX_BLOCK_ELEMENTS = 1 << 24
# Column work on a block (column sums in the statistics pass, column
# probabilities in the gradient pass) is done this many logits at a time, so
# that it stays in cache and needs no second block-sized buffer.
COLUMN_CHUNK_ELEMENTS = 1 << 18
# Column log-sum-exps taken from the blocks' row probabilities (`_column_lse`)
# are exact to rounding when none is more than this below the largest row
# log-sum-exp; otherwise the column statistics take a pass of their own.
COLUMN_LSE_MARGIN = 50.0


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
    target_logit: Tensor | None = None  # (B,), in a statistics pass with targets
    grad_rows: Tensor | None = None  # (B, D): gradient of the scaled query rows
    grad_keys: Tensor | None = None  # (N, D): gradient of the keys, column scales held fixed
    grad_extra: Tensor | None = None  # (B, E)


def block_pass(
    query: Tensor,
    keys: Tensor,
    extra: Tensor | None,
    *,
    row_scales: Tensor,
    column_scales: Tensor | None,
    block_rows: int,
    column_keys: int = 0,
    target_offset: int | None = None,
    compute_grads: bool = False,
    key_grads: bool = True,
    statistics: BlockPass | None = None,
    row_weight: Tensor | None = None,
    column_weight: Tensor | float = 1.0,
) -> BlockPass:
    """Row (and column) log-sum-exp of the logits ``[extra, x @ y.T]``, block by block.

    The scaled rows are ``x = row_scales[:, None] * query`` and the scaled keys
    ``y = column_scales[:, None] * keys`` (``keys`` if None); neither is
    materialised: each block scales its R query rows and its logits' columns.
    Row i's logits are ``extra[i]`` (E values) followed by ``x[i] @ y.T`` (N
    values). Column j < ``column_keys`` is key j's logits against all B rows.
    With ``target_offset``, row i's target is key ``target_offset + i``.

    Without ``statistics`` this is a statistics pass: it returns the row
    log-sum-exp and, if ``column_keys``, the column log-sum-exp, and with
    ``target_offset`` the target logits. The column statistics come from each
    block's row probabilities (`_column_lse`), or from a pass of their own where
    those would underflow. If ``compute_grads``, it also returns
    the gradients of ``sum_i row_weight[i] * (row_lse[i] - target_logit[i])``
    (weights 1 when None); only valid without columns.

    With ``statistics`` (the result of a statistics pass) it is a gradient pass
    for ``sum_i row_weight[i] * row_lse[i] + sum_j column_weight[j] * column_lse[j]``
    minus, with ``target_offset`` (then 0 if there are columns),
    ``(row_weight[i] + column_weight[i])`` times each target logit. It turns
    the logits into probabilities with the known statistics, and adds the
    column probabilities in chunks of columns, so it needs no second (R, N)
    buffer.

    Args:
        query: (B, D) queries, unscaled.
        keys: (N, D) keys shared by all queries, unscaled.
        extra: (B, E) logits of per-query candidates, or None (E = 0).
        row_scales: (B,) factor of each query row (e.g. 1 / (temperature * norm)).
        column_scales: (N,) factor of each key (e.g. 1 / norm), or None.
        block_rows: queries per block.
        column_keys: number C of leading keys that get column statistics.
        target_offset: row i's target is key ``target_offset + i`` (None: no target).
        compute_grads: return the gradients (always, with ``statistics``).
        key_grads: with gradients, also the keys' gradient (False skips one of
            the three matrix products, e.g. for a frozen queue of keys).
        statistics: a statistics pass's result: makes this a gradient pass.
        row_weight: (B,) weights of the row terms.
        column_weight: (C,) weights of the column terms (gradient pass), or
            one weight for all (relative to rows weighted 1).

    Returns:
        A BlockPass; its gradients are with respect to ``x`` (``grad_rows``),
        ``keys`` with ``column_scales`` held fixed (``grad_keys``) and ``extra``.
    """
    num_queries, num_keys = len(query), len(keys)
    width = 0 if extra is None else extra.shape[1]
    compute_grads = compute_grads or statistics is not None
    row_lse = query.new_empty(num_queries) if statistics is None else statistics.row_lse  # (B,)
    column_stats = None
    if statistics is None and column_keys:
        column_stats = query.new_full((column_keys,), float("-inf"))  # (C,)
    column_lse = None if statistics is None else statistics.column_lse  # (C,)
    target_logit = None
    if target_offset is not None and statistics is None:
        target_logit = query.new_empty(num_queries)  # (B,)
    if compute_grads:
        grad_rows, grad_keys = _gradient_buffers(query, keys if key_grads else None)
        grad_extra = None if extra is None else query.new_empty(num_queries, width)  # (B, E)
    buffer = query.new_empty(min(block_rows, num_queries), width + num_keys)
    chunk = max(1, COLUMN_CHUNK_ELEMENTS // len(buffer))  # key columns per elementwise step
    chunk_columns = 0 if statistics is None else min(chunk, column_keys)
    chunk_buffer = query.new_empty(len(buffer), chunk_columns)  # column probabilities
    chunks = _column_chunks(column_keys, num_keys, chunk)

    for start in range(0, num_queries, block_rows):
        rows = slice(start, min(start + block_rows, num_queries))
        block = buffer[: rows.stop - start]  # (R, E + N)
        key_block = block[:, width:]  # (R, N) view
        if extra is not None:
            block[:, :width] = extra[rows]
        row_block = query[rows] * row_scales[rows].unsqueeze(1)  # (R, D) scaled rows
        torch.mm(row_block, keys.T, out=key_block)
        target_weight: Tensor | float = 1.0 if row_weight is None else row_weight[rows]
        if statistics is None:
            if column_scales is not None:
                key_block.mul_(column_scales)
            if target_logit is not None:
                assert target_offset is not None
                target_logit[rows] = torch.diagonal(key_block, offset=target_offset + start)
            row_max = block.amax(dim=1)  # (R,)
            torch.ops.aten._softmax.out(block, 1, False, out=block)  # probabilities, in place
            # The row's largest probability, at its largest logit, is
            # 1 / sum(exp(logit - max)) >= 1 / (E + N): no underflow.
            row_lse[rows] = row_max - block.amax(dim=1).log()
            if column_stats is not None:
                assert not compute_grads  # _column_lse consumes the probabilities
                block_lse = _column_lse(key_block[:, :column_keys], row_lse[rows], chunk)
                torch.logaddexp(column_stats, block_lse, out=column_stats)
            if not compute_grads:
                continue
            if row_weight is not None:
                block.mul_(row_weight[rows].unsqueeze(1))
            if target_offset is not None:
                torch.diagonal(key_block, offset=target_offset + start).sub_(target_weight)
            if column_scales is not None:
                key_block.mul_(column_scales)
        else:
            # The elementwise work on the (R, N) block is done a cache-sized
            # chunk of columns at a time, so that the block passes through
            # memory once.
            shift = row_lse[rows].unsqueeze(1)  # (R, 1)
            if extra is not None:
                _row_probabilities_(block[:, :width], shift, target_weight)
            for columns in chunks:
                logits = key_block[:, columns]  # (R, chunk) view
                if column_scales is not None:
                    logits.mul_(column_scales[columns])
                column_probs = None
                if columns.stop <= column_keys:  # key-to-query probabilities, weighted
                    assert column_lse is not None
                    out = chunk_buffer[: len(block), : logits.shape[1]]
                    column_probs = torch.sub(logits, column_lse[columns], out=out).exp_()
                    if isinstance(column_weight, Tensor):
                        column_probs.mul_(column_weight[columns])
                    elif column_weight != 1.0:
                        column_probs.mul_(column_weight)
                _row_probabilities_(logits, shift, target_weight)
                if column_probs is not None:
                    logits.add_(column_probs)
                if column_scales is not None:
                    logits.mul_(column_scales[columns])
            if column_keys:
                # Column i pairs with row i: its target logit is also column i's.
                if isinstance(column_weight, Tensor):
                    target_weight = target_weight + column_weight[rows]
                else:
                    target_weight = target_weight + column_weight
            if target_offset is not None:
                targets = slice(target_offset + start, target_offset + rows.stop)
                if column_scales is not None:
                    target_weight = target_weight * column_scales[targets]
                torch.diagonal(key_block, offset=target_offset + start).sub_(target_weight)
        # The block now holds the logits' gradient, times the column scales.
        if grad_extra is not None:
            grad_extra[rows] = block[:, :width]
        if grad_keys is not None:
            grad_keys.addmm_(key_block.T, row_block)
        torch.mm(key_block, keys, out=grad_rows[rows])

    if column_stats is not None and bool(  # one sync per pass
        column_stats.amin() < row_lse.amax() - COLUMN_LSE_MARGIN
    ):
        column_stats = _column_lse_pass(
            query, keys, row_scales, column_scales, column_keys, buffer, chunk
        )
    result = BlockPass(row_lse=row_lse, column_lse=column_stats, target_logit=target_logit)
    if compute_grads:
        result.grad_rows, result.grad_keys, result.grad_extra = grad_rows, grad_keys, grad_extra
    return result


def _column_lse(probabilities: Tensor, row_lse: Tensor, chunk: int) -> Tensor:
    """Each column's log-sum-exp over a block's rows, from the rows' softmax. (C,)

    ``sum_i exp(logit_ij) = sum_i probabilities_ij * exp(row_lse_i)``, shifted
    by the block's largest ``row_lse`` and summed by torch's (cascade) sum, a
    chunk of columns at a time; the probabilities are overwritten. A term
    below about e^-87 of the shift may underflow: with B rows in all, that
    changes a column log-sum-exp within `COLUMN_LSE_MARGIN` of the largest
    row log-sum-exp by less than B * e^-37 relative, nothing at float32
    rounding, which the caller checks once all blocks are in.
    """
    shift = row_lse.amax()
    weights = (row_lse - shift).exp_().unsqueeze(1)  # (R, 1), in (0, 1]
    sums = probabilities.new_empty(probabilities.shape[1])  # (C,)
    for columns in _column_chunks(len(sums), len(sums), chunk):
        torch.sum(probabilities[:, columns].mul_(weights), dim=0, out=sums[columns])
    return sums.log_().add_(shift)


def _column_lse_pass(
    query: Tensor,
    keys: Tensor,
    row_scales: Tensor,
    column_scales: Tensor | None,
    column_keys: int,
    buffer: Tensor,
    chunk: int,
) -> Tensor:
    """Key j's log-sum-exp over all scaled queries (j < ``column_keys``), a pass of its own. (C,)

    The safe way, for when `_column_lse` cannot be trusted (a column far below
    the largest row log-sum-exp): each block's logits against the first
    ``column_keys`` keys are recomputed in ``buffer`` and reduced over the rows a
    chunk of columns at a time.
    """
    column_lse = query.new_full((column_keys,), float("-inf"))  # (C,)
    block_rows = len(buffer)
    flat = buffer.view(-1)
    for start in range(0, len(query), block_rows):
        rows = slice(start, min(start + block_rows, len(query)))
        logits = flat[: (rows.stop - start) * column_keys].view(-1, column_keys)  # (R, C)
        row_block = query[rows] * row_scales[rows].unsqueeze(1)  # (R, D)
        torch.mm(row_block, keys[:column_keys].T, out=logits)
        for columns in _column_chunks(column_keys, column_keys, chunk):
            chunk_logits = logits[:, columns]
            if column_scales is not None:
                chunk_logits.mul_(column_scales[columns])
            chunk_lse = torch.logsumexp(chunk_logits, dim=0)
            column_lse[columns] = torch.logaddexp(column_lse[columns], chunk_lse)
    return column_lse


def _gradient_buffers(query: Tensor, keys: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Uninitialised (B, D) and zeroed (N, D) gradient buffers in one allocation.

    One allocation of the two largest results keeps them off the general heap
    (large blocks are mapped and returned to the system as a whole when freed),
    so a step's peak memory does not depend on how earlier steps left the heap.
    """
    if keys is None:
        return torch.empty_like(query), None
    both = query.new_empty(len(query) + len(keys), query.shape[1])  # (B + N, D)
    grad_keys = both[len(query) :]
    return both[: len(query)], grad_keys.zero_()


def _column_chunks(split: int, num_columns: int, chunk: int) -> list[slice]:
    """Slices of at most ``chunk`` columns: ``[0, split)``, then ``[split, num_columns)``."""
    return [
        slice(a, min(a + chunk, stop))
        for begin, stop in ((0, split), (split, num_columns))
        for a in range(begin, stop, chunk)
    ]


def _row_probabilities_(logits: Tensor, shift: Tensor, weight: Tensor | float) -> Tensor:
    """In place: ``weight * exp(logits - shift)`` for (R, k) logits, (R, 1) shift, (R,) weight."""
    logits.sub_(shift).exp_()
    if isinstance(weight, Tensor):
        logits.mul_(weight.unsqueeze(1))
    return logits


@dataclass(frozen=True)
class LogSumExpOptions:
    """Settings of `LogSumExp`.

    The output is ``reduce(row_scale * row_lse + column_scale * column_lse -
    target_scale * target_logit)`` over the B rows, where ``target_scale`` is
    ``row_scale`` plus, with columns, ``column_scale``. Column j pairs with row
    j, so ``column_keys`` is 0 or B.

    Attributes:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        block_rows: queries per logits block.
        column_keys: leading keys that get column statistics (0: one direction).
        row_scale: weight of the row log-sum-exp (1, or 1/2 in the symmetric loss).
        column_scale: weight of the column log-sum-exp.
        target_offset: row i's positive is key ``target_offset + i``, and its
            logit is subtracted (None: the caller handles the positives).
        normalize: L2-normalise the query rows and the keys (by their norms,
            at least ``eps``).
        eps: smallest norm divided by, as in `F.normalize`.
        temperature: the temperature when no temperature tensor is given.
        grads_in_forward: build the gradients during forward (scalar reduction,
            no columns, an input needs a gradient).
    """

    reduction: Reduction
    block_rows: int
    column_keys: int = 0
    row_scale: float = 1.0
    column_scale: float = 0.0
    target_offset: int | None = None
    normalize: bool = False
    eps: float = 1e-12
    temperature: float = 1.0
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


@dataclass
class _Scales:
    """The factors that turn raw query rows and keys into logits, and the norms behind them."""

    temperature: Tensor | float
    rows: Tensor  # (B,) 1 / (temperature * |q_i|)
    columns: Tensor | None  # (N,) 1 / |k_j|, or None without normalisation
    query_norms: Tensor | None  # (B,) clamped at eps
    key_norms: Tensor | None  # (N,) clamped at eps


def _scales(
    query: Tensor, keys: Tensor, temperature: Tensor | None, options: LogSumExpOptions
) -> _Scales:
    t: Tensor | float = options.temperature if temperature is None else temperature.detach()
    if not options.normalize:
        return _Scales(t, query.new_ones(len(query)).div_(t), None, None, None)
    query_norms = torch.linalg.vector_norm(query, dim=1).clamp_min_(options.eps)  # (B,)
    key_norms = torch.linalg.vector_norm(keys, dim=1).clamp_min_(options.eps)  # (N,)
    row_scales = (query_norms * t).reciprocal_()
    return _Scales(t, row_scales, key_norms.reciprocal(), query_norms, key_norms)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(1)`` for (B, D) tensors, with a product of at most ~1M elements at a time."""
    out = a.new_empty(len(a))  # (B,)
    step = max(1, (1 << 20) // max(1, a.shape[1]))
    for start in range(0, len(a), step):
        rows = slice(start, start + step)
        torch.sum(a[rows] * b[rows], dim=1, out=out[rows])
    return out


def _unit_backward_(grad: Tensor, x: Tensor, norms: Tensor, dot: Tensor, eps: float) -> Tensor:
    """In place: the gradient through ``x / max(|x|, eps)`` from the one at fixed norms.

    ``grad`` is the gradient with the norms held fixed (so already divided by
    them); the norms' own share removes its radial part,
    ``grad - x (x . grad) / |x|^2``, where ``|x| > eps``: rows at the clamp
    have a constant denominator. ``dot`` is ``x . grad`` per row.
    """
    radial = torch.where(norms > eps, dot / norms.square(), 0.0)  # (B,)
    return grad.addcmul_(x, radial.unsqueeze(1), value=-1.0)


def _input_grads(
    query: Tensor,
    keys: Tensor,
    result: BlockPass,
    scales: _Scales,
    options: LogSumExpOptions,
    temperature_grad: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of query, keys and temperature from a pass's, in its buffers.

    The scaled row is ``x_i = q_i s_i`` with ``s_i = 1 / (t |q_i|)``: with
    ``u_i = dL/dx_i``, the gradient at fixed norms is ``s_i u_i``, the norms add
    ``-q_i (q_i . s_i u_i) / |q_i|^2``, and ``dL/dt = -sum_i q_i . s_i u_i / t``.
    The pass gives the keys' gradient at fixed norms; the norms' share is the same.
    """
    grad_query, grad_keys = result.grad_rows, result.grad_keys
    assert grad_query is not None
    grad_query.mul_(scales.rows.unsqueeze(1))
    grad_temperature = None
    if options.normalize or temperature_grad:
        dot = _row_dot(query, grad_query)  # (B,)
        if temperature_grad:
            grad_temperature = -dot.sum() / scales.temperature
        if scales.query_norms is not None:
            _unit_backward_(grad_query, query, scales.query_norms, dot, options.eps)
    if grad_keys is not None and scales.key_norms is not None:
        _unit_backward_(grad_keys, keys, scales.key_norms, _row_dot(keys, grad_keys), options.eps)
    return grad_query, grad_keys, grad_temperature


class LogSumExp(torch.autograd.Function):
    """Autograd Function: the reduced row (and column) log-sum-exp minus the target logits.

    Inputs are the raw query rows and keys: normalisation and temperature are
    applied inside (see `block_pass`) and differentiated in place, so no scaled
    copy of either exists.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        query: Tensor,
        keys: Tensor,
        extra: Tensor | None,
        temperature: Tensor | None,
        options: LogSumExpOptions,
    ) -> Tensor:
        needs_grad = ctx.needs_input_grad  # type: ignore[attr-defined]
        scales = _scales(query, keys, temperature, options)
        scaled_keys, column_scales = keys, scales.columns
        if options.grads_in_forward and column_scales is not None:
            # A scaled copy of the keys saves two passes over every logits block.
            # It never sets the peak here: backward holds the saved gradients
            # and their rescaled copies, (B + N) * D twice. (Elsewhere the peak
            # is the backward pass's, and the copy would only fragment the heap.)
            scaled_keys, column_scales = keys * column_scales.unsqueeze(1), None
        result = block_pass(
            query,
            scaled_keys,
            extra,
            row_scales=scales.rows,
            column_scales=column_scales,
            block_rows=options.block_rows,
            column_keys=options.column_keys,
            target_offset=options.target_offset,
            compute_grads=options.grads_in_forward,
            key_grads=needs_grad[1],
        )
        ctx.options = options  # type: ignore[attr-defined]
        ctx.temperature_shape = None if temperature is None else temperature.shape  # type: ignore[attr-defined]
        if options.grads_in_forward:
            if result.grad_keys is not None and scaled_keys is not keys:
                assert scales.columns is not None  # the scaled copy's gradient, to the keys'
                result.grad_keys.mul_(scales.columns.unsqueeze(1))
            grads = _input_grads(query, keys, result, scales, options, needs_grad[3])
            ctx.save_for_backward(*grads, result.grad_extra)  # type: ignore[arg-type]
        else:
            saved = (query, keys, extra, temperature, result.row_lse, result.column_lse)
            ctx.save_for_backward(*saved)  # type: ignore[arg-type]  # some may be None
        output = options.row_scale * result.row_lse  # (B,)
        if result.column_lse is not None:
            output = output + options.column_scale * result.column_lse
        if result.target_logit is not None:
            output = output - _target_scale(options) * result.target_logit
        return reduce_loss(output, options.reduction)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        refuse_double_backward("LogSumExp")
        options: LogSumExpOptions = ctx.options
        if options.grads_in_forward:
            grad_query, grad_keys, grad_temperature, grad_extra = ctx.saved_tensors
            scale = _scalar_scale(grad_output, options, len(grad_query))
            grads = (grad_query, grad_keys, grad_extra, grad_temperature)
            grad_query, grad_keys, grad_extra, grad_temperature = (
                None if grad is None else grad * scale for grad in grads
            )
            return grad_query, grad_keys, grad_extra, grad_temperature, None
        query, keys, extra, temperature, row_lse, column_lse = ctx.saved_tensors
        row_weight: Tensor | None = None
        column_weight: Tensor | float
        if options.reduction == "none":
            row_weight = options.row_scale * grad_output  # (B,)
            column_weight = options.column_scale * grad_output  # (B,): column j pairs with row j
        else:
            # Every row weighs alike: weigh the columns relative to the rows and
            # scale the gradients once instead of every (R, N) block.
            column_weight = options.column_scale / options.row_scale
        scales = _scales(query, keys, temperature, options)
        result = block_pass(
            query,
            keys,
            extra,
            row_scales=scales.rows,
            column_scales=scales.columns,
            block_rows=options.block_rows,
            column_keys=options.column_keys,
            target_offset=options.target_offset,
            key_grads=ctx.needs_input_grad[1],
            statistics=BlockPass(row_lse=row_lse, column_lse=column_lse),
            row_weight=row_weight,
            column_weight=column_weight,
        )
        grad_query, grad_keys, grad_temperature = _input_grads(
            query, keys, result, scales, options, ctx.needs_input_grad[3]
        )
        grad_extra = result.grad_extra
        if row_weight is None:
            scale = _scalar_scale(grad_output, options, len(query))
            grad_query, grad_keys, grad_extra, grad_temperature = (
                None if grad is None else grad.mul_(scale)
                for grad in (grad_query, grad_keys, grad_extra, grad_temperature)
            )
        if grad_temperature is not None:
            grad_temperature = grad_temperature.reshape(ctx.temperature_shape)
        return grad_query, grad_keys, grad_extra, grad_temperature, None


def _target_scale(options: LogSumExpOptions) -> float:
    """Weight of the target logit: it enters the row term and, with columns, the column term."""
    return options.row_scale + (options.column_scale if options.column_keys else 0.0)


def _scalar_scale(grad_output: Tensor, options: LogSumExpOptions, num_rows: int) -> Tensor:
    """The weight of every row's log-sum-exp under a scalar reduction."""
    scale = grad_output * options.row_scale
    return scale / num_rows if options.reduction == "mean" else scale


def log_sum_exp(
    query: Tensor,
    keys: Tensor,
    extra: Tensor | None,
    temperature: Tensor | None,
    options: LogSumExpOptions,
) -> Tensor:
    """The reduced log-sum-exp over the candidates, minus the targets, through `LogSumExp`.

    Same as, with ``x = unit(query) / t``, ``y = unit(keys)`` (no ``unit``
    without ``normalize``; ``t`` the temperature tensor, or the options' one)
    and ``logits = cat([extra, x @ y.T], 1)`` (B, E + N):
    ``row_scale * logits.logsumexp(1) + column_scale * logits[:, E:E + C].logsumexp(0)
    - target_scale * logits[i, E + target_offset + i]``, reduced, without the
    logits matrix or the normalised copies.
    """
    output = LogSumExp.apply(query, keys, extra, temperature, options)  # type: ignore[no-untyped-call]
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

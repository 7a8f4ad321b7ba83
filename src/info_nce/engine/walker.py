"""The block walker: rows against key segments, one reused block of full rows at a time.

Everything about tiling lives here, nothing about the loss: that is the
objective's (`info_nce.objectives`). A walk covers R rows at a time; the
block holds their logits against all their candidates,

    block = [extra | x @ y_0.T | x @ y_1.T | ...]      (R, E + N_0 + N_1 + ...)

where ``x = row_scales[:, None] * rows`` are the scaled rows, ``y_k =
column_scales_k[:, None] * segment_k`` the scaled keys of segment k (neither
is materialised: each block scales its R rows and its columns), and ``extra``
holds per-row candidates' logits computed by the caller (a query's own
positive, its paired negatives). Each segment's product is written straight
into its column slice of the block; no keys are concatenated.

Index rules instead of masks: row r's target is key ``target_offset + r`` of
segment 0 (in-batch positives) or the first extra column (its own positive),
and its logit is read before any exclusion. Excluded candidates' entries are
-inf: keys of segment 0 on `Diagonal` rules (NT-Xent's self-similarity, the
other views of a sample), the target itself with ``exclude_target`` (the
decoupled and debiased losses score the positive outside the denominator),
and with ``exclude_labels`` every key of segment 0 that shares the row's label
(the only rule that compares: the decoupled loss under labels).

Two passes:

* `statistics_pass`: the objective's row statistics, and for the symmetric
  loss the first ``column_keys`` keys' log-sum-exp over all rows. With
  ``compute_grads`` (scalar reduction, no columns) it also builds the
  gradients then, from the objective's leftovers, so forward+backward costs
  the three matrix products only.
* `gradient_pass`: recomputes each block's logits and, from the saved
  statistics, the objective's gradient plus (symmetric) the key-to-query
  probabilities, a cache-sized chunk of columns at a time.

Gradient products are taken only for what needs them: the rows, each segment
whose ``segment_grads`` flag is set (a frozen segment costs none), the extra;
the rows' own product only with ``row_grads`` (a frozen query tower costs none).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from info_nce.engine import columns as col
from info_nce.objectives.base import RowContext, RowObjective, target_entries

# Rows per logits block, chosen by measurement (docs/benchmarks.md): at least
# 256 rows, and up to ~4M logits per block. Each block's product with the
# keys repacks all the keys, so small blocks cost time: for 8192 keys of 768
# features, 256-row blocks made the symmetric loss 14% slower than 512-row ones,
# while more rows buy nothing and grow MKL's own buffers (about 27 MiB at 256
# rows, 38 MiB at 512). The block never exceeds ~16M logits (64 MiB in float32)
# however many candidates there are.
MIN_BLOCK_ROWS = 256
TARGET_BLOCK_ELEMENTS = 1 << 22
MAX_BLOCK_ELEMENTS = 1 << 24
# The keys' columns start on this boundary of the block's rows. Behind one or
# two extra columns, at an odd offset, the block's matrix products ran about
# 15% slower (nt_xent's debiased loss, B=8192, D=128: 0.3 s of 2.3 s); the
# padding columns in between hold -inf, as padded extra columns do.
KEY_ALIGN_BYTES = 64


def default_block_rows(num_rows: int, num_candidates: int) -> int:
    """Rows per logits block for `num_candidates` candidates per row."""
    candidates = max(1, num_candidates)
    rows = max(MIN_BLOCK_ROWS, TARGET_BLOCK_ELEMENTS // candidates)
    rows = min(rows, MAX_BLOCK_ELEMENTS // candidates)
    return max(1, min(num_rows, rows))


@dataclass(frozen=True)
class Diagonal:
    """An exclusion rule: rows ``start <= r < stop`` exclude key ``key_offset + r`` of segment 0."""

    key_offset: int
    start: int = 0
    stop: int | None = None  # None: up to the last row


@dataclass(frozen=True)
class Layout:
    """The rules of one walk: block size, special columns, column statistics.

    Attributes:
        block_rows: rows per block.
        column_keys: leading keys C of segment 0 that get column statistics
            (the symmetric loss; column j pairs with row j, so C is 0 or B).
        target_offset: row r's target is key ``target_offset + r`` of segment 0.
        target_extra: row r's target is its first extra column.
        exclusions: keys of segment 0 that are no candidate of their rows.
        exclude_target: the target is no candidate either (its logit is still read).
        exclude_labels: (B,) row labels and (N_0,) labels of segment 0: a key
            with the row's label is no candidate.
    """

    block_rows: int
    column_keys: int = 0
    target_offset: int | None = None
    target_extra: bool = False
    exclusions: tuple[Diagonal, ...] = ()
    exclude_target: bool = False
    exclude_labels: tuple[Tensor, Tensor] | None = None

    @property
    def has_target(self) -> bool:
        return self.target_offset is not None or self.target_extra

    def context(
        self, first_row: int, key_start: int, candidates: Tensor | None = None
    ) -> RowContext:
        if self.target_extra:
            return RowContext(first_row, target_start=0, target_step=0, candidates=candidates)
        if self.target_offset is not None:
            start = key_start + self.target_offset
            return RowContext(first_row, target_start=start, candidates=candidates)
        return RowContext(first_row, candidates=candidates)


@dataclass
class BlockPass:
    """What one pass over the blocks produces."""

    row_stat: Tensor  # (B, K) the objective's row statistics (InfoNCE: the row log-sum-exp)
    row_loss: Tensor | None = None  # (B,), in a statistics pass
    column_lse: Tensor | None = None  # (C,), in a statistics pass with columns
    target_logit: Tensor | None = None  # (B,), in a statistics pass with targets
    grad_rows: Tensor | None = None  # (B, D): of the scaled rows (None: not asked, or no segments)
    grad_segments: list[Tensor | None] = field(default_factory=list)  # (N_k, D), fixed scales
    grad_extra: Tensor | None = None  # (B, E)


class _Blocks:
    """The reused block buffer, its column layout and the gradient buffers of one pass."""

    def __init__(
        self,
        rows: Tensor,
        segments: tuple[Tensor, ...],
        extra: Tensor | None,
        layout: Layout,
        *,
        grads: bool,
        segment_grads: tuple[bool, ...] | None,
        row_grads: bool,
        candidates: bool = False,
    ) -> None:
        self.rows, self.segments, self.extra, self.layout = rows, segments, extra, layout
        self.width = 0 if extra is None else extra.shape[1]
        align = max(1, KEY_ALIGN_BYTES // rows.element_size())
        start = -(-self.width // align) * align if segments else self.width
        self.key_start = start  # the first key column; -inf padding from `width` on
        self.bounds: list[slice] = []  # each segment's columns in the block
        for keys in segments:
            self.bounds.append(slice(start, start + len(keys)))
            start += len(keys)
        self.buffer = rows.new_empty(min(layout.block_rows, len(rows)), start)
        # Key columns per elementwise step of the column work.
        self.chunk = max(1, col.COLUMN_CHUNK_ELEMENTS // max(1, len(self.buffer)))
        if segment_grads is None:
            segment_grads = (True,) * len(segments)
        self.grad_rows: Tensor | None = None
        self.grad_segments: list[Tensor | None] = [None] * len(segments)
        self.grad_extra: Tensor | None = None
        if grads:
            wanted = [k for k, flag in zip(segments, segment_grads, strict=True) if flag]
            grad_rows, grad_keys = _gradient_buffers(rows, wanted, row_grads and bool(segments))
            self.grad_rows = grad_rows
            it = iter(grad_keys)
            self.grad_segments = [next(it) if flag else None for flag in segment_grads]
            if extra is not None:
                self.grad_extra = rows.new_empty(len(rows), self.width)  # (B, E)
        self.candidates = self._count_candidates() if candidates else None  # (B,)

    def _count_candidates(self) -> Tensor:
        """Each row's number of candidates, from the rules (no pass over the logits)."""
        layout = self.layout
        assert layout.exclude_labels is None, "candidates are counted without label rules"
        total = self.width + sum(len(keys) for keys in self.segments)
        counts = self.rows.new_full((len(self.rows),), float(total))  # (B,)
        if self.extra is not None:
            counts -= torch.isneginf(self.extra).sum(dim=1)  # padding
        for rule in layout.exclusions:
            counts[rule.start : rule.stop] -= 1
        if layout.exclude_target and layout.has_target:
            counts -= 1
        return counts

    def context(self, span: slice) -> RowContext:
        candidates = None if self.candidates is None else self.candidates[span]
        return self.layout.context(span.start, self.key_start, candidates)

    def spans(self) -> list[slice]:
        """The blocks' row ranges."""
        step, total = self.layout.block_rows, len(self.rows)
        return [slice(a, min(a + step, total)) for a in range(0, total, step)]

    def logits(self, span: slice, row_scales: Tensor) -> tuple[Tensor, Tensor]:
        """The block's (R, W) products, before column scales, and its (R, D) scaled rows."""
        block = self.buffer[: span.stop - span.start]
        if self.extra is not None:
            block[:, : self.width] = self.extra[span]
            block[:, self.width : self.key_start] = float("-inf")
        row_block = self.rows[span] * row_scales[span].unsqueeze(1)  # (R, D)
        for keys, columns in zip(self.segments, self.bounds, strict=True):
            torch.mm(row_block, keys.T, out=block[:, columns])
        return block, row_block

    def scale_columns_(self, block: Tensor, column_scales: list[Tensor | None]) -> None:
        """In place: each segment's columns of the block times its column scales."""
        for scales, columns in zip(column_scales, self.bounds, strict=True):
            if scales is not None:
                block[:, columns].mul_(scales)

    def exclude_(self, piece: Tensor, span: slice, first_key: int) -> None:
        """Set the excluded entries of a slice of segment 0 (keys from ``first_key``) to -inf."""
        layout = self.layout
        for rule in layout.exclusions:
            start = max(span.start, rule.start)
            stop = span.stop if rule.stop is None else min(span.stop, rule.stop)
            if start < stop:
                rows = piece[start - span.start : stop - span.start]
                diagonal = rule.key_offset + start - first_key
                torch.diagonal(rows, offset=diagonal).fill_(float("-inf"))
        if layout.exclude_target and layout.target_offset is not None:
            offset = layout.target_offset + span.start - first_key
            torch.diagonal(piece, offset=offset).fill_(float("-inf"))
        if layout.exclude_labels is not None:
            row_labels, key_labels = layout.exclude_labels
            keys = key_labels[first_key : first_key + piece.shape[1]]
            piece.masked_fill_(row_labels[span].unsqueeze(1) == keys, float("-inf"))

    def exclude_extra_(self, piece: Tensor) -> None:
        """Set the excluded entries of the extra columns to -inf: the target, if excluded."""
        if self.layout.exclude_target and self.layout.target_extra:
            piece[:, 0] = float("-inf")

    def gradient_products(self, block: Tensor, row_block: Tensor, span: slice) -> None:
        """The block holds d loss / d logits times the column scales: accumulate the gradients."""
        if self.grad_extra is not None:
            self.grad_extra[span] = block[:, : self.width]
        for k, (keys, columns) in enumerate(zip(self.segments, self.bounds, strict=True)):
            piece = block[:, columns]  # (R, N_k)
            grad_keys = self.grad_segments[k]
            if grad_keys is not None:
                grad_keys.addmm_(piece.T, row_block)
            if self.grad_rows is None:
                continue
            if k == 0:
                torch.mm(piece, keys, out=self.grad_rows[span])
            else:
                self.grad_rows[span].addmm_(piece, keys)

    def result(self, row_stat: Tensor) -> BlockPass:
        return BlockPass(
            row_stat=row_stat,
            grad_rows=self.grad_rows,
            grad_segments=self.grad_segments,
            grad_extra=self.grad_extra,
        )


def statistics_pass(
    rows: Tensor,
    segments: tuple[Tensor, ...],
    extra: Tensor | None,
    objective: RowObjective,
    layout: Layout,
    *,
    row_scales: Tensor,
    column_scales: list[Tensor | None],
    compute_grads: bool = False,
    segment_grads: tuple[bool, ...] | None = None,
    row_grads: bool = True,
) -> BlockPass:
    """Row statistics and loss of every block (and column statistics), in one pass.

    With ``compute_grads`` it also returns the gradients of the summed row
    loss (only without column statistics, which need all rows first).

    Args:
        rows: (B, D) rows, unscaled.
        segments: key segments (N_k, D), unscaled, shared by all rows.
        extra: (B, E) logits of per-row candidates, or None.
        objective: the loss of each row's logits.
        layout: block size, targets, exclusions and column statistics.
        row_scales: (B,) factor of each row (e.g. 1 / (temperature * norm)).
        column_scales: per segment, (N_k,) factors of its keys (e.g. 1 / norm) or None.
        compute_grads: also build the gradients.
        segment_grads: per segment, whether it gets a gradient (default: all).
        row_grads: whether the rows get a gradient.

    Returns:
        A BlockPass; its gradients are with respect to the scaled rows, the
        segments with their column scales held fixed, and the extra logits.
    """
    assert not (compute_grads and layout.column_keys), "columns need every row first"
    blocks = _Blocks(
        rows,
        segments,
        extra,
        layout,
        grads=compute_grads,
        segment_grads=segment_grads,
        row_grads=row_grads,
        candidates=objective.needs_candidates,
    )
    num_rows = len(rows)
    row_stat = rows.new_empty(num_rows, objective.num_stats)  # (B, K)
    row_loss = rows.new_empty(num_rows)  # (B,)
    target_logit = rows.new_empty(num_rows) if layout.has_target else None  # (B,)
    column_keys = layout.column_keys
    column_stats = rows.new_full((column_keys,), float("-inf")) if column_keys else None  # (C,)
    chunk = blocks.chunk

    for span in blocks.spans():
        block, row_block = blocks.logits(span, row_scales)
        blocks.scale_columns_(block, column_scales)
        context = blocks.context(span)
        targets = None
        if target_logit is not None:
            targets = target_logit[span]
            targets.copy_(target_entries(block, context, 0)[0])
        blocks.exclude_extra_(block[:, : blocks.width])
        if segments:
            blocks.exclude_(block[:, blocks.bounds[0]], span, 0)
        row_loss[span] = objective.forward_(block, context, row_stat[span], targets)
        if column_stats is not None:
            probabilities = block[:, blocks.bounds[0]][:, :column_keys]  # (R, C)
            block_lse = col.column_lse(probabilities, row_stat[span, 0], chunk)
            torch.logaddexp(column_stats, block_lse, out=column_stats)
        if not compute_grads:
            continue
        objective.gradient_from_forward_(block, context, row_stat[span], 1.0)
        blocks.scale_columns_(block, column_scales)
        blocks.gradient_products(block, row_block, span)

    if column_stats is not None and col.needs_separate_pass(column_stats, row_stat[:, 0]):
        column_stats = col.column_lse_pass(
            rows, segments[0], row_scales, column_scales[0], column_keys, blocks.buffer, chunk
        )
    result = blocks.result(row_stat)
    result.row_loss, result.column_lse, result.target_logit = row_loss, column_stats, target_logit
    return result


def gradient_pass(
    rows: Tensor,
    segments: tuple[Tensor, ...],
    extra: Tensor | None,
    objective: RowObjective,
    layout: Layout,
    statistics: BlockPass,
    *,
    row_scales: Tensor,
    column_scales: list[Tensor | None],
    row_weight: Tensor | None = None,
    column_weight: Tensor | float = 1.0,
    segment_grads: tuple[bool, ...] | None = None,
    row_grads: bool = True,
) -> BlockPass:
    """Gradients of ``sum_i row_weight[i] * row_loss[i] + sum_j column_weight[j] * column_term[j]``.

    The column term (with ``layout.column_keys``) is key j's log-sum-exp over
    all rows, minus its target logit when the rows have targets (the same
    diagonal). Each block's logits are recomputed and turned into gradients
    from the saved statistics, a cache-sized chunk of columns at a time, so
    the pass needs no second (R, N) buffer.

    Args: as `statistics_pass`, plus
        statistics: the statistics pass's result.
        row_weight: (B,) weights of the row losses (None: 1).
        column_weight: (C,) weights of the column terms, or one for all.
    """
    blocks = _Blocks(
        rows, segments, extra, layout, grads=True, segment_grads=segment_grads, row_grads=row_grads
    )
    column_keys = layout.column_keys
    column_lse = statistics.column_lse
    chunk = blocks.chunk
    # (segment, first key, columns in the block) of each chunk; segment 0 is
    # split after its column keys.
    chunks: list[tuple[int, int, slice]] = []
    for k, columns in enumerate(blocks.bounds):
        split = column_keys if k == 0 else 0
        for keys in col.column_chunks(split, columns.stop - columns.start, chunk):
            chunks.append(
                (k, keys.start, slice(columns.start + keys.start, columns.start + keys.stop))
            )
    chunk_buffer = rows.new_empty(len(blocks.buffer), min(chunk, column_keys))

    for span in blocks.spans():
        block, row_block = blocks.logits(span, row_scales)
        context = blocks.context(span)
        stats = statistics.row_stat[span]  # (R, K)
        weight: Tensor | float = 1.0 if row_weight is None else row_weight[span].unsqueeze(1)
        if extra is not None:
            extra_block = block[:, : blocks.width]
            blocks.exclude_extra_(extra_block)
            objective.gradient_(extra_block, context, 0, stats, weight)
        for k, first_key, columns in chunks:
            logits = block[:, columns]  # (R, chunk) view
            scales = column_scales[k]
            if scales is not None:
                logits.mul_(scales[first_key : first_key + logits.shape[1]])
            if k == 0:
                blocks.exclude_(logits, span, first_key)
            column_probs = None
            if k == 0 and first_key < column_keys:  # key-to-query probabilities, weighted
                assert column_lse is not None
                keys = slice(first_key, first_key + logits.shape[1])
                out = chunk_buffer[: len(block), : logits.shape[1]]
                column_probs = torch.sub(logits, column_lse[keys], out=out).exp_()
                if isinstance(column_weight, Tensor):
                    column_probs.mul_(column_weight[keys])
                elif column_weight != 1.0:
                    column_probs.mul_(column_weight)
            objective.gradient_(logits, context, columns.start, stats, weight)
            if column_probs is not None:
                logits.add_(column_probs)
            if scales is not None:
                logits.mul_(scales[first_key : first_key + logits.shape[1]])
        if column_keys and layout.target_offset is not None:
            # Key j's target is row j: the rows' own target diagonal.
            _subtract_column_targets_(block, blocks, span, column_weight, column_scales[0])
        blocks.gradient_products(block, row_block, span)
    return blocks.result(statistics.row_stat)


def _subtract_column_targets_(
    block: Tensor,
    blocks: _Blocks,
    span: slice,
    column_weight: Tensor | float,
    scales: Tensor | None,
) -> None:
    """In place: ``-column_weight[j] * scale_j`` at each column's target (row j, key offset + j)."""
    offset = blocks.layout.target_offset
    assert offset is not None
    keys = slice(offset + span.start, offset + span.stop)
    weight: Tensor | float = (
        column_weight[span] if isinstance(column_weight, Tensor) else column_weight
    )
    if scales is not None:
        weight = weight * scales[keys]
    segment = block[:, blocks.bounds[0]]
    torch.diagonal(segment, offset=offset + span.start).sub_(weight)


def _gradient_buffers(
    rows: Tensor, segments: list[Tensor], rows_need_buffer: bool
) -> tuple[Tensor | None, list[Tensor]]:
    """Uninitialised (B, D) and zeroed (N_k, D) gradient buffers in one allocation.

    One allocation of the largest results keeps them off the general heap
    (large blocks are mapped and returned to the system as a whole when freed),
    so a step's peak memory does not depend on how earlier steps left the heap.
    Without ``rows_need_buffer`` the rows' gradient is None.
    """
    num_rows = len(rows) if rows_need_buffer else 0
    total = num_rows + sum(len(keys) for keys in segments)
    both = rows.new_empty(total, rows.shape[1])  # (B + sum N_k, D)
    grads, start = [], num_rows
    for keys in segments:
        grads.append(both[start : start + len(keys)].zero_())
        start += len(keys)
    return (both[:num_rows] if rows_need_buffer else None), grads

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

A walk may have partner rows (row r's partner: query r's positive key) that
some segments are scored against instead of the rows: a block row is then
pair r's row in several directions, one softmax (the joint partition), and
each product and gradient product takes the rows its segment is scored
against.

Index rules instead of masks: row r's target is key ``target_offset + r`` of
segment 0 (in-batch positives) or the first extra column (its own positive),
and its logit is read before any exclusion. Excluded candidates' entries are
-inf: keys on `Diagonal` rules (NT-Xent's self-similarity, the other views of
a sample; with a width, each query's band of own shared negatives), the
target itself with ``exclude_target`` (the decoupled and debiased losses
score the positive outside the denominator), keys a segment's mask marks
(padding shared negatives), with a `LabelRule` every key of a labelled
segment that shares the row's label (the decoupled loss under labels), and
with a `GuideRule` every key a guide finds too similar to the row's anchor
(its similarities computed beside the logits, a chunk at a time). Raised
segments' logits (hardness weighting) are multiplied by a factor before the
exclusions, the target's excepted.

Two passes:

* `statistics_pass`: the objective's row statistics, and for the symmetric
  loss the first ``column_keys`` keys' log-sum-exp over all rows. With
  ``compute_grads`` (scalar reduction, no columns) it also builds the
  gradients then (the objective's ``forward_with_gradient_``), so
  forward+backward costs the three matrix products only.
* `gradient_pass`: recomputes each block's logits and, from the saved
  statistics, the objective's gradient plus (symmetric) the key-to-query
  probabilities, a cache-sized chunk of columns at a time.

Long rows are walked as `MIN_BLOCK_ROWS` rows against column tiles of the
keys, for objectives that allow it (``tileable``; `default_block_shape`
decides): where the keys need no gradient (a queue) and the target is no key,
`_online_pass` builds statistics, loss and gradients in one pass with the
online softmax; otherwise the statistics pass accumulates each row's
log-sum-exp tile by tile and the gradient pass recomputes each tile's logits
(the logits once more, so only for rows too long for blocks of complete
rows).

Gradient products are taken only for what needs them: the rows, each segment
whose ``segment_grads`` flag is set (a frozen segment costs none), the extra;
the rows' own product only with ``row_grads`` (a frozen query tower costs none).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from info_nce._backend import kernels_for
from info_nce.engine import columns as col
from info_nce.objectives.base import (
    ColumnSoftmax,
    RowContext,
    RowObjective,
    TargetLabels,
    target_entries,
)

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
# Rows so long that a block of complete rows holds fewer rows than this are
# split into column tiles instead (objectives that allow it), even where keys
# need gradients and tiles cost the logits once more: each block's products
# repack every key. Tiles / complete rows, keys with gradient, B=1024: 1.065 at
# 255 rows per block, 1.005 at 127, 0.884 at 63 (benchmarks/tiles.py,
# docs/benchmarks.md). A queue's keys are tiled sooner (`default_block_shape`).
MIN_TILED_ROWS = 64


# On an accelerator (CUDA and the like) a block of a few million logits
# leaves the device idle between kernel launches: blocks there are this many
# times larger (target 32M logits, at most 128M: 512 MiB in float32) and
# hold this many times more rows. Starting values, not yet measured on a GPU
# (`benchmarks/gpu.py` measures them where one is available).
ACCELERATOR_BLOCK_SCALE = 8
ACCELERATOR_ROW_SCALE = 4
# A block's float32 logits take at most this share of the device's free
# memory when the walk starts (the walk keeps about two block-sized buffers
# and the gradient products' workspaces): a GPU shared with a large model
# gets smaller blocks rather than an out-of-memory error.
FREE_MEMORY_SHARE = 1 / 8


@dataclass(frozen=True)
class BlockLimits:
    """The block sizes of a device: rows per block at least, logits per block."""

    min_rows: int
    target_elements: int
    max_elements: int

    @staticmethod
    def of(device: torch.device) -> BlockLimits:
        """The CPU's limits, or an accelerator's: scaled up, within its free memory."""
        if device.type == "cpu":
            return BlockLimits(MIN_BLOCK_ROWS, TARGET_BLOCK_ELEMENTS, MAX_BLOCK_ELEMENTS)
        max_elements = MAX_BLOCK_ELEMENTS * ACCELERATOR_BLOCK_SCALE
        free = free_bytes(device)
        if free is not None:  # float32 logits: 4 bytes each
            max_elements = max(
                TARGET_BLOCK_ELEMENTS, min(max_elements, int(free * FREE_MEMORY_SHARE) // 4)
            )
        return BlockLimits(
            MIN_BLOCK_ROWS * ACCELERATOR_ROW_SCALE,
            min(TARGET_BLOCK_ELEMENTS * ACCELERATOR_BLOCK_SCALE, max_elements),
            max_elements,
        )


def free_bytes(device: torch.device) -> int | None:
    """The free memory of a CUDA device (None elsewhere, or without CUDA)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


_CPU = torch.device("cpu")


def default_block_rows(
    num_rows: int, num_candidates: int, device: torch.device = _CPU, scale: int = 1
) -> int:
    """Rows per logits block for `num_candidates` candidates per row on ``device``.

    ``scale``: the objective's ``block_scale``, a multiple of the target logits.
    """
    limits = BlockLimits.of(device)
    candidates = max(1, num_candidates)
    rows = max(limits.min_rows, scale * limits.target_elements // candidates)
    rows = min(rows, limits.max_elements // candidates)
    return max(1, min(num_rows, rows))


def default_block_shape(
    num_rows: int,
    num_candidates: int,
    *,
    tileable: bool,
    frozen_keys: bool = False,
    device: torch.device = _CPU,
    scale: int = 1,
) -> tuple[int, int | None]:
    """Rows per block and columns per tile (None: complete rows) for a walk on ``device``.

    A walk that may be tiled (``tileable``: the objective allows it, no
    column statistics) takes the device's minimum rows (`MIN_BLOCK_ROWS` on
    the CPU) against tiles of about its target logits
    (`TARGET_BLOCK_ELEMENTS`) when its rows are longer than a tile and
    either its keys need no gradient and its target is no key
    (``frozen_keys``: a queue; then `_online_pass` builds the gradients in
    the one pass, with the products of complete rows), or complete rows
    would leave fewer than `MIN_TILED_ROWS` rows per block. Otherwise blocks
    of complete rows, ``scale`` times the target logits (the objective's
    ``block_scale``), at most `MAX_BLOCK_ELEMENTS`. Accelerators take larger
    blocks (`BlockLimits`).
    """
    limits = BlockLimits.of(device)
    rows = default_block_rows(num_rows, num_candidates, device, scale)
    tile_rows = max(1, min(num_rows, limits.min_rows))
    tile = max(1, limits.target_elements // tile_rows)
    if tileable and (
        (frozen_keys and num_candidates > 2 * tile) or rows < min(num_rows, MIN_TILED_ROWS)
    ):
        return tile_rows, tile
    return rows, None


@dataclass(frozen=True)
class Diagonal:
    """An exclusion rule: rows ``start <= r < stop`` exclude keys of one segment.

    Row r excludes the ``width`` keys from ``key_offset + r * width`` of
    segment ``segment``: a diagonal (width 1: NT-Xent's self-similarity) or
    a band (each query's own M shared negatives).
    """

    key_offset: int
    start: int = 0
    stop: int | None = None  # None: up to the last row
    segment: int = 0
    width: int = 1


@dataclass(frozen=True)
class LabelRule:
    """An exclusion rule: a key whose label equals its row's is no candidate of it.

    ``rows`` are the (B,) row labels; ``segments[k]`` the (N_k,) labels of
    segment k, or None for a segment without the rule (missing at the end:
    None too).
    """

    rows: Tensor
    segments: tuple[Tensor | None, ...]

    def keys(self, segment: int) -> Tensor | None:
        return self.segments[segment] if segment < len(self.segments) else None


@dataclass(frozen=True)
class GuideRule:
    """An exclusion rule: a key too similar to its row's anchor, by a guide, is no candidate.

    Row r's anchor (its own guide embedding, or its partner's for the
    partner segments) is compared with a key's guide embedding by dot
    product (unit vectors: the cosine); a key above ``threshold[r]`` is
    removed, except the key of each segment's protected diagonal (row r's
    positive, key ``protected[k] + r``). The comparison runs beside each
    block's logits, a chunk of columns at a time: no similarity matrix is kept.
    """

    rows: Tensor  # (B, G) the rows' guide embeddings, unit
    partner: Tensor | None  # (B, G) the partner rows', unit
    keys: tuple[Tensor | None, ...]  # per segment (N_k, G), unit; None: no filter
    threshold: Tensor  # (B,)
    protected: tuple[int | None, ...]  # per segment: the never-removed diagonal's key offset

    def tensors(self) -> list[Tensor]:
        """The rule's tensors, flat (`from_tensors` rebuilds the rule from them)."""
        found = [self.rows, self.threshold]
        found += [] if self.partner is None else [self.partner]
        return found + [keys for keys in self.keys if keys is not None]

    def structure(self) -> tuple[bool, tuple[bool, ...], tuple[int | None, ...]]:
        """What `from_tensors` needs besides the tensors: plain values."""
        present = tuple(keys is not None for keys in self.keys)
        return self.partner is not None, present, self.protected

    @staticmethod
    def from_tensors(
        structure: tuple[bool, tuple[bool, ...], tuple[int | None, ...]], tensors: list[Tensor]
    ) -> GuideRule:
        has_partner, present, protected = structure
        found = iter(tensors)
        rows, threshold = next(found), next(found)
        partner = next(found) if has_partner else None
        keys = tuple(next(found) if flag else None for flag in present)
        return GuideRule(rows, partner, keys, threshold, protected)


@dataclass(frozen=True)
class Layout:
    """The rules of one walk: block size, special columns, column statistics.

    Attributes:
        block_rows: rows per block.
        tile_columns: columns per tile, counted from the first key (None: a
            block holds complete rows). Only for objectives that allow it
            (``tileable``) and without column statistics.
        column_keys: leading keys C of segment 0 that get column statistics
            (the symmetric loss; column j pairs with row j, so C is 0 or B).
        target_offset: row r's target is key ``target_offset + r`` of segment 0.
        target_extra: row r's target is its first extra column.
        exclusions: keys that are no candidate of their rows (`Diagonal` rules).
        exclude_target: the target is no candidate either (its logit is still read).
        exclude_labels: keys with the row's label are no candidate.
        valid_keys: per segment, None or (N_k,) bool: False marks a key that
            is no candidate of any row (padding among shared negatives).
        raised_segments: segments whose logits (all but the target) the
            passes multiply by their ``raise_factor`` (hardness weighting:
            ``s / t + alpha * s`` is ``(1 + alpha * t) * s / t``, and the
            gradient with respect to ``s / t`` is the softmax of the raised
            logits, as the added term takes none).
        guide: keys too similar to their row's anchor by a guide are no
            candidates (`GuideRule`: guided false-negative filtering).
        target_labels: row r's targets are the keys of segment 0 whose
            label (``segments[0]``) is its own (``rows``), instead of one key
            or column: objectives that score each logit alone (the sigmoid
            loss) read them from the context, with no (B, N) mask.
        logit_bias: added to every logit by an objective that has a bias
            (``bias_stat``; the sigmoid loss), a float or a 0-dim tensor.
        partner_segments: segments whose keys are scored against the rows'
            partners (a second row set, row r's partner pairs with row r)
            instead of the rows: one row of the block is then a pair's row
            in several directions (query to key, key to query), whose
            softmax is one, the joint partition. The other segments take
            the rows.
        product_dtype: the dtype of the matrix products (autocast's; None:
            the rows'). Their operands are rounded to it once (the keys per
            walk, the scaled rows per block, d loss / d logits per piece);
            logits, statistics and gradients stay in the rows' dtype.
    """

    block_rows: int
    tile_columns: int | None = None
    column_keys: int = 0
    target_offset: int | None = None
    target_extra: bool = False
    exclusions: tuple[Diagonal, ...] = ()
    exclude_target: bool = False
    exclude_labels: LabelRule | None = None
    product_dtype: torch.dtype | None = None
    valid_keys: tuple[Tensor | None, ...] = ()
    raised_segments: tuple[int, ...] = ()
    partner_segments: tuple[int, ...] = ()
    guide: GuideRule | None = None
    target_labels: LabelRule | None = None
    logit_bias: Tensor | float = 0.0

    def key_mask(self, segment: int) -> Tensor | None:
        """(N_k,) bool, False for the keys of ``segment`` that are no candidate of any row."""
        return self.valid_keys[segment] if segment < len(self.valid_keys) else None

    @property
    def has_target(self) -> bool:
        return self.target_offset is not None or self.target_extra

    def context(self, rows: slice, key_start: int, candidates: Tensor | None = None) -> RowContext:
        """The context of a block of ``rows`` whose first key column is ``key_start``."""
        first_row, bias = rows.start, self.logit_bias
        if self.target_extra:
            return RowContext(first_row, 0, 0, candidates, logit_bias=bias)
        if self.target_offset is not None:
            start = key_start + self.target_offset
            return RowContext(first_row, start, 1, candidates, logit_bias=bias)
        labels = None
        if self.target_labels is not None:
            rule = self.target_labels
            keys = rule.keys(0)
            assert keys is not None
            labels = TargetLabels(rule.rows[rows], keys, key_start)
        return RowContext(first_row, candidates=candidates, target_labels=labels, logit_bias=bias)


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
    grad_partner: Tensor | None = None  # (B, D): of the scaled partner rows


@dataclass(frozen=True)
class RowBlock:
    """A block's scaled rows, and their partners' where a walk has partner rows."""

    rows: Tensor  # (R, D)
    partner: Tensor | None = None  # (R, D)

    def of(self, segment: int, layout: Layout) -> Tensor:
        """The rows that segment ``segment``'s keys are scored against."""
        if segment in layout.partner_segments:
            assert self.partner is not None
            return self.partner
        return self.rows


@dataclass(frozen=True)
class _Piece:
    """The keys of one segment that fall in a tile."""

    segment: int
    keys: slice  # rows of the segment
    columns: slice  # columns of the tile's block


@dataclass(frozen=True)
class _Tile:
    """A range of columns of a complete row, and the segments' keys in it."""

    columns: slice
    pieces: tuple[_Piece, ...]
    has_extra: bool  # the first tile: the extra and padding columns too


class _Blocks:
    """The reused block buffer, its column layout and the gradient buffers of one pass.

    Columns are counted as in a complete row ``[extra | padding | segment 0 |
    segment 1 | ...]``. A tile is a range of them (one tile of all of them
    unless ``layout.tile_columns``), and a block is a range of rows against
    one tile.
    """

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
        partner: Tensor | None = None,
        partner_grads: bool = False,
    ) -> None:
        self.rows, self.segments, self.extra, self.layout = rows, segments, extra, layout
        self.partner = partner
        assert (partner is None) == (not layout.partner_segments), "partner rows, partner keys"
        self.width = 0 if extra is None else extra.shape[1]
        align = max(1, KEY_ALIGN_BYTES // rows.element_size())
        start = -(-self.width // align) * align if segments else self.width
        self.key_start = start  # the first key column; -inf padding from `width` on
        self.bounds: list[slice] = []  # each segment's columns in a complete row
        for keys in segments:
            self.bounds.append(slice(start, start + len(keys)))
            start += len(keys)
        self.tiles = [
            self._tile(columns)
            for columns in _tile_columns(self.key_start, start, layout.tile_columns)
        ]
        width = self.tiles[0].columns.stop  # the first tile is the widest
        self.buffer = rows.new_empty(min(layout.block_rows, len(rows)), width)
        dtype = layout.product_dtype
        self.product_dtype = None if dtype is None or dtype == rows.dtype else dtype
        # The keys as the products take them, and the block's products before
        # they are widened into the block (only with a product dtype).
        self.product_keys = segments
        self.staging: Tensor | None = None
        if self.product_dtype is not None:
            self.product_keys = tuple(keys.to(self.product_dtype) for keys in segments)
            self.staging = torch.empty_like(self.buffer, dtype=self.product_dtype)
        # Key columns per elementwise step of the column work.
        self.chunk = max(1, col.column_chunk_elements(rows.device) // max(1, len(self.buffer)))
        if segment_grads is None:
            segment_grads = (True,) * len(segments)
        self.grad_rows: Tensor | None = None
        self.grad_segments: list[Tensor | None] = [None] * len(segments)
        self.grad_extra: Tensor | None = None
        self.grad_partner: Tensor | None = None
        if grads:
            wanted = [k for k, flag in zip(segments, segment_grads, strict=True) if flag]
            grad_rows, grad_keys = _gradient_buffers(rows, wanted, row_grads and bool(segments))
            self.grad_rows = grad_rows
            if partner is not None:  # both row sets' gradients add up over their pieces
                if grad_rows is not None:
                    grad_rows.zero_()
                if partner_grads:
                    self.grad_partner = torch.zeros_like(partner)
            it = iter(grad_keys)
            self.grad_segments = [next(it) if flag else None for flag in segment_grads]
            if extra is not None:
                self.grad_extra = rows.new_empty(len(rows), self.width)  # (B, E)
        self.candidates = self._count_candidates() if candidates else None  # (B,)

    def _tile(self, columns: slice) -> _Tile:
        """A tile and its pieces of the segments (the first tile has every segment, if empty)."""
        pieces = []
        for k, bounds in enumerate(self.bounds):
            start, stop = max(bounds.start, columns.start), min(bounds.stop, columns.stop)
            if start < stop:
                keys = slice(start - bounds.start, stop - bounds.start)
                local = slice(start - columns.start, stop - columns.start)
                pieces.append(_Piece(k, keys, local))
            elif columns.start == 0 and bounds.start == bounds.stop:
                pieces.append(_Piece(k, slice(0, 0), slice(0, 0)))
        return _Tile(columns, tuple(pieces), has_extra=columns.start == 0)

    def _count_candidates(self) -> Tensor:
        """Each row's number of candidates, from the rules (no pass over the logits)."""
        layout = self.layout
        assert layout.exclude_labels is None, "candidates are counted without label rules"
        total = self.width + sum(len(keys) for keys in self.segments)
        counts = self.rows.new_full((len(self.rows),), float(total))  # (B,)
        if self.extra is not None:
            counts -= torch.isneginf(self.extra).sum(dim=1)  # padding
        for rule in layout.exclusions:
            counts[rule.start : rule.stop] -= rule.width
        for mask in layout.valid_keys:
            if mask is not None:
                counts -= (~mask).sum()
        if layout.exclude_target and layout.has_target:
            counts -= 1
        return counts

    def context(self, span: slice) -> RowContext:
        candidates = None if self.candidates is None else self.candidates[span]
        return self.layout.context(span, self.key_start, candidates)

    def spans(self) -> list[slice]:
        """The blocks' row ranges."""
        step, total = self.layout.block_rows, len(self.rows)
        return [slice(a, min(a + step, total)) for a in range(0, total, step)]

    def row_block(
        self, span: slice, row_scales: Tensor, partner_scales: Tensor | None = None
    ) -> RowBlock:
        """The block's (R, D) scaled rows (and partner rows), in the product dtype."""
        rows = self._scaled(self.rows[span], row_scales[span])
        if self.partner is None:
            return RowBlock(rows)
        assert partner_scales is not None
        return RowBlock(rows, self._scaled(self.partner[span], partner_scales[span]))

    def _scaled(self, rows: Tensor, scales: Tensor) -> Tensor:
        block = rows * scales.unsqueeze(1)
        return block if self.product_dtype is None else block.to(self.product_dtype)

    def product_(self, out: Tensor, a: Tensor, b: Tensor, *, add: bool = False) -> None:
        """``out = a @ b`` (``+=`` with ``add``): a product in the product dtype, kept in out's.

        ``b`` is in the product dtype; ``a`` is rounded to it here (via
        the staging buffer when it is a slice of the block: d loss / d logits).
        """
        if self.product_dtype is None:
            if add:
                out.addmm_(a, b)
            else:
                torch.mm(a, b, out=out)
            return
        product = torch.mm(a.to(self.product_dtype), b)
        if add:
            out.add_(product)
        else:
            out.copy_(product)

    def logits(
        self, span: slice, row_block: RowBlock, tile: _Tile, *, widen: bool = True
    ) -> Tensor:
        """The block's (R, tile width) products, before column scales.

        With a product dtype and not ``widen``, the keys' products stay in
        the products' buffer (`key_columns`); the block gets the extra columns.
        """
        columns = tile.columns
        block = self.buffer[: len(row_block.rows), : columns.stop - columns.start]
        if tile.has_extra and self.extra is not None:
            block[:, : self.width] = self.extra[span]
        if tile.has_extra:
            block[:, self.width : self.key_start] = float("-inf")
        staging = None if self.staging is None else self.staging[: len(row_block.rows)]
        for piece in tile.pieces:
            keys = self.product_keys[piece.segment][piece.keys]
            rows = row_block.of(piece.segment, self.layout)
            if staging is None:
                torch.mm(rows, keys.T, out=block[:, piece.columns])
            else:  # the product in its dtype, widened into the block
                product = staging[:, piece.columns]
                torch.mm(rows, keys.T, out=product)
                if widen:
                    block[:, piece.columns] = product
        return block

    def scale_columns_(
        self, block: Tensor, tile: _Tile, column_scales: list[Tensor | None]
    ) -> None:
        """In place: each segment's columns of the block times its column scales."""
        for piece in tile.pieces:
            scales = column_scales[piece.segment]
            if scales is not None:
                block[:, piece.columns].mul_(scales[piece.keys])

    def exclude_(self, piece: Tensor, span: slice, segment: int, first_key: int) -> None:
        """Set the excluded entries of a slice of a segment (keys from ``first_key``) to -inf."""
        layout = self.layout
        if layout.exclude_labels is not None:
            key_labels = layout.exclude_labels.keys(segment)
            if key_labels is not None:
                keys = key_labels[first_key : first_key + piece.shape[1]]
                row_labels = layout.exclude_labels.rows[span].unsqueeze(1)  # (R, 1)
                piece.masked_fill_(row_labels == keys, float("-inf"))
        mask = layout.key_mask(segment)
        if mask is not None:
            piece.masked_fill_(~mask[first_key : first_key + piece.shape[1]], float("-inf"))
        if layout.guide is not None and layout.guide.keys[segment] is not None:
            self._filter_(piece, span, segment, first_key, layout.guide)
        for rule in layout.exclusions:
            if rule.segment != segment:
                continue
            start = max(span.start, rule.start)
            stop = span.stop if rule.stop is None else min(span.stop, rule.stop)
            if start < stop:
                rows = piece[start - span.start : stop - span.start]
                first = rule.key_offset + start * rule.width - first_key
                for j in range(rule.width):
                    _band(rows, first + j, rule.width).fill_(float("-inf"))
        if segment != 0:  # the target is a key of segment 0
            return
        if layout.exclude_target and layout.target_offset is not None:
            offset = layout.target_offset + span.start - first_key
            torch.diagonal(piece, offset=offset).fill_(float("-inf"))

    def _filter_(
        self, piece: Tensor, span: slice, segment: int, first_key: int, guide: GuideRule
    ) -> None:
        """Set the keys of a slice that the guide finds too similar to their rows to -inf."""
        keys = guide.keys[segment]
        assert keys is not None
        partner = segment in self.layout.partner_segments
        anchors = guide.partner if partner else guide.rows
        assert anchors is not None
        anchors = anchors[span]  # (R, G)
        threshold = guide.threshold[span].unsqueeze(1)  # (R, 1)
        protected = guide.protected[segment]
        for a in range(0, piece.shape[1], self.chunk):
            columns = slice(a, min(a + self.chunk, piece.shape[1]))
            similarity = anchors @ keys[first_key + columns.start : first_key + columns.stop].T
            remove = similarity > threshold  # (R, chunk)
            if protected is not None:  # the row's own positive stays
                offset = protected + span.start - first_key - columns.start
                torch.diagonal(remove, offset=offset).fill_(False)
            piece[:, columns].masked_fill_(remove, float("-inf"))

    def raise_(
        self, piece: Tensor, span: slice, segment: int, first_key: int, factor: Tensor | float
    ) -> None:
        """In place: a slice of a raised segment (keys from ``first_key``) times ``factor``.

        The target (a key of segment 0) keeps its logit.
        """
        if segment not in self.layout.raised_segments:
            return
        offset = self.layout.target_offset
        if segment != 0 or offset is None:
            piece.mul_(factor)
            return
        targets = torch.diagonal(piece, offset=offset + span.start - first_key)
        kept = targets.clone()
        piece.mul_(factor)
        targets.copy_(kept)

    def raise_tile_(self, block: Tensor, span: slice, tile: _Tile, factor: Tensor | float) -> None:
        """In place: the raised segments' logits of a block times ``factor`` (see `raise_`)."""
        for piece in tile.pieces:
            self.raise_(block[:, piece.columns], span, piece.segment, piece.keys.start, factor)

    def exclude_tile_(
        self, block: Tensor, span: slice, tile: _Tile, keys: Tensor | None = None
    ) -> None:
        """Set the excluded entries of a block (extra columns, key segments) to -inf.

        The key columns are ``keys``' (`key_columns`; default the block's).
        """
        keys = block if keys is None else keys
        if tile.has_extra:
            self.exclude_extra_(block[:, : self.width])
        for piece in tile.pieces:
            self.exclude_(keys[:, piece.columns], span, piece.segment, piece.keys.start)

    def exclude_extra_(self, piece: Tensor) -> None:
        """Set the excluded entries of the extra columns to -inf: the target, if excluded."""
        if self.layout.exclude_target and self.layout.target_extra:
            piece[:, 0] = float("-inf")

    def key_columns(self, block: Tensor, staged: bool) -> Tensor:
        """The tensor holding a block's key columns, in the block's column coordinates.

        ``staged``: the products' buffer, where `logits` left them unwidened;
        otherwise the block itself.
        """
        if not staged:
            return block
        assert self.staging is not None
        return self.staging[: len(block), : block.shape[1]]

    def gradient_products(
        self, block: Tensor, row_block: RowBlock, span: slice, tile: _Tile, *, staged: bool = False
    ) -> None:
        """The block holds d loss / d logits times the column scales: accumulate the gradients.

        With ``staged`` the key columns' values are in the products' buffer already.
        The rows' gradient of the span is written by its first tile and added
        to by the others (with partner rows, both are zeroed first and added to).
        """
        if self.grad_extra is not None and tile.has_extra:
            self.grad_extra[span] = block[:, : self.width]
        for n, piece in enumerate(tile.pieces):
            values = block[:, piece.columns]  # (R, n_k)
            if self.staging is not None:  # rounded to the product dtype once
                values = self.staging[: len(block), piece.columns]
                if not staged:
                    values.copy_(block[:, piece.columns])
            keys = self.product_keys[piece.segment][piece.keys]
            grad_keys = self.grad_segments[piece.segment]
            rows = row_block.of(piece.segment, self.layout)
            if grad_keys is not None:
                self.product_(grad_keys[piece.keys], values.T, rows, add=True)
            partner = piece.segment in self.layout.partner_segments
            grad_rows = self.grad_partner if partner else self.grad_rows
            if grad_rows is None:
                continue
            first = tile.has_extra and n == 0 and self.partner is None
            self.product_(grad_rows[span], values, keys, add=not first)

    def chunks(self, tile: _Tile) -> list[tuple[_Piece, int]]:
        """The tile's pieces in cache-sized chunks (segment 0 split after its column keys).

        Each is a piece and its key offset in its segment.
        """
        found = []
        for piece in tile.pieces:
            begin, stop = piece.keys.start, piece.keys.stop
            split = self.layout.column_keys if piece.segment == 0 else 0
            ranges = [(begin, split), (split, stop)] if begin < split < stop else [(begin, stop)]
            for first, last in ranges:
                for a in range(first, last, self.chunk):
                    b = min(a + self.chunk, last)
                    local = piece.columns.start + a - begin
                    found.append(_Piece(piece.segment, slice(a, b), slice(local, local + b - a)))
        return [(chunk, chunk.keys.start) for chunk in found]

    def result(self, row_stat: Tensor) -> BlockPass:
        return BlockPass(
            row_stat=row_stat,
            grad_rows=self.grad_rows,
            grad_segments=self.grad_segments,
            grad_extra=self.grad_extra,
            grad_partner=self.grad_partner,
        )


def _tile_columns(key_start: int, total: int, tile_columns: int | None) -> list[slice]:
    """Column ranges of the tiles: the first with the extra columns, each next on a key boundary."""
    if tile_columns is None:
        return [slice(0, total)]
    edges = [0, *range(key_start + tile_columns, total, tile_columns), total]
    return [slice(a, b) for a, b in itertools.pairwise(edges) if a < b or a == 0]


def _band(rows: Tensor, first: int, step: int) -> Tensor:
    """The entries ``(r, first + r * step)`` of an (R, C) view that fall within its C columns.

    A 1-D strided view (a diagonal for ``step`` 1), to be written in place.
    """
    count, columns = rows.shape
    low = max(0, -(first // step))  # the first row whose entry is in a column >= 0
    high = min(count, (columns - 1 - first) // step + 1)
    if high <= low:
        return rows.new_empty(0)
    row_stride, column_stride = rows.stride()
    return rows.as_strided(
        (high - low,),
        (row_stride + step * column_stride,),
        rows.storage_offset() + low * row_stride + (first + low * step) * column_stride,
    )


def _shift(row_max: Tensor) -> Tensor:
    """The rows' maxima as exponent shifts: 0 for a row without candidates (max -inf). (R,)"""
    return torch.where(torch.isneginf(row_max), 0.0, row_max)


def _row_lse_(block: Tensor) -> Tensor:
    """Each row's log-sum-exp of a block, overwriting it (-inf: no candidate). (R,)"""
    shift = _shift(block.amax(dim=1)).unsqueeze(1)  # (R, 1)
    return block.sub_(shift).exp_().sum(dim=1).log_().add_(shift[:, 0])


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
    raise_factor: Tensor | float = 1.0,
    partner: Tensor | None = None,
    partner_scales: Tensor | None = None,
    partner_grads: bool = False,
) -> BlockPass:
    """Row statistics and loss of every block (and column statistics), in one pass.

    With ``compute_grads`` it also returns the gradients of the summed row
    loss (only without column statistics, which need all rows first; on
    complete rows, with the keys' column scales applied beforehand: None).

    With column tiles, each row's log-sum-exp is accumulated tile by tile
    and handed to the objective (which must be ``tileable``) as a one-column
    block: the objective's statistics and loss depend on the row only
    through it.

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
        raise_factor: the factor of ``layout.raised_segments``' logits.
        partner: (B, D) the partner rows, unscaled, that
            ``layout.partner_segments`` are scored against (None: none).
        partner_scales: (B,) their factors.
        partner_grads: whether the partner rows get a gradient.

    Returns:
        A BlockPass; its gradients are with respect to the scaled rows, the
        segments with their column scales held fixed, and the extra logits.
    """
    tiled = layout.tile_columns is not None
    assert not (compute_grads and layout.column_keys), "columns need every row first"
    assert not compute_grads or tiled or all(s is None for s in column_scales), "scaled keys"
    assert not (tiled and layout.column_keys), "tiles give row statistics only"
    assert not tiled or objective.tileable, "the objective needs complete rows"
    assert not (layout.column_keys and 0 in layout.raised_segments), "columns need plain logits"
    assert partner is None or not (tiled or layout.column_keys), "partners: complete rows only"
    if tiled and compute_grads:
        return _online_pass(
            rows,
            segments,
            extra,
            objective,
            layout,
            row_scales=row_scales,
            column_scales=column_scales,
            row_grads=row_grads,
            raise_factor=raise_factor,
        )
    blocks = _Blocks(
        rows,
        segments,
        extra,
        layout,
        grads=compute_grads,
        segment_grads=segment_grads,
        row_grads=row_grads,
        candidates=objective.needs_candidates,
        partner=partner,
        partner_grads=partner_grads,
    )
    num_rows = len(rows)
    row_stat = rows.new_empty(num_rows, objective.num_stats)  # (B, K)
    row_loss = rows.new_empty(num_rows)  # (B,)
    target_logit = rows.new_empty(num_rows) if layout.has_target else None  # (B,)
    column_keys = layout.column_keys
    column_stats = rows.new_full((column_keys,), float("-inf")) if column_keys else None  # (C,)
    chunk = blocks.chunk

    # The one-pass walk with a product dtype leaves the keys' logits in the
    # products' buffer, unwidened: the objective reads them there and writes
    # their gradient back, rounded once (raised logits are widened first).
    # So does a walk with column statistics under the kernels, which take
    # them from the logits (the ops widen, and read the row softmax).
    staged = blocks.staging is not None and not layout.raised_segments
    staged = staged and (
        compute_grads
        or (
            column_stats is not None
            and all(s is None for s in column_scales)
            and kernels_for(rows) is not None
        )
    )
    for span in blocks.spans():
        row_block = blocks.row_block(span, row_scales, partner_scales)
        context = blocks.context(span)
        targets = None if target_logit is None else target_logit[span]
        lse = rows.new_full((span.stop - span.start, 1), float("-inf")) if tiled else None
        for tile in blocks.tiles:
            block = blocks.logits(span, row_block, tile, widen=not staged)
            keys = blocks.key_columns(block, staged)  # the block's coordinates
            blocks.scale_columns_(block, tile, column_scales)
            if targets is not None:
                source = keys if layout.target_offset is not None else block
                found, which = target_entries(source, context, tile.columns.start)
                targets[which] = found
            blocks.raise_tile_(block, span, tile, raise_factor)
            blocks.exclude_tile_(block, span, tile, keys)
            if lse is not None:
                torch.logaddexp(lse[:, 0], _row_lse_(block), out=lse[:, 0])
        if lse is not None:  # (R, 1) each row's log-sum-exp, as a block of one column
            whole_rows = RowContext(span.start, candidates=context.candidates)
            row_loss[span] = objective.forward_(lse, whole_rows, row_stat[span], targets)
            continue
        if compute_grads:
            row_loss[span] = objective.forward_with_gradient_(
                block,
                context,
                row_stat[span],
                targets,
                keys[:, blocks.key_start :] if staged else None,
            )
            blocks.gradient_products(block, row_block, span, blocks.tiles[0], staged=staged)
            continue
        if staged:  # column statistics from the unwidened logits
            assert column_stats is not None
            key_logits = keys[:, blocks.key_start :]
            row_loss[span] = objective.forward_(block, context, row_stat[span], targets, key_logits)
            logits = keys[:, blocks.bounds[0]][:, :column_keys]  # (R, C)
            block_lse = col.column_lse_of_logits(logits, row_stat[span, 0])
            torch.logaddexp(column_stats, block_lse, out=column_stats)
            continue
        row_loss[span] = objective.forward_(block, context, row_stat[span], targets)
        if column_stats is not None:
            probabilities = block[:, blocks.bounds[0]][:, :column_keys]  # (R, C)
            block_lse = col.column_lse(probabilities, row_stat[span, 0], chunk)
            torch.logaddexp(column_stats, block_lse, out=column_stats)

    if column_stats is not None and col.needs_separate_pass(column_stats, row_stat[:, 0]):
        column_stats = col.column_lse_pass(
            rows,
            blocks.product_keys[0],
            row_scales,
            column_scales[0],
            column_keys,
            blocks.buffer,
            chunk,
        )
    result = blocks.result(row_stat)
    result.row_loss, result.column_lse, result.target_logit = row_loss, column_stats, target_logit
    return result


def _online_pass(
    rows: Tensor,
    segments: tuple[Tensor, ...],
    extra: Tensor | None,
    objective: RowObjective,
    layout: Layout,
    *,
    row_scales: Tensor,
    column_scales: list[Tensor | None],
    row_grads: bool,
    raise_factor: Tensor | float,
) -> BlockPass:
    """Statistics, loss and gradients of a tiled walk whose keys need no gradient, in one pass.

    The online softmax of flash attention: per row a running maximum ``m``,
    the running sum ``l`` of ``exp(logit - m)`` and the running sums
    ``sum_j exp(logit_j - m) y_j`` (the rows' gradient) and ``exp(extra -
    m)``, all rescaled by ``exp(m_old - m_new)`` as the maximum grows. At the
    end ``l`` gives the row's log-sum-exp, the objective its loss and
    statistics, and dividing by ``l`` turns the sums into probabilities:
    ``d loss / d logits`` of a tileable objective is its softmax, except at
    the target, an extra column (the objective's ``gradient_from_forward_``
    on the extra columns, which also zeroes the decoupled loss's rows
    without negatives; their sums are 0 anyway). Two products per tile,
    against three for statistics and a gradient pass.
    """
    assert layout.target_offset is None, "a target among the keys needs their final statistics"
    blocks = _Blocks(
        rows,
        segments,
        extra,
        layout,
        grads=True,
        segment_grads=(False,) * len(segments),
        row_grads=row_grads,
    )
    num_rows, width = len(rows), blocks.width
    row_stat = rows.new_empty(num_rows, objective.num_stats)  # (B, K)
    row_loss = rows.new_empty(num_rows)  # (B,)
    target_logit = rows.new_empty(num_rows) if layout.has_target else None  # (B,)
    for span in blocks.spans():
        row_block = blocks.row_block(span, row_scales)
        context = blocks.context(span)
        targets = None if target_logit is None else target_logit[span]
        count = span.stop - span.start
        running_max = rows.new_full((count,), float("-inf"))  # (R,) m
        running_sum = rows.new_zeros(count)  # (R,) l
        grad_rows = None if blocks.grad_rows is None else blocks.grad_rows[span].zero_()  # (R, D)
        extra_sum = rows.new_empty(count, width)  # (R, E) exp(extra - m)
        for tile in blocks.tiles:
            block = blocks.logits(span, row_block, tile)
            blocks.scale_columns_(block, tile, column_scales)
            if targets is not None:
                found, which = target_entries(block, context, tile.columns.start)
                targets[which] = found
            blocks.raise_tile_(block, span, tile, raise_factor)
            blocks.exclude_tile_(block, span, tile)
            new_max = torch.maximum(running_max, block.amax(dim=1))  # (R,)
            shift = _shift(new_max)  # (R,) finite
            rescale = (running_max - shift).exp_()  # (R,) 0 where nothing was summed yet
            block.sub_(shift.unsqueeze(1)).exp_()  # exp(logit - m)
            running_sum.mul_(rescale).add_(block.sum(dim=1))
            running_max = new_max
            if tile.has_extra:
                extra_sum.copy_(block[:, :width])
            else:
                extra_sum.mul_(rescale.unsqueeze(1))
            if grad_rows is None:
                continue
            grad_rows.mul_(rescale.unsqueeze(1))
            blocks.scale_columns_(block, tile, column_scales)
            for piece in tile.pieces:
                keys = blocks.product_keys[piece.segment][piece.keys]
                blocks.product_(grad_rows, block[:, piece.columns], keys, add=True)
        shift = _shift(running_max)
        lse = running_sum.log().add_(shift).unsqueeze(1)  # (R, 1); -inf: no candidate
        whole_rows = RowContext(span.start, candidates=context.candidates)
        row_loss[span] = objective.forward_(lse, whole_rows, row_stat[span], targets)
        # 1 / l, 0 for a row without candidates (its sums are 0 too).
        inverse = torch.where(running_sum > 0, running_sum.reciprocal(), 0.0).unsqueeze(1)
        if grad_rows is not None:
            grad_rows.mul_(inverse)
        if blocks.grad_extra is not None:
            probabilities = blocks.grad_extra[span]  # (R, E)
            torch.mul(extra_sum, inverse, out=probabilities)
            objective.gradient_from_forward_(probabilities, context, row_stat[span], 1.0)
    result = blocks.result(row_stat)
    result.row_loss, result.target_logit = row_loss, target_logit
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
    raise_factor: Tensor | float = 1.0,
    partner: Tensor | None = None,
    partner_scales: Tensor | None = None,
    partner_grads: bool = False,
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
        rows,
        segments,
        extra,
        layout,
        grads=True,
        segment_grads=segment_grads,
        row_grads=row_grads,
        partner=partner,
        partner_grads=partner_grads,
    )
    column_keys = layout.column_keys
    column_lse = statistics.column_lse
    # Column j pairs with row j, its target (if any) the row's own: key j.
    assert not column_keys or layout.target_offset in (None, 0), "columns pair with rows"
    chunks = [blocks.chunks(tile) for tile in blocks.tiles]
    scratch: list[Tensor] = []  # the column softmax's buffer, where the objective's ops need it
    # Under the kernels (which compute at the statistics' precision whatever
    # they read), the keys' logits stay in the products' buffer, unwidened,
    # and their gradient is written back there; the ops take widened logits.
    staged = (
        blocks.staging is not None
        and not layout.raised_segments
        and all(s is None for s in column_scales)
        and kernels_for(rows) is not None
    )

    for span in blocks.spans():
        row_block = blocks.row_block(span, row_scales, partner_scales)
        context = blocks.context(span)
        stats = statistics.row_stat[span]  # (R, K)
        weight: Tensor | float = 1.0 if row_weight is None else row_weight[span].unsqueeze(1)
        for tile, tile_chunks in zip(blocks.tiles, chunks, strict=True):
            block = blocks.logits(span, row_block, tile, widen=not staged)
            keys = blocks.key_columns(block, staged)  # the block's coordinates
            if tile.has_extra and extra is not None:
                extra_block = block[:, : blocks.width]
                blocks.exclude_extra_(extra_block)
                objective.gradient_(extra_block, context, 0, stats, weight)
            for piece, first_key in tile_chunks:
                logits = keys[:, piece.columns]  # (R, chunk) view
                scales = column_scales[piece.segment]
                if scales is not None:
                    logits.mul_(scales[piece.keys])
                blocks.raise_(logits, span, piece.segment, first_key, raise_factor)
                blocks.exclude_(logits, span, piece.segment, first_key)
                columns = None
                if piece.segment == 0 and first_key < column_keys:  # key-to-query probabilities
                    assert column_lse is not None
                    key_weight = column_weight
                    if isinstance(column_weight, Tensor):
                        key_weight = column_weight[piece.keys]
                    has_targets = layout.target_offset is not None
                    columns = ColumnSoftmax(
                        column_lse[piece.keys], key_weight, has_targets, scratch
                    )
                first_column = tile.columns.start + piece.columns.start
                objective.gradient_(logits, context, first_column, stats, weight, columns)
                if scales is not None:
                    logits.mul_(scales[piece.keys])
            blocks.gradient_products(block, row_block, span, tile, staged=staged)
    return blocks.result(statistics.row_stat)


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

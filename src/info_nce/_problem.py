"""The problem builder: the only reader of the losses' flags.

It turns the (validated) arguments of `info_nce` and `nt_xent` into what the
engine walks, and nothing else decides it:

* the rows (queries, anchors) and the key segments every row is scored
  against (in-batch keys, unpaired negatives), gathered across ranks where
  asked, each with or without gradient as the caller's tensor has it;
* per-row candidates (a query's own positive, its paired negatives with
  their padding at -inf), as (B, E) logits;
* targets: key ``offset + i`` (in-batch positives, the block diagonal) or
  the first extra column (the own positive); exclusions: the anchor itself;
* positives that are not one target column (labels, other views), as class
  sums;
* for the symmetric loss, the key-to-query direction: columns of the same
  walk where both directions see the same rows, else a walk of its own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from info_nce import _normalize
from info_nce._validation import Reduction
from info_nce.distributed import Gatherer
from info_nce.engine import Positives, Problem, Walk
from info_nce.engine.function import PairedOptions, paired_logits


def info_nce_problem(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Tensor | None,
    temperature: float | Tensor,
    reduction: Reduction,
    *,
    paired: bool,
    in_batch: bool,
    symmetric: bool,
    labels: Tensor | None,
    negative_mask: Tensor | None,
    normalize: bool,
    chunk_size: int | None,
    gather: bool,
    eps: float,
) -> Problem:
    """The problem of `info_nce.info_nce` on (B, D) query and positive keys in the compute dtype."""
    unit = _normalize.unit_fn(normalize)
    gatherer = Gatherer(len(query), query.device) if gather else None
    offset = 0 if gatherer is None else gatherer.offset
    all_keys = positive_key  # (B_all, D) where in-batch candidates or labels need them
    if gatherer is not None and (in_batch or labels is not None):
        all_keys = gatherer(positive_key)
    all_labels = labels if labels is None or gatherer is None else gatherer(labels)

    row_scale = 0.5 if symmetric else 1.0
    # The key-to-query direction in the same walk as the rows needs the same
    # queries on both sides: not so once keys come from other ranks.
    columns_in_walk = symmetric and in_batch and gatherer is None
    column_queries = None  # (B_all, D) all queries, for a walk of the key-to-query direction
    if symmetric and not columns_in_walk:
        column_queries = query if gatherer is None else gatherer(query)

    unit_query = None  # (B, D), only where a logit is computed outside the walk
    if labels is not None or not in_batch or paired:
        unit_query = unit(query)
    positives: list[Positives] = []
    if all_labels is not None:
        assert unit_query is not None
        positives.append(
            Positives(unit_query, unit(all_keys), all_labels, offset, False, row_scale)
        )
        if symmetric:
            all_queries = unit_query if column_queries is None else unit(column_queries)
            positives.append(
                Positives(unit(positive_key), all_queries, all_labels, offset, False, 0.5)
            )
    scaled_query = None  # (B, D) for the own positive's and the paired negatives' logits
    if unit_query is not None and (not in_batch or paired):
        scaled_query = unit_query / temperature

    segments: list[Tensor] = []
    extra: list[Tensor] = []
    if in_batch:
        segments.append(all_keys)
    else:
        assert scaled_query is not None
        extra.append(torch.sum(scaled_query * unit(positive_key), dim=1, keepdim=True))  # (B, 1)
    if negative_keys is not None and paired:
        assert scaled_query is not None
        options = PairedOptions(
            normalize_negatives=normalize, eps=_normalize.normalization_eps(negative_keys.dtype)
        )
        negative_logits = paired_logits(
            scaled_query, negative_keys.to(query.dtype), options
        )  # (B, M)
        if negative_mask is not None:
            negative_logits = negative_logits.masked_fill(~negative_mask, float("-inf"))
        extra.append(negative_logits)
    elif negative_keys is not None:
        negatives = negative_keys.to(query.dtype)  # (M, D)
        if gatherer is not None:
            negatives = Gatherer(len(negatives), negatives.device)(negatives)
        segments.append(negatives)

    targets_in_walk = all_labels is None
    walks = [
        Walk(
            rows=query,
            segments=tuple(segments),
            extra=tuple(extra),
            target_offset=offset if in_batch and targets_in_walk else None,
            target_extra=not in_batch,
            column_keys=len(query) if columns_in_walk else 0,
            row_scale=row_scale,
            column_scale=0.5 if columns_in_walk else 0.0,
        )
    ]
    if column_queries is not None:
        # The key-to-query direction on its own: each key against all queries.
        walks.append(
            Walk(
                rows=positive_key,
                segments=(column_queries,),
                target_offset=offset if targets_in_walk else None,
                row_scale=0.5,
            )
        )
    return Problem(
        tuple(walks), tuple(positives), temperature, reduction, normalize, eps, chunk_size
    )


def nt_xent_problem(
    views: Tensor,
    labels: Tensor | None,
    temperature: float | Tensor,
    reduction: Reduction,
    *,
    first_view_only: bool,
    normalize: bool,
    chunk_size: int | None,
    gather: bool,
    eps: float,
) -> Problem:
    """The problem of `info_nce.nt_xent` on (V, B, D) views in the compute dtype.

    Embedding (v, i) is row ``v * B + i`` of this rank's (V * B, D)
    embeddings; the keys are all ranks' embeddings, this rank's from
    ``offset``. Without labels, sample i's label is its index over all ranks,
    so its positives are its other views; an anchor is never its own
    candidate or positive.
    """
    num_views, batch, dim = views.shape
    embeddings = views.reshape(num_views * batch, dim)  # (V * B, D), view-major
    gatherer = Gatherer(len(embeddings), views.device) if gather else None
    offset = 0 if gatherer is None else gatherer.offset
    if labels is None:  # sample i's index over all ranks (every rank has V views)
        labels = torch.arange(batch, device=views.device) + offset // num_views
    labels = labels.repeat(num_views)  # (V * B,)
    keys = embeddings if gatherer is None else gatherer(embeddings)  # (N, D) all ranks
    all_labels = labels if gatherer is None else gatherer(labels)
    rows = embeddings[:batch] if first_view_only else embeddings  # (R, D)

    unit_keys = _normalize.unit_fn(normalize)(keys)
    positives = Positives(
        unit_keys[offset : offset + len(rows)],
        unit_keys,
        all_labels,
        offset,
        exclude_self=True,
        weight=1.0,
    )
    walk = Walk(rows=rows, segments=(keys,), exclude_offset=offset)
    return Problem((walk,), (positives,), temperature, reduction, normalize, eps, chunk_size)

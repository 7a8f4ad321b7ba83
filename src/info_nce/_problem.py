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
  walk where both directions see the same rows (InfoNCE's objective only:
  its column statistics come from its row probabilities), else a walk of
  its own;
* each walk's objective (`info_nce.objectives`), from the variant: the
  decoupled loss excludes the positives from the candidates; the debiased
  one excludes the target and adds the clamp logit ``-1/t`` as the last
  extra column;
* shared negatives (every query against all B * M of them): a query's own
  M are extra columns, as paired ones are, and all ranks' are a segment
  whose band of each row's own is excluded (a `Diagonal` of width M), its
  padding a key mask;
* hardness weighting: ``alpha * s`` (detached) on the selected negatives'
  logits of the query-to-key walk, through autograd on the own negatives'
  extra columns and as raised segments (`Walk.raised_segments`) elsewhere;
* the joint partition of several directions (GTE): one walk whose row i is
  pair i's row in all of them, the queries' segments followed by the
  key-to-query and key-to-key ones, scored against the positive keys as the
  walk's partner rows (`Walk.partner_rows`); each direction's exclusions are
  `Diagonal` rules and key masks on its own segments;
* guided false-negative filtering: the guide embeddings of every segment's
  keys, of the rows and of their partners, and each pair's threshold, as a
  `GuideRule` of each walk (the own negatives' extra columns are filtered
  here, at -inf);
* SigLIP's sigmoid loss: one walk of the queries against all keys (and the
  negatives) whose objective scores each logit alone; its positives are the
  target diagonal, or with labels every key with the query's label, compared
  in each block (`Walk.target_labels`); its bias travels with the walk.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from info_nce import _normalize
from info_nce._validation import (
    Directions,
    FalseNegativeFilter,
    Hardness,
    Reduction,
    Variant,
)
from info_nce.distributed import Gatherer
from info_nce.engine import Diagonal, GuideRule, LabelRule, Positives, Problem, Walk
from info_nce.engine.function import PairedOptions, paired_logits
from info_nce.objectives import (
    DebiasedObjective,
    DecoupledObjective,
    InfoNCEObjective,
    RowObjective,
    SigmoidObjective,
)


def _objective(variant: Variant, extra_width: int) -> RowObjective:
    """The walk's objective; the debiased one finds its clamp in the last extra column."""
    if variant.decoupled:
        return DecoupledObjective()
    if variant.debiased:
        return DebiasedObjective(
            variant.false_negative_rate, variant.hard_negative_beta, clamp_column=extra_width - 1
        )
    return InfoNCEObjective()


def _unpaired_negatives(
    negative_keys: Tensor | None, negative_labels: Tensor | None, dtype: torch.dtype, gather: bool
) -> tuple[Tensor | None, Tensor | None]:
    """(M, D) all ranks' unpaired negatives in ``dtype`` and their (M,) labels, gathered alike."""
    if negative_keys is None:
        return None, negative_labels
    negatives = negative_keys.to(dtype)
    if not gather:
        return negatives, negative_labels
    gatherer = Gatherer(len(negatives), negatives.device)
    labels = None if negative_labels is None else gatherer(negative_labels)
    return gatherer(negatives), labels


def _shared_negatives(
    negative_keys: Tensor, negative_mask: Tensor | None, dtype: torch.dtype, gather: bool
) -> tuple[Tensor, Tensor | None, int]:
    """All ranks' shared negatives (N, D), their (N,) validity, where this rank's start.

    Query i's own negatives are rows ``start + i * M`` to ``start + (i + 1) * M``.
    """
    flat = negative_keys.to(dtype).flatten(0, 1)  # (B * M, D), query i's from i * M
    valid = None if negative_mask is None else negative_mask.flatten()  # (B * M,)
    if not gather:
        return flat, valid, 0
    gatherer = Gatherer(len(flat), flat.device)
    if valid is not None:  # as bytes: gloo gathers no bool
        valid = gatherer(valid.to(torch.uint8)).bool()
    return gatherer(flat), valid, gatherer.offset


class _Guides:
    """Unit guide embeddings (detached; the model's own without a guide), gathered as needed."""

    def __init__(
        self,
        false_negatives: FalseNegativeFilter,
        query: Tensor,
        positive_key: Tensor,
        negative_keys: Tensor | None,
        gatherer: Gatherer | None,
    ) -> None:
        found = false_negatives.guide or (query, positive_key, negative_keys)
        query_guide, key_guide, *rest = (
            F.normalize(x.detach().to(query.dtype), dim=-1) for x in found if x is not None
        )
        self.query, self.key = query_guide, key_guide  # (B, G)
        self.negatives = rest[0] if rest else None  # (M, G) or (B, M, G)
        self.threshold = false_negatives.threshold(torch.sum(query_guide * key_guide, dim=1))
        self.gatherer = gatherer

    def all_queries(self) -> Tensor:
        return self.query if self.gatherer is None else self.gatherer(self.query)

    def all_keys(self) -> Tensor:
        return self.key if self.gatherer is None else self.gatherer(self.key)

    def all_negatives(self) -> Tensor:
        """(N, G) every rank's negatives' guides, flattened as their segment is."""
        assert self.negatives is not None
        flat = self.negatives.flatten(0, -2)
        return flat if self.gatherer is None else Gatherer(len(flat), flat.device)(flat)

    def similar_own(self, logits: Tensor) -> Tensor:
        """(B, M) logits of the own negatives, those too similar by the guide at -inf."""
        assert self.negatives is not None
        similarity = torch.einsum("bg,bmg->bm", self.query, self.negatives)  # (B, M)
        return logits.masked_fill(similarity > self.threshold.unsqueeze(1), float("-inf"))


@dataclass
class _Segments:
    """A walk's key segments and, per segment, what the walker's rules need of it.

    One `add` per segment keeps the per-segment tuples of `Walk` and
    `GuideRule` aligned with the segments.
    """

    keys: list[Tensor] = field(default_factory=list)
    valid: list[Tensor | None] = field(default_factory=list)  # key masks
    guides: list[Tensor | None] = field(default_factory=list)  # the filter's guide keys
    protected: list[int | None] = field(default_factory=list)  # the row's own positive
    partner: list[int] = field(default_factory=list)  # scored against the partner rows

    def add(
        self,
        keys: Tensor,
        *,
        valid: Tensor | None = None,
        guide: Tensor | None = None,
        protected: int | None = None,
        partner: bool = False,
    ) -> int:
        """Append a segment; its index."""
        index = len(self.keys)
        self.keys.append(keys)
        self.valid.append(valid)
        self.guides.append(guide)
        self.protected.append(protected)
        if partner:
            self.partner.append(index)
        return index

    def key_masks(self) -> tuple[Tensor | None, ...]:
        """`Walk.valid_keys`: empty where no segment has a mask."""
        return tuple(self.valid) if any(v is not None for v in self.valid) else ()


def _raised(logits: Tensor, temperature: float | Tensor, strength: float) -> Tensor:
    """``logits + strength * stopgrad(logits * t)``: hardness weighting of per-row logits."""
    return logits + strength * (logits * temperature).detach()


def _clamp_logits(rows: Tensor, temperature: float | Tensor) -> Tensor:
    """(R, 1) the debiased estimator's clamp logit ``-1/t`` (cosine -1), with autograd."""
    if isinstance(temperature, Tensor):
        return (-1.0 / temperature).reshape(1, 1).expand(len(rows), 1)
    return rows.new_full((len(rows), 1), -1.0 / temperature)


def info_nce_problem(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Tensor | None,
    temperature: float | Tensor,
    reduction: Reduction,
    *,
    paired: bool,
    shared: bool,
    in_batch: bool,
    symmetric: bool,
    labels: Tensor | None,
    negative_labels: Tensor | None,
    negative_mask: Tensor | None,
    normalize: bool,
    chunk_size: int | None,
    gather: bool,
    eps: float,
    product_dtype: torch.dtype | None,
    variant: Variant,
    hardness: Hardness,
    directions: Directions,
    false_negatives: FalseNegativeFilter | None,
) -> Problem:
    """The problem of `info_nce.info_nce` on (B, D) query and positive keys in the compute dtype.

    Unpaired negatives are a segment of their own; with ``negative_labels``
    those with a query's label are its positives too (class sums over both
    key sets) and, for the decoupled loss, no candidates. Paired and shared
    negatives are each query's own extra columns; shared ones are a segment
    too, without the row's own.
    """
    own_negatives = negative_keys is not None and (paired or shared)
    unit = _normalize.unit_fn(normalize)
    gatherer = Gatherer(len(query), query.device) if gather else None
    offset = 0 if gatherer is None else gatherer.offset
    all_keys = positive_key  # (B_all, D) where in-batch candidates or labels need them
    if gatherer is not None and (in_batch or labels is not None):
        all_keys = gatherer(positive_key)
    all_labels = labels if labels is None or gatherer is None else gatherer(labels)

    row_scale = 0.5 if symmetric else 1.0
    # The key-to-query direction in the same walk as the rows needs the same
    # queries on both sides (not so once keys come from other ranks) and the
    # plain logits of the in-batch keys (no hardness weighting on them).
    plain = not (variant.decoupled or variant.debiased)
    raised_keys = hardness.active and hardness.in_batch and in_batch
    columns_in_walk = symmetric and in_batch and gatherer is None and plain and not raised_keys
    # A filter removes other candidates from the key-to-query rows than from the query's.
    columns_in_walk = columns_in_walk and false_negatives is None
    guides = None
    if false_negatives is not None:
        guides = _Guides(false_negatives, query, positive_key, negative_keys, gatherer)
    column_queries = None  # (B_all, D) all queries, for a walk of the key-to-query direction
    if symmetric and not columns_in_walk:
        column_queries = query if gatherer is None else gatherer(query)

    negatives, all_negative_labels = _unpaired_negatives(
        None if own_negatives else negative_keys, negative_labels, query.dtype, gather
    )

    unit_query = None  # (B, D), only where a logit is computed outside the walk
    if labels is not None or not in_batch or own_negatives:
        unit_query = unit(query)
    positives: list[Positives] = []
    if all_labels is not None:
        assert unit_query is not None
        key_sets: tuple[Tensor, ...] = (unit(all_keys),)
        key_labels: tuple[Tensor, ...] = (all_labels,)
        if all_negative_labels is not None:  # negatives with the query's label are positives
            assert negatives is not None
            key_sets, key_labels = (*key_sets, unit(negatives)), (*key_labels, all_negative_labels)
        row_candidates = key_candidates = None  # the decoupled loss's empty rows
        if variant.decoupled:
            row_candidates = query.new_full((len(query),), sum(len(k) for k in key_sets))
            if negative_keys is not None and paired:  # each row's valid paired negatives
                valid = negative_keys.shape[1] if negative_mask is None else negative_mask.sum(1)
                row_candidates = row_candidates + valid
            key_candidates = query.new_full((len(query),), len(all_labels))
        positives.append(
            Positives(unit_query, key_sets, key_labels, offset, False, row_scale, row_candidates)
        )
        if symmetric:  # the keys' positives among the queries
            all_queries = unit_query if column_queries is None else unit(column_queries)
            positives.append(
                Positives(
                    unit(positive_key),
                    (all_queries,),
                    (all_labels,),
                    offset,
                    False,
                    0.5,
                    key_candidates,
                )
            )
    scaled_query = None  # (B, D) for the own positive's and the own negatives' logits
    if unit_query is not None and (not in_batch or own_negatives):
        scaled_query = unit_query / temperature

    segments = _Segments()
    extra: list[Tensor] = []
    raised: list[int] = []  # segments under hardness weighting
    exclusions: list[Diagonal] = []
    if in_batch:
        segments.add(
            all_keys, guide=None if guides is None else guides.all_keys(), protected=offset
        )
        if raised_keys:
            raised.append(0)
    else:
        assert scaled_query is not None
        extra.append(torch.sum(scaled_query * unit(positive_key), dim=1, keepdim=True))  # (B, 1)
    if negative_keys is not None and shared:
        # Every rank's negatives, the row's own excluded: they are its extra columns.
        shared_keys, shared_valid, start = _shared_negatives(
            negative_keys, negative_mask, query.dtype, gather
        )
        width = negative_keys.shape[1]
        index = segments.add(
            shared_keys,
            valid=shared_valid,
            guide=None if guides is None else guides.all_negatives(),
        )
        exclusions.append(Diagonal(start, segment=index, width=width))
        if hardness.active and hardness.in_batch:
            raised.append(index)
    if own_negatives:
        assert negative_keys is not None
        assert scaled_query is not None
        options = PairedOptions(
            normalize_negatives=normalize,
            eps=_normalize.normalization_eps(negative_keys.dtype),
            product_dtype=product_dtype,
        )
        negative_logits = paired_logits(
            scaled_query, negative_keys.to(query.dtype), options
        )  # (B, M)
        if hardness.active and hardness.hard:
            negative_logits = _raised(negative_logits, temperature, hardness.strength)
        if negative_mask is not None:
            negative_logits = negative_logits.masked_fill(~negative_mask, float("-inf"))
        if guides is not None:
            negative_logits = guides.similar_own(negative_logits)
        extra.append(negative_logits)
    elif negatives is not None:
        index = segments.add(negatives, guide=None if guides is None else guides.all_negatives())
        if hardness.active and hardness.hard:
            raised.append(index)

    if variant.debiased:
        extra.append(_clamp_logits(query, temperature))
    if directions.joint:
        # Pair i's rows in the other directions, after the query's own.
        query_segments = len(segments.keys)  # the query-to-key row's
        all_queries = query if gatherer is None else gatherer(query)
        query_guides = None if guides is None else guides.all_queries()
        if directions.query_to_query:  # q_i against the other queries
            index = segments.add(all_queries, guide=query_guides)
            exclusions.append(Diagonal(offset, segment=index))
        if directions.key_to_query:  # k_i against all queries, q_i included
            segments.add(all_queries, guide=query_guides, protected=offset, partner=True)
        if directions.key_to_key:  # k_i against the query's candidate keys not pair i's
            for index in range(query_segments):
                new = segments.add(
                    segments.keys[index],
                    valid=segments.valid[index],
                    guide=segments.guides[index],
                    partner=True,
                )
                rules = [replace(rule, segment=new) for rule in exclusions if rule.segment == index]
                if in_batch and index == 0:
                    rules.append(Diagonal(offset, segment=new))  # k_i itself
                exclusions.extend(rules)
    targets_in_walk = all_labels is None
    local_labels = None if all_labels is None else all_labels[offset : offset + len(query)]
    exclude_labels = None  # the decoupled loss's rule under labels: no positive is a candidate
    column_exclude_labels = None  # the same for the key-to-query walk: key i has query i's label
    if variant.decoupled and local_labels is not None and in_batch:
        assert all_labels is not None
        exclude_labels = LabelRule(local_labels, (all_labels, all_negative_labels))
        column_exclude_labels = LabelRule(local_labels, (all_labels,))
    exclude_target = not plain and targets_in_walk
    guide = None
    if guides is not None:
        guide = GuideRule(
            guides.query,
            guides.key if segments.partner else None,
            tuple(segments.guides),
            guides.threshold,
            tuple(segments.protected),
        )
    walks = [
        Walk(
            rows=query,
            segments=tuple(segments.keys),
            extra=tuple(extra),
            target_offset=offset if in_batch and targets_in_walk else None,
            target_extra=not in_batch,
            exclusions=tuple(exclusions),
            exclude_target=exclude_target,
            exclude_labels=exclude_labels,
            valid_keys=segments.key_masks(),
            raised_segments=tuple(raised),
            raise_strength=hardness.strength if raised else 0.0,
            partner_rows=positive_key if segments.partner else None,
            partner_segments=tuple(segments.partner),
            guide=guide,
            column_keys=len(query) if columns_in_walk else 0,
            row_scale=row_scale,
            column_scale=0.5 if columns_in_walk else 0.0,
            objective=_objective(variant, sum(e.shape[1] for e in extra)),
        )
    ]
    if column_queries is not None:
        # The key-to-query direction on its own: each key against all queries.
        column_extra = (_clamp_logits(positive_key, temperature),) if variant.debiased else ()
        walks.append(
            Walk(
                rows=positive_key,
                segments=(column_queries,),
                extra=column_extra,
                target_offset=offset if targets_in_walk else None,
                exclude_target=exclude_target,
                exclude_labels=column_exclude_labels,
                guide=None
                if guides is None
                else GuideRule(
                    guides.key, None, (guides.all_queries(),), guides.threshold, (offset,)
                ),
                row_scale=0.5,
                objective=_objective(variant, len(column_extra)),
            )
        )
    return Problem(
        tuple(walks),
        tuple(positives),
        temperature,
        reduction,
        normalize,
        eps,
        chunk_size,
        product_dtype,
    )


def nt_xent_problem(
    views: Tensor,
    labels: Tensor | None,
    negative_keys: Tensor | None,
    negative_labels: Tensor | None,
    temperature: float | Tensor,
    reduction: Reduction,
    *,
    first_view_only: bool,
    normalize: bool,
    chunk_size: int | None,
    gather: bool,
    eps: float,
    product_dtype: torch.dtype | None,
    variant: Variant,
) -> Problem:
    """The problem of `info_nce.nt_xent` on (V, B, D) views in the compute dtype.

    Embedding (v, i) is row ``v * B + i`` of this rank's (V * B, D)
    embeddings; the keys are all ranks' embeddings, this rank's from
    ``offset``. Without labels, sample i's label is its index over all ranks,
    so its positives are its other views; an anchor is never its own
    candidate or positive. Extra negatives (a queue) are a second segment;
    with ``negative_labels`` those with an anchor's label are its positives.
    """
    num_views, batch, dim = views.shape
    embeddings = views.reshape(num_views * batch, dim)  # (V * B, D), view-major
    gatherer = Gatherer(len(embeddings), views.device) if gather else None
    offset = 0 if gatherer is None else gatherer.offset
    keys = embeddings if gatherer is None else gatherer(embeddings)  # (N, D) all ranks
    negatives, all_negative_labels = _unpaired_negatives(
        negative_keys, negative_labels, views.dtype, gather
    )
    segments = (keys,) if negatives is None else (keys, negatives)
    rows = embeddings[:batch] if first_view_only else embeddings  # (R, D)
    unit = _normalize.unit_fn(normalize)
    itself = Diagonal(offset)

    if variant.debiased:  # V = 2, no labels: one positive per anchor, the other view
        # Its logit is the first extra column, the clamp's the last; the other
        # view is no candidate (nor, as always, the anchor itself).
        local = unit(embeddings)  # (2B, D)
        positive_logit = torch.sum(local * local.roll(batch, 0), dim=1, keepdim=True)[: len(rows)]
        extra = (positive_logit / temperature, _clamp_logits(rows, temperature))
        others = (Diagonal(offset + batch, 0, batch), Diagonal(offset - batch, batch, 2 * batch))
        walk = Walk(
            rows=rows,
            segments=segments,
            extra=extra,
            target_extra=True,
            exclude_target=True,
            exclusions=(itself, *others[: 1 if first_view_only else 2]),
            objective=_objective(variant, 2),
        )
        return Problem(
            (walk,), (), temperature, reduction, normalize, eps, chunk_size, product_dtype
        )

    sample_labels = labels
    if sample_labels is None:  # sample i's index over all ranks (every rank has V views)
        sample_labels = torch.arange(batch, device=views.device) + offset // num_views
    view_labels = sample_labels.repeat(num_views)  # (V * B,)
    all_labels = view_labels if gatherer is None else gatherer(view_labels)
    unit_keys = unit(keys)
    key_sets: tuple[Tensor, ...] = (unit_keys,)
    key_labels: tuple[Tensor, ...] = (all_labels,)
    if all_negative_labels is not None:  # negatives with the anchor's label are positives
        assert negatives is not None
        key_sets, key_labels = (unit_keys, unit(negatives)), (all_labels, all_negative_labels)
    # The decoupled loss's empty rows: the anchor is no candidate of itself.
    candidates = sum(len(k) for k in segments) - 1
    positives = Positives(
        unit_keys[offset : offset + len(rows)],
        key_sets,
        key_labels,
        offset,
        exclude_self=True,
        weight=1.0,
        candidates=embeddings.new_full((len(rows),), candidates) if variant.decoupled else None,
    )
    exclusions: tuple[Diagonal, ...] = (itself,)
    exclude_labels = None
    if variant.decoupled and labels is not None:  # every key with the anchor's label
        exclude_labels = LabelRule(view_labels[: len(rows)], (all_labels, all_negative_labels))
    elif variant.decoupled:  # the anchor's other views: index rules, no comparison
        exclusions += tuple(
            Diagonal(offset + (other - view) * batch, view * batch, (view + 1) * batch)
            for view in range(len(rows) // batch)
            for other in range(num_views)
            if other != view
        )
    walk = Walk(
        rows=rows,
        segments=segments,
        exclusions=exclusions,
        exclude_labels=exclude_labels,
        objective=_objective(variant, 0),
    )
    return Problem(
        (walk,), (positives,), temperature, reduction, normalize, eps, chunk_size, product_dtype
    )


def siglip_problem(
    query: Tensor,
    key: Tensor,
    negative_keys: Tensor | None,
    temperature: float | Tensor,
    bias: float | Tensor,
    reduction: Reduction,
    *,
    labels: Tensor | None,
    normalize: bool,
    chunk_size: int | None,
    gather: bool,
    eps: float,
    product_dtype: torch.dtype | None,
) -> Problem:
    """The problem of `info_nce.siglip_loss` on (B, D) queries and keys in the compute dtype.

    The keys (with their labels) and the negatives are all ranks'; query i's
    positive is key ``offset + i``, or with labels every key with its label.
    """
    gatherer = Gatherer(len(query), query.device) if gather else None
    offset = 0 if gatherer is None else gatherer.offset
    all_keys = key if gatherer is None else gatherer(key)
    negatives, _ = _unpaired_negatives(negative_keys, None, query.dtype, gather)
    target_labels = None
    if labels is not None:
        all_labels = labels if gatherer is None else gatherer(labels)
        target_labels = LabelRule(labels, (all_labels,))
    walk = Walk(
        rows=query,
        segments=(all_keys,) if negatives is None else (all_keys, negatives),
        target_offset=offset if labels is None else None,
        target_labels=target_labels,
        logit_bias=bias,
        objective=SigmoidObjective(),
    )
    return Problem((walk,), (), temperature, reduction, normalize, eps, chunk_size, product_dtype)

"""The dense reference: the InfoNCE formula written out with a logits matrix.

This is the readable definition of the loss and the implementation the fast
paths are tested against. It materialises the (B, candidates) logits (and, for
labels, a (B, B) mask), so its memory grows with B * N.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from info_nce._validation import (
    Directions,
    FalseNegativeFilter,
    Hardness,
    NegativeMode,
    Reduction,
    Variant,
    check_in_batch_negatives,
    reduce_loss,
)


def _float32_at_least(logits: Tensor) -> Tensor:
    # Softmax statistics in float32: at temperature 0.01 half-precision exp overflows.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def dense_info_nce(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Tensor | None,
    temperature: float | Tensor,
    reduction: Reduction,
    negative_mode: NegativeMode,
    *,
    symmetric: bool = False,
    in_batch: bool | None = None,
    labels: Tensor | None = None,
    negative_labels: Tensor | None = None,
    negative_mask: Tensor | None = None,
    variant: Variant | None = None,
    hardness: Hardness | None = None,
    directions: Directions | None = None,
    false_negatives: FalseNegativeFilter | None = None,
) -> Tensor:
    """InfoNCE on (already normalised) embeddings, with a logits matrix.

    With only the seed's arguments this computes exactly what info-nce-pytorch
    computes, op for op. The options follow `info_nce.info_nce`.

    Args:
        query: (B, D) queries.
        positive_key: (B, D) positive keys.
        negative_keys: None, (M, D) for ``'unpaired'`` or (B, M, D) for ``'paired'``
            and ``'shared'`` (every query against all B * M negatives).
        temperature: logits are divided by it.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        negative_mode: ``'unpaired'``, ``'paired'`` or ``'shared'``.
        symmetric: average with the key-to-query loss over all B queries.
        in_batch: the B positive keys are candidates of every query (default,
            as in `info_nce.info_nce`: when there are no negative keys, or labels).
        labels: (B,) ints; keys with a query's label are its positives.
        negative_labels: (M,) ints of unpaired negatives, with labels:
            negatives with a query's label are its positives too.
        negative_mask: (B, M) bool, paired or shared: False marks padding.
        variant: the row objective (decoupled, debiased), see `row_loss`.
        hardness: ``strength * s`` (detached, not divided by the temperature)
            added to the query-to-key logits of the negatives it selects.
        directions: the joint partition's other directions (`_joint_rows`).
        false_negatives: guided false-negative filtering: in every direction,
            a candidate whose guide cosine with the row's anchor is above the
            pair's threshold is removed (its positive never).

    Returns:
        The loss: a scalar, or (B,) for ``reduction='none'``; float32 for
        float16/bfloat16 inputs, else the input dtype.
    """
    if in_batch is None:  # as the public API resolves it
        in_batch = check_in_batch_negatives(None, negative_keys, labels)
    seed_options = not symmetric and labels is None and negative_mask is None
    variant = variant or Variant()
    hardness = hardness or Hardness()
    directions = directions or Directions()
    seed_mode = negative_mode != "shared" and not hardness.active and not directions.joint
    seed_mode = seed_mode and false_negatives is None
    if seed_options and seed_mode and variant == Variant() and in_batch == (negative_keys is None):
        return _seed_loss(query, positive_key, negative_keys, temperature, reduction, negative_mode)

    raw_logits = _candidate_logits(query, positive_key, negative_keys, negative_mode, in_batch)
    logits = _float32_at_least(raw_logits) / temperature  # (B, candidates)
    if hardness.active:
        selected = _hardness_selection(logits, negative_keys, negative_mode, in_batch, hardness)
        penalty = hardness.strength * _float32_at_least(raw_logits).detach()  # (B, candidates)
        logits = logits + torch.where(selected, penalty, 0.0)
    if negative_mask is not None:
        # After the division: -inf / t would give the temperature a NaN gradient.
        other_columns = logits.shape[1] - negative_mask.numel()  # shared negatives come last
        padding = ~negative_mask.reshape(1, -1).expand(len(logits), -1)  # (B, B * M)
        if negative_mode == "paired":
            other_columns = logits.shape[1] - negative_mask.shape[1]  # paired ones come last
            padding = ~negative_mask
        padding = torch.cat([padding.new_zeros(len(logits), other_columns), padding], 1)
        logits = logits.masked_fill(padding, float("-inf"))
    guide = None
    if false_negatives is not None:
        guide = _Guide.of(false_negatives, query, positive_key, negative_keys)
        similar = guide.above(
            _candidate_logits(guide.query, guide.key, guide.negatives, negative_mode, in_batch),
            protected=0 if in_batch else None,
        )
        if not in_batch:
            similar[:, 0] = False  # the own positive

    batch = len(query)
    if labels is None:
        same = torch.eye(batch, dtype=torch.bool, device=logits.device)  # (B, B)
    else:
        same = labels.unsqueeze(0) == labels.unsqueeze(1)  # (B, B)
    same_candidates = same  # (B, B [+ M]) the positives among the leading candidates
    if negative_labels is not None:
        assert labels is not None
        same_candidates = torch.cat([same, labels.unsqueeze(1) == negative_labels], 1)
    positives = _row_means(same_candidates, logits.dtype)  # (B, B [+ M])

    # In-batch: the mean logit of the positives; else the positive's own column.
    positive_logit = (
        torch.sum(positives * logits[:, : positives.shape[1]], dim=1) if in_batch else logits[:, 0]
    )  # (B,)
    if guide is not None:  # after the positive's logit: a weight 0 times -inf is no 0
        logits = logits.masked_fill(similar, float("-inf"))
    is_positive = torch.zeros_like(logits, dtype=torch.bool)  # (B, candidates)
    if in_batch:
        is_positive[:, : positives.shape[1]] = same_candidates
    else:
        is_positive[:, 0] = True
    loss = row_loss(logits, is_positive, positive_logit, variant, temperature)  # (B,)
    if directions.joint:
        rows = _joint_rows(
            query, positive_key, negative_keys, negative_mode, negative_mask, in_batch, directions
        )
        if guide is not None:  # the same rows by the guide
            guided = _joint_rows(
                guide.query,
                guide.key,
                guide.negatives,
                negative_mode,
                negative_mask,
                in_batch,
                directions,
            )
            rows = [
                (row, excluded | guide.above(similarity, protected), protected)
                for (row, excluded, protected), (similarity, _, _) in zip(rows, guided, strict=True)
            ]
        # After the division: -inf / t would give the temperature a NaN gradient.
        other = [
            (_float32_at_least(row) / temperature).masked_fill(excluded, float("-inf"))
            for row, excluded, _ in rows
        ]
        union = torch.cat([logits, *other], 1)
        loss = torch.logsumexp(union, dim=1) - positive_logit
    if symmetric:
        # All queries against all positive keys: (B, B), already computed when in-batch.
        similarity = raw_logits[:, : len(query)] if in_batch else query @ positive_key.T
        key_logits = _float32_at_least(similarity).T / temperature  # (B keys, B queries)
        key_positive = torch.sum(_row_means(same, key_logits.dtype) * key_logits, dim=1)
        if guide is not None:  # after the positive's logit, as for the rows
            similar = guide.above(guide.key @ guide.query.T, protected=0)
            key_logits = key_logits.masked_fill(similar, float("-inf"))
        key_loss = row_loss(key_logits, same, key_positive, variant, temperature)
        loss = (loss + key_loss) / 2
    return reduce_loss(loss, reduction)


def _joint_rows(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Tensor | None,
    negative_mode: NegativeMode,
    negative_mask: Tensor | None,
    in_batch: bool,
    directions: Directions,
) -> list[tuple[Tensor, Tensor, int | None]]:
    """Pair i's similarities in the joint partition's other directions, and their exclusions.

    Each with the column offset of its diagonal that holds pair i's own
    positive (key to query: q_i), or None.

    Query to query: q_i against every other query. Key to query: k_i
    against all queries (q_i included, in the denominator). Key to key: k_i
    against the keys among query i's candidates that are not pair i's (the
    other positive keys, unpaired negatives, other rows' shared negatives).
    """
    batch = len(query)
    itself = torch.eye(batch, dtype=torch.bool, device=query.device)  # (B, B)
    rows: list[tuple[Tensor, Tensor, int | None]] = []
    if directions.query_to_query:
        rows.append((query @ query.T, itself, None))
    if directions.key_to_query:
        rows.append((positive_key @ query.T, torch.zeros_like(itself), 0))
    if directions.key_to_key:
        if in_batch:
            rows.append((positive_key @ positive_key.T, itself, None))
        if negative_keys is not None and negative_mode == "unpaired":
            unpaired = positive_key @ negative_keys.T  # (B, M)
            rows.append((unpaired, torch.zeros_like(unpaired, dtype=torch.bool), None))
        if negative_keys is not None and negative_mode == "shared":
            per_row = negative_keys.shape[1]
            owner = torch.arange(batch * per_row, device=query.device) // per_row  # (B * M,)
            excluded = owner == torch.arange(batch, device=query.device).unsqueeze(1)
            if negative_mask is not None:
                excluded = excluded | ~negative_mask.reshape(1, -1)
            similarity = positive_key @ negative_keys.flatten(0, 1).T  # (B, B * M)
            rows.append((similarity, excluded, None))
    return rows


class _Guide:
    """Unit guide embeddings (the model's own, detached, without a guide) and the thresholds."""

    def __init__(
        self, query: Tensor, key: Tensor, negatives: Tensor | None, threshold: Tensor
    ) -> None:
        self.query, self.key, self.negatives, self.threshold = query, key, negatives, threshold

    @staticmethod
    def of(
        false_negatives: FalseNegativeFilter,
        query: Tensor,
        positive_key: Tensor,
        negative_keys: Tensor | None,
    ) -> _Guide:
        found = false_negatives.guide or (query, positive_key, negative_keys)
        unit = [
            None if x is None else F.normalize(_float32_at_least(x.detach()), dim=-1)
            for x in (*found, None)[:3]
        ]
        guide_query, guide_key, guide_negatives = unit
        assert guide_query is not None
        assert guide_key is not None
        positive = torch.sum(guide_query * guide_key, dim=1)  # (B,) g_i
        threshold = false_negatives.threshold(positive)
        return _Guide(guide_query, guide_key, guide_negatives, threshold)

    def above(self, similarity: Tensor, protected: int | None) -> Tensor:
        """(B, C) bool: row i's entries above its threshold, but the protected diagonal's."""
        similar = similarity > self.threshold.unsqueeze(1)
        if protected is not None:
            torch.diagonal(similar, offset=protected).fill_(False)
        return similar


def _hardness_selection(
    logits: Tensor,
    negative_keys: Tensor | None,
    negative_mode: NegativeMode,
    in_batch: bool,
    hardness: Hardness,
) -> Tensor:
    """(B, candidates) bool: the negatives whose logits ``hardness`` raises.

    Columns as `_candidate_logits` lays them out. "Hard" negatives belong to
    the query (its paired or shared ones, every unpaired one); "in-batch"
    ones are the other rows' positive keys and shared negatives.
    """
    (batch, width), device = logits.shape, logits.device
    rows = torch.arange(batch, device=device).unsqueeze(1)  # (B, 1)
    leading = batch if in_batch else 1
    own = torch.zeros(batch, width, dtype=torch.bool, device=device)  # (B, candidates)
    if in_batch:
        own[:, :batch] = rows == torch.arange(batch, device=device)  # the target
    else:
        own[:, 0] = True
    negatives = torch.zeros_like(own)
    negatives[:, leading:] = True
    if negative_mode == "shared" and negative_keys is not None:
        per_row = negative_keys.shape[1]
        columns = torch.arange(width - leading, device=device)  # (B * M,)
        own[:, leading:] = columns // per_row == rows
    elif negative_keys is not None:
        own[:, leading:] = True
    hard = own & negatives
    in_batch_negatives = ~own
    selected = torch.zeros_like(own)
    if hardness.hard:
        selected |= hard
    if hardness.in_batch:
        selected |= in_batch_negatives
    return selected


def _row_means(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """The weights of each row's mean over its True entries: rows sum to 1."""
    weights = mask.to(dtype)
    return weights / weights.sum(dim=1, keepdim=True)


def row_loss(
    logits: Tensor,
    is_positive: Tensor,
    positive_logit: Tensor,
    variant: Variant,
    temperature: float | Tensor,
) -> Tensor:
    """Each row's loss from its candidates' logits (non-candidates at -inf). (B,)

    * InfoNCE: ``logsumexp(logits) - positive_logit``.
    * decoupled: ``logsumexp(negatives) - positive_logit``, the negatives being
      the candidates that are not positives; 0 for a row without negatives.
    * debiased (one positive ``s+``, N negatives ``s_j``): ``log(exp(s+) + Ng) -
      s+`` with ``Ng = max(N (mean - tau exp(s+)) / (1 - tau), N exp(-1/t))``,
      ``mean`` the negatives' mean of ``exp(s_j)`` weighted by ``exp(beta s_j)``.

    Args:
        logits: (B, C) logits, divided by the temperature.
        is_positive: (B, C) bool, the positives' columns.
        positive_logit: (B,) the (mean) positive logit.
        variant: the objective.
        temperature: the temperature (the clamp is ``-1/t``).
    """
    if not (variant.decoupled or variant.debiased):
        return torch.logsumexp(logits, dim=1) - positive_logit
    negatives = logits.masked_fill(is_positive, float("-inf"))
    empty = torch.isneginf(negatives).all(dim=1, keepdim=True)  # (B, 1) no negatives
    negatives = negatives.masked_fill(empty, 0.0)  # finite, so that no NaN reaches a gradient
    empty = empty.squeeze(1)
    if variant.decoupled:
        loss = torch.logsumexp(negatives, dim=1) - positive_logit
        return loss.masked_fill(empty, 0.0)
    beta, tau = variant.hard_negative_beta, variant.false_negative_rate
    count = torch.isfinite(negatives).sum(dim=1).to(logits.dtype)  # N
    log_weights = (
        torch.logsumexp(beta * negatives, dim=1) if beta else count.log()
    )  # log sum_j exp(beta s_j)
    log_mean = torch.logsumexp((1 + beta) * negatives, dim=1) - log_weights
    estimate = log_mean  # log((mean - tau exp(s+)) / (1 - tau)), NaN if negative
    if tau:
        ratio = tau * torch.exp(positive_logit - log_mean)
        estimate = log_mean + torch.log1p(-ratio) - math.log1p(-tau)
    clamp = -1.0 / temperature  # the logit of cosine -1
    clamp = clamp * torch.ones_like(estimate)
    log_negatives = count.log() + torch.where(estimate > clamp, estimate, clamp)  # log Ng
    loss = F.softplus(log_negatives - positive_logit)
    return loss.masked_fill(empty, 0.0)


def _seed_loss(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Tensor | None,
    temperature: float | Tensor,
    reduction: Reduction,
    negative_mode: NegativeMode,
) -> Tensor:
    """info-nce-pytorch's formula: logits and `F.cross_entropy`."""
    in_batch = negative_keys is None
    logits = _candidate_logits(query, positive_key, negative_keys, negative_mode, in_batch)
    if in_batch:
        targets = torch.arange(len(query), device=query.device)  # query i's positive is key i
    else:
        targets = torch.zeros(len(query), dtype=torch.long, device=query.device)
    return F.cross_entropy(_float32_at_least(logits) / temperature, targets, reduction=reduction)


def _candidate_logits(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Tensor | None,
    negative_mode: NegativeMode,
    in_batch: bool,
) -> Tensor:
    """Every query's raw candidate scores, before the temperature: (B, candidates).

    In-batch: all B positive keys first (query i's positive is column i); else
    its own positive in column 0. Explicit negatives follow, paired ones last;
    shared ones as the (B * M) rows of the flattened negatives.
    """
    if in_batch:
        # Other rows' positive keys are the negatives.
        first = query @ positive_key.T  # (B, B)
    else:
        first = torch.sum(query * positive_key, dim=1, keepdim=True)  # (B, 1)
    if negative_keys is None:
        return first
    if negative_mode == "unpaired":
        negative_logits = query @ negative_keys.T  # (B, M)
    elif negative_mode == "shared":
        negative_logits = query @ negative_keys.flatten(0, 1).T  # (B, B * M), row i's from i * M
    else:
        negative_logits = (query.unsqueeze(1) @ negative_keys.transpose(-2, -1)).squeeze(1)
    return torch.cat([first, negative_logits], dim=1)  # (B, B or 1, + M)


def dense_nt_xent(
    views: Tensor,
    labels: Tensor | None,
    temperature: float | Tensor,
    reduction: Reduction,
    first_view_only: bool,
    variant: Variant | None = None,
    negative_keys: Tensor | None = None,
    negative_labels: Tensor | None = None,
) -> Tensor:
    """NT-Xent on (already normalised) (V, B, D) views, with a (V * B)^2 logits matrix.

    Embedding (v, i) is row ``v * B + i``. Row a's candidates are all other
    rows and the (M, D) ``negative_keys``; its positives are the other rows
    of its sample (or, with labels, of its label) and the negatives whose
    ``negative_labels`` equal its label. Its loss is ``logsumexp(candidates)
    - mean(positives)``, or the variant's (`row_loss`).

    Returns:
        A scalar, or for ``reduction='none'`` (V, B) (``first_view_only``: (B,)).
    """
    variant = variant or Variant()
    num_views, batch, dim = views.shape
    embeddings = views.reshape(num_views * batch, dim)  # (V * B, D)
    logits = _float32_at_least(embeddings @ embeddings.T) / temperature  # (V * B, V * B)
    itself = torch.eye(len(embeddings), dtype=torch.bool, device=views.device)
    sample_labels = torch.arange(batch, device=views.device) if labels is None else labels
    all_labels = sample_labels.repeat(num_views)  # (V * B,)
    positives = (all_labels.unsqueeze(1) == all_labels.unsqueeze(0)) & ~itself
    # After the division: -inf / t would give the temperature a NaN gradient.
    logits = logits.masked_fill(itself, float("-inf"))
    if negative_keys is not None:
        negative_logits = _float32_at_least(embeddings @ negative_keys.T) / temperature  # (VB, M)
        logits = torch.cat([logits, negative_logits], 1)  # (V * B, V * B + M)
        if negative_labels is None:
            same = positives.new_zeros(len(embeddings), len(negative_keys))
        else:
            same = all_labels.unsqueeze(1) == negative_labels  # (V * B, M)
        positives = torch.cat([positives, same], 1)
    if first_view_only:
        logits, positives = logits[:batch], positives[:batch]
    positive_logit = torch.where(positives, logits, 0.0).sum(dim=1) / positives.sum(dim=1)
    loss = row_loss(logits, positives, positive_logit, variant, temperature)  # (anchors,)
    if reduction == "none" and not first_view_only:
        return loss.view(num_views, batch)
    return reduce_loss(loss, reduction)


def dense_siglip(
    query: Tensor,
    key: Tensor,
    negative_keys: Tensor | None,
    temperature: float | Tensor,
    bias: float | Tensor,
    reduction: Reduction,
    *,
    labels: Tensor | None = None,
) -> Tensor:
    """SigLIP's sigmoid loss on (already normalised) embeddings, with a logits matrix.

    Args:
        query: (B, D) queries.
        key: (B, D) keys; key i is query i's positive.
        negative_keys: None or (M, D) negatives of every query.
        temperature: logits are divided by it.
        bias: added to every logit.
        reduction: ``'mean'`` (the sum over pairs divided by B), ``'sum'`` or
            ``'none'`` (each query's sum, (B,)).
        labels: (B,) ints; keys with a query's label are its positives.

    Returns:
        The loss: a scalar, or (B,) for ``reduction='none'``; float32 for
        half-precision inputs.
    """
    keys = key if negative_keys is None else torch.cat([key, negative_keys])  # (N, D)
    logits = _float32_at_least(query @ keys.T) / temperature + bias  # (B, N)
    if labels is None:
        positive = torch.eye(len(query), len(keys), dtype=torch.bool, device=query.device)
    else:
        positive = torch.zeros(len(query), len(keys), dtype=torch.bool, device=query.device)
        positive[:, : len(key)] = labels.unsqueeze(1) == labels.unsqueeze(0)
    signs = positive.to(logits.dtype) * 2 - 1  # (B, N) +1 positive, -1 negative
    per_query = -F.logsigmoid(signs * logits).sum(dim=1)  # (B,)
    return reduce_loss(per_query, reduction)
